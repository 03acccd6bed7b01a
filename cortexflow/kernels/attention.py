"""Fused softmax attention (flash-attention style, forward only) in Triton, with grouped / multi-query
KV heads, an optional boolean mask and split-KV ("flash-decoding") for short query blocks.

Layouts: ``q (B, Lq, Hq, D)``, ``k, v (B, Lk, Hkv, D)`` (any strides with a contiguous last dim; ``Hq``
a multiple of ``Hkv``), ``mask (B, Lq, Lk)`` bool (True = may attend) or None; output ``(B, Lq, Hq, D)``.
Logits are fp32 (``q·k * scale``); masked logits get openpi's finite -2.3819763e38 (so a query with no
visible key averages all keys, exactly like the reference); softmax is online in fp32; ``p`` is cast to
``v``'s dtype for the second product. ``D`` need not be a power of two (SigLIP's 72 is padded to 128 in
registers).

Work split: the ``Hq / Hkv`` query heads that share one KV head are packed into the rows of one tile
(row ``r`` = query ``r // group``, head ``r % group`` of the group), so a KV tile is loaded once for the
whole group (Pi0's Gemma has 8 query heads on 1 KV head). One program handles ``BLOCK_M`` such rows of
one (batch, KV head) and a range of keys. When the (row block, batch, KV head) grid is too small to fill
the GPU — the denoising step: 51 queries x 8 heads = 7 row blocks — the keys are split into ranges
processed in parallel; each writes its unnormalised fp32 accumulator with its running max and sum, and
a second kernel merges the ranges (the log-sum-exp combine). With ``fused_combine`` there is no second
kernel: each range program bumps an arrival counter of its (row block, batch x KV head) tile after
writing its partials, and the last one to arrive merges all ranges and resets the counter to 0 (so the
counters stay zero between calls and inside CUDA graph replays). One launch instead of two per call.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cortexflow.kernels.pdl import launch_options, pdl_release, pdl_wait
from cortexflow.kernels.runtime import arrival_counters, interpreting, next_power_of_two, processor_count, upcast_dots

MASKED_LOGIT = -2.3819763e38
_MASKED_LOGIT = tl.constexpr(MASKED_LOGIT)
LOG2E = 1.4426950408889634
#: A key range of a split holds at least this many key blocks (1: OpenVLA's decode step, 290 keys in 64-key
#: blocks, runs faster at 5 ranges than at 3; benchmarks/NOTES.md, "Tuning constants").
MIN_BLOCKS_PER_SPLIT = 1


@triton.jit
def merge_ranges(part_acc_ptr, part_ml_ptr, out_ptr, b, kv_h, b_kvh, n_bkv, rows, q_len, head_dim, group, n_splits,
                 sob, sol, soh, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Merge the key ranges of rows ``rows`` of tile ``b_kvh``:
    ``out = Σ_s 2^(m_s - m) acc_s / Σ_s 2^(m_s - m) l_s`` with ``m = max_s m_s``."""
    n_rows = q_len * group
    row_valid = rows < n_rows
    offs_d = tl.arange(0, BLOCK_D)
    m_run = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_run = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for split in range(0, n_splits):
        base = (split * n_bkv + b_kvh) * n_rows + rows
        # .cg: read at L2, where the other programs' partials are (never a stale L1 line).
        m_s = tl.load(part_ml_ptr + base * 2, mask=row_valid, other=0.0, cache_modifier=".cg")
        l_s = tl.load(part_ml_ptr + base * 2 + 1, mask=row_valid, other=0.0, cache_modifier=".cg")
        acc_s = tl.load(part_acc_ptr + base[:, None] * BLOCK_D + offs_d[None, :], mask=row_valid[:, None], other=0.0,
                        cache_modifier=".cg")
        m_new = tl.maximum(m_run, m_s)
        alpha = tl.exp2(m_run - m_new)
        beta = tl.exp2(m_s - m_new)
        l_run = l_run * alpha + l_s * beta
        acc = acc * alpha[:, None] + acc_s * beta[:, None]
        m_run = m_new
    _store_output(acc / tl.where(row_valid, l_run, 1.0)[:, None], out_ptr, b, kv_h, rows, row_valid, 0, head_dim,
                  group, sob, sol, soh, BLOCK_D)


@triton.jit
def _store_output(out, out_ptr, b, kv_h, rows, row_valid, col0, n_cols, group, sob, sol, soh, COLS: tl.constexpr):
    """Store the normalised ``out (rows, COLS)``, the head columns ``col0..col0+COLS`` (``n_cols`` of them valid) of
    packed rows ``rows`` (query ``r // group``, head ``kv_h * group + r % group``), into ``out_ptr`` (batch, query,
    head strides ``sob, sol, soh``)."""
    offs = tl.arange(0, COLS)
    query = rows // group
    head = kv_h * group + rows % group
    tl.store(
        out_ptr + b * sob + query[:, None] * sol + head[:, None] * soh + col0 + offs[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_valid[:, None] & (offs < n_cols)[None, :],
    )


@triton.jit
def _halves(x, ROWS: tl.constexpr, COLS: tl.constexpr):
    """``x[:, :COLS // 2], x[:, COLS // 2:]`` of a ``(ROWS, COLS)`` register tile."""
    return tl.split(tl.permute(tl.reshape(x, [ROWS, 2, COLS // 2]), [0, 2, 1]))


@triton.jit
def _part_logits(qj, j, k_base, keys, skl, k_valid, head_dim, scale_log2, UPCAST: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, CACHE: tl.constexpr, PART: tl.constexpr):
    """``qj · k[:, j*PART:(j+1)*PART]ᵀ * scale_log2`` in fp32 for the keys ``keys`` (``qj``: the query tile's
    columns ``j*PART..``)."""
    cols = j * PART + tl.arange(0, PART)
    kt = tl.load(k_base + keys[None, :] * skl + cols[:, None], mask=k_valid[None, :] & (cols < head_dim)[:, None],
                 other=0.0, cache_modifier=CACHE)
    if UPCAST:
        kt = kt.to(tl.float32)
    return tl.dot(qj, kt, input_precision=DOT_PRECISION) * scale_log2


@triton.jit
def _logits(q0, q1, q2, q3, k_base, keys, skl, k_valid, head_dim, scale_log2, UPCAST: tl.constexpr,
            DOT_PRECISION: tl.constexpr, CACHE: tl.constexpr, D_PARTS: tl.constexpr, BLOCK_D: tl.constexpr):
    """``q · kᵀ * scale_log2`` in fp32 for the keys ``keys`` as ``D_PARTS`` (1, 2 or 4) products over
    ``BLOCK_D / D_PARTS`` columns each, summed after (``q0..q3``: the query tile's column parts; the unused ones
    are ignored). Separate products are independent chains of MMAs, where one product over all ``BLOCK_D``
    columns is one chain of ``BLOCK_D / 16`` dependent MMAs per warp; each part is scaled before the sum, which
    keeps the compiler from folding the sum into one chain (an add of two dots becomes a dot accumulating the
    other)."""
    PART: tl.constexpr = BLOCK_D // D_PARTS
    s = _part_logits(q0, 0, k_base, keys, skl, k_valid, head_dim, scale_log2, UPCAST, DOT_PRECISION, CACHE, PART)
    if D_PARTS >= 2:
        s += _part_logits(q1, 1, k_base, keys, skl, k_valid, head_dim, scale_log2, UPCAST, DOT_PRECISION, CACHE, PART)
    if D_PARTS == 4:
        s += _part_logits(q2, 2, k_base, keys, skl, k_valid, head_dim, scale_log2, UPCAST, DOT_PRECISION, CACHE, PART)
        s += _part_logits(q3, 3, k_base, keys, skl, k_valid, head_dim, scale_log2, UPCAST, DOT_PRECISION, CACHE, PART)
    return s


@triton.jit
def attend_range(q, k_base, v_base, skl, svl, mask_rows, smk, key_start, key_end, scale_log2, row_valid, head_dim,
                 HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, CACHE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D_PARTS: tl.constexpr = 1):
    """Online softmax of the rows ``q (BLOCK_M, BLOCK_D)`` over keys ``key_start..key_end`` of one KV head
    (``k_base``/``v_base`` point at key 0, rows ``skl``/``svl`` apart; ``mask_rows`` at each row's mask
    entry for key 0, keys ``smk`` apart). Returns the unnormalised fp32 ``acc``, the running max ``m`` (log2
    units) and sum ``l``. ``CACHE``: the loads' cache modifier (".cg" where another program of the same
    launch wrote the keys). ``D_PARTS`` (1, 2 or 4; ``BLOCK_D / D_PARTS >= 16``): the logits as that many
    independent products over column parts (:func:`_logits`), for a tile so short that each warp's share of the
    logits is one MMA chain."""
    return _continue_range(q, k_base, v_base, skl, svl, mask_rows, smk, key_start, key_end, scale_log2, row_valid,
                          head_dim, tl.zeros([BLOCK_M, BLOCK_D], tl.float32),
                          tl.full([BLOCK_M], float("-inf"), tl.float32), tl.zeros([BLOCK_M], tl.float32),
                          HAS_MASK, UPCAST, DOT_PRECISION, CACHE, BLOCK_M, BLOCK_N, BLOCK_D, D_PARTS, head_dim, BLOCK_D)


@triton.jit
def attend_value_part(q, k_base, v_base, skl, svl, mask_rows, smk, key_start, key_end, scale_log2, row_valid, head_dim,
                      v_cols, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      CACHE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      D_PARTS: tl.constexpr, V_COLS: tl.constexpr):
    """:func:`attend_range` with the values' columns ``0..V_COLS`` from ``v_base`` only (``v_cols`` of them
    valid): the logits over all ``head_dim`` columns of ``q`` and the keys, so ``m`` and ``l`` are those of the
    whole head, and ``acc (BLOCK_M, V_COLS)`` those columns of its unnormalised output. Programs that own
    different column parts of one tile compute the same logits; each holds a part of the accumulator."""
    return _continue_range(q, k_base, v_base, skl, svl, mask_rows, smk, key_start, key_end, scale_log2, row_valid,
                          head_dim, tl.zeros([BLOCK_M, V_COLS], tl.float32),
                          tl.full([BLOCK_M], float("-inf"), tl.float32), tl.zeros([BLOCK_M], tl.float32),
                          HAS_MASK, UPCAST, DOT_PRECISION, CACHE, BLOCK_M, BLOCK_N, BLOCK_D, D_PARTS, v_cols, V_COLS)


@triton.jit
def _continue_range(q, k_base, v_base, skl, svl, mask_rows, smk, key_start, key_end, scale_log2, row_valid, head_dim,
                   acc, m_i, l_i, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   CACHE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   D_PARTS: tl.constexpr, v_cols, V_COLS: tl.constexpr):
    """:func:`attend_range` from the running state ``acc (BLOCK_M, V_COLS)``, ``m_i``, ``l_i`` of keys before
    ``key_start``; the values' columns ``0..V_COLS`` from ``v_base`` (``v_cols`` of them valid)."""
    offs_v = tl.arange(0, V_COLS)
    offs_n = tl.arange(0, BLOCK_N)
    v_valid = offs_v < v_cols
    if D_PARTS == 1:
        q0 = q
        q1 = q
        q2 = q
        q3 = q
    else:
        low, high = _halves(q, BLOCK_M, BLOCK_D)
        q0 = low
        q1 = high
        q2 = low
        q3 = high
        if D_PARTS == 4:
            q0, q1 = _halves(low, BLOCK_M, BLOCK_D // 2)
            q2, q3 = _halves(high, BLOCK_M, BLOCK_D // 2)
    for start in range(key_start, key_end, BLOCK_N):
        keys = start + offs_n
        k_valid = keys < key_end
        s = _logits(q0, q1, q2, q3, k_base, keys, skl, k_valid, head_dim, scale_log2, UPCAST, DOT_PRECISION, CACHE,
                    D_PARTS, BLOCK_D)
        if HAS_MASK:
            allowed = tl.load(mask_rows[:, None] + keys[None, :] * smk, mask=row_valid[:, None] & k_valid[None, :],
                              other=0)
            s = tl.where(allowed != 0, s, _MASKED_LOGIT)
        p, alpha, m_i, l_i = _block_weights(s, k_valid, m_i, l_i)
        v = tl.load(v_base + keys[:, None] * svl + offs_v[None, :], mask=k_valid[:, None] & v_valid[None, :], other=0.0,
                    cache_modifier=CACHE)
        acc = _accumulate(acc, alpha, p, v, UPCAST, DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def _block_weights(s, k_valid, m_i, l_i):
    """One key block of the online softmax: from the (masked) logits ``s (rows, keys)`` in log2 units, of which
    only the ``k_valid`` keys count, and the running max ``m_i`` and sum ``l_i`` -> ``(p, alpha, m, l)``: the
    block's unnormalised weights, the factor that rescales the running accumulator, the new max and sum."""
    s = tl.where(k_valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _accumulate(acc, alpha, p, v, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``acc * alpha + p · v`` (``p`` rounded to ``v``'s dtype for the product, as flash attention feeds its MMA)."""
    if UPCAST:
        return acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision=DOT_PRECISION)
    return acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)


@triton.jit
def finish_range(acc, m_i, l_i, out_ptr, part_acc_ptr, part_ml_ptr, counter_ptr, b, kv_h, b_kvh, n_bkv, pid_m, split,
                 n_splits, rows, q_len, head_dim, group, sob, sol, soh,
                 SPLIT: tl.constexpr, FUSED_COMBINE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Write one key range's result: the normalised output when the keys are not split; else its
    partials, laid out (split, batch*kv_head, row, D) and (split, batch*kv_head, row, 2), and with
    ``FUSED_COMBINE`` the merge of all ranges by the last range program of the tile to arrive."""
    store_value_part(acc, m_i, l_i, out_ptr, part_acc_ptr, part_ml_ptr, b, kv_h, b_kvh, n_bkv, split, rows, q_len, group,
                     0, head_dim, sob, sol, soh, SPLIT, BLOCK_D, BLOCK_D)
    if SPLIT & FUSED_COMBINE:
        # Every thread's partials are written before the (release) arrival; the last program to
        # arrive (acquire) merges all ranges, then zeroes the counter for the next call.
        tl.debug_barrier()
        counter = counter_ptr + pid_m * n_bkv + b_kvh
        arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if arrived == n_splits - 1:
            tl.debug_barrier()
            merge_ranges(part_acc_ptr, part_ml_ptr, out_ptr, b, kv_h, b_kvh, n_bkv, rows, q_len, head_dim,
                         group, n_splits, sob, sol, soh, BLOCK_M, BLOCK_D)
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")


@triton.jit
def store_value_part(acc, m_i, l_i, out_ptr, part_acc_ptr, part_ml_ptr, b, kv_h, b_kvh, n_bkv, split, rows, q_len,
                     group, col0, v_cols, sob, sol, soh, SPLIT: tl.constexpr, BLOCK_D: tl.constexpr,
                     V_COLS: tl.constexpr):
    """Write one key range's result for the value columns ``col0..col0+V_COLS`` (``v_cols`` of them valid) of the
    rows ``rows`` (:func:`attend_value_part`): the normalised output when the keys are not split; else the
    partials in :func:`finish_range`'s layout (rows ``BLOCK_D`` apart), the running max and sum written by the
    program of the first column part only (every part holds the same). The ranges are merged by
    :func:`merge_ranges` afterwards: in :func:`finish_range` by the last range program to arrive, in the persistent
    expert layer in a phase of its own."""
    n_rows = q_len * group
    row_valid = rows < n_rows
    offs_v = tl.arange(0, V_COLS)
    if SPLIT:
        base = (split * n_bkv + b_kvh) * n_rows + rows
        tl.store(part_acc_ptr + base[:, None] * BLOCK_D + col0 + offs_v[None, :], acc, mask=row_valid[:, None])
        first = row_valid & (col0 == 0)
        tl.store(part_ml_ptr + base * 2, m_i, mask=first)
        tl.store(part_ml_ptr + base * 2 + 1, l_i, mask=first)
    else:
        _store_output(acc / l_i[:, None], out_ptr, b, kv_h, rows, row_valid, col0, v_cols, group, sob, sol, soh, V_COLS)


@triton.jit
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, part_acc_ptr, part_ml_ptr, counter_ptr, fresh_ptr,
    scale_log2, q_len, k_len, head_dim, n_kv_heads, group, keys_per_split,
    sqb, sql, sqh, skb, skl, skh, svb, svl, svh, smb, smq, smk, sob, sol, soh,
    HAS_MASK: tl.constexpr, SPLIT: tl.constexpr, FUSED_COMBINE: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, PRELOAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):
    pdl_release(PDL)
    pid_m = tl.program_id(0)
    b_kvh = tl.program_id(1)
    split = tl.program_id(2)
    b = b_kvh // n_kv_heads
    kv_h = b_kvh % n_kv_heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_rows = q_len * group
    row_valid = rows < n_rows
    query = rows // group
    head = kv_h * group + rows % group
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < head_dim
    key_start = split * keys_per_split
    key_end = tl.minimum(key_start + keys_per_split, k_len)
    k_base = k_ptr + b * skb + kv_h * skh
    v_base = v_ptr + b * svb + kv_h * svh
    mask_rows = mask_ptr + b * smb + query * smq
    if PRELOAD:
        # The range's first key block, its mask entries and the fresh row's index were written before the
        # last kernel launched without PDL (the caller's promise): load them while the kernel before runs.
        keys = key_start + tl.arange(0, BLOCK_N)
        k_valid = keys < key_end
        fresh = tl.load(fresh_ptr)
        settled = k_valid & (keys != fresh)
        kt_ptrs = k_base + keys[None, :] * skl + offs_d[:, None]
        v_ptrs = v_base + keys[:, None] * svl + offs_d[None, :]
        kt = tl.load(kt_ptrs, mask=settled[None, :] & d_valid[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=settled[:, None] & d_valid[None, :], other=0.0)
        if HAS_MASK:
            allowed = tl.load(mask_rows[:, None] + keys[None, :] * smk, mask=row_valid[:, None] & k_valid[None, :],
                              other=0)
        pdl_wait(PDL)
        # The fresh row (the kernel before wrote it) is read after the wait, at L2 (.cg: an L1 line filled before
        # the wait may hold its bytes from before the write), the others' entries stay.
        is_fresh = k_valid & (keys == fresh)
        kt = tl.where(is_fresh[None, :], tl.load(kt_ptrs, mask=is_fresh[None, :] & d_valid[:, None], other=0.0,
                                                 cache_modifier=".cg"), kt)
        v = tl.where(is_fresh[:, None], tl.load(v_ptrs, mask=is_fresh[:, None] & d_valid[None, :], other=0.0,
                                                cache_modifier=".cg"), v)
    else:
        pdl_wait(PDL)
    q = tl.load(
        q_ptr + b * sqb + query[:, None] * sql + head[:, None] * sqh + offs_d[None, :],
        mask=row_valid[:, None] & d_valid[None, :], other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    if PRELOAD:
        if UPCAST:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * scale_log2
        if HAS_MASK:
            s = tl.where(allowed != 0, s, _MASKED_LOGIT)
        p, alpha, m_i, l_i = _block_weights(s, k_valid, tl.full([BLOCK_M], float("-inf"), tl.float32),
                                            tl.zeros([BLOCK_M], tl.float32))
        acc = _accumulate(tl.zeros([BLOCK_M, BLOCK_D], tl.float32), alpha, p, v, UPCAST, DOT_PRECISION)
        acc, m_i, l_i = _continue_range(
            q, k_base, v_base, skl, svl, mask_rows, smk, key_start + BLOCK_N, key_end, scale_log2, row_valid, head_dim,
            acc, m_i, l_i, HAS_MASK, UPCAST, DOT_PRECISION, "", BLOCK_M, BLOCK_N, BLOCK_D, 1, head_dim, BLOCK_D)
    else:
        acc, m_i, l_i = attend_range(
            q, k_base, v_base, skl, svl, mask_rows, smk, key_start, key_end, scale_log2, row_valid, head_dim, HAS_MASK,
            UPCAST, DOT_PRECISION, "", BLOCK_M, BLOCK_N, BLOCK_D)
    finish_range(acc, m_i, l_i, out_ptr, part_acc_ptr, part_ml_ptr, counter_ptr, b, kv_h, b_kvh, tl.num_programs(1),
                 pid_m, split, tl.num_programs(2), rows, q_len, head_dim, group, sob, sol, soh, SPLIT, FUSED_COMBINE,
                 BLOCK_M, BLOCK_D)


@triton.jit
def _combine_kernel(
    part_acc_ptr, part_ml_ptr, out_ptr,
    q_len, head_dim, n_kv_heads, group, n_splits,
    sob, sol, soh,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):
    """The separate merge of the key ranges (one program per row block and batch x KV head)."""
    pdl_release(PDL)
    pdl_wait(PDL)
    pid_m = tl.program_id(0)
    b_kvh = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    merge_ranges(part_acc_ptr, part_ml_ptr, out_ptr, b_kvh // n_kv_heads, b_kvh % n_kv_heads, b_kvh,
                 tl.num_programs(1), rows, q_len, head_dim, group, n_splits, sob, sol, soh, BLOCK_M, BLOCK_D)


#: Rows per program of the separate combine kernel. Each program reads ``splits x rows x D`` fp32
#: partials; with the attention's 64-row tiles the Pi0 denoising step would have only 7 combine programs,
#: so the combine uses small row blocks to spread over more SMs (benchmarks/NOTES.md, v5).
COMBINE_BLOCK_M = 4
#: Row tile when the grid is small (the split-key regime): Pi0's decode attention (408 packed rows, D 256)
#: runs faster with 16-row tiles than with 64-row tiles (benchmarks/NOTES.md, v5).
SMALL_GRID_BLOCK_M = 16


def choose_splits(row_blocks: int, k_len: int, block_n: int, processors: int) -> int:
    """Key ranges to run in parallel: enough programs for one wave on ``processors`` SMs when the
    (row block x batch x KV head) grid alone is less than half a wave, each range >= 2 key blocks."""
    if 2 * row_blocks >= processors:
        return 1
    wanted = triton.cdiv(processors, row_blocks)
    most = max(1, triton.cdiv(k_len, block_n * MIN_BLOCKS_PER_SPLIT))
    return max(1, min(wanted, most))


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
    num_splits: int | None = None, fused_combine: bool = False, block_m: int | None = None,
    num_warps: int | None = None, combine_block_m: int = COMBINE_BLOCK_M, pdl: bool = False,
    block_n: int | None = None, fresh_row: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked multi-/grouped-query attention; returns ``(B, Lq, Hq, D)`` in ``q``'s dtype.

    ``num_splits`` forces the number of key ranges (default: :func:`choose_splits` for this GPU);
    ``fused_combine`` merges them in the last-arriving range program instead of a second kernel.
    Tuning knobs (defaults from the micro-benchmark, benchmarks/NOTES.md v5):
    ``block_m`` rows per program (16/32/64), ``num_warps`` of the attention kernel, ``combine_block_m``
    rows per program of the separate combine kernel, ``block_n`` keys per step (default 64, 32 from head
    dimension 256 up; a range holds whole steps, so it also bounds the key ranges). ``pdl``: launch both kernels with programmatic
    dependent launch (:mod:`cortexflow.kernels.pdl`).

    ``fresh_row`` (an int tensor ``(1,)`` on the device), for a decode step's attention over its KV cache: the
    caller's promise that every key and value row except the one at ``fresh_row[0]``, the mask and ``fresh_row``
    itself were written before the last kernel launched without PDL (a decode step's embedding and mask come from
    such kernels; only the step's own QKV kernel, just before, writes its row). Each program then loads its first
    key block, values and mask entries before its PDL wait, i.e. while the kernel before still runs, and reads
    only the fresh row after it. Without PDL the result is the same."""
    if fresh_row is not None and (fresh_row.numel() != 1 or fresh_row.dtype.is_floating_point):
        raise ValueError(f"fresh_row must be one integer on the device, got {fresh_row.dtype} {tuple(fresh_row.shape)}")
    b, q_len, q_heads, head_dim = q.shape
    k_len, kv_heads = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty((b, q_len, q_heads, head_dim), dtype=q.dtype, device=q.device)
    block_d = max(16, next_power_of_two(head_dim))  # tl.dot needs K >= 16 on the GPU
    n_rows = q_len * group
    processors = processor_count(q.device)
    if block_m is None:
        # 64-row tiles, unless they leave most SMs idle (then the keys get split anyway and smaller
        # tiles give more, lighter programs); never more rows than there are, rounded up to a power of
        # two >= 16 for tl.dot (a decode step without GQA has 1 row per KV head).
        block_m = 64 if 2 * triton.cdiv(n_rows, 64) * b * kv_heads >= processors or interpreting() else SMALL_GRID_BLOCK_M
        block_m = min(block_m, max(16, next_power_of_two(n_rows)))
    if num_warps is None:
        num_warps = 8 if block_d >= 256 else 4
    if block_n is None:
        block_n = 64 if block_d <= 128 else 32
    if mask is not None:
        mask = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        mask_strides = mask.stride()
    else:
        mask, mask_strides = q, (0, 0, 0)
    row_blocks = triton.cdiv(n_rows, block_m)
    if num_splits is None:
        num_splits = 1 if interpreting() else choose_splits(row_blocks * b * kv_heads, k_len, block_n, processors)
    keys_per_split = triton.cdiv(triton.cdiv(k_len, max(1, num_splits)), block_n) * block_n
    num_splits = triton.cdiv(k_len, keys_per_split)  # no empty range
    split = num_splits > 1
    fused = split and fused_combine
    if split:
        part_acc = torch.empty((num_splits, b * kv_heads, n_rows, block_d), dtype=torch.float32, device=q.device)
        part_ml = torch.empty((num_splits, b * kv_heads, n_rows, 2), dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out
    counters = arrival_counters(q.device, row_blocks * b * kv_heads) if fused else out
    grid = (row_blocks, b * kv_heads, num_splits)
    launch = launch_options(pdl)
    _attention_kernel[grid](
        q, k, v, mask, out, part_acc, part_ml, counters, out if fresh_row is None else fresh_row,
        scale * LOG2E, q_len, k_len, head_dim, kv_heads, group, keys_per_split,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), *mask_strides, out.stride(0), out.stride(1), out.stride(2),
        HAS_MASK=mask is not q, SPLIT=split, FUSED_COMBINE=fused, UPCAST=upcast_dots(q.dtype),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", PRELOAD=fresh_row is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PDL=pdl,
        num_warps=num_warps, num_stages=2, **launch,
    )
    if split and not fused:
        combine_m = min(combine_block_m, max(1, next_power_of_two(n_rows)))
        _combine_kernel[(triton.cdiv(n_rows, combine_m), b * kv_heads)](
            part_acc, part_ml, out, q_len, head_dim, kv_heads, group, num_splits,
            out.stride(0), out.stride(1), out.stride(2),
            BLOCK_M=combine_m, BLOCK_D=block_d, PDL=pdl, num_warps=4, **launch,
        )
    return out


def attention_reference(q, k, v, mask, scale):
    """The same computation in PyTorch (fp32 logits and softmax), output ``(B, Lq, Hq, D)``."""
    group = q.shape[2] // k.shape[2]
    kr = k.float().repeat_interleave(group, dim=2)
    vr = v.repeat_interleave(group, dim=2)
    logits = torch.einsum("bqhd,bkhd->bhqk", q.float(), kr) * scale
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None], MASKED_LOGIT)
    probs = torch.softmax(logits, -1).to(v.dtype)
    return torch.einsum("bhqk,bkhd->bqhd", probs, vr)
