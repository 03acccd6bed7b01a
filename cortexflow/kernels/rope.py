"""Split-half rotary position embedding (Gemma / openpi) in Triton.

For ``x (B, L, H, D)`` and integer ``positions (B, L)``: with ``x1 = x[..., :D/2]``, ``x2 = x[..., D/2:]``
and angle ``pos * inv_freq[i]`` (``inv_freq = base ** (-2i/D)``, passed in precomputed so the angles
equal the reference's), ``out = [x1 cos - x2 sin, x2 cos + x1 sin]`` in fp32, cast to ``x``'s dtype.
One program rotates every head of one token; input and output may be strided views (e.g. a KV-cache slice).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cortexflow.kernels.runtime import next_power_of_two


@triton.jit
def _rope_kernel(
    x_ptr, out_ptr, pos_ptr, inv_freq_ptr,
    n_heads, half, stride_xb, stride_xt, stride_xh, stride_ob, stride_ot, stride_oh, stride_pb,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    batch = tl.program_id(0)
    token = tl.program_id(1)
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    valid = (heads < n_heads) & (cols < half)
    pos = tl.load(pos_ptr + batch * stride_pb + token).to(tl.float32)
    inv_freq = tl.load(inv_freq_ptr + cols, mask=cols < half, other=0.0)
    angle = pos * inv_freq
    cos = tl.cos(angle)
    sin = tl.sin(angle)
    base = x_ptr + batch * stride_xb + token * stride_xt + heads * stride_xh
    x1 = tl.load(base + cols, mask=valid, other=0.0).to(tl.float32)
    x2 = tl.load(base + half + cols, mask=valid, other=0.0).to(tl.float32)
    out = out_ptr + batch * stride_ob + token * stride_ot + heads * stride_oh
    tl.store(out + cols, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=valid)
    tl.store(out + half + cols, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=valid)


def inverse_frequencies(head_dim: int, base: float, device: torch.device) -> torch.Tensor:
    """``base ** (-2i / head_dim)`` for ``i < head_dim/2``, fp32, computed exactly as the reference does."""
    exponents = torch.arange(head_dim // 2, device=device, dtype=torch.float32) * (2.0 / head_dim)
    return base ** (-exponents)


def rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate ``x (B, L, H, D)`` (last dim contiguous) at ``positions (B, L)``; writes into ``out`` if given."""
    b, length, heads, dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty_like(x) if out is None else out
    pos = positions if positions.stride(-1) == 1 else positions.contiguous()
    _rope_kernel[(b, length)](
        x, out, pos, inv_freq,
        heads, dim // 2, x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2),
        pos.stride(0),
        BLOCK_H=next_power_of_two(heads), BLOCK_HALF=next_power_of_two(dim // 2), num_warps=4,
    )
    return out


def rope_reference(x, positions, inv_freq):
    """The same computation in PyTorch."""
    half = x.shape[-1] // 2
    angle = positions.float()[..., None] * inv_freq
    sin, cos = torch.sin(angle)[:, :, None, :], torch.cos(angle)[:, :, None, :]
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)
