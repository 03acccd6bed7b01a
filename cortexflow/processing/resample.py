"""Resampling of uint8 images with Pillow's pixels: on the host by Pillow itself, on any torch device by the
same fixed-point arithmetic.

The references resize uint8 images with Pillow: openpi with ``BILINEAR`` (resize-with-pad), OpenVLA's
processor with ``BICUBIC`` (a = -0.5). For a uint8 image Pillow resamples separably with integer arithmetic,
and :func:`resize_uint8_torch` repeats it operation for operation, so both paths give the same pixels:

- per axis, from ``in_size`` to ``out_size``: ``scale = in_size / out_size``, ``filterscale = max(scale, 1)``
  (a downscale widens the filter: antialiasing), ``support = filter_support * filterscale`` (bilinear 1,
  bicubic 2); output ``i`` has centre ``c = (i + 0.5) * scale`` and taps ``j`` in
  ``[max(int(c - support + 0.5), 0), min(int(c + support + 0.5), in_size))`` weighted
  ``filter((j - c + 0.5) * (1 / filterscale))``, divided by their sum, all in float64;
- each weight becomes an integer ``int(w * 2**22 ± 0.5)`` (rounded half away from zero);
- each pass writes ``clamp((2**21 + sum(pixel * weight)) >> 22, 0, 255)`` (int32 sums), so the first pass
  is rounded back to uint8 before the second; an axis whose size does not change is not resampled;
- the width is resampled first, except that Pillow 13 starts with the height when the height shrinks, the
  width changes, and the height loses more than twice as many rows as the width loses columns
  (``in_h - out_h > 2 * (in_w - out_w)``: shrinking an image more than twice as tall as wide, or shrinking
  the height while widening). The order changes the rounding of the first pass, so for those sizes
  Pillow 13 and earlier releases give different pixels; :func:`resize_uint8_torch` follows the installed
  Pillow.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from cortexflow.errors import BackendUnavailableError

PRECISION_BITS = 22
FILTERS = ("bilinear", "bicubic")
_SUPPORT = {"bilinear": 1.0, "bicubic": 2.0}


def resize_uint8_pil(image: np.ndarray, height: int, width: int, filter: str) -> np.ndarray:
    """Resize a uint8 HWC RGB image to ``height x width`` (aspect not kept) with Pillow's ``filter``
    (``"bilinear"`` or ``"bicubic"``); uint8 HWC out. A same-size image comes back as a copy."""
    pil = _pil_image_module()
    resample = {"bilinear": pil.Resampling.BILINEAR, "bicubic": pil.Resampling.BICUBIC}[_check_filter(filter)]
    resized = pil.fromarray(np.ascontiguousarray(image)).resize((width, height), resample=resample)
    return np.array(resized)


def resize_uint8_torch(image: torch.Tensor, height: int, width: int, filter: str) -> torch.Tensor:
    """Pillow's resampling of a uint8 ``(C, H, W)`` tensor to ``(C, height, width)`` on the tensor's device,
    bit for bit (the module docstring gives the arithmetic); int32 out with values in [0, 255]."""
    _check_filter(filter)
    if image.dtype != torch.uint8 or image.ndim != 3:
        raise ValueError(f"expected a uint8 (C, H, W) tensor, got {image.dtype} {tuple(image.shape)}")
    out = image.to(torch.int32)
    if pillow_resamples_height_first(image.shape[1], image.shape[2], height, width):
        out = _resample_last_axis(out.transpose(1, 2), height, filter).transpose(1, 2)
        return _resample_last_axis(out, width, filter)
    if width != image.shape[2]:
        out = _resample_last_axis(out, width, filter)
    if height != image.shape[1]:
        out = _resample_last_axis(out.transpose(1, 2), height, filter).transpose(1, 2)
    return out


def pillow_resamples_height_first(in_height: int, in_width: int, out_height: int, out_width: int) -> bool:
    """Whether the installed Pillow resamples the height before the width for this resize (see the module
    docstring: Pillow 13's rule; earlier releases always start with the width)."""
    if out_height >= in_height or in_width == out_width or _pillow_major_version() < 13:
        return False
    return in_height - out_height > 2 * (in_width - out_width)


@functools.lru_cache(maxsize=1)
def _pillow_major_version() -> int:
    return int(_pil_image_module().__version__.split(".")[0])


def _resample_last_axis(image: torch.Tensor, out_size: int, filter: str) -> torch.Tensor:
    """One pass of Pillow's fixed-point resampling along the last axis of an int32 tensor of uint8 values."""
    taps, weights = _device_coefficients(image.shape[-1], out_size, filter, image.device)
    acc = (image[..., taps] * weights).sum(dim=-1, dtype=torch.int32)
    return acc.add_(1 << (PRECISION_BITS - 1)).bitwise_right_shift_(PRECISION_BITS).clamp_(0, 255)


@functools.lru_cache(maxsize=64)
def _device_coefficients(in_size: int, out_size: int, filter: str, device: torch.device):
    """:func:`fixed_point_coefficients` as tensors on ``device`` (cached: a call uploads nothing)."""
    taps, weights = fixed_point_coefficients(in_size, out_size, filter)
    return torch.tensor(taps, device=device), torch.tensor(weights, device=device)


@functools.lru_cache(maxsize=64)
def fixed_point_coefficients(in_size: int, out_size: int, filter: str) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's integer weights for resampling an axis of ``in_size`` to ``out_size`` with ``filter``.

    Returns ``taps`` int64 ``(out_size, K)`` (input indices) and ``weights`` int32 ``(out_size, K)`` (the
    weights scaled by 2**22), ``K = 2 * ceil(support) + 1``; unused taps point at index 0 with weight 0."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = _SUPPORT[filter] * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    centre = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    first = np.maximum(np.trunc(centre - support + 0.5).astype(np.int64), 0)
    count = np.minimum(np.trunc(centre + support + 0.5).astype(np.int64), in_size) - first
    offsets = np.arange(ksize, dtype=np.int64)
    used = offsets[None, :] < count[:, None]
    position = ((offsets[None, :] + first[:, None]) - centre[:, None] + 0.5) * (1.0 / filterscale)
    weights = np.where(used, _FILTER_FUNCTIONS[filter](position), 0.0)
    total = np.zeros(out_size)
    for k in range(ksize):  # summed tap by tap, in order, as Pillow sums them
        total += weights[:, k]
    weights = np.divide(weights, total[:, None], out=weights, where=total[:, None] != 0.0)
    scaled = weights * float(1 << PRECISION_BITS)
    fixed = np.trunc(np.where(scaled < 0, scaled - 0.5, scaled + 0.5)).astype(np.int32)
    taps = np.where(used, offsets[None, :] + first[:, None], 0)
    taps.setflags(write=False)
    fixed.setflags(write=False)
    return taps, fixed


def _bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _bicubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


_FILTER_FUNCTIONS = {"bilinear": _bilinear, "bicubic": _bicubic}


def _check_filter(filter: str) -> str:
    if filter not in FILTERS:
        raise ValueError(f"filter must be one of {FILTERS}, got {filter!r}")
    return filter


def _pil_image_module():
    """``PIL.Image``, or an error saying how to install Pillow."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise BackendUnavailableError(
            "resizing camera images needs Pillow (the references resize with it), which is not installed: "
            "pip install pillow"
        ) from exc
    return Image
