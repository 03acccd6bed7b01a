"""A single-token decode step's QKV projection with RoPE and the KV-cache write in its epilogue (Triton).

The same values as :func:`~cortexflow.kernels.decode_gemv.decode_gemv` (norm prologue, QKV GEMV, output
rounded to the activation dtype) followed by :func:`~cortexflow.kernels.qkv_rope.qkv_rope` (split-half
RoPE on Q and K, K/V written at cache row ``write_at``), in one kernel: no QKV tensor goes through memory
and one launch less per layer.

Layout: ``x (K,)`` (one row), the fused weight ``W ((Hq + 2 Hkv) * D, K)`` laid out ``[q heads | k heads |
v heads]`` with unit stride along ``K``; outputs ``q (1, 1, Hq, D)`` and cache rows
``k_cache[0, write_at]``, ``v_cache[0, write_at]`` of caches ``(1, L, Hkv, D)`` (last dim contiguous).
One program owns ``BLOCK_H`` rotation pairs of one head: weight rows ``h * D + j`` and ``h * D + D/2 + j``
for ``j`` in its block, so both halves that RoPE mixes are in the same program. An E4M3 ``W`` with per-row
fp32 scales (``weight_scale``) is the decode GEMV's weight-only FP8: each row's fp32 sum is multiplied by
its scale before the rounding and RoPE.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cortexflow.kernels.decode_gemv import WIDE_MODEL, GemvTiling, check_weight_scale, gemv_rows, narrow_fp8_width
from cortexflow.kernels.pdl import launch_options

#: (rotation pairs per program, K chunk, warps, K group, prefetch) for bf16 / fp16 / fp32 weights: the fastest in
#: OpenVLA's 32 decode layers chained in one graph with PDL (``benchmarks/micro_decode_chain.py``; timings in
#: benchmarks/NOTES.md, "Tuning constants" and session 21), for a model width (K) of at least
#: :data:`~cortexflow.kernels.decode_gemv.WIDE_MODEL`; narrower models keep :data:`NARROW_TILING`. K group and
#: prefetch: as in :class:`~cortexflow.kernels.decode_gemv.GemvTiling`.
DEFAULT_TILING = GemvTiling(8, 512, 4, 8, True)
NARROW_TILING = GemvTiling(4, 512, 4)
#: The same for E4M3 weights; :data:`NARROW_FP8_TILING` for widths of
#: :data:`~cortexflow.kernels.decode_gemv.NARROW_MODEL` up to :data:`~cortexflow.kernels.decode_gemv.WIDE_MODEL`
#: (RT-2's 2048: 5.5 against 6.2 µs a layer, weights streamed from HBM, ``bench_fp8_decode.py --model rt2``; NOTES,
#: session 24).
DEFAULT_FP8_TILING = GemvTiling(4, 2048, 8, 16)
NARROW_FP8_TILING = GemvTiling(2, 1024, 4, 16)


@triton.jit
def _decode_qkv_rope_kernel(
    x_ptr, w_ptr, norm_w_ptr, w_scale_ptr, q_ptr, k_ptr, v_ptr, pos_ptr, inv_freq_ptr, write_at_ptr,
    n_q_heads, n_kv_heads, head_dim, half, k_dim, stride_w, eps, s_k_t, s_k_h, s_v_t, s_v_h,
    NORM: tl.constexpr, SCALE: tl.constexpr, W_SCALE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    PDL: tl.constexpr, K_GROUP: tl.constexpr, PREFETCH: tl.constexpr,
):
    blocks_per_head = tl.cdiv(half, BLOCK_H)
    head = tl.program_id(0) // blocks_per_head
    j = (tl.program_id(0) % blocks_per_head) * BLOCK_H + tl.arange(0, BLOCK_H)
    j_ok = j < half
    y1, y2 = gemv_rows(x_ptr, w_ptr, norm_w_ptr, w_scale_ptr, head * head_dim + j, j_ok, k_dim, half, stride_w,
                       eps, NORM, SCALE, True, W_SCALE, BLOCK_H, BLOCK_K, PDL, K_GROUP, PREFETCH)
    # The reference rounds the projection output, then rotates in fp32 (as qkv_rope does).
    out_ty = q_ptr.dtype.element_ty
    x1 = y1.to(out_ty).to(tl.float32)
    x2 = y2.to(out_ty).to(tl.float32)
    row = tl.load(write_at_ptr)
    if head < n_q_heads + n_kv_heads:
        angle = tl.load(pos_ptr).to(tl.float32) * tl.load(inv_freq_ptr + j, mask=j_ok, other=0.0)
        cos = tl.cos(angle)
        sin = tl.sin(angle)
        out1 = x1 * cos - x2 * sin
        out2 = x2 * cos + x1 * sin
        if head < n_q_heads:
            dst = q_ptr + head * head_dim
        else:
            dst = k_ptr + row * s_k_t + (head - n_q_heads) * s_k_h
    else:
        out1 = x1
        out2 = x2
        dst = v_ptr + row * s_v_t + (head - n_q_heads - n_kv_heads) * s_v_h
    tl.store(dst + j, out1.to(dst.dtype.element_ty), mask=j_ok)
    tl.store(dst + half + j, out2.to(dst.dtype.element_ty), mask=j_ok)


def decode_qkv_rope(
    x: torch.Tensor,
    weight: torch.Tensor,
    n_q_heads: int,
    n_kv_heads: int,
    position: torch.Tensor,
    inv_freq: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    write_at: torch.Tensor,
    *,
    norm_weight: torch.Tensor | None = None,
    normalize: bool = False,
    eps: float = 1e-6,
    weight_scale: torch.Tensor | None = None,
    block_h: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    k_group: int | None = None,
    prefetch: bool | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """Rotated ``q (1, 1, Hq, D)`` of the one row ``x`` (``K`` values, any leading dims of size 1); rotated
    K and plain V written into ``k_cache`` / ``v_cache (1, L, Hkv, D)`` at row ``write_at`` (a ``(1,)``
    int64 device tensor, never checked against ``L`` on the device). ``position``: the token's RoPE
    position, a one-element int tensor. ``norm_weight`` / ``normalize`` / ``eps``: the RMSNorm prologue
    of :func:`~cortexflow.kernels.decode_gemv.decode_gemv`; ``weight_scale ((Hq + 2 Hkv) * D,)`` fp32: the
    per-row scales of an E4M3 ``weight`` (required exactly then); ``pdl``: programmatic dependent launch.
    Tiling defaults to :data:`DEFAULT_TILING` (:data:`NARROW_TILING` below a width ``K`` of
    :data:`~cortexflow.kernels.decode_gemv.WIDE_MODEL`, :data:`DEFAULT_FP8_TILING` / :data:`NARROW_FP8_TILING` for
    E4M3; ``block_h`` pairs per program: ``2 * block_h`` weight rows); ``k_group``, ``prefetch``: as in
    :func:`~cortexflow.kernels.decode_gemv.decode_gemv`."""
    k_dim = x.shape[-1]
    n_heads = n_q_heads + 2 * n_kv_heads
    if x.numel() != k_dim:
        raise ValueError(f"decode_qkv_rope takes one row, got x of shape {tuple(x.shape)}")
    if weight.shape[-1] != k_dim or weight.stride(-1) != 1 or weight.shape[0] % (2 * n_heads):
        raise ValueError(f"weight {tuple(weight.shape)} (stride {weight.stride()}) is not a fused "
                         f"({n_heads} heads x even head_dim, K={k_dim}) QKV weight")
    head_dim = weight.shape[0] // n_heads
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dim() != 4 or cache.shape[0] != 1 or cache.shape[2:] != (n_kv_heads, head_dim) or cache.stride(-1) != 1:
            raise ValueError(f"{name} {tuple(cache.shape)} is not a (1, L, {n_kv_heads}, {head_dim}) cache")
    if position.numel() != 1 or write_at.numel() != 1:
        raise ValueError("position and write_at each hold one value")
    fp8 = check_weight_scale(weight, weight_scale)
    if fp8:
        tiling = NARROW_FP8_TILING if narrow_fp8_width(k_dim) else DEFAULT_FP8_TILING
    else:
        tiling = DEFAULT_TILING if k_dim >= WIDE_MODEL else NARROW_TILING
    x1 = x.reshape(k_dim)
    if not x1.is_contiguous():
        x1 = x1.contiguous()
    half = head_dim // 2
    block_h = block_h or min(tiling.block_n, triton.next_power_of_2(half))
    block_k, num_warps = block_k or tiling.block_k, num_warps or tiling.warps
    k_group = tiling.k_group if k_group is None else k_group
    prefetch = tiling.prefetch if prefetch is None else prefetch
    if block_k % k_group:
        raise ValueError(f"k_group {k_group} does not divide block_k {block_k}")
    q = torch.empty((1, 1, n_q_heads, head_dim), dtype=x.dtype, device=x.device)
    grid = (n_heads * triton.cdiv(half, block_h),)
    _decode_qkv_rope_kernel[grid](
        x1, weight, norm_weight if norm_weight is not None else x1, weight_scale if fp8 else x1, q, k_cache, v_cache,
        position, inv_freq, write_at, n_q_heads, n_kv_heads, head_dim, half, k_dim, weight.stride(0), eps,
        k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2),
        NORM=norm_weight is not None or normalize, SCALE=norm_weight is not None, W_SCALE=fp8,
        BLOCK_H=block_h, BLOCK_K=block_k, PDL=pdl, K_GROUP=k_group, PREFETCH=prefetch, num_warps=num_warps,
        **launch_options(pdl),
    )
    return q


def decode_qkv_rope_reference(x, weight, n_q_heads, n_kv_heads, position, inv_freq, *, norm_weight=None,
                              normalize=False, eps=1e-6, weight_scale=None):
    """The op-by-op computation: ``(q, k, v)`` of shapes ``(1, 1, H, D)`` (q and k rotated); an E4M3
    ``weight`` with its ``weight_scale`` as :func:`~cortexflow.kernels.decode_gemv.decode_gemv_reference`."""
    from cortexflow.kernels.decode_gemv import decode_gemv_reference
    from cortexflow.kernels.qkv_rope import qkv_rope_reference

    qkv = decode_gemv_reference(x.reshape(1, 1, -1), weight, norm_weight=norm_weight, normalize=normalize, eps=eps,
                                weight_scale=weight_scale)
    return qkv_rope_reference(qkv, position.reshape(1, 1), inv_freq, n_q_heads, n_kv_heads)
