"""E4M3 -> bf16 by bits (kernels/e4m3.py): the PyTorch form of the arithmetic against PyTorch's conversion on
the CPU; the kernel's inline PTX against PyTorch's conversion on a GPU; the expert layer with it bit-equal to
Triton's conversion on a GPU."""

import pytest
import torch

from cortexflow.kernels import expert_layer as el
from cortexflow.kernels.e4m3 import e4m3_to_bf16_reference
from cortexflow.quantization.fp8 import E4M3

ON_FP8_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
NEEDS_FP8_GPU = "inline PTX (cvt.rn.f16x2.e4m3x2) needs a CUDA GPU of compute capability 8.9 or later; Triton's " \
                "interpreter does not run inline assembly"


def all_codes() -> torch.Tensor:
    """Every E4M3 bit pattern but the two NaNs, as ``torch.float8_e4m3fn``."""
    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)
    return codes.view(E4M3)


def test_the_bit_arithmetic_is_pytorchs_conversion_for_every_code():
    """All 254 non-NaN codes (both zeros, the subnormals 1-7 x 2^-9, ±448) give PyTorch's bf16 bits."""
    w = all_codes()
    assert torch.equal(e4m3_to_bf16_reference(w).view(torch.int16), w.to(torch.bfloat16).view(torch.int16))


def test_the_interpreter_is_refused_the_conversion_by_bits(monkeypatch):
    """``fp8_convert="bits"`` under the interpreter and an unknown conversion are each refused with the field
    named."""
    from dataclasses import replace

    from cortexflow.kernels import expert_layer

    monkeypatch.setattr(expert_layer, "interpreting", lambda: True)
    tiling = replace(el.INTERPRETER_TILING, fp8_convert="bits")
    assert "interpreter cannot run" in el.check_expert_shapes(32, 64, 4, 1, 32, tiling)
    assert "'cvt' or 'bits'" in el.check_expert_shapes(32, 64, 4, 1, 32, replace(tiling, fp8_convert="fast"))


@pytest.mark.skipif(not ON_FP8_GPU, reason=NEEDS_FP8_GPU)
def test_the_kernel_converts_every_code_in_any_order():
    """A ``(64, 64)`` tile of the codes in random order (each of the 4-value blocks the PTX takes holds mixed
    codes) through :func:`e4m3_to_bf16`: PyTorch's bf16 bits everywhere."""
    import triton
    import triton.language as tl

    from cortexflow.kernels.e4m3 import e4m3_to_bf16

    @triton.jit
    def convert(src, dst, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
        tl.store(dst + offs, e4m3_to_bf16(tl.load(src + offs)))

    codes = all_codes()
    g = torch.Generator().manual_seed(5)
    w = codes[torch.randint(0, codes.numel(), (64 * 64,), generator=g)].view(64, 64).cuda()
    out = torch.empty(64, 64, dtype=torch.bfloat16, device="cuda")
    convert[(1,)](w, out, BLOCK=64)
    assert torch.equal(out.view(torch.int16), w.to(torch.bfloat16).view(torch.int16))


@pytest.mark.skipif(not ON_FP8_GPU, reason=NEEDS_FP8_GPU)
@pytest.mark.parametrize("operands", ["bf16", "f16"])
def test_the_expert_layer_converting_by_bits_equals_tritons_conversion(operands):
    """The expert layer (bf16 rows, E4M3 weights, 8 persistent programs) with ``fp8_convert="bits"`` and with
    "cvt": both conversions are exact, so the outputs and the K/V written are the same bits."""
    from dataclasses import replace

    from test_expert_layer import SMALL_TILING, WEIGHTS, _inputs, _quantized

    dtype = torch.bfloat16
    t, positions, inv_freq, keys, values, mask, extra = _inputs(3, 6, 7, 32, 64, 4, 1, 32, dtype, 17, False)
    data, scales = _quantized(t)
    assert len(data) == len(WEIGHTS)
    outputs = {}
    for convert in ("cvt", "bits"):
        tiling = replace(SMALL_TILING, fp8_operands=operands, fp8_convert=convert)
        work = el.ExpertWorkspace(18, 6, 32, 64, 4, 1, 32, 13, dtype, torch.device("cuda"), tiling)
        out, k, v = t["x"].clone(), keys.clone(), values.clone()
        el.expert_layer(out, out, *data, t["attn_scale"], t["mlp_scale"], positions, inv_freq, k, v, mask, 1e-6,
                        32**-0.5, work, 4, weight_scales=scales, **extra)
        outputs[convert] = (out, k, v)
    for a, b in zip(outputs["cvt"], outputs["bits"]):
        assert torch.equal(a, b)
