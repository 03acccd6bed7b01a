"""Element-wise tanh-GELU, Gemma's gated product ``gelu_tanh(gate) * up`` and Llama's ``silu(gate) * up``
in Triton (fp32 math).

The gated forms also accept one fused ``(..., 2M)`` tensor holding ``[gate | up]`` (the output of a
concatenated gate/up projection), so the MLP needs a single GEMM for both.

Folded norm: when the RMSNorm before gate/up had its weight folded into the gate/up weight, the GEMM ran
on the un-normalised rows, so each row's gate and up are first multiplied by the row's rstd and rounded
to the tensor's dtype (as the reference's projection outputs are). The rstd comes from a ``(rows,)`` fp32
tensor (``rstd=``) or is recomputed by every program from the row of the layer input (``norm_input=``:
meant for one-row decode steps, where it saves the statistics kernel).

FP8 prefill: ``gate_up`` may be the unscaled product of :func:`~cortexflow.kernels.fp8_gemm.fp8_product`
(``product_scales=(row_scale, col_scale)`` with ``col_scale (2M,)`` for ``[gate | up]``, ``dtype=`` the
activations'); gate and up are then first scaled and rounded exactly as
:func:`~cortexflow.kernels.fp8_gemm.scale_product` would have (one launch fewer).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cortexflow.kernels.fp8_gemm import round_to_dtype
from cortexflow.kernels.rms_norm import folded_norm_mode, row_rstd
from cortexflow.kernels.runtime import next_power_of_two

@triton.jit
def _gelu_tanh(x):
    inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    tanh = 2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0
    return 0.5 * x * (1.0 + tanh)


@triton.jit
def _gelu_gate_kernel(gate_ptr, up_ptr, out_ptr, rstd_ptr, norm_x_ptr, row_scale_ptr, gate_scale_ptr, up_scale_ptr,
                      n_cols, gate_stride, up_stride, norm_cols, eps, GATED: tl.constexpr, SILU: tl.constexpr,
                      RSTD: tl.constexpr, SCALED: tl.constexpr, BLOCK: tl.constexpr, BLOCK_X: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = cols < n_cols
    g = tl.load(gate_ptr + row * gate_stride + cols, mask=valid, other=0.0).to(tl.float32)
    if SCALED:
        row_scale = tl.load(row_scale_ptr + row)
        g = round_to_dtype(g * row_scale * tl.load(gate_scale_ptr + cols, mask=valid, other=0.0),
                           out_ptr.dtype.element_ty).to(tl.float32)
    if RSTD != 0:
        if RSTD == 1:
            rstd = tl.load(rstd_ptr + row)
        else:
            rstd = row_rstd(norm_x_ptr, row, norm_cols, eps, BLOCK_X)
        g = (g * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
    if SILU:
        y = g / (1.0 + tl.exp(-g))
    else:
        y = _gelu_tanh(g)
    if GATED:
        u = tl.load(up_ptr + row * up_stride + cols, mask=valid, other=0.0).to(tl.float32)
        if SCALED:
            u = round_to_dtype(u * row_scale * tl.load(up_scale_ptr + cols, mask=valid, other=0.0),
                               out_ptr.dtype.element_ty).to(tl.float32)
        if RSTD != 0:
            u = (u * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
        y = y * u
    tl.store(out_ptr + row * n_cols + cols, y.to(out_ptr.dtype.element_ty), mask=valid)


def _launch(gate: torch.Tensor, up: torch.Tensor | None, silu: bool = False, rstd: torch.Tensor | None = None,
            norm_input: torch.Tensor | None = None, eps: float = 1e-6,
            scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
            dtype: torch.dtype | None = None) -> torch.Tensor:
    """``scales``: ``(row_scale, gate_col_scale, up_col_scale)`` of an unscaled FP8 product; ``dtype``: the
    output's (default ``gate``'s)."""
    n_cols = gate.shape[-1]
    gate2 = gate.reshape(-1, n_cols)  # a view when rows are evenly strided (e.g. the gate half of [gate | up])
    up2 = None if up is None else up.reshape(-1, n_cols)
    rows = gate2.shape[0]
    rstd_mode, norm_cols = folded_norm_mode(rstd, norm_input, rows)
    if scales is not None and (scales[0].shape != (rows,) or any(c.shape != (n_cols,) for c in scales[1:])
                               or any(c.dtype != torch.float32 for c in scales)):
        raise ValueError(f"product scales {[(c.dtype, tuple(c.shape)) for c in scales]} are not fp32 ({rows},), "
                         f"({n_cols},) x 2")
    out = torch.empty(gate2.shape, dtype=dtype or gate.dtype, device=gate.device)
    block = 1024
    grid = (rows, triton.cdiv(n_cols, block))
    _gelu_gate_kernel[grid](
        gate2, up2 if up2 is not None else gate2, out, rstd if rstd is not None else gate2,
        norm_input if norm_input is not None else gate2, *(scales if scales is not None else (gate2,) * 3), n_cols,
        gate2.stride(0), up2.stride(0) if up2 is not None else 0, norm_cols, eps,
        GATED=up is not None, SILU=silu, RSTD=rstd_mode, SCALED=scales is not None,
        BLOCK=block, BLOCK_X=min(next_power_of_two(norm_cols), 8192), num_warps=4,
    )
    return out.reshape(*gate.shape[:-1], n_cols)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """tanh-approximated GELU of ``x``."""
    return _launch(x, None)


def gelu_tanh_gate(gate: torch.Tensor, up: torch.Tensor, silu: bool = False, *, rstd: torch.Tensor | None = None,
                   norm_input: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """``gelu_tanh(gate) * up`` (``silu(gate) * up`` with ``silu``) for same-shape ``gate``/``up`` (rows may
    be strided views of one tensor). ``rstd`` / ``norm_input``: the folded-norm row scaling (module doc)."""
    if gate.stride(-1) != 1 or up.stride(-1) != 1 or gate.shape != up.shape:
        gate, up = gate.contiguous(), up.contiguous()
    return _launch(gate, up, silu, rstd, norm_input, eps)


def gelu_tanh_gate_fused(gate_up: torch.Tensor, silu: bool = False, *, rstd: torch.Tensor | None = None,
                         norm_input: torch.Tensor | None = None, eps: float = 1e-6,
                         product_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
                         dtype: torch.dtype | None = None) -> torch.Tensor:
    """``gelu_tanh(gate) * up`` (``silu(gate) * up`` with ``silu``) where ``gate_up (..., 2M)`` =
    ``[gate | up]`` along the last dim; ``rstd`` / ``norm_input`` as in :func:`gelu_tanh_gate`.
    ``product_scales``: ``gate_up`` is an unscaled FP8 product and these its fp32 ``(row_scale (rows,),
    col_scale (2M,))``; the result has ``dtype`` (module doc)."""
    m = gate_up.shape[-1] // 2
    flat = gate_up.reshape(-1, 2 * m)
    if product_scales is None:
        out = gelu_tanh_gate(flat[:, :m], flat[:, m:], silu, rstd=rstd, norm_input=norm_input, eps=eps)
    else:
        if flat.stride(-1) != 1:
            flat = flat.contiguous()
        row_scale, col_scale = product_scales
        out = _launch(flat[:, :m], flat[:, m:], silu, rstd, norm_input, eps, (row_scale, col_scale[:m], col_scale[m:]),
                      dtype)
    return out.reshape(*gate_up.shape[:-1], m)


def silu_gate_fused(gate_up: torch.Tensor) -> torch.Tensor:
    """Llama's ``silu(gate) * up`` where ``gate_up (..., 2M)`` = ``[gate | up]`` along the last dim."""
    return gelu_tanh_gate_fused(gate_up, silu=True)


def _scale_rows(t, rstd):
    """``t (..., M)`` times ``rstd`` (one value per row), rounded to ``t``'s dtype (the folded-norm step)."""
    if rstd is None:
        return t
    return (t.float() * rstd.float().reshape(*t.shape[:-1], 1)).to(t.dtype)


def silu_gate_reference(gate, up, rstd=None):
    """``silu(gate) * up`` in PyTorch (fp32 math); ``rstd``: scale each row of both first."""
    gate, up = _scale_rows(gate, rstd), _scale_rows(up, rstd)
    return (torch.nn.functional.silu(gate.float()) * up.float()).to(gate.dtype)


def gelu_tanh_gate_reference(gate, up, rstd=None):
    """The same computation in PyTorch (fp32 math)."""
    gate, up = _scale_rows(gate, rstd), _scale_rows(up, rstd)
    return (torch.nn.functional.gelu(gate.float(), approximate="tanh") * up.float()).to(gate.dtype)
