"""FP8 (E4M3, ``torch.float8_e4m3fn``) quantisation with per-row scales, and FP8 weights in a weights dict.

A quantised tensor is ``data (R, C)`` in E4M3 and ``scale (R,)`` fp32 with ``value ≈ data * scale[:, None]``:

- weights ``(out_features, in_features)`` get one scale per output channel, made once at load;
- activations ``(tokens, features)`` get one scale per token, made per call (dynamic).

The scale of a row is ``amax(|row|) / 448`` (448: the largest finite E4M3 value, docs/reference_facts.md#F-HW-3),
1 for an all-zero row;
``row / scale`` is clamped to ``[-448, 448]`` (saturation: E4M3FN has no infinity and casts beyond its range
to NaN) and rounded to the nearest E4M3 value, ties to even (PyTorch's cast). Quantising the same tensor
twice gives the same bits.

With per-output-channel weight scales the scale factors out of the dot product,
``y[m, n] = scale[n] * sum_k x[m, k] * data[n, k]``, so a kernel multiplies E4M3 values (exact in bf16)
with fp32 accumulation and applies ``scale`` once per output in its epilogue.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

from cortexflow.errors import ConfigError, InputError

E4M3 = torch.float8_e4m3fn
#: The largest finite E4M3FN value.
E4M3_MAX = 448.0


@dataclass(frozen=True)
class Fp8Tensor:
    """``data (R, C)`` E4M3 and ``scale (R,)`` fp32 with ``value ≈ data * scale[:, None]``."""

    data: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``data * scale[:, None]`` computed in fp32, returned in ``dtype``."""
        return (self.data.float() * self.scale[:, None]).to(dtype)

    def nbytes(self) -> int:
        """Bytes held: one per element plus four per row."""
        return self.data.numel() + 4 * self.scale.numel()


def quantize_rows(x: torch.Tensor, name: str = "tensor") -> Fp8Tensor:
    """E4M3 with one scale per row of ``x (R, C)`` (any float dtype; computed in fp32)."""
    if x.dim() != 2:
        raise InputError(f"{name} must be 2-D (rows, columns) to quantise per row, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise InputError(f"{name} must be a floating-point tensor to quantise, got {x.dtype}")
    xf = x.float()
    if xf.device.type != "meta" and not torch.isfinite(xf).all():  # meta: compile-check's shapes without values
        raise InputError(f"{name} holds NaN or infinite values; FP8 scales need finite values")
    amax = xf.abs().amax(dim=1)
    # A tensor divisor: PyTorch divides a CUDA tensor by a Python number as a product with its reciprocal, which
    # is not the IEEE quotient the CPU (and the row-quantisation kernel) computes (docs/reference_facts.md#F-MISC-4).
    scale = torch.where(amax > 0, amax / torch.full_like(amax, E4M3_MAX), torch.ones_like(amax))
    data = (xf / scale[:, None]).clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return Fp8Tensor(data, scale)


def quantize_weight(weight: torch.Tensor, name: str = "weight") -> Fp8Tensor:
    """A linear weight ``(out_features, in_features)`` in E4M3 with per-output-channel scales."""
    return quantize_rows(weight, name)


def quantize_activation(x: torch.Tensor) -> Fp8Tensor:
    """Activations ``(..., features)`` in E4M3 with one scale per token (leading dims flattened)."""
    return quantize_rows(x.reshape(-1, x.shape[-1]), "activation")


#: The first compute capability with FP8 tensor cores (Ada, sm_89; Hopper is 90).
FP8_MIN_CAPABILITY = 89


def fp8_unsupported_reason(device: torch.device, allow_interpreter: bool = False) -> str | None:
    """Why FP8 kernels cannot run on ``device`` (None when they can): a CPU, Triton's interpreter (unless
    ``allow_interpreter``: the kernels' tests run there), or a GPU (or compile target) of compute capability
    below 8.9."""
    from cortexflow.kernels.runtime import compile_target, compute_capability, interpreting

    device = torch.device(device)
    if interpreting() and compile_target(device) is None:
        if allow_interpreter:
            return None
        return "Triton's CPU interpreter has no FP8 tensor cores (TRITON_INTERPRET=1 is set)"
    capability = compute_capability(device)
    if capability is None:
        return f"FP8 needs a CUDA GPU, got device {str(device)!r}"
    if capability < FP8_MIN_CAPABILITY:
        return (f"FP8 needs a GPU of compute capability 8.9 or later (Ada, Hopper); {str(device)!r} has "
                f"{capability // 10}.{capability % 10}")
    return None


# ---- FP8 weights inside a model's weights dict ----------------------------------------------------------
# A quantised linear weight keeps its name: ``weights[name]`` holds the E4M3 data ``(out, in)`` and
# ``weights[fp8_scale_key(name)]`` the fp32 per-output-channel scales ``(out,)``. Code that runs a projection
# checks :func:`is_fp8` on the weight and takes the scales from :func:`fp8_scale`.

def fp8_scale_key(name: str) -> str:
    """The weights-dict key of the per-output-channel scales of the FP8 weight ``name``."""
    return f"{name}.fp8_scale"


def is_fp8(weight: torch.Tensor) -> bool:
    """Whether ``weight`` holds E4M3 data (its scales are under :func:`fp8_scale_key`)."""
    return weight.dtype == E4M3


def fp8_scale(weights: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    """The fp32 per-output-channel scales of the FP8 weight ``weights[name]``."""
    key = fp8_scale_key(name)
    if key not in weights:
        raise ConfigError(f"weight {name!r} is E4M3 but its scales {key!r} are missing; quantise weights with "
                          "quantize_in_place")
    return weights[key]


def quantize_in_place(weights: dict[str, torch.Tensor], name: str, parts: Iterable[tuple[str, int]] = ()) -> None:
    """Replace the linear weight ``weights[name] (out, in)`` by its E4M3 data and add its scales (one per
    output channel) under :func:`fp8_scale_key`; the bf16 tensor is released. ``parts``: ``(part name, rows)``
    of weights that are row ranges of ``name`` in order (the separate Q/K/V of a fused QKV): each becomes a
    view into the E4M3 data, with its scales a view into the fused scales. A weight that is E4M3 already is
    left as it is (quantising twice changes nothing)."""
    weight = weights[name]
    if is_fp8(weight):
        return
    q = quantize_weight(weight, name)
    weights[name] = q.data
    weights[fp8_scale_key(name)] = q.scale
    start = 0
    for part, rows in parts:
        weights[part] = q.data[start:start + rows]
        weights[fp8_scale_key(part)] = q.scale[start:start + rows]
        start += rows
    if start not in (0, weight.shape[0]):
        raise ConfigError(f"the parts of {name!r} cover {start} of its {weight.shape[0]} rows")
