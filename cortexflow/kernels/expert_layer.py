"""One whole Pi0 / Pi0.5 action-expert layer as a single persistent Triton kernel.

A denoising step runs 18 expert layers on only ``B x 51`` token rows; as a chain of ~10 kernels a layer
(norm, QKV GEMM, QKV/RoPE, attention, combine, o GEMM, norm, gate/up GEMM, GELU gate, down GEMM) each
kernel lasts a few microseconds, most of it launch, ramp-up and tail, while the layer's 35 MB of bf16
weights would stream in ~12 us at the H100's 3 TB/s (benchmarks/NOTES.md). Here one launch of
``programs`` (<= the SM count, all resident at once) runs the layer in phases separated by grid
barriers:

0. (row phase) the residual the previous launch left pending (see 6), then the attention norm
   ``h = x * rsqrt(mean(x^2) + eps) * c (+ shift)``, rounded to the compute dtype as the reference's norm
   output is; ``c`` = ``1 + w`` (Pi0) or ``1 + scale_t`` (Pi0.5, whose adaRMS shift is added too);
1. QKV: ``h @ W_qkvᵀ`` with split-half RoPE on Q and K in the epilogue; Q goes to a scratch buffer, K and V
   straight into the layer's KV cache rows ``P..P+S-1``. One item = the columns ``[c, c+PAIR)`` and
   ``[c+Dh/2, c+Dh/2+PAIR)`` of one head, so both halves of a RoPE pair meet in one tile;
2. attention over the cached prefix and the suffix (:func:`~cortexflow.kernels.attention.attend_value_part`,
   boolean mask, the query heads of a KV head packed into the rows), keys split into ranges, each (row tile,
   key range) split over ``attn_v_parts`` programs by value columns (each computes the tile's logits and
   accumulates its columns); every range program stores its fp32 partials, and
   2b. after a grid barrier of its own, the programs merge the ranges (log-sum-exp) a few packed rows each into
   the attention output (``ExpertTiling.attn_merge="phase"``, the default; with "last" the last range program
   of a tile to arrive merges its ranges instead, and there is no phase 2b);
3. o-projection, split-K: one fp32 partial per K range (``o_splits``) and output tile, stored, not added;
4. (row phase) ``x2 = x + (gate ⊙) Σ partials`` (K ranges added in order: deterministic; Pi0.5's gate),
   rounded like the reference's residual, then the MLP norm of ``x2`` as in 0;
5. gate/up with ``gelu_tanh(gate) * up`` in the epilogue (one item = the matching gate and up columns);
6. down-projection partials as 3, which the next layer's phase 0 adds to the residual (the last layer
   adds them in a final row phase 7).

Weight-only FP8 (``weight_scales``): the four weights may be E4M3 ``(out, in)`` with fp32 scales ``(out,)``, one
per output channel (:mod:`cortexflow.quantization.fp8`). Each GEMM converts its E4M3 tile to the activation
dtype before ``tl.dot`` (exact: every E4M3 value is an fp16 / bf16 / fp32 value), sums in fp32, and multiplies
the sum of output column ``n`` by ``scale[n]`` in its epilogue: before RoPE (1), before the GELU gate (5), on
each split-K partial before it is stored (3, 6; the scale factors out of the sum over K ranges).

A row phase gives one token row to each program (51 rows: ~1 us), where a split-K GEMM would otherwise
need a last-arriving program per tile to add the partials up.

Layouts (all contiguous, row-major): ``x, out (M, D)`` with ``M = B*S`` token rows (``out`` may be ``x``
itself); weights ``W_qkv ((Hq + 2 Hkv) * Dh, D)`` as ``[q heads | k heads | v heads]``, ``W_o (D, Hq*Dh)``,
``W_gate_up (2F, D)`` as ``[gate | up]``, ``W_down (D, F)``; KV cache of the layer ``(B, P+S, Hkv, Dh)``;
mask ``(B, S, P+S)`` bool; positions ``(B, S)`` int64.

Grid barrier: each barrier of each launch has its own int32 counter, zeroed once per denoising loop
(:meth:`ExpertWorkspace.reset`). Every program adds 1 with a release atomic after a CTA barrier (so all its
threads' stores are ordered before it) and polls the counter with volatile loads until all have arrived.
Compiled for sm_90 (Triton 3.7, ``cortexflow compile-check``), the arrival is a GPU-scope fence and a
fire-and-forget reduction (``MEMBAR.ALL.GPU`` + ``REDG.ADD``) and the polls are strong loads; the
``atomic_add(0, sem="acquire")`` after the loop is not in the PTX at all (an add of 0 whose result is
unused is dropped), so nothing acquires: what keeps the reads after a barrier fresh is that data written
inside the launch is read back with ``.cg`` loads (at L2), with no load issued before the poll loop ends.
That alone is not enough: when Triton pipelines a load into shared
memory with ``cp.async`` and a thread's vector is under 16 bytes, it issues ``cp.async.ca``, which may hit
a line the SM cached earlier in the launch (seen on the H100: a small fp32 config read the attention
norm's output in the gate/up phase when both norms shared a buffer). So no buffer is read at the same
address twice in one launch with a write in between: each norm output and each split-K phase's partials
has its own buffer. It needs every program resident at once,
which holds with at most one program per SM while nothing else occupies the GPU's SMs indefinitely: two
processes sharing one GPU through MPS, each running these kernels at once, could each hold SMs the
other waits for (CortexFlow runs one engine per GPU; ``TritonOptions(persistent_expert=False)`` avoids
the kernel). Under the interpreter programs run one after another, so tests use one program there (the
barrier then never waits).

:mod:`cortexflow.kernels.expert_step` runs every layer of a step in one launch with this kernel's code
(``_layer``), under a different memory-ordering argument (its module doc).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from cortexflow.kernels.attention import LOG2E, attend_value_part, finish_range, merge_ranges, store_value_part
from cortexflow.kernels.e4m3 import e4m3_to_bf16
from cortexflow.kernels.gelu_gate import _gelu_tanh
from cortexflow.kernels.runtime import compile_target, interpreting, next_power_of_two, processor_count, upcast_dots
from cortexflow.quantization.fp8 import is_fp8


@dataclass(frozen=True)
class ExpertTiling:
    """Work split of :func:`expert_layer`. ``block_m`` token rows per tile; ``pair`` columns per RoPE half
    in the QKV phase (tile width ``2 * pair``); ``block_k`` the K step of every GEMM; ``gate_up_cols`` gate
    (and as many up) columns per gate/up tile; ``out_cols`` output columns per o / down tile and
    ``o_splits`` / ``down_splits`` their K ranges; ``attn_rows`` packed query rows per attention program,
    ``attn_keys`` keys per step, ``attn_splits`` key ranges (None: as many as fit in one wave of the programs),
    ``attn_d_parts`` independent products the logits are summed from (1, 2 or 4 column parts of the head,
    :func:`~cortexflow.kernels.attention.attend_range`; at most ``head_dim / 16``); ``attn_merge`` how the key
    ranges of a tile are merged: "phase" in a phase of their own after one more grid barrier (2b of the module doc),
    ``attn_merge_rows`` rows an item there (None: as few as spread the rows over one wave of the programs); "last": by
    the last range program to arrive; ``attn_v_parts`` (1, 2 or 4; more than 1 only with "phase") programs a (tile,
    key range), each accumulating its part of the value columns (all of them compute the tile's logits), which keeps
    the accumulator of a tall tile in registers (at most ``head_dim / 16`` parts, as for the logits); ``programs``
    persistent programs (None: the SM count); ``num_warps``, ``num_stages``: the launch's. ``fp8_operands``, with E4M3
    weights and bf16 activations: "bf16" (each weight converted to the activations' bf16, E4M3 -> f16 -> bf16) or
    "f16" (the rows that QKV, o and gate/up multiply, i.e. the two norms' outputs and the attention output, stored in
    float16 and each weight converted to f16 in one step; the down projection keeps bf16, its input ``h`` having no
    bound; Pi0's FP8 step kernel 50.1 against 54.7 µs a layer on an H200, benchmarks/NOTES.md, session 31).
    ``fp8_convert``, with E4M3 weights, how each weight tile that meets bf16 rows becomes bf16: "cvt" (Triton's
    conversion, one instruction an element after the pairwise E4M3 -> f16) or "bits"
    (:func:`cortexflow.kernels.e4m3.e4m3_to_bf16`: integer operations and one bf16 FMA a pair; GPU only, the
    interpreter cannot run its inline PTX). ``fp8_weights_first``, with E4M3 weights: each GEMM tile computed as
    ``(W_tile @ rowsᵀ)ᵀ``, so the converted weights are the MMA's first operand, which the tensor cores read from
    registers (as the second operand they go back to shared memory after the conversion). :func:`default_tiling`
    sets all three for E4M3 weights: Pi0's FP8 step kernel 52.7 (bf16 operands) -> 49.7 (f16) -> 49.0 (and bits)
    -> 47.3 µs a layer (and weights first) on the H100, bf16's 42.5; the whole predict 8-10 % faster than with
    bf16 operands, 4-6 % slower than bf16 (benchmarks/NOTES.md, session 32).

    The attention defaults (64-row tiles in 4 value parts of 64 columns, logits in 2 parts, the merge phase) took
    1.2 us a layer off Pi0's step kernel against 16-row tiles in one part with logits in 4 parts merged by the last
    range program, and 1-3 % off the whole predict on the H100; with the logits in one part Pi0's Euler step kernel
    spills for sm_90 and Pi0 ran 1-2 % slower (benchmarks/NOTES.md, session 30)."""

    block_m: int = 64
    pair: int = 16
    block_k: int = 128
    gate_up_cols: int = 32
    out_cols: int = 32
    o_splits: int = 8
    down_splits: int = 8
    attn_rows: int = 64
    attn_keys: int = 32
    attn_splits: int | None = None
    attn_d_parts: int = 2
    attn_merge: str = "phase"
    attn_merge_rows: int | None = None
    attn_v_parts: int = 4
    fp8_operands: str = "bf16"
    fp8_convert: str = "cvt"
    fp8_weights_first: bool = False
    programs: int | None = None
    num_warps: int = 4
    num_stages: int = 3


#: Sizes for the CPU interpreter (tiny configs): one program, small blocks; the key ranges merged by the last range
#: program (tiny heads have too few columns for value parts; the merge phase has its own tests).
INTERPRETER_TILING = ExpertTiling(block_m=16, pair=8, block_k=16, gate_up_cols=16, out_cols=16, o_splits=2,
                                  down_splits=2, attn_rows=16, attn_keys=16, attn_splits=2, attn_d_parts=4,
                                  attn_merge="last", attn_v_parts=1, programs=1)


#: The largest finite float16 (the norm rows' saturation with ``fp8_operands="f16"``).
F16_MAX = tl.constexpr(65504.0)

#: Flags of the kernels' ``FP8`` constant (:func:`fp8_mode`): E4M3 tiles converted to bf16 by bits; E4M3 tiles as
#: the MMA's first operand.
FP8_BITS, FP8_WEIGHTS_FIRST = 2, 4

#: ``phases`` of :func:`expert_layer` that runs the whole layer.
ALL_PHASES = 255


def default_tiling(fp8: bool = False) -> ExpertTiling:
    """The tiling the backend runs: the interpreter's under Triton's interpreter, else :class:`ExpertTiling`'s
    defaults; with E4M3 weights (``fp8``) the same with float16 operand rows, the weights as the MMA's first operand
    and, on a GPU, down's tiles converted by bits (:class:`ExpertTiling`, session 32's measurements)."""
    if interpreting():
        return replace(INTERPRETER_TILING, fp8_operands="f16", fp8_weights_first=True) if fp8 else INTERPRETER_TILING
    base = ExpertTiling()
    return replace(base, fp8_operands="f16", fp8_convert="bits", fp8_weights_first=True) if fp8 else base


@triton.jit
def _grid_sync(bar_ptr, n_programs, ACQUIRE: tl.constexpr):
    """Wait until every program of the launch has arrived here; everything they stored before is
    visible (at L2) afterwards. ``bar_ptr``: this barrier's own int32 counter, zero before the launch.
    ``ACQUIRE``: poll with acquire reads (atomic adds of 0 whose value the loop uses, so they stay in the code:
    ``ld.acquire.gpu`` in the PTX), after which no load of this program returns a value from before the
    other programs' arrivals (:mod:`cortexflow.kernels.expert_step` says why the step kernel needs it)."""
    tl.debug_barrier()
    tl.atomic_add(bar_ptr, 1, sem="release", scope="gpu")
    if ACQUIRE:
        arrived = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
        while arrived < n_programs:
            arrived = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
    else:
        arrived = tl.load(bar_ptr, volatile=True)
        while arrived < n_programs:
            arrived = tl.load(bar_ptr, volatile=True)
        tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _dual_tile(a_ptr, a_cols, rows, row_valid, w_ptr, w_cols, cols1, cols2, k_start, k_end,
               UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, FP8: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``a[rows, k_start:k_end] @ W[cols1 | cols2, k_start:k_end]ᵀ`` as two fp32 ``(BLOCK_M, BLOCK_N)`` tiles
    sharing the A loads (``a`` row-major with ``a_cols`` columns, read at L2; ``W`` row-major ``(N, w_cols)``).
    ``FP8`` (:func:`fp8_mode`): ``W`` holds E4M3 values, converted to ``a``'s dtype before the product (exact; by
    :func:`~cortexflow.kernels.e4m3.e4m3_to_bf16` for bf16 ``a`` with the ``FP8_BITS`` flag); the caller applies the
    per-column scales to the sums. With the ``FP8_WEIGHTS_FIRST`` flag the products are computed with the weights
    as the MMA's first operand (:func:`_weights_first_tiles`)."""
    if (FP8 // 4) % 2 == 1:  # FP8_WEIGHTS_FIRST
        return _weights_first_tiles(a_ptr, a_cols, rows, row_valid, w_ptr, w_cols, cols1, cols2, k_start, k_end,
                                    UPCAST, DOT_PRECISION, FP8, BLOCK_M, BLOCK_N, BLOCK_K)
    acc1 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + offs_k
        a = tl.load(a_ptr + rows[:, None] * a_cols + ks[None, :], mask=row_valid[:, None], other=0.0,
                    cache_modifier=".cg")
        w1 = tl.load(w_ptr + cols1[None, :] * w_cols + ks[:, None])
        w2 = tl.load(w_ptr + cols2[None, :] * w_cols + ks[:, None])
        a, w1, w2 = _mma_operands(a, w1, w2, UPCAST, FP8)
        acc1 = tl.dot(a, w1, acc1, input_precision=DOT_PRECISION)
        acc2 = tl.dot(a, w2, acc2, input_precision=DOT_PRECISION)
    return acc1, acc2


@triton.jit
def _weights_first_tiles(a_ptr, a_cols, rows, row_valid, w_ptr, w_cols, cols1, cols2, k_start, k_end,
                         UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, FP8: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """:func:`_dual_tile` with E4M3 weights first: ``W[cols] @ a_tileᵀ`` per column set, the converted weights the
    MMA's first operand (which the tensor cores take from registers, where the second must be in shared memory),
    transposed back once at the end."""
    acc1 = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    acc2 = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + offs_k
        w1 = tl.load(w_ptr + cols1[:, None] * w_cols + ks[None, :])
        w2 = tl.load(w_ptr + cols2[:, None] * w_cols + ks[None, :])
        a = tl.load(a_ptr + rows[None, :] * a_cols + ks[:, None], mask=row_valid[None, :], other=0.0,
                    cache_modifier=".cg")
        a, w1, w2 = _mma_operands(a, w1, w2, UPCAST, FP8)
        acc1 = tl.dot(w1, a, acc1, input_precision=DOT_PRECISION)
        acc2 = tl.dot(w2, a, acc2, input_precision=DOT_PRECISION)
    return tl.trans(acc1), tl.trans(acc2)


@triton.jit
def _mma_operands(a, w1, w2, UPCAST: tl.constexpr, FP8: tl.constexpr):
    """One K step's operands as the MMA takes them: E4M3 weight tiles (``FP8``) converted to ``a``'s dtype, and with
    ``UPCAST`` all three in fp32."""
    if FP8:
        w1 = _e4m3_to(w1, a.dtype, FP8)
        w2 = _e4m3_to(w2, a.dtype, FP8)
    if UPCAST:
        a = a.to(tl.float32)
        w1 = w1.to(tl.float32)
        w2 = w2.to(tl.float32)
    return a, w1, w2


@triton.jit
def _e4m3_to(w, dtype: tl.constexpr, FP8: tl.constexpr):
    """E4M3 ``w`` as ``dtype`` (exact): by bits for bf16 with the ``FP8_BITS`` flag, else Triton's conversion."""
    if (FP8 // 2) % 2 == 1 and dtype == tl.bfloat16:  # FP8_BITS
        return e4m3_to_bf16(w)
    return w.to(dtype)


@triton.jit
def _row_phase(x_ptr, out_ptr, hn_ptr, part_ptr, gate_ptr, scale_ptr, shift_ptr, M, m_pad, eps, pid, n_programs,
               pending, SPLITS: tl.constexpr, GATED: tl.constexpr, NORM: tl.constexpr,
               SHIFT: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """For rows ``pid, pid + n_programs, ...``: with ``pending`` (a constexpr or a runtime flag), finish the
    residual left by a split-K phase, ``out[r] = x[r] + (gate ⊙) Σ_s part[s, r]`` (K ranges added in order,
    rounded to the residual's dtype); with ``NORM``, ``hn[r] = out[r] * rsqrt(mean(out[r]^2) + eps) * scale
    (+ shift)`` (rounded to its dtype).
    Everything is read at L2."""
    offs = tl.arange(0, BLOCK_D)
    valid = offs < D
    for row in range(pid, M, n_programs):
        x = tl.load(x_ptr + row * D + offs, mask=valid, other=0.0, cache_modifier=".cg").to(tl.float32)
        if pending:
            y = tl.zeros([BLOCK_D], tl.float32)
            for s in range(0, SPLITS):
                y += tl.load(part_ptr + (s * m_pad + row) * D + offs, mask=valid, other=0.0, cache_modifier=".cg")
            if GATED:
                y = y * tl.load(gate_ptr + offs, mask=valid, other=0.0)
            x = (x + y).to(out_ptr.dtype.element_ty)
            # ``out`` may be ``x``: when the row is narrower than the program's threads, several warps hold
            # copies of the same elements, so none may store before all have loaded.
            tl.debug_barrier()
            tl.store(out_ptr + row * D + offs, x, mask=valid)
            x = x.to(tl.float32)
        if NORM:
            h = x * tl.rsqrt(tl.sum(x * x, axis=0) / D + eps) * tl.load(scale_ptr + offs, mask=valid, other=0.0)
            if SHIFT:
                h += tl.load(shift_ptr + offs, mask=valid, other=0.0)
            if hn_ptr.dtype.element_ty == tl.float16:
                h = tl.clamp(h, -F16_MAX, F16_MAX)  # saturated, never inf
            tl.store(hn_ptr + row * D + offs, h.to(hn_ptr.dtype.element_ty), mask=valid)


@triton.jit
def split_item(item, splits, n_tiles):
    """Item ``item`` of a split-K phase as (K range, column tile, row block), the K ranges varying fastest."""
    return item % splits, (item // splits) % n_tiles, item // (splits * n_tiles)


@triton.jit
def _split_k_phase(a_ptr, k_total, w_ptr, w_scale_ptr, part_ptr, M, pid, n_programs, N: tl.constexpr,
                   SPLITS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, FP8: tl.constexpr,
                   BLOCK_M: tl.constexpr, HALF_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``a @ Wᵀ`` over ``(M, N)`` as fp32 partials ``part (SPLITS, rows, N)``, one per K range; item = (row
    block, tile of ``2*HALF_N`` columns, K range). A row phase adds them up after the next barrier. ``FP8``:
    ``W`` is E4M3 and each partial is multiplied by ``w_scale[column]`` before it is stored."""
    n_tiles: tl.constexpr = N // (2 * HALF_N)
    k_range = k_total // SPLITS
    n_items = tl.cdiv(M, BLOCK_M) * n_tiles * SPLITS
    m_pad = tl.cdiv(M, BLOCK_M) * BLOCK_M
    offs_n = tl.arange(0, HALF_N)
    for item in range(pid, n_items, n_programs):
        split, tile, mb = split_item(item, SPLITS, n_tiles)
        rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        cols1 = tile * 2 * HALF_N + offs_n
        acc1, acc2 = _dual_tile(a_ptr, k_total, rows, rows < M, w_ptr, k_total, cols1, cols1 + HALF_N,
                                split * k_range, split * k_range + k_range, UPCAST, DOT_PRECISION, FP8, BLOCK_M,
                                HALF_N, BLOCK_K)
        if FP8:
            acc1 = acc1 * tl.load(w_scale_ptr + cols1)[None, :]
            acc2 = acc2 * tl.load(w_scale_ptr + HALF_N + cols1)[None, :]
        part = part_ptr + (split * m_pad + rows[:, None]) * N
        tl.store(part + cols1[None, :], acc1)
        tl.store(part + HALF_N + cols1[None, :], acc2)


@triton.jit
def _layer(
    x_ptr, out_ptr, w_qkv_ptr, w_o_ptr, w_gu_ptr, w_down_ptr, qkv_wscale_ptr, o_wscale_ptr, gu_wscale_ptr,
    down_wscale_ptr, attn_scale_ptr, mlp_scale_ptr, attn_shift_ptr, mlp_shift_ptr, attn_gate_ptr, mlp_gate_ptr,
    pending_gate_ptr, k_ptr, v_ptr, pos_ptr, inv_freq_ptr, hn_attn_ptr, hn_mlp_ptr, q_ptr, mask_ptr, attn_ptr, h_ptr,
    part_acc_ptr, part_ml_ptr, o_part_ptr, down_part_ptr, sync_ptr, counters, M, S, P, eps, scale_log2,
    keys_per_split, n_splits, s_pos_b, s_kb, s_kl, s_kh, s_vb, s_vl, s_vh, s_mb, s_mq, s_mk, pending,
    FINISH: tl.constexpr, D: tl.constexpr, F: tl.constexpr, HQ: tl.constexpr, HKV: tl.constexpr, HD: tl.constexpr,
    SHIFT: tl.constexpr, GATED: tl.constexpr, ATTN_SPLIT: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, FP8: tl.constexpr, O_SPLITS: tl.constexpr, DOWN_SPLITS: tl.constexpr,
    BLOCK_M: tl.constexpr, PAIR: tl.constexpr, BLOCK_K: tl.constexpr, GU_COLS: tl.constexpr, OUT_HALF: tl.constexpr,
    ATTN_ROWS: tl.constexpr, ATTN_KEYS: tl.constexpr, ATTN_D_PARTS: tl.constexpr, ATTN_V_PARTS: tl.constexpr,
    MERGE_ROWS: tl.constexpr, BLOCK_HD: tl.constexpr, BLOCK_D: tl.constexpr, PHASES: tl.constexpr,
    ACQUIRE: tl.constexpr,
):
    """One expert layer, phases 0-6 (and 7 with ``FINISH``) of the module doc, by every program of the launch;
    ``pending`` is a constexpr (one-layer kernel) or a runtime flag (step kernel). ``k_ptr`` /
    ``v_ptr``: the layer's KV cache; ``sync_ptr``: its 8 barrier counters (the 8th for the merge phase 2b, which
    runs with ``MERGE_ROWS > 0``)."""
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    HALF: tl.constexpr = HD // 2
    GROUP: tl.constexpr = HQ // HKV
    n_mb = tl.cdiv(M, BLOCK_M)
    m_pad = n_mb * BLOCK_M

    # ---- 0. the previous layer's down-projection residual (when pending), attention norm -------------
    _row_phase(x_ptr, out_ptr, hn_attn_ptr, down_part_ptr, pending_gate_ptr, attn_scale_ptr, attn_shift_ptr,
               M if PHASES & 1 else 0, m_pad, eps, pid, n_programs, pending, DOWN_SPLITS, GATED, True, SHIFT, D, BLOCK_D)
    _grid_sync(sync_ptr, n_programs, ACQUIRE)

    # ---- 1. QKV + RoPE, written to q scratch and the KV cache -----------------------------------------
    pairs: tl.constexpr = HALF // PAIR
    n_qkv_tiles: tl.constexpr = (HQ + 2 * HKV) * pairs
    offs_p = tl.arange(0, PAIR)
    for item in range(pid, n_mb * n_qkv_tiles if PHASES & 2 else 0, n_programs):
        mb = item // n_qkv_tiles
        tile = item % n_qkv_tiles
        head = tile // pairs
        c0 = (tile % pairs) * PAIR
        rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        row_valid = rows < M
        cols1 = head * HD + c0 + offs_p
        y1, y2 = _dual_tile(hn_attn_ptr, D, rows, row_valid, w_qkv_ptr, D, cols1, cols1 + HALF, 0, D, UPCAST,
                            DOT_PRECISION, FP8, BLOCK_M, PAIR, BLOCK_K)
        if FP8:
            y1 = y1 * tl.load(qkv_wscale_ptr + cols1)[None, :]
            y2 = y2 * tl.load(qkv_wscale_ptr + HALF + cols1)[None, :]
        tok_b = rows // S
        tok_t = rows % S
        if head < HQ + HKV:
            pos = tl.load(pos_ptr + tok_b * s_pos_b + tok_t, mask=row_valid, other=0).to(tl.float32)
            angle = pos[:, None] * tl.load(inv_freq_ptr + c0 + offs_p)[None, :]
            cos = tl.cos(angle)
            sin = tl.sin(angle)
            z1 = y1 * cos - y2 * sin
            z2 = y2 * cos + y1 * sin
        else:
            z1 = y1
            z2 = y2
        if head < HQ:
            dst = q_ptr + rows[:, None] * (HQ * HD) + head * HD + c0 + offs_p[None, :]
        elif head < HQ + HKV:
            dst = k_ptr + tok_b[:, None] * s_kb + (P + tok_t[:, None]) * s_kl + (head - HQ) * s_kh + c0 + offs_p[None, :]
        else:
            dst = v_ptr + tok_b[:, None] * s_vb + (P + tok_t[:, None]) * s_vl + (head - HQ - HKV) * s_vh + c0 + offs_p[None, :]
        tl.store(dst, z1.to(dst.dtype.element_ty), mask=row_valid[:, None])
        tl.store(dst + HALF, z2.to(dst.dtype.element_ty), mask=row_valid[:, None])
    _grid_sync(sync_ptr + 1, n_programs, ACQUIRE)

    # ---- 2. attention (+ merge of the key ranges by the last range program, or 2b) --------------------
    n_rows = S * GROUP
    n_rb = tl.cdiv(n_rows, ATTN_ROWS)
    n_bkv = (M // S) * HKV
    offs_d = tl.arange(0, BLOCK_HD)
    n_keys = P + S
    V_COLS: tl.constexpr = BLOCK_HD // ATTN_V_PARTS
    for item in range(pid, n_bkv * n_rb * n_splits * ATTN_V_PARTS if PHASES & 4 else 0, n_programs):
        v_col0 = (item % ATTN_V_PARTS) * V_COLS
        split = (item // ATTN_V_PARTS) % n_splits
        pid_m = (item // (ATTN_V_PARTS * n_splits)) % n_rb
        b_kvh = item // (ATTN_V_PARTS * n_splits * n_rb)
        b = b_kvh // HKV
        kv_h = b_kvh % HKV
        rows = pid_m * ATTN_ROWS + tl.arange(0, ATTN_ROWS)
        row_valid = rows < n_rows
        query = rows // GROUP
        head = kv_h * GROUP + rows % GROUP
        q = tl.load(q_ptr + ((b * S + query[:, None]) * HQ + head[:, None]) * HD + offs_d[None, :],
                    mask=row_valid[:, None] & (offs_d < HD)[None, :], other=0.0, cache_modifier=".cg")
        if UPCAST:
            q = q.to(tl.float32)
        key_start = split * keys_per_split
        key_end = tl.minimum(key_start + keys_per_split, n_keys)
        acc, m_i, l_i = attend_value_part(
            q, k_ptr + b * s_kb + kv_h * s_kh, v_ptr + b * s_vb + kv_h * s_vh + v_col0, s_kl, s_vl,
            mask_ptr + b * s_mb + query * s_mq, s_mk, key_start, key_end, scale_log2, row_valid, HD, HD - v_col0,
            True, UPCAST, DOT_PRECISION, ".cg", ATTN_ROWS, ATTN_KEYS, BLOCK_HD, ATTN_D_PARTS, V_COLS)
        if MERGE_ROWS > 0:
            store_value_part(acc, m_i, l_i, attn_ptr, part_acc_ptr, part_ml_ptr, b, kv_h, b_kvh, n_bkv, split, rows, S,
                             GROUP, v_col0, HD - v_col0, S * HQ * HD, HQ * HD, HD, ATTN_SPLIT, BLOCK_HD, V_COLS)
        else:
            finish_range(acc, m_i, l_i, attn_ptr, part_acc_ptr, part_ml_ptr, counters, b, kv_h, b_kvh, n_bkv, pid_m,
                         split, n_splits, rows, S, HD, GROUP, S * HQ * HD, HQ * HD, HD, ATTN_SPLIT, True, ATTN_ROWS,
                         BLOCK_HD)
    if (MERGE_ROWS > 0) & ATTN_SPLIT:
        # ---- 2b. the key ranges merged, MERGE_ROWS packed rows an item over every program ---------------
        _grid_sync(sync_ptr + 7, n_programs, ACQUIRE)
        n_merge_blocks = tl.cdiv(n_rows, MERGE_ROWS)
        for item in range(pid, n_bkv * n_merge_blocks if PHASES & 4 else 0, n_programs):
            b_kvh = item // n_merge_blocks
            rows = (item % n_merge_blocks) * MERGE_ROWS + tl.arange(0, MERGE_ROWS)
            merge_ranges(part_acc_ptr, part_ml_ptr, attn_ptr, b_kvh // HKV, b_kvh % HKV, b_kvh, n_bkv, rows, S, HD,
                         GROUP, n_splits, S * HQ * HD, HQ * HD, HD, MERGE_ROWS, BLOCK_HD)
    _grid_sync(sync_ptr + 2, n_programs, ACQUIRE)

    # ---- 3. o-projection partials -------------------------------------------------------------------
    _split_k_phase(attn_ptr, HQ * HD, w_o_ptr, o_wscale_ptr, o_part_ptr, M if PHASES & 8 else 0, pid, n_programs, D,
                   O_SPLITS, UPCAST, DOT_PRECISION, FP8, BLOCK_M, OUT_HALF, BLOCK_K)
    _grid_sync(sync_ptr + 3, n_programs, ACQUIRE)

    # ---- 4. residual x + (gate ⊙) o, MLP norm -----------------------------------------------------------
    _row_phase(x_ptr, out_ptr, hn_mlp_ptr, o_part_ptr, attn_gate_ptr, mlp_scale_ptr, mlp_shift_ptr,
               M if PHASES & 16 else 0, m_pad, eps, pid, n_programs, True, O_SPLITS, GATED, True, SHIFT, D, BLOCK_D)
    _grid_sync(sync_ptr + 4, n_programs, ACQUIRE)

    # ---- 5. gate/up and gelu_tanh(gate) * up ------------------------------------------------------------
    n_gu_tiles: tl.constexpr = F // GU_COLS
    offs_g = tl.arange(0, GU_COLS)
    for item in range(pid, n_mb * n_gu_tiles if PHASES & 32 else 0, n_programs):
        mb = item // n_gu_tiles
        tile = item % n_gu_tiles
        rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        row_valid = rows < M
        cols = tile * GU_COLS + offs_g
        gate, up = _dual_tile(hn_mlp_ptr, D, rows, row_valid, w_gu_ptr, D, cols, cols + F, 0, D, UPCAST, DOT_PRECISION,
                              FP8, BLOCK_M, GU_COLS, BLOCK_K)
        if FP8:
            gate = gate * tl.load(gu_wscale_ptr + cols)[None, :]
            up = up * tl.load(gu_wscale_ptr + F + cols)[None, :]
        act = _gelu_tanh(gate) * up
        tl.store(h_ptr + rows[:, None] * F + cols[None, :], act.to(h_ptr.dtype.element_ty), mask=row_valid[:, None])
    _grid_sync(sync_ptr + 5, n_programs, ACQUIRE)

    # ---- 6. down-projection partials (the next layer's phase 0, or 7, adds them to the residual) ------
    _split_k_phase(h_ptr, F, w_down_ptr, down_wscale_ptr, down_part_ptr, M if PHASES & 64 else 0, pid, n_programs, D,
                   DOWN_SPLITS, UPCAST, DOT_PRECISION, FP8, BLOCK_M, OUT_HALF, BLOCK_K)
    if FINISH:
        # ---- 7. residual out + (gate ⊙) down ------------------------------------------------------------
        _grid_sync(sync_ptr + 6, n_programs, ACQUIRE)
        _row_phase(out_ptr, out_ptr, hn_mlp_ptr, down_part_ptr, mlp_gate_ptr, mlp_scale_ptr, mlp_shift_ptr,
                   M if PHASES & 128 else 0, m_pad, eps, pid, n_programs, True, DOWN_SPLITS, GATED, False, SHIFT, D,
                   BLOCK_D)


@triton.jit
def _expert_layer_kernel(
    x_ptr, out_ptr, w_qkv_ptr, w_o_ptr, w_gu_ptr, w_down_ptr, qkv_wscale_ptr, o_wscale_ptr, gu_wscale_ptr,
    down_wscale_ptr, attn_scale_ptr, mlp_scale_ptr,
    attn_shift_ptr, mlp_shift_ptr, attn_gate_ptr, mlp_gate_ptr, pos_ptr, inv_freq_ptr,
    pending_gate_ptr, hn_attn_ptr, hn_mlp_ptr, q_ptr, k_ptr, v_ptr, mask_ptr, attn_ptr, h_ptr, part_acc_ptr,
    part_ml_ptr, o_part_ptr, down_part_ptr, sync_ptr, counters, M, S, P, eps, scale_log2,
    keys_per_split, n_splits,
    s_pos_b, s_kb, s_kl, s_kh, s_vb, s_vl, s_vh, s_mb, s_mq, s_mk,
    D: tl.constexpr, F: tl.constexpr, HQ: tl.constexpr, HKV: tl.constexpr, HD: tl.constexpr,
    SHIFT: tl.constexpr, GATED: tl.constexpr, PENDING: tl.constexpr, FINISH: tl.constexpr,
    ATTN_SPLIT: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, FP8: tl.constexpr, O_SPLITS: tl.constexpr, DOWN_SPLITS: tl.constexpr,
    BLOCK_M: tl.constexpr, PAIR: tl.constexpr, BLOCK_K: tl.constexpr, GU_COLS: tl.constexpr, OUT_HALF: tl.constexpr,
    ATTN_ROWS: tl.constexpr, ATTN_KEYS: tl.constexpr, ATTN_D_PARTS: tl.constexpr, ATTN_V_PARTS: tl.constexpr,
    MERGE_ROWS: tl.constexpr, BLOCK_HD: tl.constexpr, BLOCK_D: tl.constexpr, PHASES: tl.constexpr,
):
    _layer(x_ptr, out_ptr, w_qkv_ptr, w_o_ptr, w_gu_ptr, w_down_ptr, qkv_wscale_ptr, o_wscale_ptr, gu_wscale_ptr,
           down_wscale_ptr, attn_scale_ptr, mlp_scale_ptr, attn_shift_ptr, mlp_shift_ptr, attn_gate_ptr, mlp_gate_ptr,
           pending_gate_ptr, k_ptr, v_ptr, pos_ptr, inv_freq_ptr, hn_attn_ptr, hn_mlp_ptr, q_ptr, mask_ptr, attn_ptr,
           h_ptr, part_acc_ptr, part_ml_ptr, o_part_ptr, down_part_ptr, sync_ptr, counters, M, S, P, eps, scale_log2,
           keys_per_split, n_splits, s_pos_b, s_kb, s_kl, s_kh, s_vb, s_vl, s_vh, s_mb, s_mq, s_mk, PENDING, FINISH,
           D, F, HQ, HKV, HD, SHIFT, GATED, ATTN_SPLIT, UPCAST, DOT_PRECISION, FP8, O_SPLITS, DOWN_SPLITS, BLOCK_M,
           PAIR, BLOCK_K, GU_COLS, OUT_HALF, ATTN_ROWS, ATTN_KEYS, ATTN_D_PARTS, ATTN_V_PARTS, MERGE_ROWS, BLOCK_HD,
           BLOCK_D, PHASES, False)


class ExpertWorkspace:
    """Scratch of :func:`expert_layer` for ``rows`` token rows of one expert config, allocated once per
    denoising loop and shared by its ``launches`` layer launches: the barrier counters of every launch
    (:attr:`BARRIERS` int32 each, zeroed by :meth:`reset`, once per loop before the first launch), the attention merge's
    arrival counters (left at zero by each launch), the split-K partials that one launch may leave for the
    next, the per-phase activations, and ``residual (rows, D)``: the layers' output buffer for a caller that
    chains them (layer 0 reads its own input, every later layer updates ``residual`` in place)."""

    BARRIERS = 9

    def __init__(self, rows: int, seq_len: int, dim: int, mlp_dim: int, heads: int, kv_heads: int, head_dim: int,
                 n_keys: int, dtype: torch.dtype, device: torch.device, tiling: ExpertTiling | None = None,
                 launches: int = 1):
        self.tiling = tiling or default_tiling()
        t = self.tiling
        self.rows, self.seq_len = rows, seq_len
        self.residual = torch.empty((rows, dim), dtype=dtype, device=device)
        # One buffer per use: no address is read twice in one launch with a write in between (see the
        # module doc), so the two norms' outputs and the two split-K phases' partials never share one.
        # The rows QKV, o and gate/up multiply: float16 with ``fp8_operands="f16"`` (E4M3 weights only).
        operand = torch.float16 if t.fp8_operands == "f16" and dtype == torch.bfloat16 else dtype
        self.normed_attn = torch.empty((rows, dim), dtype=operand, device=device)
        self.normed_mlp = torch.empty((rows, dim), dtype=operand, device=device)
        self.q = torch.empty((rows, heads * head_dim), dtype=dtype, device=device)
        self.attn = torch.empty((rows, heads * head_dim), dtype=operand, device=device)
        self.h = torch.empty((rows, mlp_dim), dtype=dtype, device=device)
        m_pad = triton.cdiv(rows, t.block_m) * t.block_m
        self.o_part = torch.empty((t.o_splits, m_pad, dim), dtype=torch.float32, device=device)
        self.down_part = torch.empty((t.down_splits, m_pad, dim), dtype=torch.float32, device=device)
        self.block_hd = max(16, next_power_of_two(head_dim))
        n_rows = seq_len * (heads // kv_heads)
        n_bkv = (rows // seq_len) * kv_heads
        row_blocks = triton.cdiv(n_rows, t.attn_rows) * n_bkv
        self.programs = t.programs or processor_count(device)
        if (device.type == "cuda" or compile_target(device) is not None) and self.programs > processor_count(device):
            raise ValueError(f"{self.programs} persistent programs on a GPU with {processor_count(device)} SMs: the "
                             "grid barriers need every program resident at once (at most one per SM)")
        # Value parts of at least 16 columns (a narrower head has fewer parts than asked for).
        self.v_parts = min(t.attn_v_parts, self.block_hd // 16)
        # As many key ranges as fit in one wave of the programs (a second, partial wave costs a whole range).
        tiles = row_blocks * self.v_parts
        splits = t.attn_splits or max(1, min(self.programs // tiles, triton.cdiv(n_keys, t.attn_keys)))
        self.keys_per_split = triton.cdiv(triton.cdiv(n_keys, splits), t.attn_keys) * t.attn_keys
        self.n_splits = triton.cdiv(n_keys, self.keys_per_split)
        # Merge phase 2b: the fewest rows an item (a power of two) that spread the rows over one wave.
        self.merge_rows = 0
        if t.attn_merge == "phase":
            self.merge_rows = t.attn_merge_rows or max(2, next_power_of_two(triton.cdiv(n_bkv * n_rows, self.programs)))
        self.part_acc = torch.empty((self.n_splits, n_bkv, n_rows, self.block_hd), dtype=torch.float32, device=device)
        self.part_ml = torch.empty((self.n_splits, n_bkv, n_rows, 2), dtype=torch.float32, device=device)
        self.counters = torch.zeros(row_blocks, dtype=torch.int32, device=device)
        self.launches = launches
        self.sync = torch.zeros(launches * self.BARRIERS, dtype=torch.int32, device=device)

    def check_weights(self, fp8: bool) -> None:
        """ValueError when this workspace's float16 operand rows (``fp8_operands="f16"``) meet bf16 weights."""
        if self.normed_attn.dtype != self.residual.dtype and not fp8:
            raise ValueError("ExpertTiling.fp8_operands='f16' is for E4M3 weights; these are "
                             f"{self.residual.dtype}: use fp8_operands='bf16'")

    def reset(self) -> None:
        """Zero every launch's barrier counters (one memset; inside a CUDA graph it replays each call)."""
        self.sync.zero_()


def check_expert_shapes(dim: int, mlp_dim: int, heads: int, kv_heads: int, head_dim: int,
                        tiling: ExpertTiling | None = None) -> str | None:
    """Why :func:`expert_layer` cannot run this config with ``tiling`` (None when it can)."""
    t = tiling or default_tiling()
    if head_dim % (2 * t.pair):
        return f"head_dim {head_dim} is not a multiple of 2 x {t.pair}"
    if heads % kv_heads:
        return f"{heads} heads on {kv_heads} KV heads"
    for name, k in (("width", dim), ("MLP width", mlp_dim), ("attention width", heads * head_dim)):
        if k % t.block_k:
            return f"{name} {k} is not a multiple of the K step {t.block_k}"
    if mlp_dim % t.gate_up_cols:
        return f"MLP width {mlp_dim} is not a multiple of {t.gate_up_cols}"
    if dim % (2 * t.out_cols):
        return f"width {dim} is not a multiple of 2 x {t.out_cols}"
    if (heads * head_dim) % (t.o_splits * t.block_k) or mlp_dim % (t.down_splits * t.block_k):
        return "the o / down K ranges do not divide into whole K steps"
    if head_dim > 256:
        return f"head_dim {head_dim} > 256"
    if t.attn_d_parts not in (1, 2, 4):
        return f"attn_d_parts {t.attn_d_parts} is not 1, 2 or 4"
    if t.attn_merge not in ("last", "phase"):
        return f"attn_merge {t.attn_merge!r} is not 'last' or 'phase'"
    if t.fp8_operands not in ("bf16", "f16"):
        return f"fp8_operands {t.fp8_operands!r} is not 'bf16' or 'f16'"
    if t.fp8_convert not in ("cvt", "bits"):
        return f"fp8_convert {t.fp8_convert!r} is not 'cvt' or 'bits'"
    if t.fp8_convert == "bits" and interpreting():
        return "fp8_convert 'bits' runs inline PTX, which Triton's interpreter cannot run: use 'cvt'"
    if t.attn_v_parts not in (1, 2, 4) or (t.attn_v_parts > 1 and t.attn_merge != "phase"):
        return f"attn_v_parts {t.attn_v_parts} is not 1, or 2 or 4 with attn_merge='phase'"
    if t.attn_merge_rows is not None and (t.attn_merge_rows < 1 or t.attn_merge_rows & (t.attn_merge_rows - 1)):
        return f"attn_merge_rows {t.attn_merge_rows} is not a power of two"
    return None


def expert_layer(
    x: torch.Tensor, out: torch.Tensor, w_qkv: torch.Tensor, w_o: torch.Tensor, w_gate_up: torch.Tensor,
    w_down: torch.Tensor, attn_scale: torch.Tensor, mlp_scale: torch.Tensor, positions: torch.Tensor,
    inv_freq: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, eps: float, scale: float,
    workspace: ExpertWorkspace, heads: int, attn_shift: torch.Tensor | None = None,
    mlp_shift: torch.Tensor | None = None, attn_gate: torch.Tensor | None = None,
    mlp_gate: torch.Tensor | None = None, launch: int = 0, pending: bool = False,
    pending_gate: torch.Tensor | None = None, finish: bool = True, phases: int = ALL_PHASES,
    weight_scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One expert layer on ``x (M, D)`` (``M = B*S``) into ``out (M, D)`` (may be ``x``); writes the layer's
    suffix K/V into ``keys/values[:, P:]`` (``P = keys.shape[1] - S``). ``attn_scale`` / ``mlp_scale (D,)``
    fp32: the norms' column factors; Pi0.5: the adaRMS shifts ``attn_shift`` / ``mlp_shift`` and the residual
    gates ``attn_gate`` / ``mlp_gate (D,)``. The caller checked :func:`check_expert_shapes`.

    Chaining layers: ``launch`` picks this launch's barrier counters (``< workspace.launches``; all zeroed
    by ``workspace.reset()`` before the first); ``finish=False`` leaves the down-projection as split-K
    partials in the workspace, which the next launch adds to its input first when called with
    ``pending=True``, ``x`` that same ``out`` buffer and ``pending_gate`` the previous layer's ``mlp_gate``.
    ``phases``: a bit mask of the phases to run (bit ``i`` = phase ``i`` of the module doc, 128 the final
    residual; the barriers always run), for timing phases alone. ``weight_scales``: with E4M3 weights, the
    fp32 per-output-channel scales of ``(w_qkv, w_o, w_gate_up, w_down)`` (all four weights E4M3, or none).
    Returns ``out``."""
    fp8 = check_weight_scales((w_qkv, w_o, w_gate_up, w_down), weight_scales)
    workspace.check_weights(fp8)
    m, dim = x.shape
    s = workspace.seq_len
    b = m // s
    kv_heads, head_dim = keys.shape[2], keys.shape[3]
    mlp_dim = w_down.shape[1]
    p = keys.shape[1] - s
    mask = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    assert m == workspace.rows and mask.shape == (b, s, p + s) and positions.shape == (b, s)
    if not 0 <= launch < workspace.launches:
        raise ValueError(f"launch {launch} outside the workspace's {workspace.launches} launches")
    if pending and x.data_ptr() != out.data_ptr():
        raise ValueError("pending=True adds the previous layer's partials to x in place: x must be out")
    shifted = attn_shift is not None
    gated = attn_gate is not None
    sync = workspace.sync[launch * workspace.BARRIERS:]
    wscales = weight_scales if fp8 else (attn_scale,) * 4
    constants = launch_constants(x.dtype, dim, mlp_dim, heads, kv_heads, head_dim, shifted, gated, fp8, workspace)
    _expert_layer_kernel[(workspace.programs,)](
        x, out, w_qkv, w_o, w_gate_up, w_down, *wscales, attn_scale, mlp_scale,
        attn_shift if shifted else attn_scale, mlp_shift if shifted else mlp_scale,
        attn_gate if gated else attn_scale, mlp_gate if gated else mlp_scale, positions, inv_freq,
        pending_gate if pending and gated else attn_scale, workspace.normed_attn, workspace.normed_mlp, workspace.q,
        keys, values, mask, workspace.attn, workspace.h, workspace.part_acc, workspace.part_ml, workspace.o_part,
        workspace.down_part, sync,
        workspace.counters, m, s, p, eps, scale * LOG2E, workspace.keys_per_split, workspace.n_splits,
        positions.stride(0), keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0), values.stride(1),
        values.stride(2), mask.stride(0), mask.stride(1), mask.stride(2),
        PENDING=pending, FINISH=finish, PHASES=phases, **constants,
    )
    return out


def launch_constants(dtype: torch.dtype, dim: int, mlp_dim: int, heads: int, kv_heads: int, head_dim: int,
                     shifted: bool, gated: bool, fp8: bool, workspace: ExpertWorkspace) -> dict:
    """The compile-time arguments (and launch options) that the one-layer and the step kernel share."""
    t = workspace.tiling
    return dict(
        D=dim, F=mlp_dim, HQ=heads, HKV=kv_heads, HD=head_dim, SHIFT=shifted, GATED=gated,
        ATTN_SPLIT=workspace.n_splits > 1, UPCAST=upcast_dots(dtype),
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32", FP8=fp8_mode(fp8, t),
        O_SPLITS=t.o_splits, DOWN_SPLITS=t.down_splits, BLOCK_M=t.block_m, PAIR=t.pair, BLOCK_K=t.block_k,
        GU_COLS=t.gate_up_cols, OUT_HALF=t.out_cols, ATTN_ROWS=t.attn_rows, ATTN_KEYS=t.attn_keys,
        ATTN_D_PARTS=min(t.attn_d_parts, workspace.block_hd // 16), ATTN_V_PARTS=workspace.v_parts,
        MERGE_ROWS=workspace.merge_rows, BLOCK_HD=workspace.block_hd,
        BLOCK_D=next_power_of_two(dim), num_warps=t.num_warps, num_stages=t.num_stages,
    )


def fp8_mode(fp8: bool, tiling: ExpertTiling) -> int:
    """The kernels' ``FP8`` constant: 0 for bf16 / fp32 weights; for E4M3 ones 1 plus the flags
    :data:`FP8_BITS` (``fp8_convert="bits"``) and :data:`FP8_WEIGHTS_FIRST` (``fp8_weights_first``)."""
    if not fp8:
        return 0
    return 1 | (FP8_BITS if tiling.fp8_convert == "bits" else 0) | (FP8_WEIGHTS_FIRST if tiling.fp8_weights_first else 0)


_WEIGHT_NAMES = ("w_qkv", "w_o", "w_gate_up", "w_down")


def check_weight_scales(weights, weight_scales) -> bool:
    """Whether the four weights are E4M3 (with ``weight_scales`` matching them); ValueError for a mix."""
    fp8 = [is_fp8(w) for w in weights]
    if any(fp8) and not all(fp8):
        named = ", ".join(f"{n} {w.dtype}" for n, w in zip(_WEIGHT_NAMES, weights))
        raise ValueError(f"expert_layer takes all four weights in E4M3 or none: {named}")
    if not fp8[0]:
        if weight_scales is not None:
            raise ValueError("weight_scales are for E4M3 weights; these weights are " + str(weights[0].dtype))
        return False
    if weight_scales is None or len(weight_scales) != 4:
        raise ValueError("E4M3 weights need weight_scales=(qkv, o, gate_up, down), one fp32 scale per output channel")
    for name, w, s in zip(_WEIGHT_NAMES, weights, weight_scales):
        if s.dtype != torch.float32 or s.shape != (w.shape[0],) or not s.is_contiguous():
            raise ValueError(f"the scales of {name} {tuple(w.shape)} must be contiguous fp32 ({w.shape[0]},), got "
                             f"{s.dtype} {tuple(s.shape)}")
    return True


def expert_layer_reference(x, w_qkv, w_o, w_gate_up, w_down, attn_scale, mlp_scale, positions, inv_freq, keys, values,
                           mask, eps, scale, heads, attn_shift=None, mlp_shift=None, attn_gate=None, mlp_gate=None,
                           weight_scales=None):
    """The same layer in PyTorch (fp32 math on the given tensors): returns ``out (M, D)`` and writes the
    suffix K/V into ``keys/values``, like :func:`expert_layer`. With ``weight_scales`` the weights are E4M3 and
    are dequantised first (``data * scale[:, None]`` in fp32), the function the FP8 kernel computes up to the
    order of its fp32 sums."""
    if weight_scales is not None:
        w_qkv, w_o, w_gate_up, w_down = (w.float() * s[:, None] for w, s in
                                         zip((w_qkv, w_o, w_gate_up, w_down), weight_scales))
    from cortexflow.kernels.attention import attention_reference
    from cortexflow.kernels.rope import rope_reference

    m, dim = x.shape
    b, n_keys, kv_heads, head_dim = keys.shape
    s = m // b
    p = n_keys - s
    xf = x.float()

    def normed(v, col, shift):
        h = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * col
        return h if shift is None else h + shift

    qkv = normed(xf, attn_scale, attn_shift) @ w_qkv.float().T
    q, k, v = qkv.view(b, s, -1, head_dim).split([heads, kv_heads, kv_heads], dim=2)
    q, k = rope_reference(q, positions, inv_freq), rope_reference(k, positions, inv_freq)
    keys[:, p:] = k.to(keys.dtype)
    values[:, p:] = v.to(values.dtype)
    a = attention_reference(q, keys.float(), values.float(), mask, scale).reshape(m, -1)
    y = a @ w_o.float().T
    x2 = xf + (y * attn_gate if attn_gate is not None else y)
    gu = normed(x2, mlp_scale, mlp_shift) @ w_gate_up.float().T
    gate, up = gu.chunk(2, dim=-1)
    act = torch.nn.functional.gelu(gate, approximate="tanh") * up
    y = act @ w_down.float().T
    return (x2 + (y * mlp_gate if mlp_gate is not None else y)).to(x.dtype)
