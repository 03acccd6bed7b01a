"""The split-K skinny GEMM kernel (cortexflow/kernels/skinny_gemm.py) against its PyTorch references.

CPU: Triton interpreter; GPU: the real kernel. Shapes are not multiples of the blocks (K ranges of
unequal fill, a last N tile half empty, M not a multiple of the row block); several K splits exercise
the arrival counters and the in-order sum; fresh random inputs each run.
"""

import pytest
import torch

from cortexflow.kernels.runtime import arrival_counters
from cortexflow.kernels.skinny_gemm import (
    choose_k_splits,
    skinny_euler_,
    skinny_euler_reference,
    skinny_gelu_gate,
    skinny_gelu_gate_reference,
    skinny_linear,
    skinny_linear_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REL_BOUND = {torch.float32: 1e-5, torch.float16: 2e-3}


def rand(*shape, dtype):
    return torch.randn(*shape).to(dtype=dtype, device=DEVICE)


def assert_close(out, ref, dtype):
    out, ref = out.float(), ref.float()
    assert torch.isfinite(out).all()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel <= REL_BOUND[dtype], f"rel L2 {rel:.3e}"
    max_abs = (out - ref).abs().max().item()
    assert max_abs <= 10 * REL_BOUND[dtype] * (ref.abs().max().item() + 1.0), f"max |d| {max_abs:.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_splits", [1, 2, 3, 7])
def test_linear_with_bias_and_residual(dtype, num_splits):
    x = rand(2, 17, 200, dtype=dtype)  # M = 34 rows, K = 200 (4 blocks, the last partial)
    weight = rand(72, 200, dtype=dtype) / 10
    bias, residual = rand(72, dtype=dtype), rand(2, 17, 72, dtype=dtype)
    out = skinny_linear(x, weight, bias, residual, num_splits=num_splits)
    assert out.shape == (2, 17, 72) and out.dtype == dtype
    assert_close(out, skinny_linear_reference(x, weight, bias, residual), dtype)
    assert_close(skinny_linear(x, weight, num_splits=num_splits), skinny_linear_reference(x, weight), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_gelu_gate_dual_gemm(dtype, num_splits):
    x = rand(51, 130, dtype=dtype)
    weight = rand(2 * 40, 130, dtype=dtype) / 8  # [W_gate; W_up], F = 40
    bias = rand(80, dtype=dtype)
    out = skinny_gelu_gate(x, weight, bias, num_splits=num_splits)
    assert out.shape == (51, 40)
    assert_close(out, skinny_gelu_gate_reference(x, weight, bias), dtype)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_euler_update_in_place(num_splits):
    state = torch.randn(2, 5, 32, device=DEVICE)
    x = rand(2, 5, 96, dtype=torch.float16)
    weight, bias = rand(32, 96, dtype=torch.float16) / 10, rand(32, dtype=torch.float16)
    expected = skinny_euler_reference(state.clone(), x, weight, bias, -0.1)
    returned = skinny_euler_(state, x, weight, bias, -0.1, num_splits=num_splits)
    assert returned is state
    assert_close(state, expected, torch.float16)
    with pytest.raises(ValueError, match="float32 state"):
        skinny_euler_(state.half(), x, weight, bias, -0.1)


def test_strided_rows_and_counters_back_at_zero():
    """x as a column slice of a wider tensor (rows strided); a second launch (as a CUDA graph replay)
    starts from zeroed counters; a counter left non-zero would skip or repeat a tile's finish."""
    wide = rand(40, 300, dtype=torch.float32)
    x = wide[:, 50:250]
    weight = rand(130, 200, dtype=torch.float32)
    counters = arrival_counters(torch.device(DEVICE), 1)
    counters.fill_(0)
    for _ in range(2):
        assert_close(skinny_linear(x, weight, num_splits=3), skinny_linear_reference(x, weight), torch.float32)
        assert int(counters.abs().sum()) == 0


def test_choose_k_splits_fills_the_gpu_only_for_few_tiles():
    assert choose_k_splits(tiles=40, k_size=1024, processors=132) == 4  # Pi0 expert QKV: 2560 / 64 tiles
    assert choose_k_splits(tiles=16, k_size=4096, processors=132) == 9  # down projection
    assert choose_k_splits(tiles=1, k_size=1024, processors=132) == 8  # the action head: K bounds the splits
    assert choose_k_splits(tiles=160, k_size=1024, processors=132) == 1  # enough tiles already


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="features"):
        skinny_linear(rand(3, 10, dtype=torch.float32), rand(4, 12, dtype=torch.float32))


def test_triton_backend_linear_uses_the_skinny_gemm_for_few_rows(monkeypatch):
    """With CORTEXFLOW_TRITON_SKINNY_GEMM=1 the backend's linear runs the split-K kernel for <= 64 rows
    (weights promoted to x's dtype, as the reference op does) and cuBLAS/torch above."""
    import cortexflow.kernels.skinny_gemm as skinny
    from cortexflow.backends.triton_backend import TritonBackend

    monkeypatch.setenv("CORTEXFLOW_TRITON_SKINNY_GEMM", "1")
    backend = TritonBackend(torch.device(DEVICE), torch.float32)
    calls = []
    original = skinny.skinny_linear
    monkeypatch.setattr(skinny, "skinny_linear", lambda *a, **k: calls.append(a[0].shape) or original(*a, **k))
    x, weight, bias = rand(1, 3, 48, dtype=torch.float32), rand(20, 48, dtype=torch.float16), rand(20, dtype=torch.float16)
    assert_close(backend.linear(x, weight, bias), skinny_linear_reference(x, weight.float(), bias.float()), torch.float32)
    big = rand(65, 48, dtype=torch.float32)
    assert_close(backend.linear(big, weight, bias), skinny_linear_reference(big, weight.float(), bias.float()), torch.float32)
    assert calls == [(1, 3, 48)]
