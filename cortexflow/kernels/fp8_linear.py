"""Weight-only FP8 linear (Triton): ``y = x @ dequant(W)ᵀ (+ bias)`` with ``W`` in E4M3 and per-output scales.

For the memory-bound GEMMs (the flow-matching expert's ~51 rows per call, decode GEMVs) the time is the weight
stream; E4M3 halves its bytes against bf16. The E4M3 values are converted to ``x``'s dtype inside the kernel
(exact: every E4M3 value is a bf16 / fp16 value), multiplied on tensor cores with fp32 accumulation, and the
per-output-channel scale is applied once per output in the epilogue (it factors out of the sum over K).

Layout: ``x (M, K)`` row-major; ``W.data (N, K)`` E4M3 row-major, ``W.scale (N,)`` fp32; output ``(M, N)`` in
``x.dtype``. Programs tile ``(BLOCK_M, BLOCK_N)`` outputs; with ``split_k > 1`` each of ``split_k`` programs per
tile sums one K range and adds its scaled fp32 partial into an fp32 buffer (atomics: the order of the partial
sums is not fixed), which is then rounded to ``x.dtype`` with the bias. Reference:
:func:`cortexflow.quantization.fp8.weight_only_linear_reference`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from cortexflow.errors import InputError
from cortexflow.kernels.runtime import upcast_dots
from cortexflow.quantization.fp8 import Fp8Tensor, _check_linear


@dataclass(frozen=True)
class Fp8Tiling:
    """Output tile ``block_m x block_n``, K chunk ``block_k``, K ranges per tile ``split_k``, ``warps``."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    warps: int = 4


@triton.jit
def _fp8_linear_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, M, N, K, k_range,
                       HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, UPCAST: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One ``(BLOCK_M, BLOCK_N)`` tile over K range ``program_id(2)`` (``k_range`` columns, a multiple of
    BLOCK_K): fp32 sum of ``x[rows, ks] @ W[cols, ks]ᵀ``, times ``scale[cols]``; stored (+ bias, rounded to
    ``out``'s dtype), or added into the fp32 ``out`` with ``ATOMIC``."""
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    k_start = tl.program_id(2) * k_range
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_start, tl.minimum(k_start + k_range, K), BLOCK_K):
        ks = k0 + offs_k
        k_ok = ks < K
        a = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[None, :] * K + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if UPCAST:
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w.to(a.dtype), acc)
    acc = acc * tl.load(scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
    out_offs = rows[:, None] * N + cols[None, :]
    out_ok = row_ok[:, None] & col_ok[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptr + out_offs, acc, mask=out_ok)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_ok)


def fp8_linear(x: torch.Tensor, weight: Fp8Tensor, bias: torch.Tensor | None = None,
               tiling: Fp8Tiling | None = None) -> torch.Tensor:
    """``x @ dequant(weight)ᵀ + bias`` in ``x.dtype``: ``x (..., K)`` (fp32, fp16 or bf16), ``weight (N, K)``
    E4M3 with per-output scales; returns ``(..., N)``."""
    _check_linear(x, weight)
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise InputError(f"fp8_linear takes fp32, fp16 or bf16 activations, got {x.dtype}")
    t = tiling or Fp8Tiling()
    n, k = weight.shape
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    data = weight.data.contiguous()
    k_range = triton.cdiv(triton.cdiv(k, t.split_k), t.block_k) * t.block_k
    splits = triton.cdiv(k, k_range)
    atomic = splits > 1
    out = (torch.zeros if atomic else torch.empty)((m, n), dtype=torch.float32 if atomic else x.dtype, device=x.device)
    grid = (triton.cdiv(n, t.block_n), triton.cdiv(m, t.block_m), splits)
    _fp8_linear_kernel[grid](
        x2, data, weight.scale, bias if bias is not None else weight.scale, out, m, n, k, k_range,
        HAS_BIAS=bias is not None and not atomic, ATOMIC=atomic, UPCAST=upcast_dots(x.dtype) or x.dtype == torch.float32,
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, num_warps=t.warps,
    )
    if atomic:
        if bias is not None:
            out += bias.float()
        out = out.to(x.dtype)
    return out.reshape(*x.shape[:-1], n)
