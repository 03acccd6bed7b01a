"""Pi0's time-conditioned action MLP of one denoising step as one Triton kernel, in fp32 as the reference.

``tokens = silu(x_t @ W_inᵀ + b_in) @ W_outᵀ + b_out``, where ``x_t (M, A)`` are the ``M = B*H`` noisy actions
(fp32), ``W_in (D, A)`` / ``b_in (D,)`` the action half of ``action_time_mlp_in`` folded with ``action_in_proj``
and the time half's per-step bias (see ``backends/triton_decoder.build_time_tables``), ``W_out (D, D)`` /
``b_out (D,)`` ``action_time_mlp_out`` in fp32. The result is written, cast to the output's dtype, into the
expert's token buffer ``out (B, S, D)`` at rows ``row_offset .. row_offset + H - 1`` of each batch entry (Pi0:
row 0 is the state token, so 1).

One program computes a ``BLOCK_M x BLOCK_N`` tile of the output: it walks the hidden width in ``BLOCK_K``
steps, recomputing its rows' hidden slice (K = A, tiny) and multiplying it into the tile, so the hidden
activations never reach memory. All products are fp32 FMA (``input_precision="ieee"``): what cuBLAS's fp32
GEMMs compute, in one launch instead of two GEMMs, their epilogue kernels and a SiLU kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cortexflow.kernels.runtime import next_power_of_two


@triton.jit
def _action_mlp_kernel(x_ptr, w_in_ptr, b_in_ptr, w_out_ptr, b_out_ptr, out_ptr, M, A, D, H, row_offset,
                       s_out_b, s_out_t, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCK_A: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_a = tl.arange(0, BLOCK_A)
    offs_k = tl.arange(0, BLOCK_K)
    row_valid = rows < M
    col_valid = cols < D
    x = tl.load(x_ptr + rows[:, None] * A + offs_a[None, :], mask=row_valid[:, None] & (offs_a < A)[None, :],
                other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + offs_k
        k_valid = ks < D
        w_in = tl.load(w_in_ptr + ks[None, :] * A + offs_a[:, None], mask=(offs_a < A)[:, None] & k_valid[None, :],
                       other=0.0)  # (BLOCK_A, BLOCK_K) = W_in[ks, :]ᵀ
        hidden = tl.dot(x, w_in, input_precision="ieee") + tl.load(b_in_ptr + ks, mask=k_valid, other=0.0)[None, :]
        hidden = hidden / (1.0 + tl.exp(-hidden))  # SiLU; columns past D are 0 and meet 0 weights below
        w_out = tl.load(w_out_ptr + cols[None, :] * D + ks[:, None], mask=k_valid[:, None] & col_valid[None, :],
                        other=0.0)  # (BLOCK_K, BLOCK_N) = W_out[cols, ks]ᵀ
        acc += tl.dot(hidden, w_out, input_precision="ieee")
    acc += tl.load(b_out_ptr + cols, mask=col_valid, other=0.0)[None, :]
    batch = rows // H
    token = rows % H + row_offset
    dst = out_ptr + batch[:, None] * s_out_b + token[:, None] * s_out_t + cols[None, :]
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & col_valid[None, :])


def action_mlp(x_t: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor, w_out: torch.Tensor, b_out: torch.Tensor,
               out: torch.Tensor, row_offset: int = 1, block_m: int = 16, block_n: int = 32,
               block_k: int = 64) -> torch.Tensor:
    """Write ``silu(x_t @ w_inᵀ + b_in) @ w_outᵀ + b_out`` for ``x_t (B, H, A)`` fp32 into ``out[:, row_offset:
    row_offset + H]`` (``out (B, S, D)``, last dim contiguous, any dtype); every weight fp32 and contiguous.
    Returns ``out``."""
    b, h, a = x_t.shape
    d = w_in.shape[0]
    if w_in.shape != (d, a) or w_out.shape != (d, d) or b_in.shape != (d,) or b_out.shape != (d,):
        raise ValueError(f"action_mlp: weights {tuple(w_in.shape)}, {tuple(w_out.shape)} do not fit x_t {tuple(x_t.shape)}")
    if out.shape[0] != b or out.shape[2] != d or out.shape[1] < row_offset + h or out.stride(-1) != 1:
        raise ValueError(f"action_mlp: out {tuple(out.shape)} cannot take rows {row_offset}..{row_offset + h - 1} of width {d}")
    if any(t.dtype != torch.float32 or not t.is_contiguous() for t in (x_t, w_in, b_in, w_out, b_out)):
        raise ValueError("action_mlp: x_t and the weights must be contiguous fp32 tensors")
    m = b * h
    grid = (triton.cdiv(m, block_m), triton.cdiv(d, block_n))
    _action_mlp_kernel[grid](x_t, w_in, b_in, w_out, b_out, out, m, a, d, h, row_offset, out.stride(0), out.stride(1),
                             BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_A=max(16, next_power_of_two(a)),
                             num_warps=4)
    return out


def action_mlp_reference(x_t, w_in, b_in, w_out, b_out):
    """The same computation in PyTorch (fp32): ``(B, H, D)``."""
    hidden = torch.nn.functional.silu(torch.nn.functional.linear(x_t.float(), w_in.float(), b_in.float()))
    return torch.nn.functional.linear(hidden, w_out.float(), b_out.float())
