"""Engine input/output paths: legacy LeRobot keys, string prompts with a tokenizer, norm stats, progress bar."""

import json

import numpy as np
import pytest

import cortexflow as cf
from cortexflow.checkpoints.pi0_layout import PALIGEMMA, PALIGEMMA_MODEL, LANGUAGE
from cortexflow.processing import load_norm_stats, normalize, unnormalize
from cortexflow.random_checkpoint import random_weights, tiny_model_config, write_checkpoint


def _inputs(seed, state_dim=6, chunk=5, action_dim=8):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(2, 64, 96, 3), dtype=np.uint8)
    state = rng.standard_normal(state_dim).astype(np.float32)
    noise = rng.standard_normal((chunk, action_dim)).astype(np.float32)
    return images, state, noise


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _write_norm_stats(path, state_dim=6, action_dim=7, seed=0):
    rng = np.random.default_rng(seed)

    def stats(dim):
        q01 = rng.uniform(-2, -0.5, dim)
        return {"mean": rng.normal(size=dim).tolist(), "std": rng.uniform(0.5, 2, dim).tolist(),
                "q01": q01.tolist(), "q99": (q01 + rng.uniform(1, 3, dim)).tolist()}

    path.write_text(json.dumps({"norm_stats": {"state": stats(state_dim), "actions": stats(action_dim)}}))
    return path


def test_legacy_lerobot_layout_loads_to_the_same_actions(tmp_path):
    from safetensors.torch import load_file, save_file

    config = tiny_model_config("pi0")
    write_checkpoint(tmp_path / "new", config, layout="lerobot")
    state = load_file(str(tmp_path / "new" / "model.safetensors"))
    legacy = {}
    for key, tensor in state.items():
        key = key.replace("model." + LANGUAGE, "model." + PALIGEMMA + "language_model.model.")
        key = key.replace("model." + PALIGEMMA_MODEL, "model." + PALIGEMMA)
        legacy[key] = tensor
    (tmp_path / "legacy").mkdir()
    save_file(legacy, str(tmp_path / "legacy" / "model.safetensors"))
    (tmp_path / "legacy" / "config.json").write_text((tmp_path / "new" / "config.json").read_text())
    assert cf.checkpoints.inspect_checkpoint(tmp_path / "legacy", config).layout == "lerobot-legacy"
    images, robot_state, noise = _inputs(1)
    outputs = []
    for folder in ("new", "legacy"):
        engine = cf.create_pi0_inference(tmp_path / folder, device="cpu", dtype="float32", model_config=config)
        outputs.append(engine.predict(images, state=robot_state, prompt_tokens=[2, 9, 33], noise=noise))
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["pi0", "pi05"])
def test_string_prompt_and_norm_stats(tmp_path, tiny_tokenizer_path, model_type):
    config = tiny_model_config(model_type)
    write_checkpoint(tmp_path / "ckpt", config, weights=random_weights(config, seed=5))
    stats_path = _write_norm_stats(tmp_path / "norm_stats.json")
    create = cf.create_pi0_inference if model_type == "pi0" else cf.create_pi05_inference
    common = dict(device="cpu", dtype="float32", model_config=config, tokenizer_path=tiny_tokenizer_path)
    with_stats = create(tmp_path / "ckpt", norm_stats_path=stats_path, **common)
    raw = create(tmp_path / "ckpt", **common)
    images, state, noise = _inputs(2)
    stats = load_norm_stats(stats_path)
    mode = "zscore" if model_type == "pi0" else "quantile"

    actions = with_stats.predict(images, "pick up the red cube", state, noise=noise)
    # The same call on an engine without stats, fed the normalised state, gives the normalised actions.
    normalized = raw.predict(images, "pick up the red cube", normalize(state, stats["state"], mode), noise=noise)
    np.testing.assert_allclose(actions, unnormalize(normalized, stats["actions"], mode), rtol=1e-5, atol=1e-5)
    assert _rel(actions, normalized) > 1e-3  # un-normalisation really happened
    np.testing.assert_array_equal(actions[:, 7:], normalized[:, 7:])  # dims past the robot's pass through

    other_prompt = with_stats.predict(images, "open the drawer", state, noise=noise)
    assert _rel(other_prompt, actions) > 1e-4
    other_state = with_stats.predict(images, "pick up the red cube", state + 0.5, noise=noise)
    assert _rel(other_state, actions) > 1e-4  # Pi0: state token; Pi0.5: state bins in the prompt


def test_pi05_without_discrete_state_ignores_state(tmp_path, tiny_tokenizer_path):
    config = tiny_model_config("pi05")
    write_checkpoint(tmp_path, config)
    engine = cf.create_pi05_inference(tmp_path, device="cpu", dtype="float32", model_config=config,
                                      tokenizer_path=tiny_tokenizer_path, discrete_state_input=False)
    images, state, noise = _inputs(3)
    first = engine.predict(images, "wipe the table", state, noise=noise)
    np.testing.assert_array_equal(first, engine.predict(images, "wipe the table", state + 1, noise=noise))


def test_progress_bar_is_shown_when_asked(tmp_path, capsys):
    config = tiny_model_config("pi0")
    write_checkpoint(tmp_path, config)
    cf.create_pi0_inference(tmp_path, device="cpu", dtype="float32", model_config=config, progress=True)
    assert "loading" in capsys.readouterr().err
    cf.create_pi0_inference(tmp_path, device="cpu", dtype="float32", model_config=config, progress=False)
    assert "loading" not in capsys.readouterr().err


def test_images_are_prepared_in_the_staging_buffer_and_calls_leave_nothing_behind(tmp_path, monkeypatch):
    """The built-in preprocessor writes the images straight into the engine's staged buffer (no image-sized
    allocation per call); a call with other inputs in between, or a batch, changes nothing."""
    import cortexflow.preprocessor
    from cortexflow.processing import prepare_images

    targets = []

    def spy(images, num_views, image_size, out=None):
        targets.append(None if out is None else out.ctypes.data)
        return prepare_images(images, num_views, image_size, out=out)

    monkeypatch.setattr(cortexflow.preprocessor, "prepare_images", spy)
    config = tiny_model_config("pi0", chunk_size=5)
    write_checkpoint(tmp_path, config)
    engine = cf.create_pi0_inference(tmp_path, device="cpu", dtype="float32", model_config=config)
    images, state, noise = _inputs(2)
    first = engine.predict(images, state=state, prompt_tokens=[2, 9], noise=noise)
    staged = engine.staging(1)["images"]
    assert targets == [staged.data_ptr()]
    np.testing.assert_array_equal(staged[0].numpy(), prepare_images(images, 2, config.image_size).numpy())
    other, other_state, _ = _inputs(3)
    engine.predict(other, state=other_state, prompt_tokens=[2, 9, 4, 5], noise=noise)
    np.testing.assert_array_equal(engine.predict(images, state=state, prompt_tokens=[2, 9], noise=noise), first)
    batch = engine.predict_batch([other, images], batch_states=[other_state, state],
                                 batch_prompt_tokens=[[2, 9, 4, 5], [2, 9]], noise=np.stack([noise, noise]))
    np.testing.assert_array_equal(engine.staging(2)["images"][1].numpy(), staged[0].numpy())
    np.testing.assert_allclose(batch[1], first, rtol=1e-5, atol=1e-6)
