"""FiLM-EfficientNet: the image tokenizer of RT-1 (``docs/reference_facts.md#F-RT1-2``).

Keras EfficientNet (B3 for RT-1: width 1.2, depth 1.4) with a FiLM layer after every MBConv block and
after the 1x1 projection that follows the top convolution:
``y = (1 + W_mult c + b_mult) * x + (W_add c + b_add)``, per channel, ``c`` the instruction embedding.
Images are ``(N, 3, H, W)`` float in [0, 255] (after the 300x300 resize); the output is the feature map
``(N, E, h, w)`` (``E`` = 512, 9x9 for RT-1 at 300x300). Batch norms use running statistics
(inference). Padding follows the checkpoint: ``"keras"`` pads stride-2 convolutions by
``(k//2 - 1, k//2)`` (Keras ``correct_pad`` for a model built with unknown spatial size), ``"same"`` by
the TF/Flax SAME rule from the actual size; stride-1 convolutions pad ``k//2`` on every side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cortexflow.models.base import Weights

#: Keras EfficientNet-B0 stages: (kernel, stride, expand ratio, filters in, filters out, repeats).
B0_STAGES = (
    (3, 1, 1, 32, 16, 1),
    (3, 2, 6, 16, 24, 2),
    (5, 2, 6, 24, 40, 2),
    (3, 2, 6, 40, 80, 3),
    (5, 1, 6, 80, 112, 3),
    (5, 2, 6, 112, 192, 4),
    (3, 1, 6, 192, 320, 1),
)
SE_RATIO = 0.25
#: Keras ``backend.epsilon()``, the floor of the Normalization layer's standard deviation.
KERAS_EPSILON = 1e-7


@dataclass(frozen=True)
class MBConvBlock:
    """One inverted-residual block after width/depth scaling."""

    kernel: int
    stride: int
    expand: int
    filters_in: int
    filters_out: int

    @property
    def filters(self) -> int:
        """Channels of the depthwise convolution (``filters_in * expand``)."""
        return self.filters_in * self.expand

    @property
    def filters_se(self) -> int:
        """Squeeze-excite bottleneck: a quarter of the block's input channels (Keras rule)."""
        return max(1, int(self.filters_in * SE_RATIO))

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.filters_in == self.filters_out


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Keras EfficientNet channel scaling: ``filters * width`` rounded to a multiple of ``divisor``,
    never more than 10 % below the scaled value."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def efficientnet_blocks(width: float, depth: float, divisor: int = 8) -> list[MBConvBlock]:
    """The scaled MBConv blocks in order (26 for B3); the first block of a stage strides and widens."""
    blocks = []
    for kernel, stride, expand, f_in, f_out, repeats in B0_STAGES:
        f_in, f_out = round_filters(f_in, width, divisor), round_filters(f_out, width, divisor)
        for j in range(int(math.ceil(depth * repeats))):
            blocks.append(MBConvBlock(kernel, stride if j == 0 else 1, expand, f_in if j == 0 else f_out, f_out))
    return blocks


def conv_padding(size: tuple[int, int], kernel: int, stride: int, mode: str) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` zero padding of a convolution on a ``size = (H, W)`` map."""
    if stride == 1:
        return (kernel // 2,) * 4
    if mode == "keras":
        return (kernel // 2 - 1, kernel // 2, kernel // 2 - 1, kernel // 2)
    pads = []
    for n in size:
        total = max((-(-n // stride) - 1) * stride + kernel - n, 0)
        pads += [total // 2, total - total // 2]
    return tuple(pads)


def bn_shapes(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{name}": (channels,) for name in ("gamma", "beta", "mean", "var")}


def film_shapes(prefix: str, channels: int, context_dim: int) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for part in ("add", "mult"):
        shapes[f"{prefix}.{part}.weight"] = (channels, context_dim)
        shapes[f"{prefix}.{part}.bias"] = (channels,)
    return shapes


def efficientnet_film_shapes(prefix: str, blocks: list[MBConvBlock], stem: int, top: int, out: int,
                             context_dim: int) -> dict[str, tuple[int, ...]]:
    """Canonical weight names and torch-layout shapes of the FiLM-EfficientNet under ``prefix``."""
    shapes = {f"{prefix}.norm.mean": (3,), f"{prefix}.norm.variance": (3,), f"{prefix}.stem.conv": (stem, 3, 3, 3)}
    shapes.update(bn_shapes(f"{prefix}.stem.bn", stem))
    for i, b in enumerate(blocks):
        p = f"{prefix}.blocks.{i}"
        if b.expand != 1:
            shapes[f"{p}.expand.conv"] = (b.filters, b.filters_in, 1, 1)
            shapes.update(bn_shapes(f"{p}.expand.bn", b.filters))
        shapes[f"{p}.dw.conv"] = (b.filters, 1, b.kernel, b.kernel)
        shapes.update(bn_shapes(f"{p}.dw.bn", b.filters))
        shapes[f"{p}.se.reduce.weight"] = (b.filters_se, b.filters)
        shapes[f"{p}.se.reduce.bias"] = (b.filters_se,)
        shapes[f"{p}.se.expand.weight"] = (b.filters, b.filters_se)
        shapes[f"{p}.se.expand.bias"] = (b.filters,)
        shapes[f"{p}.project.conv"] = (b.filters_out, b.filters, 1, 1)
        shapes.update(bn_shapes(f"{p}.project.bn", b.filters_out))
        shapes.update(film_shapes(f"{p}.film", b.filters_out, context_dim))
    last = blocks[-1].filters_out
    shapes[f"{prefix}.top.conv"] = (top, last, 1, 1)
    shapes.update(bn_shapes(f"{prefix}.top.bn", top))
    shapes[f"{prefix}.conv1x1"] = (out, top, 1, 1)
    shapes.update(film_shapes(f"{prefix}.film", out, context_dim))
    return shapes


def batch_norm(ops, weights: Weights, prefix: str, x: torch.Tensor, eps: float) -> torch.Tensor:
    return ops.batch_norm(x, weights[f"{prefix}.mean"], weights[f"{prefix}.var"], weights[f"{prefix}.gamma"],
                          weights[f"{prefix}.beta"], eps)


def film(ops, weights: Weights, prefix: str, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """FiLM ``(1 + mult(c)) * x + add(c)`` of ``x (N, C, H, W)`` by ``context (N, Dc)``."""
    mult = ops.linear(context, weights[f"{prefix}.mult.weight"], weights[f"{prefix}.mult.bias"])
    add = ops.linear(context, weights[f"{prefix}.add.weight"], weights[f"{prefix}.add.bias"])
    return (1.0 + mult[:, :, None, None]) * x + add[:, :, None, None]


def conv(ops, x: torch.Tensor, weight: torch.Tensor, stride: int, padding_mode: str, groups: int = 1) -> torch.Tensor:
    pad = conv_padding((x.shape[2], x.shape[3]), weight.shape[-1], stride, padding_mode)
    return ops.conv2d(x, weight, None, stride, pad, groups)


def squeeze_excite(ops, weights: Weights, prefix: str, x: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(W2 swish(W1 mean_hw(x) + b1) + b2)`` per channel."""
    pooled = x.float().mean(dim=(2, 3)).to(x.dtype)
    hidden = ops.silu(ops.linear(pooled, weights[f"{prefix}.reduce.weight"], weights[f"{prefix}.reduce.bias"]))
    gate = ops.sigmoid(ops.linear(hidden, weights[f"{prefix}.expand.weight"], weights[f"{prefix}.expand.bias"]))
    return x * gate[:, :, None, None]


def mbconv_block(ops, weights: Weights, prefix: str, block: MBConvBlock, x: torch.Tensor, context: torch.Tensor,
                 eps: float, padding_mode: str) -> torch.Tensor:
    """One MBConv block followed by its FiLM layer."""
    h = x
    if block.expand != 1:
        h = ops.silu(batch_norm(ops, weights, f"{prefix}.expand.bn", conv(ops, h, weights[f"{prefix}.expand.conv"], 1,
                                                                           padding_mode), eps))
    h = conv(ops, h, weights[f"{prefix}.dw.conv"], block.stride, padding_mode, groups=block.filters)
    h = ops.silu(batch_norm(ops, weights, f"{prefix}.dw.bn", h, eps))
    h = squeeze_excite(ops, weights, f"{prefix}.se", h)
    h = batch_norm(ops, weights, f"{prefix}.project.bn", conv(ops, h, weights[f"{prefix}.project.conv"], 1,
                                                              padding_mode), eps)
    if block.residual:
        h = h + x
    return film(ops, weights, f"{prefix}.film", h, context)


def normalize_input(weights: Weights, prefix: str, images: torch.Tensor, rescale: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
    """The Keras stem's ``Rescaling(1/255) -> Normalization(mean, variance) -> Rescaling(rescale)``:
    ``(x / 255 - mean) / max(sqrt(variance), 1e-7) * rescale`` per channel of ``images (N, 3, H, W)``,
    computed in fp32, returned in ``dtype``."""
    mean = weights[f"{prefix}.norm.mean"].float()[None, :, None, None]
    std = torch.sqrt(weights[f"{prefix}.norm.variance"].float()).clamp_min(KERAS_EPSILON)[None, :, None, None]
    x = (images.float() / 255.0 - mean) / std * rescale[None, :, None, None]
    return x.to(dtype)


def efficientnet_film(ops, weights: Weights, prefix: str, blocks: list[MBConvBlock], images: torch.Tensor,
                      context: torch.Tensor, rescale: torch.Tensor, eps: float, padding_mode: str) -> torch.Tensor:
    """``images (N, 3, H, W)`` in [0, 255] (any float dtype), ``context (N, Dc)`` -> FiLM-conditioned map
    ``(N, E, h, w)`` in ``context.dtype``."""
    x = normalize_input(weights, prefix, images, rescale, context.dtype)
    x = ops.silu(batch_norm(ops, weights, f"{prefix}.stem.bn", conv(ops, x, weights[f"{prefix}.stem.conv"], 2,
                                                                    padding_mode), eps))
    for i, block in enumerate(blocks):
        x = mbconv_block(ops, weights, f"{prefix}.blocks.{i}", block, x, context, eps, padding_mode)
    x = ops.silu(batch_norm(ops, weights, f"{prefix}.top.bn", conv(ops, x, weights[f"{prefix}.top.conv"], 1,
                                                                   padding_mode), eps))
    x = ops.conv2d(x, weights[f"{prefix}.conv1x1"], None, 1, (0, 0, 0, 0))
    return film(ops, weights, f"{prefix}.film", x, context)
