"""The Triton backend's flow-matching units for the Pi0 family's action expert (``begin_denoising`` and
``expert_stack``: every expert layer of one denoising step, then the final norm; ``denoising_step``: a whole Euler
step).

What differs from the units' default compositions (:class:`cortexflow.ops.ComputeBackend`; same function, fewer kernels):
- Q/K/V and gate/up projections each run as one GEMM over concatenated weights (the separate weights
  become views into the fused ones, so no memory is added);
- one kernel splits the fused QKV output, applies RoPE, and writes the suffix K/V straight into the
  per-call KV buffer behind the prefix cache;
- residual adds ride on the GEMM (``addmm``) for plain norms and on one ``addcmul`` for adaptive norms'
  gated residuals;
- with ``persistent`` each expert layer is one persistent Triton kernel (:mod:`cortexflow.kernels.expert_layer`:
  norm, QKV + RoPE + cache write, attention, o + residual, norm, gate/up + GELU gate, down + residual in
  seven phases separated by grid barriers) instead of ~10 kernels (norm, cuBLAS GEMMs, QKV/RoPE,
  attention, GELU gate); the call's workspace carries the barrier counters and the split-K partials of
  each layer's down projection into the next; with ``expert_launch="step"`` one persistent kernel runs every
  layer of the step (:mod:`cortexflow.kernels.expert_step`, its weight tables made once per weights). E4M3
  expert weights (``quantize_in_place`` on the fused weights) run only there: the kernel converts them in its GEMMs and applies their per-channel scales.
- with ``expert_launch="euler"`` one launch is a whole Euler step (``denoising_step``): the step kernel with the
  action path around the layers (:class:`~cortexflow.kernels.expert_step.EulerUpdate`).
What depends only on the time step (the expert's norm scales, modulations and residual gates per step) is
the model's :class:`~cortexflow.ops.ExpertConditioning`, made once per weights and step count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cortexflow.kernels import rms_norm as rms_kernel
from cortexflow.kernels.attention import attention
from cortexflow.kernels.expert_layer import ExpertWorkspace, check_expert_shapes, default_tiling, expert_layer
from cortexflow.kernels.expert_step import (
    EulerUpdate,
    ExpertWeightTables,
    action_path_unsupported,
    expert_step,
    expert_weight_tables,
)
from cortexflow.kernels.gelu_gate import gelu_tanh_gate_fused
from cortexflow.kernels.qkv_rope import qkv_rope
from cortexflow.ops import ActionPath, DenoisingContext, ExpertStack
from cortexflow.quantization.fp8 import fp8_scale, is_fp8


def start_workspace(ctx: DenoisingContext, weights, num_steps: int) -> ExpertWorkspace:
    """The persistent kernel's workspace for ``num_steps`` steps of ``ctx``'s expert, counters reset."""
    first = ctx.expert.layers[0]
    d = first.dims
    b, s = ctx.positions.shape
    width = weights[first.name("o")].shape[0]
    mlp_dim = weights[first.name("down")].shape[1]
    work = ExpertWorkspace(b * s, s, width, mlp_dim, d.num_heads, d.num_kv_heads, d.head_dim,
                           ctx.prefix_len + s, ctx.keys.dtype, ctx.keys.device,
                           default_tiling(expert_weights_fp8(weights, ctx.expert)),
                           launches=num_steps * len(ctx.expert.layers))
    work.reset()
    return work


def step_tables(weights, expert: ExpertStack) -> ExpertWeightTables:
    """The step kernel's tables of the expert's fused projections (and their FP8 scales)."""
    layers = [tuple(weights[layer.name(p)] for p in PROJECTIONS) for layer in expert.layers]
    scales = None
    if expert_weights_fp8(weights, expert):
        scales = [tuple(fp8_scale(weights, layer.name(p)) for p in PROJECTIONS) for layer in expert.layers]
    return expert_weight_tables(layers, scales)


def fused_expert_stack(backend, weights, ctx: DenoisingContext, x: torch.Tensor, step: int) -> torch.Tensor:
    """``ComputeBackend.expert_stack`` over the fused weights: the layers as persistent kernels (when
    ``ctx.backend_state`` holds a workspace; one for the whole step when it holds step tables too) or kernel
    chains, then the final norm; ``(B, chunk, D)``."""
    cond = ctx.conditioning
    adaptive = cond.modulation is not None
    pdl = ctx.backend_state["pdl"]
    work = ctx.backend_state.get("workspace")
    tables = ctx.backend_state.get("step_tables")
    inv_freq = ctx.backend_state["inv_freq"]
    first = ctx.expert.layers[0]
    d = first.dims
    scale = d.attention_scale
    eps = d.rms_norm_eps
    if tables is not None:
        x = _persistent_step(tables, x, work, ctx, inv_freq, scale, eps, d.num_heads, step)
    else:
        for layer in ctx.expert.layers:
            i = layer.index
            if work is not None:
                x = _persistent_layer(weights, layer, len(ctx.expert.layers), x, work, ctx.positions, ctx.mask,
                                      ctx.keys[i], ctx.values[i], inv_freq, scale, eps, cond, step)
                continue
            x = _expert_layer(weights, layer, x, ctx.positions, ctx.mask, ctx.keys[i], ctx.values[i], ctx.prefix_len,
                              inv_freq, scale, eps, cond.modulation[step, i] if adaptive else None, pdl)
    b = x.shape[0]
    rows = x[:, -ctx.chunk:]
    if adaptive:
        final = cond.final_modulation[step]
        return rms_kernel.rms_norm(rows, None, eps, final[0].expand(b, -1), final[1].expand(b, -1))
    return rms_kernel.rms_norm(rows, weights[ctx.expert.final_norm], eps, pdl=pdl)


def euler_step_unsupported(ctx: DenoisingContext, path: ActionPath) -> str | None:
    """Why :func:`euler_step` cannot run this call (None when it can)."""
    if "step_tables" not in ctx.backend_state:
        return "the expert does not run in the step kernel"
    return action_path_unsupported(path.in_weight.shape[0], ctx.backend_state["workspace"].tiling,
                                   path.mid_weight is not None, ctx.conditioning.modulation is not None)


def euler_step(backend, weights, ctx: DenoisingContext, path: ActionPath, hidden: torch.Tensor, x_t: torch.Tensor,
               step: int, dt: float) -> None:
    """``ComputeBackend.denoising_step`` as one launch of the step kernel with the action path
    (:func:`euler_step_unsupported` said it can run): ``x_t (B, H, A)`` updated in place; ``hidden (B, S, D)`` is
    only read (its first ``S - H`` rows). The final norm's column factors are made once per weights (and step
    count)."""
    cond = ctx.conditioning
    if cond.modulation is not None:
        scales = backend.per_weights(weights, ("euler_final_scales", cond.final_modulation.shape[0]),
                                     lambda: (1.0 + cond.final_modulation[:, 0]).contiguous())
        final_scale, final_shift = scales[step], cond.final_modulation[step, 1]
    else:
        final_scale = backend.per_weights(weights, "euler_final_scale",
                                          lambda: 1.0 + weights[ctx.expert.final_norm].float())
        final_shift = None
    euler = EulerUpdate(x_t.view(-1, x_t.shape[-1]), path.in_weight, path.in_bias[step], path.head_weight,
                        path.head_bias, final_scale, x_t.shape[1], dt, path.mid_weight, path.mid_bias, final_shift)
    dims = ctx.expert.layers[0].dims
    state = ctx.backend_state
    _persistent_step(state["step_tables"], hidden, state["workspace"], ctx, state["inv_freq"], dims.attention_scale,
                     dims.rms_norm_eps, dims.num_heads, step, euler)


#: The expert weights the persistent kernel takes, in the order of its ``weight_scales``.
PROJECTIONS = ("qkv", "o", "gate_up", "down")


def expert_weights_fp8(weights, expert: ExpertStack) -> bool:
    """Whether the expert's fused projections hold E4M3 data (:func:`~cortexflow.quantization.fp8.quantize_in_place`)."""
    return is_fp8(weights[expert.layers[0].name("qkv")])


def persistent_layer_unsupported(weights, expert: ExpertStack) -> str | None:
    """Why the persistent expert-layer kernel cannot run ``expert`` (None when it can)."""
    first = expert.layers[0]
    d = first.dims
    return check_expert_shapes(weights[first.name("o")].shape[0], weights[first.name("down")].shape[1], d.num_heads,
                               d.num_kv_heads, d.head_dim)


def _persistent_layer(weights, layer, layers, x, work, positions, mask, keys, values, inv_freq, scale, eps, cond, step):
    """Expert ``layer`` (of ``layers``) as one persistent kernel on ``x (B, S, D)`` into ``work.residual`` (layer 0
    reads the step's token buffer, which is never overwritten; later layers update the residual in place).
    ``step`` picks the launch's barrier counters and, for adaptive norms, the norm scales, shifts and residual
    gates of t."""
    i = layer.index
    b, s, d = x.shape
    if cond.modulation is None:
        scales, extra = cond.norm_scales[i], {}
    else:
        scales = cond.norm_scales[step, i]
        mod = cond.modulation[step, i]  # (2, 3, D): (attention, MLP) x (scale, shift, gate)
        extra = dict(attn_shift=mod[0, 1], mlp_shift=mod[1, 1], attn_gate=mod[0, 2], mlp_gate=mod[1, 2])
        if i > 0:
            extra["pending_gate"] = cond.modulation[step, i - 1, 1, 2]
    if is_fp8(weights[layer.name("qkv")]):
        extra["weight_scales"] = tuple(fp8_scale(weights, layer.name(p)) for p in PROJECTIONS)
    out = work.residual.view(b, s, d)
    # Each layer but the last leaves its down-projection as split-K partials; the next adds them first.
    expert_layer(x.view(b * s, d), out.view(b * s, d), weights[layer.name("qkv")], weights[layer.name("o")],
                 weights[layer.name("gate_up")], weights[layer.name("down")], scales[0], scales[1], positions,
                 inv_freq, keys, values, mask, eps, scale, work, layer.dims.num_heads, launch=step * layers + i,
                 pending=i > 0, finish=i == layers - 1, **extra)
    return out


def _persistent_step(tables, x, work, ctx, inv_freq, scale, eps, heads, step, euler=None):
    """Every expert layer of step ``step`` as one persistent kernel on ``x (B, S, D)`` into ``work.residual``
    (the same counters, buffers and numbers as the layer launches of :func:`_persistent_layer`); with ``euler``
    the whole Euler step (:func:`~cortexflow.kernels.expert_step.expert_step`)."""
    b, s, d = x.shape
    cond = ctx.conditioning
    adaptive = cond.modulation is not None
    norm_scales = cond.norm_scales[step] if adaptive else cond.norm_scales
    expert_step(x.view(b * s, d), work.residual, tables, norm_scales, ctx.positions, inv_freq, ctx.keys, ctx.values,
                ctx.mask, eps, scale, work, heads, cond.modulation[step] if adaptive else None, step=step, euler=euler)
    return work.residual.view(b, s, d)


def _norm(x, weight, eps, modulation, pdl=False):
    """Plain RMSNorm with ``weight`` or adaptive with ``modulation (3, D)`` = (scale, shift, gate)."""
    if modulation is None:
        return rms_kernel.rms_norm(x, weight, eps, pdl=pdl)
    b = x.shape[0]
    return rms_kernel.rms_norm(x, None, eps, modulation[0].expand(b, -1), modulation[1].expand(b, -1), pdl=pdl)


def _expert_layer(weights, layer, x, positions, mask, keys, values, p, inv_freq, scale, eps, modulation, pdl=False):
    """Expert ``layer`` on ``x (B, S, D)`` as a kernel chain (norm, cuBLAS GEMMs, QKV/RoPE, attention, GELU
    gate); writes this layer's suffix K/V into ``keys/values[:, p:]``. ``modulation (2, 3, D)``: the adaptive
    norms' (scale, shift, gate) of attention and MLP (None: plain norms). ``pdl``: the Triton kernels with
    programmatic dependent launch."""
    i = layer.index
    d = layer.dims
    b, s, width = x.shape
    attn_mod = None if modulation is None else modulation[0]
    mlp_mod = None if modulation is None else modulation[1]
    h = _norm(x, None if layer.attn_norm is None else weights[layer.attn_norm], eps, attn_mod, pdl)
    qkv = F.linear(h, weights[layer.name("qkv")])
    q = qkv_rope(qkv, positions, inv_freq, d.num_heads, d.num_kv_heads, keys[:, p:], values[:, p:], pdl=pdl)
    a = attention(q, keys, values, mask, scale, pdl=pdl).view(b * s, -1)
    # Layer 0's input is the step's token buffer (its state row is written once per call): never
    # overwritten. Every later residual is this decoder's own temporary, updated in place.
    x2 = _residual_linear(x.reshape(b * s, width), a, weights[layer.name("o")], attn_mod, inplace=i > 0)
    h = _norm(x2.view(b, s, width), None if layer.mlp_norm is None else weights[layer.mlp_norm], eps, mlp_mod,
              pdl).view(b * s, width)
    act = gelu_tanh_gate_fused(F.linear(h, weights[layer.name("gate_up")]))
    x2 = _residual_linear(x2, act, weights[layer.name("down")], mlp_mod, inplace=True)
    return x2.view(b, s, width)


def _residual_linear(residual, a, weight, modulation, inplace=False):
    """``residual + a @ weightᵀ`` (plain norms), or the gated ``residual + gate ⊙ (a @ weightᵀ)`` with
    ``modulation[2]`` the gate; ``(M, D)``. ``inplace`` (plain norms) accumulates into ``residual``: an
    out-of-place ``addmm`` first copies the residual into its output (one more kernel)."""
    if modulation is None:
        return residual.addmm_(a, weight.T) if inplace else torch.addmm(residual, a, weight.T)
    return torch.addcmul(residual, F.linear(a, weight), modulation[2].to(residual.dtype))
