"""A single-token decode step's QKV projection with RoPE and the KV-cache write in its epilogue (Triton).

The same values as :func:`~cortexflow.kernels.decode_gemv.decode_gemv` (norm prologue, QKV GEMV, output
rounded to the activation dtype) followed by :func:`~cortexflow.kernels.qkv_rope.qkv_rope` (split-half
RoPE on Q and K, K/V written at cache row ``write_at``), in one kernel: no QKV tensor goes through memory
and one launch less per layer.

Layout: ``x (K,)`` (one row), the fused weight ``W ((Hq + 2 Hkv) * D, K)`` laid out ``[q heads | k heads |
v heads]`` with unit stride along ``K``; outputs ``q (1, 1, Hq, D)`` and cache rows
``k_cache[0, write_at]``, ``v_cache[0, write_at]`` of caches ``(1, L, Hkv, D)`` (last dim contiguous).
One program owns ``BLOCK_H`` rotation pairs of one head: weight rows ``h * D + j`` and ``h * D + D/2 + j``
for ``j`` in its block, so both halves that RoPE mixes are in the same program. An E4M3 ``W`` with per-row
fp32 scales (``weight_scale``) is the decode GEMV's weight-only FP8: each row's fp32 sum is multiplied by
its scale before the rounding and RoPE.

With ``attend`` the kernel also runs the step's attention (:func:`decode_qkv_rope_attention`): the programs are
ordered by KV head, each group of programs making one KV head's query heads, its K row and its V row; each
program counts itself in its group's arrival counter after its stores, and the group's last program to arrive
reads the group's rotated queries and the whole cache (the new row included) and writes the attention output of
those query heads (one key range, :func:`~cortexflow.kernels.attention.attend_range`; the same softmax as
:func:`~cortexflow.kernels.attention.attention`). Groups finish one after another while later groups still
stream their weights, so only the last groups' attention is not hidden behind the GEMV, and the step needs no
attention or combine launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cortexflow.kernels.attention import _MASKED_LOGIT, LOG2E, attend_range
from cortexflow.kernels.decode_gemv import WIDE_MODEL, GemvTiling, check_weight_scale, gemv_rows
from cortexflow.kernels.pdl import launch_options
from cortexflow.kernels.runtime import arrival_counters, next_power_of_two, upcast_dots

#: (rotation pairs per program, K chunk, warps, K group, prefetch) for bf16 / fp16 / fp32 weights: the fastest in
#: OpenVLA's 32 decode layers chained in one graph with PDL (``benchmarks/micro_decode_chain.py``; timings in
#: benchmarks/NOTES.md, "Tuning constants" and session 21), for a model width (K) of at least
#: :data:`~cortexflow.kernels.decode_gemv.WIDE_MODEL`; narrower models keep :data:`NARROW_TILING`. K group and
#: prefetch: as in :class:`~cortexflow.kernels.decode_gemv.GemvTiling`.
DEFAULT_TILING = GemvTiling(8, 512, 4, 8, True)
NARROW_TILING = GemvTiling(4, 512, 4)
#: The same for E4M3 weights.
DEFAULT_FP8_TILING = GemvTiling(4, 2048, 8, 16)


@triton.jit
def _attend_group(q_ptr, k_ptr, v_ptr, out_ptr, mask_ptr, kv_head, group, head_dim, k_len, s_k_t, s_k_h, s_v_t, s_v_h,
                  smk, scale_log2, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, KEY_PREFETCH: tl.constexpr):
    """Attention of the one query's heads ``kv_head * group ..`` (rotated, in ``q``) over every cache row
    ``0..k_len`` of ``kv_head``, normalised, into ``out (Hq, D)``. Every load is ``.cg`` (at L2): other
    programs of this launch wrote the queries and the new K/V row. One query head (``BLOCK_M`` 1): products and
    sums in registers (:func:`_attend_head`); several: the tensor-core key loop of the attention kernel, one
    stage deep (its K/V tiles are this kernel's only shared memory, which every GEMV program reserves too)."""
    if BLOCK_M == 1:
        _attend_head(q_ptr, k_ptr + kv_head * s_k_h, v_ptr + kv_head * s_v_h, out_ptr, mask_ptr, kv_head, head_dim,
                     k_len, s_k_t, s_v_t, smk, scale_log2, HAS_MASK, BLOCK_N, BLOCK_D, KEY_PREFETCH)
    else:
        rows = tl.arange(0, BLOCK_M)
        row_valid = rows < group
        heads = kv_head * group + rows
        offs_d = tl.arange(0, BLOCK_D)
        tile_ok = row_valid[:, None] & (offs_d < head_dim)[None, :]
        q = tl.load(q_ptr + heads[:, None] * head_dim + offs_d[None, :], mask=tile_ok, other=0.0,
                    cache_modifier=".cg")
        if UPCAST:
            q = q.to(tl.float32)
        acc, m_i, l_i = attend_range(q, k_ptr + kv_head * s_k_h, v_ptr + kv_head * s_v_h, s_k_t, s_v_t,
                                     mask_ptr + rows * 0, smk, 0, k_len, scale_log2, row_valid, head_dim, HAS_MASK,
                                     UPCAST, DOT_PRECISION, ".cg", BLOCK_M, BLOCK_N, BLOCK_D, STAGES=1)
        out = acc / tl.where(row_valid, l_i, 1.0)[:, None]
        tl.store(out_ptr + heads[:, None] * head_dim + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=tile_ok)


@triton.jit
def _attend_head(q_ptr, k_base, v_base, out_ptr, mask_ptr, head, head_dim, k_len, skl, svl, smk, scale_log2,
                 HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, KEY_PREFETCH: tl.constexpr):
    """The online softmax of :func:`~cortexflow.kernels.attention.attend_range` for one query row ``head`` without
    tensor cores: fp32 products of the query with each key tile summed along ``D``, ``p`` rounded to ``v``'s dtype
    before ``p · v`` (as the tensor-core loop feeds it), normalised into ``out[head]``. Each step loads its K and V
    tiles (and mask entries) together; with ``KEY_PREFETCH`` it loads the next step's before it computes with the
    current ones, so two steps' loads are in flight."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < head_dim
    q = tl.load(q_ptr + head * head_dim + offs_d, mask=d_ok, other=0.0, cache_modifier=".cg").to(tl.float32)
    m_i = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), axis=0)
    l_i = tl.sum(tl.zeros([BLOCK_N], tl.float32), axis=0)
    acc = tl.zeros([BLOCK_D], tl.float32)
    if KEY_PREFETCH:
        k, v, allowed = _key_tile(k_base, v_base, mask_ptr, offs_n, offs_d, d_ok, k_len, skl, svl, smk, HAS_MASK)
        for start in range(0, k_len, BLOCK_N):
            k_next, v_next, allowed_next = _key_tile(k_base, v_base, mask_ptr, start + BLOCK_N + offs_n, offs_d,
                                                     d_ok, k_len, skl, svl, smk, HAS_MASK)
            m_i, l_i, acc = _online_softmax_step(q, k, v, allowed, start + offs_n < k_len, m_i, l_i, acc, scale_log2,
                                                 HAS_MASK)
            k, v, allowed = k_next, v_next, allowed_next
    else:
        for start in range(0, k_len, BLOCK_N):
            k, v, allowed = _key_tile(k_base, v_base, mask_ptr, start + offs_n, offs_d, d_ok, k_len, skl, svl, smk,
                                      HAS_MASK)
            m_i, l_i, acc = _online_softmax_step(q, k, v, allowed, start + offs_n < k_len, m_i, l_i, acc, scale_log2,
                                                 HAS_MASK)
    tl.store(out_ptr + head * head_dim + offs_d, (acc / l_i).to(out_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def _online_softmax_step(q, k, v, allowed, k_ok, m_i, l_i, acc, scale_log2, HAS_MASK: tl.constexpr):
    """One key tile of the online softmax of one query row ``q (D,)`` over ``k, v (N, D)``: the new running max
    ``m_i`` (log2 units), sum ``l_i`` and unnormalised ``acc (D,)``."""
    s = tl.sum(k.to(tl.float32) * q[None, :], axis=1) * scale_log2
    if HAS_MASK:
        s = tl.where(allowed != 0, s, _MASKED_LOGIT)
    s = tl.where(k_ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=0))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new)
    p_v = p.to(v.dtype).to(tl.float32)
    return m_new, l_i * alpha + tl.sum(p, axis=0), acc * alpha + tl.sum(p_v[:, None] * v.to(tl.float32), axis=0)


@triton.jit
def _key_tile(k_base, v_base, mask_ptr, keys, offs_d, d_ok, k_len, skl, svl, smk, HAS_MASK: tl.constexpr):
    """The K and V rows ``keys`` (zeros past ``k_len``) and their mask entries (ones without a mask), at L2."""
    k_ok = keys < k_len
    tile_ok = k_ok[:, None] & d_ok[None, :]
    k = tl.load(k_base + keys[:, None] * skl + offs_d[None, :], mask=tile_ok, other=0.0, cache_modifier=".cg")
    v = tl.load(v_base + keys[:, None] * svl + offs_d[None, :], mask=tile_ok, other=0.0, cache_modifier=".cg")
    allowed = tl.full(keys.shape, 1, tl.uint8)
    if HAS_MASK:
        allowed = tl.load(mask_ptr + keys * smk, mask=k_ok, other=0)
    return k, v, allowed


@triton.jit
def _decode_qkv_rope_kernel(
    x_ptr, w_ptr, norm_w_ptr, w_scale_ptr, q_ptr, k_ptr, v_ptr, pos_ptr, inv_freq_ptr, write_at_ptr,
    out_ptr, mask_ptr, counter_ptr,
    n_q_heads, n_kv_heads, head_dim, half, k_dim, stride_w, eps, s_k_t, s_k_h, s_v_t, s_v_h,
    k_len, smk, scale_log2,
    NORM: tl.constexpr, SCALE: tl.constexpr, W_SCALE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    PDL: tl.constexpr, K_GROUP: tl.constexpr, PREFETCH: tl.constexpr,
    ATTEND: tl.constexpr = False, HAS_MASK: tl.constexpr = False, UPCAST: tl.constexpr = False,
    DOT_PRECISION: tl.constexpr = "tf32", BLOCK_M: tl.constexpr = 16, BLOCK_N: tl.constexpr = 64,
    BLOCK_D: tl.constexpr = 128, KEY_PREFETCH: tl.constexpr = False,
):
    blocks_per_head = tl.cdiv(half, BLOCK_H)
    block = tl.program_id(0) % blocks_per_head
    if ATTEND:
        # Programs in KV-head groups: the group's query heads, then its K head, then its V head.
        group = n_q_heads // n_kv_heads
        per_group = (group + 2) * blocks_per_head
        kv_head = tl.program_id(0) // per_group
        local = (tl.program_id(0) % per_group) // blocks_per_head
        head = tl.where(local < group, kv_head * group + local,
                        tl.where(local == group, n_q_heads + kv_head, n_q_heads + n_kv_heads + kv_head))
    else:
        head = tl.program_id(0) // blocks_per_head
    j = block * BLOCK_H + tl.arange(0, BLOCK_H)
    j_ok = j < half
    y1, y2 = gemv_rows(x_ptr, w_ptr, norm_w_ptr, w_scale_ptr, head * head_dim + j, j_ok, k_dim, half, stride_w,
                       eps, NORM, SCALE, True, W_SCALE, BLOCK_H, BLOCK_K, PDL, K_GROUP, PREFETCH)
    # The reference rounds the projection output, then rotates in fp32 (as qkv_rope does).
    out_ty = q_ptr.dtype.element_ty
    x1 = y1.to(out_ty).to(tl.float32)
    x2 = y2.to(out_ty).to(tl.float32)
    row = tl.load(write_at_ptr)
    if head < n_q_heads + n_kv_heads:
        angle = tl.load(pos_ptr).to(tl.float32) * tl.load(inv_freq_ptr + j, mask=j_ok, other=0.0)
        cos = tl.cos(angle)
        sin = tl.sin(angle)
        out1 = x1 * cos - x2 * sin
        out2 = x2 * cos + x1 * sin
        if head < n_q_heads:
            dst = q_ptr + head * head_dim
        else:
            dst = k_ptr + row * s_k_t + (head - n_q_heads) * s_k_h
    else:
        out1 = x1
        out2 = x2
        dst = v_ptr + row * s_v_t + (head - n_q_heads - n_kv_heads) * s_v_h
    tl.store(dst + j, out1.to(dst.dtype.element_ty), mask=j_ok)
    tl.store(dst + half + j, out2.to(dst.dtype.element_ty), mask=j_ok)
    if ATTEND:
        # Every thread's stores precede the (release) arrival; the group's last program (acquire) attends,
        # then zeroes the counter for the next launch.
        tl.debug_barrier()
        counter = counter_ptr + kv_head
        arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if arrived == per_group - 1:
            tl.debug_barrier()
            _attend_group(q_ptr, k_ptr, v_ptr, out_ptr, mask_ptr, kv_head, group, head_dim, k_len, s_k_t, s_k_h,
                          s_v_t, s_v_h, smk, scale_log2, HAS_MASK, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D,
                          KEY_PREFETCH)
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")


def decode_qkv_rope(
    x: torch.Tensor,
    weight: torch.Tensor,
    n_q_heads: int,
    n_kv_heads: int,
    position: torch.Tensor,
    inv_freq: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    write_at: torch.Tensor,
    *,
    norm_weight: torch.Tensor | None = None,
    normalize: bool = False,
    eps: float = 1e-6,
    weight_scale: torch.Tensor | None = None,
    block_h: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    k_group: int | None = None,
    prefetch: bool | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """Rotated ``q (1, 1, Hq, D)`` of the one row ``x`` (``K`` values, any leading dims of size 1); rotated
    K and plain V written into ``k_cache`` / ``v_cache (1, L, Hkv, D)`` at row ``write_at`` (a ``(1,)``
    int64 device tensor, never checked against ``L`` on the device). ``position``: the token's RoPE
    position, a one-element int tensor. ``norm_weight`` / ``normalize`` / ``eps``: the RMSNorm prologue
    of :func:`~cortexflow.kernels.decode_gemv.decode_gemv`; ``weight_scale ((Hq + 2 Hkv) * D,)`` fp32: the
    per-row scales of an E4M3 ``weight`` (required exactly then); ``pdl``: programmatic dependent launch.
    Tiling defaults to :data:`DEFAULT_TILING` (:data:`NARROW_TILING` below a width ``K`` of
    :data:`~cortexflow.kernels.decode_gemv.WIDE_MODEL`, :data:`DEFAULT_FP8_TILING` for E4M3; ``block_h`` pairs per
    program: ``2 * block_h`` weight rows); ``k_group``, ``prefetch``: as in
    :func:`~cortexflow.kernels.decode_gemv.decode_gemv`."""
    return _launch(x, weight, n_q_heads, n_kv_heads, position, inv_freq, k_cache, v_cache, write_at, None,
                   norm_weight=norm_weight, normalize=normalize, eps=eps, weight_scale=weight_scale, block_h=block_h,
                   block_k=block_k, num_warps=num_warps, k_group=k_group, prefetch=prefetch, pdl=pdl)


def decode_qkv_rope_attention(
    x: torch.Tensor,
    weight: torch.Tensor,
    n_q_heads: int,
    n_kv_heads: int,
    position: torch.Tensor,
    inv_freq: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    write_at: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    *,
    block_n: int | None = None,
    key_prefetch: bool = False,
    **kwargs,
) -> torch.Tensor:
    """:func:`decode_qkv_rope` followed by the step's attention, in one launch: the attention output
    ``(1, 1, Hq, D)`` of the rotated query over every row of ``k_cache`` / ``v_cache`` (the new one included),
    as :func:`~cortexflow.kernels.attention.attention` computes it (fp32 logits times ``scale``, ``mask (1, 1, L)``
    bool, True = may attend, or None). ``block_n``: keys per step of the attention (default 32; 64 for query heads
    sharing a KV head below head dimension 256; with one query head per KV head the tail's K/V tiles live in
    registers, and at 64 keys they cost the FP8 GEMV at OpenVLA's shapes a program per SM); ``key_prefetch``: with one query head per KV head, each step loads the next step's keys
    first; the other keywords are :func:`decode_qkv_rope`'s."""
    length = k_cache.shape[1]
    if mask is not None and (mask.dim() != 3 or mask.shape[:2] != (1, 1) or mask.shape[2] != length):
        raise ValueError(f"mask {tuple(mask.shape)} is not the (1, 1, {length}) mask of one query over the cache")
    if n_q_heads % n_kv_heads:
        raise ValueError(f"{n_q_heads} query heads do not share {n_kv_heads} KV heads evenly")
    return _launch(x, weight, n_q_heads, n_kv_heads, position, inv_freq, k_cache, v_cache, write_at, (mask, scale, key_prefetch),
                   block_n=block_n, **kwargs)


def _launch(x, weight, n_q_heads, n_kv_heads, position, inv_freq, k_cache, v_cache, write_at, attend, *,
            norm_weight=None, normalize=False, eps=1e-6, weight_scale=None, block_h=None, block_k=None,
            num_warps=None, k_group=None, prefetch=None, pdl=False, block_n=None):
    """The kernel launch of :func:`decode_qkv_rope` (``attend`` None: returns ``q``) and
    :func:`decode_qkv_rope_attention` (``attend = (mask, scale, key_prefetch)``: returns the attention output)."""
    k_dim = x.shape[-1]
    n_heads = n_q_heads + 2 * n_kv_heads
    if x.numel() != k_dim:
        raise ValueError(f"decode_qkv_rope takes one row, got x of shape {tuple(x.shape)}")
    if weight.shape[-1] != k_dim or weight.stride(-1) != 1 or weight.shape[0] % (2 * n_heads):
        raise ValueError(f"weight {tuple(weight.shape)} (stride {weight.stride()}) is not a fused "
                         f"({n_heads} heads x even head_dim, K={k_dim}) QKV weight")
    head_dim = weight.shape[0] // n_heads
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dim() != 4 or cache.shape[0] != 1 or cache.shape[2:] != (n_kv_heads, head_dim) or cache.stride(-1) != 1:
            raise ValueError(f"{name} {tuple(cache.shape)} is not a (1, L, {n_kv_heads}, {head_dim}) cache")
    if position.numel() != 1 or write_at.numel() != 1:
        raise ValueError("position and write_at each hold one value")
    fp8 = check_weight_scale(weight, weight_scale)
    tiling = DEFAULT_FP8_TILING if fp8 else DEFAULT_TILING if k_dim >= WIDE_MODEL else NARROW_TILING
    x1 = x.reshape(k_dim)
    if not x1.is_contiguous():
        x1 = x1.contiguous()
    half = head_dim // 2
    block_h = block_h or min(tiling.block_n, triton.next_power_of_2(half))
    block_k, num_warps = block_k or tiling.block_k, num_warps or tiling.warps
    k_group = tiling.k_group if k_group is None else k_group
    prefetch = tiling.prefetch if prefetch is None else prefetch
    if block_k % k_group:
        raise ValueError(f"k_group {k_group} does not divide block_k {block_k}")
    q = torch.empty((1, 1, n_q_heads, head_dim), dtype=x.dtype, device=x.device)
    grid = (n_heads * triton.cdiv(half, block_h),)
    if attend is None:
        out, mask, counters, extra = q, x1, x1, {}
        k_len = smk = scale_log2 = 0
    else:
        mask, scale, key_prefetch = attend
        out = torch.empty_like(q)
        counters = arrival_counters(x.device, n_kv_heads)
        group = n_q_heads // n_kv_heads
        k_len, scale_log2 = k_cache.shape[1], scale * LOG2E
        block_d = max(16, next_power_of_two(head_dim))
        extra = dict(ATTEND=True, HAS_MASK=mask is not None, UPCAST=upcast_dots(x.dtype),
                     DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                     BLOCK_M=1 if group == 1 else max(16, next_power_of_two(group)),
                     BLOCK_N=block_n or (32 if group == 1 or block_d > 128 else 64), BLOCK_D=block_d,
                     KEY_PREFETCH=key_prefetch)
        if mask is None:
            mask, smk = x1, 0
        else:
            mask = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
            smk = mask.stride(2)
    _decode_qkv_rope_kernel[grid](
        x1, weight, norm_weight if norm_weight is not None else x1, weight_scale if fp8 else x1, q, k_cache, v_cache,
        position, inv_freq, write_at, out, mask, counters, n_q_heads, n_kv_heads, head_dim, half, k_dim,
        weight.stride(0), eps, k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2),
        k_len, smk, scale_log2,
        NORM=norm_weight is not None or normalize, SCALE=norm_weight is not None, W_SCALE=fp8,
        BLOCK_H=block_h, BLOCK_K=block_k, PDL=pdl, K_GROUP=k_group, PREFETCH=prefetch, num_warps=num_warps,
        **extra, **launch_options(pdl),
    )
    return out


def decode_qkv_rope_reference(x, weight, n_q_heads, n_kv_heads, position, inv_freq, *, norm_weight=None,
                              normalize=False, eps=1e-6, weight_scale=None):
    """The op-by-op computation: ``(q, k, v)`` of shapes ``(1, 1, H, D)`` (q and k rotated); an E4M3
    ``weight`` with its ``weight_scale`` as :func:`~cortexflow.kernels.decode_gemv.decode_gemv_reference`."""
    from cortexflow.kernels.decode_gemv import decode_gemv_reference
    from cortexflow.kernels.qkv_rope import qkv_rope_reference

    qkv = decode_gemv_reference(x.reshape(1, 1, -1), weight, norm_weight=norm_weight, normalize=normalize, eps=eps,
                                weight_scale=weight_scale)
    return qkv_rope_reference(qkv, position.reshape(1, 1), inv_freq, n_q_heads, n_kv_heads)
