"""CortexFlow's blocks against Hugging Face ``transformers`` with the same tiny random weights (CPU, fp32).

Covered: the SigLIP vision tower, one Gemma decoder layer (full bidirectional and padded masks, MQA,
non-contiguous positions), Gemma RMSNorm with its ``(1 + w)`` scale, and split-half RoPE.
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from transformers.models.gemma import modeling_gemma

from cortexflow.backends.pytorch import PyTorchBackend
from cortexflow.checkpoints.pi0_layout import LANGUAGE, VISION, canonical_to_openpi
from cortexflow.models.gemma import gemma_layer
from cortexflow.models.siglip import siglip_tower, siglip_weight_shapes
from cortexflow.random_checkpoint import tiny_model_config

FP32_REL = 1e-5


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = FP32_REL, what: str = "") -> None:
    """Relative Frobenius error ``|Δ|/|ref| <= rel`` and ``max|Δ| <= rel * max|ref|`` (plus a tiny floor)."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    ref_norm = expected.norm().item()
    assert ref_norm > 0, f"{what}: reference is all zeros; the comparison would prove nothing"
    diff = actual - expected
    rel_err = diff.norm().item() / ref_norm
    max_err = diff.abs().max().item()
    assert rel_err <= rel, f"{what}: relative error {rel_err:.3e} > {rel:.1e} (max |Δ| {max_err:.3e})"
    assert max_err <= rel * expected.abs().max().item() + 1e-7, f"{what}: max |Δ| {max_err:.3e}"


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter with non-zero random values: norm scales near 1 (LayerNorm) or
    around 0 with a clear spread (Gemma's (1+w)), biases ~0.1, matrices ~N(0, 1/fan_in)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim >= 2 and "position_embedding" not in name:
                value = noise / math.sqrt(math.prod(param.shape[1:]))
            elif "position_embedding" in name:
                value = noise * 0.5
            elif "layer_norm" in name or "post_layernorm" in name:
                value = 1.0 + 0.2 * noise if name.endswith("weight") else 0.1 * noise
            else:  # biases and Gemma RMSNorm weights (used as 1 + w)
                value = 0.3 * noise
            assert (value != 0).all(), name
            param.copy_(value)


# ---- SigLIP -----------------------------------------------------------------------------------------


def _siglip_hf():
    kwargs = dict(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=224,
        patch_size=14,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        attn_implementation="eager",
    )
    if "vision_use_head" in transformers.SiglipVisionConfig.__init__.__code__.co_varnames or hasattr(
        transformers.SiglipVisionConfig, "vision_use_head"
    ):
        kwargs["vision_use_head"] = False
    config = transformers.SiglipVisionConfig(**kwargs)
    model = transformers.SiglipVisionModel(config).eval()
    randomize_(model, seed=11)
    return model


_SIGLIP_LAYER_NAMES = {
    "layer_norm1": "ln1",
    "self_attn.q_proj": "q",
    "self_attn.k_proj": "k",
    "self_attn.v_proj": "v",
    "self_attn.out_proj": "o",
    "layer_norm2": "ln2",
    "mlp.fc1": "fc1",
    "mlp.fc2": "fc2",
}


def hf_siglip_to_canonical(state_dict: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """HF ``SiglipVisionModel`` state dict -> CortexFlow ``vision.*`` names (with or without ``vision_model.``)."""
    sd = {k.removeprefix("vision_model."): v for k, v in state_dict.items()}
    out = {
        "vision.patch.weight": sd["embeddings.patch_embedding.weight"],
        "vision.patch.bias": sd["embeddings.patch_embedding.bias"],
        "vision.pos": sd["embeddings.position_embedding.weight"],
        "vision.post_ln.weight": sd["post_layernorm.weight"],
        "vision.post_ln.bias": sd["post_layernorm.bias"],
    }
    for i in range(num_layers):
        for hf_name, short in _SIGLIP_LAYER_NAMES.items():
            for param in ("weight", "bias"):
                out[f"vision.layers.{i}.{short}.{param}"] = sd[f"encoder.layers.{i}.{hf_name}.{param}"]
    unused = set(sd) - {k for k in sd if k.startswith(("embeddings.", "encoder.", "post_layernorm."))}
    assert not unused, f"HF tower has parameters the mapping ignores: {sorted(unused)}"
    return {k: v.detach().clone() for k, v in out.items()}


def test_siglip_tower_matches_hf():
    model = _siglip_hf()
    config = tiny_model_config("pi0")
    assert (config.vision_encoder_dim, config.vision_mlp_dim, config.num_vision_layers, config.num_vision_heads) == (
        48, 96, 2, 4,
    )
    weights = hf_siglip_to_canonical(model.state_dict(), config.num_vision_layers)
    expected_shapes = siglip_weight_shapes(config)
    assert set(weights) == set(expected_shapes)
    for name, shape in expected_shapes.items():
        assert tuple(weights[name].shape) == shape, name
    # HF keeps every parameter; make sure the copy is exhaustive (every HF tensor is used once).
    assert len(weights) == len(model.state_dict())
    # The checkpoint key map agrees: openpi's vision keys are HF SigLIP's parameter names.
    hf_names = {k.removeprefix("vision_model.") for k in model.state_dict()}
    key_map = canonical_to_openpi(config)
    for name in weights:
        assert key_map[name].startswith(VISION) and key_map[name].removeprefix(VISION) in hf_names, key_map[name]
    by_hf = {key_map[n].removeprefix(VISION): n for n in weights}
    for hf_name, tensor in model.state_dict().items():
        assert torch.equal(weights[by_hf[hf_name.removeprefix("vision_model.")]], tensor), hf_name

    generator = torch.Generator().manual_seed(5)
    images = torch.rand(3, 3, 224, 224, generator=generator) * 2 - 1
    with torch.no_grad():
        reference = model(pixel_values=images).last_hidden_state
    ops = PyTorchBackend(torch.device("cpu"), torch.float32)
    ours = siglip_tower(ops, weights, images, config, torch.float32)
    assert reference.shape == (3, 256, 48)
    assert ours.dtype == torch.float32
    assert_close(ours, reference, what="siglip tower")
    # The images are distinct, so are the outputs (not a degenerate constant tower).
    assert (ours[0] - ours[1]).abs().max() > 1e-2


# ---- Gemma ------------------------------------------------------------------------------------------


def _gemma_hf_config(num_kv_heads: int = 1):
    return transformers.GemmaConfig(
        vocab_size=32,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=num_kv_heads,
        head_dim=16,
        hidden_activation="gelu_pytorch_tanh",
        hidden_act="gelu_pytorch_tanh",
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        max_position_embeddings=1024,
        attn_implementation="eager",
    )


def _gemma_model_config(num_kv_heads: int = 1):
    config = tiny_model_config("pi0") if num_kv_heads == 1 else tiny_model_config("pi0", num_kv_heads=num_kv_heads)
    assert (config.encoder_dim, config.encoder_mlp_dim, config.num_heads, config.num_kv_heads, config.head_dim) == (
        64, 128, 4, num_kv_heads, 16,
    )
    assert config.rms_norm_eps == 1e-6 and config.rope_base == 10000.0
    return config


def _gemma_layer_pair(seed: int = 21, num_kv_heads: int = 1):
    hf_config = _gemma_hf_config(num_kv_heads)
    layer = modeling_gemma.GemmaDecoderLayer(hf_config, layer_idx=0).eval()
    randomize_(layer, seed)
    p = "llm.layers.0"
    names = {
        "self_attn.q_proj.weight": f"{p}.q",
        "self_attn.k_proj.weight": f"{p}.k",
        "self_attn.v_proj.weight": f"{p}.v",
        "self_attn.o_proj.weight": f"{p}.o",
        "mlp.gate_proj.weight": f"{p}.gate",
        "mlp.up_proj.weight": f"{p}.up",
        "mlp.down_proj.weight": f"{p}.down",
        "input_layernorm.weight": f"{p}.attn_norm",
        "post_attention_layernorm.weight": f"{p}.mlp_norm",
    }
    sd = layer.state_dict()
    assert set(sd) == set(names), sorted(sd)
    # The checkpoint key map agrees: openpi's language-model keys are HF Gemma's parameter names.
    key_map = canonical_to_openpi(_gemma_model_config(num_kv_heads))
    for hf, ours in names.items():
        assert key_map[ours] == f"{LANGUAGE}layers.0.{hf}", (ours, key_map[ours])
    weights = {ours: sd[hf].detach().clone() for hf, ours in names.items()}
    rotary = modeling_gemma.GemmaRotaryEmbedding(hf_config)
    return layer, rotary, weights


def _hf_layer_forward(layer, rotary, x, positions, key_valid):
    """HF layer with an additive 4-D mask (0 = attend, finfo.min = masked key) and RoPE (cos, sin)."""
    cos, sin = rotary(x, positions)
    additive = torch.zeros(x.shape[0], 1, x.shape[1], x.shape[1], dtype=x.dtype)
    additive = additive.masked_fill(~key_valid[:, None, None, :], torch.finfo(x.dtype).min)
    with torch.no_grad():
        out = layer(x, attention_mask=additive, position_ids=positions, position_embeddings=(cos, sin))
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_gemma_layer_matches_hf_full_mask(num_kv_heads):
    layer, rotary, weights = _gemma_layer_pair(num_kv_heads=num_kv_heads)
    config = _gemma_model_config(num_kv_heads)
    generator = torch.Generator().manual_seed(3)
    batch, length = 2, 9
    x = torch.randn(batch, length, 64, generator=generator)
    positions = torch.arange(length)[None].repeat(batch, 1)
    positions[1] += 7  # a second item starting at another offset
    valid = torch.ones(batch, length, dtype=torch.bool)

    reference = _hf_layer_forward(layer, rotary, x, positions, valid)
    ops = PyTorchBackend(torch.device("cpu"), torch.float32)
    mask = valid[:, None, :] & valid[:, :, None]
    ours, (k, v) = gemma_layer(ops, weights, "llm.layers.0", x, positions, mask, config)
    assert k.shape == (batch, length, num_kv_heads, 16) and v.shape == (batch, length, num_kv_heads, 16)
    assert_close(ours, reference, what="gemma layer (full mask)")
    # The layer does something (residual alone would make the test vacuous).
    assert (ours - x).norm() > 0.1 * x.norm()


@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_gemma_layer_matches_hf_padding_mask(num_kv_heads):
    layer, rotary, weights = _gemma_layer_pair(seed=22, num_kv_heads=num_kv_heads)
    config = _gemma_model_config(num_kv_heads)
    generator = torch.Generator().manual_seed(4)
    batch, length = 2, 10
    x = torch.randn(batch, length, 64, generator=generator)
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[0, 7:] = False  # right padding
    valid[1, 2:5] = False  # a hole in the middle (a masked view)
    positions = torch.cumsum(valid.long(), dim=1) - 1  # valid tokens get consecutive positions

    reference = _hf_layer_forward(layer, rotary, x, positions, valid)
    ops = PyTorchBackend(torch.device("cpu"), torch.float32)
    mask = valid[:, None, :] & valid[:, :, None]
    ours, _ = gemma_layer(ops, weights, "llm.layers.0", x, positions, mask, config)
    for b in range(batch):
        assert_close(ours[b, valid[b]], reference[b, valid[b]], what=f"gemma layer (padding mask), item {b}")

    # Masked keys really are ignored: change them and the valid rows stay put.
    x2 = x.clone()
    x2[~valid] = torch.randn(int((~valid).sum()), 64, generator=generator) * 3
    ours2, _ = gemma_layer(ops, weights, "llm.layers.0", x2, positions, mask, config)
    for b in range(batch):
        assert_close(ours2[b, valid[b]], ours[b, valid[b]], rel=1e-6, what="masked keys ignored")
    # ...while with a full mask the same change would show (the masked tokens matter otherwise).
    full = torch.ones_like(mask)
    a, _ = gemma_layer(ops, weights, "llm.layers.0", x, positions, full, config)
    b_, _ = gemma_layer(ops, weights, "llm.layers.0", x2, positions, full, config)
    assert (a[valid] - b_[valid]).abs().max() > 1e-3


def test_gemma_rms_norm_matches_hf():
    generator = torch.Generator().manual_seed(8)
    norm = modeling_gemma.GemmaRMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64, generator=generator) * 0.5)
    assert norm.weight.abs().min() > 0
    x = torch.randn(3, 7, 64, generator=generator) * 4 + 0.5
    with torch.no_grad():
        reference = norm(x)
    ops = PyTorchBackend(torch.device("cpu"), torch.float32)
    ours = ops.rms_norm(x, norm.weight.detach(), 1e-6)
    assert_close(ours, reference, rel=1e-6, what="rms norm")
    # The (1 + w) convention: a plain "* w" would be far off.
    wrong = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight.detach()
    assert (wrong - reference).norm() > 0.5 * reference.norm()


@pytest.mark.parametrize("head_dim", [16, 64])
def test_rope_matches_hf(head_dim):
    hf_config = _gemma_hf_config()
    hf_config.head_dim = head_dim
    rotary = modeling_gemma.GemmaRotaryEmbedding(hf_config)
    generator = torch.Generator().manual_seed(head_dim)
    positions = torch.tensor([[0, 1, 2, 5, 6, 9], [3, 4, 40, 41, 200, 777]])
    batch, length = positions.shape
    q = torch.randn(batch, length, 4, head_dim, generator=generator)  # (B, L, H, D)
    k = torch.randn(batch, length, 1, head_dim, generator=generator)
    cos, sin = rotary(q, positions)  # (B, L, D)
    q_ref, k_ref = modeling_gemma.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
    ops = PyTorchBackend(torch.device("cpu"), torch.float32)
    # Large positions (777) amplify fp32 argument rounding in sin/cos slightly; 1e-5 still holds.
    assert_close(ops.rope(q, positions, 10000.0), q_ref, what="rope q")
    assert_close(ops.rope(k, positions, 10000.0), k_ref, what="rope k")
    # Position 0 is the identity; the rotation keeps norms per (token, head).
    assert torch.allclose(ops.rope(q, positions, 10000.0)[0, 0], q[0, 0])
    assert torch.allclose(ops.rope(q, positions, 10000.0).norm(dim=-1), q.norm(dim=-1), rtol=1e-5)
    # Non-contiguous positions matter: rope at arange differs from rope at the given positions.
    arange = torch.arange(length)[None].repeat(batch, 1)
    assert (ops.rope(q, arange, 10000.0) - q_ref).abs().max() > 1e-2
