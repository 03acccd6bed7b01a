"""SigLIP vision tower (pre-LN ViT, no CLS token, no pooling head), written against backend ops.

Weights use canonical names under ``vision.``: ``patch.{weight (D,3,p,p), bias}``, ``pos (N, D)``,
``layers.{i}.{ln1,q,k,v,o,ln2,fc1,fc2}.{weight,bias}``, ``post_ln.{weight,bias}``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from cortexflow.config import ModelConfig

if TYPE_CHECKING:
    from cortexflow.backends.base import ComputeBackend


def siglip_weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of every SigLIP tower weight for ``config``."""
    d, m, p = config.vision_encoder_dim, config.vision_mlp_dim, config.patch_size
    shapes: dict[str, tuple[int, ...]] = {
        "vision.patch.weight": (d, 3, p, p),
        "vision.patch.bias": (d,),
        "vision.pos": (config.num_patches, d),
        "vision.post_ln.weight": (d,),
        "vision.post_ln.bias": (d,),
    }
    per_layer = {
        "ln1": ((d,), (d,)),
        "q": ((d, d), (d,)),
        "k": ((d, d), (d,)),
        "v": ((d, d), (d,)),
        "o": ((d, d), (d,)),
        "ln2": ((d,), (d,)),
        "fc1": ((m, d), (m,)),
        "fc2": ((d, m), (d,)),
    }
    for i in range(config.num_vision_layers):
        for name, (w, b) in per_layer.items():
            shapes[f"vision.layers.{i}.{name}.weight"] = w
            shapes[f"vision.layers.{i}.{name}.bias"] = b
    return shapes


def siglip_embed(ops: "ComputeBackend", weights, images: torch.Tensor) -> torch.Tensor:
    """Patch embedding + learned position embedding in fp32: ``images (N, 3, S, S)`` -> ``(N, T, D)`` fp32."""
    patches = ops.patch_embed(images.float(), weights["vision.patch.weight"], weights["vision.patch.bias"])
    return patches + weights["vision.pos"].float()


def siglip_layer(ops: "ComputeBackend", weights, i: int, x: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """One pre-LN encoder block: ``x + MHA(LN1(x))``, then ``+ fc2(gelu_tanh(fc1(LN2(.))))``; ``x (N, T, D)``."""
    w = lambda name: weights[f"vision.layers.{i}.{name}"]  # noqa: E731
    n, t, d = x.shape
    heads = config.num_vision_heads
    head_dim = d // heads
    eps = config.vision_norm_eps
    h = ops.layer_norm(x, w("ln1.weight"), w("ln1.bias"), eps)
    q = ops.linear(h, w("q.weight"), w("q.bias")).view(n, t, heads, head_dim)
    k = ops.linear(h, w("k.weight"), w("k.bias")).view(n, t, heads, head_dim)
    v = ops.linear(h, w("v.weight"), w("v.bias")).view(n, t, heads, head_dim)
    attn = ops.attention(q, k, v, None, 1.0 / math.sqrt(head_dim))
    x = x + ops.linear(attn, w("o.weight"), w("o.bias"))
    h = ops.layer_norm(x, w("ln2.weight"), w("ln2.bias"), eps)
    h = ops.gelu_tanh(ops.linear(h, w("fc1.weight"), w("fc1.bias")))
    return x + ops.linear(h, w("fc2.weight"), w("fc2.bias"))


def siglip_tower(
    ops: "ComputeBackend", weights, images: torch.Tensor, config: ModelConfig, dtype: torch.dtype
) -> torch.Tensor:
    """The whole tower: ``images (N, 3, S, S)`` in [-1, 1] -> post-LN tokens ``(N, T, D)`` in ``dtype``."""
    x = siglip_embed(ops, weights, images).to(dtype)
    for i in range(config.num_vision_layers):
        x = siglip_layer(ops, weights, i, x, config)
    return ops.layer_norm(x, weights["vision.post_ln.weight"], weights["vision.post_ln.bias"], config.vision_norm_eps)
