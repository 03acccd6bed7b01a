"""Split a fused QKV projection, rotate Q and K (split-half RoPE) and write K/V straight into a KV cache.

Input ``qkv (B, S, (Hq + 2*Hkv) * D)`` laid out ``[q heads | k heads | v heads]``; outputs ``q (B, S, Hq, D)``
(rotated) and the cache slices ``k_out, v_out (B, S, Hkv, D)`` (any strides with a contiguous last dim,
e.g. ``cache[:, P:P+S]``). With ``write_at`` (a ``(1,)`` int64 device tensor) token ``t`` goes to cache row
``write_at + t`` instead, so a CUDA graph can replay a single-token decode step that writes a different row
each time. One program handles one head of one token.

Folded norm: when the RMSNorm before the projection had its weight folded into the QKV weight, ``qkv`` is
the projection of the un-normalised rows and every value is first multiplied by its token's rstd
(``rsqrt(mean(x^2) + eps)`` of the layer input ``x``) and rounded to ``qkv``'s dtype, as the reference's
projection output is. The rstd is read from a ``(B*S,)`` fp32 tensor (``rstd=``, the prefill: one
:func:`~cortexflow.kernels.rms_norm.rms_rstd` kernel for all rows) or recomputed by each program from
the input row (``norm_input=``, a decode step: one row, so no statistics kernel runs at all).

FP8 prefill: ``qkv`` may be the unscaled product of :func:`~cortexflow.kernels.fp8_gemm.fp8_product`
(``product_scales=(row_scale, col_scale)``); each value is then first scaled and rounded to the cache's dtype
exactly as :func:`~cortexflow.kernels.fp8_gemm.scale_product` would have (one launch fewer).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cortexflow.kernels.fp8_gemm import round_to_dtype
from cortexflow.kernels.pdl import launch_options, pdl_release, pdl_wait
from cortexflow.kernels.rms_norm import folded_norm_mode, row_rstd
from cortexflow.kernels.runtime import next_power_of_two


@triton.jit
def _qkv_rope_kernel(
    qkv_ptr, q_ptr, k_ptr, v_ptr, pos_ptr, inv_freq_ptr, write_at_ptr, rstd_ptr, norm_x_ptr, row_scale_ptr,
    col_scale_ptr, n_q_heads, n_kv_heads, half, seq_len, norm_cols, eps,
    s_qkv_b, s_qkv_t, s_q_b, s_q_t, s_q_h, s_k_b, s_k_t, s_k_h, s_v_b, s_v_t, s_v_h, s_pos_b,
    HAS_WRITE_AT: tl.constexpr, RSTD: tl.constexpr, SCALED: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_X: tl.constexpr, PDL: tl.constexpr,
):
    pdl_release(PDL)
    pdl_wait(PDL)
    b = tl.program_id(0)
    t = tl.program_id(1)
    head = tl.program_id(2)
    row = t
    if HAS_WRITE_AT:
        row = t + tl.load(write_at_ptr)
    cols = tl.arange(0, BLOCK_HALF)
    valid = cols < half
    src = qkv_ptr + b * s_qkv_b + t * s_qkv_t + head * 2 * half
    x1 = tl.load(src + cols, mask=valid, other=0.0).to(tl.float32)
    x2 = tl.load(src + half + cols, mask=valid, other=0.0).to(tl.float32)
    token = b * seq_len + t
    if SCALED:
        row_scale = tl.load(row_scale_ptr + token)
        c1 = head * 2 * half + cols
        x1 = round_to_dtype(x1 * row_scale * tl.load(col_scale_ptr + c1, mask=valid, other=0.0),
                            q_ptr.dtype.element_ty).to(tl.float32)
        x2 = round_to_dtype(x2 * row_scale * tl.load(col_scale_ptr + half + c1, mask=valid, other=0.0),
                            q_ptr.dtype.element_ty).to(tl.float32)
    if RSTD != 0:
        if RSTD == 1:
            rstd = tl.load(rstd_ptr + token)
        else:
            rstd = row_rstd(norm_x_ptr, token, norm_cols, eps, BLOCK_X)
        x1 = (x1 * rstd).to(q_ptr.dtype.element_ty).to(tl.float32)
        x2 = (x2 * rstd).to(q_ptr.dtype.element_ty).to(tl.float32)
    if head < n_q_heads + n_kv_heads:
        pos = tl.load(pos_ptr + b * s_pos_b + t).to(tl.float32)
        angle = pos * tl.load(inv_freq_ptr + cols, mask=valid, other=0.0)
        cos = tl.cos(angle)
        sin = tl.sin(angle)
        y1 = x1 * cos - x2 * sin
        y2 = x2 * cos + x1 * sin
        if head < n_q_heads:
            dst = q_ptr + b * s_q_b + t * s_q_t + head * s_q_h
        else:
            dst = k_ptr + b * s_k_b + row * s_k_t + (head - n_q_heads) * s_k_h
    else:
        y1 = x1
        y2 = x2
        dst = v_ptr + b * s_v_b + row * s_v_t + (head - n_q_heads - n_kv_heads) * s_v_h
    tl.store(dst + cols, y1.to(dst.dtype.element_ty), mask=valid)
    tl.store(dst + half + cols, y2.to(dst.dtype.element_ty), mask=valid)


def qkv_rope(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    n_q_heads: int,
    n_kv_heads: int,
    k_out: torch.Tensor,
    v_out: torch.Tensor,
    write_at: torch.Tensor | None = None,
    *,
    rstd: torch.Tensor | None = None,
    norm_input: torch.Tensor | None = None,
    eps: float = 1e-6,
    pdl: bool = False,
    product_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Returns rotated ``q (B, S, Hq, D)``; writes rotated K and plain V into ``k_out`` / ``v_out``, at rows
    ``0..S-1`` or, with ``write_at``, at rows ``write_at..write_at+S-1`` (never checked against the
    cache length on the device: the caller keeps ``write_at + S <= k_out.shape[1]``).

    Folded norm: ``rstd (B*S,)`` fp32 scales each token's QKV first; or ``norm_input (B, S, Dx)`` (the
    contiguous un-normalised layer input) from which each program recomputes its token's rstd with ``eps``.
    ``pdl``: launch with programmatic dependent launch (:mod:`cortexflow.kernels.pdl`). ``product_scales``:
    ``qkv`` is an unscaled FP8 product and these its fp32 ``(row_scale (B*S,), col_scale (width,))`` (module
    doc); q then has the cache's dtype."""
    b, s, width = qkv.shape
    rstd_mode, norm_cols = folded_norm_mode(rstd, norm_input, b * s)
    head_dim = width // (n_q_heads + 2 * n_kv_heads)
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    if product_scales is not None:
        row_scale, col_scale = product_scales
        if row_scale.shape != (b * s,) or col_scale.shape != (width,) or {row_scale.dtype, col_scale.dtype} != {
                torch.float32}:
            raise ValueError(f"product_scales {row_scale.dtype} {tuple(row_scale.shape)}, {col_scale.dtype} "
                             f"{tuple(col_scale.shape)} are not fp32 ({b * s},), ({width},)")
    q = torch.empty((b, s, n_q_heads, head_dim), dtype=qkv.dtype if product_scales is None else k_out.dtype,
                    device=qkv.device)
    _qkv_rope_kernel[(b, s, n_q_heads + 2 * n_kv_heads)](
        qkv, q, k_out, v_out, positions, inv_freq, write_at if write_at is not None else positions,
        rstd if rstd is not None else inv_freq, norm_input if norm_input is not None else qkv,
        *(product_scales if product_scales is not None else (inv_freq, inv_freq)), n_q_heads, n_kv_heads, head_dim // 2, s, norm_cols, eps,
        qkv.stride(0), qkv.stride(1), q.stride(0), q.stride(1), q.stride(2),
        k_out.stride(0), k_out.stride(1), k_out.stride(2), v_out.stride(0), v_out.stride(1), v_out.stride(2),
        positions.stride(0),
        HAS_WRITE_AT=write_at is not None, RSTD=rstd_mode, SCALED=product_scales is not None,
        BLOCK_HALF=next_power_of_two(head_dim // 2), BLOCK_X=min(next_power_of_two(norm_cols), 8192),
        PDL=pdl, num_warps=4 if norm_input is not None else 2, **launch_options(pdl),
    )
    return q


def qkv_rope_reference(qkv, positions, inv_freq, n_q_heads, n_kv_heads, rstd=None, product_scales=None, dtype=None):
    """The same computation in PyTorch: returns (q, k, v) with q and k rotated (after scaling token ``i``
    by ``rstd[i]`` and rounding, when given). ``product_scales``: ``qkv`` is an unscaled product, first scaled
    in fp32 and rounded to ``dtype``."""
    from cortexflow.kernels.rope import rope_reference

    b, s, width = qkv.shape
    if product_scales is not None:
        row_scale, col_scale = product_scales
        qkv = (qkv.float() * row_scale.view(b, s, 1) * col_scale).to(dtype)
    if rstd is not None:
        qkv = (qkv.float() * rstd.float().view(b, s, 1)).to(qkv.dtype)
    head_dim = width // (n_q_heads + 2 * n_kv_heads)
    q, k, v = qkv.view(b, s, -1, head_dim).split([n_q_heads, n_kv_heads, n_kv_heads], dim=2)
    return rope_reference(q, positions, inv_freq), rope_reference(k, positions, inv_freq), v
