"""E4M3 to bfloat16 inside a kernel, exactly, without a conversion instruction per element.

Triton converts E4M3 to bf16 through float16: ``cvt.rn.f16x2.e4m3x2`` for each pair, then one
``cvt.bf16.f16`` for each element. :func:`e4m3_to_bf16` keeps the first step and replaces the second with
integer operations on each pair (PTX, four E4M3 values a block of inline assembly):

1. ``h = cvt.rn.f16x2.e4m3x2(pair)`` -- every E4M3 value is a float16 normal number or zero, with its
   mantissa's low 7 bits zero;
2. ``m = (h >> 3) & 0x0FFF0FFF`` -- each half's exponent (5 bits) and top 7 mantissa bits move to the
   places of a bf16 exponent and mantissa (the high half's low 3 bits, all zero, shift into the low half's
   top, which the mask clears with the sign bit that shifted down);
3. ``m |= h & 0x80008000`` -- the signs;
4. ``fma.rn.bf16x2(m, 2^112, -0)`` -- ``m``'s exponent is float16's (bias 15) read with bf16's bias 127:
   the product by ``2^112`` (exact: a normal bf16 ``m`` times a power of two, inside the range) is the value.
   Zero stays zero with its sign (``+0 + -0 = +0``, ``-0 + -0 = -0``).

The E4M3 NaN codes (``0x7F``, ``0xFF``, which quantisation never writes: it saturates at 448) become finite
values. Needs compute capability 8.9 (``cvt ... e4m3x2``; the bf16 FMA needs 8.0). Triton's interpreter does
not run inline assembly: the kernels use this only on a GPU (``ExpertTiling.fp8_convert``).
:func:`e4m3_to_bf16_reference` is the same arithmetic in PyTorch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_E4M3X4_TO_BF16X4 = tl.constexpr("""
{
.reg .b16 lo, hi;
.reg .b32 h0, h1, m0, m1, sh, fz;
mov.b32 {lo, hi}, $2;
cvt.rn.f16x2.e4m3x2 h0, lo;
cvt.rn.f16x2.e4m3x2 h1, hi;
shr.b32 m0, h0, 3;
shr.b32 m1, h1, 3;
and.b32 m0, m0, 0x0FFF0FFF;
and.b32 m1, m1, 0x0FFF0FFF;
lop3.b32 m0, m0, h0, 0x80008000, 0xF8;
lop3.b32 m1, m1, h1, 0x80008000, 0xF8;
mov.b32 sh, 0x77807780;
mov.b32 fz, 0x80008000;
fma.rn.bf16x2 $0, m0, sh, fz;
fma.rn.bf16x2 $1, m1, sh, fz;
}
""")


@triton.jit
def e4m3_to_bf16(w):
    """``w`` (E4M3, ``tl.float8e4nv``, any shape) as bf16, exactly (module doc). GPU only."""
    return tl.inline_asm_elementwise(_E4M3X4_TO_BF16X4, "=r,=r,r", [w.to(tl.uint8, bitcast=True)],
                                     dtype=tl.bfloat16, is_pure=True, pack=4)


def e4m3_to_bf16_reference(data: torch.Tensor) -> torch.Tensor:
    """:func:`e4m3_to_bf16`'s arithmetic on an E4M3 tensor (``torch.float8_e4m3fn``): float16 through PyTorch's
    exact conversion, then the bit steps 2-4 of the module doc on each 16-bit value."""
    h = data.to(torch.float16).view(torch.int16).to(torch.int32) & 0xFFFF
    m = ((h >> 3) & 0x0FFF) | (h & 0x8000)
    m = torch.where(m >= 0x8000, m - 0x10000, m).to(torch.int16)
    return (m.view(torch.bfloat16).float() * 2.0**112).to(torch.bfloat16)
