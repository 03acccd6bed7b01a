"""kernels/gemm.py: the small-M GEMM against its PyTorch reference, every epilogue, with and without split-K and
tensor-descriptor loads, on ragged shapes (M, N, K not multiples of the tiles)."""

import pytest
import torch

from cortexflow.kernels.gemm import GemmTiling, gemm, gemm_reference, k_ranges, workspace_shape

M, N, K = 70, 136, 200


def _inputs(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(M, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) * K ** -0.5).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype)
    residual = torch.randn(M, N, generator=g).to(dtype)
    return a, w, bias, residual


def _rel(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("descriptors", [False, True])
@pytest.mark.parametrize("epilogue", ["none", "bias", "bias_gelu", "residual"])
def test_gemm_matches_reference_fp32(epilogue, descriptors, splits):
    a, w, bias, residual = _inputs(torch.float32, seed=splits + 7 * descriptors)
    tiling = GemmTiling(block_m=32, block_n=64, block_k=32, splits=splits, descriptors=descriptors, num_warps=4)
    kwargs = {"bias": bias} if epilogue in ("bias", "bias_gelu") else {}
    if epilogue == "bias_gelu":
        kwargs["gelu"] = True
    if epilogue == "residual":
        out = residual.clone()
        gemm(a, w, out, tiling, residual=True)
        ref = gemm_reference(a, w, residual=residual)
    else:
        out = torch.full((M, N), float("nan"))
        gemm(a, w, out, tiling, **kwargs)
        ref = gemm_reference(a, w, **kwargs)
    assert _rel(out, ref) < 1e-5


def test_gemm_bf16_rounds_like_the_reference():
    """bf16 in and out (the interpreter truncates instead of rounding: within one bf16 step of the reference)."""
    a, w, bias, _ = _inputs(torch.bfloat16, seed=3)
    out = torch.empty(M, N, dtype=torch.bfloat16)
    gemm(a, w, out, GemmTiling(block_m=32, block_n=64, block_k=32, splits=2, num_warps=4), bias=bias, gelu=True)
    ref = gemm_reference(a, w, bias=bias, gelu=True)
    assert _rel(out, ref) < 1e-2


def test_split_ranges_cover_k_in_whole_steps():
    t = GemmTiling(block_k=64, splits=4)
    assert k_ranges(4304, t) == (1088, 4)  # 17 steps a range, the last range partly past K
    assert k_ranges(100, GemmTiling(block_k=64, splits=4)) == (64, 2)  # no empty range
    assert workspace_shape(512, 1152, 4304, t) == (4, 512, 1152)
    assert workspace_shape(512, 1152, 4304, GemmTiling(splits=1)) is None


def test_gemm_rejects_mismatched_arguments():
    a, w, bias, residual = _inputs(torch.float32, seed=0)
    tiling = GemmTiling(block_m=32, block_n=64, block_k=32, num_warps=4)
    with pytest.raises(ValueError, match="do not match"):
        gemm(a, w, torch.empty(M, N + 1), tiling)
    with pytest.raises(ValueError, match="contiguous"):
        gemm(a.t().contiguous().t(), w, torch.empty(M, N), tiling)
    with pytest.raises(ValueError, match="no bias or GELU"):
        gemm(a, w, residual.clone(), tiling, bias=bias, residual=True)
    with pytest.raises(ValueError, match="pass bias"):
        gemm(a, w, torch.empty(M, N), tiling, gelu=True)
    with pytest.raises(ValueError, match="workspace needs"):
        gemm(a, w, torch.empty(M, N), GemmTiling(block_m=32, block_n=64, block_k=32, splits=2, num_warps=4),
             workspace=torch.empty(10))
