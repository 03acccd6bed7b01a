"""The single-token decode GEMV kernel (kernels/decode_gemv.py) against its op-by-op PyTorch reference."""

import pytest
import torch

from cortexflow.kernels.decode_gemv import decode_gemv, decode_gemv_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BOUNDS = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def rand(*shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=DEVICE)


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
    gated = {"norm+silu gate": "silu", "norm+gelu gate": "gelu_tanh"}.get(variant)
    w = rand(2 * n if gated else n, k, dtype=dtype, seed=2, scale=k**-0.5)
    kwargs = {"gated": gated}
    if variant.startswith("folded norm"):
        kwargs.update(normalize=True, eps=1e-5)
    elif "norm" in variant:
        kwargs.update(norm_weight=rand(k, dtype=torch.float32, seed=3, scale=0.2), eps=1e-5)
    if variant == "residual":
        kwargs["residual"] = rand(1, 1, n, dtype=dtype, seed=4)
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
