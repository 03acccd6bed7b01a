"""The single-token decode GEMV kernel (kernels/decode_gemv.py) against its op-by-op PyTorch reference."""

import pytest
import torch

from cortexflow.kernels.decode_gemv import decode_gemv, decode_gemv_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BOUNDS = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def rand(*shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=DEVICE)



def variant_kwargs(variant: str, k: int, n: int, dtype: torch.dtype) -> dict:
    """``decode_gemv`` keywords of a test variant: "silu" / "gelu" in its name gates, "folded norm" normalises
    without a scale, "norm" RMS-normalises with a (seeded) scale, "residual" adds a (seeded) residual of ``n``."""
    kwargs = {"gated": "silu" if "silu" in variant else "gelu_tanh" if "gelu" in variant else None}
    if variant.startswith("folded norm"):
        kwargs.update(normalize=True, eps=1e-5)
    elif "norm" in variant:
        kwargs.update(norm_weight=rand(k, dtype=torch.float32, seed=3, scale=0.2), eps=1e-5)
    if variant == "residual":
        kwargs["residual"] = rand(1, 1, n, dtype=dtype, seed=4)
    return kwargs

def check(out, ref, dtype):
    out, ref = out.float(), ref.float()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel <= BOUNDS[dtype], f"‖Δ‖/‖ref‖ {rel:.3e} > {BOUNDS[dtype]:.0e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant", ["plain", "norm", "folded norm", "residual", "norm+silu gate", "norm+gelu gate",
                                     "folded norm+silu gate"])
def test_decode_gemv_matches_reference(dtype, variant):
    """Odd K (1100: a partial last chunk) and odd N (37 outputs: a partial last row block)."""
    k, n = 1100, 37
    x = rand(1, 1, k, dtype=dtype, seed=1, scale=3.0)
    kwargs = variant_kwargs(variant, k, n, dtype)
    w = rand(2 * n if kwargs["gated"] else n, k, dtype=dtype, seed=2, scale=k**-0.5)
    out = decode_gemv(x, w, block_n=8, block_k=256, **kwargs)
    assert out.shape == (1, 1, n) and out.dtype == dtype
    check(out, decode_gemv_reference(x, w, **kwargs), dtype)


def test_decode_gemv_residual_in_place_and_strided_weight_view():
    """``out=residual`` accumulates in place; the weight may be a row slice of a fused matrix."""
    k, n = 300, 20
    x = rand(1, k, dtype=torch.float32, seed=5)
    fused = rand(3 * n, k, dtype=torch.float32, seed=6, scale=k**-0.5)
    w = fused[n:2 * n]
    residual = rand(1, n, dtype=torch.float32, seed=7)
    expected = decode_gemv_reference(x, w, residual=residual.clone())
    out = decode_gemv(x, w, residual=residual, out=residual.view(n))
    check(residual, expected, torch.float32)
    assert out.data_ptr() == residual.data_ptr()


def test_decode_gemv_norm_is_really_applied():
    """A different norm scale gives a different result (the prologue is not skipped)."""
    k, n = 256, 16
    x = rand(k, dtype=torch.float32, seed=8, scale=5.0)
    w = rand(n, k, dtype=torch.float32, seed=9)
    nw = rand(k, dtype=torch.float32, seed=10, scale=0.5)
    a = decode_gemv(x, w, norm_weight=nw)
    b = decode_gemv(x, w, norm_weight=torch.zeros_like(nw))
    assert (a - b).abs().max() > 1e-2
    check(b, decode_gemv_reference(x, w, norm_weight=torch.zeros_like(nw)), torch.float32)


def test_decode_gemv_rejects_bad_input():
    x = rand(2, 64, dtype=torch.float32, seed=11)
    w = rand(8, 64, dtype=torch.float32, seed=12)
    with pytest.raises(ValueError, match="one row"):
        decode_gemv(x, w)
    with pytest.raises(ValueError, match="does not match"):
        decode_gemv(x[0], rand(8, 63, dtype=torch.float32, seed=13))
    with pytest.raises(ValueError, match="gated"):
        decode_gemv(x[0], w, gated="relu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", ["norm", "folded norm"])
def test_decode_qkv_rope_matches_gemv_then_qkv_rope(dtype, norm):
    """The fused QKV + RoPE + cache-write GEMV gives the values of the decode GEMV followed by the QKV/RoPE
    kernel (same rounding points) and of the op-by-op reference. Odd sizes: head_dim 24 (half 12, not a
    power of two: a partial pair block), K 200 (a partial chunk), 3 query heads on 1 KV head."""
    from cortexflow.kernels.decode_qkv_rope import decode_qkv_rope, decode_qkv_rope_reference
    from cortexflow.kernels.qkv_rope import qkv_rope
    from cortexflow.kernels.rope import inverse_frequencies

    hq, hkv, d, k, max_len = 3, 1, 24, 200, 9
    x = rand(1, 1, k, dtype=dtype, seed=20, scale=3.0)
    w = rand((hq + 2 * hkv) * d, k, dtype=dtype, seed=21, scale=k**-0.5)
    kwargs = {"normalize": True} if norm == "folded norm" else {"norm_weight": rand(k, dtype=torch.float32, seed=22,
                                                                                       scale=0.2)}
    position = torch.tensor([5], device=DEVICE)
    inv_freq = inverse_frequencies(d, 10000.0, torch.device(DEVICE))
    caches = [rand(1, max_len, hkv, d, dtype=dtype, seed=23 + i) for i in range(2)]
    caches += [c.clone() for c in caches]
    write_at = torch.tensor([6], device=DEVICE)
    q = decode_qkv_rope(x, w, hq, hkv, position, inv_freq, caches[0], caches[1], write_at, eps=1e-5,
                        block_h=4, block_k=64, **kwargs)
    qkv = decode_gemv(x, w, eps=1e-5, block_k=64, **kwargs)
    q2 = qkv_rope(qkv, position.view(1, 1), inv_freq, hq, hkv, caches[2], caches[3], write_at=write_at)
    assert q.shape == (1, 1, hq, d)
    for a, b in ((q, q2), (caches[0], caches[2]), (caches[1], caches[3])):
        assert (a.float() - b.float()).abs().max() <= (1e-6 if dtype == torch.float32 else 1e-2)
    rq, rk, rv = decode_qkv_rope_reference(x, w, hq, hkv, position, inv_freq, eps=1e-5, **kwargs)
    check(q, rq, dtype)
    check(caches[0][:, 6:7], rk, dtype)
    check(caches[1][:, 6:7], rv, dtype)
    untouched = rand(1, max_len, hkv, d, dtype=dtype, seed=23)
    assert torch.equal(caches[0][:, :6], untouched[:, :6]) and torch.equal(caches[0][:, 7:], untouched[:, 7:])


def test_decode_qkv_rope_rejects_bad_input():
    from cortexflow.kernels.decode_qkv_rope import decode_qkv_rope

    x = rand(1, 1, 32, dtype=torch.float32, seed=30)
    w = rand(4 * 8, 32, dtype=torch.float32, seed=31)
    cache = rand(1, 5, 1, 8, dtype=torch.float32, seed=32)
    pos = torch.tensor([1], device=DEVICE)
    inv = torch.ones(4, device=DEVICE)
    with pytest.raises(ValueError, match="one row"):
        decode_qkv_rope(rand(2, 32, dtype=torch.float32, seed=33), w, 2, 1, pos, inv, cache, cache, pos)
    with pytest.raises(ValueError, match="fused"):
        decode_qkv_rope(x, rand(4 * 7, 32, dtype=torch.float32, seed=34), 2, 1, pos, inv, cache, cache, pos)
    with pytest.raises(ValueError, match="k_cache"):
        decode_qkv_rope(x, w, 2, 1, pos, inv, cache[:, :, :, :4], cache, pos)


@pytest.mark.parametrize("allowed", [None, (40, 72)])
def test_triton_greedy_head_matches_the_reference_head(allowed, monkeypatch):
    """The Triton backend's one-row next token (final norm + LM head as one decode GEMV, then argmax) picks
    the reference's token for several inputs (which pick different tokens), with and without an allowed
    id range, and follows a change of the final norm's scale."""
    pytest.importorskip("triton")
    from cortexflow.backends import create_backend
    from cortexflow.models.llama import LlamaLM, prepare_llama_norms
    from cortexflow.models.token_decoding import DecoderDims

    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    lm = LlamaLM(DecoderDims(num_layers=1, num_heads=2, num_kv_heads=2, head_dim=8, rope_base=10000.0,
                             rms_norm_eps=1e-5))
    width, vocab = 16, 96
    weights = prepare_llama_norms({"llm.norm": 1.0 + rand(width, dtype=torch.float32, seed=40, scale=0.2),
                                   "llm.lm_head": rand(vocab, width, dtype=torch.float32, seed=41)})
    triton_backend = create_backend("triton", DEVICE, torch.float32)
    reference_backend = create_backend("pytorch", DEVICE, torch.float32)
    picked = set()
    for seed in range(6):
        h = rand(1, 1, width, dtype=torch.float32, seed=50 + seed, scale=2.0)
        expected = lm.next_token(reference_backend, weights, h, allowed)
        got = lm.next_token(triton_backend, weights, h, allowed)
        assert got.shape == (1,) and got.item() == expected.item()
        lo, hi = allowed or (0, vocab)
        assert lo <= got.item() < hi
        picked.add(got.item())
    assert len(picked) > 2
    # the final norm's scale reaches the head: where another scale changes the reference's token, ours follows
    other = prepare_llama_norms({"llm.norm": torch.linspace(0.05, 3.0, width, device=DEVICE),
                                 "llm.lm_head": weights["llm.lm_head"]})
    changed = 0
    for seed in range(60, 72):
        h = rand(1, 1, width, dtype=torch.float32, seed=seed, scale=2.0)
        pair = [lm.next_token(reference_backend, w, h, None).item() for w in (weights, other)]
        assert [lm.next_token(triton_backend, w, h, None).item() for w in (weights, other)] == pair
        changed += pair[0] != pair[1]
    assert changed > 0


FP8_VARIANTS = ["plain", "norm", "folded norm", "residual", "norm+silu gate", "folded norm+gelu gate"]
#: bf16 with E4M3 weights: Triton 3.7's interpreter casts fp32 to bf16 by truncation (1.999 -> 1.9922), at
#: each of the kernel's roundings (normalised x, gate, up, output), where the reference rounds to nearest.
FP8_BOUNDS = {**BOUNDS, torch.bfloat16: 3e-2}


def check_fp8(out, ref, dtype):
    out, ref = out.float(), ref.float()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel <= FP8_BOUNDS[dtype], f"‖Δ‖/‖ref‖ {rel:.3e} > {FP8_BOUNDS[dtype]:.0e}"


def fp8_weight(n, k, seed):
    """An E4M3 weight ``(n, k)`` and its per-row fp32 scales, rows of different magnitudes."""
    from cortexflow.quantization.fp8 import quantize_weight

    w = rand(n, k, dtype=torch.float32, seed=seed, scale=k**-0.5) * torch.logspace(-1, 1, n, device=DEVICE)[:, None]
    q = quantize_weight(w)
    return q.data, q.scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", FP8_VARIANTS)
def test_fp8_decode_gemv_matches_reference(dtype, variant):
    """E4M3 weights with per-row scales (weight-only FP8): the kernel's fp32 sums of ``x`` times the E4M3
    values, scaled per row, against the reference on the same E4M3 values. Odd K (1100) and N (37)."""
    k, n = 1100, 37
    x = rand(1, 1, k, dtype=dtype, seed=1, scale=3.0)
    kwargs = variant_kwargs(variant, k, n, dtype)
    w, scale = fp8_weight(2 * n if kwargs["gated"] else n, k, seed=2)
    out = decode_gemv(x, w, weight_scale=scale, block_n=8, block_k=512, **kwargs)
    assert out.shape == (1, 1, n) and out.dtype == dtype
    check_fp8(out, decode_gemv_reference(x, w, weight_scale=scale, **kwargs), dtype)
    # The default FP8 tiling (a K chunk larger than K here) gives the same values.
    check_fp8(decode_gemv(x, w, weight_scale=scale, **kwargs), out, dtype)


def test_fp8_decode_gemv_applies_each_rows_scale_and_matches_the_dequantised_weight():
    """Doubling one row's scale doubles that output alone; the result is the product with the dequantised
    weight up to fp32 rounding; the scale is required exactly for E4M3 weights."""
    from cortexflow.quantization.fp8 import Fp8Tensor

    k, n = 300, 12
    x = rand(k, dtype=torch.float32, seed=40)
    w, scale = fp8_weight(n, k, seed=41)
    base = decode_gemv(x, w, weight_scale=scale)
    scale2 = scale.clone()
    scale2[5] *= 2
    doubled = decode_gemv(x, w, weight_scale=scale2)
    torch.testing.assert_close(doubled[5], 2 * base[5])
    assert torch.equal(torch.cat([doubled[:5], doubled[6:]]), torch.cat([base[:5], base[6:]]))
    torch.testing.assert_close(base, Fp8Tensor(w, scale).dequantize() @ x, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="E4M3"):
        decode_gemv(x, w)
    with pytest.raises(ValueError, match="E4M3"):
        decode_gemv(x, w.float(), weight_scale=scale)
    with pytest.raises(ValueError, match="fp32"):
        decode_gemv(x, w, weight_scale=scale.bfloat16())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_decode_qkv_rope_matches_reference(dtype):
    """The fused QKV + RoPE + cache-write GEMV on an E4M3 weight against its reference (and against the FP8
    decode GEMV followed by the QKV/RoPE kernel); head_dim 24, K 200, 3 query heads on 1 KV head."""
    from cortexflow.kernels.decode_qkv_rope import decode_qkv_rope, decode_qkv_rope_reference
    from cortexflow.kernels.qkv_rope import qkv_rope
    from cortexflow.kernels.rope import inverse_frequencies

    hq, hkv, d, k, max_len = 3, 1, 24, 200, 9
    x = rand(1, 1, k, dtype=dtype, seed=20, scale=3.0)
    w, scale = fp8_weight((hq + 2 * hkv) * d, k, seed=21)
    kwargs = {"norm_weight": rand(k, dtype=torch.float32, seed=22, scale=0.2), "eps": 1e-5}
    position = torch.tensor([5], device=DEVICE)
    inv_freq = inverse_frequencies(d, 10000.0, torch.device(DEVICE))
    caches = [torch.zeros(1, max_len, hkv, d, dtype=dtype, device=DEVICE) for _ in range(4)]
    write_at = torch.tensor([6], device=DEVICE)
    q = decode_qkv_rope(x, w, hq, hkv, position, inv_freq, caches[0], caches[1], write_at, weight_scale=scale,
                        block_h=4, block_k=64, **kwargs)
    qkv = decode_gemv(x, w, weight_scale=scale, block_k=64, **kwargs)
    q2 = qkv_rope(qkv, position.view(1, 1), inv_freq, hq, hkv, caches[2], caches[3], write_at=write_at)
    for a, b in ((q, q2), (caches[0], caches[2]), (caches[1], caches[3])):
        assert (a.float() - b.float()).abs().max() <= (1e-5 if dtype == torch.float32 else 2e-2)
    rq, rk, rv = decode_qkv_rope_reference(x, w, hq, hkv, position, inv_freq, weight_scale=scale, **kwargs)
    check_fp8(q, rq, dtype)
    check_fp8(caches[0][:, 6:7], rk, dtype)
    check_fp8(caches[1][:, 6:7], rv, dtype)
    assert caches[0][:, 6].abs().sum() > 0 and not caches[0][:, :6].any()


@pytest.mark.parametrize("weight_format", ["bf16", "e4m3"])
@pytest.mark.parametrize("k_group,prefetch", [(16, False), (1, True), (8, True)])
@pytest.mark.parametrize("variant", ["norm+silu gate", "residual"])
def test_grouped_and_prefetching_decode_gemv_match_reference(weight_format, k_group, prefetch, variant):
    """``k_group`` (products summed in runs along K before the accumulator) and ``prefetch`` (the next chunk loaded
    before the current one is multiplied) change only the fp32 summation order: the reference's values, odd K
    (1100: partial chunks, the prefetch past the end masked) and N (37)."""
    k, n = 1100, 37
    x = rand(1, 1, k, dtype=torch.bfloat16, seed=51, scale=3.0)
    kwargs = variant_kwargs(variant, k, n, torch.bfloat16)
    rows = 2 * n if kwargs["gated"] else n
    if weight_format == "e4m3":
        w, kwargs["weight_scale"] = fp8_weight(rows, k, seed=52)
    else:
        w = rand(rows, k, dtype=torch.bfloat16, seed=52, scale=k**-0.5)
    out = decode_gemv(x, w, block_n=8, block_k=256, k_group=k_group, prefetch=prefetch, **kwargs)
    ref = decode_gemv_reference(x, w, **kwargs)
    (check_fp8 if weight_format == "e4m3" else check)(out, ref, torch.bfloat16)
    plain = decode_gemv(x, w, block_n=8, block_k=256, **kwargs)
    assert (out.float() - plain.float()).abs().max() <= 2 * torch.finfo(torch.bfloat16).eps * plain.float().abs().max()


@pytest.mark.parametrize("k_group,prefetch", [(16, False), (8, True)])
def test_grouped_and_prefetching_decode_qkv_rope_match_reference(k_group, prefetch):
    """The QKV/RoPE GEMV with ``k_group`` / ``prefetch`` on an E4M3 weight: the reference's q, k and v."""
    from cortexflow.kernels.decode_qkv_rope import decode_qkv_rope, decode_qkv_rope_reference
    from cortexflow.kernels.rope import inverse_frequencies

    hq, hkv, d, k, max_len = 3, 1, 24, 200, 9
    x = rand(1, 1, k, dtype=torch.bfloat16, seed=60, scale=3.0)
    w, scale = fp8_weight((hq + 2 * hkv) * d, k, seed=61)
    kwargs = {"norm_weight": rand(k, dtype=torch.float32, seed=62, scale=0.2), "eps": 1e-5, "weight_scale": scale}
    position = torch.tensor([5], device=DEVICE)
    inv_freq = inverse_frequencies(d, 10000.0, torch.device(DEVICE))
    caches = [torch.zeros(1, max_len, hkv, d, dtype=torch.bfloat16, device=DEVICE) for _ in range(2)]
    write_at = torch.tensor([6], device=DEVICE)
    q = decode_qkv_rope(x, w, hq, hkv, position, inv_freq, caches[0], caches[1], write_at, block_h=4, block_k=64,
                        k_group=k_group, prefetch=prefetch, **kwargs)
    rq, rk, rv = decode_qkv_rope_reference(x, w, hq, hkv, position, inv_freq, **kwargs)
    check_fp8(q, rq, torch.bfloat16)
    check_fp8(caches[0][:, 6:7], rk, torch.bfloat16)
    check_fp8(caches[1][:, 6:7], rv, torch.bfloat16)


def test_rows_per_program_keep_every_sm_busy():
    """A default tiling's rows per program are halved until the outputs give a program per SM: 2048 outputs at the
    16 rows chosen for OpenVLA's 4096 get 8 rows (256 programs on 132 SMs, not 128)."""
    from cortexflow.kernels.decode_gemv import default_tiling, rows_for_grid

    rows = default_tiling(4096, 4096, False).block_n
    assert rows == 16
    assert rows_for_grid(4096, rows, 132) == 16
    assert rows_for_grid(2048, rows, 132) == 8
    assert rows_for_grid(37, rows, 132) == 1
    assert rows_for_grid(2048, rows, 1) == 16  # the CPU counts as one processor: nothing changes there


def test_default_tilings_by_model_width():
    """bf16: K groups and prefetch from OpenVLA's width (4096) up, the earlier tilings for RT-2's 2048 (the new ones
    measured slower there); E4M3: K group 16 at both widths, and for the narrow model its own o, down and QKV/RoPE
    tilings."""
    from cortexflow.kernels.decode_gemv import GemvTiling, default_tiling
    from cortexflow.kernels import decode_qkv_rope as qkv

    # OpenVLA-7B (width 4096, MLP 11008) and RT-2's Gemma-2B (width 2048, MLP 16384), bf16
    assert default_tiling(2 * 11008, 4096, True) == GemvTiling(8, 1024, 8, 8)
    assert default_tiling(4096, 11008, False) == GemvTiling(16, 1024, 8, 8, True)
    assert default_tiling(4096, 4096, False) == GemvTiling(16, 1024, 8, 8, True)
    assert default_tiling(2 * 16384, 2048, True) == GemvTiling(16, 512, 4)
    assert default_tiling(2048, 16384, False) == GemvTiling(8, 2048, 8)
    assert default_tiling(2048, 2048, False) == GemvTiling(8, 1024, 4)
    assert qkv.DEFAULT_TILING.k_group == 8 and qkv.NARROW_TILING == GemvTiling(4, 512, 4)
    for n, k, gated in ((2 * 16384, 2048, True), (2048, 16384, False), (2048, 2048, False), (2 * 11008, 4096, True)):
        assert default_tiling(n, k, gated, fp8=True).k_group == 16
    # E4M3: the narrow model's own o / down / QKV-RoPE tilings (RT-2's sweep), OpenVLA's unchanged
    assert default_tiling(2048, 2048, False, fp8=True) == GemvTiling(4, 2048, 4, 16)
    assert default_tiling(2048, 16384, False, fp8=True) == GemvTiling(8, 2048, 8, 16, True)
    assert default_tiling(4096, 4096, False, fp8=True) == GemvTiling(8, 2048, 8, 16)
    assert default_tiling(4096, 11008, False, fp8=True) == GemvTiling(8, 1024, 8, 16, True)
    assert qkv.NARROW_FP8_TILING == GemvTiling(2, 1024, 4, 16) and qkv.DEFAULT_FP8_TILING == GemvTiling(4, 2048, 8, 16)
    # test-size widths (below 2048) keep the earlier E4M3 tilings
    assert default_tiling(256, 256, False, fp8=True) == GemvTiling(8, 2048, 8, 16)
    assert default_tiling(256, 16384, False, fp8=True) == GemvTiling(8, 1024, 8, 16, True)
    from cortexflow.kernels.decode_gemv import narrow_fp8_width

    assert [narrow_fp8_width(w) for w in (256, 2047, 2048, 3072, 4096)] == [False, False, True, True, False]
