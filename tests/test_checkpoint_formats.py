"""openpi JAX (Orbax ``params/``) checkpoints, ``cortexflow convert``, openpi LoRA leaves, PEFT LoRA adapters,
the token-embedding table and the SigLIP head count.

The Orbax trees are written here with orbax-checkpoint from canonical weights by the inverse of the
layout in docs/reference_facts.md#F-OP-10 and F-OP-12, written independently of the package's reader."""

import json
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import cortexflow as cf
from cortexflow.checkpoints.convert import convert_checkpoint
from cortexflow.checkpoints.loader import load_pi0_checkpoint
from cortexflow.checkpoints.pi0_layout import EMBEDDING_KEYS
from cortexflow.checkpoints.vision_heads import siglip_head_count
from cortexflow.errors import CheckpointError, CortexFlowWarning
from cortexflow.random_checkpoint import random_weights, tiny_model_config, write_checkpoint

CPU = torch.device("cpu")


def _np(tensor):
    return tensor.detach().float().numpy()


def _stack(weights, fmt, layers, fn=lambda a: a):
    return np.stack([fn(_np(weights[fmt.format(i)])) for i in range(layers)])


def _heads_in(w, n):  # PyTorch (N*H, D) -> JAX (N, D, H)
    return w.reshape(n, -1, w.shape[1]).transpose(0, 2, 1)


def _heads_out(w, n):  # PyTorch (D, N*H) -> JAX (N, H, D)
    return w.reshape(w.shape[0], n, -1).transpose(1, 2, 0)


def _gemma_layers(weights, config, prefix, suffix, layers, adaptive):
    n, k = config.num_heads, config.num_kv_heads
    def fmt(short):
        return f"{prefix}.layers.{{}}.{short}"
    tree = {
        f"attn/q_einsum{suffix}/w": _stack(weights, fmt("q"), layers, lambda w: _heads_in(w, n)),
        f"attn/kv_einsum{suffix}/w": np.stack([
            np.stack([_heads_in(_np(weights[f"{prefix}.layers.{i}.k"]), k), _heads_in(_np(weights[f"{prefix}.layers.{i}.v"]), k)])
            for i in range(layers)]),
        f"attn/attn_vec_einsum{suffix}/w": _stack(weights, fmt("o"), layers, lambda w: _heads_out(w, n)),
        f"mlp{suffix}/gating_einsum": np.stack([
            np.stack([_np(weights[f"{prefix}.layers.{i}.gate"]).T, _np(weights[f"{prefix}.layers.{i}.up"]).T])
            for i in range(layers)]),
        f"mlp{suffix}/linear": _stack(weights, fmt("down"), layers, lambda w: w.T),
    }
    for short, norm in (("attn_norm", "pre_attention_norm"), ("mlp_norm", "pre_ffw_norm")):
        if adaptive:
            tree[f"{norm}{suffix}/Dense_0/kernel"] = _stack(weights, fmt(short + "_mod.weight"), layers, lambda w: w.T)
            tree[f"{norm}{suffix}/Dense_0/bias"] = _stack(weights, fmt(short + "_mod.bias"), layers)
        else:
            tree[f"{norm}{suffix}/scale"] = _stack(weights, fmt(short), layers)
    return tree


def jax_params(weights, config, seed=0):
    """The openpi JAX parameter tree ({"params": {...}}, nested dicts, float32 numpy) of canonical ``weights``."""
    c = config
    lv, hv = c.num_vision_layers, c.num_vision_heads
    adaptive = c.model_type == cf.VLAModelType.PI05
    flat = {
        "PaliGemma/img/embedding/kernel": _np(weights["vision.patch.weight"]).transpose(2, 3, 1, 0),
        "PaliGemma/img/embedding/bias": _np(weights["vision.patch.bias"]),
        "PaliGemma/img/pos_embedding": _np(weights["vision.pos"])[None],
        "PaliGemma/img/Transformer/encoder_norm/scale": _np(weights["vision.post_ln.weight"]),
        "PaliGemma/img/Transformer/encoder_norm/bias": _np(weights["vision.post_ln.bias"]),
        "PaliGemma/img/head/kernel": _np(weights["projector.weight"]).T,
        "PaliGemma/img/head/bias": _np(weights["projector.bias"]),
        "PaliGemma/llm/embedder/input_embedding": _np(weights["llm.embed"]),
        "PaliGemma/llm/final_norm/scale": np.random.default_rng(seed).standard_normal(c.encoder_dim).astype(np.float32),
    }
    block = "PaliGemma/img/Transformer/encoderblock/"
    for short, norm in (("ln1", "LayerNorm_0"), ("ln2", "LayerNorm_1")):
        flat[f"{block}{norm}/scale"] = _stack(weights, f"vision.layers.{{}}.{short}.weight", lv)
        flat[f"{block}{norm}/bias"] = _stack(weights, f"vision.layers.{{}}.{short}.bias", lv)
    for short, proj in (("q", "query"), ("k", "key"), ("v", "value")):
        flat[f"{block}MultiHeadDotProductAttention_0/{proj}/kernel"] = _stack(
            weights, f"vision.layers.{{}}.{short}.weight", lv, lambda w: w.T.reshape(w.shape[1], hv, -1))
        flat[f"{block}MultiHeadDotProductAttention_0/{proj}/bias"] = _stack(
            weights, f"vision.layers.{{}}.{short}.bias", lv, lambda b: b.reshape(hv, -1))
    flat[f"{block}MultiHeadDotProductAttention_0/out/kernel"] = _stack(
        weights, "vision.layers.{}.o.weight", lv, lambda w: w.T.reshape(hv, -1, w.shape[0]))
    flat[f"{block}MultiHeadDotProductAttention_0/out/bias"] = _stack(weights, "vision.layers.{}.o.bias", lv)
    for short, dense in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
        flat[f"{block}MlpBlock_0/{dense}/kernel"] = _stack(weights, f"vision.layers.{{}}.{short}.weight", lv, lambda w: w.T)
        flat[f"{block}MlpBlock_0/{dense}/bias"] = _stack(weights, f"vision.layers.{{}}.{short}.bias", lv)
    layers = {**_gemma_layers(weights, c, "llm", "", c.num_encoder_layers, False),
              **_gemma_layers(weights, c, "expert", "_1", c.num_decoder_layers, adaptive)}
    flat.update({"PaliGemma/llm/layers/" + k: v for k, v in layers.items()})
    if adaptive:
        flat["PaliGemma/llm/final_norm_1/Dense_0/kernel"] = _np(weights["expert.norm_mod.weight"]).T
        flat["PaliGemma/llm/final_norm_1/Dense_0/bias"] = _np(weights["expert.norm_mod.bias"])
        heads = ("action_in_proj", "time_mlp_in", "time_mlp_out", "action_out_proj")
    else:
        flat["PaliGemma/llm/final_norm_1/scale"] = _np(weights["expert.norm"])
        heads = ("state_proj", "action_in_proj", "action_time_mlp_in", "action_time_mlp_out", "action_out_proj")
    for head in heads:
        flat[f"{head}/kernel"] = _np(weights[f"{head}.weight"]).T
        flat[f"{head}/bias"] = _np(weights[f"{head}.bias"])
    return {name: np.ascontiguousarray(a) for name, a in flat.items()}


def save_params(flat, directory, dtype=None):
    """Write ``flat`` ("/"-joined leaf names) as ``directory/params`` with orbax-checkpoint, as openpi does."""
    ocp = pytest.importorskip("orbax.checkpoint", reason="orbax-checkpoint writes the test trees: pip install 'cortexflow[jax]'")
    tree: dict = {}
    for name, array in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = array if dtype is None else array.astype(dtype)
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(directory / "params", {"params": tree})
    return directory


def _read(weights, config):
    """``weights`` less the model's ``unread_weights`` (the last prefix layer's o / MLP), which the loader leaves out."""
    from cortexflow.models.pi0 import model_class

    unread = set(model_class(config.model_type)(config).unread_weights())
    assert unread and unread <= set(weights)
    return {name: tensor for name, tensor in weights.items() if name not in unread}


def _load(path, **kwargs):
    return load_pi0_checkpoint(path, None, CPU, torch.float32, **kwargs)


def _inputs(seed, config):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(2, 180, 320, 3), dtype=np.uint8)
    state = rng.standard_normal(config.action_dim).astype(np.float32)
    noise = rng.standard_normal((config.chunk_size, config.action_dim)).astype(np.float32)
    return images, state, noise


# ---- Orbax params/ ------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["pi0", "pi05"])
def test_orbax_params_load_equal_to_safetensors(tmp_path, model_type):
    config = tiny_model_config(model_type, num_vision_heads=6, vision_encoder_dim=48)
    weights = random_weights(config, seed=3)
    # no cortexflow_model_config entry: both sides take every size from the tensors (and the head count)
    write_checkpoint(tmp_path / "st", config, weights=weights, write_config=False)
    save_params(jax_params(weights, config), tmp_path / "jax")
    from_jax, from_st = _load(tmp_path / "jax"), _load(tmp_path / "st")
    assert from_jax.report.model_type.value == model_type
    assert from_jax.report.config == from_st.report.config
    assert from_jax.report.config.num_vision_heads == 6  # read from the query kernel's head axis
    assert set(from_jax.weights) == set(from_st.weights) == set(_read(weights, config))
    for name, tensor in _read(weights, config).items():
        assert torch.equal(from_jax.weights[name], tensor), name
        assert torch.equal(from_st.weights[name], tensor), name
    # the params/ folder itself opens too, and the whole policy gives the same actions
    images, state, noise = _inputs(5, config)
    actions = [
        cf.VLAInferenceEngine(path, None, cf.InferenceConfig(device="cpu", dtype="float32", chunk_size=config.chunk_size)).predict(
            images, state=state, prompt_tokens=[2, 17, 40, 9], noise=noise)
        for path in (tmp_path / "jax" / "params", tmp_path / "st")
    ]
    np.testing.assert_allclose(actions[0], actions[1], rtol=1e-5, atol=1e-6)  # same weights; CPU matmul order may vary


def test_orbax_checkpoint_with_a_policy_config(tmp_path):
    """``config=`` on an openpi JAX checkpoint: the type check reads the Orbax metadata, the norm stats come from
    its ``assets/<asset id>/``, and the policy runs (a Pi0.5 tree under a Pi0 config is refused)."""
    for model_type in ("pi0", "pi05"):
        config = tiny_model_config(model_type, num_vision_heads=6, vision_encoder_dim=48, action_dim=32)
        save_params(jax_params(random_weights(config, seed=4), config), tmp_path / model_type)
    rng = np.random.default_rng(6)
    stats = {key: {"mean": rng.normal(size=8).tolist(), "std": (rng.random(8) + 0.5).tolist()}
             for key in ("state", "actions")}
    assets = tmp_path / "pi0" / "assets" / "physical-intelligence" / "libero"
    assets.mkdir(parents=True)
    (assets / "norm_stats.json").write_text(json.dumps({"norm_stats": stats}))
    engine = cf.create_pi0_inference(tmp_path / "pi0", config="pi0_libero", device="cpu", dtype="float32")
    actions = engine.predict(rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8), prompt_tokens=[2, 17, 40, 9],
                             state=rng.normal(size=8).astype(np.float32))
    assert actions.shape == (engine.chunk_size, 7) and np.isfinite(actions).all()   # LIBERO's 7 action dims
    with pytest.raises(cf.ConfigError, match="pi05"):
        cf.create_pi0_inference(tmp_path / "pi05", config="pi0_libero", device="cpu", dtype="float32",
                                norm_stats_path=assets / "norm_stats.json")


def test_orbax_bfloat16_leaves_and_nnx_value_level(tmp_path):
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="installed with orbax-checkpoint")
    config = tiny_model_config("pi05")
    weights = random_weights(config, seed=4)
    flat = {name + "/value": array for name, array in jax_params(weights, config).items()}
    save_params(flat, tmp_path, dtype=ml_dtypes.bfloat16)
    loaded = _load(tmp_path)
    assert loaded.report.dtypes == {"BF16": len(loaded.files.tensors)}
    for name, tensor in _read(weights, config).items():
        assert torch.equal(loaded.weights[name], tensor.to(torch.bfloat16).float()), name


def test_openpi_lora_leaves_are_merged(tmp_path):
    """q/kv: W + A@B per head or K-V slot; attn_vec: W[n] + A[n] @ sum_m B[m]; FFN: W + A@B (no scaling)."""
    config = tiny_model_config("pi0")
    flat = jax_params(random_weights(config, seed=6), config)
    rng = np.random.default_rng(7)
    merged = dict(flat)
    lora = {}
    for base, r in (("attn/q_einsum/w", 3), ("attn/kv_einsum_1/w", 2), ("attn/attn_vec_einsum/w", 4),
                    ("attn/attn_vec_einsum_1/w", 2), ("mlp/gating_einsum", 3), ("mlp_1/linear", 5)):
        name = "PaliGemma/llm/layers/" + base
        w = flat[name]
        a = rng.standard_normal(w.shape[:-1] + (r,)).astype(np.float32) * 0.1
        b = rng.standard_normal(w.shape[:-2] + (r, w.shape[-1])).astype(np.float32) * 0.1
        stem = name.removesuffix("/w") + "/lora_" if name.endswith("/w") else name + "_lora_"
        lora[stem + "a"], lora[stem + "b"] = a, b
        if "attn_vec" in name:  # (L, N, H, r) @ sum over heads of (L, N, r, D)
            update = np.einsum("lnhr,lrd->lnhd", a, b.sum(axis=1))
        else:
            update = np.einsum("...ir,...rj->...ij", a, b)
        merged[name] = w + update
    save_params({**flat, **lora}, tmp_path / "lora")
    save_params(merged, tmp_path / "merged")
    with_lora, reference = _load(tmp_path / "lora"), _load(tmp_path / "merged")
    assert len(with_lora.files.lora_merged) == 6
    for name, tensor in reference.weights.items():
        torch.testing.assert_close(with_lora.weights[name], tensor, rtol=1e-6, atol=1e-6, msg=name)


def test_info_describes_an_orbax_checkpoint(tmp_path):
    from typer.testing import CliRunner

    from cortexflow.cli import app

    config = tiny_model_config("pi05", num_vision_heads=3)
    save_params(jax_params(random_weights(config), config), tmp_path)
    from cortexflow.checkpoints.rt1_layout import is_rt1_checkpoint

    assert not is_rt1_checkpoint(tmp_path)   # an Orbax tree, but not RT-1-X's
    result = CliRunner().invoke(app, ["info", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and report["model_type"] == "pi05"
    assert report["config"]["num_vision_heads"] == 3 and report["config"]["decoder_dim"] == config.decoder_dim


def test_orbax_tree_problems_are_listed_in_one_error(tmp_path):
    config = tiny_model_config("pi0")
    flat = jax_params(random_weights(config, seed=1), config)
    del flat["PaliGemma/llm/layers/mlp_1/linear"]
    flat["PaliGemma/llm/layers/attn/attn_vec_einsum/w"] = flat["PaliGemma/llm/layers/attn/attn_vec_einsum/w"][..., :40]
    flat["PaliGemma/llm/layers/attn/q_einsum_1/lora_a"] = np.ones((2, 4, 32, 2), np.float32)
    flat["PaliGemma/img/extra_head/kernel"] = np.ones((3, 3), np.float32)
    save_params(flat, tmp_path)
    with pytest.raises(CheckpointError) as err:
        _load(tmp_path)
    message = str(err.value)
    assert "missing leaves: PaliGemma/llm/layers/mlp_1/linear [2, 64, 32]" in message
    assert "mis-shaped leaves: PaliGemma/llm/layers/attn/attn_vec_einsum/w [2, 4, 16, 40] (expected [2, 4, 16, 64])" in message
    assert "unexpected leaves: PaliGemma/img/extra_head/kernel [3, 3]" in message
    assert "PaliGemma/llm/layers/attn/q_einsum_1/lora_a: its lora_b is missing" in message


def test_orbax_without_orbax_installed_says_what_to_install(tmp_path, monkeypatch):
    config = tiny_model_config("pi0")
    save_params(jax_params(random_weights(config), config), tmp_path)
    monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)
    with pytest.raises(CheckpointError, match=r"needs orbax-checkpoint.*pip install 'cortexflow\[jax\]'"):
        cf.create_pi0_inference(tmp_path, device="cpu", dtype="float32")


def test_orbax_model_type_contradicting_the_factory(tmp_path):
    config = tiny_model_config("pi05")
    save_params(jax_params(random_weights(config), config), tmp_path)
    with pytest.raises(CheckpointError, match=r"holds a pi05 model .*use create_pi05_inference"):
        cf.create_pi0_inference(tmp_path, device="cpu", dtype="float32")


# ---- convert ------------------------------------------------------------------------------------
def test_convert_round_trip_loads_without_jax(tmp_path):
    from typer.testing import CliRunner

    from cortexflow.cli import app

    config = tiny_model_config("pi05", num_vision_heads=3)
    weights = random_weights(config, seed=8)
    save_params(jax_params(weights, config), tmp_path / "ckpt")
    stats = {"norm_stats": {"state": {"mean": [0.5] * 8, "std": [2.0] * 8}}}
    (tmp_path / "ckpt" / "assets" / "physical-intelligence" / "libero").mkdir(parents=True)
    (tmp_path / "ckpt" / "assets" / "physical-intelligence" / "libero" / "norm_stats.json").write_text(json.dumps(stats))
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "ckpt"), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "assets/physical-intelligence/libero/norm_stats.json" in result.output
    out = tmp_path / "out"
    assert json.loads((out / "assets/physical-intelligence/libero/norm_stats.json").read_text()) == stats
    assert json.loads((out / "config.json").read_text())["vision_config"] == {"num_attention_heads": 3}
    # a fresh interpreter where JAX and orbax cannot be imported loads the converted folder
    script = (
        "import sys; sys.modules['jax'] = sys.modules['orbax'] = sys.modules['orbax.checkpoint'] = None\n"
        "import torch\n"
        "from cortexflow.checkpoints.loader import load_pi0_checkpoint\n"
        f"loaded = load_pi0_checkpoint({str(out)!r}, None, torch.device('cpu'), torch.float32)\n"
        f"torch.save(loaded.weights, {str(tmp_path / 'w.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    reloaded = torch.load(tmp_path / "w.pt")
    assert set(reloaded) == set(_read(weights, config))
    for name, tensor in _read(weights, config).items():
        assert torch.equal(reloaded[name], tensor), name
    again = CliRunner().invoke(app, ["convert", str(tmp_path / "ckpt"), str(out)])
    assert again.exit_code == 2 and "exists already" in again.output


def test_convert_to_bfloat16_keeps_openpi_fp32_parameters(tmp_path):
    config = tiny_model_config("pi0")
    save_params(jax_params(random_weights(config, seed=9), config), tmp_path / "ckpt")
    convert_checkpoint(tmp_path / "ckpt", tmp_path / "out", dtype="bfloat16")
    state = load_file(str(tmp_path / "out" / "model.safetensors"))
    fp32 = sorted(k for k, v in state.items() if v.dtype == torch.float32)
    assert all(any(p in k for p in ("patch_embedding", "position_embedding", "layernorm", "model.norm")) for k in fp32)
    assert any("input_layernorm" in k for k in fp32) and any("patch_embedding" in k for k in fp32)
    assert all(v.dtype == torch.bfloat16 for k, v in state.items() if k not in fp32)


# ---- PEFT LoRA adapters -------------------------------------------------------------------------
EXPERT_Q = "model.paligemma_with_expert.gemma_expert.model.layers.{}.self_attn.q_proj"
EXPERT_V = "model.paligemma_with_expert.gemma_expert.model.layers.{}.self_attn.v_proj"


def write_adapter(directory, modules, base=None, r=4, alpha=None, seed=0, **config):
    """PEFT adapter folder: lora_A (r, in) / lora_B (out, r) per module; ``modules`` maps module path -> (out, in, rank)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (out_dim, in_dim, rank) in modules.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, in_dim, generator=gen) * 0.1
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_dim, rank, generator=gen) * 0.1
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    adapter_config = {"peft_type": "LORA", "base_model_name_or_path": None if base is None else str(base), "r": r,
                      "lora_alpha": alpha, "use_rslora": False, "use_dora": False, "bias": "none",
                      "target_modules": "(.*q_proj|.*v_proj|model.state_proj)", "modules_to_save": None, **config}
    (directory / "adapter_config.json").write_text(json.dumps(adapter_config))
    return tensors


@pytest.mark.parametrize("layout", ["lerobot", "openpi"])
def test_peft_adapter_merges_w_plus_scale_ba(tmp_path, layout):
    config = tiny_model_config("pi0")
    weights = random_weights(config, seed=2)
    base = write_checkpoint(tmp_path / "base", config, weights=weights, layout=layout)
    d, h = config.decoder_dim, config.num_heads * config.head_dim
    modules = {EXPERT_Q.format(0): (h, d, 4), EXPERT_Q.format(1): (h, d, 4), EXPERT_V.format(1): (config.head_dim, d, 2),
               "model.state_proj": (d, config.action_dim, 4)}
    tensors = write_adapter(tmp_path / "adapter", modules, base=base, r=4, alpha=None,
                            rank_pattern={"v_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 16})
    loaded = _load(tmp_path / "adapter")

    def lora(module):
        return tensors[f"base_model.model.{module}.lora_B.weight"] @ tensors[f"base_model.model.{module}.lora_A.weight"]

    expected = _read(weights, config)
    expected["expert.layers.0.q"] = weights["expert.layers.0.q"] + 8 / 4 * lora(EXPERT_Q.format(0))  # PEFT default alpha 8
    expected["expert.layers.1.q"] = weights["expert.layers.1.q"] + 16 / 4 * lora(EXPERT_Q.format(1))  # alpha_pattern
    expected["expert.layers.1.v"] = weights["expert.layers.1.v"] + 8 / 2 * lora(EXPERT_V.format(1))  # rank_pattern
    expected["state_proj.weight"] = weights["state_proj.weight"] + 8 / 4 * lora("model.state_proj")
    for name, tensor in expected.items():
        torch.testing.assert_close(loaded.weights[name], tensor, rtol=1e-6, atol=1e-6, msg=name)
    assert not torch.equal(loaded.weights["expert.layers.0.q"], weights["expert.layers.0.q"])


def test_peft_rslora_scale_and_base_argument(tmp_path):
    config = tiny_model_config("pi05")
    weights = random_weights(config, seed=3)
    base = write_checkpoint(tmp_path / "base", config, weights=weights, layout="lerobot")
    d, h = config.decoder_dim, config.num_heads * config.head_dim
    tensors = write_adapter(tmp_path / "adapter", {EXPERT_Q.format(0): (h, d, 9)}, base="lerobot/pi05_base",
                            r=9, alpha=6, use_rslora=True)
    engine = cf.create_pi05_inference(tmp_path / "adapter", device="cpu", dtype="float32", base_checkpoint_path=str(base))
    key = f"base_model.model.{EXPERT_Q.format(0)}"
    expected = weights["expert.layers.0.q"] + 6 / math.sqrt(9) * (tensors[key + ".lora_B.weight"] @ tensors[key + ".lora_A.weight"])
    loaded = _load(tmp_path / "adapter", base_checkpoint=base)
    torch.testing.assert_close(loaded.weights["expert.layers.0.q"], expected, rtol=1e-6, atol=1e-6)
    assert engine.config.model_type == cf.VLAModelType.PI05
    with pytest.raises(CheckpointError, match=r"'lerobot/pi05_base', which is not a local path .*base_checkpoint_path"):
        _load(tmp_path / "adapter")


def test_peft_adapter_problems(tmp_path):
    config = tiny_model_config("pi0")
    base = write_checkpoint(tmp_path / "base", config, seed=1, layout="lerobot")
    d, h = config.decoder_dim, config.num_heads * config.head_dim
    write_adapter(tmp_path / "bad", {EXPERT_Q.format(0): (h, d, 4), EXPERT_Q.format(7): (h, d, 8),
                                     "model.vision_head.proj": (4, 4, 8)}, base=base, r=8)
    with pytest.raises(CheckpointError) as err:
        _load(tmp_path / "bad")
    message = str(err.value)
    assert ("modules not found in the base checkpoint: "
            "model.paligemma_with_expert.gemma_expert.model.layers.7.self_attn.q_proj, model.vision_head.proj") in message
    assert f"{EXPERT_Q.format(0)}: lora_A [4, {d}] and lora_B [{h}, 4] do not have rank r=8" in message
    write_adapter(tmp_path / "dora", {EXPERT_Q.format(0): (h, d, 4)}, base=base, use_dora=True)
    with pytest.raises(CheckpointError, match="use_dora is set"):
        _load(tmp_path / "dora")
    with pytest.raises(CheckpointError, match="is not a LoRA adapter folder"):
        _load(base, base_checkpoint=base)


# ---- token-embedding table and SigLIP heads -----------------------------------------------------
@pytest.mark.parametrize("layout, used", [("openpi", 0), ("lerobot", 1)])
def test_embedding_table_of_the_layouts_reference_and_warning(tmp_path, layout, used):
    config = tiny_model_config("pi0")
    write_checkpoint(tmp_path, config, seed=0, layout=layout)
    state = load_file(str(tmp_path / "model.safetensors"))
    prefix = "model." if layout == "lerobot" else ""
    present = next(prefix + k for k in EMBEDDING_KEYS if prefix + k in state)
    tables = [state[present], state[present] + 0.5]
    for key, table in zip(EMBEDDING_KEYS, tables if present.endswith(EMBEDDING_KEYS[0]) else tables[::-1]):
        state[prefix + key] = table
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.warns(CortexFlowWarning, match="two different token-embedding tables"):
        loaded = _load(tmp_path)
    assert torch.equal(loaded.weights["llm.embed"], state[prefix + EMBEDDING_KEYS[used]])
    state[prefix + EMBEDDING_KEYS[1 - used]] = state[prefix + EMBEDDING_KEYS[used]].clone()
    save_file(state, str(tmp_path / "model.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CortexFlowWarning)
        _load(tmp_path)


def test_siglip_head_count_from_config_table_or_warned_default(tmp_path):
    assert siglip_head_count({}, 1152) == 16 and siglip_head_count({}, 768) == 12
    assert siglip_head_count({"vision_config": {"num_attention_heads": 4}}, 48) == 4
    config = tiny_model_config("pi0")
    write_checkpoint(tmp_path, config)
    assert _load(tmp_path).report.config.num_vision_heads == 4  # from config.json
    (tmp_path / "config.json").unlink()
    with pytest.warns(CortexFlowWarning, match=r"SigLIP tower of width 48 .* using 16"):
        assert _load(tmp_path).report.config.num_vision_heads == 16
    with warnings.catch_warnings():
        warnings.simplefilter("error", CortexFlowWarning)
        assert _load(tmp_path, model_config={"num_vision_heads": 4}).report.config.num_vision_heads == 4


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_adapter_saved_by_peft_matches_its_merge_and_unload(tmp_path, use_rslora):
    """An adapter written by PEFT itself (its key spelling, patterns, a modules_to_save copy) merges to
    exactly what PEFT's merge_and_unload gives."""
    peft = pytest.importorskip("peft", reason="PEFT writes the reference adapter: pip install peft accelerate")
    config = tiny_model_config("pi0")
    base = write_checkpoint(tmp_path / "base", config, seed=5, layout="lerobot")
    state = load_file(str(base / "model.safetensors"))
    names = [EXPERT_Q.format(0), EXPERT_Q.format(1), EXPERT_V.format(1), "model.state_proj", "model.action_in_proj"]
    root = torch.nn.Module()
    for name in names:  # the policy's module tree, reduced to the linears the adapter touches
        weight, bias = state[name + ".weight"], state.get(name + ".bias")
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        linear.weight.data.copy_(weight)
        if bias is not None:
            linear.bias.data.copy_(bias)
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, linear)
    lora_config = peft.LoraConfig(r=4, lora_alpha=6, target_modules=r".*(q_proj|v_proj)|model\.state_proj",
                                  rank_pattern={"v_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 10},
                                  use_rslora=use_rslora, init_lora_weights=False, modules_to_save=["action_in_proj"])
    wrapped = peft.get_peft_model(root, lora_config)
    with torch.no_grad():
        copy = wrapped.base_model.model.model.action_in_proj.modules_to_save["default"]
        copy.weight.add_(torch.randn(copy.weight.shape, generator=torch.Generator().manual_seed(1)))
    wrapped.save_pretrained(str(tmp_path / "adapter"))
    merged = dict(wrapped.merge_and_unload().state_dict())
    source = cf.checkpoints.sources.open_checkpoint(tmp_path / "adapter", base)
    for name in names:
        torch.testing.assert_close(source.read(name + ".weight").float(), merged[name + ".weight"], rtol=1e-6, atol=1e-6,
                                   msg=name)
        assert not torch.equal(merged[name + ".weight"], state[name + ".weight"]), name
