"""The README's extension examples work: a custom model, a registered backend, a replaced preprocessor."""

import numpy as np
import torch
import torch.nn.functional as F

import cortexflow as cf
from cortexflow.checkpoints.pi0_layout import to_checkpoint_keys
from cortexflow.random_checkpoint import random_weights, tiny_model_config, write_checkpoint


def _observation(seed, views=2):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(views, 60, 80, 3), dtype=np.uint8)
    return images, [2, 17, 40, 99], rng.standard_normal(6).astype(np.float32), rng.standard_normal((5, 8)).astype(np.float32)


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


class PrefixedPi0(cf.Pi0Model):
    def preprocess_checkpoint(self, checkpoint):
        return super().preprocess_checkpoint({k.removeprefix("policy."): v for k, v in checkpoint.items()})


class FusedGeluBackend(cf.PyTorchBackend):
    name = "fused-gelu"

    def gelu_tanh_gate(self, gate, up):
        return F.gelu(gate, approximate="tanh").mul_(up)


def test_custom_model_custom_backend_and_preprocessor(tmp_path):
    config = tiny_model_config("pi0", chunk_size=5)
    weights = random_weights(config, seed=3)
    write_checkpoint(tmp_path, config, weights=weights)
    reference = cf.create_pi0_inference(tmp_path, device="cpu", dtype="float32", model_config=config)
    images, tokens, state, noise = _observation(0)
    expected = reference.predict(images, state=state, prompt_tokens=tokens, noise=noise)

    prefixed = {"policy." + k: v for k, v in to_checkpoint_keys(weights, config).items()}
    model = PrefixedPi0(config)
    assert model.get_buffer_shapes(num_views=2, chunk_size=5)["noise"] == (1, 5, 8)
    inference = cf.InferenceConfig(num_views=2, device="cpu", dtype="float32")
    custom = cf.VLAInferenceEngine(prefixed, model=model, inference_config=inference)
    got = custom.predict(images, state=state, prompt_tokens=tokens, noise=noise)
    assert _rel(got, expected) < 1e-6

    cf.register_backend("fused-gelu", FusedGeluBackend)
    fused = cf.create_pi0_inference(tmp_path, backend="fused-gelu", device="cpu", dtype="float32", model_config=config)
    assert isinstance(fused.backend, FusedGeluBackend)
    assert _rel(fused.predict(images, state=state, prompt_tokens=tokens, noise=noise), expected) < 1e-6

    default = fused.preprocessor
    seen = []

    def flipped_cameras(images, prompt, state, prompt_tokens, image_masks):
        seen.append(True)
        return default([img[:, ::-1] for img in images], prompt, state, prompt_tokens, image_masks)

    fused.preprocessor = flipped_cameras
    flipped = fused.predict(images, state=state, prompt_tokens=tokens, noise=noise)
    assert seen and _rel(flipped, expected) > 1e-4
    mirrored = reference.predict(images[:, :, ::-1], state=state, prompt_tokens=tokens, noise=noise)
    assert _rel(flipped, mirrored) < 1e-6


def test_custom_model_rejects_mismatched_weights():
    config = tiny_model_config("pi0")
    weights = to_checkpoint_keys(random_weights(config), config)
    weights["projector.bogus"] = torch.ones(3)
    inference = cf.InferenceConfig(num_views=2, device="cpu", dtype="float32")
    try:
        cf.VLAInferenceEngine(weights, model=cf.Pi0Model(config), inference_config=inference)
    except cf.CheckpointError as err:
        assert "projector.bogus" in str(err)
    else:
        raise AssertionError("an unexpected tensor was accepted")
