"""The fused vision tower and prefix of the Triton backend for Pi0 / Pi0.5 (the ``vision_encoder`` and
``transformer_encoder`` stages).

Same function as the model's op-by-op stages (``models/siglip.py``, ``models/gemma.py``), fewer kernels:
- SigLIP: Q/K/V as one GEMM with the concatenated bias; the attention reads Q, K and V as strided views of
  its output (no copies); the o and fc2 GEMMs (bias in the epilogue) write their own output, which the next
  LayerNorm kernel adds to the residual stream in place before normalising
  (:func:`cortexflow.kernels.layer_norm.layer_norm`): no add kernel, and the reference's roundings;
- Gemma prefix: Q/K/V as one GEMM, split, rotated and written into the layer's K/V cache by one kernel
  (:mod:`cortexflow.kernels.qkv_rope`); gate/up as one GEMM followed by the fused ``gelu_tanh(gate) * up``
  kernel; both residuals accumulated in place (``x += a @ Wᵀ``).

The fused weights are made once per checkpoint by :func:`fuse_encoder_weights` (the separate weights become
views into them, so no memory is added). Rounding differs from the reference only in the prefix's
residuals (its o and down GEMMs add into the residual in fp32 instead of rounding their own output
first, as the expert's do); ``cortexflow verify`` compares both stages against the fp32 reference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cortexflow.backends.triton_token_decoder import concat_as_views, fuse_layer_projections
from cortexflow.kernels import rms_norm as rms_kernel
from cortexflow.kernels.attention import attention
from cortexflow.kernels.gelu_gate import gelu_tanh, gelu_tanh_gate_fused
from cortexflow.kernels.layer_norm import layer_norm
from cortexflow.kernels.qkv_rope import qkv_rope
from cortexflow.models.gemma import attention_scale
from cortexflow.models.siglip import siglip_embed

VISION_QKV = "qkv"
#: How the SigLIP attention runs: "triton" (kernels/attention.py) or "sdpa" (torch's fused attention;
#: CUDA only). Triton: one attention kernel for every stage, tested on CPU under the interpreter (both timed:
#: benchmarks/NOTES.md, "Tuning constants").
VISION_ATTENTION = "triton"
#: Tiling of the prefix attention (``kernels.attention.attention`` keywords): 64-row tiles with 4 warps instead
#: of the kernel's default 8 warps for D 256, the fastest in the sweep of benchmarks/NOTES.md, "Tuning constants".
PREFIX_ATTENTION_TILING: dict = {"block_m": 64, "num_warps": 4}


def fuse_encoder_weights(model, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add ``vision.layers.i.qkv.{weight,bias}`` and ``llm.layers.i.{qkv,gate_up}`` (row-concatenated), in
    place, and turn the separate weights into views of them (one layer at a time, so peak memory grows by
    one layer's projections at most)."""
    c = model.config
    for i in range(c.num_vision_layers):
        p = f"vision.layers.{i}"
        for kind in ("weight", "bias"):
            concat_as_views(weights, f"{p}.{VISION_QKV}.{kind}", [f"{p}.{name}.{kind}" for name in ("q", "k", "v")])
    return fuse_layer_projections(weights, (f"llm.layers.{i}" for i in range(c.num_encoder_layers)))


def fused_encoder_unsupported(config, max_width: int, max_head_dim: int) -> str | None:
    """Why the fused stages cannot run ``config``'s vision tower and prefix (None when they can): the row
    kernels hold a whole row (at most ``max_width``), the attention kernel at most ``max_head_dim``."""
    vision_head_dim = config.vision_encoder_dim // config.num_vision_heads
    if vision_head_dim > max_head_dim or config.head_dim > max_head_dim:
        return f"head_dim {max(vision_head_dim, config.head_dim)} > {max_head_dim}"
    if max(config.vision_encoder_dim, config.encoder_dim) > max_width:
        return f"width {max(config.vision_encoder_dim, config.encoder_dim)} > {max_width}"
    return None


def encoder_weights_fused(model, weights) -> bool:
    """Whether :func:`fuse_encoder_weights` ran on ``weights``."""
    c = model.config
    return (f"vision.layers.{c.num_vision_layers - 1}.{VISION_QKV}.weight" in weights
            and f"llm.layers.{c.num_encoder_layers - 1}.qkv" in weights)


def fused_vision_tower(backend, model, weights, images: torch.Tensor, vision_attention: str | None = None) -> torch.Tensor:
    """SigLIP on ``images (N, 3, S, S)`` in [-1, 1] -> post-LN tokens ``(N, T, D)`` in the backend's dtype
    (the patch embedding is ``backend.patch_embed``).

    The residual stream ``x (N*T, D)`` is this function's own buffer, updated in place; ``pending`` is the
    last sublayer's output, which the next LayerNorm adds to it first. ``vision_attention``
    overrides :data:`VISION_ATTENTION` (for the micro-benchmark)."""
    c = model.config
    x = siglip_embed(backend, weights, images).to(backend.dtype).contiguous()  # a new tensor: ours to update
    n, t, d = x.shape
    heads = c.num_vision_heads
    head_dim = d // heads
    eps = c.vision_norm_eps
    scale = 1.0 / math.sqrt(head_dim)
    sdpa = (vision_attention or VISION_ATTENTION) == "sdpa" and x.is_cuda
    rows = x.view(n * t, d)
    pending = None
    for i in range(c.num_vision_layers):
        w = lambda name: weights[f"vision.layers.{i}.{name}"]  # noqa: E731
        h = layer_norm(rows, w("ln1.weight"), w("ln1.bias"), eps, residual=pending)
        qkv = F.linear(h, w(f"{VISION_QKV}.weight"), w(f"{VISION_QKV}.bias")).view(n, t, 3, heads, head_dim)
        if sdpa:  # (N, H, T, Dh) views in, (N, T, H, Dh) memory out
            q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))
            attn = F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2).contiguous()
        else:
            attn = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], None, scale)
        attn_out = F.linear(attn.view(n * t, d), w("o.weight"), w("o.bias"))
        h = layer_norm(rows, w("ln2.weight"), w("ln2.bias"), eps, residual=attn_out)
        act = gelu_tanh(F.linear(h, w("fc1.weight"), w("fc1.bias")))
        pending = F.linear(act, w("fc2.weight"), w("fc2.bias"))
    out = layer_norm(rows, weights["vision.post_ln.weight"], weights["vision.post_ln.bias"], eps, residual=pending)
    return out.view(n, t, d)


def fused_prefix(backend, model, weights, inputs, attention_tiling: dict | None = None) -> dict:
    """The Gemma prefix pass -> ``{"kv_cache": [(k, v)] per layer, "prefix_mask": (B, P)}``, as
    ``Pi0Model.transformer_encoder`` returns it (k/v ``(B, P, Hkv, Dh)`` after RoPE; the last layer computes
    K/V only). ``attention_tiling`` overrides :data:`PREFIX_ATTENTION_TILING` (for the micro-benchmark)."""
    c = model.config
    tiling = PREFIX_ATTENTION_TILING if attention_tiling is None else attention_tiling
    x, valid = model.embed_prefix(backend, weights, inputs)
    x = x.contiguous()
    b, p, d = x.shape
    positions, mask = model.prefix_positions_and_mask(valid)
    inv_freq = backend.inverse_frequencies(c.head_dim, c.rope_base, x.device)
    scale = attention_scale(c)
    eps = c.rms_norm_eps
    rows = x.view(b * p, d)
    cache = []
    for i in range(c.num_encoder_layers):
        pre = f"llm.layers.{i}"
        h = rms_kernel.rms_norm(rows, weights[f"{pre}.attn_norm"], eps)
        qkv = F.linear(h, weights[f"{pre}.qkv"]).view(b, p, -1)
        k = torch.empty((b, p, c.num_kv_heads, c.head_dim), dtype=x.dtype, device=x.device)
        v = torch.empty_like(k)
        q = qkv_rope(qkv, positions, inv_freq, c.num_heads, c.num_kv_heads, k, v)
        cache.append((k, v))
        if i == c.num_encoder_layers - 1:
            break  # the last layer's output is unused: only its K/V are needed
        a = attention(q, k, v, mask, scale, **tiling)
        rows.addmm_(a.view(b * p, -1), weights[f"{pre}.o"].T)
        h = rms_kernel.rms_norm(rows, weights[f"{pre}.mlp_norm"], eps)
        rows.addmm_(gelu_tanh_gate_fused(F.linear(h, weights[f"{pre}.gate_up"])), weights[f"{pre}.down"].T)
    return {"kv_cache": cache, "prefix_mask": valid}

