"""``out = epilogue(a @ wᵀ)`` in Triton for the vision tower's small-M GEMMs (a few hundred token rows), optionally
split over K ranges.

Layouts: ``a (M, K)``, ``w (N, K)`` (a linear layer's weight), both row-major and contiguous; ``out (M, N)`` in ``a``'s
dtype. Epilogues: the bias ``(N,)`` added to the fp32 sum, then optionally tanh-GELU; or the product added into
``out`` itself (``residual``: ``out += a @ wᵀ``). With ``splits > 1`` each (tile, K range) program stores its fp32 sum
in a ``(splits, M, N)`` workspace and a second kernel adds the ranges in order (deterministic), applies the epilogue
and rounds once. ``descriptors``: the tiles are loaded through tensor descriptors (TMA on Hopper; row strides must be
16-byte multiples) instead of pointer arithmetic.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from cortexflow.kernels.gelu_gate import _gelu_tanh
from cortexflow.kernels.runtime import upcast_dots

#: Epilogue codes of the kernels.
EPILOGUE_NONE, EPILOGUE_BIAS, EPILOGUE_BIAS_GELU, EPILOGUE_RESIDUAL = 0, 1, 2, 3


@dataclass(frozen=True)
class GemmTiling:
    """``block_m x block_n`` output tiles, ``block_k`` the K step, ``splits`` K ranges (each a whole number of K
    steps), ``group_m`` row tiles a program group walks before the next column tile (L2 reuse of the weights),
    ``descriptors`` (tensor-descriptor loads), ``num_warps`` / ``num_stages`` the launch's."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    splits: int = 1
    group_m: int = 8
    descriptors: bool = False
    num_warps: int = 8
    num_stages: int = 3


@triton.jit
def _gemm_kernel(a_ptr, w_ptr, bias_ptr, out_ptr, part_ptr, M, N, K, k_per_split, EPILOGUE,
                 SPLIT: tl.constexpr, DESCRIPTORS: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """One ``(BLOCK_M, BLOCK_N)`` tile (program axis 0, grouped order) over one K range (axis 1): with ``SPLIT`` the
    fp32 sum is stored in ``part[range]``, else the epilogue is applied and the tile stored in ``out``'s dtype."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * n_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    k0 = split * k_per_split
    k1 = tl.minimum(k0 + k_per_split, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if DESCRIPTORS:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
        for k in tl.range(k0, k1, BLOCK_K):  # the last range's step past K reads zeros
            a = a_desc.load([pid_m * BLOCK_M, k])
            w = w_desc.load([pid_n * BLOCK_N, k]).T
            if UPCAST:
                a, w = a.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(a, w, acc)
    else:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        for k in tl.range(k0, k1, BLOCK_K):
            ks = k + offs_k
            a = tl.load(a_ptr + offs_m[:, None] * K + ks[None, :], mask=(offs_m < M)[:, None] & (ks < k1)[None, :],
                        other=0.0)
            w = tl.load(w_ptr + offs_n[None, :] * K + ks[:, None], mask=(offs_n < N)[None, :] & (ks < k1)[:, None],
                        other=0.0)
            if UPCAST:
                a, w = a.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(a, w, acc)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = (rows < M)[:, None] & (cols < N)[None, :]
    if SPLIT:
        tl.store(part_ptr + (split * M + rows[:, None]) * N + cols[None, :], acc, mask=valid)
    else:
        _epilogue(acc, rows, cols, valid, bias_ptr, out_ptr, N, EPILOGUE)


@triton.jit
def _epilogue(acc, rows, cols, valid, bias_ptr, out_ptr, N, EPILOGUE):
    """Store ``epilogue(acc)`` (fp32 ``(rows, cols)``) into ``out`` (row-major, ``N`` columns), rounded once."""
    ptrs = out_ptr + rows[:, None] * N + cols[None, :]
    if (EPILOGUE == 1) | (EPILOGUE == 2):
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if EPILOGUE == 2:
        acc = _gelu_tanh(acc)
    if EPILOGUE == 3:
        acc += tl.load(ptrs, mask=valid, other=0.0).to(tl.float32)
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _sum_ranges_kernel(part_ptr, bias_ptr, out_ptr, M, N, splits, EPILOGUE, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    """``out = epilogue(Σ_s part[s])`` over one ``(BLOCK_M, BLOCK_N)`` tile, the K ranges added in order."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = (rows < M)[:, None] & (cols < N)[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for s in range(0, splits):
        acc += tl.load(part_ptr + (s * M + rows[:, None]) * N + cols[None, :], mask=valid, other=0.0)
    _epilogue(acc, rows, cols, valid, bias_ptr, out_ptr, N, EPILOGUE)


def k_ranges(k: int, tiling: GemmTiling) -> tuple[int, int]:
    """``(k_per_split, splits)``: the K range of each program (whole K steps) and how many ranges there are (no
    empty one)."""
    per = triton.cdiv(triton.cdiv(k, tiling.splits), tiling.block_k) * tiling.block_k
    return per, triton.cdiv(k, per)


def workspace_shape(m: int, n: int, k: int, tiling: GemmTiling) -> tuple[int, int, int] | None:
    """The fp32 workspace :func:`gemm` needs for ``(M, N, K)`` under ``tiling`` (None: no split)."""
    splits = k_ranges(k, tiling)[1]
    return (splits, m, n) if splits > 1 else None


def gemm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, tiling: GemmTiling, bias: torch.Tensor | None = None,
         gelu: bool = False, residual: bool = False, workspace: torch.Tensor | None = None) -> torch.Tensor:
    """``out = a @ wᵀ (+ bias) (then tanh-GELU)``, or with ``residual`` ``out += a @ wᵀ``; returns ``out``. ``workspace``:
    fp32 of at least :func:`workspace_shape` elements when ``tiling`` splits K (allocated here when None)."""
    m, k = a.shape
    n = w.shape[0]
    if w.shape[1] != k or out.shape != (m, n):
        raise ValueError(f"gemm: a {tuple(a.shape)}, w {tuple(w.shape)}, out {tuple(out.shape)} do not match")
    if not (a.is_contiguous() and w.is_contiguous() and out.is_contiguous()):
        raise ValueError("gemm reads a, w and writes out as contiguous row-major tensors; pass .contiguous() ones")
    if residual and (bias is not None or gelu):
        raise ValueError("gemm: residual=True adds the product into out; it takes no bias or GELU")
    if gelu and bias is None:
        raise ValueError("gemm: gelu=True is applied after the bias; pass bias")
    if residual:
        epilogue = EPILOGUE_RESIDUAL
    elif bias is None:
        epilogue = EPILOGUE_NONE
    else:
        epilogue = EPILOGUE_BIAS_GELU if gelu else EPILOGUE_BIAS
    t = tiling
    per, splits = k_ranges(k, t)
    part = out
    shape = workspace_shape(m, n, k, t)
    if shape is not None:
        size = shape[0] * shape[1] * shape[2]
        part = workspace if workspace is not None else torch.empty(size, dtype=torch.float32, device=a.device)
        if part.dtype != torch.float32 or part.numel() < size:
            raise ValueError(f"gemm: the workspace needs {size} fp32 elements, got {part.numel()} {part.dtype}")
    if t.descriptors:
        _use_torch_allocator()
    bias_arg = bias if bias is not None else out
    grid = (triton.cdiv(m, t.block_m) * triton.cdiv(n, t.block_n), splits)
    _gemm_kernel[grid](a, w, bias_arg, out, part, m, n, k, per, epilogue, SPLIT=splits > 1,
                       DESCRIPTORS=t.descriptors, UPCAST=upcast_dots(a.dtype), BLOCK_M=t.block_m,
                       BLOCK_N=t.block_n, BLOCK_K=t.block_k, GROUP_M=t.group_m, num_warps=t.num_warps,
                       num_stages=t.num_stages)
    if splits > 1:
        _sum_ranges_kernel[(triton.cdiv(m, 32), triton.cdiv(n, 128))](part, bias_arg, out, m, n, splits, epilogue,
                                                                      BLOCK_M=32, BLOCK_N=128, num_warps=4)
    return out


@functools.cache
def _use_torch_allocator() -> None:
    """Device-side tensor descriptors need global scratch: Triton takes it from the allocator set here, once per
    process (torch's caching allocator on the current CUDA device, or host memory under the interpreter)."""
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda")
                         if torch.cuda.is_available() else torch.empty(size, dtype=torch.int8))


def gemm_reference(a, w, bias=None, gelu=False, residual=None) -> torch.Tensor:
    """The same in PyTorch: fp32 sums, one rounding to ``a``'s dtype (``residual``: the tensor added to)."""
    y = a.float() @ w.float().T
    if residual is not None:
        return (residual.float() + y).to(a.dtype)
    if bias is not None:
        y = y + bias.float()
    if gelu:
        y = torch.nn.functional.gelu(y, approximate="tanh")
    return y.to(a.dtype)
