"""Which weights the ``triton`` backend holds in FP8 (``TritonOptions.fp8``), quantised once at load.

The stages of :data:`~cortexflow.backends.triton_options.FP8_STAGES` map to the weight groups a model declares
(:class:`~cortexflow.ops.FusableWeights`): "decoder" -> ``decoder_layers`` (the Pi0 family's action expert, a
token VLA's language model), "prefix" -> ``encoder_layers`` (the Pi0 family's Gemma prefix). In each layer the
fused ``qkv`` and ``gate_up`` and the ``o`` and ``down`` projections become E4M3 with one fp32 scale per output
channel (:func:`cortexflow.quantization.fp8.quantize_in_place`: the separate q/k/v and gate/up names become views
into the E4M3 data). Norm scales are folded before (``fold_norm_weights``), so the folded values are what is
quantised. Embeddings, LM heads, SigLIP and the action projections stay in the compute dtype.

:func:`project` / :func:`project_add` are the projections of the fused units' multi-row paths (the prefix, a token
VLA's prefill) over either kind of weight.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from cortexflow.errors import ConfigError
from cortexflow.kernels.fp8_gemm import fp8_linear
from cortexflow.ops import FusableWeights, GatedLayer
from cortexflow.quantization.fp8 import fp8_scale, is_fp8, quantize_in_place

#: The projections of a gated layer made FP8, with the separate weights each fused one concatenates.
FP8_PROJECTIONS = (("qkv", ("q", "k", "v")), ("o", ()), ("gate_up", ("gate", "up")), ("down", ()))


def fp8_layers(groups: FusableWeights, stages: Iterable[str]) -> list[GatedLayer]:
    """The gated layers whose projections ``stages`` quantise."""
    stages = set(stages)
    layers = []
    if "prefix" in stages:
        layers += groups.encoder_layers
    if "decoder" in stages:
        layers += groups.decoder_layers
    return layers


def quantize_layers(weights: dict[str, torch.Tensor], layers: Iterable[GatedLayer]) -> dict[str, torch.Tensor]:
    """Make every projection of ``layers`` FP8, in place, one weight at a time (the fp32 temporaries of one
    weight are the peak); the layers' q/k/v and gate/up must have been fused (``fuse_layer_projections``). A
    projection whose weights are all absent (a model's ``unread_weights``) is left out."""
    for layer in layers:
        for fused, parts in FP8_PROJECTIONS:
            name = layer.name(fused)
            if not any(n in weights for n in (name, *(layer.name(p) for p in parts))):
                continue
            if name not in weights:
                raise ConfigError(f"FP8 needs the fused projection {name!r}, which is not in the weights "
                                  "(the triton backend fuses Q/K/V and gate/up of the layers it quantises)")
            split = [(layer.name(p), weights[layer.name(p)].shape[0]) for p in parts if layer.name(p) in weights]
            quantize_in_place(weights, name, split)
    return weights


def on_device(tensor: torch.Tensor, device: torch.device) -> bool:
    """Whether ``tensor`` is on ``device`` (a device without an index matches any of its type's)."""
    return tensor.device.type == device.type and (device.index is None or tensor.device.index == device.index)


def stream_layers_to_device(weights: dict[str, torch.Tensor], layers: Iterable[GatedLayer], device: torch.device,
                            prepare_layer: Callable[[GatedLayer], None]) -> dict[str, torch.Tensor]:
    """Move ``weights`` onto ``device`` in place, one layer at a time: a layer's tensors (the names under its
    prefix), then ``prepare_layer(layer)`` (which fuses and quantises it) before the next layer's move; then every
    other tensor. Weights loaded on the host thus reach the device with at most one layer in the load dtype
    beside the layers already in E4M3, where moving them all first holds every layer in the load dtype."""
    for layer in layers:
        under = layer.prefix + "."
        for name in [n for n in weights if n.startswith(under)]:
            weights[name] = weights[name].to(device)
        prepare_layer(layer)
    for name, tensor in weights.items():
        if not on_device(tensor, device):
            weights[name] = tensor.to(device)
    return weights


def fp8_weight_bytes(weights: dict[str, torch.Tensor]) -> int:
    """Bytes held by E4M3 weights (the fused tensors; their part views are not counted twice)."""
    seen, total = set(), 0
    for tensor in weights.values():
        if is_fp8(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def weight_scale(weights, name: str) -> torch.Tensor | None:
    """The per-output-channel scales of ``weights[name]`` when it is E4M3, else None."""
    return fp8_scale(weights, name) if is_fp8(weights[name]) else None


def project(weights, name: str, x: torch.Tensor) -> torch.Tensor:
    """``x @ weights[name].T`` for ``x (..., K)``: cuBLAS in ``x``'s dtype, or :func:`fp8_linear` (E4M3 rows of
    ``x`` times the E4M3 weight) when the weight is E4M3."""
    w = weights[name]
    if is_fp8(w):
        return fp8_linear(x, w, fp8_scale(weights, name))
    return F.linear(x, w)


def project_add(weights, name: str, x2: torch.Tensor, residual: torch.Tensor, in_place: bool) -> torch.Tensor:
    """``residual + x2 @ weights[name].T`` for 2-D ``x2`` and ``residual``. bf16 weights: ``addmm`` (cuBLAS
    reads the residual as its C operand), into ``residual`` itself with ``in_place`` (an out-of-place ``addmm``
    first copies the residual); E4M3 weights: :func:`fp8_linear` with the residual added to its rounded
    output, always a new tensor."""
    w = weights[name]
    if is_fp8(w):
        return fp8_linear(x2, w, fp8_scale(weights, name), residual=residual)
    return residual.addmm_(x2, w.T) if in_place else torch.addmm(residual, x2, w.T)
