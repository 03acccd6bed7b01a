"""Split-K GEMMs for the few-row activations of the denoising steps, with their epilogues, in Triton.

``y = x @ Wᵀ`` for ``x (M, K)`` with small ``M`` (Pi0's 51 suffix tokens) and a weight in torch's
``(N, K)`` Linear layout, fp32 accumulation. Epilogues, applied once per output tile:
- ``skinny_linear``: ``+ bias``, ``+ residual`` (``residual (M, N)``), output in ``x``'s dtype;
- ``skinny_gelu_gate``: the fused gate/up projection — ``weight (2F, K)`` holds ``[W_gate; W_up]``, each
  program computes both halves of its column tile and writes ``gelu_tanh(gate) * up (M, F)``, so the
  ``(M, 2F)`` intermediate never reaches memory;
- ``skinny_euler_``: the flow-matching update in place on the fp32 state, ``state += dt * (x @ Wᵀ + b)``.

Work split: with few rows there are few output tiles, so the K range is split (``num_splits``) to give
every SM a program. Each range writes its fp32 partial tile to a workspace ``(splits, planes, M, N)``
and bumps its tile's arrival counter (:func:`~cortexflow.kernels.runtime.arrival_counters`); the last
range to arrive adds the partials in split order (deterministic whatever the arrival order), applies the
epilogue and resets the counter. One launch, where cuBLAS's split-K uses a GEMM plus a reduce kernel and
the epilogues are further kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cortexflow.kernels.gelu_gate import _gelu_tanh
from cortexflow.kernels.pdl import launch_options, pdl_release, pdl_wait
from cortexflow.kernels.runtime import arrival_counters, interpreting, processor_count, upcast_dots

LINEAR, GELU_GATE, EULER = 0, 1, 2
BLOCK_N = 64
BLOCK_K = 64
#: A K range holds at least this many K blocks.
MIN_BLOCKS_PER_SPLIT = 2


@triton.jit
def _epilogue(acc, acc_up, offs_m, offs_n, mask, bias_ptr, res_ptr, out_ptr, half_n, dt, srm, som,
              EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr):
    n_valid = offs_n < half_n
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_valid, other=0.0).to(tl.float32)[None, :]
        if EPILOGUE == 1:
            acc_up += tl.load(bias_ptr + half_n + offs_n, mask=n_valid, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * som + offs_n[None, :]
    if EPILOGUE == 1:
        y = _gelu_tanh(acc) * acc_up
    elif EPILOGUE == 2:
        y = tl.load(out_ptrs, mask=mask, other=0.0) + dt * acc
    else:
        y = acc
        if HAS_RES:
            y += tl.load(res_ptr + offs_m[:, None] * srm + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _skinny_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, res_ptr, out_ptr, work_ptr, counter_ptr,
    m_size, half_n, k_size, k_per_split, dt, sxm, swn, srm, som,
    EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, SPLIT: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):
    pdl_release(PDL)
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_valid = offs_m < m_size
    n_valid = offs_n < half_n
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, k_size)
    # The first weight tile does not depend on the previous kernel: with PDL it loads while that runs
    # (every range holds at least one K block).
    ks = k_start + offs_k
    k_valid = ks < k_end
    w_mask = k_valid[:, None] & n_valid[None, :]
    w = tl.load(w_ptr + offs_n[None, :] * swn + ks[:, None], mask=w_mask, other=0.0)
    if EPILOGUE == 1:
        w_up = tl.load(w_ptr + (half_n + offs_n)[None, :] * swn + ks[:, None], mask=w_mask, other=0.0)
    pdl_wait(PDL)
    a = tl.load(x_ptr + offs_m[:, None] * sxm + ks[None, :], mask=m_valid[:, None] & k_valid[None, :], other=0.0)
    if UPCAST:
        a = a.to(tl.float32)
        w = w.to(tl.float32)
    acc = tl.dot(a, w, input_precision=DOT_PRECISION)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if EPILOGUE == 1:
        if UPCAST:
            w_up = w_up.to(tl.float32)
        acc_up = tl.dot(a, w_up, input_precision=DOT_PRECISION)
    for k0 in range(k_start + BLOCK_K, k_end, BLOCK_K):
        ks = k0 + offs_k
        k_valid = ks < k_end
        a = tl.load(x_ptr + offs_m[:, None] * sxm + ks[None, :], mask=m_valid[:, None] & k_valid[None, :], other=0.0)
        w_mask = k_valid[:, None] & n_valid[None, :]
        w = tl.load(w_ptr + offs_n[None, :] * swn + ks[:, None], mask=w_mask, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc += tl.dot(a, w, input_precision=DOT_PRECISION)
        if EPILOGUE == 1:
            w_up = tl.load(w_ptr + (half_n + offs_n)[None, :] * swn + ks[:, None], mask=w_mask, other=0.0)
            if UPCAST:
                w_up = w_up.to(tl.float32)
            acc_up += tl.dot(a, w_up, input_precision=DOT_PRECISION)
    mask = m_valid[:, None] & n_valid[None, :]
    if SPLIT:
        # Workspace (split, plane, M, N) fp32; plane 1 holds the up half of a gate/up GEMM.
        planes = 2 if EPILOGUE == 1 else 1
        plane_size = m_size * half_n
        tile = offs_m[:, None] * half_n + offs_n[None, :]
        tl.store(work_ptr + split * planes * plane_size + tile, acc, mask=mask)
        if EPILOGUE == 1:
            tl.store(work_ptr + (split * planes + 1) * plane_size + tile, acc_up, mask=mask)
        # Every thread's partial is written before the (release) arrival; the last range to arrive
        # (acquire) sums all ranges in split order, finishes the tile and zeroes the counter.
        tl.debug_barrier()
        counter = counter_ptr + pid_m * tl.num_programs(0) + pid_n
        arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if arrived == tl.num_programs(2) - 1:
            tl.debug_barrier()
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for s in range(0, tl.num_programs(2)):
                acc += tl.load(work_ptr + s * planes * plane_size + tile, mask=mask, other=0.0, cache_modifier=".cg")
                if EPILOGUE == 1:
                    acc_up += tl.load(work_ptr + (s * planes + 1) * plane_size + tile, mask=mask, other=0.0,
                                      cache_modifier=".cg")
            _epilogue(acc, acc_up, offs_m, offs_n, mask, bias_ptr, res_ptr, out_ptr, half_n, dt, srm, som,
                      EPILOGUE, HAS_BIAS, HAS_RES)
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")
    else:
        _epilogue(acc, acc_up, offs_m, offs_n, mask, bias_ptr, res_ptr, out_ptr, half_n, dt, srm, som,
                  EPILOGUE, HAS_BIAS, HAS_RES)


def choose_k_splits(tiles: int, k_size: int, processors: int) -> int:
    """K ranges per output tile: enough programs for one wave on ``processors`` SMs when the tiles alone
    fill less than half of it, each range >= 2 K blocks."""
    if 2 * tiles >= processors:
        return 1
    most = max(1, k_size // (BLOCK_K * MIN_BLOCKS_PER_SPLIT))
    return max(1, min(triton.cdiv(processors, tiles), most))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t (..., C)`` as a 2-D ``(R, C)`` view with unit column stride (a copy only when it must)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _launch(x, weight, out, epilogue, bias=None, residual=None, dt=0.0, num_splits=None, pdl=False):
    """Run the kernel for ``x2 (M, K)``, ``weight (planes * N, K)``, ``out (M, N)``; ``pdl``: with
    programmatic dependent launch (:mod:`cortexflow.kernels.pdl`: the first weight tile loads early)."""
    x2 = _rows(x)
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    m_size, k_size = x2.shape
    half_n = out.shape[-1]
    if x2.shape[1] != weight.shape[1]:
        raise ValueError(f"x has {x2.shape[1]} features, weight expects {weight.shape[1]}")
    block_m = 64 if m_size > 32 else 32 if m_size > 16 else 16
    grid_n, grid_m = triton.cdiv(half_n, BLOCK_N), triton.cdiv(m_size, block_m)
    if num_splits is None:
        num_splits = 1 if interpreting() else choose_k_splits(grid_n * grid_m, k_size, processor_count(x.device))
    k_per_split = triton.cdiv(triton.cdiv(k_size, max(1, num_splits)), BLOCK_K) * BLOCK_K
    num_splits = triton.cdiv(k_size, k_per_split)  # no empty range
    split = num_splits > 1
    planes = 2 if epilogue == GELU_GATE else 1
    work = torch.empty((num_splits, planes, m_size, half_n), dtype=torch.float32, device=x.device) if split else out
    counters = arrival_counters(x.device, grid_n * grid_m) if split else out
    res2 = residual.reshape(m_size, half_n) if residual is not None else out
    _skinny_gemm_kernel[(grid_n, grid_m, num_splits)](
        x2, weight, bias if bias is not None else out, res2, out, work, counters,
        m_size, half_n, k_size, k_per_split, dt, x2.stride(0), weight.stride(0), res2.stride(0), out.stride(0),
        EPILOGUE=epilogue, HAS_BIAS=bias is not None, HAS_RES=residual is not None, SPLIT=split,
        UPCAST=upcast_dots(weight.dtype), DOT_PRECISION="ieee" if weight.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, PDL=pdl, num_warps=4, num_stages=3,
        **launch_options(pdl),
    )
    return out


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  residual: torch.Tensor | None = None, num_splits: int | None = None, pdl: bool = False) -> torch.Tensor:
    """``x @ weightᵀ (+ bias) (+ residual)`` for ``x (..., K)``, ``weight (N, K)``; ``(..., N)`` in x's dtype.
    ``pdl``: launch with programmatic dependent launch (as for every function of this module)."""
    n = weight.shape[0]
    out = torch.empty((x.numel() // x.shape[-1], n), dtype=x.dtype, device=x.device)
    if residual is not None and residual.shape[-1] != n:
        raise ValueError(f"residual has {residual.shape[-1]} features, the output {n}")
    _launch(x, weight, out, LINEAR, bias, None if residual is None else _rows(residual), num_splits=num_splits,
            pdl=pdl)
    return out.view(*x.shape[:-1], n)


def skinny_gelu_gate(x: torch.Tensor, gate_up_weight: torch.Tensor, bias: torch.Tensor | None = None,
                     num_splits: int | None = None, pdl: bool = False) -> torch.Tensor:
    """``gelu_tanh(x @ W_gateᵀ) * (x @ W_upᵀ)`` with ``gate_up_weight (2F, K) = [W_gate; W_up]``; ``(..., F)``."""
    f = gate_up_weight.shape[0] // 2
    out = torch.empty((x.numel() // x.shape[-1], f), dtype=x.dtype, device=x.device)
    _launch(x, gate_up_weight, out, GELU_GATE, bias, num_splits=num_splits, pdl=pdl)
    return out.view(*x.shape[:-1], f)


def skinny_euler_(state: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dt: float,
                  num_splits: int | None = None, pdl: bool = False) -> torch.Tensor:
    """In place on the contiguous fp32 ``state (..., N)``: ``state += dt * (x @ weightᵀ + bias)``; returns it."""
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError("skinny_euler_ updates a contiguous float32 state in place")
    _launch(x, weight, state.view(-1, state.shape[-1]), EULER, bias, dt=float(dt), num_splits=num_splits, pdl=pdl)
    return state


def skinny_linear_reference(x, weight, bias=None, residual=None):
    """``skinny_linear`` in PyTorch with fp32 math, rounded to x's dtype once at the end."""
    y = x.float() @ weight.float().T
    if bias is not None:
        y = y + bias.float()
    if residual is not None:
        y = y + residual.float()
    return y.to(x.dtype)


def skinny_gelu_gate_reference(x, gate_up_weight, bias=None):
    """``skinny_gelu_gate`` in PyTorch with fp32 math."""
    y = x.float() @ gate_up_weight.float().T
    if bias is not None:
        y = y + bias.float()
    gate, up = y.chunk(2, dim=-1)
    return (torch.nn.functional.gelu(gate, approximate="tanh") * up).to(x.dtype)


def skinny_euler_reference(state, x, weight, bias, dt):
    """``skinny_euler_`` in PyTorch (returns a new tensor)."""
    y = x.float() @ weight.float().T
    if bias is not None:
        y = y + bias.float()
    return state + dt * y
