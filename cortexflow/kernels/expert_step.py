"""Every action-expert layer of one denoising step as a single persistent Triton kernel.

:mod:`cortexflow.kernels.expert_layer` runs one layer a launch (18 launches a step for Pi0). Here one launch
runs the layers one after another, each with the same phases and the same code (``_layer``), so a step
costs one launch, ramp-up and tail instead of 18. Per layer ``l`` the kernel takes

- its weights from ``(4, L)`` int64 tables (rows qkv, o, gate_up, down; :class:`ExpertWeightTables`, made
  once per weights), and with E4M3 weights their fp32 scales from a second pair: the weights are separate
  tensors, so the kernel loads each layer's place in memory from a table, as Triton's grouped-GEMM tutorial
  does. A table holds element offsets from layer 0's tensor, which is a kernel argument, rather than
  addresses: Triton drops the alignment of a pointer cast from a loaded integer, and its tiles then load
  element by element. The tables also record the largest power of two (up to 16) that divides every offset,
  which the kernel states (``tl.multiple_of``), so the weight pointers keep the alignment of layer 0's
  tensor and, for separately allocated weights, the GEMM tiles still load as 16-byte vectors;
- its norm column factors ``norm_scales[l] (2, D)`` and Pi0.5's ``modulation[l] (2, 3, D)`` (attention, MLP)
  x (scale, shift, gate), and its KV cache ``keys[l], values[l]``, at ``l`` times the layer stride of those
  stacked tensors (which the backend holds anyway);
- its own 9 barrier counters, ``workspace.sync[(step * L + l) * 9:]``: the same counters the one-layer
  launches ``launch = step * L + l`` use, so one workspace (and one ``reset`` per loop) serves both.

Layer 0 reads the step's input ``x``; every later layer adds the previous layer's down-projection partials to
the residual ``out`` in place (``pending``), after a barrier that the one-layer launches get from the launch
boundary; the last layer adds its own in a final row phase.

Memory ordering. The one-layer kernel relies on no address being read twice in one launch with a write in
between (its module doc: a ``cp.async.ca`` load may hit a line the SM's L1 cached earlier in the launch).
Here every layer writes the same workspace buffers again (normed activations, q, attention output and
range partials, gate/up output, split-K partials, the residual), so that rule cannot hold. Instead every
barrier of this kernel is an acquire: after its release arrival a program polls the counter with
``atomic_add(0, sem="acquire")`` whose value the poll loop uses (so the compiler keeps it, as an acquire load
``ld.acquire.gpu``; for sm_90 ``ptxas`` follows it with ``CCTL.IVALL``, which invalidates the SM's L1), then a
CTA barrier. The argument, for any buffer ``X``:

- read after write: ``X`` written in phase ``p`` (of layer ``l``) is read only in a later phase of layer ``l``
  or, for the down-projection partials, in phase 0 of layer ``l + 1``; in both cases at least one barrier
  lies between (every phase of this kernel ends with one, the down-projection phase included). The writer's
  stores precede its CTA barrier and its release arrival; the reader's loads follow its acquire poll, which
  read a counter value that includes that arrival, and its CTA barrier. In the PTX memory model that orders
  the stores before the loads whatever load instruction reads them (``ld.global.cg``, ``cp.async.cg`` or
  ``.ca``), and no line of ``X`` cached by the reader's SM in an earlier layer survives the acquire;
- write after read: a program finishes its reads of ``X`` in phase ``q`` of layer ``l`` before it arrives at
  the barrier ending phase ``q``; the next write of ``X`` is in a later phase (layer ``l + 1``), after that
  barrier, so no program overwrites ``X`` while another still reads it;
- within a phase, no program reads what another writes in the same phase, except the attention ranges'
  partials with ``ExpertTiling.attn_merge="last"``, merged by the last-arriving program after its own acquire (as
  in the one-layer kernel; the default merge phase 2b reads them after a barrier of its own); the row phases give
  row ``r`` to the same program every time, so the residual row it updates in place is its own.

The KV cache rows of layer ``l`` are written in its phase 1 and read in its phase 2 only; other layers' rows
are other addresses.

With an :class:`EulerUpdate` the launch is a whole Euler step of the denoising loop, the action path around the
layers included (``ComputeBackend.denoising_step``'s composition, one launch instead of ~8):

- before layer 0, an action phase: the action tokens of the noisy actions ``x_t`` (fp32), ``x_t @ in_wᵀ + in_b``
  and with a middle layer (Pi0) ``silu(.) @ mid_wᵀ + mid_b``. Without one (Pi0.5) they are written, rounded to the
  compute dtype, into the action rows of the residual ``out``, whose other rows (Pi0's state token) the same
  items copy from the suffix buffer ``x``; layer 0 then runs on ``out`` in place. With one, they are split-K
  partials of the middle layer (each item recomputes its K range of the first layer's output: K = the action
  dimension, a few dozen columns), laid out as the down-projection partials a layer leaves pending, and ``out``'s
  action rows are zeros; after a barrier layer 0 adds the partials like a pending residual (plain norms only:
  gated residuals would gate them), so each action row is the tokens rounded once to the compute dtype. ``x`` is
  only read;
- the last layer's final row phase also applies the final norm (``final_scale``, ``final_shift``);
- after a barrier, a head phase: one action row a program, ``v = hn @ head_wᵀ + head_b`` rounded to the head's
  dtype, ``x_t += dt * v``.

Its two barriers are the 9th counter of the first and of the last layer, which the layers leave unused (one
counter, arrived at twice, for a one-layer expert). ``x_t`` is read in the action phase and written in the head
phase, one barrier apart; the next step is the next launch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import triton
import triton.language as tl

from cortexflow.kernels.attention import LOG2E
from cortexflow.kernels.expert_layer import (
    ExpertWorkspace,
    _grid_sync,
    _layer,
    _row_phase,
    check_weight_scales,
    expert_layer_reference,
    launch_constants,
    split_item,
)
from cortexflow.kernels.runtime import interpreting, next_power_of_two

#: The largest offset alignment (elements) the tables record.
MAX_ALIGNMENT = 16
#: The action phase's largest K step through the middle layer (:func:`action_k_step`; its fp32 tiles are
#: ``block_m x ACTION_K_STEP``: at 64 Pi0's step kernel spills more registers when compiled for sm_90).
ACTION_K_STEP = 32
#: Columns a tile of the action phase: Pi0's 1024 columns x 8 K ranges are then 128 items, one wave of an H100's
#: programs (with the o / down tiles' 32 columns, two).
ACTION_COLS = 64


@triton.jit
def _action_rows(rows, M, S, chunk):
    """Which of ``rows`` (token rows ``b * S + t``) are action rows (the last ``chunk`` of each batch's ``S``) and
    their row in ``x_t (B * chunk, A)``."""
    t = rows % S
    first = S - chunk
    return (rows < M) & (t >= first), (rows // S) * chunk + t - first


@triton.jit
def _action_phase(xt_ptr, in_w_ptr, in_b_ptr, mid_w_ptr, mid_b_ptr, x_ptr, out_ptr, part_ptr, M, S, chunk, pid,
                  n_programs, MID: tl.constexpr, A: tl.constexpr, BLOCK_A: tl.constexpr, D: tl.constexpr,
                  SPLITS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """The suffix rows ``out (M, D)`` that layer 0 starts from: ``x``'s rows, but in the action rows the action
    tokens. ``MID``: the tokens as ``SPLITS`` fp32 partials ``part (SPLITS, m_pad, D)`` (zero outside the action
    rows) of the middle layer, for layer 0 to add, and zeros in ``out``'s action rows; item = (row block,
    ``BLOCK_N`` columns, K range). Else the tokens themselves, rounded to ``out``'s dtype; item = (row block,
    columns). ``x_t (B * chunk, A)``, ``in_w (D, A)``, ``in_b (D,)``, ``mid_w (D, D)``, ``mid_b (D,)``: fp32."""
    n_tiles: tl.constexpr = D // BLOCK_N
    k_range: tl.constexpr = D // SPLITS
    splits: tl.constexpr = SPLITS if MID else 1
    n_items = tl.cdiv(M, BLOCK_M) * n_tiles * splits
    m_pad = tl.cdiv(M, BLOCK_M) * BLOCK_M
    offs_a = tl.arange(0, BLOCK_A)
    offs_k = tl.arange(0, BLOCK_K)
    for item in range(pid, n_items, n_programs):
        split, tile, mb = split_item(item, splits, n_tiles)
        rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        action, xt_row = _action_rows(rows, M, S, chunk)
        x = tl.load(xt_ptr + xt_row[:, None] * A + offs_a[None, :], mask=action[:, None] & (offs_a < A)[None, :],
                    other=0.0, cache_modifier=".cg")
        at = rows[:, None] * D + cols[None, :]
        kept = tl.load(x_ptr + at, mask=(rows < M)[:, None] & ~action[:, None], other=0.0)
        if MID:
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for k0 in tl.range(split * k_range, split * k_range + k_range, BLOCK_K, num_stages=2):
                ks = k0 + offs_k
                w_in = tl.load(in_w_ptr + ks[None, :] * A + offs_a[:, None], mask=(offs_a < A)[:, None], other=0.0)
                first = tl.dot(x, w_in, input_precision=PRECISION) + tl.load(in_b_ptr + ks)[None, :]
                first = tl.where(action[:, None], first * tl.sigmoid(first), 0.0)
                w_mid = tl.load(mid_w_ptr + cols[None, :] * D + ks[:, None])
                acc = tl.dot(first, w_mid, acc, input_precision=PRECISION)
            if split == 0:
                acc += tl.where(action[:, None], tl.load(mid_b_ptr + cols)[None, :], 0.0)
                tl.store(out_ptr + at, kept, mask=(rows < M)[:, None])
            tl.store(part_ptr + (split * m_pad + rows[:, None]) * D + cols[None, :], acc)
        else:
            w_in = tl.load(in_w_ptr + cols[None, :] * A + offs_a[:, None], mask=(offs_a < A)[:, None], other=0.0)
            tokens = tl.dot(x, w_in, input_precision=PRECISION) + tl.load(in_b_ptr + cols)[None, :]
            tokens = tl.where(action[:, None], tokens.to(out_ptr.dtype.element_ty), kept)
            tl.store(out_ptr + at, tokens, mask=(rows < M)[:, None])


@triton.jit
def _head_phase(hn_ptr, head_w_ptr, head_b_ptr, xt_ptr, M, S, chunk, dt, pid, n_programs, A: tl.constexpr,
                BLOCK_A: tl.constexpr, D: tl.constexpr, BLOCK_K: tl.constexpr):
    """For the action rows ``pid, pid + n_programs, ...``: ``v = hn[r] @ head_wᵀ + head_b`` (fp32 sums, rounded to
    ``head_w``'s dtype as a linear's output) and ``x_t[r'] += dt * v`` in fp32. ``hn (M, D)``, ``head_w (A, D)``."""
    offs_a = tl.arange(0, BLOCK_A)
    a_valid = offs_a < A
    offs_k = tl.arange(0, BLOCK_K)
    for row in range(pid, M, n_programs):
        action, xt_row = _action_rows(row, M, S, chunk)
        if action:
            acc = tl.zeros([BLOCK_A], tl.float32)
            for k0 in range(0, D, BLOCK_K):
                ks = k0 + offs_k
                h = tl.load(hn_ptr + row * D + ks, mask=ks < D, other=0.0, cache_modifier=".cg").to(tl.float32)
                w = tl.load(head_w_ptr + offs_a[:, None] * D + ks[None, :], mask=a_valid[:, None] & (ks < D)[None, :],
                            other=0.0)
                acc += tl.sum(w.to(tl.float32) * h[None, :], axis=1)
            v = acc + tl.load(head_b_ptr + offs_a, mask=a_valid, other=0.0).to(tl.float32)
            v = v.to(head_w_ptr.dtype.element_ty).to(tl.float32)
            x = tl.load(xt_ptr + xt_row * A + offs_a, mask=a_valid, other=0.0, cache_modifier=".cg")
            tl.store(xt_ptr + xt_row * A + offs_a, x + dt * v, mask=a_valid)


@triton.jit
def _expert_step_kernel(
    x_ptr, out_ptr, w_qkv_ptr, w_o_ptr, w_gu_ptr, w_down_ptr, w_table_ptr, qkv_ws_ptr, o_ws_ptr, gu_ws_ptr,
    down_ws_ptr, ws_table_ptr, norm_ptr, s_norm_layer, s_norm_which, mod_ptr, s_mod_layer,
    s_mod_which, s_mod_kind, pos_ptr, inv_freq_ptr, hn_attn_ptr, hn_mlp_ptr, q_ptr, k_ptr, v_ptr, s_k_layer,
    s_v_layer, mask_ptr, attn_ptr, h_ptr, part_acc_ptr, part_ml_ptr, o_part_ptr, down_part_ptr, sync_ptr, counters,
    xt_ptr, in_w_ptr, in_b_ptr, mid_w_ptr, mid_b_ptr, head_w_ptr, head_b_ptr, final_scale_ptr, final_shift_ptr,
    chunk, dt, n_layers, M, S, P, eps, scale_log2, keys_per_split, n_splits,
    s_pos_b, s_kb, s_kl, s_kh, s_vb, s_vl, s_vh, s_mb, s_mq, s_mk,
    D: tl.constexpr, F: tl.constexpr, HQ: tl.constexpr, HKV: tl.constexpr, HD: tl.constexpr,
    SHIFT: tl.constexpr, GATED: tl.constexpr, ATTN_SPLIT: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, FP8: tl.constexpr, O_SPLITS: tl.constexpr, DOWN_SPLITS: tl.constexpr,
    BLOCK_M: tl.constexpr, PAIR: tl.constexpr, BLOCK_K: tl.constexpr, GU_COLS: tl.constexpr, OUT_HALF: tl.constexpr,
    ATTN_ROWS: tl.constexpr, ATTN_KEYS: tl.constexpr, ATTN_D_PARTS: tl.constexpr, ATTN_V_PARTS: tl.constexpr,
    MERGE_ROWS: tl.constexpr, BLOCK_HD: tl.constexpr, BLOCK_D: tl.constexpr,
    BARRIERS: tl.constexpr, ALIGN: tl.constexpr, EULER: tl.constexpr, MID: tl.constexpr, A: tl.constexpr,
    BLOCK_A: tl.constexpr, ACTION_PRECISION: tl.constexpr, ACTION_N: tl.constexpr, ACTION_K: tl.constexpr,
    HEAD_K: tl.constexpr,
):
    """Every layer of one denoising step (see :func:`expert_step`): layer ``l`` takes projection ``j``'s weight
    (and FP8 scales) at layer 0's plus the element offset ``table[j, l]`` (a multiple of ``ALIGN``), its norm /
    modulation vectors and KV cache at ``l`` times the layer strides, and its barrier counters at
    ``sync_ptr + l * BARRIERS``. ``EULER``: the action and head phases around the layers (module doc)."""
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    m_pad = tl.cdiv(M, BLOCK_M) * BLOCK_M
    if EULER:
        _action_phase(xt_ptr, in_w_ptr, in_b_ptr, mid_w_ptr, mid_b_ptr, x_ptr, out_ptr, down_part_ptr, M, S, chunk,
                      pid, n_programs, MID, A, BLOCK_A, D, DOWN_SPLITS, ACTION_PRECISION, BLOCK_M, ACTION_N, ACTION_K)
        _grid_sync(sync_ptr + BARRIERS - 1, n_programs, True)
    for layer in range(0, n_layers):
        w_qkv = w_qkv_ptr + tl.multiple_of(tl.load(w_table_ptr + layer), ALIGN)
        w_o = w_o_ptr + tl.multiple_of(tl.load(w_table_ptr + n_layers + layer), ALIGN)
        w_gu = w_gu_ptr + tl.multiple_of(tl.load(w_table_ptr + 2 * n_layers + layer), ALIGN)
        w_down = w_down_ptr + tl.multiple_of(tl.load(w_table_ptr + 3 * n_layers + layer), ALIGN)
        if FP8:
            qkv_ws = qkv_ws_ptr + tl.multiple_of(tl.load(ws_table_ptr + layer), ALIGN)
            o_ws = o_ws_ptr + tl.multiple_of(tl.load(ws_table_ptr + n_layers + layer), ALIGN)
            gu_ws = gu_ws_ptr + tl.multiple_of(tl.load(ws_table_ptr + 2 * n_layers + layer), ALIGN)
            down_ws = down_ws_ptr + tl.multiple_of(tl.load(ws_table_ptr + 3 * n_layers + layer), ALIGN)
        else:
            qkv_ws = qkv_ws_ptr
            o_ws = o_ws_ptr
            gu_ws = gu_ws_ptr
            down_ws = down_ws_ptr
        attn_scale = norm_ptr + layer * s_norm_layer
        mlp_scale = attn_scale + s_norm_which
        # Pi0.5's rows of this layer: (attention, MLP) x (scale, shift, gate). The previous layer's MLP gate
        # weighs the partials it left pending (layer 0 has none and reads no gate).
        mod = mod_ptr + layer * s_mod_layer
        mlp_shift = mod + s_mod_which + s_mod_kind
        mlp_gate = mod + s_mod_which + 2 * s_mod_kind
        pending_gate = mod_ptr + tl.maximum(layer - 1, 0) * s_mod_layer + s_mod_which + 2 * s_mod_kind
        src = x_ptr
        if (layer > 0) | EULER:
            src = out_ptr
        sync = sync_ptr + layer * BARRIERS
        _layer(src, out_ptr, w_qkv, w_o, w_gu, w_down, qkv_ws, o_ws, gu_ws, down_ws, attn_scale, mlp_scale,
               mod + s_mod_kind, mlp_shift, mod + 2 * s_mod_kind, mlp_gate, pending_gate, k_ptr + layer * s_k_layer,
               v_ptr + layer * s_v_layer, pos_ptr, inv_freq_ptr, hn_attn_ptr, hn_mlp_ptr, q_ptr, mask_ptr, attn_ptr,
               h_ptr, part_acc_ptr, part_ml_ptr, o_part_ptr, down_part_ptr, sync, counters, M, S, P, eps, scale_log2,
               keys_per_split, n_splits, s_pos_b, s_kb, s_kl, s_kh, s_vb, s_vl, s_vh, s_mb, s_mq, s_mk,
               (layer > 0) | MID, False, D, F, HQ, HKV, HD, SHIFT, GATED, ATTN_SPLIT, UPCAST, DOT_PRECISION, FP8,
               O_SPLITS, DOWN_SPLITS, BLOCK_M, PAIR, BLOCK_K, GU_COLS, OUT_HALF, ATTN_ROWS, ATTN_KEYS, ATTN_D_PARTS,
               ATTN_V_PARTS, MERGE_ROWS, BLOCK_HD, BLOCK_D, 255, True)
        # The next layer's first phase reads this layer's down-projection partials; the last layer adds
        # them to the residual here.
        _grid_sync(sync + 6, n_programs, True)
        if layer == n_layers - 1:
            if EULER:
                # The residual and the final norm of every row, then the action head on the action rows.
                _row_phase(out_ptr, out_ptr, hn_attn_ptr, down_part_ptr, mlp_gate, final_scale_ptr, final_shift_ptr, M,
                           m_pad, eps, pid, n_programs, True, DOWN_SPLITS, GATED, True, SHIFT, D, BLOCK_D)
                # With one layer this counter also held the action phase's arrivals.
                _grid_sync(sync + BARRIERS - 1, n_programs * (1 + (n_layers == 1)), True)
                _head_phase(hn_attn_ptr, head_w_ptr, head_b_ptr, xt_ptr, M, S, chunk, dt, pid, n_programs, A, BLOCK_A,
                            D, HEAD_K)
            else:
                _row_phase(out_ptr, out_ptr, hn_mlp_ptr, down_part_ptr, mlp_gate, mlp_scale, mlp_shift, M, m_pad, eps,
                           pid, n_programs, True, DOWN_SPLITS, GATED, False, SHIFT, D, BLOCK_D)


@dataclass(frozen=True)
class ExpertWeightTables:
    """Where an expert's per-layer weights lie, for :func:`expert_step`: ``weights`` layer 0's
    ``(w_qkv, w_o, w_gate_up, w_down)`` and ``offsets (4, L)`` int64, layer ``l``'s tensor of projection ``j``
    at ``weights[j]`` plus ``offsets[j, l]`` elements; with E4M3 weights, ``scales`` / ``scale_offsets`` the
    same for their fp32 per-output-channel scales (else None); ``alignment``: the largest power of two up to
    16 that divides every offset. ``tensors`` keeps every tensor the offsets point into alive as long as the
    tables."""

    weights: tuple[torch.Tensor, ...]
    offsets: torch.Tensor
    scales: tuple[torch.Tensor, ...] | None
    scale_offsets: torch.Tensor | None
    alignment: int
    tensors: tuple[torch.Tensor, ...]

    @property
    def layers(self) -> int:
        return self.offsets.shape[1]


@dataclass(frozen=True)
class EulerUpdate:
    """The action path :func:`expert_step` runs around the layers (module doc), for one Euler step: ``x_t (B * H,
    A)`` fp32, contiguous, updated in place; ``in_weight (D, A)``, ``in_bias (D,)`` (this step's), ``mid_weight
    (D, D)``, ``mid_bias (D,)`` (or both None), all fp32; ``head_weight (A, D)``, ``head_bias (A,)`` in any float
    dtype (the velocity is rounded to it); ``final_scale (D,)`` fp32, the final norm's column factor (``1 + w``
    or ``1 + scale_t``), ``final_shift (D,)`` (adaptive norms) or None; ``chunk = H``, the action rows at the end
    of each batch's suffix; ``dt``."""

    x_t: torch.Tensor
    in_weight: torch.Tensor
    in_bias: torch.Tensor
    head_weight: torch.Tensor
    head_bias: torch.Tensor
    final_scale: torch.Tensor
    chunk: int
    dt: float
    mid_weight: torch.Tensor | None = None
    mid_bias: torch.Tensor | None = None
    final_shift: torch.Tensor | None = None

    def check(self, rows: int, seq_len: int, dim: int, tiling, adaptive: bool) -> None:
        """ValueError unless the tensors fit ``rows`` suffix rows of ``seq_len`` per batch, width ``dim``, the
        tiling and the norms (``adaptive``: with modulation; :func:`action_path_unsupported`)."""
        a = self.x_t.shape[-1]
        batch = rows // seq_len
        if not 0 < self.chunk <= seq_len:
            raise ValueError(f"chunk {self.chunk} must be 1..{seq_len} (the suffix rows)")
        if self.x_t.shape != (batch * self.chunk, a) or self.x_t.dtype != torch.float32 or not self.x_t.is_contiguous():
            raise ValueError(f"x_t must be contiguous fp32 ({batch * self.chunk}, A), got {self.x_t.dtype} "
                             f"{tuple(self.x_t.shape)}")
        expected = {"in_weight": (self.in_weight, (dim, a)), "in_bias": (self.in_bias, (dim,)),
                    "head_weight": (self.head_weight, (a, dim)), "head_bias": (self.head_bias, (a,)),
                    "final_scale": (self.final_scale, (dim,))}
        if (self.mid_weight is None) != (self.mid_bias is None):
            raise ValueError("mid_weight and mid_bias come together")
        if self.mid_weight is not None:
            expected.update(mid_weight=(self.mid_weight, (dim, dim)), mid_bias=(self.mid_bias, (dim,)))
        if self.final_shift is not None:
            expected["final_shift"] = (self.final_shift, (dim,))
        for name, (t, shape) in expected.items():
            if tuple(t.shape) != shape or not t.is_contiguous():
                raise ValueError(f"{name} must be contiguous {shape}, got {tuple(t.shape)}")
            if name not in ("head_weight", "head_bias") and t.dtype != torch.float32:
                raise ValueError(f"{name} must be fp32, got {t.dtype}")
        if (self.final_shift is not None) != adaptive:
            raise ValueError("final_shift goes with modulation (adaptive norms), and only with it")
        reason = action_path_unsupported(dim, tiling, self.mid_weight is not None, adaptive)
        if reason is not None:
            raise ValueError(reason)


def action_k_step(dim: int, splits: int) -> int:
    """The action phase's K step: the largest power of two up to :data:`ACTION_K_STEP` that divides the middle
    layer's K ranges (``dim / splits`` columns each)."""
    k_range = dim // splits
    return min(ACTION_K_STEP, k_range & -k_range)


def action_path_unsupported(dim: int, tiling, middle_layer: bool = False, adaptive: bool = False) -> str | None:
    """Why the step kernel cannot run the action path of an expert of width ``dim`` with ``tiling`` (None when it
    can): the middle layer's ``down_splits`` K ranges must be whole steps of at least 16 columns (``tl.dot``), and
    a path with a ``middle_layer`` (its tokens a pending residual of layer 0) needs plain norms, not ``adaptive``
    ones (layer 0 would gate them)."""
    if dim % tiling.down_splits or action_k_step(dim, tiling.down_splits) < 16:
        return (f"width {dim} does not split into {tiling.down_splits} K ranges of a multiple of 16 columns "
                "(the action path's middle layer)")
    if middle_layer and adaptive:
        return ("an action path with a middle layer (its tokens a pending residual of layer 0) needs plain norms: "
                "with modulation layer 0 would gate them")
    return None


def expert_weight_tables(weights: Sequence[Sequence[torch.Tensor]],
                         scales: Sequence[Sequence[torch.Tensor]] | None = None) -> ExpertWeightTables:
    """Tables for the layers' ``weights[l] = (w_qkv, w_o, w_gate_up, w_down)`` (layouts of
    :func:`~cortexflow.kernels.expert_layer.expert_layer`; all layers the same shapes and dtype, contiguous)
    and, for E4M3 weights, ``scales[l]`` (fp32 per output channel). Made once per weights: a CUDA graph
    replays the offsets it captured."""
    first = weights[0]
    fp8 = scales is not None
    kept = []
    for i, layer in enumerate(weights):
        check_weight_scales(layer, scales[i] if fp8 else None)
        for w, w0 in zip(layer, first):
            if w.shape != w0.shape or w.dtype != w0.dtype or w.device != w0.device or not w.is_contiguous():
                raise ValueError(f"layer {i} has a {w.dtype} {tuple(w.shape)} weight where layer 0 has a contiguous "
                                 f"{w0.dtype} {tuple(w0.shape)}: the step kernel takes one shape per projection")
        kept.extend(layer)
        if fp8:
            kept.extend(scales[i])

    def offsets(rows):
        """``(4, L)`` element offsets of each projection's tensors from layer 0's."""
        columns = []
        for tensors in zip(*rows):
            step, rest = zip(*(divmod(t.data_ptr() - tensors[0].data_ptr(), t.element_size()) for t in tensors))
            if any(rest):
                raise ValueError("a weight lies a fraction of an element away from layer 0's")
            columns.append(step)
        return torch.tensor(columns, dtype=torch.int64)

    tables = [offsets(weights)] + ([offsets(scales)] if fp8 else [])
    alignment = MAX_ALIGNMENT
    while alignment > 1 and any(bool((t % alignment).any()) for t in tables):
        alignment //= 2
    device = first[0].device
    return ExpertWeightTables(tuple(first), tables[0].to(device), tuple(scales[0]) if fp8 else None,
                              tables[1].to(device) if fp8 else None, alignment, tuple(kept))


def expert_step(
    x: torch.Tensor, out: torch.Tensor, tables: ExpertWeightTables, norm_scales: torch.Tensor, positions: torch.Tensor,
    inv_freq: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, eps: float, scale: float,
    workspace: ExpertWorkspace, heads: int, modulation: torch.Tensor | None = None, step: int = 0,
    euler: EulerUpdate | None = None,
) -> torch.Tensor:
    """Every expert layer of one step on ``x (M, D)`` into ``out (M, D)`` (layer 0 reads ``x``, later layers
    update ``out`` in place; ``out`` may be ``x``), in one launch. ``tables``: the layers' weights
    (:func:`expert_weight_tables`); ``norm_scales (L, 2, D)`` fp32, the attention and MLP norms' column
    factors per layer; Pi0.5: ``modulation (L, 2, 3, D)`` fp32, (attention, MLP) x (scale, shift, gate) per
    layer (the shifts and residual gates are used). ``keys/values (L, B, P + S, Hkv, Dh)``: each layer's
    cache, whose suffix rows the layer writes. ``step`` picks the barrier counters of the ``L`` launches
    ``step * L ... step * L + L - 1`` of the workspace (all zeroed by ``workspace.reset()`` before the
    loop). Computes what :func:`~cortexflow.kernels.expert_layer.expert_layer` chained over the layers does,
    in the same order of operations. ``euler``: the launch is a whole Euler step (:class:`EulerUpdate`): layer 0
    runs on ``x`` with the action tokens in the last ``chunk`` rows of each batch (``x`` is only read there; ``out``
    may not be ``x``), the final norm and the action head follow the layers, and ``euler.x_t`` is updated in
    place. Returns ``out``."""
    layers = tables.layers
    m, dim = x.shape
    s = workspace.seq_len
    b = m // s
    mlp_dim = tables.weights[3].shape[1]
    _, _, n_keys, kv_heads, head_dim = keys.shape
    p = n_keys - s
    mask = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    assert m == workspace.rows and out.shape == x.shape and mask.shape == (b, s, n_keys) and positions.shape == (b, s)
    if keys.shape[:2] != (layers, b) or values.shape != keys.shape:
        raise ValueError(f"keys / values {tuple(keys.shape)} / {tuple(values.shape)} are not ({layers}, {b}, P + S, "
                         "Hkv, Dh) caches of the tables' layers")
    if keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError("each cache row of keys / values must be contiguous")
    if norm_scales.shape != (layers, 2, dim) or norm_scales.stride(-1) != 1:
        raise ValueError(f"norm_scales {tuple(norm_scales.shape)} is not ({layers}, 2, {dim}) with contiguous rows")
    if modulation is not None and (modulation.shape != (layers, 2, 3, dim) or modulation.stride(-1) != 1):
        raise ValueError(f"modulation {tuple(modulation.shape)} is not ({layers}, 2, 3, {dim}) with contiguous rows")
    if tables.scales is None and tables.weights[0].dtype != x.dtype:
        raise ValueError(f"{tables.weights[0].dtype} weights for {x.dtype} activations")
    if step < 0 or (step + 1) * layers > workspace.launches:
        raise ValueError(f"step {step} of {layers} layers needs launches beyond the workspace's "
                         f"{workspace.launches} launches")
    if euler is not None:
        euler.check(m, s, dim, workspace.tiling, modulation is not None)
        if out.device.type != "meta" and out.data_ptr() == x.data_ptr():
            raise ValueError("with euler, out must be another buffer than x (x's action rows are only read)")
    adaptive = modulation is not None
    mod = modulation if adaptive else norm_scales
    mod_strides = modulation.stride()[:3] if adaptive else (0, 0, 0)
    sync = workspace.sync[step * layers * workspace.BARRIERS:]
    fp8 = tables.scales is not None
    workspace.check_weights(fp8)
    _expert_step_kernel[(workspace.programs,)](
        x, out, *tables.weights, tables.offsets, *(tables.scales if fp8 else (norm_scales,) * 4),
        tables.scale_offsets if fp8 else tables.offsets, norm_scales,
        norm_scales.stride(0), norm_scales.stride(1), mod, *mod_strides, positions, inv_freq, workspace.normed_attn,
        workspace.normed_mlp, workspace.q, keys, values, keys.stride(0), values.stride(0), mask, workspace.attn,
        workspace.h, workspace.part_acc, workspace.part_ml, workspace.o_part, workspace.down_part, sync,
        workspace.counters, *_euler_arguments(euler, norm_scales), layers, m, s, p, eps, scale * LOG2E,
        workspace.keys_per_split, workspace.n_splits,
        positions.stride(0), keys.stride(1), keys.stride(2), keys.stride(3), values.stride(1), values.stride(2),
        values.stride(3), mask.stride(0), mask.stride(1), mask.stride(2), BARRIERS=workspace.BARRIERS,
        ALIGN=tables.alignment, **_euler_constants(euler, x.dtype, dim, workspace.tiling),
        **launch_constants(x.dtype, dim, mlp_dim, heads, kv_heads, head_dim, adaptive, adaptive, fp8, workspace),
    )
    return out


def _euler_arguments(euler: EulerUpdate | None, filler: torch.Tensor) -> tuple:
    """The kernel's action-path arguments, from ``x_t`` to ``dt`` (``filler`` for the tensors a launch without
    ``euler``, or without a middle layer or final shift, does not read)."""
    if euler is None:
        return (filler,) * 9 + (1, 0.0)
    mid_w = filler if euler.mid_weight is None else euler.mid_weight
    mid_b = filler if euler.mid_bias is None else euler.mid_bias
    shift = filler if euler.final_shift is None else euler.final_shift
    return (euler.x_t, euler.in_weight, euler.in_bias, mid_w, mid_b, euler.head_weight, euler.head_bias,
            euler.final_scale, shift, euler.chunk, euler.dt)


def _euler_constants(euler: EulerUpdate | None, dtype: torch.dtype, dim: int, tiling) -> dict:
    """The kernel's action-path constants: its fp32 products in fp32 (``ieee``) for fp32 activations and on the CPU
    interpreter, else as three TF32 products (``tf32x3``, fp32 to about its last bits, on tensor cores); the
    action phase's columns a tile (:data:`ACTION_COLS` where they divide the width, else the o / down tiles') and
    K step (:func:`action_k_step`)."""
    if euler is None:
        return dict(EULER=False, MID=False, A=1, BLOCK_A=16, ACTION_PRECISION="ieee", ACTION_N=16, ACTION_K=16,
                    HEAD_K=16)
    a = euler.x_t.shape[1]
    exact = dtype == torch.float32 or interpreting()
    return dict(EULER=True, MID=euler.mid_weight is not None, A=a, BLOCK_A=max(16, next_power_of_two(a)),
                ACTION_PRECISION="ieee" if exact else "tf32x3",
                ACTION_N=ACTION_COLS if dim % ACTION_COLS == 0 else 2 * tiling.out_cols,
                ACTION_K=action_k_step(dim, tiling.down_splits), HEAD_K=min(256, next_power_of_two(dim)))


def expert_step_reference(x, weights, norm_scales, positions, inv_freq, keys, values, mask, eps, scale, heads,
                          modulation=None, weight_scales=None):
    """The same step in PyTorch: :func:`~cortexflow.kernels.expert_layer.expert_layer_reference` over the layers
    (``weights[l]``, ``weight_scales[l]`` as for :func:`expert_weight_tables`); writes each layer's suffix
    K/V into ``keys/values[l]`` and returns ``out (M, D)``."""
    for i, layer in enumerate(weights):
        extra = {}
        if modulation is not None:
            extra = dict(attn_shift=modulation[i, 0, 1], mlp_shift=modulation[i, 1, 1], attn_gate=modulation[i, 0, 2],
                         mlp_gate=modulation[i, 1, 2])
        x = expert_layer_reference(x, *layer, norm_scales[i, 0], norm_scales[i, 1], positions, inv_freq, keys[i],
                                   values[i], mask, eps, scale, heads,
                                   weight_scales=None if weight_scales is None else weight_scales[i], **extra)
    return x
