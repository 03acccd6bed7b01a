"""FP8 GEMM for several rows (a token LM's prefill): E4M3 activations times E4M3 weights on FP8 tensor cores.

``fp8_linear(x, W, s_w) = x @ dequant(W)ᵀ``: the rows of ``x`` are quantised to E4M3 with one fp32 scale per
row (:func:`quantize_activation_rows`, one Triton launch), then ``torch._scaled_mm`` multiplies the E4M3
matrices with fp32 accumulation and unit tensor-wise scales into an unscaled product (bf16, or fp32 for an fp32
``x``; :func:`product_dtype`), and one Triton launch (:func:`scale_product`) multiplies each output by its row
scale of ``x`` and its per-output-channel scale of ``W`` and rounds it to ``x``'s dtype (adding a residual after
that rounding). cuBLAS's kernel for row-wise scales streams about half the bytes per second of its tensor-wise
one at a token VLA's prefill shapes (H100, 280 rows: QKV 57.2 vs 31.8 µs), more than the separate scaling launch
costs; a bf16 product moves half the bytes of an fp32 one between the two launches (benchmarks/NOTES.md,
session 21). The unscaled product of E4M3 values is at most ``448² K`` in magnitude, far inside bf16's range.

Chained projections (a token LM's prefill, folded norms): :func:`fp8_product` stops before the scaling launch
(QKV/RoPE and the gated activation apply the scales themselves), and :func:`fp8_product_of_sum` scales o's
unscaled product, adds the residual and quantises the sum for gate/up in one launch (:func:`quantize_sum_rows`).

The activation quantisation is :func:`cortexflow.quantization.fp8.quantize_rows` bit for bit: the scale of a
row is ``amax(|row|) / 448`` (1 for an all-zero row), each value is divided by it (IEEE division), clamped
to ``[-448, 448]`` and rounded to the nearest E4M3 value, ties to even. The rounding is done in fp32
arithmetic (:func:`_round_to_e4m3`), so that the cast to E4M3 only ever sees E4M3 values: Triton 3.7's
interpreter casts fp32 to fp8 without rounding to nearest.

Layout: ``x (..., K)`` any float dtype, row-major rows; ``W (N, K)`` E4M3 row-major (``W.T`` is the
column-major operand ``_scaled_mm`` takes), ``s_w (N,)`` fp32; output ``(..., N)`` in ``x``'s dtype.
``_scaled_mm`` needs ``K`` and ``N`` multiples of 16. Reference: :func:`fp8_linear_reference`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from cortexflow.errors import InputError
from cortexflow.quantization.fp8 import E4M3, Fp8Tensor, quantize_rows

#: ``_scaled_mm``'s alignment: K and N must be multiples of it.
SCALED_MM_ALIGNMENT = 16


@triton.jit
def _round_to_e4m3(v):
    """fp32 ``v`` (``|v| <= 448``) rounded to the nearest E4M3 value, ties to even, still in fp32. The spacing
    of E4M3 values in ``[2^e, 2^(e+1))`` is ``2^(e-3)`` (3 mantissa bits), ``2^-9`` below ``2^-6`` (the
    subnormals); adding and subtracting ``1.5 * 2^(e+20)`` makes the fp32 addition round ``|v|`` to that
    spacing (its ulp), ties to even. The sign bit is copied back afterwards, so negative values that round to
    zero give ``-0.0`` as PyTorch's cast does (Triton's unary minus is ``0 - x``, which gives ``+0.0``)."""
    bits = v.to(tl.int32, bitcast=True)
    exponent = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
    magic = (((exponent + 147) << 23) | 0x400000).to(tl.float32, bitcast=True)
    rounded = (tl.abs(v) + magic) - magic
    sign = (bits >> 31) << 31
    return (rounded.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def round_to_dtype(v, dtype: tl.constexpr):
    """fp32 ``v`` rounded to ``dtype`` (bf16 to nearest, ties to even, in integer arithmetic first: Triton 3.7's
    interpreter casts fp32 to bf16 by truncation; a value already in bf16 casts exactly everywhere)."""
    if dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        v = bits.to(tl.float32, bitcast=True)
    return v.to(dtype)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, rstd_ptr, p_ptr, sx_ptr, sw_ptr, sum_ptr, n_cols, stride_x, eps,
                          RSTD: tl.constexpr, PENDING: tl.constexpr, BLOCK: tl.constexpr):
    """Row ``program_id(0)`` of ``x``: its scale ``amax / 448`` (1 if the row is all zeros) into
    ``scale_ptr[row]`` and its E4M3 values into row ``row`` of the contiguous ``q``; two passes over the row
    in ``BLOCK`` chunks (the amax, then the values). ``RSTD``: the first pass also sums the squares, and
    ``rsqrt(mean(x^2) + eps)`` goes to ``rstd_ptr[row]`` (an RMSNorm's row statistic). ``PENDING``: the row
    quantised is ``s = round(round(p * sx[row] * sw) + x)`` (:func:`scale_product` with ``x`` as the residual;
    ``p`` and ``s`` contiguous, ``s`` in its own dtype), which the first pass also stores into ``sum_ptr`` and
    the second reads back."""
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * stride_x
    q_row = q_ptr + row.to(tl.int64) * n_cols
    offs = tl.arange(0, BLOCK)
    amax = tl.zeros([BLOCK], tl.float32)
    squares = tl.zeros([BLOCK], tl.float32)
    if PENDING:
        p_row = p_ptr + row.to(tl.int64) * n_cols
        sum_row = sum_ptr + row.to(tl.int64) * n_cols
        row_scale = tl.load(sx_ptr + row)
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + offs
        ok = cols < n_cols
        v = tl.load(x_row + cols, mask=ok, other=0.0).to(tl.float32)
        if PENDING:
            y = tl.load(p_row + cols, mask=ok, other=0.0) * row_scale * tl.load(sw_ptr + cols, mask=ok, other=0.0)
            y = round_to_dtype(y, sum_ptr.dtype.element_ty).to(tl.float32)
            y = round_to_dtype(y + v, sum_ptr.dtype.element_ty)
            tl.store(sum_row + cols, y, mask=ok)
            v = y.to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
        if RSTD:
            squares += v * v
    if RSTD:
        tl.store(rstd_ptr + row, 1.0 / tl.sqrt(tl.sum(squares, axis=0) / n_cols + eps))
    row_max = tl.max(amax, axis=0)
    # tl.div_rn: IEEE division, as PyTorch's; Triton's ``/`` on fp32 is an approximate division on NVIDIA GPUs.
    scale = tl.where(row_max > 0, tl.div_rn(row_max, 448.0), 1.0)
    tl.store(scale_ptr + row, scale)
    if PENDING:
        # Each thread reads back the elements it stored (same layout); the barrier orders the whole row anyway.
        tl.debug_barrier()
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + offs
        ok = cols < n_cols
        if PENDING:
            v = tl.load(sum_row + cols, mask=ok, other=0.0, cache_modifier=".cg").to(tl.float32)
        else:
            v = tl.load(x_row + cols, mask=ok, other=0.0).to(tl.float32)
        v = _round_to_e4m3(tl.minimum(tl.maximum(tl.div_rn(v, scale), -448.0), 448.0))
        tl.store(q_row + cols, v.to(q_ptr.dtype.element_ty), mask=ok)


def quantize_activation_rows(x: torch.Tensor, block: int = 1024, num_warps: int = 4,
                             rstd: torch.Tensor | None = None, eps: float = 1e-6) -> Fp8Tensor:
    """E4M3 copy of ``x (M, K)`` (rows with unit stride along K) with one fp32 scale per row, in one launch
    (one program per row, ``block`` columns per chunk): the bits of
    :func:`cortexflow.quantization.fp8.quantize_rows`. Non-finite inputs give unspecified values (the
    reference refuses them; a kernel cannot). ``rstd (M,)`` fp32: also filled with each row's
    ``rsqrt(mean(x^2) + eps)`` (:func:`~cortexflow.kernels.rms_norm.rms_rstd`'s statistic, summed in another
    order) in the same launch."""
    _check_rows(x, "quantize_activation_rows")
    return _quantize(x, rstd, eps, None, None, block, num_warps)


def quantize_sum_rows(product: ScaledProduct, residual: torch.Tensor, rstd: torch.Tensor | None = None,
                      eps: float = 1e-6, block: int = 1024, num_warps: int = 4) -> tuple[torch.Tensor, Fp8Tensor]:
    """``(s, E4M3 rows of s)`` in one launch, where ``s = residual + product`` scaled and rounded exactly as
    ``scale_product(product.product, product.row_scale, product.col_scale, residual.dtype, residual)`` gives it
    (a new ``(M, K)`` tensor in ``residual``'s dtype), and its rows are quantised as
    :func:`quantize_activation_rows` quantises ``s`` (with ``rstd``, the rows' RMSNorm statistic too). For an
    ``fp8_linear`` with a residual followed by another FP8 projection of the sum: the scaling launch is gone.
    ``product.product (M, K)`` contiguous, ``residual (M, K)`` rows with unit stride."""
    _check_rows(residual, "quantize_sum_rows")
    p = product.product.reshape(residual.shape)
    if not p.is_contiguous():
        raise InputError(f"quantize_sum_rows takes a contiguous product, got stride {p.stride()}")
    m, k = residual.shape
    if product.row_scale.shape != (m,) or product.col_scale.shape != (k,):
        raise InputError(f"quantize_sum_rows: scales of shapes {tuple(product.row_scale.shape)} and "
                         f"{tuple(product.col_scale.shape)} do not fit a ({m}, {k}) product")
    total = torch.empty((m, k), dtype=residual.dtype, device=residual.device)
    return total, _quantize(residual, rstd, eps, (p, product.row_scale, product.col_scale), total, block, num_warps)


def _check_rows(x: torch.Tensor, name: str) -> None:
    if x.dim() != 2 or x.stride(1) != 1:
        raise InputError(f"{name} takes (rows, columns) with unit column stride, got shape "
                         f"{tuple(x.shape)} stride {x.stride()}")


def _quantize(x, rstd, eps, pending, total, block, num_warps) -> Fp8Tensor:
    """One launch of ``_quantize_rows_kernel`` over ``x (M, K)``; ``pending = (p, sx, sw)`` with ``total``: the
    rows quantised are ``round(round(p * sx * sw) + x)``, also stored into ``total``."""
    m, k = x.shape
    data = torch.empty((m, k), dtype=E4M3, device=x.device)
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    if rstd is not None and (rstd.dtype != torch.float32 or rstd.shape != (m,)):
        raise InputError(f"rstd must be fp32 ({m},), got {rstd.dtype} {tuple(rstd.shape)}")
    p, sx, sw = pending if pending is not None else (scale, scale, scale)
    if m:
        _quantize_rows_kernel[(m,)](x, data, scale, rstd if rstd is not None else scale, p, sx, sw,
                                    total if total is not None else scale, k, x.stride(0), eps,
                                    RSTD=rstd is not None, PENDING=pending is not None, BLOCK=block,
                                    num_warps=num_warps)
    return Fp8Tensor(data, scale)


def check_fp8_operands(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> None:
    """InputError unless ``weight (N, K)`` is E4M3 with fp32 ``weight_scale (N,)``, ``x`` has ``K`` features
    and ``K`` and ``N`` are multiples of 16 (``torch._scaled_mm``'s alignment)."""
    if weight.dtype != E4M3 or weight.dim() != 2:
        raise InputError(f"fp8_linear takes a 2-D E4M3 weight, got {weight.dtype} {tuple(weight.shape)}")
    n, k = weight.shape
    if weight_scale.dtype != torch.float32 or weight_scale.shape != (n,):
        raise InputError(f"fp8_linear takes fp32 weight scales ({n},), one per output channel, got "
                         f"{weight_scale.dtype} {tuple(weight_scale.shape)}")
    if x.shape[-1] != k:
        raise InputError(f"x has {x.shape[-1]} features but the FP8 weight {tuple(weight.shape)} takes {k}")
    for name, size in (("in_features (K)", k), ("out_features (N)", n)):
        if size % SCALED_MM_ALIGNMENT:
            raise InputError(f"fp8_linear needs {name} to be a multiple of {SCALED_MM_ALIGNMENT} "
                             f"(torch._scaled_mm), got {size} for weight {tuple(weight.shape)}")


class ScaledProduct(NamedTuple):
    """:func:`fp8_linear` before its scaling launch, for a consumer that applies the scales itself
    (:func:`~cortexflow.kernels.qkv_rope.qkv_rope`, :func:`~cortexflow.kernels.gelu_gate.gelu_tanh_gate`): the
    output is ``round(product * row_scale[:, None] * col_scale[None, :])`` in the activations' dtype, as :func:`scale_product`
    rounds it. ``product (..., N)`` in :func:`product_dtype`; ``row_scale (rows,)`` fp32 (rows = the leading dims
    flattened), ``col_scale (N,)`` fp32; ``rstd (rows,)`` fp32 when asked for (the rows' RMSNorm statistic)."""

    product: torch.Tensor
    row_scale: torch.Tensor
    col_scale: torch.Tensor
    rstd: torch.Tensor | None = None


def fp8_product(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                rms_eps: float | None = None) -> ScaledProduct:
    """The first two launches of :func:`fp8_linear` (``x (..., K)`` quantised per row, ``torch._scaled_mm`` with
    unit scales); ``rms_eps``: the quantisation launch also computes the rows' ``rsqrt(mean(x^2) + rms_eps)``
    (``ScaledProduct.rstd``), which a folded RMSNorm's consumer needs."""
    check_fp8_operands(x, weight, weight_scale)
    x2 = _unit_stride_rows(x, weight.shape[1])
    rstd = _rstd_buffer(x2, rms_eps)
    qx = quantize_activation_rows(x2, rstd=rstd, eps=1e-6 if rms_eps is None else rms_eps)
    return _unscaled_product(qx, weight, weight_scale, x.shape, x.dtype, rstd)


def fp8_product_of_sum(pending: ScaledProduct, residual: torch.Tensor, weight: torch.Tensor,
                       weight_scale: torch.Tensor, rms_eps: float | None = None) -> tuple[torch.Tensor, ScaledProduct]:
    """``(s, fp8_product(s, weight, weight_scale, rms_eps))`` for ``s = fp8_linear(..., residual=residual)``'s
    output, from that linear's unscaled ``pending`` product: the scaling, the residual add and the row
    quantisation of ``s`` are one launch (:func:`quantize_sum_rows`), bit for bit the separate launches.
    ``residual (..., K)``; ``s`` is a new tensor of its shape and dtype."""
    check_fp8_operands(residual, weight, weight_scale)
    r2 = _unit_stride_rows(residual, weight.shape[1])
    rstd = _rstd_buffer(r2, rms_eps)
    total, qx = quantize_sum_rows(pending, r2, rstd=rstd, eps=1e-6 if rms_eps is None else rms_eps)
    return total.view(residual.shape), _unscaled_product(qx, weight, weight_scale, residual.shape, residual.dtype,
                                                         rstd)


def _unit_stride_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """``x (..., k)`` as ``(M, k)`` rows with unit column stride (a copy only when the view has none)."""
    rows = x.reshape(-1, k)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _rstd_buffer(rows: torch.Tensor, rms_eps: float | None) -> torch.Tensor | None:
    return None if rms_eps is None else torch.empty(rows.shape[0], dtype=torch.float32, device=rows.device)


def _unscaled_product(qx: Fp8Tensor, weight, weight_scale, shape, dtype, rstd) -> ScaledProduct:
    """``torch._scaled_mm`` of the E4M3 rows ``qx`` and ``weight`` with unit scales, viewed as ``(*shape[:-1], N)``."""
    w = weight if weight.is_contiguous() else weight.contiguous()
    one = _unit_scale(qx.data.device)
    product = torch._scaled_mm(qx.data, w.t(), scale_a=one, scale_b=one, out_dtype=product_dtype(dtype))
    return ScaledProduct(product.view(*shape[:-1], weight.shape[0]), qx.scale, weight_scale, rstd)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               residual: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (weight * weight_scale[:, None])ᵀ (+ residual)`` in ``x.dtype`` with both operands in E4M3:
    ``x (..., K)`` quantised per row, ``weight (N, K)`` E4M3 with fp32 per-output-channel ``weight_scale
    (N,)``; fp32 accumulation rounded to :func:`product_dtype`, then scaled and rounded to ``x.dtype`` by
    :func:`scale_product`. ``residual (..., N)``
    (``x.dtype``) is then added to the rounded product (fp32 sum, one more rounding). Returns ``(..., N)``."""
    p = fp8_product(x, weight, weight_scale)
    n = weight.shape[0]
    res = None if residual is None else residual.reshape(-1, n)
    return scale_product(p.product.view(-1, n), p.row_scale, p.col_scale, x.dtype, res).view(*x.shape[:-1], n)


def product_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of ``fp8_linear``'s unscaled product for activations of ``dtype``: fp32 for fp32, else bf16
    (bf16's range, unlike fp16's, holds any product of E4M3 values)."""
    return torch.float32 if dtype == torch.float32 else torch.bfloat16


_UNIT_SCALES: dict[torch.device, torch.Tensor] = {}


def _unit_scale(device: torch.device) -> torch.Tensor:
    """The fp32 scalar 1 on ``device`` (``_scaled_mm``'s tensor-wise scale), made once per device."""
    if device not in _UNIT_SCALES:
        _UNIT_SCALES[device] = torch.ones((), dtype=torch.float32, device=device)
    return _UNIT_SCALES[device]


@triton.jit
def _scale_product_kernel(p_ptr, sx_ptr, sw_ptr, res_ptr, out_ptr, n_cols, HAS_RES: tl.constexpr,
                          BLOCK_N: tl.constexpr):
    """Row ``program_id(0)``, columns ``program_id(1) * BLOCK_N ..``: ``out = round(p * sx[row] * sw[col])`` (then
    ``round(out + res)``)."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = cols < n_cols
    p = tl.load(p_ptr + row * n_cols + cols, mask=valid, other=0.0)
    y = p * tl.load(sx_ptr + row) * tl.load(sw_ptr + cols, mask=valid, other=0.0)
    y = round_to_dtype(y, out_ptr.dtype.element_ty)
    if HAS_RES:
        y = round_to_dtype(y.to(tl.float32) + tl.load(res_ptr + row * n_cols + cols, mask=valid, other=0.0).to(tl.float32),
                     out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * n_cols + cols, y, mask=valid)


def scale_product(product: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor, dtype: torch.dtype,
                  residual: torch.Tensor | None = None, block_n: int = 1024) -> torch.Tensor:
    """``(product * row_scale[:, None] * col_scale[None, :])`` in fp32, rounded to ``dtype`` (then ``+ residual``,
    rounded again) for a contiguous fp32 or bf16 ``product (M, N)``, ``row_scale (M,)``, ``col_scale (N,)`` and ``residual (M, N)``
    in ``dtype``; one Triton launch. Returns a new ``(M, N)`` tensor."""
    m, n = product.shape
    out = torch.empty((m, n), dtype=dtype, device=product.device)
    res = residual if residual is None or residual.is_contiguous() else residual.contiguous()
    _scale_product_kernel[(m, triton.cdiv(n, block_n))](product, row_scale, col_scale,
                                                        res if res is not None else out, out, n,
                                                        HAS_RES=res is not None, BLOCK_N=block_n, num_warps=4)
    return out


def fp8_linear_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                         residual: torch.Tensor | None = None) -> torch.Tensor:
    """What :func:`fp8_linear` computes, in PyTorch: ``x`` quantised per row with
    :func:`~cortexflow.quantization.fp8.quantize_rows`, the E4M3 values multiplied in fp32 and rounded to
    :func:`product_dtype`, times the row and channel scales in fp32 rounded to ``x.dtype``, then ``residual``
    added in fp32 and rounded again."""
    check_fp8_operands(x, weight, weight_scale)
    n, k = weight.shape
    qx = quantize_rows(x.reshape(-1, k), "x")
    product = (qx.data.float() @ weight.float().T).to(product_dtype(x.dtype)).float()
    y = (product * qx.scale[:, None] * weight_scale[None, :]).to(x.dtype)
    if residual is not None:
        y = (y.float() + residual.reshape(-1, n).float()).to(x.dtype)
    return y.view(*x.shape[:-1], n)
