"""Single-token decode GEMVs with the decoder layer's norms and epilogues fused in (Triton).

A token VLA's decode step multiplies one activation row by every weight of the layer: ``y = W x`` with
``x (K,)`` and ``W (N, K)`` row-major. That is a pure weight stream (M = 1: no tensor-core tile fits), so
one kernel per projection reads ``W`` once and does the small work around it in the same pass:

- ``norm_weight`` (prologue): ``x`` is RMS-normalised first, ``x * rsqrt(mean(x^2) + eps) * (1 + w)`` in
  fp32 and rounded to ``x``'s dtype as the reference's normalised activations are; every program
  recomputes the statistics of the ``K`` inputs (a few KB from L2), so no norm kernel runs before;
  ``normalize=True`` without ``norm_weight``: the same without the ``(1 + w)`` factor (the norm's weight
  was folded into ``W``);
- ``residual``: ``y = residual + W x`` (one rounding of the fp32 sum);
- ``gated`` (``silu`` or tanh-GELU): ``W`` holds ``[gate | up]`` (``2F`` rows) and the result is
  ``act(gate) * up`` with both halves rounded to the output dtype first, as the reference rounds the
  two GEMM outputs before its activation kernel; ``F`` outputs.

FP8 weights (weight-only): ``W`` may be E4M3 (``torch.float8_e4m3fn``) with one fp32 scale per row,
``value = W[n, k] * weight_scale[n]`` (:mod:`cortexflow.quantization.fp8`). The kernel loads the E4M3 tiles
(one byte per weight), converts them to fp32, accumulates ``sum_k x[k] * W[n, k]`` in fp32 and multiplies
the sum by ``weight_scale[n]`` once per output row, before the epilogue. bf16 / fp16 / fp32 weights compile
without the scale (a constexpr switch), so their code is the one without FP8 support.

Layout: ``x (K,)``, ``W (N, K)`` with unit stride along ``K``; output ``(N,)`` (``(F,)`` gated). One
program owns ``BLOCK_N`` output rows and walks ``K`` in ``BLOCK_K`` chunks, accumulating in fp32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from cortexflow.kernels.gelu_gate import _gelu_tanh
from cortexflow.kernels.pdl import launch_options, pdl_release, pdl_wait
from cortexflow.kernels.rms_norm import row_rstd
from cortexflow.kernels.runtime import processor_count

class GemvTiling(NamedTuple):
    """How :func:`decode_gemv` splits a weight: rows per program, K chunk, warps, and :func:`gemv_rows`' K group
    (products summed in runs of this many along K before the accumulator) and prefetch (the next chunk loaded
    before the current one is multiplied)."""

    block_n: int
    block_k: int
    warps: int
    k_group: int = 1
    prefetch: bool = False


#: Model width (hidden size) from which the bf16 tilings with K groups and prefetch apply: they were chosen at
#: OpenVLA-7B's 4096; at RT-2's 2048 they made the call slower (NOTES, session 21), so narrower models keep the
#: tilings measured on them before.
WIDE_MODEL = 4096
#: Model width from which (up to :data:`WIDE_MODEL`) E4M3 weights take the tilings measured at RT-2's 2048 (NOTES,
#: session 24); narrower (test-size) models keep the earlier ones, whose fewer programs the Triton interpreter runs
#: faster and which no sweep ranked below 2048.
NARROW_MODEL = 2048


def default_tiling(n_rows: int, k_dim: int, gated: bool, fp8: bool = False) -> GemvTiling:
    """The tiling for a weight of ``n_rows x k_dim``: the fastest of the sweeps for each kind of projection
    (``benchmarks/micro_decode_chain.py``, OpenVLA's 32 decode layers chained in one CUDA graph with PDL, and
    ``benchmarks/micro_decode_gemv.py`` / ``bench_fp8_decode.py``, one kernel repeated; timings in
    benchmarks/NOTES.md, "Tuning constants" and sessions 19–21). The model's width is ``k_dim`` of a gated gate/up
    weight and ``n_rows`` of an o or down weight.

    bf16 / fp16 / fp32 weights, width >= :data:`WIDE_MODEL`: gated gate/up 8 rows, 1024, 8 warps, K group 8; long K
    (> 8192, OpenVLA's down) 16 rows, 1024, 8 warps, K group 8, prefetch; otherwise (o) 16 rows, 1024, 8 warps, K
    group 8, prefetch (chained decode on an H100, session 21: 147.7 µs a layer against 150.3 with the narrow
    tilings). Narrower: gated 16 rows, 512, 4 warps; long K 8 rows, 2048, 8 warps; otherwise 8 rows, 1024, 4 warps.
    Wide N (>= 8192 rows: an unfused QKV, the LM head): 32 rows, 1024, 8 warps.

    E4M3 weights (``fp8``), K group 16 (a quarter of the accumulator registers of the bf16 tilings per weight
    byte): gated 4 rows, 1024, 4 warps; long K 8 rows, 1024, 8 warps, prefetch; wide N 4 rows, 1024, 4 warps (no
    K group: not measured with one); otherwise 8 rows, 2048, 8 warps. In the chained decode: 84.4 µs a layer
    (2.40 TB/s of E4M3 weights) against 93.6 without K groups and prefetch; RT-2 with FP8 2.5 % faster. Narrower
    than :data:`WIDE_MODEL` and at least :data:`NARROW_MODEL` (RT-2's 2048; ``bench_fp8_decode.py --model rt2``,
    session 24): long K 8 rows, 2048, 8 warps, prefetch (15.1 against 16.2 µs); otherwise 4 rows, 2048, 4 warps
    (4.0 against 4.2 µs); with the QKV/RoPE tiling RT-2 with FP8 134.9 -> 122.8 ms on an H100."""
    if gated:
        if fp8:
            return GemvTiling(4, 1024, 4, 16)
        return GemvTiling(8, 1024, 8, 8) if k_dim >= WIDE_MODEL else GemvTiling(16, 512, 4)
    if k_dim > 8192:
        if fp8:
            return GemvTiling(8, 2048 if narrow_fp8_width(n_rows) else 1024, 8, 16, True)
        return GemvTiling(16, 1024, 8, 8, True) if n_rows >= WIDE_MODEL else GemvTiling(8, 2048, 8)
    if n_rows >= 8192:
        return GemvTiling(4, 1024, 4) if fp8 else GemvTiling(32, 1024, 8)
    if fp8:
        return GemvTiling(4, 2048, 4, 16) if narrow_fp8_width(n_rows) else GemvTiling(8, 2048, 8, 16)
    return GemvTiling(16, 1024, 8, 8, True) if n_rows >= WIDE_MODEL else GemvTiling(8, 1024, 4)


def narrow_fp8_width(width: int) -> bool:
    """Whether a model of this width takes the narrow-model E4M3 decode tilings (:data:`NARROW_MODEL` up to
    :data:`WIDE_MODEL`)."""
    return NARROW_MODEL <= width < WIDE_MODEL


def rows_for_grid(n_out: int, block_n: int, processors: int) -> int:
    """``block_n`` halved until ``n_out`` outputs give at least one program per SM (``processors``), or 1: a
    tiling chosen for 4096 outputs (16 rows, 256 programs) keeps every SM of an H100 streaming on 2048 (8 rows,
    256 programs instead of 128)."""
    while block_n > 1 and triton.cdiv(n_out, block_n) < processors:
        block_n //= 2
    return block_n


@triton.jit
def _x_chunk(x_ptr, norm_w_ptr, kk, k_ok, rstd, NORM: tl.constexpr, SCALE: tl.constexpr):
    """``x[kk]`` in fp32, RMS-normalised (and scaled by ``1 + w``) and rounded as the reference's norm."""
    xv = tl.load(x_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
    if NORM:
        xv = xv * rstd
        if SCALE:
            xv = xv * (1.0 + tl.load(norm_w_ptr + kk, mask=k_ok, other=0.0).to(tl.float32))
        xv = xv.to(x_ptr.dtype.element_ty).to(tl.float32)
    return xv


@triton.jit
def _products(w, xv, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_GROUP: tl.constexpr):
    """``w * x`` of one ``(BLOCK_N, BLOCK_K)`` weight chunk in fp32, with each run of ``K_GROUP`` consecutive
    products along K summed: ``(BLOCK_N, BLOCK_K // K_GROUP)``."""
    products = w.to(tl.float32) * xv[None, :]
    if K_GROUP > 1:
        products = tl.sum(tl.reshape(products, [BLOCK_N, BLOCK_K // K_GROUP, K_GROUP]), axis=2)
    return products


@triton.jit
def gemv_rows(
    x_ptr, w_ptr, norm_w_ptr, w_scale_ptr, rows, row_ok, k_dim, second_offset, stride_w, eps,
    NORM: tl.constexpr, SCALE: tl.constexpr, TWO: tl.constexpr, W_SCALE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr, K_GROUP: tl.constexpr = 1,
    PREFETCH: tl.constexpr = False,
):
    """fp32 dot products of the (normalised) row ``x`` with weight rows ``rows`` and, when ``TWO``, also
    with rows ``rows + second_offset``: ``(y, y2)`` of shape ``(BLOCK_N,)`` (``y2`` zeros without ``TWO``).
    ``W_SCALE``: the weight is E4M3 and each sum is multiplied by its row's fp32 scale ``w_scale_ptr[row]``.
    Starts the kernel's PDL protocol: releases the next kernel, loads the first weight chunk (which no
    kernel writes) and only then waits for the previous kernel before reading ``x``.

    The accumulator holds ``(BLOCK_N, BLOCK_K // K_GROUP)`` fp32 partial sums: ``K_GROUP`` consecutive products
    of a chunk are added before they reach it (fewer registers per weight byte, a different fp32 summation
    order). ``PREFETCH``: each iteration loads the next chunk before it multiplies the current one, so two
    chunks are in flight per program."""
    pdl_release(PDL)
    offs_k = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + rows[:, None] * stride_w
    # The first weight chunk does not depend on the previous kernel: with PDL it loads while that runs.
    k_ok = offs_k < k_dim
    tile_ok = row_ok[:, None] & k_ok[None, :]
    w = tl.load(w_rows + offs_k[None, :], mask=tile_ok, other=0.0)
    w2 = w
    if TWO:
        w2 = tl.load(w_rows + second_offset * stride_w + offs_k[None, :], mask=tile_ok, other=0.0)
    pdl_wait(PDL)
    rstd = 1.0
    if NORM:
        rstd = row_rstd(x_ptr, 0, k_dim, eps, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_K // K_GROUP], tl.float32)
    acc2 = tl.zeros([BLOCK_N, BLOCK_K // K_GROUP], tl.float32)
    if PREFETCH:
        for k0 in range(0, k_dim, BLOCK_K):
            next_k = k0 + BLOCK_K + offs_k
            next_ok = row_ok[:, None] & (next_k < k_dim)[None, :]
            w_next = tl.load(w_rows + next_k[None, :], mask=next_ok, other=0.0)
            w2_next = w_next
            if TWO:
                w2_next = tl.load(w_rows + second_offset * stride_w + next_k[None, :], mask=next_ok, other=0.0)
            kk = k0 + offs_k
            xv = _x_chunk(x_ptr, norm_w_ptr, kk, kk < k_dim, rstd, NORM, SCALE)
            acc += _products(w, xv, BLOCK_N, BLOCK_K, K_GROUP)
            if TWO:
                acc2 += _products(w2, xv, BLOCK_N, BLOCK_K, K_GROUP)
            w = w_next
            w2 = w2_next
    else:
        xv = _x_chunk(x_ptr, norm_w_ptr, offs_k, k_ok, rstd, NORM, SCALE)
        acc += _products(w, xv, BLOCK_N, BLOCK_K, K_GROUP)
        if TWO:
            acc2 += _products(w2, xv, BLOCK_N, BLOCK_K, K_GROUP)
        for k0 in range(BLOCK_K, k_dim, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < k_dim
            xv = _x_chunk(x_ptr, norm_w_ptr, kk, k_ok, rstd, NORM, SCALE)
            tile_ok = row_ok[:, None] & k_ok[None, :]
            w = tl.load(w_rows + kk[None, :], mask=tile_ok, other=0.0)
            acc += _products(w, xv, BLOCK_N, BLOCK_K, K_GROUP)
            if TWO:
                w2 = tl.load(w_rows + second_offset * stride_w + kk[None, :], mask=tile_ok, other=0.0)
                acc2 += _products(w2, xv, BLOCK_N, BLOCK_K, K_GROUP)
    y = tl.sum(acc, axis=1)
    y2 = tl.sum(acc2, axis=1)
    if W_SCALE:
        y = y * tl.load(w_scale_ptr + rows, mask=row_ok, other=0.0)
        if TWO:
            y2 = y2 * tl.load(w_scale_ptr + rows + second_offset, mask=row_ok, other=0.0)
    return y, y2


@triton.jit
def _decode_gemv_kernel(
    x_ptr, w_ptr, out_ptr, res_ptr, norm_w_ptr, w_scale_ptr,
    n_out, k_dim, up_offset, stride_w, eps,
    NORM: tl.constexpr, SCALE: tl.constexpr, RESIDUAL: tl.constexpr, GATED: tl.constexpr, SILU: tl.constexpr,
    W_SCALE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr, K_GROUP: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_out
    y, y_up = gemv_rows(x_ptr, w_ptr, norm_w_ptr, w_scale_ptr, rows, row_ok, k_dim, up_offset, stride_w, eps,
                        NORM, SCALE, GATED, W_SCALE, BLOCK_N, BLOCK_K, PDL, K_GROUP, PREFETCH)
    store_rows(y, y_up, rows, row_ok, out_ptr, res_ptr, RESIDUAL, GATED, SILU)


@triton.jit
def store_rows(y, y_up, rows, row_ok, out_ptr, res_ptr, RESIDUAL: tl.constexpr, GATED: tl.constexpr,
               SILU: tl.constexpr):
    """The GEMV epilogue of output ``rows``: with ``GATED``, ``act(gate) * up`` of the fp32 sums ``y`` (gate) and
    ``y_up`` (up), each rounded to the output dtype first; with ``RESIDUAL``, ``+ res[rows]``; rounded and stored."""
    out_ty = out_ptr.dtype.element_ty
    if GATED:
        gate = y.to(out_ty).to(tl.float32)
        up = y_up.to(out_ty).to(tl.float32)
        if SILU:
            y = gate / (1.0 + tl.exp(-gate)) * up
        else:
            y = _gelu_tanh(gate) * up
    if RESIDUAL:
        y += tl.load(res_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, y.to(out_ty), mask=row_ok)


def decode_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    norm_weight: torch.Tensor | None = None,
    normalize: bool = False,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    gated: str | None = None,
    weight_scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    k_group: int | None = None,
    prefetch: bool | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """``W x`` for one row ``x (K,)`` (any leading dims of total size 1) and ``weight (N, K)``.

    ``norm_weight (K,)``: RMS-normalise ``x`` first with scale ``1 + norm_weight`` (``normalize``: without
    a scale, the norm weight being folded into ``weight``); ``residual (N,)``: add
    it; ``gated`` ("silu" or "gelu_tanh"): ``weight`` is ``[gate | up]`` and the result ``act(gate) * up``
    ``(N/2,)``; ``weight_scale (N,)`` fp32: ``weight`` is E4M3 and row ``n`` stands for
    ``weight[n] * weight_scale[n]`` (required exactly when ``weight`` is E4M3). Returns the output with
    ``x``'s leading dims, in ``x``'s dtype; ``out`` may be ``residual`` itself (in place). Tiling:
    :func:`default_tiling` unless given (its rows per program through :func:`rows_for_grid`); ``k_group`` and
    ``prefetch``: :func:`gemv_rows`' ``K_GROUP`` (a power of two dividing ``block_k``) and ``PREFETCH``. ``pdl``: launch with programmatic dependent launch
    (:mod:`cortexflow.kernels.pdl`; the first weight chunk loads while the previous kernel finishes)."""
    k_dim = x.shape[-1]
    if x.numel() != k_dim:
        raise ValueError(f"decode_gemv takes one row, got x of shape {tuple(x.shape)}")
    if weight.shape[-1] != k_dim or weight.stride(-1) != 1:
        raise ValueError(f"weight {tuple(weight.shape)} (stride {weight.stride()}) does not match x's K={k_dim}")
    if gated not in (None, "silu", "gelu_tanh"):
        raise ValueError(f"gated must be None, 'silu' or 'gelu_tanh', got {gated!r}")
    fp8 = check_weight_scale(weight, weight_scale)
    n_out = weight.shape[0] // 2 if gated else weight.shape[0]
    x1 = x.reshape(k_dim)
    if not x1.is_contiguous():
        x1 = x1.contiguous()
    if out is None:
        out = torch.empty(n_out, dtype=x.dtype, device=x.device)
    res = residual.reshape(n_out) if residual is not None else out
    tiling = default_tiling(weight.shape[0], k_dim, gated is not None, fp8)
    block_n = block_n or rows_for_grid(n_out, tiling.block_n, processor_count(x.device))
    block_k, num_warps = block_k or tiling.block_k, num_warps or tiling.warps
    k_group = tiling.k_group if k_group is None else k_group
    prefetch = tiling.prefetch if prefetch is None else prefetch
    if block_k % k_group:
        raise ValueError(f"k_group {k_group} does not divide block_k {block_k}")
    _decode_gemv_kernel[(triton.cdiv(n_out, block_n),)](
        x1, weight, out, res, norm_weight if norm_weight is not None else x1, weight_scale if fp8 else x1,
        n_out, k_dim, n_out, weight.stride(0), eps,
        NORM=norm_weight is not None or normalize, SCALE=norm_weight is not None, RESIDUAL=residual is not None,
        GATED=gated is not None, SILU=gated == "silu", W_SCALE=fp8, BLOCK_N=block_n, BLOCK_K=block_k, PDL=pdl,
        K_GROUP=k_group, PREFETCH=prefetch, num_warps=num_warps, **launch_options(pdl),
    )
    return out.view(*x.shape[:-1], n_out)


def check_weight_scale(weight: torch.Tensor, weight_scale: torch.Tensor | None) -> bool:
    """Whether ``weight`` is E4M3 with its per-row fp32 ``weight_scale (N,)`` (True) or a plain float weight
    without one (False); a ValueError for any other combination."""
    fp8 = weight.dtype == torch.float8_e4m3fn
    if fp8 != (weight_scale is not None):
        raise ValueError(f"weight_scale is required exactly for an E4M3 weight, got a {weight.dtype} weight "
                         f"{'with' if weight_scale is not None else 'without'} a scale")
    if fp8 and (weight_scale.dtype != torch.float32 or weight_scale.shape != (weight.shape[0],)
                or weight_scale.stride(0) != 1):
        raise ValueError(f"weight_scale must be contiguous fp32 ({weight.shape[0]},), one per weight row, got "
                         f"{weight_scale.dtype} {tuple(weight_scale.shape)}")
    return fp8


def decode_gemv_reference(x, weight, *, norm_weight=None, normalize=False, eps=1e-6, residual=None, gated=None,
                          weight_scale=None):
    """The same computation as the op-by-op reference runs it (norm kernel, GEMM, activation, add). With an
    E4M3 ``weight`` and its ``weight_scale``, the GEMM is the weight-only FP8 kernel's: the normalised ``x``
    times the E4M3 values summed in fp32, the sum times the row's scale, rounded to ``x``'s dtype."""
    import torch.nn.functional as F

    h = x
    if norm_weight is not None or normalize:
        xf = x.float()
        scale = 1.0 + norm_weight.float() if norm_weight is not None else 1.0
        h = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * scale).to(x.dtype)
    if weight_scale is not None:
        y = (F.linear(h.float(), weight.float()) * weight_scale).to(x.dtype)
    else:
        y = F.linear(h, weight)
    if gated:
        gate, up = y.chunk(2, dim=-1)
        act = F.silu(gate.float()) if gated == "silu" else F.gelu(gate.float(), approximate="tanh")
        y = (act * up.float()).to(x.dtype)
    if residual is not None:
        y = (residual.float() + y.float()).to(x.dtype)
    return y
