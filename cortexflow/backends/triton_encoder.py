"""The Triton backend's encoder units: ``pre_ln_encoder`` (the SigLIP tower of the Pi0 family) and
``prefix_kv_cache`` (its Gemma prefix), over weights fused by :func:`fuse_encoder_weights`.

Same function as the units' default compositions (:class:`cortexflow.ops.ComputeBackend`), fewer kernels:
- SigLIP: Q/K/V as one GEMM with the concatenated bias; the attention reads Q, K and V as strided views of
  its output (no copies); the o and fc2 GEMMs (bias in the epilogue) write their own output, which the next
  LayerNorm kernel adds to the residual stream in place before normalising
  (:func:`cortexflow.kernels.layer_norm.layer_norm`): no add kernel, and the reference's roundings;
- Gemma prefix: Q/K/V as one GEMM, split, rotated and written into the layer's K/V cache by one kernel
  (:mod:`cortexflow.kernels.qkv_rope`); gate/up as one GEMM followed by the fused ``gelu_tanh(gate) * up``
  kernel; both residuals accumulated in place (``x += a @ Wᵀ``).

The fused weights are made once per checkpoint by :func:`fuse_encoder_weights` over the groups the model
declares (the separate weights become views into them, so no memory is added). Rounding differs from the reference only in the prefix's
residuals (its o and down GEMMs add into the residual in fp32 instead of rounding their own output
first, as the expert's do); ``cortexflow verify`` compares both stages against the fp32 reference.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from cortexflow.backends.triton_token_decoder import concat_as_views, fuse_layer_projections
from cortexflow.backends.triton_fp8 import project, project_add
from cortexflow.kernels import rms_norm as rms_kernel
from cortexflow.kernels.attention import attention
from cortexflow.kernels.gelu_gate import gelu_tanh, gelu_tanh_gate_fused
from cortexflow.kernels.layer_norm import layer_norm
from cortexflow.kernels.qkv_rope import qkv_rope
from cortexflow.ops import EncoderStack, FusableWeights, GatedLayer, PrefixKVCache, kv_buffers

VISION_QKV = "qkv"
#: How the SigLIP attention runs: "triton" (kernels/attention.py) or "sdpa" (torch's fused attention;
#: CUDA only). Triton: one attention kernel for every stage, tested on CPU under the interpreter (both timed:
#: benchmarks/NOTES.md, "Tuning constants").
VISION_ATTENTION = "triton"
#: Tiling of the prefix attention (``kernels.attention.attention`` keywords): 64-row tiles with 4 warps instead
#: of the kernel's default 8 warps for D 256, the fastest in the sweep of benchmarks/NOTES.md, "Tuning constants".
PREFIX_ATTENTION_TILING: dict = {"block_m": 64, "num_warps": 4}


def fuse_encoder_weights(groups: FusableWeights, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add ``{layer}.qkv.{weight,bias}`` for every layer of ``groups.vision_stacks`` and ``{layer}.{qkv,gate_up}``
    for ``groups.encoder_layers`` (row-concatenated), in place, and turn the separate weights into views of
    them (one layer at a time, so peak memory grows by one layer's projections at most)."""
    for stack in groups.vision_stacks:
        for i in range(stack.num_layers):
            p = stack.layer(i)
            for kind in ("weight", "bias"):
                concat_as_views(weights, f"{p}.{VISION_QKV}.{kind}", [f"{p}.{name}.{kind}" for name in ("q", "k", "v")])
    return fuse_layer_projections(weights, (layer.prefix for layer in groups.encoder_layers))


def vision_stack_fused(stack: EncoderStack, weights) -> bool:
    """Whether :func:`fuse_encoder_weights` fused ``stack``."""
    return f"{stack.layer(stack.num_layers - 1)}.{VISION_QKV}.weight" in weights


def prefix_layers_fused(layers: Sequence[GatedLayer], weights) -> bool:
    """Whether :func:`fuse_encoder_weights` fused ``layers``."""
    return layers[-1].name("qkv") in weights


def vision_stack_unsupported(stack: EncoderStack, width: int, max_width: int, max_head_dim: int) -> str | None:
    """Why the fused tower cannot run ``stack`` of ``width`` features (None when it can): the row kernels hold a
    whole row (at most ``max_width``), the attention kernel at most ``max_head_dim``."""
    head_dim = width // stack.num_heads
    if head_dim > max_head_dim:
        return f"head_dim {head_dim} > {max_head_dim}"
    if width > max_width:
        return f"width {width} > {max_width}"
    return None


def prefix_unsupported(layers: Sequence[GatedLayer], width: int, max_width: int, max_head_dim: int) -> str | None:
    """Why the fused prefix cannot run ``layers`` of ``width`` features (None when it can)."""
    head_dim = layers[0].dims.head_dim
    if head_dim > max_head_dim:
        return f"head_dim {head_dim} > {max_head_dim}"
    if width > max_width:
        return f"width {width} > {max_width}"
    return None


def linear_gelu_tanh(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, epilogue: bool) -> torch.Tensor:
    """``gelu_tanh(x @ weight.T + bias)`` for ``x (M, K)``, ``weight (N, K)``, ``bias (N,)`` -> ``(M, N)``.

    ``epilogue`` on a CUDA (or ``meta``) tensor: one cuBLASLt GEMM with the bias and tanh-GELU in its epilogue
    (``torch._addmm_activation``; the activation reads the fp32 sum, one rounding). Otherwise, and always on
    the CPU, where that operator computes the erf GELU: the GEMM's output rounded to ``x.dtype``, then the
    Triton GELU kernel (the reference's roundings)."""
    if epilogue and x.device.type in ("cuda", "meta"):
        return torch._addmm_activation(bias, x, weight.t(), use_gelu=True)
    return gelu_tanh(F.linear(x, weight, bias))


def fused_vision_tower(weights, stack: EncoderStack, x: torch.Tensor, *, gelu_epilogue: bool,
                       vision_attention: str | None = None) -> torch.Tensor:
    """``ComputeBackend.pre_ln_encoder`` over the fused weights: the embedded tokens ``x (N, T, D)`` -> post-LN
    tokens ``(N, T, D)`` in ``x.dtype``.

    The residual stream ``x (N*T, D)`` is the caller's temporary, updated in place; ``pending`` is the
    last sublayer's output, which the next LayerNorm adds to it first. ``vision_attention``
    overrides :data:`VISION_ATTENTION` (for the micro-benchmark); ``gelu_epilogue``: fc1 and its GELU as
    :func:`linear_gelu_tanh` with ``epilogue`` (``TritonOptions.vision_gelu="epilogue"``)."""
    x = x.contiguous()
    n, t, d = x.shape
    heads = stack.num_heads
    head_dim = d // heads
    eps = stack.eps
    scale = 1.0 / math.sqrt(head_dim)
    sdpa = (vision_attention or VISION_ATTENTION) == "sdpa" and x.is_cuda
    rows = x.view(n * t, d)
    pending = None
    for i in range(stack.num_layers):
        w = lambda name: weights[f"{stack.layer(i)}.{name}"]  # noqa: E731
        h = layer_norm(rows, w("ln1.weight"), w("ln1.bias"), eps, residual=pending)
        qkv = F.linear(h, w(f"{VISION_QKV}.weight"), w(f"{VISION_QKV}.bias")).view(n, t, 3, heads, head_dim)
        if sdpa:  # (N, H, T, Dh) views in, (N, T, H, Dh) memory out
            q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))
            attn = F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2).contiguous()
        else:
            attn = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], None, scale)
        attn_out = F.linear(attn.view(n * t, d), w("o.weight"), w("o.bias"))
        h = layer_norm(rows, w("ln2.weight"), w("ln2.bias"), eps, residual=attn_out)
        act = linear_gelu_tanh(h, w("fc1.weight"), w("fc1.bias"), gelu_epilogue)
        pending = F.linear(act, w("fc2.weight"), w("fc2.bias"))
    out = layer_norm(rows, weights[f"{stack.final_norm}.weight"], weights[f"{stack.final_norm}.bias"], eps,
                     residual=pending)
    return out.view(n, t, d)


def fused_prefix(backend, weights, layers: Sequence[GatedLayer], x: torch.Tensor, positions: torch.Tensor,
                 mask: torch.Tensor, attention_tiling: dict | None = None,
                 room: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``ComputeBackend.prefix_kv_cache`` over the fused weights -> per layer ``(k, v)`` ``(B, P, Hkv, Dh)``
    after RoPE (the last layer computes K/V only). ``x (B, P, D)`` is the caller's temporary, updated in
    place. Projections whose weights are E4M3 (``TritonOptions.fp8`` with "prefix") run as FP8 GEMMs
    (:func:`~cortexflow.backends.triton_fp8.project`, new residual tensors then). ``attention_tiling`` overrides
    :data:`PREFIX_ATTENTION_TILING` (for the micro-benchmark). Each layer's QKV/RoPE kernel writes its K/V straight
    into ``(layers, B, P + room, Hkv, Dh)`` buffers, returned as a :class:`~cortexflow.ops.PrefixKVCache` (with
    ``room`` the suffix length, the denoising call writes its suffix rows after them and copies nothing)."""
    d = layers[0].dims
    tiling = PREFIX_ATTENTION_TILING if attention_tiling is None else attention_tiling
    x = x.contiguous()
    b, p, width = x.shape
    inv_freq = backend.inverse_frequencies(d.head_dim, d.rope_base, x.device)
    scale = d.attention_scale
    eps = d.rms_norm_eps
    rows = x.view(b * p, width)
    cache = PrefixKVCache(*kv_buffers(len(layers), b, p + room, (d.num_kv_heads, d.head_dim), x.dtype, x.device), p)
    for layer, (k, v) in zip(layers, cache):
        h = rms_kernel.rms_norm(rows, weights[layer.attn_norm], eps)
        qkv = project(weights, layer.name("qkv"), h).view(b, p, -1)
        q = qkv_rope(qkv, positions, inv_freq, d.num_heads, d.num_kv_heads, k, v)
        if layer is layers[-1]:
            break  # the last layer's output is unused: only its K/V are needed
        a = attention(q, k, v, mask, scale, **tiling)
        rows = project_add(weights, layer.name("o"), a.view(b * p, -1), rows, in_place=True)
        h = rms_kernel.rms_norm(rows, weights[layer.mlp_norm], eps)
        act = gelu_tanh_gate_fused(project(weights, layer.name("gate_up"), h))
        rows = project_add(weights, layer.name("down"), act, rows, in_place=True)
    return cache
