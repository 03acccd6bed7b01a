"""The Triton backend's ``decoder_layer`` unit (a token LM's layer: OpenVLA's Llama-2, RT-2's Gemma) and the
weight fusion it runs on.

Same function as the unit's default composition (:meth:`cortexflow.ops.ComputeBackend.decoder_layer`), fewer
kernels per layer:
- Q/K/V and gate/up each run as one GEMM over concatenated weights (:func:`fuse_layer_projections`; the
  separate weights become views into the fused ones, so no memory is added);
- one kernel (:mod:`cortexflow.kernels.qkv_rope`) splits the QKV output, rotates Q and K and writes K/V
  straight into the KV cache, at rows ``0..L-1`` for the prefill or at the row held in the ``write_at``
  device tensor for a decode step (so the CUDA graph of a step replays for every position);
- one kernel for the gated activation (``silu(gate) * up`` for Llama, ``gelu_tanh(gate) * up`` for Gemma)
  over the fused ``[gate | up]`` GEMM output;
- both residual adds ride on the GEMM (``addmm``: cuBLAS reads the residual as its C operand), in place
  after layer 0 (an out-of-place ``addmm`` first copies the residual into its output).

A single-token decode step (one row) goes further (``decode_gemv``, :mod:`cortexflow.kernels.decode_gemv`):
each projection is one GEMV kernel that also does what sits around it: the RMSNorm before Q/K/V and
before gate/up (recomputed per program from the one row), RoPE and the KV-cache write after Q/K/V
(:mod:`cortexflow.kernels.decode_qkv_rope`), the residual adds, and the gated activation. That is
4 GEMVs + attention (+ combine) per layer, launched with programmatic dependent launch on Hopper
(:mod:`cortexflow.kernels.pdl`: each GEMV loads its first weight chunk while the kernel before finishes).

FP8 weights: a projection whose weight in the weights dict is E4M3 (``quantize_in_place``: per-output-channel
fp32 scales under ``fp8_scale_key(name)``) runs in FP8. A decode step's GEMVs read the E4M3 weight and
apply the scales per output row (weight-only FP8, ``weight_scale=`` of the decode kernels); every other call
(several rows, or one row with ``decode_gemv="off"``) quantises the activation rows to E4M3 and multiplies on
FP8 tensor cores (:func:`cortexflow.kernels.fp8_gemm.fp8_linear`; for QKV and gate/up the unscaled product, whose
consumers, the QKV/RoPE and gated-activation kernels, apply the scales: ``fp8_product``; with folded norms, o's
unscaled product is scaled and added to the residual in gate/up's row-quantisation launch: ``fp8_product_of_sum``).
The norm folding works on bf16 weights, so it comes before quantisation; the LM head stays in the compute dtype.

Per Llama layer that is 9 kernels (2 norms, 4 GEMMs, QKV+RoPE, attention, gated activation; plus the
attention's split combine) instead of ~17 (3 Q/K/V GEMMs, 2 RoPE kernels, 2 cache copies, 2 GEMMs and 2
element-wise kernels for the MLP, 2 adds).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from cortexflow.backends.triton_fp8 import project, project_add, weight_scale
from cortexflow.errors import ConfigError
from cortexflow.kernels.decode_gemv import decode_gemv
from cortexflow.kernels.decode_qkv_rope import decode_qkv_rope
from cortexflow.kernels.fp8_gemm import ScaledProduct, fp8_product, fp8_product_of_sum
from cortexflow.kernels.gelu_gate import gelu_tanh_gate_fused
from cortexflow.kernels.qkv_rope import qkv_rope
from cortexflow.kernels.rms_norm import rms_rstd
from cortexflow.ops import DecoderDims, GatedLayer
from cortexflow.quantization.fp8 import fp8_scale, is_fp8

#: The largest head size the attention and RoPE kernels were written for.
MAX_HEAD_DIM = 256

#: Rows of a fused weight scaled per step when folding norm weights in (bounds the fp32 temporaries).
FOLD_ROWS = 4096

#: The fused projections of a gated-MLP decoder layer: fused name -> the parts it concatenates (rows).
FUSED_PROJECTIONS = (("qkv", ("q", "k", "v")), ("gate_up", ("gate", "up")))


def concat_as_views(weights: dict[str, torch.Tensor], fused: str, parts: list[str]) -> None:
    """Add ``weights[fused]`` = the ``parts`` concatenated along dim 0, in place, and replace each part by a view
    into it, so the originals can be freed (nothing when ``fused`` is there already, or when none of the parts is:
    a model's ``unread_weights``)."""
    if fused in weights or not any(name in weights for name in parts):
        return
    tensors = [weights[name] for name in parts]
    joined = torch.cat(tensors, dim=0)
    weights[fused] = joined
    start = 0
    for name, tensor in zip(parts, tensors):
        weights[name] = joined[start:start + tensor.shape[0]]
        start += tensor.shape[0]


def fuse_layer_projections(weights: dict[str, torch.Tensor], layer_prefixes) -> dict[str, torch.Tensor]:
    """Add ``{layer}.qkv`` / ``{layer}.gate_up`` (row-concatenated) for each layer prefix, in place, and
    replace the separate weights by views into them, so the originals are freed one layer at a time."""
    for p in layer_prefixes:
        for fused, parts in FUSED_PROJECTIONS:
            concat_as_views(weights, f"{p}.{fused}", [f"{p}.{part}" for part in parts])
    return weights


def fold_norm_weights(layers: Sequence[GatedLayer], weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fold each layer's pre-attention and pre-MLP RMSNorm scales into the fused QKV and gate/up weights, in
    place: ``W[:, k] *= 1 + norm_scale[k]`` (fp32 math, one rounding), then replace the scales by zeros (so
    ``1 + 0`` leaves the norm a plain normalisation). Afterwards the projection of the un-normalised input
    ``x`` times the row's ``rsqrt(mean(x^2) + eps)`` is the reference's projection of ``norm(x)``, so a decode
    step needs no norm kernel: the consumer of the projection (QKV/RoPE, the gated activation, or the decode
    GEMV's prologue) applies the row statistic. The result stays correct for any backend's default
    composition, and a second fold changes nothing (it scales by ``1 + 0``). Needs the fused weights
    (:func:`fuse_layer_projections`) in a float dtype: folding comes before FP8 quantisation (a ConfigError
    for an E4M3 weight whose norm is not folded yet); marks each layer with :func:`folded_key` for the fused
    layer."""
    marker = None
    for layer in layers:
        for fused, norm in (("qkv", layer.attn_norm), ("gate_up", layer.mlp_norm)):
            w = weights[layer.name(fused)]
            if is_fp8(w):
                if weights[norm].any():
                    raise ConfigError(f"cannot fold norm {norm!r} into the E4M3 weight {layer.name(fused)!r}: fold "
                                      "the norms (fold_norm_weights) before quantising (quantize_in_place)")
                continue
            scale = 1.0 + weights[norm].float()
            for rows in w.split(FOLD_ROWS):  # in row chunks: the fp32 temporaries stay small
                rows.copy_((rows.float() * scale[None, :]).to(rows.dtype))
            weights[norm] = torch.zeros_like(weights[norm])
        if marker is None:
            marker = torch.ones((), device=weights[layer.name("qkv")].device)
        weights[folded_key(layer)] = marker
    return weights


def folded_key(layer: GatedLayer) -> str:
    """Present in the weights once :func:`fold_norm_weights` folded ``layer``'s norm scales (this backend's
    own marker: the default compositions never read it)."""
    return layer.name("norms_folded")


def fits_fused_layer(dims: DecoderDims) -> bool:
    """Whether the fused layer's kernels were written for ``dims``' head size."""
    return dims.head_dim <= MAX_HEAD_DIM and dims.head_dim % 2 == 0


def fuses_combine(backend, dims: DecoderDims) -> bool:
    """Whether the attention of layers with ``dims`` merges its key ranges in the last-arriving program:
    with ``fused_combine="grouped"``, in layers whose query heads share a KV head."""
    return backend.options.fused_combine == "grouped" and _shares_kv_heads(dims)


def preloads_decode_keys(backend, dims: DecoderDims) -> bool:
    """Whether a decode step's attention in layers with ``dims`` loads its settled cache rows before its PDL wait:
    with ``preload_decode_keys="grouped"``, in layers whose query heads share a KV head."""
    return backend.options.preload_decode_keys == "grouped" and _shares_kv_heads(dims)


def _shares_kv_heads(dims: DecoderDims) -> bool:
    """Whether the layer's query heads share KV heads (grouped / multi-query: RT-2's Gemma, not OpenVLA's Llama),
    the layers a ``"grouped"`` option applies to."""
    return dims.num_kv_heads < dims.num_heads


def fused_token_layer(backend, weights, layer: GatedLayer, x: torch.Tensor, positions: torch.Tensor,
                      mask: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor], write_at: torch.Tensor | None,
                      gemv: bool = False) -> torch.Tensor:
    """``layer`` over ``x (B, L, D)``; arguments as in ``ComputeBackend.decoder_layer``. ``gemv``: a one-row
    call (a decode step at batch 1) runs every projection as a fused decode GEMV (else cuBLAS). E4M3
    projection weights run in FP8 (see the module doc)."""
    i = layer.index
    b, length, width = x.shape
    one_row = b * length == 1
    folded = folded_key(layer) in weights
    pdl = one_row and backend.pdl
    if gemv and one_row:
        return _decode_step_layer(backend, weights, layer, x, positions, mask, cache, write_at, folded, pdl)
    eps = layer.dims.rms_norm_eps
    qkv, scaling = _normed_projection(backend, weights, layer.attn_norm, layer.name("qkv"), x, folded, eps)
    attn = _attend(backend, layer, qkv, positions, mask, cache, write_at, scaling, eps, pdl)
    # Layer 0's input may be a caller's buffer: a new tensor. Later residuals are this stage's own
    # temporaries and, with bf16 weights, accumulate in place (an out-of-place addmm first copies the
    # residual: one more kernel).
    o_name, gu_name = layer.name("o"), layer.name("gate_up")
    attn_rows, residual = attn.reshape(b * length, -1), x.reshape(b * length, width)
    if folded and is_fp8(weights[o_name]) and is_fp8(weights[gu_name]):
        # o's product scaling and the residual add run in gate/up's row-quantisation launch.
        pending = fp8_product(attn_rows, weights[o_name], fp8_scale(weights, o_name))
        x2, p = fp8_product_of_sum(pending, residual, weights[gu_name], fp8_scale(weights, gu_name), rms_eps=eps)
        gate_up, scaling = p.product.view(b, length, -1), _product_scaling(p)
    else:
        x2 = project_add(weights, o_name, attn_rows, residual, i > 0)
        gate_up, scaling = _normed_projection(backend, weights, layer.mlp_norm, gu_name, x2.view(b, length, width),
                                              folded, eps)
    act = gelu_tanh_gate_fused(gate_up, silu=layer.activation == "silu", eps=eps, dtype=x.dtype, **scaling)
    return project_add(weights, layer.name("down"), act.reshape(b * length, -1), x2, True).view(b, length, width)


def _normed_projection(backend, weights, norm: str, name: str, x: torch.Tensor, folded: bool, eps: float):
    """``(projection, scaling)``: the projection by ``weights[name]`` of ``norm(x)``, or with folded norms
    the projection of ``x`` and the keyword (``rstd=`` for several rows: one statistics kernel;
    ``norm_input=`` for one row: its consumer recomputes the statistic) that makes the consumer scale it
    into the same values. With FP8 activations the folded form quantises ``x`` rather than the normalised
    row: per-row quantisation moves the row statistic into the row's scale (up to fp32 rounding), so the
    consumer's scaling still applies afterwards. An E4M3 weight gives the unscaled FP8 product and
    ``product_scales=`` (the consumer applies the scales, :func:`~cortexflow.kernels.fp8_gemm.fp8_product`), and
    the folded row statistic comes from the quantisation launch."""
    if is_fp8(weights[name]):
        p = fp8_product(x if folded else backend.rms_norm(x, weights[norm], eps), weights[name],
                        fp8_scale(weights, name), rms_eps=eps if folded else None)
        return p.product, _product_scaling(p)
    if not folded:
        return project(weights, name, backend.rms_norm(x, weights[norm], eps)), {}
    if x.shape[0] * x.shape[1] == 1:
        scaling = {"norm_input": x.contiguous()}
    else:
        scaling = {"rstd": rms_rstd(x, eps)}
    return project(weights, name, x), scaling


def _product_scaling(p: ScaledProduct) -> dict:
    """The keywords that make a consumer of the unscaled ``p.product`` apply its scales (and the folded norm's
    ``rstd``, when the quantisation launch computed it)."""
    scaling = {"product_scales": (p.row_scale, p.col_scale)}
    if p.rstd is not None:
        scaling["rstd"] = p.rstd
    return scaling


def _attend(backend, layer: GatedLayer, qkv, positions, mask, cache, write_at, scaling=None, eps=1e-6, pdl=False):
    """RoPE on the fused ``qkv (B, L, (Hq + 2 Hkv) * Dh)`` with K/V written into the layer's ``cache`` (rows
    ``0..L-1``, or the row in ``write_at``), then attention over this call's keys (prefill) or the whole
    cache (step); ``(B, L, Hq * Dh)``. ``scaling``: the folded norm's row statistic (``qkv_rope``'s
    ``rstd=`` or ``norm_input=``); ``pdl``: launch both kernels with programmatic dependent launch."""
    d = layer.dims
    length = qkv.shape[1]
    cache_k, cache_v = cache
    inv_freq = backend.inverse_frequencies(d.head_dim, d.rope_base, qkv.device)
    positions = positions.reshape(qkv.shape[0], length)
    if positions.stride(-1) != 1:
        positions = positions.contiguous()
    q = qkv_rope(qkv, positions, inv_freq, d.num_heads, d.num_kv_heads, cache_k, cache_v, write_at=write_at,
                 eps=eps, pdl=pdl, **(scaling or {}))
    if write_at is None:
        cache_k, cache_v = cache_k[:, :length], cache_v[:, :length]
    return _attention(backend, d, q, cache_k, cache_v, mask, pdl, write_at)


def _attention(backend, dims: DecoderDims, q, keys, values, mask, pdl, write_at=None):
    """The attention of the rotated ``q (B, L, Hq, Dh)`` over ``keys`` / ``values``; ``(B, L, Hq * Dh)``. A decode
    step (``write_at``: the cache row its QKV kernel just wrote) with ``pdl``, in the layers
    :func:`preloads_decode_keys` selects, loads the other rows before its PDL wait: they come from earlier steps, and
    the step's mask and position from torch kernels (launched without PDL) before its first layer
    (:meth:`cortexflow.models.token_decoding.DecoderLM.step`)."""
    preload = pdl and write_at is not None and preloads_decode_keys(backend, dims)
    return backend.attention(q, keys, values, mask, 1.0 / math.sqrt(dims.head_dim),
                             fused_combine=fuses_combine(backend, dims), pdl=pdl,
                             fresh_row=write_at if preload else None)


def _decode_step_layer(backend, weights, layer: GatedLayer, x, positions, mask, cache, write_at, folded, pdl):
    """The one-row layer ``x (1, 1, D)``: 4 fused GEMVs (norm + QKV with RoPE and the cache write in its
    epilogue, o + residual, norm + gate/up + activation, down + residual) and attention; with
    ``backend.options.decode_qkv_rope`` off, QKV/RoPE runs as its own kernel after the QKV GEMV. ``folded``: the
    norm weights live in the QKV and gate/up weights, so the GEMV prologues only apply the row statistic. ``pdl``:
    every kernel with programmatic dependent launch (each GEMV loads its first weight chunk while the
    kernel before it finishes)."""
    i = layer.index
    d = layer.dims
    eps = d.rms_norm_eps

    def norm_args(name):
        return {"normalize": True} if folded else {"norm_weight": weights[name]}

    if backend.options.decode_qkv_rope and write_at is not None:
        inv_freq = backend.inverse_frequencies(d.head_dim, d.rope_base, x.device)
        cache_k, cache_v = cache
        q = decode_qkv_rope(x, weights[layer.name("qkv")], d.num_heads, d.num_kv_heads, positions, inv_freq, cache_k,
                            cache_v, write_at, eps=eps, weight_scale=weight_scale(weights, layer.name("qkv")), pdl=pdl,
                            **norm_args(layer.attn_norm))
        attn = _attention(backend, d, q, cache_k, cache_v, mask, pdl, write_at)
    else:
        qkv = decode_gemv(x, weights[layer.name("qkv")], eps=eps, weight_scale=weight_scale(weights, layer.name("qkv")),
                          pdl=pdl, **norm_args(layer.attn_norm))
        attn = _attend(backend, layer, qkv, positions, mask, cache, write_at, pdl=pdl)
    # Layer 0's input may be a caller's buffer: a new tensor; later layers accumulate in place.
    x2 = decode_gemv(attn, weights[layer.name("o")], residual=x, out=None if i == 0 else x.view(-1),
                     weight_scale=weight_scale(weights, layer.name("o")), pdl=pdl)
    act = decode_gemv(x2, weights[layer.name("gate_up")], eps=eps, gated=layer.activation,
                      weight_scale=weight_scale(weights, layer.name("gate_up")), pdl=pdl, **norm_args(layer.mlp_norm))
    return decode_gemv(act, weights[layer.name("down")], residual=x2, out=x2.view(-1),
                       weight_scale=weight_scale(weights, layer.name("down")), pdl=pdl)


def greedy_head(backend, h: torch.Tensor, norm_weight: torch.Tensor, head: torch.Tensor, eps: float,
                allowed: tuple[int, int] | None) -> torch.Tensor:
    """The final RMSNorm, the LM head (or its ``allowed`` rows) and the rounding to the compute dtype of one row
    ``h`` in one decode GEMV, then the argmax over those logits (the reference's argmax of the same rounded
    values upcast to fp32 picks the same first maximum) -> ``(1,)``."""
    lo = 0
    if allowed is not None:
        lo, hi = allowed
        head = head[lo:hi]
    logits = decode_gemv(h, head, norm_weight=norm_weight, eps=eps, pdl=backend.pdl)
    return logits.view(1, -1).argmax(dim=-1) + lo
