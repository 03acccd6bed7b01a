"""FP8 E4M3 quantisation (formula checks) and the weight-only FP8 linear kernel against its PyTorch reference."""

import os

import pytest
import torch

from cortexflow.errors import ConfigError, InputError
from cortexflow.quantization.fp8 import (
    E4M3,
    E4M3_MAX,
    Fp8Tensor,
    quantize_activation,
    quantize_weight,
    weight_only_linear_reference,
)


def _e4m3_grid() -> torch.Tensor:
    """Every finite E4M3FN value, sorted (from all 256 bit patterns)."""
    values = torch.arange(256, dtype=torch.uint8).view(E4M3).float()
    return torch.unique(values[torch.isfinite(values)])


def test_quantize_weight_scales_are_row_amax_over_448_and_values_round_to_nearest_even():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(37, 70, generator=g) * torch.logspace(-3, 2, 37)[:, None]
    q = quantize_weight(w)
    assert q.data.dtype == E4M3 and q.scale.dtype == torch.float32
    torch.testing.assert_close(q.scale, w.abs().amax(1) / E4M3_MAX, rtol=0, atol=0)
    # The largest entry of each row lands on +-448 exactly.
    assert torch.equal(q.data.float().abs().amax(1), torch.full((37,), E4M3_MAX))
    # Round to nearest, ties to even, against the list of all E4M3 values.
    grid = _e4m3_grid()
    scaled = (w / q.scale[:, None]).flatten()
    idx = torch.searchsorted(grid, scaled).clamp(1, len(grid) - 1)
    lo, hi = grid[idx - 1], grid[idx]
    nearest = torch.where((scaled - lo).abs() <= (hi - scaled).abs(), lo, hi)
    ties = (scaled - lo).abs() == (hi - scaled).abs()
    assert ties.sum() < 5  # random data: ties are rare; the entries that are not ties decide
    assert torch.equal(q.data.float().flatten()[~ties], nearest[~ties])
    # Relative error of each entry is at most half an E4M3 ulp (2^-4 of the value) above the subnormals.
    deq = q.dequantize()
    big = w.abs() > q.scale[:, None] * 2.0 ** -6
    assert ((deq - w).abs()[big] <= w.abs()[big] * 2.0 ** -4 + 1e-12).all()


def test_quantize_saturates_and_handles_zero_rows_and_is_deterministic():
    w = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5], [1e-30, 0.0, -1e-30]])
    q = quantize_weight(w)
    assert q.scale[0] == 1.0 and torch.equal(q.data[0].float(), torch.zeros(3))
    assert q.data[1].float().tolist() == [224.0, -448.0, 112.0]
    assert torch.isfinite(q.data.float()).all()
    again = quantize_weight(w.clone())
    assert torch.equal(q.data.view(torch.uint8), again.data.view(torch.uint8)) and torch.equal(q.scale, again.scale)


def test_quantize_rejects_bad_input_with_the_argument_named():
    with pytest.raises(InputError, match="2-D"):
        quantize_weight(torch.randn(3, 4, 5))
    with pytest.raises(InputError, match="NaN"):
        quantize_weight(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(InputError, match="floating-point"):
        quantize_weight(torch.ones(2, 2, dtype=torch.int32))
    q = quantize_weight(torch.randn(4, 8))
    with pytest.raises(InputError, match="8"):
        weight_only_linear_reference(torch.randn(2, 5), q)
    with pytest.raises(ConfigError, match="quantize_weight"):
        weight_only_linear_reference(torch.randn(2, 8), Fp8Tensor(q.data.float(), q.scale))


def test_activation_scales_are_per_token():
    x = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(2))
    q = quantize_activation(x)
    assert q.shape == (6, 16)
    torch.testing.assert_close(q.scale, x.reshape(6, 16).abs().amax(1) / E4M3_MAX, rtol=0, atol=0)


def test_weight_only_reference_is_close_to_the_unquantised_product():
    g = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(51, 256, generator=g), torch.randn(96, 256, generator=g) * 0.05, torch.randn(96, generator=g)
    y = weight_only_linear_reference(x, quantize_weight(w), b)
    ref = x @ w.T + b
    rel = (y - ref).norm() / ref.norm()
    assert 1e-4 < rel < 3e-2  # E4M3 keeps 3 mantissa bits: a real but small error


@pytest.fixture
def device():
    """Where the kernel runs: the GPU when there is one, else the CPU under Triton's interpreter (conftest.py
    switches it on on machines without CUDA)."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return "cuda"
    assert os.environ.get("TRITON_INTERPRET") == "1"
    return "cpu"


@pytest.mark.parametrize("m,n,k,split_k,dtype", [
    (51, 96, 256, 1, torch.float32),
    (51, 96, 256, 2, torch.float32),
    (5, 40, 200, 1, torch.bfloat16),
    (17, 64, 384, 3, torch.bfloat16),
])
def test_fp8_linear_kernel_matches_the_reference(device, m, n, k, split_k, dtype):
    from cortexflow.kernels.fp8_linear import Fp8Tiling, fp8_linear

    g = torch.Generator().manual_seed(m * 1000 + k)
    x = torch.randn(m, k, generator=g).to(dtype).to(device)
    w = quantize_weight((torch.randn(n, k, generator=g) * 0.05).to(device))
    bias = torch.randn(n, generator=g).to(dtype).to(device)
    tiling = Fp8Tiling(block_m=16, block_n=32, block_k=64, split_k=split_k)
    got = fp8_linear(x, w, bias, tiling)
    ref = weight_only_linear_reference(x, w, bias)
    assert got.dtype == dtype and got.shape == (m, n)
    err = (got.float() - ref.float()).norm() / ref.float().norm()
    # fp32 on a GPU: tl.dot in "ieee" precision, only the summation order differs
    assert err < (1e-6 if dtype == torch.float32 else 8e-3), err


def test_fp8_linear_kernel_keeps_leading_dims_and_checks_shapes(device):
    from cortexflow.kernels.fp8_linear import Fp8Tiling, fp8_linear

    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(5)).to(device)
    w = quantize_weight(torch.randn(32, 64, generator=torch.Generator().manual_seed(6)).to(device))
    got = fp8_linear(x, w, tiling=Fp8Tiling(block_m=16, block_n=32, block_k=32))
    assert got.shape == (2, 3, 32)
    torch.testing.assert_close(got, weight_only_linear_reference(x, w), rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match="features"):
        fp8_linear(torch.randn(3, 63, device=device), w)
    with pytest.raises(InputError, match="fp32, fp16 or bf16"):
        fp8_linear(torch.randn(3, 64, device=device).double(), w)


def test_quantize_named_is_deterministic_and_names_missing_weights():
    from cortexflow.quantization.fp8 import quantize_named

    g = torch.Generator().manual_seed(7)
    weights = {"a.weight": torch.randn(8, 16, generator=g).bfloat16(), "b.weight": torch.randn(4, 16, generator=g)}
    first = quantize_named(weights, ["b.weight", "a.weight"])
    second = quantize_named({k: v.clone() for k, v in weights.items()}, ["a.weight", "b.weight"])
    assert list(first) == ["a.weight", "b.weight"]
    for name in first:
        assert torch.equal(first[name].data.view(torch.uint8), second[name].data.view(torch.uint8))
        assert torch.equal(first[name].scale, second[name].scale)
    with pytest.raises(ConfigError, match="c.weight"):
        quantize_named(weights, ["a.weight", "c.weight"])


def test_fp8_support_check(monkeypatch):
    from cortexflow.kernels import runtime
    from cortexflow.quantization.fp8 import fp8_unsupported_reason

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "interpreter" in fp8_unsupported_reason(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "CUDA GPU" in fp8_unsupported_reason(torch.device("cpu"))
    for arch, ok in ((80, False), (86, False), (89, True), (90, True)):
        previous = runtime.set_compile_target(runtime.CompileTarget(arch=arch))
        try:
            reason = fp8_unsupported_reason(torch.device("meta"))
        finally:
            runtime.set_compile_target(previous)
        assert (reason is None) == ok, (arch, reason)
        if not ok:
            assert f"{arch // 10}.{arch % 10}" in reason


FP8_COMPILE_SCRIPT = r"""
import json, sys, torch
from cortexflow.kernels.fp8_linear import Fp8Tiling, fp8_linear
from cortexflow.kernels.runtime import CompileTarget
from cortexflow.quantization.fp8 import E4M3, Fp8Tensor
from cortexflow.tools.compile_check import compile_only

meta = torch.device("meta")
x = torch.empty(51, 1024, dtype=torch.bfloat16, device=meta)
weight = Fp8Tensor(torch.empty(2560, 1024, dtype=E4M3, device=meta), torch.empty(2560, dtype=torch.float32, device=meta))
out = {}
for arch in (89, 90):
    with compile_only(CompileTarget(arch=arch, processors=132)) as launches:
        fp8_linear(x, weight, torch.empty(2560, dtype=torch.bfloat16, device=meta))
        fp8_linear(x, weight, tiling=Fp8Tiling(block_n=32, block_k=256, split_k=4))
    out[arch] = [{"name": l.name, "grid": list(l.grid), "atomic": l.constexprs.get("ATOMIC"),
                  "ptx_fp8": "e4m3" in l.kernel.asm["ptx"]} for l in launches]
json.dump(out, sys.stdout)
"""


def test_fp8_linear_compiles_for_ada_and_hopper(tmp_path):
    """The kernel through Triton's whole pipeline for sm_89 (L4, RTX 4090) and sm_90 (H100) on ``meta`` tensors
    (compile-check's compile-only launches, in a subprocess without the interpreter); its PTX converts E4M3."""
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")
    done = subprocess.run([sys.executable, "-c", FP8_COMPILE_SCRIPT], capture_output=True, text=True, timeout=600,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    report = json.loads(done.stdout)
    for arch in ("89", "90"):
        plain, split = report[arch]
        assert plain["name"] == split["name"] == "_fp8_linear_kernel"
        assert plain["grid"] == [40, 1, 1] and plain["atomic"] is False   # 2560 / 64 column tiles, one K range
        assert split["grid"] == [80, 1, 4] and split["atomic"] is True
        assert plain["ptx_fp8"] and split["ptx_fp8"]
