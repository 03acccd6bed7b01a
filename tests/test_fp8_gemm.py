"""The prefill's FP8 GEMM (kernels/fp8_gemm.py): the row-quantisation kernel bit for bit against
``quantize_rows``, and ``fp8_linear`` (``torch._scaled_mm``, which runs on CPU too) against its reference."""

import pytest
import torch

from cortexflow.errors import InputError
from cortexflow.quantization.fp8 import E4M3, E4M3_MAX, quantize_rows, quantize_weight

pytest.importorskip("triton")

from compile_support import run_compile_script  # noqa: E402

from cortexflow.kernels.fp8_gemm import (  # noqa: E402
    fp8_linear,
    fp8_linear_reference,
    quantize_activation_rows,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def hard_rows(k: int) -> torch.Tensor:
    """Rows that exercise every rounding case, each with amax 448 (scale 1) unless stated: every E4M3 value;
    exact ties between neighbours (normal and subnormal: ties go to the even mantissa); values that round to
    zero from below (-0.0); an all-zero row (scale 1); a row whose scaled values land above 448 before the
    clamp; a row of tiny values (scale far below 1)."""
    codes = torch.arange(256, dtype=torch.uint8).view(E4M3).float()
    finite = codes[torch.isfinite(codes)]
    grid = torch.unique(finite[finite >= 0])
    ties = (grid[:-1] + grid[1:]) / 2
    rows = torch.zeros(6, k)
    rows[0, :finite.numel()] = finite
    rows[1, :ties.numel()] = ties
    rows[1, ties.numel():2 * ties.numel()] = -ties
    rows[1, -1] = E4M3_MAX
    rows[2, :4] = torch.tensor([-2.0 ** -11, 2.0 ** -11, -0.0, E4M3_MAX])
    rows[4, :3] = torch.tensor([1.0, -3.0, 2.9999998])
    rows[5] = torch.linspace(-1e-30, 3e-30, k)
    return rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_row_quantisation_kernel_is_quantize_rows_bit_for_bit(dtype):
    """Random rows of very different magnitudes plus the hard rows, K = 1000 (a partial last chunk of 256),
    read through a strided view (row stride 1040)."""
    k = 1000
    g = torch.Generator().manual_seed(0)
    random_rows = torch.randn(37, k, generator=g) * torch.logspace(-6, 4, 37)[:, None]
    x = torch.cat([random_rows, hard_rows(k)]).to(dtype)
    if dtype == torch.float16:
        x = x.nan_to_num(posinf=0.0, neginf=0.0)
    padded = torch.zeros(x.shape[0], k + 40, dtype=dtype)
    padded[:, :k] = x
    x = padded[:, :k].to(DEVICE)
    got = quantize_activation_rows(x, block=256)
    ref = quantize_rows(x)
    assert got.data.dtype == E4M3 and got.scale.dtype == torch.float32 and got.data.shape == x.shape
    assert same_bits(got.scale.view(torch.uint8), ref.scale.view(torch.uint8))
    assert same_bits(got.data, ref.data), (got.data.float() != ref.data.float()).nonzero()[:10]
    assert got.scale[-3] == 1.0 and not got.data[-3].float().any()


def test_row_quantisation_keeps_negative_zero_and_rounds_ties_to_even():
    x = torch.tensor([[448.0, 1.0625, 1.1875, 2.0 ** -10, 3 * 2.0 ** -10, -2.0 ** -11, -0.0, 0.0]], device=DEVICE)
    q = quantize_activation_rows(x)
    assert q.scale.item() == 1.0
    assert q.data.float().tolist()[0] == [448.0, 1.0, 1.25, 0.0, 2.0 ** -8, 0.0, 0.0, 0.0]
    assert q.data.view(torch.uint8).tolist()[0][5:] == [0x80, 0x80, 0x00]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual", [False, True])
def test_fp8_linear_matches_reference(dtype, residual):
    """``x (2, 7, 96)`` times an E4M3 ``(80, 96)`` weight (+ a residual) against the reference (both operands
    dequantised, fp32 product); the result is within E4M3 error of the unquantised product."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 7, 96, generator=g) * torch.logspace(-2, 2, 7)[:, None]).to(dtype).to(DEVICE)
    w = (torch.randn(80, 96, generator=g) * 0.1).to(DEVICE)
    q = quantize_weight(w)
    res = torch.randn(2, 7, 80, generator=g).to(dtype).to(DEVICE) if residual else None
    got = fp8_linear(x, q.data, q.scale, residual=res)
    ref = fp8_linear_reference(x, q.data, q.scale, residual=res)
    assert got.shape == (2, 7, 80) and got.dtype == dtype
    rel = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
    # Hopper's FP8 tensor cores keep fewer bits than fp32 in their accumulator (about 2^-14 relative), so on a GPU
    # an fp32 result differs from the fp32 reference by ~1e-4; the CPU's _scaled_mm sums in fp32
    # (docs/reference_facts.md#F-HW-3).
    assert rel < ((1e-6 if DEVICE == "cpu" else 1e-3) if dtype == torch.float32 else 4e-3), rel
    exact = x.float() @ w.T + (res.float() if residual else 0.0)
    rel_exact = ((got.float() - exact).norm() / exact.norm()).item()
    assert 1e-3 < rel_exact < 6e-2, rel_exact


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("product_dtype", [torch.float32, torch.bfloat16])
def test_scale_product_rounds_like_pytorch(dtype, product_dtype):
    """The epilogue of ``fp8_linear``: an fp32 or bf16 product times its row and column scales in fp32, rounded to
    ``dtype`` (to nearest even), then a residual added and rounded again, bit for bit what PyTorch computes (an
    fp32 result with a residual to one rounding: a GPU may fuse the last multiply and the add into one FMA)."""
    from cortexflow.kernels.fp8_gemm import scale_product

    g = torch.Generator().manual_seed(5)
    product = (torch.randn(9, 1100, generator=g) * 300).to(product_dtype).to(DEVICE)
    rows, cols = torch.rand(9, generator=g).to(DEVICE) + 0.01, torch.rand(1100, generator=g).to(DEVICE) + 0.01
    residual = torch.randn(9, 1100, generator=g).to(dtype).to(DEVICE)
    expected = (product.float() * rows[:, None] * cols[None, :]).to(dtype)
    assert torch.equal(scale_product(product, rows, cols, dtype), expected)
    with_residual = scale_product(product, rows, cols, dtype, residual)
    if dtype == torch.float32:
        torch.testing.assert_close(with_residual, expected + residual, rtol=2.5e-7, atol=1e-6)
    else:
        assert torch.equal(with_residual, (expected.float() + residual.float()).to(dtype))


def test_fp8_linear_refuses_unaligned_or_unquantised_weights():
    x = torch.randn(3, 64, device=DEVICE)
    q = quantize_weight(torch.randn(32, 64, device=DEVICE))
    with pytest.raises(InputError, match="in_features .* multiple of 16"):
        fp8_linear(torch.randn(3, 24, device=DEVICE), quantize_weight(torch.randn(32, 24)).data, q.scale)
    with pytest.raises(InputError, match="out_features .* multiple of 16"):
        fp8_linear(x, q.data[:24], q.scale[:24])
    with pytest.raises(InputError, match="E4M3"):
        fp8_linear(x, q.data.float(), q.scale)
    with pytest.raises(InputError, match="features"):
        fp8_linear(torch.randn(3, 48, device=DEVICE), q.data, q.scale)
    with pytest.raises(InputError, match="fp32 weight scales"):
        fp8_linear(x, q.data, q.scale.bfloat16())


def test_row_quantisation_kernel_also_gives_the_rms_statistic():
    """``rstd=``: the quantisation launch also writes ``rsqrt(mean(x^2) + eps)`` per row (the folded RMSNorm's
    statistic, fp32 sums in another order than ``rms_rstd``), and the E4M3 values and scales keep their bits."""
    from cortexflow.kernels.rms_norm import rms_rstd_reference

    g = torch.Generator().manual_seed(3)
    x = (torch.randn(11, 1000, generator=g) * torch.logspace(-2, 2, 11)[:, None]).bfloat16().to(DEVICE)
    rstd = torch.empty(11, dtype=torch.float32, device=DEVICE)
    got = quantize_activation_rows(x, block=256, rstd=rstd, eps=1e-5)
    plain = quantize_activation_rows(x, block=256)
    assert same_bits(got.data, plain.data) and torch.equal(got.scale, plain.scale)
    torch.testing.assert_close(rstd, rms_rstd_reference(x, 1e-5), rtol=2e-6, atol=0)
    with pytest.raises(InputError, match="rstd must be fp32"):
        quantize_activation_rows(x, rstd=rstd[:5])


def _unscaled_product(rows: int, n: int, k: int = 64, seed: int = 0):
    """A real ``fp8_product`` of random rows (bf16 activations, E4M3 weight with channel scales)."""
    from cortexflow.kernels.fp8_gemm import fp8_product

    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, k, generator=g) * 3).bfloat16().to(DEVICE)
    q = quantize_weight((torch.randn(n, k, generator=g) * 0.05).to(DEVICE))
    return x, fp8_product(x, q.data, q.scale, rms_eps=1e-6)


@pytest.mark.parametrize("activation", ["silu", "gelu"])
@pytest.mark.parametrize("folded", [False, True], ids=["plain", "folded-norm"])
def test_gated_activation_applies_product_scales_as_scale_product_would(activation, folded):
    """The gated activation over an unscaled FP8 ``[gate | up]`` product with ``product_scales`` gives the bits of
    ``scale_product`` followed by the activation over the scaled product (with the folded norm's rstd or not)."""
    from cortexflow.kernels.fp8_gemm import scale_product
    from cortexflow.kernels.gelu_gate import gelu_tanh_gate_fused

    x, p = _unscaled_product(7, 2 * 1040)
    rstd = {"rstd": p.rstd} if folded else {}
    scaled = scale_product(p.product, p.row_scale, p.col_scale, torch.bfloat16)
    expected = gelu_tanh_gate_fused(scaled, silu=activation == "silu", **rstd)
    got = gelu_tanh_gate_fused(p.product, silu=activation == "silu", product_scales=(p.row_scale, p.col_scale),
                               dtype=torch.bfloat16, **rstd)
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)
    assert expected.float().abs().mean() > 1e-3
    with pytest.raises(ValueError, match="product scales .* are not fp32"):
        gelu_tanh_gate_fused(p.product, product_scales=(p.row_scale.bfloat16(), p.col_scale), dtype=torch.bfloat16)


@pytest.mark.parametrize("folded", [False, True], ids=["plain", "folded-norm"])
def test_qkv_rope_applies_product_scales_as_scale_product_would(folded):
    """QKV/RoPE over an unscaled FP8 QKV product (2 sequences of 5 tokens, 4 query heads on 2 KV heads of 32)
    gives the bits of ``scale_product`` followed by QKV/RoPE, for q and the K/V written into the cache."""
    from cortexflow.kernels.fp8_gemm import scale_product
    from cortexflow.kernels.qkv_rope import qkv_rope
    from cortexflow.kernels.rope import inverse_frequencies

    b, s, hq, hkv, d = 2, 5, 4, 2, 32
    x, p = _unscaled_product(b * s, (hq + 2 * hkv) * d, seed=1)
    rstd = {"rstd": p.rstd} if folded else {}
    positions = torch.arange(s, device=DEVICE).repeat(b, 1) + 3
    inv_freq = inverse_frequencies(d, 10000.0, torch.device(DEVICE))
    outputs = []
    for scaled in (False, True):
        cache = [torch.zeros(b, s + 2, hkv, d, dtype=torch.bfloat16, device=DEVICE) for _ in range(2)]
        if scaled:
            q = qkv_rope(p.product.view(b, s, -1), positions, inv_freq, hq, hkv, cache[0][:, :s], cache[1][:, :s],
                         product_scales=(p.row_scale, p.col_scale), **rstd)
        else:
            product = scale_product(p.product, p.row_scale, p.col_scale, torch.bfloat16).view(b, s, -1)
            q = qkv_rope(product, positions, inv_freq, hq, hkv, cache[0][:, :s], cache[1][:, :s], **rstd)
        outputs.append((q, *cache))
    for expected, got in zip(*outputs):
        assert got.dtype == torch.bfloat16 and torch.equal(got, expected)
    assert outputs[0][1].abs().sum() > 0 and outputs[0][2].abs().sum() > 0
    for row_scale, col_scale in ((p.row_scale[:3], p.col_scale), (p.row_scale, p.col_scale.bfloat16())):
        with pytest.raises(ValueError, match="product_scales .* are not fp32"):
            qkv_rope(p.product.view(b, s, -1), positions, inv_freq, hq, hkv, cache[0][:, :s], cache[1][:, :s],
                     product_scales=(row_scale, col_scale))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rms", [False, True], ids=["plain", "rstd"])
def test_product_sum_quantisation_is_scale_product_then_quantisation_bit_for_bit(dtype, rms):
    """``fp8_product_of_sum``: an unscaled FP8 product (o, 13 rows, K = 1040: a partial last chunk of 256) scaled,
    added to a residual read through a strided view, and the sum quantised for the next projection (gate/up) in one
    launch gives the bits of ``scale_product(..., residual)`` followed by ``fp8_product`` of the sum: the sum, the
    E4M3 rows and scales, the rstd and the next product."""
    from cortexflow.kernels.fp8_gemm import fp8_product, fp8_product_of_sum, quantize_sum_rows, scale_product

    g = torch.Generator().manual_seed(7)
    rows, k, n = 13, 1040, 96
    attn = (torch.randn(rows, 64, generator=g) * 2).to(dtype).to(DEVICE)
    w_o = quantize_weight((torch.randn(k, 64, generator=g) * 0.1).to(DEVICE))
    w_next = quantize_weight((torch.randn(n, k, generator=g) * 0.05).to(DEVICE))
    padded = (torch.randn(rows, k + 16, generator=g) * torch.logspace(-1, 1, rows)[:, None]).to(dtype).to(DEVICE)
    residual = padded[:, :k]
    pending = fp8_product(attn, w_o.data, w_o.scale)
    eps = 1e-5 if rms else None
    total, got = fp8_product_of_sum(pending, residual, w_next.data, w_next.scale, rms_eps=eps)
    expected_total = scale_product(pending.product, pending.row_scale, pending.col_scale, dtype, residual)
    expected = fp8_product(expected_total, w_next.data, w_next.scale, rms_eps=eps)
    assert total.dtype == dtype and torch.equal(total, expected_total)
    assert torch.equal(got.row_scale, expected.row_scale) and torch.equal(got.product, expected.product)
    assert (got.rstd is None) == (not rms) and (not rms or torch.equal(got.rstd, expected.rstd))
    _, q = quantize_sum_rows(pending, residual, block=256)
    assert same_bits(q.data, quantize_rows(expected_total).data)
    assert (expected_total.float() - residual.float()).abs().mean() > 1e-2
    with pytest.raises(InputError, match="scales of shapes"):
        quantize_sum_rows(pending._replace(row_scale=pending.row_scale[:5]), residual)


FP8_COMPILE_SCRIPT = r"""
import json, sys, torch
from cortexflow.kernels.decode_gemv import decode_gemv
from cortexflow.kernels.decode_qkv_rope import decode_qkv_rope
from cortexflow.kernels.fp8_gemm import ScaledProduct, quantize_activation_rows, quantize_sum_rows
from cortexflow.kernels.gelu_gate import gelu_tanh_gate_fused
from cortexflow.kernels.qkv_rope import qkv_rope
from cortexflow.kernels.runtime import CompileTarget
from cortexflow.quantization.fp8 import E4M3
from cortexflow.tools.compile_check import compile_only

meta = torch.device("meta")


def empty(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device=meta)


out = {}
for arch in (89, 90):
    with compile_only(CompileTarget(arch=arch, processors=132)) as launches:
        for n, k, gated, kwargs in ((12288, 4096, None, {"normalize": True}),
                                    (4096, 4096, None, {"residual": empty(1, 1, 4096)}),
                                    (22016, 4096, "silu", {"normalize": True}),
                                    (4096, 11008, None, {"residual": empty(1, 1, 4096)})):
            decode_gemv(empty(1, 1, k), empty(n, k, dtype=E4M3), weight_scale=empty(n, dtype=torch.float32),
                        gated=gated, **kwargs)
        cache = empty(1, 512, 32, 128)
        row = torch.empty(1, dtype=torch.int64, device=meta)
        decode_qkv_rope(empty(1, 1, 4096), empty(12288, 4096, dtype=E4M3), 32, 32, row,
                        empty(64, dtype=torch.float32), cache, cache, row, normalize=True,
                        weight_scale=empty(12288, dtype=torch.float32))
        quantize_activation_rows(empty(280, 4096))
        # The prefill's consumers of an unscaled FP8 product (fp8_product): the quantisation with the folded
        # norm's rstd, QKV/RoPE and the gated activation applying the product scales.
        quantize_activation_rows(empty(280, 4096), rstd=empty(280, dtype=torch.float32))
        # o's product scaled and added to the residual in gate/up's quantisation launch.
        quantize_sum_rows(ScaledProduct(empty(280, 4096), empty(280, dtype=torch.float32),
                                        empty(4096, dtype=torch.float32)), empty(280, 4096),
                          rstd=empty(280, dtype=torch.float32))
        scales = lambda n: (empty(280, dtype=torch.float32), empty(n, dtype=torch.float32))  # noqa: E731
        qkv_rope(empty(1, 280, 12288), torch.empty(1, 280, dtype=torch.int64, device=meta),
                 empty(64, dtype=torch.float32), 32, 32, cache[:, :280], cache[:, :280],
                 rstd=empty(280, dtype=torch.float32), product_scales=scales(12288))
        gelu_tanh_gate_fused(empty(280, 22016), silu=True, rstd=empty(280, dtype=torch.float32),
                             product_scales=scales(22016), dtype=torch.bfloat16)
        # RT-2's narrower layers (width 2048) and their own FP8 tilings: o, down, QKV/RoPE (8 query heads on 1 KV head)
        decode_gemv(empty(1, 1, 2048), empty(2048, 2048, dtype=E4M3), weight_scale=empty(2048, dtype=torch.float32),
                    residual=empty(1, 1, 2048))
        decode_gemv(empty(1, 1, 16384), empty(2048, 16384, dtype=E4M3), weight_scale=empty(2048, dtype=torch.float32),
                    residual=empty(1, 1, 2048))
        narrow_cache = empty(1, 512, 1, 256)
        decode_qkv_rope(empty(1, 1, 2048), empty(2560, 2048, dtype=E4M3), 8, 1, row, empty(128, dtype=torch.float32),
                        narrow_cache, narrow_cache, row, normalize=True, weight_scale=empty(2560, dtype=torch.float32))
    out[arch] = [{"name": l.name, "grid": list(l.grid), "ptx_e4m3": "e4m3" in l.kernel.asm["ptx"],
                  "ptx_div_rn": "div.rn.f32" in l.kernel.asm["ptx"],
                  "scaled": l.constexprs.get("SCALED"), "rstd": l.constexprs.get("RSTD"),
                  "pending": l.constexprs.get("PENDING")} for l in launches]
json.dump(out, sys.stdout)
"""


def test_fp8_decode_and_quantisation_kernels_compile_for_ada_and_hopper(tmp_path):
    """The FP8 decode GEMVs at OpenVLA's shapes (default FP8 tilings), the FP8 QKV/RoPE GEMV, the row
    quantisation (also with the rstd, and of a scaled product plus residual) and the prefill's QKV/RoPE and gated activation over an unscaled FP8 product,
    and RT-2's narrower decode GEMVs (o, down, QKV/RoPE at their own tilings), through Triton's whole pipeline for sm_89 and sm_90 (compile-only launches on ``meta`` tensors, in a subprocess
    without the interpreter): the PTX of the E4M3 kernels converts E4M3, and the quantisation divides with IEEE
    rounding (``div.rn.f32``), as PyTorch does."""
    report = run_compile_script(FP8_COMPILE_SCRIPT, tmp_path)
    for arch in ("89", "90"):
        launches = report[arch]
        assert [launch["name"] for launch in launches] == ["_decode_gemv_kernel"] * 4 + [
            "_decode_qkv_rope_kernel", "_quantize_rows_kernel", "_quantize_rows_kernel", "_quantize_rows_kernel",
            "_qkv_rope_kernel", "_gelu_gate_kernel", "_decode_gemv_kernel", "_decode_gemv_kernel",
            "_decode_qkv_rope_kernel"]
        # default FP8 tilings: qkv 4 rows, o 8, gate/up 4 (of 11008 gated outputs), down 8; QKV/RoPE 4 pairs
        assert [launch["grid"] for launch in launches[:6]] == [[3072], [512], [2752], [512], [1536], [280]]
        # RT-2's: o 4 rows, down 8, QKV/RoPE 2 pairs (10 heads x 128 pairs)
        assert [launch["grid"] for launch in launches[10:]] == [[512], [256], [640]]
        assert all(launch["ptx_e4m3"] for launch in launches[:8] + launches[10:])
        assert launches[5]["ptx_div_rn"] and launches[6]["ptx_div_rn"] and launches[6]["rstd"]
        assert launches[7]["pending"] and launches[7]["rstd"] and launches[7]["ptx_div_rn"] and not launches[6]["pending"]
        assert launches[8]["scaled"] and launches[9]["scaled"] and launches[8]["rstd"] == launches[9]["rstd"] == 1
