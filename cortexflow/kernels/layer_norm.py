"""Row LayerNorm (SigLIP) in Triton: fp32 mean/variance, affine with weight and bias, result in ``x``'s dtype.

Optionally the row first gets a pending bias added to it in place (``residual_bias``): the fused SigLIP tower
accumulates each sublayer's output into the residual stream with an in-place GEMM (``x += a @ Wᵀ``, no
copy) and leaves that GEMM's bias for the next LayerNorm, which adds it to ``x`` (rounded to ``x``'s dtype,
written back) before normalising. Each program owns whole rows, so the in-place update is race-free.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cortexflow.kernels.runtime import next_power_of_two


@triton.jit
def _layer_norm_kernel(x_ptr, out_ptr, w_ptr, b_ptr, res_bias_ptr, n_cols, eps,
                       RESIDUAL_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    valid = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=valid, other=0.0).to(tl.float32)
    if RESIDUAL_BIAS:
        x = x + tl.load(res_bias_ptr + cols, mask=valid, other=0.0).to(tl.float32)
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
               residual_bias: torch.Tensor | None = None) -> torch.Tensor:
    """LayerNorm over the last dim of ``x (..., D)``. With ``residual_bias (D,)``, ``x`` (which must then be
    contiguous) is first updated in place to ``x + residual_bias`` and that sum is normalised."""
    if residual_bias is not None and not x.is_contiguous():
        raise ValueError("layer_norm with residual_bias updates x in place: x must be contiguous")
    x2 = x.contiguous()
    out = torch.empty_like(x2)
    n_cols = x2.shape[-1]
    _layer_norm_kernel[(x2.numel() // n_cols,)](
        x2, out, weight, bias, residual_bias if residual_bias is not None else bias, n_cols, eps,
        RESIDUAL_BIAS=residual_bias is not None, BLOCK=next_power_of_two(n_cols), num_warps=4
    )
    return out


def layer_norm_reference(x, weight, bias, eps, residual_bias=None):
    """The same computation in PyTorch (with ``residual_bias``: returns the normalised ``x + residual_bias``
    and leaves ``x`` untouched)."""
    if residual_bias is not None:
        x = (x.float() + residual_bias.float()).to(x.dtype)
    return torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps).to(x.dtype)
