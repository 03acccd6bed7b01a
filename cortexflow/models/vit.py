"""timm-style ViT featurizers of OpenVLA: DINOv2 ViT-L/14 with registers and LayerScale, and SigLIP So400m/14.

Both are pre-LN ViTs with a fused ``qkv`` projection and an exact (erf) GELU MLP, written against the
backend ops. OpenVLA reads the hidden state *after* block ``out_layer`` (the second-to-last block), without
the final norm and without prefix tokens, so the blocks after it are never run.

Canonical weights under ``{p}`` (``dino`` or ``siglip``): ``{p}.patch.{weight (D,3,p,p), bias}``,
``{p}.pos (N, D)`` (patch tokens only), ``{p}.blocks.{i}.{norm1,qkv,proj,norm2,fc1,fc2}.{weight,bias}``,
and for DINOv2 ``{p}.cls (D,)``, ``{p}.reg (R, D)``, ``{p}.blocks.{i}.ls1`` / ``.ls2 (D,)`` (LayerScale).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from cortexflow.ops import residual_add

if TYPE_CHECKING:
    from cortexflow.ops import ComputeBackend


@dataclass(frozen=True)
class ViTSpec:
    """One featurizer: width, heads, MLP width, blocks actually run (``out_layer + 1``), prefix tokens."""

    prefix: str
    dim: int
    num_heads: int
    mlp_dim: int
    out_layer: int
    num_registers: int = 0
    class_token: bool = False
    layer_scale: bool = False
    patch_size: int = 14
    num_patches: int = 256
    norm_eps: float = 1e-6

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.num_registers


def gelu(ops: "ComputeBackend", x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU: the backend's ``gelu`` op when it defines one, else PyTorch's."""
    op = getattr(ops, "gelu", None)
    return op(x) if op is not None else F.gelu(x)


def vit_weight_shapes(spec: ViTSpec) -> dict[str, tuple[int, ...]]:
    """Shapes of every weight the featurizer reads (blocks ``0..out_layer``)."""
    d, m, p = spec.dim, spec.mlp_dim, spec.prefix
    shapes: dict[str, tuple[int, ...]] = {
        f"{p}.patch.weight": (d, 3, spec.patch_size, spec.patch_size),
        f"{p}.patch.bias": (d,),
        f"{p}.pos": (spec.num_patches, d),
    }
    if spec.class_token:
        shapes[f"{p}.cls"] = (d,)
    if spec.num_registers:
        shapes[f"{p}.reg"] = (spec.num_registers, d)
    for i in range(spec.out_layer + 1):
        b = f"{p}.blocks.{i}"
        for name, (w, bias) in {
            "norm1": ((d,), (d,)),
            "qkv": ((3 * d, d), (3 * d,)),
            "proj": ((d, d), (d,)),
            "norm2": ((d,), (d,)),
            "fc1": ((m, d), (m,)),
            "fc2": ((d, m), (d,)),
        }.items():
            shapes[f"{b}.{name}.weight"] = w
            shapes[f"{b}.{name}.bias"] = bias
        if spec.layer_scale:
            shapes[f"{b}.ls1"] = (d,)
            shapes[f"{b}.ls2"] = (d,)
    return shapes


def vit_block(ops: "ComputeBackend", weights, spec: ViTSpec, i: int, x: torch.Tensor,
              pending: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> tuple[torch.Tensor, tuple]:
    """``x + ls1 * proj(MHA(norm1(x)))``, then ``+ ls2 * fc2(gelu(fc1(norm2(.))))`` on ``x (N, T, D)``.

    The second residual add is left to the caller: returns ``(x, (mlp_out, ls2 or None))``, which the next block
    takes as ``pending`` and adds in its first norm (``ops.add_layer_norm``: a backend may do both in one kernel,
    updating ``x`` in place); the caller adds the last one (:func:`~cortexflow.ops.residual_add`). The fused
    ``qkv`` output is split as
    (3, heads, head_dim), as timm does."""
    w = lambda name: weights[f"{spec.prefix}.blocks.{i}.{name}"]  # noqa: E731
    n, t, d = x.shape
    heads = spec.num_heads
    head_dim = d // heads
    if pending is None:
        h = ops.layer_norm(x, w("norm1.weight"), w("norm1.bias"), spec.norm_eps)
    else:
        x, h = ops.add_layer_norm(x, pending[0], w("norm1.weight"), w("norm1.bias"), spec.norm_eps, pending[1])
    qkv = ops.linear(h, w("qkv.weight"), w("qkv.bias")).view(n, t, 3, heads, head_dim)
    attn = ops.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], None, 1.0 / math.sqrt(head_dim))
    attn = ops.linear(attn, w("proj.weight"), w("proj.bias"))
    # LayerScale and the residual add in one rounding (addcmul), as the reference computes them.
    x, h = ops.add_layer_norm(x, attn, w("norm2.weight"), w("norm2.bias"), spec.norm_eps,
                              w("ls1") if spec.layer_scale else None)
    h = ops.linear(gelu(ops, ops.linear(h, w("fc1.weight"), w("fc1.bias"))), w("fc2.weight"), w("fc2.bias"))
    return x, (h, w("ls2") if spec.layer_scale else None)


def vit_features(
    ops: "ComputeBackend", weights, spec: ViTSpec, images: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Normalised ``images (N, 3, S, S)`` -> patch features after block ``out_layer`` ``(N, T, D)`` in ``dtype``.

    The position embedding is added to the patch tokens only; [CLS, registers] are prepended after it
    (timm ``no_embed_class``) and sliced off at the end."""
    p = spec.prefix
    x = ops.patch_embed(images.to(dtype), weights[f"{p}.patch.weight"], weights[f"{p}.patch.bias"])
    x = x + weights[f"{p}.pos"].to(dtype)
    n = x.shape[0]
    prefix_tokens = []
    if spec.class_token:
        prefix_tokens.append(weights[f"{p}.cls"].to(dtype).view(1, 1, -1).expand(n, 1, -1))
    if spec.num_registers:
        prefix_tokens.append(weights[f"{p}.reg"].to(dtype)[None].expand(n, -1, -1))
    if prefix_tokens:
        x = torch.cat([*prefix_tokens, x], dim=1)
    # The patch embedding may be a transposed view of the convolution's output, and the sum above keeps that
    # layout: made row-major once here (the concatenation already is), the residual stream is contiguous for
    # every op that reads it (else each norm and linear of every block copies it first).
    x = x.contiguous()
    pending = None
    for i in range(spec.out_layer + 1):
        x, pending = vit_block(ops, weights, spec, i, x, pending)
    return residual_add(x, *pending)[:, spec.num_prefix_tokens:]
