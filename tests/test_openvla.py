"""OpenVLA on CPU with tiny random checkpoints in the real Hugging Face layout (sharded index).

Covered: the DINOv2 and SigLIP towers and the Llama decoder against ``transformers`` with the same
weights (fp32), KV-cached decoding against a no-cache recompute, the image reaching the actions,
token <-> bin <-> value mapping and un-normalisation by hand, the prompt ids, every bad input, the
Triton backend under the interpreter, and ``cortexflow info``.
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
import transformers

import cortexflow as cf
from cortexflow.backends.pytorch import PyTorchBackend
from cortexflow.checkpoints.openvla_layout import infer_openvla_config
from cortexflow.errors import CheckpointError, InputError, NormStatsError, TokenizerError
from cortexflow.models.llama import LlamaLM, prepare_llama_norms
from cortexflow.models.openvla import OpenVLAConfig, OpenVLAModel
from cortexflow.models.token_decoding import causal_mask
from cortexflow.models.vit import vit_features
from cortexflow.processing.action_tokens import (
    ActionStats,
    openvla_tokens_to_bins,
    openvla_tokens_to_values,
    select_action_stats,
)
from cortexflow.random_token_vla import (
    example_norm_stats,
    random_openvla_weights,
    tiny_openvla_config,
    write_openvla_checkpoint,
)

# The Triton backend runs on the GPU where there is one, else under TRITON_INTERPRET=1 (set by conftest).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

FP32_REL = 1e-5
OPS = PyTorchBackend(torch.device("cpu"), torch.float32)
LLAMA_SENTENCES = [
    "pick up the red block and place it in the bowl",
    "open the top drawer and put the sponge inside",
    "In: What action should the robot take to close the gripper?\nOut:",
    "put the cup on the plate",
]


def assert_close(actual, expected, rel=FP32_REL, what=""):
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"{what}: {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).norm().item() / expected.norm().item()
    assert err <= rel, f"{what}: relative error {err:.3e} > {rel:.1e}"


@pytest.fixture(scope="module")
def llama_tokenizer_path(tmp_path_factory):
    """A tiny SentencePiece model with Llama's conventions (unk 0, BOS 1, EOS 2, byte fallback, a "▁" piece)."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(LLAMA_SENTENCES * 10), model_writer=model, vocab_size=320, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, split_digits=True,
        character_coverage=1.0, minloglevel=2,
    )
    path = tmp_path_factory.mktemp("llama_tokenizer") / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, llama_tokenizer_path):
    """A tiny OpenVLA folder: 2 shards + index, config.json with one dataset's stats, tokenizer.model."""
    directory = tmp_path_factory.mktemp("openvla_tiny")
    write_openvla_checkpoint(directory, tiny_openvla_config(), seed=3, dtype=torch.float32)
    (directory / "tokenizer.model").write_bytes(llama_tokenizer_path.read_bytes())
    return directory


@pytest.fixture(scope="module")
def engine(checkpoint):
    return cf.create_openvla_inference(checkpoint, device="cpu", dtype="float32")


def test_checkpoint_is_sharded_with_dead_weights(checkpoint):
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2
    assert "vision_backbone.featurizer.blocks.2.ls1.scale_factor" in index["weight_map"]
    assert "vision_backbone.fused_featurizer.attn_pool.latent" in index["weight_map"]


# ---- towers and decoder against transformers ------------------------------------------------


def _randomize(module, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name and name.endswith("weight") or "layernorm" in name and name.endswith("weight"):
                value = 1.0 + 0.2 * noise
            elif param.ndim >= 2 and "embed" not in name and "token" not in name:
                value = noise / math.sqrt(math.prod(param.shape[1:]))
            elif "lambda1" in name:
                value = 0.5 + 0.2 * noise
            else:
                value = 0.3 * noise
            param.copy_(value)


def test_dinov2_tower_matches_hf():
    config = tiny_openvla_config()
    spec = config.dino_spec()
    hf_config = transformers.Dinov2WithRegistersConfig(
        hidden_size=spec.dim, num_hidden_layers=config.dino_layers, num_attention_heads=spec.num_heads,
        mlp_ratio=spec.mlp_dim // spec.dim, image_size=224, patch_size=14, num_register_tokens=4,
        layer_norm_eps=1e-6, hidden_act="gelu", attn_implementation="eager",
    )
    model = transformers.Dinov2WithRegistersModel(hf_config).eval()
    _randomize(model, 1)
    with torch.no_grad():  # timm reg4 (no_embed_class): the CLS token gets no position embedding
        model.embeddings.position_embeddings[:, 0] = 0
    sd = model.state_dict()
    weights = {
        "dino.patch.weight": sd["embeddings.patch_embeddings.projection.weight"],
        "dino.patch.bias": sd["embeddings.patch_embeddings.projection.bias"],
        "dino.pos": sd["embeddings.position_embeddings"][0, 1:],
        "dino.cls": sd["embeddings.cls_token"][0, 0],
        "dino.reg": sd["embeddings.register_tokens"][0],
    }
    for i in range(spec.out_layer + 1):
        p = f"encoder.layer.{i}."
        a = lambda n: sd[p + n]  # noqa: E731
        # transformers 5 names the projections attention.{q,k,v,o}_proj; 4.x attention.attention.{query,
        # key,value} and attention.output.dense.
        legacy = p + "attention.q_proj.weight" not in sd
        qkv_names = ("attention.attention.query", "attention.attention.key", "attention.attention.value") \
            if legacy else ("attention.q_proj", "attention.k_proj", "attention.v_proj")
        out_name = "attention.output.dense" if legacy else "attention.o_proj"
        for param in ("weight", "bias"):
            weights[f"dino.blocks.{i}.qkv.{param}"] = torch.cat([a(f"{x}.{param}") for x in qkv_names])
            weights[f"dino.blocks.{i}.proj.{param}"] = a(f"{out_name}.{param}")
            for n in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                weights[f"dino.blocks.{i}.{n.removeprefix('mlp.')}.{param}"] = a(f"{n}.{param}")
        weights[f"dino.blocks.{i}.ls1"] = a("layer_scale1.lambda1")
        weights[f"dino.blocks.{i}.ls2"] = a("layer_scale2.lambda1")
    images = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(2)) * 4 - 2
    with torch.no_grad():
        hidden = model(pixel_values=images, output_hidden_states=True).hidden_states
    reference = hidden[spec.out_layer + 1][:, 5:]
    ours = vit_features(OPS, weights, spec, images, torch.float32)
    assert ours.shape == (2, 256, spec.dim)
    assert_close(ours, reference, what="dinov2 features")
    assert (hidden[spec.out_layer + 2][:, 5:] - reference).norm() > 0.03 * reference.norm()  # the last block matters


def test_siglip_tower_matches_hf():
    config = tiny_openvla_config()
    spec = config.siglip_spec()
    kwargs = dict(hidden_size=spec.dim, intermediate_size=spec.mlp_dim, num_hidden_layers=config.siglip_layers,
                  num_attention_heads=spec.num_heads, image_size=224, patch_size=14, hidden_act="gelu",
                  layer_norm_eps=1e-6, attn_implementation="eager")
    model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**kwargs)).eval()
    _randomize(model, 4)
    sd = {k.removeprefix("vision_model."): v for k, v in model.state_dict().items()}
    weights = {
        "siglip.patch.weight": sd["embeddings.patch_embedding.weight"],
        "siglip.patch.bias": sd["embeddings.patch_embedding.bias"],
        "siglip.pos": sd["embeddings.position_embedding.weight"],
    }
    for i in range(spec.out_layer + 1):
        a = lambda n: sd[f"encoder.layers.{i}.{n}"]  # noqa: E731
        for param in ("weight", "bias"):
            weights[f"siglip.blocks.{i}.qkv.{param}"] = torch.cat([a(f"self_attn.{x}_proj.{param}") for x in "qkv"])
            weights[f"siglip.blocks.{i}.proj.{param}"] = a(f"self_attn.out_proj.{param}")
            weights[f"siglip.blocks.{i}.norm1.{param}"] = a(f"layer_norm1.{param}")
            weights[f"siglip.blocks.{i}.norm2.{param}"] = a(f"layer_norm2.{param}")
            weights[f"siglip.blocks.{i}.fc1.{param}"] = a(f"mlp.fc1.{param}")
            weights[f"siglip.blocks.{i}.fc2.{param}"] = a(f"mlp.fc2.{param}")
    images = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        reference = model(pixel_values=images, output_hidden_states=True).hidden_states[spec.out_layer + 1]
    ours = vit_features(OPS, weights, spec, images, torch.float32)
    assert_close(ours, reference, what="siglip features")


@pytest.mark.parametrize("spec_name", ["dino_spec", "siglip_spec"])
def test_vit_residual_stream_is_row_major(spec_name):
    """The convolution's patch tokens are a transposed view, and so is their sum with the position embedding: the
    tower makes the stream row-major once, so no LayerNorm or linear of any block gets (and copies) a strided
    input."""
    config = tiny_openvla_config()
    spec = getattr(config, spec_name)()
    weights = {k: v for k, v in random_openvla_weights(config).items() if k.startswith(spec.prefix + ".")}
    seen = []

    class Recording(PyTorchBackend):
        def layer_norm(self, x, weight, bias, eps):
            seen.append(x.is_contiguous())
            return super().layer_norm(x, weight, bias, eps)

        def linear(self, x, weight, bias=None):
            seen.append(x.is_contiguous())
            return super().linear(x, weight, bias)

    images = torch.rand(1, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(1))
    vit_features(Recording(torch.device("cpu"), torch.float32), weights, spec, images, torch.float32)
    assert len(seen) == 6 * (spec.out_layer + 1) and all(seen)


@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_llama_decoder_matches_hf(eps):
    hf_config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, rms_norm_eps=eps, rope_theta=10000.0, max_position_embeddings=512,
        attn_implementation="eager",
    )
    model = transformers.LlamaModel(hf_config).eval()
    _randomize(model, 7)
    sd = model.state_dict()
    names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
             "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
    weights = {"llm.embed": sd["embed_tokens.weight"], "llm.norm": sd["norm.weight"]}
    for i in range(2):
        for short, long in names.items():
            weights[f"llm.layers.{i}.{short}"] = sd[f"layers.{i}.{long}.weight"]
        weights[f"llm.layers.{i}.attn_norm"] = sd[f"layers.{i}.input_layernorm.weight"]
        weights[f"llm.layers.{i}.mlp_norm"] = sd[f"layers.{i}.post_attention_layernorm.weight"]
    # the eps comes from the checkpoint's config.json text_config
    config = infer_openvla_config({}, {"text_config": {"rms_norm_eps": eps, "num_attention_heads": 4}},
                                  dict(llm_dim=64, llm_layers=2, head_dim=16, num_kv_heads=4))
    assert config.rms_norm_eps == eps and config.num_heads == 4
    lm = LlamaLM(config.decoder_dims())
    weights = prepare_llama_norms(weights)
    x = torch.randn(1, 11, 64, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        reference = model(inputs_embeds=x).last_hidden_state
    cache = tuple(torch.zeros(2, 1, 16, 4, 16) for _ in range(2))
    h = x
    positions = torch.arange(11)[None]
    for i in range(2):
        h = lm.layer(OPS, weights, i, h, positions, causal_mask(11, 1, x.device), cache, None)
    ours = lm.norm(OPS, weights, "llm.norm", h)
    assert_close(ours, reference, what="llama decoder")


# ---- decoding ----------------------------------------------------------------------------------


def _image(kind: str) -> np.ndarray:
    if kind == "black":
        return np.zeros((224, 224, 3), np.uint8)
    if kind == "white":
        return np.full((224, 224, 3), 255, np.uint8)
    return np.random.default_rng(int(kind)).integers(0, 256, (300, 400, 3), dtype=np.uint8)


@pytest.mark.parametrize("constrained", [False, True])
def test_kv_cached_decode_equals_full_recompute(engine, constrained):
    engine.constrained = constrained
    try:
        distinct = 0
        for kind in (("black", "1") if not constrained else ("1",)):
            engine.predict(_image(kind), "pick up the cup")
            ids = engine.prompt_ids("pick up the cup")
            pixels = engine.model.prepare_image(_image(kind))[None]
            with torch.inference_mode():
                reference = engine.model.reference_tokens(engine.backend, engine.weights, pixels,
                                                          torch.tensor([ids]), constrained)
            assert engine.last_tokens.tolist() == reference[0].tolist()
            distinct = max(distinct, len(set(engine.last_tokens.tolist())))
            if constrained:
                lo, hi = engine.config.action_id_range
                assert ((engine.last_tokens >= lo) & (engine.last_tokens < hi)).all()
        assert distinct > 1, "every run decoded one repeated token; the comparison would be weak"
    finally:
        engine.constrained = False


def test_black_and_white_images_give_different_actions(engine):
    black = engine.predict(_image("black"), "pick up the cup")
    black_tokens = engine.last_tokens.copy()
    white = engine.predict(_image("white"), "pick up the cup")
    assert black.shape == (7,) and black.dtype == np.float32
    assert not np.array_equal(black_tokens, engine.last_tokens)
    assert not np.array_equal(black, white)


def test_prompt_ids_and_space_token(engine, llama_tokenizer_path):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(llama_tokenizer_path))
    space = sp.piece_to_id("\u2581")
    assert engine.config.space_token_id == space
    expected = [1, *sp.encode("In: What action should the robot take to pick up the cup?\nOut:"), space]
    assert engine.prompt_ids("pick up the cup") == expected
    assert engine.prompt_ids(None, prompt_tokens=expected) == expected  # not appended twice
    assert engine.prompt_ids(None, prompt_tokens=expected[:-1]) == expected


def test_actions_are_unnormalised_by_id(engine):
    actions = engine.predict(_image("1"), "pick up the cup")
    stats = example_norm_stats(7)["bridge_orig"]["action"]
    q01, q99, mask = (np.array(stats[k]) for k in ("q01", "q99", "mask"))
    norm = openvla_tokens_to_values(engine.last_tokens, 320)
    by_hand = np.where(mask, 0.5 * (norm + 1) * (q99 - q01) + q01, norm)
    np.testing.assert_allclose(actions, by_hand, rtol=1e-6, atol=1e-7)
    assert engine.unnorm_key == "bridge_orig"


def test_token_bin_value_mapping():
    assert openvla_tokens_to_values([31872], 32000)[0] == 0.0
    assert openvla_tokens_to_values([31999], 32000)[0] == pytest.approx(-0.996, abs=1e-3)
    assert openvla_tokens_to_values([31999], 32000)[0] == pytest.approx(-1 + 1 / 255, abs=1e-6)
    top = openvla_tokens_to_values([31744, 31745], 32000)
    assert top[0] == top[1] == pytest.approx(1 - 1 / 255, abs=1e-6)
    assert openvla_tokens_to_bins([31872, 31999, 31744, 100], 32000).tolist() == [127, 0, 254, 254]
    # the training-side tokenizer: token = V - digitize(a, linspace(-1, 1, 256)); decoding lands within a bin
    values = np.linspace(-0.99, 0.99, 97)
    tokens = 32000 - np.digitize(values, np.linspace(-1, 1, 256))
    assert np.abs(openvla_tokens_to_values(tokens, 32000) - values).max() <= 2 / 255
    assert OpenVLAConfig().action_id_range == (31744, 32000)


def test_unnormalisation_by_hand():
    stats = ActionStats.from_entry("x", {"action": {"q01": [-1.0, 0.0, 2.0], "q99": [1.0, 4.0, 3.0],
                                                    "mask": [True, True, False]}})
    out = stats.unnormalize(np.array([0.5, -1.0, 0.25]))
    np.testing.assert_allclose(out, [0.5, 0.0, 0.25])
    out = stats.unnormalize(np.array([1.0, 0.0, -0.5]))
    np.testing.assert_allclose(out, [1.0, 2.0, -0.5])
    no_mask = ActionStats.from_entry("y", {"action": {"q01": [0.0], "q99": [2.0]}})
    assert no_mask.unnormalize(np.array([0.0]))[0] == 1.0


def test_real_size_parameter_budget():
    shapes = OpenVLAModel(OpenVLAConfig()).get_weight_shapes()
    count = lambda prefix: sum(math.prod(s) for n, s in shapes.items() if n.startswith(prefix))  # noqa: E731
    assert count("llm.") == 6_738_939_904
    assert count("projector.") == 71_385_600
    # blocks 0..22 of DINOv2 and 0..25 of SigLIP are read; the rest of the spec's totals is dead weight
    d, m = 1024, 4096
    dead_block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (m * d + m) + (d * m + d) + 2 * d
    assert count("dino.") == 303_230_976 - dead_block - 2 * d  # minus blocks.23 and the final norm
    assert shapes["llm.embed"] == (32064, 4096)


# ---- checkpoint variants and bad inputs --------------------------------------------------------


def test_dataset_statistics_json_and_unnorm_key(tmp_path, llama_tokenizer_path):
    config = tiny_openvla_config()
    write_openvla_checkpoint(tmp_path, config, seed=3, dtype=torch.float32,
                             norm_stats=example_norm_stats(7, ("bridge_orig", "fractal20220817_data")),
                             dataset_statistics=example_norm_stats(7, ("libero_spatial",)))
    (tmp_path / "tokenizer.model").write_bytes(llama_tokenizer_path.read_bytes())
    with pytest.raises(NormStatsError, match="pass unnorm_key=.*bridge_orig.*fractal20220817_data.*libero_spatial"):
        cf.create_openvla_inference(tmp_path, device="cpu", dtype="float32")
    with pytest.raises(NormStatsError, match="'nope' is not in.*known keys: bridge_orig, fractal20220817_data"):
        cf.create_openvla_inference(tmp_path, device="cpu", dtype="float32", unnorm_key="nope")
    engine = cf.create_openvla_inference(tmp_path, device="cpu", dtype="float32", unnorm_key="libero_spatial")
    assert engine.unnorm_key == "libero_spatial"
    assert select_action_stats({}, None) == (None, None)


def test_missing_shard_is_named(tmp_path):
    write_openvla_checkpoint(tmp_path, tiny_openvla_config(), seed=0)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        cf.create_openvla_inference(tmp_path, device="cpu", dtype="float32")


def test_bad_tensors_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    write_openvla_checkpoint(tmp_path, tiny_openvla_config(), seed=0, num_shards=1)
    shard = tmp_path / "model-00001-of-00001.safetensors"
    state = load_file(str(shard))
    del state["language_model.model.layers.1.mlp.up_proj.weight"]
    state["projector.fc2.weight"] = state["projector.fc2.weight"][:, :-1].contiguous()
    state["language_model.model.surprise"] = torch.zeros(3)
    save_file(state, str(shard))
    index = tmp_path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {k: shard.name for k in state}
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError) as info:
        cf.create_openvla_inference(tmp_path, device="cpu", dtype="float32")
    message = str(info.value)
    for name in ("layers.1.mlp.up_proj.weight", "projector.fc2.weight", "language_model.model.surprise"):
        assert name in message


def test_bad_images_and_prompts(engine, checkpoint):
    good = _image("black")
    for bad, pattern in (
        (good.transpose(2, 0, 1), "CHW"),
        (good[..., 0], "expected one HWC RGB image"),
        (good.astype(np.int32), "dtype int32"),
        (np.full((224, 224, 3), np.nan, np.float32), "NaN"),
        (np.full((224, 224, 3), 3.0, np.float32), r"expected \[0, 1\]"),
        ("image.png", "type str"),
        (np.zeros((0, 5, 3), np.uint8), "empty"),
    ):
        with pytest.raises(InputError, match=pattern):
            engine.predict(bad, "pick up the cup")
    with pytest.raises(InputError, match="task_prompt"):
        engine.predict(good, "")
    with pytest.raises(InputError, match="at most 128"):
        engine.predict(good, "pick up the cup " * 40)
    with pytest.raises(InputError, match="outside"):
        engine.predict(good, prompt_tokens=[1, 5000])
    with pytest.raises(TokenizerError, match="does not exist"):
        cf.create_openvla_inference(checkpoint, device="cpu", dtype="float32", tokenizer_path=checkpoint / "nope.model")


def test_text_prompt_without_tokenizer(tmp_path):
    write_openvla_checkpoint(tmp_path, tiny_openvla_config(), seed=0)
    with pytest.raises(cf.ConfigError, match="space_token_id 29871 is outside the vocabulary"):
        cf.create_openvla_inference(tmp_path, device="cpu", dtype="float32")
    engine = cf.create_openvla_inference(tmp_path, device="cpu", dtype="float32", model_config={"space_token_id": 259})
    with pytest.raises(TokenizerError, match="needs a tokenizer"):
        engine.predict(_image("black"), "pick up the cup")
    assert engine.predict(_image("black"), prompt_tokens=[1, 7, 9]).shape == (7,)


def test_pil_image_and_float_image_agree(engine):
    pil = pytest.importorskip("PIL.Image")
    image = _image("3")
    a = engine.predict(pil.fromarray(image), "pick up the cup")
    b = engine.predict(image.astype(np.float32) / 255.0, "pick up the cup")
    np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory, llama_tokenizer_path):
    """The tiny OpenVLA with 56 px images (16 patches a tower instead of 256), for the Triton interpreter."""
    directory = tmp_path_factory.mktemp("openvla_tiny_56px")
    write_openvla_checkpoint(directory, tiny_openvla_config(image_size=56), seed=3, dtype=torch.float32)
    (directory / "tokenizer.model").write_bytes(llama_tokenizer_path.read_bytes())
    return directory


@pytest.mark.parametrize("options", [{}, {"decode_gemv": "off", "decode_qkv_rope": False, "decode_head": False,
                                          "fold_token_norms": False, "fused_combine": "off"}],
                         ids=["default", "unfused decode"])
def test_triton_backend_matches_pytorch(small_checkpoint, options):
    """Same tokens and actions on the Triton backend, with the default fused decode path and with every
    token switch of TritonOptions off (cuBLAS decode steps, separate norms, QKV/RoPE and combine kernels)."""
    pytest.importorskip("triton")
    from cortexflow.backends.triton_backend import TritonBackend

    engine = cf.create_openvla_inference(small_checkpoint, device="cpu", dtype="float32")
    triton_engine = cf.create_openvla_inference(small_checkpoint, backend=TritonBackend.configured(**options),
                                                device=TRITON_DEVICE, dtype="float32")
    assert triton_engine.model.config.image_size == 56
    expected = engine.predict(_image("1"), "pick up the cup")
    got = triton_engine.predict(_image("1"), "pick up the cup")
    assert triton_engine.last_tokens.tolist() == engine.last_tokens.tolist()
    np.testing.assert_array_equal(got, expected)


def test_cli_info_detects_openvla(checkpoint):
    from typer.testing import CliRunner

    from cortexflow.cli import app

    result = CliRunner().invoke(app, ["info", str(checkpoint), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["model_type"] == "openvla"
    assert data["ok"] is True
    assert data["datasets"] == ["bridge_orig"]
