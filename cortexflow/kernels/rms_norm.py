"""Row RMSNorm (Gemma) and adaptive RMSNorm (Pi0.5) in one Triton kernel.

``y = x * rsqrt(mean(x^2) + eps)``, then ``* (1 + w)`` (plain, ``w (D,)``) or ``* (1 + scale[b]) +
shift[b]`` (adaptive, ``scale/shift (B, D)`` with ``x (B, L, D)``); statistics and affine in fp32, the
result in ``x``'s dtype. One program normalises one row.

``rms_rstd`` computes only the statistics, ``rsqrt(mean(x^2) + eps)`` per row in fp32, for layers whose
norm weight is folded into the next projection's weight (the projection then runs on ``x`` itself and
its consumer multiplies each output row by its rstd).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cortexflow.kernels.pdl import launch_options, pdl_release, pdl_wait
from cortexflow.kernels.runtime import next_power_of_two


@triton.jit
def _rms_norm_kernel(
    x_ptr, out_ptr, w_ptr, scale_ptr, shift_ptr,
    n_cols, rows_per_batch, eps,
    HAS_WEIGHT: tl.constexpr, ADAPTIVE: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    pdl_release(PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    valid = cols < n_cols
    if HAS_WEIGHT:  # a weight: no kernel writes it, so it may load before the wait
        w = tl.load(w_ptr + cols, mask=valid, other=0.0).to(tl.float32)
    pdl_wait(PDL)
    x = tl.load(x_ptr + row * n_cols + cols, mask=valid, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    y = x * rstd
    if HAS_WEIGHT:
        y = y * (1.0 + w)
    if ADAPTIVE:
        batch = row // rows_per_batch
        scale = tl.load(scale_ptr + batch * n_cols + cols, mask=valid, other=0.0).to(tl.float32)
        shift = tl.load(shift_ptr + batch * n_cols + cols, mask=valid, other=0.0).to(tl.float32)
        y = y * (1.0 + scale) + shift
    tl.store(out_ptr + row * n_cols + cols, y.to(out_ptr.dtype.element_ty), mask=valid)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """RMSNorm of ``x (..., D)`` (plain with ``weight``, adaptive with ``scale``/``shift`` ``(B, D)`` for ``x (B, L, D)``).
    ``pdl``: launch with programmatic dependent launch (:mod:`cortexflow.kernels.pdl`)."""
    adaptive = scale is not None
    x2 = x.contiguous()
    out = torch.empty_like(x2)
    n_cols = x2.shape[-1]
    rows = x2.numel() // n_cols
    rows_per_batch = x2.shape[1] if adaptive else 1
    dummy = x2
    _rms_norm_kernel[(rows,)](
        x2, out,
        weight if weight is not None else dummy,
        scale.contiguous() if adaptive else dummy,
        shift.contiguous() if adaptive else dummy,
        n_cols, rows_per_batch, eps,
        HAS_WEIGHT=weight is not None, ADAPTIVE=adaptive, BLOCK=next_power_of_two(n_cols), PDL=pdl,
        num_warps=4 if n_cols <= 1024 else 8, **launch_options(pdl),
    )
    return out


def folded_norm_mode(rstd: torch.Tensor | None, norm_input: torch.Tensor | None, rows: int) -> tuple[int, int]:
    """Check a folded-norm consumer's arguments for ``rows`` rows and return ``(mode, norm_cols)``: mode 0
    without scaling, 1 with the ``rstd (rows,)`` tensor, 2 recomputing each row's rstd from
    ``norm_input`` (``rows`` contiguous rows of ``norm_cols`` values; ``norm_cols`` is 1 otherwise)."""
    if rstd is not None and norm_input is not None:
        raise ValueError("pass rstd or norm_input, not both")
    if rstd is not None:
        if rstd.numel() != rows:
            raise ValueError(f"rstd has {rstd.numel()} values for {rows} rows")
        return 1, 1
    if norm_input is not None:
        norm_cols = norm_input.shape[-1]
        if norm_input.numel() != rows * norm_cols or not norm_input.is_contiguous():
            raise ValueError(f"norm_input {tuple(norm_input.shape)} is not {rows} contiguous rows")
        return 2, norm_cols
    return 0, 1


@triton.jit
def row_rstd(x_ptr, row, n_cols, eps, BLOCK: tl.constexpr):
    """``rsqrt(mean(x[row]^2) + eps)`` in fp32 for a row-major ``(rows, n_cols)`` tensor, read in
    ``BLOCK``-wide chunks (one pass when ``BLOCK >= n_cols``). Shared by the folded-norm consumers."""
    squares = tl.zeros([BLOCK], tl.float32)
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * n_cols + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        squares += x * x
    return 1.0 / tl.sqrt(tl.sum(squares, axis=0) / n_cols + eps)


@triton.jit
def _rms_rstd_kernel(x_ptr, rstd_ptr, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    tl.store(rstd_ptr + row, row_rstd(x_ptr, row, n_cols, eps, BLOCK))


def rms_rstd(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``rsqrt(mean(x^2) + eps)`` of every row of ``x (..., D)`` in fp32, shape ``(rows,)`` (rows = all
    leading dims flattened)."""
    x2 = x.contiguous()
    n_cols = x2.shape[-1]
    rows = x2.numel() // n_cols
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    _rms_rstd_kernel[(rows,)](x2, rstd, n_cols, eps, BLOCK=next_power_of_two(n_cols),
                              num_warps=4 if n_cols <= 1024 else 8)
    return rstd


def rms_rstd_reference(x, eps):
    """The same statistics in PyTorch: ``(rows,)`` fp32."""
    xf = x.float().reshape(-1, x.shape[-1])
    return torch.rsqrt(xf.pow(2).mean(-1) + eps)


def rms_norm_reference(x, weight, eps, scale=None, shift=None):
    """The same computation in PyTorch (fp32 statistics, result in ``x.dtype``)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * (1.0 + weight.float())
    if scale is not None:
        y = y * (1.0 + scale.float()[:, None, :]) + shift.float()[:, None, :]
    return y.to(x.dtype)
