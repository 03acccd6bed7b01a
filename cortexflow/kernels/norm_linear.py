"""RMSNorm folded into the following linear, for the skinny GEMMs of the denoising step, in Triton.

``out = rstd ⊙ ((x ⊙ s) @ Wᵀ) + bias`` with ``rstd[m] = rsqrt(mean_k x[m, k]² + eps)``: the normalisation
is a per-row scalar, so it can be applied after the product, and the norm's per-column factor ``s`` (Gemma's
``1 + w``, or Pi0.5's ``1 + scale_t``) multiplies ``x`` while it is loaded. The adaptive norm's shift
becomes ``bias = shift_t @ Wᵀ`` (precomputed per step). Without ``eps`` (``norm=False``) it is a plain
``x @ Wᵀ + bias``. The normalised activations are never written to memory and the norm costs no launch.

Layouts: ``x (M, K)`` (rows may be strided, the last dim contiguous), ``weight (N, K)`` (nn.Linear's),
``col_scale (K,)`` fp32, ``bias (N,)``; output ``(M, N)`` in ``x``'s dtype. The sum of squares and the
accumulator are fp32; ``x ⊙ s`` is rounded to the weight's dtype before the product, as the reference
rounds the normalised activations. One program computes a ``BLOCK_M x BLOCK_N`` tile over all of ``K``:
with M ≈ 51 (one chunk) the grid is the N blocks, sized so that it fills the GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cortexflow.kernels.runtime import interpreting, processor_count, upcast_dots


@triton.jit
def _norm_linear_kernel(
    x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr,
    m_size, n_size, k_size, eps, sxm, swn, som,
    NORM: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_valid = offs_m < m_size
    n_valid = offs_n < n_size
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    sum_sq = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(0, k_size, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_valid = offs_k < k_size
        x = tl.load(x_ptr + offs_m[:, None] * sxm + offs_k[None, :], mask=m_valid[:, None] & k_valid[None, :], other=0.0)
        w = tl.load(w_ptr + offs_n[None, :] * swn + offs_k[:, None], mask=n_valid[None, :] & k_valid[:, None], other=0.0)
        xf = x.to(tl.float32)
        if NORM:
            sum_sq += tl.sum(xf * xf, axis=1)
        if HAS_SCALE:
            xf = xf * tl.load(scale_ptr + offs_k, mask=k_valid, other=0.0)[None, :]
        a = xf.to(w.dtype)
        if UPCAST:
            acc += tl.dot(a.to(tl.float32), w.to(tl.float32))
        else:
            acc += tl.dot(a, w, input_precision=DOT_PRECISION)
    if NORM:
        acc = acc * (1.0 / tl.sqrt(sum_sq / k_size + eps))[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_valid, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * som + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_valid[:, None] & n_valid[None, :])


def choose_block_n(n_size: int, m_blocks: int, processors: int) -> int:
    """The widest N tile (64, 32 or 16) that still gives at least one program per SM."""
    for block_n in (64, 32):
        if triton.cdiv(n_size, block_n) * m_blocks >= processors:
            return block_n
    return 16


def norm_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float | None,
    col_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """``rmsnorm(x) ⊙ col_scale @ weightᵀ + bias`` for ``x (..., K)`` (``eps=None``: no normalisation)."""
    lead = x.shape[:-1]
    k_size = x.shape[-1]
    x2 = x.reshape(-1, k_size)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    m_size, n_size = x2.shape[0], weight.shape[0]
    out = torch.empty((m_size, n_size), dtype=x.dtype, device=x.device)
    block_m = 64 if m_size > 32 else 32 if m_size > 16 else 16
    m_blocks = triton.cdiv(m_size, block_m)
    if block_n is None:
        block_n = 32 if interpreting() else choose_block_n(n_size, m_blocks, processor_count(x.device))
    grid = (triton.cdiv(n_size, block_n), m_blocks)
    _norm_linear_kernel[grid](
        x2, weight, col_scale if col_scale is not None else x2, bias if bias is not None else x2, out,
        m_size, n_size, k_size, 0.0 if eps is None else eps, x2.stride(0), weight.stride(0), out.stride(0),
        NORM=eps is not None, HAS_SCALE=col_scale is not None, HAS_BIAS=bias is not None,
        UPCAST=upcast_dots(weight.dtype), DOT_PRECISION="ieee" if weight.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=128,
        num_warps=4, num_stages=3,
    )
    return out.view(*lead, n_size)


def norm_linear_reference(x, weight, eps, col_scale=None, bias=None):
    """The unfused computation: fp32 RMSNorm statistics, ``⊙ col_scale``, rounded to ``weight``'s dtype, then ``F.linear``."""
    xf = x.float()
    if eps is not None:
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if col_scale is not None:
        xf = xf * col_scale.float()
    out = torch.nn.functional.linear(xf.to(weight.dtype).float(), weight.float(), None if bias is None else bias.float())
    return out.to(x.dtype)
