"""The Triton backend's decoder layer for the token VLAs (OpenVLA's Llama-2, RT-2's Gemma).

Same function as :meth:`cortexflow.models.token_decoding.DecoderLM.layer`, fewer kernels per layer:
- Q/K/V and gate/up each run as one GEMM over concatenated weights (:func:`fuse_layer_projections`; the
  separate weights become views into the fused ones, so no memory is added);
- one kernel (:mod:`cortexflow.kernels.qkv_rope`) splits the QKV output, rotates Q and K and writes K/V
  straight into the KV cache, at rows ``0..L-1`` for the prefill or at the row held in the ``write_at``
  device tensor for a decode step (so the CUDA graph of a step replays for every position);
- one kernel for the gated activation (``silu(gate) * up`` for Llama, ``gelu_tanh(gate) * up`` for Gemma)
  over the fused ``[gate | up]`` GEMM output;
- both residual adds ride on the GEMM (``addmm``: cuBLAS reads the residual as its C operand), in place
  after layer 0 (an out-of-place ``addmm`` first copies the residual into its output).

A single-token decode step (one row) goes further (``decode_gemv``, :mod:`cortexflow.kernels.decode_gemv`):
each projection is one GEMV kernel that also does what sits around it: the RMSNorm before Q/K/V and
before gate/up (recomputed per program from the one row), the residual adds, and the gated activation.
That is 4 GEMVs + QKV/RoPE + attention (+ combine) per layer.

Per Llama layer that is 9 kernels (2 norms, 4 GEMMs, QKV+RoPE, attention, gated activation; plus the
attention's split combine) instead of ~17 (3 Q/K/V GEMMs, 2 RoPE kernels, 2 cache copies, 2 GEMMs and 2
element-wise kernels for the MLP, 2 adds).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cortexflow.kernels.decode_gemv import decode_gemv
from cortexflow.kernels.gelu_gate import gelu_tanh_gate_fused
from cortexflow.kernels.qkv_rope import qkv_rope

#: The fused projections of a gated-MLP decoder layer: fused name -> the parts it concatenates (rows).
FUSED_PROJECTIONS = (("qkv", ("q", "k", "v")), ("gate_up", ("gate", "up")))


def fuse_layer_projections(weights: dict[str, torch.Tensor], layer_prefixes) -> dict[str, torch.Tensor]:
    """Add ``{layer}.qkv`` / ``{layer}.gate_up`` (row-concatenated) for each layer prefix, in place, and
    replace the separate weights by views into them, so the originals are freed one layer at a time."""
    for p in layer_prefixes:
        for fused, parts in FUSED_PROJECTIONS:
            if f"{p}.{fused}" in weights:
                continue
            tensors = [weights[f"{p}.{part}"] for part in parts]
            joined = torch.cat(tensors, dim=0)
            weights[f"{p}.{fused}"] = joined
            start = 0
            for part, tensor in zip(parts, tensors):
                weights[f"{p}.{part}"] = joined[start:start + tensor.shape[0]]
                start += tensor.shape[0]
            del tensors
    return weights


def fused_token_layer(backend, lm, weights, i: int, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                      cache: tuple[torch.Tensor, torch.Tensor], write_at: torch.Tensor | None,
                      gemv: bool = False) -> torch.Tensor:
    """One pre-norm layer of ``lm`` over ``x (B, L, D)``; arguments as in ``DecoderLM.layer``. ``gemv``:
    a one-row call (a decode step at batch 1) runs its projections as fused decode GEMVs."""
    p = f"{lm.prefix}.layers.{i}"
    b, length, width = x.shape
    if gemv and b * length == 1:
        return _decode_step_layer(backend, lm, weights, i, x, positions, mask, cache, write_at)
    h = lm.norm(backend, weights, f"{p}.attn_norm", x)
    attn = _attend(backend, lm, i, F.linear(h, weights[f"{p}.qkv"]), positions, mask, cache, write_at)
    # Layer 0's input may be a caller's buffer: a new tensor. Later residuals are this stage's own
    # temporaries and accumulate in place (an out-of-place addmm first copies the residual: one more kernel).
    x2 = x.reshape(b * length, width)
    x2 = x2.addmm_(attn.reshape(b * length, -1), weights[f"{p}.o"].T) if i > 0 else \
        torch.addmm(x2, attn.reshape(b * length, -1), weights[f"{p}.o"].T)
    h = lm.norm(backend, weights, f"{p}.mlp_norm", x2.view(b, length, width))
    act = gelu_tanh_gate_fused(F.linear(h, weights[f"{p}.gate_up"]), silu=lm.gated_activation == "silu")
    x2.addmm_(act.reshape(b * length, -1), weights[f"{p}.down"].T)
    return x2.view(b, length, width)


def _attend(backend, lm, i, qkv, positions, mask, cache, write_at):
    """RoPE on the fused ``qkv (B, L, (Hq + 2 Hkv) * Dh)`` with K/V written into layer ``i``'s cache (rows
    ``0..L-1``, or the row in ``write_at``), then attention over this call's keys (prefill) or the whole
    cache (step); ``(B, L, Hq * Dh)``."""
    d = lm.dims
    length = qkv.shape[1]
    cache_k, cache_v = cache[0][i], cache[1][i]
    inv_freq = backend.inverse_frequencies(d.head_dim, d.rope_base, qkv.device)
    positions = positions.reshape(qkv.shape[0], length)
    if positions.stride(-1) != 1:
        positions = positions.contiguous()
    q = qkv_rope(qkv, positions, inv_freq, d.num_heads, d.num_kv_heads, cache_k, cache_v, write_at=write_at)
    if write_at is None:
        cache_k, cache_v = cache_k[:, :length], cache_v[:, :length]
    return backend.attention(q, cache_k, cache_v, mask, 1.0 / math.sqrt(d.head_dim))


def _decode_step_layer(backend, lm, weights, i, x, positions, mask, cache, write_at):
    """The one-row layer: 4 fused GEMVs (norm + QKV, o + residual, norm + gate/up + activation,
    down + residual), QKV/RoPE into the cache, attention. ``x (1, 1, D)``."""
    p = f"{lm.prefix}.layers.{i}"
    eps = lm.dims.rms_norm_eps
    qkv = decode_gemv(x, weights[f"{p}.qkv"], norm_weight=lm.norm_scale(weights, f"{p}.attn_norm"), eps=eps)
    attn = _attend(backend, lm, i, qkv, positions, mask, cache, write_at)
    # Layer 0's input may be a caller's buffer: a new tensor; later layers accumulate in place.
    x2 = decode_gemv(attn, weights[f"{p}.o"], residual=x, out=None if i == 0 else x.view(-1))
    act = decode_gemv(x2, weights[f"{p}.gate_up"], norm_weight=lm.norm_scale(weights, f"{p}.mlp_norm"), eps=eps,
                      gated=lm.gated_activation)
    return decode_gemv(act, weights[f"{p}.down"], residual=x2, out=x2.view(-1))
