"""Which weights the ``triton`` backend holds in FP8 (``TritonOptions.fp8``), quantised once at load.

The stages of :data:`~cortexflow.backends.triton_options.FP8_STAGES` map to the weight groups a model declares
(:class:`~cortexflow.ops.FusableWeights`): "decoder" -> ``decoder_layers`` (the Pi0 family's action expert, a
token VLA's language model), "prefix" -> ``encoder_layers`` (the Pi0 family's Gemma prefix). In each layer the
fused ``qkv`` and ``gate_up`` and the ``o`` and ``down`` projections become E4M3 with one fp32 scale per output
channel (:func:`cortexflow.quantization.fp8.quantize_in_place`: the separate q/k/v and gate/up names become views
into the E4M3 data). Norm scales are folded before (``fold_norm_weights``), so the folded values are what is
quantised. Embeddings, LM heads, SigLIP and the action projections stay in the compute dtype.
"""

from __future__ import annotations

from typing import Iterable

import torch

from cortexflow.errors import ConfigError
from cortexflow.ops import FusableWeights, GatedLayer
from cortexflow.quantization.fp8 import is_fp8, quantize_in_place

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
    weight are the peak); the layers' q/k/v and gate/up must have been fused (``fuse_layer_projections``)."""
    for layer in layers:
        for fused, parts in FP8_PROJECTIONS:
            name = layer.name(fused)
            if name not in weights:
                raise ConfigError(f"FP8 needs the fused projection {name!r}, which is not in the weights "
                                  "(the triton backend fuses Q/K/V and gate/up of the layers it quantises)")
            split = [(layer.name(p), weights[layer.name(p)].shape[0]) for p in parts if layer.name(p) in weights]
            quantize_in_place(weights, name, split)
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


def project(weights: dict[str, torch.Tensor], name: str, x: torch.Tensor,
            accumulate: torch.Tensor | None = None) -> torch.Tensor:
    """``x (M, K) @ weights[name]ᵀ`` in ``x.dtype``: cuBLAS on a bf16 weight; on an E4M3 weight, ``x`` quantised
    per row to E4M3 and multiplied through cuBLASLt with both scales (:func:`cortexflow.kernels.fp8_gemm.fp8_linear`).
    ``accumulate (M, N)``: add the product into it in place and return it (the residual stream)."""
    weight = weights[name]
    if not is_fp8(weight):
        if accumulate is None:
            return torch.nn.functional.linear(x, weight)
        return accumulate.addmm_(x, weight.T)
    from cortexflow.kernels.fp8_gemm import fp8_linear
    from cortexflow.quantization.fp8 import fp8_scale

    y = fp8_linear(x, weight, fp8_scale(weights, name))
    return y if accumulate is None else accumulate.add_(y)
