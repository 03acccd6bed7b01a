"""Non-overlapping patch embedding (SigLIP's stride-p convolution) as one implicit-im2col GEMM in Triton.

``images (N, C, H, W)`` (any strides), ``weight (D, C, p, p)``, ``bias (D,)`` -> ``(N, T, D)`` with
``T = (H/p) * (W/p)`` tokens in row-major patch order, the layout of ``conv2d(...).flatten(2).transpose(1, 2)``.
Row ``r = n * T + t`` of the GEMM is patch ``t`` of image ``n``; column ``k = (c * p + i) * p + j`` of its
``K = C p²`` inputs is pixel ``(c, ty * p + i, tx * p + j)``, read straight from the image (no unfolded
copy); the weight is its contiguous ``(D, K)`` view. fp32 accumulation, bias in the epilogue, output in
the images' dtype. fp32 products are exact fp32 (no TF32), like the other kernels' fp32 paths.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cortexflow.kernels.runtime import upcast_dots


@triton.jit
def _patch_embed_kernel(
    img_ptr, w_ptr, b_ptr, out_ptr,
    rows_total, tokens, grid_w, d_size, k_size, patch,
    sin, sic, sih, siw,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_valid = rows < rows_total
    col_valid = cols < d_size
    image = rows // tokens
    token = rows % tokens
    top = (token // grid_w) * patch
    left = (token % grid_w) * patch
    row_base = image * sin + top * sih + left * siw
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, k_size, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_valid = ks < k_size
        channel = ks // (patch * patch)
        within = ks % (patch * patch)
        offset = channel * sic + (within // patch) * sih + (within % patch) * siw
        a = tl.load(img_ptr + row_base[:, None] + offset[None, :], mask=row_valid[:, None] & k_valid[None, :], other=0.0)
        w = tl.load(w_ptr + cols[None, :] * k_size + ks[:, None], mask=k_valid[:, None] & col_valid[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        else:
            w = w.to(a.dtype)
        acc += tl.dot(a, w, input_precision=DOT_PRECISION)
    acc += tl.load(b_ptr + cols, mask=col_valid, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * d_size + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_valid[:, None] & col_valid[None, :])


def patch_embed(images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Stride-p patch convolution of ``images (N, C, H, W)`` with ``weight (D, C, p, p)`` + ``bias``:
    ``(N, (H/p)(W/p), D)`` in the images' dtype. H and W must be multiples of p."""
    n, c, h, w = images.shape
    d, wc, p, q = weight.shape
    if wc != c or p != q or h % p or w % p:
        raise ValueError(f"patch_embed: images {tuple(images.shape)} do not tile into weight {tuple(weight.shape)}")
    grid_w = w // p
    tokens = (h // p) * grid_w
    k_size = c * p * p
    weight2 = weight.reshape(d, k_size)
    if not weight2.is_contiguous():
        weight2 = weight2.contiguous()
    out = torch.empty((n, tokens, d), dtype=images.dtype, device=images.device)
    block_m, block_n, block_k = 64, 64, 32
    grid = (triton.cdiv(d, block_n), triton.cdiv(n * tokens, block_m))
    _patch_embed_kernel[grid](
        images, weight2, bias, out,
        n * tokens, tokens, grid_w, d, k_size, p,
        images.stride(0), images.stride(1), images.stride(2), images.stride(3),
        UPCAST=upcast_dots(images.dtype) or upcast_dots(weight.dtype),
        DOT_PRECISION="ieee" if torch.float32 in (images.dtype, weight.dtype) else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, num_stages=3,
    )
    return out


def patch_embed_reference(images, weight, bias):
    """The same computation with ``torch.nn.functional.conv2d`` in fp32, in the images' dtype."""
    p = weight.shape[-1]
    out = torch.nn.functional.conv2d(images.float(), weight.float(), bias.float(), stride=p)
    return out.flatten(2).transpose(1, 2).to(images.dtype)
