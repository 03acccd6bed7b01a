"""Gemma decoder-layer pieces written against backend ops (shared by the prefix LLM and the action expert).

A layer with canonical prefix ``{p}`` (``llm.layers.3`` or ``expert.layers.3``) has linears
``{p}.q (H*Dh, D)``, ``{p}.k``/``{p}.v`` ``(Hkv*Dh, D)``, ``{p}.o (D, H*Dh)``, ``{p}.gate``/``{p}.up``
``(M, D)``, ``{p}.down (D, M)``, none with bias, and either plain RMSNorm scales ``{p}.attn_norm`` /
``{p}.mlp_norm`` ``(D,)`` or, for Pi0.5's expert, modulation layers ``{p}.attn_norm_mod`` /
``{p}.mlp_norm_mod`` ``(3D, Dcond)`` with bias producing (scale, shift, gate).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from cortexflow.config import ModelConfig
from cortexflow.ops import DecoderDims, GatedLayer, gated_layer
from cortexflow.ops import project_qkv as ops_project_qkv

if TYPE_CHECKING:
    from cortexflow.ops import ComputeBackend


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


def gemma_dims(config: ModelConfig, num_layers: int) -> DecoderDims:
    """The attention geometry of a stack of ``num_layers`` Gemma layers of ``config`` (prefix LLM or expert)."""
    return DecoderDims(num_layers, config.num_heads, config.num_kv_heads, config.head_dim, config.rope_base,
                       config.rms_norm_eps)


def gemma_layers(prefix: str, dims: DecoderDims, adaptive_norms: bool = False) -> tuple[GatedLayer, ...]:
    """The layers ``{prefix}.{i}`` of a Gemma stack: tanh-GELU gated MLP, plain RMSNorm scales
    ``attn_norm`` / ``mlp_norm`` or (``adaptive_norms``) norms modulated per call."""
    return tuple(
        GatedLayer(f"{prefix}.{i}", i, dims, "gelu_tanh",
                   None if adaptive_norms else f"{prefix}.{i}.attn_norm",
                   None if adaptive_norms else f"{prefix}.{i}.mlp_norm")
        for i in range(dims.num_layers))


def gemma_layer_spec(prefix: str, config: ModelConfig, adaptive_norms: bool = False) -> GatedLayer:
    """The Gemma layer named ``prefix`` (``llm.layers.3``) of ``config`` as a :class:`GatedLayer`."""
    return GatedLayer(prefix, int(prefix.rsplit(".", 1)[1]), gemma_dims(config, 1), "gelu_tanh",
                      None if adaptive_norms else f"{prefix}.attn_norm", None if adaptive_norms else f"{prefix}.mlp_norm")


def project_qkv(
    ops: "ComputeBackend", weights, prefix: str, h: torch.Tensor, positions: torch.Tensor, config: ModelConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalised hidden ``h (B, L, D)`` -> RoPE'd ``q (B, L, H, Dh)``, RoPE'd ``k`` and ``v (B, L, Hkv, Dh)``."""
    return ops_project_qkv(ops, weights, gemma_layer_spec(prefix, config), h, positions)


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
    own = []

    def after_past(k, v):
        own.append((k, v))
        return (k, v) if past_kv is None else (torch.cat([past_kv[0], k], 1), torch.cat([past_kv[1], v], 1))

    x = gated_layer(ops, weights, gemma_layer_spec(prefix, config), x, positions, mask, after_past)
    return x, own[0]


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
    names = (f"{prefix}.attn_norm_mod", f"{prefix}.mlp_norm_mod")

    def after_past(k, v):
        return torch.cat([past_kv[0], k], 1), torch.cat([past_kv[1], v], 1)

    return gated_layer(ops, weights, gemma_layer_spec(prefix, config, adaptive_norms=True), x, positions, mask,
                       after_past, lambda j: modulation(ops, weights, names[j], cond))


def modulation(
    ops: "ComputeBackend", weights, name: str, cond: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``Dense(cond)`` in fp32, split in order (scale, shift, gate), each ``(B, D)``."""
    mod = ops.linear(cond.float(), weights[f"{name}.weight"], weights[f"{name}.bias"])
    return mod.chunk(3, dim=-1)
