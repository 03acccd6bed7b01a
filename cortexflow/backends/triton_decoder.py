"""The fused flow-matching decoder of the Triton backend for Pi0 / Pi0.5 (the ``transformer_decoder`` stage).

What differs from the model's op-by-op stage (same function, fewer kernels):
- Q/K/V and gate/up projections each run as one GEMM over concatenated weights (the separate weights
  become views into the fused ones, so no memory is added);
- one kernel splits the fused QKV output, applies RoPE, and writes the suffix K/V straight into a
  per-call KV buffer behind the prefix cache (no concatenation per step);
- residual adds ride on the GEMM (``addmm``) for Pi0 and on one ``addcmul`` for Pi0.5's gated residuals;
- everything that depends only on the time step is computed once per weights and step count: Pi0's
  time half of ``action_time_mlp_in`` (folded with ``action_in_proj`` into one fp32 GEMM) and Pi0.5's
  time MLP and all 37 adaRMS modulations;
- Pi0's state token is projected once per call;
- with ``persistent`` each expert layer is one persistent Triton kernel (:mod:`cortexflow.kernels.expert_layer`:
  norm, QKV + RoPE + cache write, attention, o + residual, norm, gate/up + GELU gate, down + residual in
  seven phases separated by grid barriers) instead of ~10 kernels (norm, cuBLAS GEMMs, QKV/RoPE,
  attention, GELU gate).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cortexflow.backends.triton_token_decoder import fuse_layer_projections
from cortexflow.kernels import rms_norm as rms_kernel
from cortexflow.kernels.attention import attention
from cortexflow.kernels.expert_layer import ExpertWorkspace, check_expert_shapes, default_tiling, expert_layer
from cortexflow.kernels.gelu_gate import gelu_tanh_gate_fused
from cortexflow.kernels.qkv_rope import qkv_rope
from cortexflow.models.flow_matching import euler_times, sinusoidal_time_embedding
from cortexflow.models.gemma import attention_scale
from cortexflow.models.pi0 import Pi0Model, Pi05Model


def fuse_expert_weights(model: Pi0Model, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add ``expert.layers.i.qkv`` / ``.gate_up`` and turn the separate weights into views of them."""
    return fuse_layer_projections(weights, (f"expert.layers.{i}" for i in range(model.config.num_decoder_layers)))


@dataclass
class TimeTables:
    """Per-step precomputed terms (fp32). Pi0: ``action_weight (D, A)``, ``action_bias (steps, D)`` and fp32
    copies of ``action_time_mlp_out`` (``action_out_weight (D, D)``, ``action_out_bias (D,)``), made once;
    Pi0.5: ``modulation (steps, layers, 2, 3, D)``, ``final_modulation (steps, 3, D)`` and fp32 copies of
    ``action_in_proj`` (``action_in_weight (D, A)``, ``action_in_bias (D,)``), made once instead of per step.

    For the persistent expert layer: ``norm_scales``, the column factor of the attention and MLP norms,
    ``(layers, 2, D)`` for Pi0 (``1 + w``) and ``(steps, layers, 2, D)`` for Pi0.5 (``1 + scale_t``)."""

    times: list[float]
    action_weight: torch.Tensor | None = None
    action_bias: torch.Tensor | None = None
    modulation: torch.Tensor | None = None
    final_modulation: torch.Tensor | None = None
    norm_scales: torch.Tensor | None = None
    action_in_weight: torch.Tensor | None = None
    action_in_bias: torch.Tensor | None = None
    action_out_weight: torch.Tensor | None = None
    action_out_bias: torch.Tensor | None = None


def build_time_tables(model: Pi0Model, weights: dict[str, torch.Tensor], num_steps: int) -> TimeTables:
    """Everything in the decoder that depends only on t, for the ``num_steps`` Euler times."""
    c = model.config
    d = c.decoder_dim
    times = euler_times(num_steps)
    device = weights["action_in_proj.weight"].device
    emb = torch.cat([sinusoidal_time_embedding(t, d, 1, device) for t in times])  # (steps, D) fp32
    w = lambda name: weights[name].float()  # noqa: E731
    if isinstance(model, Pi05Model):
        cond = F.silu(F.linear(emb, w("time_mlp_in.weight"), w("time_mlp_in.bias")))
        cond = F.silu(F.linear(cond, w("time_mlp_out.weight"), w("time_mlp_out.bias")))
        mods = []
        for i in range(c.num_decoder_layers):
            for norm in ("attn_norm_mod", "mlp_norm_mod"):
                name = f"expert.layers.{i}.{norm}"
                mods.append(F.linear(cond, w(f"{name}.weight"), w(f"{name}.bias")))
        modulation = torch.stack(mods, 1).view(num_steps, c.num_decoder_layers, 2, 3, d)
        final = F.linear(cond, w("expert.norm_mod.weight"), w("expert.norm_mod.bias")).view(num_steps, 3, d)
        norm_scales = 1.0 + modulation[:, :, :, 0]  # (steps, layers, 2, D)
        return TimeTables(times, modulation=modulation.contiguous(), final_modulation=final.contiguous(),
                          norm_scales=norm_scales.contiguous(), action_in_weight=w("action_in_proj.weight"),
                          action_in_bias=w("action_in_proj.bias"))
    mlp_in = w("action_time_mlp_in.weight")
    action_half, time_half = mlp_in[:, :d], mlp_in[:, d:]
    action_weight = action_half @ w("action_in_proj.weight")
    action_bias = action_half @ w("action_in_proj.bias") + emb @ time_half.T + w("action_time_mlp_in.bias")
    norm_scales = torch.stack([
        torch.stack([1.0 + w(f"expert.layers.{i}.attn_norm"), 1.0 + w(f"expert.layers.{i}.mlp_norm")])
        for i in range(c.num_decoder_layers)
    ])
    return TimeTables(times, action_weight=action_weight, action_bias=action_bias, norm_scales=norm_scales,
                      action_out_weight=w("action_time_mlp_out.weight"), action_out_bias=w("action_time_mlp_out.bias"))


def fused_decoder(backend, model: Pi0Model, weights, inputs, tables: TimeTables, pdl: bool = False,
                  persistent: bool = False) -> torch.Tensor:
    """Euler integration of the action chunk with the fused expert layers; returns ``(B, H, A)`` fp32.

    ``pdl`` launches the expert's Triton kernels with programmatic dependent launch
    (:mod:`cortexflow.kernels.pdl`); ``persistent``: each expert layer as one persistent kernel (the caller
    checked :func:`~cortexflow.kernels.expert_layer.check_expert_shapes`)."""
    c = model.config
    dtype = backend.dtype
    noise, prefix_mask = inputs["noise"], inputs["prefix_mask"]
    b, chunk, _ = noise.shape
    pi05 = isinstance(model, Pi05Model)
    mask = model.suffix_attention_mask(prefix_mask, chunk)
    s = mask.shape[1]
    p = prefix_mask.shape[1]
    positions = prefix_mask.long().sum(1, keepdim=True) + torch.arange(s, device=noise.device)[None]
    cache = inputs["kv_cache"]
    keys = torch.empty((len(cache), b, p + s) + cache[0][0].shape[2:], dtype=dtype, device=noise.device)
    values = torch.empty_like(keys)
    for i, (k, v) in enumerate(cache):
        keys[i, :, :p] = k
        values[i, :, :p] = v
    inv_freq = backend.inverse_frequencies(c.head_dim, c.rope_base, noise.device)
    scale = attention_scale(c)
    eps = c.rms_norm_eps
    hidden = torch.empty((b, s, c.decoder_dim), dtype=dtype, device=noise.device)
    if not pi05:
        state = F.linear(inputs["state"].float(), weights["state_proj.weight"].float(), weights["state_proj.bias"].float())
        hidden[:, 0] = state.to(dtype)
    dt = float(np.float32(-1.0 / len(tables.times)))
    x_t = noise.to(torch.float32, copy=True)  # updated in place by the fused Euler step
    if persistent:
        work = ExpertWorkspace(b * s, s, c.decoder_dim, c.decoder_mlp_dim, c.num_heads, c.num_kv_heads, c.head_dim,
                               p + s, dtype, noise.device, default_tiling(),
                               launches=len(tables.times) * c.num_decoder_layers)
        work.reset()
    for step in range(len(tables.times)):
        if pi05:
            tokens = torch.addmm(tables.action_in_bias, x_t.view(-1, x_t.shape[-1]), tables.action_in_weight.T)
            hidden.copy_(tokens.view(hidden.shape))
        else:
            # fp32 cuBLAS GEMMs as the reference, on fp32 weights made once (no per-step casts).
            mixed = F.silu(torch.addmm(tables.action_bias[step], x_t.view(-1, x_t.shape[-1]), tables.action_weight.T))
            tokens = torch.addmm(tables.action_out_bias, mixed, tables.action_out_weight.T)
            hidden[:, 1:] = tokens.view(b, chunk, -1)
        x = hidden
        for i in range(c.num_decoder_layers):
            if persistent:
                x = _persistent_layer(weights, i, x, work, positions, mask, keys[i], values[i], inv_freq, scale, eps, c,
                                      tables, step, pi05)
                continue
            x = _expert_layer(weights, i, x, positions, mask, keys[i], values[i], p, inv_freq, scale, eps, c,
                              tables.modulation[step, i] if pi05 else None, pdl)
        if pi05:
            final = tables.final_modulation[step]
            h = rms_kernel.rms_norm(x[:, -chunk:], None, eps, final[0].expand(b, -1), final[1].expand(b, -1))
        else:
            h = rms_kernel.rms_norm(x[:, -chunk:], weights["expert.norm"], eps, pdl=pdl)
        velocity = F.linear(h, weights["action_out_proj.weight"], weights["action_out_proj.bias"])
        x_t.add_(velocity, alpha=dt)  # fp32 += dt * velocity (upcast in the same kernel)
    return x_t


def persistent_layer_unsupported(config) -> str | None:
    """Why the persistent expert-layer kernel cannot run ``config``'s expert (None when it can)."""
    return check_expert_shapes(config.decoder_dim, config.decoder_mlp_dim, config.num_heads, config.num_kv_heads,
                               config.head_dim)


def _persistent_layer(weights, i, x, work, positions, mask, keys, values, inv_freq, scale, eps, c, tables, step, pi05):
    """Expert layer ``i`` as one persistent kernel on ``x (B, S, D)`` into ``work.residual`` (layer 0 reads the
    step's token buffer, which is never overwritten; later layers update the residual in place). ``step``
    picks the launch's barrier counters and, for Pi0.5, the norm scales, shifts and residual gates of t."""
    pre = f"expert.layers.{i}"
    b, s, d = x.shape
    layers = c.num_decoder_layers
    if not pi05:
        scales, extra = tables.norm_scales[i], {}
    else:
        scales = tables.norm_scales[step, i]
        mod = tables.modulation[step, i]  # (2, 3, D): (attention, MLP) x (scale, shift, gate)
        extra = dict(attn_shift=mod[0, 1], mlp_shift=mod[1, 1], attn_gate=mod[0, 2], mlp_gate=mod[1, 2])
        if i > 0:
            extra["pending_gate"] = tables.modulation[step, i - 1, 1, 2]
    out = work.residual.view(b, s, d)
    # Each layer but the last leaves its down-projection as split-K partials; the next adds them first.
    expert_layer(x.view(b * s, d), out.view(b * s, d), weights[f"{pre}.qkv"], weights[f"{pre}.o"],
                 weights[f"{pre}.gate_up"], weights[f"{pre}.down"], scales[0], scales[1], positions, inv_freq, keys,
                 values, mask, eps, scale, work, c.num_heads, launch=step * layers + i,
                 pending=i > 0, finish=i == layers - 1, **extra)
    return out


def _norm(x, weight, eps, modulation, pdl=False):
    """Plain RMSNorm with ``weight`` or adaptive with ``modulation (3, D)`` = (scale, shift, gate)."""
    if modulation is None:
        return rms_kernel.rms_norm(x, weight, eps, pdl=pdl)
    b = x.shape[0]
    return rms_kernel.rms_norm(x, None, eps, modulation[0].expand(b, -1), modulation[1].expand(b, -1), pdl=pdl)


def _expert_layer(weights, i, x, positions, mask, keys, values, p, inv_freq, scale, eps, c, modulation, pdl=False):
    """One expert layer on ``x (B, S, D)`` as a kernel chain (norm, cuBLAS GEMMs, QKV/RoPE, attention, GELU
    gate); writes this layer's suffix K/V into ``keys/values[:, p:]``. ``pdl``: the Triton kernels with
    programmatic dependent launch."""
    pre = f"expert.layers.{i}"
    b, s, d = x.shape
    attn_mod = None if modulation is None else modulation[0]
    mlp_mod = None if modulation is None else modulation[1]
    h = _norm(x, weights.get(f"{pre}.attn_norm"), eps, attn_mod, pdl)
    qkv = F.linear(h, weights[f"{pre}.qkv"])
    q = qkv_rope(qkv, positions, inv_freq, c.num_heads, c.num_kv_heads, keys[:, p:], values[:, p:], pdl=pdl)
    a = attention(q, keys, values, mask, scale, pdl=pdl).view(b * s, -1)
    # Layer 0's input is the step's token buffer (its state row is written once per call): never
    # overwritten. Every later residual is this decoder's own temporary, updated in place.
    x2 = _residual_linear(x.reshape(b * s, d), a, weights[f"{pre}.o"], attn_mod, inplace=i > 0)
    h = _norm(x2.view(b, s, d), weights.get(f"{pre}.mlp_norm"), eps, mlp_mod, pdl).view(b * s, d)
    act = gelu_tanh_gate_fused(F.linear(h, weights[f"{pre}.gate_up"]))
    x2 = _residual_linear(x2, act, weights[f"{pre}.down"], mlp_mod, inplace=True)
    return x2.view(b, s, d)


def _residual_linear(residual, a, weight, modulation, inplace=False):
    """``residual + a @ weightᵀ`` (Pi0), or Pi0.5's gated ``residual + gate ⊙ (a @ weightᵀ)`` with
    ``modulation[2]`` the gate; ``(M, D)``. ``inplace`` (Pi0) accumulates into ``residual``: an
    out-of-place ``addmm`` first copies the residual into its output (one more kernel)."""
    if modulation is None:
        return residual.addmm_(a, weight.T) if inplace else torch.addmm(residual, a, weight.T)
    return torch.addcmul(residual, F.linear(a, weight), modulation[2].to(residual.dtype))
