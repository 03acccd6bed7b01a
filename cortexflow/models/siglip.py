"""SigLIP vision tower (pre-LN ViT, no CLS token, no pooling head), written against backend ops.

Weights use canonical names under ``vision.``: ``patch.{weight (D,3,p,p), bias}``, ``pos (N, D)``,
``layers.{i}.{ln1,q,k,v,o,ln2,fc1,fc2}.{weight,bias}``, ``post_ln.{weight,bias}``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from cortexflow.config import ModelConfig
from cortexflow.ops import EncoderStack, encoder_layer

if TYPE_CHECKING:
    from cortexflow.ops import ComputeBackend


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


def siglip_stack(config: ModelConfig) -> EncoderStack:
    """The tower's encoder layers and post-LN, by weight name."""
    return EncoderStack("vision", config.num_vision_layers, config.num_vision_heads, config.vision_norm_eps,
                        "vision.post_ln")


def siglip_layer(ops: "ComputeBackend", weights, i: int, x: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """One pre-LN encoder block: ``x + MHA(LN1(x))``, then ``+ fc2(gelu_tanh(fc1(LN2(.))))``; ``x (N, T, D)``."""
    return encoder_layer(ops, weights, siglip_stack(config), i, x)


def siglip_tower(
    ops: "ComputeBackend", weights, images: torch.Tensor, config: ModelConfig, dtype: torch.dtype
) -> torch.Tensor:
    """The whole tower: ``images (N, 3, S, S)`` in [-1, 1] -> post-LN tokens ``(N, T, D)`` in ``dtype``."""
    x = siglip_embed(ops, weights, images).to(dtype)
    return ops.pre_ln_encoder(weights, siglip_stack(config), x)
