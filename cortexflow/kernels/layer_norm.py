"""Row LayerNorm (SigLIP) in Triton: fp32 mean/variance, affine with weight and bias, result in ``x``'s dtype.

Optionally the row first gets a sublayer's output added to it in place (``residual``): the fused SigLIP tower
lets each GEMM (bias in its epilogue) write its own output and the next LayerNorm kernel adds it to the
residual stream ``x`` (rounded to ``x``'s dtype, written back) before normalising: the reference's
``x + linear(h)`` with its roundings, without an add kernel. Each program owns whole rows, so the in-place
update is race-free. ``residual_scale (D,)`` scales the residual per column first (DINOv2's LayerScale:
``x + scale * y`` in fp32, one rounding, as ``torch.addcmul``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cortexflow.kernels.runtime import next_power_of_two


@triton.jit
def _layer_norm_kernel(x_ptr, out_ptr, w_ptr, b_ptr, residual_ptr, residual_scale_ptr, n_cols, eps,
                       RESIDUAL: tl.constexpr, RESIDUAL_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    valid = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=valid, other=0.0).to(tl.float32)
    if RESIDUAL:
        y = tl.load(residual_ptr + row * n_cols + cols, mask=valid, other=0.0).to(tl.float32)
        if RESIDUAL_SCALE:
            y = y * tl.load(residual_scale_ptr + cols, mask=valid, other=0.0).to(tl.float32)
        x = x + y
        x = x.to(x_ptr.dtype.element_ty)
        tl.store(x_ptr + row * n_cols + cols, x, mask=valid)
        x = x.to(tl.float32)
    mean = tl.sum(x, axis=0) / n_cols
    centred = tl.where(valid, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=valid, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=valid, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, (centred * rstd * w + b).to(out_ptr.dtype.element_ty), mask=valid)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               residual: torch.Tensor | None = None, residual_scale: torch.Tensor | None = None) -> torch.Tensor:
    """LayerNorm over the last dim of ``x (..., D)``. With ``residual`` (``x``'s shape and dtype), ``x`` (which
    must then be contiguous) is first updated in place to ``x + residual`` (``x + residual_scale * residual``
    with ``residual_scale (D,)``) and that sum is normalised."""
    if residual_scale is not None and (residual is None or residual_scale.shape != (x.shape[-1],)):
        raise ValueError(f"residual_scale must be ({x.shape[-1]},) and come with a residual")
    if residual is not None:
        if not x.is_contiguous():
            raise ValueError("layer_norm with a residual updates x in place: x must be contiguous")
        if residual.shape != x.shape:
            raise ValueError(f"residual {tuple(residual.shape)} does not match x {tuple(x.shape)}")
        residual = residual.contiguous()
    x2 = x.contiguous()
    out = torch.empty_like(x2)
    n_cols = x2.shape[-1]
    _layer_norm_kernel[(x2.numel() // n_cols,)](
        x2, out, weight, bias, residual if residual is not None else x2,
        residual_scale if residual_scale is not None else weight, n_cols, eps, RESIDUAL=residual is not None,
        RESIDUAL_SCALE=residual_scale is not None, BLOCK=next_power_of_two(n_cols), num_warps=4
    )
    return out


def layer_norm_reference(x, weight, bias, eps, residual=None, residual_scale=None):
    """The same computation in PyTorch (with ``residual``: returns the normalised ``x + residual`` (times
    ``residual_scale``), rounded to ``x``'s dtype first, and leaves ``x`` untouched)."""
    if residual is not None:
        y = residual.float() if residual_scale is None else residual.float() * residual_scale.float()
        x = (x.float() + y).to(x.dtype)
    return torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps).to(x.dtype)
