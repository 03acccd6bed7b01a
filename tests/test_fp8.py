"""FP8 E4M3 quantisation: scales, round-to-nearest-even against the list of all E4M3 values, saturation, the support check."""


import pytest
import torch

from cortexflow.errors import InputError
from cortexflow.quantization.fp8 import (
    E4M3,
    E4M3_MAX,
    quantize_activation,
    quantize_weight,
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


def test_activation_scales_are_per_token():
    x = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(2))
    q = quantize_activation(x)
    assert q.shape == (6, 16)
    torch.testing.assert_close(q.scale, x.reshape(6, 16).abs().amax(1) / E4M3_MAX, rtol=0, atol=0)


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
