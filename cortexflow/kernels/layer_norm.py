"""Row LayerNorm (SigLIP) in Triton: fp32 mean/variance, affine with weight and bias, result in ``x``'s dtype."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cortexflow.kernels.runtime import next_power_of_two


@triton.jit
def _layer_norm_kernel(x_ptr, out_ptr, w_ptr, b_ptr, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    valid = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=valid, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / n_cols
    centred = tl.where(valid, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=valid, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=valid, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, (centred * rstd * w + b).to(out_ptr.dtype.element_ty), mask=valid)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim of ``x (..., D)``."""
    x2 = x.contiguous()
    out = torch.empty_like(x2)
    n_cols = x2.shape[-1]
    _layer_norm_kernel[(x2.numel() // n_cols,)](
        x2, out, weight, bias, n_cols, eps, BLOCK=next_power_of_two(n_cols), num_warps=4
    )
    return out


def layer_norm_reference(x, weight, bias, eps):
    """The same computation in PyTorch."""
    return torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps).to(x.dtype)
