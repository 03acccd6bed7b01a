"""Gemma decoder-layer pieces written against backend ops (shared by the prefix LLM and the action expert).

A layer with canonical prefix ``{p}`` (``llm.layers.3`` or ``expert.layers.3``) has linears
``{p}.q (H*Dh, D)``, ``{p}.k``/``{p}.v`` ``(Hkv*Dh, D)``, ``{p}.o (D, H*Dh)``, ``{p}.gate``/``{p}.up``
``(M, D)``, ``{p}.down (D, M)``, none with bias, and either plain RMSNorm scales ``{p}.attn_norm`` /
``{p}.mlp_norm`` ``(D,)`` or, for Pi0.5's expert, modulation layers ``{p}.attn_norm_mod`` /
``{p}.mlp_norm_mod`` ``(3D, Dcond)`` with bias producing (scale, shift, gate).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from cortexflow.config import ModelConfig

if TYPE_CHECKING:
    from cortexflow.backends.base import ComputeBackend


def gated_decoder_linear_shapes(prefix: str, width: int, mlp_dim: int, q_dim: int, kv_dim: int) -> dict[str, tuple[int, ...]]:
    """``(out, in)`` shapes of the seven projections of a gated-MLP decoder layer (Gemma, Llama):
    ``q, k, v, o`` and ``gate, up, down``, named ``{prefix}.{name}``."""
    return {
        f"{prefix}.q": (q_dim, width),
        f"{prefix}.k": (kv_dim, width),
        f"{prefix}.v": (kv_dim, width),
        f"{prefix}.o": (width, q_dim),
        f"{prefix}.gate": (mlp_dim, width),
        f"{prefix}.up": (mlp_dim, width),
        f"{prefix}.down": (width, mlp_dim),
    }


def gemma_layer_shapes(
    prefix: str, width: int, mlp_dim: int, config: ModelConfig, adaptive_norms: bool
) -> dict[str, tuple[int, ...]]:
    """Weight shapes of one Gemma layer named ``prefix``."""
    shapes = gated_decoder_linear_shapes(prefix, width, mlp_dim, config.num_heads * config.head_dim,
                                         config.num_kv_heads * config.head_dim)
    for norm in ("attn_norm", "mlp_norm"):
        if adaptive_norms:
            shapes[f"{prefix}.{norm}_mod.weight"] = (3 * width, width)
            shapes[f"{prefix}.{norm}_mod.bias"] = (3 * width,)
        else:
            shapes[f"{prefix}.{norm}"] = (width,)
    return shapes


def attention_scale(config: ModelConfig) -> float:
    """Gemma's query scaling ``head_dim ** -0.5`` (1/16 for head_dim 256)."""
    return 1.0 / math.sqrt(config.head_dim)


def project_qkv(
    ops: "ComputeBackend", weights, prefix: str, h: torch.Tensor, positions: torch.Tensor, config: ModelConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalised hidden ``h (B, L, D)`` -> RoPE'd ``q (B, L, H, Dh)``, RoPE'd ``k`` and ``v (B, L, Hkv, Dh)``."""
    b, length, _ = h.shape
    q = ops.linear(h, weights[f"{prefix}.q"]).view(b, length, config.num_heads, config.head_dim)
    k = ops.linear(h, weights[f"{prefix}.k"]).view(b, length, config.num_kv_heads, config.head_dim)
    v = ops.linear(h, weights[f"{prefix}.v"]).view(b, length, config.num_kv_heads, config.head_dim)
    return ops.rope(q, positions, config.rope_base), ops.rope(k, positions, config.rope_base), v


def gated_mlp(ops: "ComputeBackend", weights, prefix: str, h: torch.Tensor) -> torch.Tensor:
    """``down(gelu_tanh(gate(h)) * up(h))`` on ``h (B, L, D)``."""
    gate = ops.linear(h, weights[f"{prefix}.gate"])
    up = ops.linear(h, weights[f"{prefix}.up"])
    return ops.linear(ops.gelu_tanh_gate(gate, up), weights[f"{prefix}.down"])


def gemma_layer(
    ops: "ComputeBackend",
    weights,
    prefix: str,
    x: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor,
    config: ModelConfig,
    past_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """One plain-RMSNorm Gemma layer over ``x (B, L, D)``.

    Keys/values are ``past_kv`` (cached, ``(B, Lp, Hkv, Dh)``) followed by this layer's own;
    ``mask (B, L, Lp + L)``. Returns the new hidden states and this layer's own (k, v)."""
    h = ops.rms_norm(x, weights[f"{prefix}.attn_norm"], config.rms_norm_eps)
    q, k, v = project_qkv(ops, weights, prefix, h, positions, config)
    keys, values = (k, v) if past_kv is None else (torch.cat([past_kv[0], k], 1), torch.cat([past_kv[1], v], 1))
    attn = ops.attention(q, keys, values, mask, attention_scale(config))
    x = x + ops.linear(attn, weights[f"{prefix}.o"])
    h = ops.rms_norm(x, weights[f"{prefix}.mlp_norm"], config.rms_norm_eps)
    return x + gated_mlp(ops, weights, prefix, h), (k, v)


def adaptive_gemma_layer(
    ops: "ComputeBackend",
    weights,
    prefix: str,
    x: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor,
    config: ModelConfig,
    past_kv: tuple[torch.Tensor, torch.Tensor],
    cond: torch.Tensor,
) -> torch.Tensor:
    """Pi0.5 expert layer: adaptive RMSNorm from ``cond (B, Dc)`` and gated residuals.

    ``mod = Dense(cond)`` split into (scale, shift, gate); ``h = rmsnorm(x) * (1+scale) + shift``;
    ``x = x + sublayer(h) * gate``, for both the attention and the MLP."""
    scale, shift, gate = modulation(ops, weights, f"{prefix}.attn_norm_mod", cond)
    h = ops.ada_rms_norm(x, scale, shift, config.rms_norm_eps)
    q, k, v = project_qkv(ops, weights, prefix, h, positions, config)
    keys, values = torch.cat([past_kv[0], k], 1), torch.cat([past_kv[1], v], 1)
    attn = ops.attention(q, keys, values, mask, attention_scale(config))
    x = x + ops.linear(attn, weights[f"{prefix}.o"]) * gate.to(x.dtype)[:, None, :]
    scale, shift, gate = modulation(ops, weights, f"{prefix}.mlp_norm_mod", cond)
    h = ops.ada_rms_norm(x, scale, shift, config.rms_norm_eps)
    return x + gated_mlp(ops, weights, prefix, h) * gate.to(x.dtype)[:, None, :]


def modulation(
    ops: "ComputeBackend", weights, name: str, cond: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``Dense(cond)`` in fp32, split in order (scale, shift, gate), each ``(B, D)``."""
    mod = ops.linear(cond.float(), weights[f"{name}.weight"], weights[f"{name}.bias"])
    return mod.chunk(3, dim=-1)
