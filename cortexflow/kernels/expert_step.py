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
- its own 8 barrier counters, ``workspace.sync[(step * L + l) * 8:]``: the same counters the one-layer
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
  partials, merged by the last-arriving program after its own acquire (as in the one-layer kernel); the row
  phases give row ``r`` to the same program every time, so the residual row it updates in place is its own.

The KV cache rows of layer ``l`` are written in its phase 1 and read in its phase 2 only; other layers' rows
are other addresses.
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
)

#: The largest offset alignment (elements) the tables record.
MAX_ALIGNMENT = 16


@triton.jit
def _expert_step_kernel(
    x_ptr, out_ptr, w_qkv_ptr, w_o_ptr, w_gu_ptr, w_down_ptr, w_table_ptr, qkv_ws_ptr, o_ws_ptr, gu_ws_ptr,
    down_ws_ptr, ws_table_ptr, norm_ptr, s_norm_layer, s_norm_which, mod_ptr, s_mod_layer,
    s_mod_which, s_mod_kind, pos_ptr, inv_freq_ptr, hn_attn_ptr, hn_mlp_ptr, q_ptr, k_ptr, v_ptr, s_k_layer,
    s_v_layer, mask_ptr, attn_ptr, h_ptr, part_acc_ptr, part_ml_ptr, o_part_ptr, down_part_ptr, sync_ptr, counters,
    n_layers, M, S, P, eps, scale_log2, keys_per_split, n_splits,
    s_pos_b, s_kb, s_kl, s_kh, s_vb, s_vl, s_vh, s_mb, s_mq, s_mk,
    D: tl.constexpr, F: tl.constexpr, HQ: tl.constexpr, HKV: tl.constexpr, HD: tl.constexpr,
    SHIFT: tl.constexpr, GATED: tl.constexpr, ATTN_SPLIT: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, FP8: tl.constexpr, O_SPLITS: tl.constexpr, DOWN_SPLITS: tl.constexpr,
    BLOCK_M: tl.constexpr, PAIR: tl.constexpr, BLOCK_K: tl.constexpr, GU_COLS: tl.constexpr, OUT_HALF: tl.constexpr,
    ATTN_ROWS: tl.constexpr, ATTN_KEYS: tl.constexpr, ATTN_D_PARTS: tl.constexpr, BLOCK_HD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BARRIERS: tl.constexpr, ALIGN: tl.constexpr,
):
    """Every layer of one denoising step (see :func:`expert_step`): layer ``l`` takes projection ``j``'s weight
    (and FP8 scales) at layer 0's plus the element offset ``table[j, l]`` (a multiple of ``ALIGN``), its norm /
    modulation vectors and KV cache at ``l`` times the layer strides, and its barrier counters at
    ``sync_ptr + l * BARRIERS``."""
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    m_pad = tl.cdiv(M, BLOCK_M) * BLOCK_M
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
        if layer > 0:
            src = out_ptr
        sync = sync_ptr + layer * BARRIERS
        _layer(src, out_ptr, w_qkv, w_o, w_gu, w_down, qkv_ws, o_ws, gu_ws, down_ws, attn_scale, mlp_scale,
               mod + s_mod_kind, mlp_shift, mod + 2 * s_mod_kind, mlp_gate, pending_gate, k_ptr + layer * s_k_layer,
               v_ptr + layer * s_v_layer, pos_ptr, inv_freq_ptr, hn_attn_ptr, hn_mlp_ptr, q_ptr, mask_ptr, attn_ptr,
               h_ptr, part_acc_ptr, part_ml_ptr, o_part_ptr, down_part_ptr, sync, counters, M, S, P, eps, scale_log2,
               keys_per_split, n_splits, s_pos_b, s_kb, s_kl, s_kh, s_vb, s_vl, s_vh, s_mb, s_mq, s_mk, layer > 0,
               False, D, F, HQ, HKV, HD, SHIFT, GATED, ATTN_SPLIT, UPCAST, DOT_PRECISION, FP8, O_SPLITS, DOWN_SPLITS,
               BLOCK_M, PAIR, BLOCK_K, GU_COLS, OUT_HALF, ATTN_ROWS, ATTN_KEYS, ATTN_D_PARTS, BLOCK_HD, BLOCK_D, 255,
               True)
        # The next layer's first phase reads this layer's down-projection partials; the last layer adds
        # them to the residual here.
        _grid_sync(sync + 6, n_programs, True)
        if layer == n_layers - 1:
            _row_phase(out_ptr, out_ptr, hn_mlp_ptr, down_part_ptr, mlp_gate, mlp_scale, mlp_shift, M, m_pad, eps, pid,
                       n_programs, True, DOWN_SPLITS, GATED, False, SHIFT, D, BLOCK_D)


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
) -> torch.Tensor:
    """Every expert layer of one step on ``x (M, D)`` into ``out (M, D)`` (layer 0 reads ``x``, later layers
    update ``out`` in place; ``out`` may be ``x``), in one launch. ``tables``: the layers' weights
    (:func:`expert_weight_tables`); ``norm_scales (L, 2, D)`` fp32, the attention and MLP norms' column
    factors per layer; Pi0.5: ``modulation (L, 2, 3, D)`` fp32, (attention, MLP) x (scale, shift, gate) per
    layer (the shifts and residual gates are used). ``keys/values (L, B, P + S, Hkv, Dh)``: each layer's
    cache, whose suffix rows the layer writes. ``step`` picks the barrier counters of the ``L`` launches
    ``step * L ... step * L + L - 1`` of the workspace (all zeroed by ``workspace.reset()`` before the
    loop). Computes what :func:`~cortexflow.kernels.expert_layer.expert_layer` chained over the layers does,
    in the same order of operations. Returns ``out``."""
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
    adaptive = modulation is not None
    mod = modulation if adaptive else norm_scales
    mod_strides = modulation.stride()[:3] if adaptive else (0, 0, 0)
    sync = workspace.sync[step * layers * workspace.BARRIERS:]
    fp8 = tables.scales is not None
    _expert_step_kernel[(workspace.programs,)](
        x, out, *tables.weights, tables.offsets, *(tables.scales if fp8 else (norm_scales,) * 4),
        tables.scale_offsets if fp8 else tables.offsets, norm_scales,
        norm_scales.stride(0), norm_scales.stride(1), mod, *mod_strides, positions, inv_freq, workspace.normed_attn,
        workspace.normed_mlp, workspace.q, keys, values, keys.stride(0), values.stride(0), mask, workspace.attn,
        workspace.h, workspace.part_acc, workspace.part_ml, workspace.o_part, workspace.down_part, sync,
        workspace.counters, layers, m, s, p, eps, scale * LOG2E, workspace.keys_per_split, workspace.n_splits,
        positions.stride(0), keys.stride(1), keys.stride(2), keys.stride(3), values.stride(1), values.stride(2),
        values.stride(3), mask.stride(0), mask.stride(1), mask.stride(2), BARRIERS=workspace.BARRIERS,
        ALIGN=tables.alignment,
        **launch_constants(x.dtype, dim, mlp_dim, heads, kv_heads, head_dim, adaptive, adaptive, fp8, workspace),
    )
    return out


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
