"""Camera image pre-processing for Pi0 / Pi0.5: validation, resize-with-pad and scaling to [-1, 1].

Images arrive as HWC RGB, either ``uint8`` in [0, 255] or floating point in [-1, 1]; the model consumes
float32 NCHW in [-1, 1] at 224x224 (openpi ``ResizeImages`` followed by ``x / 255 * 2 - 1``).

``uint8`` views get openpi's pixels exactly: resized with Pillow's bilinear filter, on the host by Pillow
itself and on a GPU by the same fixed-point arithmetic (:mod:`cortexflow.processing.resample`). openpi cannot
resize float views (its ``ResizeImages`` goes through ``PIL.Image.fromarray``, which refuses float RGB); its
model resizes a non-224 float view with ``jax.image.resize`` (linear, antialiased), whose weights are Pillow's
bilinear weights in floating point, and clips to [-1, 1]: float views are resized that way here, in float32.
LeRobot resizes differently (bilinear without antialiasing on [0, 1] floats); these functions follow openpi.
"""

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cortexflow.errors import InputError
from cortexflow.processing.resample import resize_uint8_pil, resize_uint8_torch

FLOAT_RANGE_TOLERANCE = 1e-3
_FLOAT_DTYPES = (np.float16, np.float32, np.float64)


def resize_with_pad(image: np.ndarray, height: int = 224, width: int = 224) -> np.ndarray:
    """Resize an HWC image to fit ``height`` x ``width`` keeping its aspect ratio, then pad to that size.

    openpi semantics: ``ratio = max(w / width, h / height)``, the image is resized to
    ``(int(h / ratio), int(w / ratio))`` (at least 1 x 1, where openpi's Pillow call would fail) and pasted at
    offset ``int((target - new) / 2)`` on a black background: 0 for ``uint8`` images, -1.0 for float images
    in [-1, 1]. ``uint8`` images are resized by Pillow (bilinear, antialiased when shrinking), giving
    openpi's pixels; float images by the same filter in float32, clipped to [-1, 1]. An image already of
    the target size is returned unchanged.
    """
    cur_height, cur_width = image.shape[:2]
    if (cur_height, cur_width) == (height, width):
        return image
    new_height, new_width = _fitted_size(cur_height, cur_width, height, width)
    if image.dtype == np.uint8:
        resized = resize_uint8_pil(image, new_height, new_width, "bilinear")
    else:
        chw = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)
        resized = _resize_float_bilinear(chw, new_height, new_width).permute(1, 2, 0).numpy()

    background = 0 if image.dtype == np.uint8 else -1.0
    out = np.full((height, width, image.shape[2]), background, dtype=resized.dtype)
    top = int((height - new_height) / 2)
    left = int((width - new_width) / 2)
    out[top : top + new_height, left : left + new_width] = resized
    return out


def _fitted_size(cur_height: int, cur_width: int, height: int, width: int) -> tuple[int, int]:
    """The size openpi resizes a ``cur_height x cur_width`` image to before padding it to ``height x width``."""
    ratio = max(cur_width / width, cur_height / height)
    return max(1, int(cur_height / ratio)), max(1, int(cur_width / ratio))


def _resize_float_bilinear(chw: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Antialiased bilinear resize of a float32 ``(C, H, W)`` tensor in [-1, 1] on its device (Pillow's
    bilinear weights, as ``jax.image.resize`` linear), clipped to [-1, 1]; ``(C, height, width)`` out."""
    resized = F.interpolate(chw[None], size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return resized[0].clamp_(-1.0, 1.0)


def prepare_images(images, num_views: int, image_size: int = 224, out: np.ndarray | None = None) -> torch.Tensor:
    """Validate camera images and turn them into a float32 ``(num_views, 3, image_size, image_size)`` tensor.

    ``images`` is a ``(V, H, W, 3)`` numpy array or torch tensor, a list/tuple of V HWC arrays or tensors
    (views may differ in size), or a single HWC image when ``num_views == 1``. ``uint8`` views are
    resized-with-pad as ``uint8`` and then mapped to ``x / 255 * 2 - 1``; float views must already lie in
    [-1, 1] and are resized-with-pad in float32. The result is NCHW in [-1, 1] on the CPU.

    ``out``: a C-contiguous float32 array of that shape to write into (the engine passes its pinned staging
    buffer), so that a call allocates no image-sized arrays: fresh multi-megabyte arrays come from ``mmap``
    and fault in page by page, which cost ~0.5 ms a view on the benchmark host. The values are the same
    either way (the same float32 operations, in place). The tensor returned then shares ``out``'s memory.
    """
    views = _split_views(images, num_views)
    shape = (num_views, 3, image_size, image_size)
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 array of shape {shape}, got {out.dtype} {out.shape}")
    for index, view in enumerate(views):
        _prepare_view(view, index, image_size, out[index])
    # numpy, one thread: torch's CPU ops on a busy robot host can stall in its thread pool (benchmarks/NOTES.md, v9)
    return torch.from_numpy(out)


def prepare_images_on_device(images, num_views: int, out: torch.Tensor) -> torch.Tensor:
    """:func:`prepare_images` computed on ``out``'s device (a GPU) into ``out (num_views, 3, S, S)`` float32.

    Each view is validated on the host as there, copied over as it comes (uint8: a quarter of the float32
    result, and no host-side resize), then resized-with-pad and scaled on the device. uint8 views give exactly
    :func:`prepare_images`'s values: they are resized with Pillow's integer arithmetic
    (:func:`~cortexflow.processing.resample.resize_uint8_torch`) and scaled by the same float32 operations (a
    true division). Resized float views agree with the host's to float32 rounding (another summation order)."""
    views = _split_views(images, num_views)
    if tuple(out.shape[:2]) != (num_views, 3) or out.shape[2] != out.shape[3] or out.dtype != torch.float32:
        raise ValueError(f"out must be a float32 ({num_views}, 3, S, S) tensor, got {out.dtype} {tuple(out.shape)}")
    hosts = []
    for index, view in enumerate(views):
        image = _to_numpy(view, index)
        _check_shape(image, index)
        if image.dtype != np.uint8:
            _check_float_range(image, index)
            image = np.clip(image.astype(np.float32), -1.0, 1.0)
        hosts.append(np.ascontiguousarray(image))
    uint8 = [image.dtype == np.uint8 for image in hosts]
    for index, image in enumerate(hosts):
        _resize_with_pad_into(torch.from_numpy(image).to(out.device), out[index])
    divisor = torch.full((), 255.0, device=out.device)  # a tensor, not a Python scalar: a true division
    for scaled in [out] if all(uint8) else [out[index] for index in range(num_views) if uint8[index]]:
        scaled.div_(divisor).mul_(2.0).sub_(1.0)
    return out


def _resize_with_pad_into(image: torch.Tensor, out: torch.Tensor) -> None:
    """:func:`resize_with_pad` of an HWC ``image`` (uint8, or float32 in [-1, 1]) on its device, written into
    ``out (3, S, S)`` float32 as CHW in the image's own units (uint8 levels, not yet scaled)."""
    height, width = image.shape[:2]
    size = out.shape[-1]
    chw = image.permute(2, 0, 1)
    if (height, width) == (size, size):
        out.copy_(chw)
        return
    new_height, new_width = _fitted_size(height, width, size, size)
    if image.dtype == torch.uint8:
        resized = resize_uint8_torch(chw, new_height, new_width, "bilinear")
    else:
        resized = _resize_float_bilinear(chw, new_height, new_width)
    out.fill_(0.0 if image.dtype == torch.uint8 else -1.0)
    top, left = int((size - new_height) / 2), int((size - new_width) / 2)
    out[:, top : top + new_height, left : left + new_width] = resized


def _split_views(images, num_views: int) -> list:
    """Return the views of ``images`` as a list of HWC arrays/tensors, checking their count."""
    if isinstance(images, (np.ndarray, torch.Tensor)):
        if images.ndim == 4:
            views = list(images)
        elif images.ndim == 3 and num_views == 1:
            views = [images]
        elif images.ndim == 3:
            raise InputError(
                f"got a single HWC image of shape {tuple(images.shape)} but num_views={num_views}; "
                f"expected a ({num_views}, H, W, 3) array or a list of {num_views} HWC images"
            )
        else:
            raise InputError(
                f"images have rank {images.ndim} (shape {tuple(images.shape)}); expected a (V, H, W, 3) "
                "array, a list of HWC images, or one HWC image when num_views == 1"
            )
    elif isinstance(images, Sequence) and not isinstance(images, (str, bytes)):
        views = list(images)
    else:
        raise InputError(
            f"images of type {type(images).__name__} are not supported; expected a numpy array, "
            "a torch tensor, or a list/tuple of HWC images"
        )
    if len(views) != num_views:
        raise InputError(f"got {len(views)} camera views, expected num_views={num_views}")
    return views


def _prepare_view(view, index: int, image_size: int, out: np.ndarray) -> None:
    """Validate one HWC view, resize-with-pad it and write it into ``out (3, S, S)`` float32 as CHW in [-1, 1]."""
    image = _to_numpy(view, index)
    _check_shape(image, index)
    if image.dtype == np.uint8:
        np.copyto(out, resize_with_pad(image, image_size, image_size).transpose(2, 0, 1))  # exact in float32
        # x / 255 * 2 - 1, each step rounded to float32 as the expression on a float32 array is
        np.divide(out, np.float32(255.0), out=out)
        np.multiply(out, np.float32(2.0), out=out)
        np.subtract(out, np.float32(1.0), out=out)
    else:
        _check_float_range(image, index)
        image = np.clip(image.astype(np.float32), -1.0, 1.0)
        np.copyto(out, resize_with_pad(image, image_size, image_size).transpose(2, 0, 1))


def _to_numpy(view, index: int) -> np.ndarray:
    """Return view ``index`` as a numpy array of an accepted dtype (``uint8`` or float)."""
    if isinstance(view, torch.Tensor):
        view = view.detach().cpu()
        if view.dtype == torch.bfloat16:
            view = view.float()
        view = view.numpy()
    if not isinstance(view, np.ndarray):
        raise InputError(
            f"view {index} is of type {type(view).__name__}; expected a numpy array or torch tensor"
        )
    if view.dtype != np.uint8 and view.dtype not in _FLOAT_DTYPES:
        raise InputError(
            f"view {index} has dtype {view.dtype}; expected uint8 in [0, 255] or float "
            "(float16/float32/float64/bfloat16) in [-1, 1]"
        )
    return view


def _check_shape(image: np.ndarray, index: int) -> None:
    """Check that view ``index`` is a non-empty HWC image with 3 channels."""
    if image.ndim != 3:
        raise InputError(
            f"view {index} has rank {image.ndim} (shape {image.shape}); expected an HWC image (H, W, 3)"
        )
    if image.shape[2] != 3:
        hint = " It looks like CHW; transpose it to HWC." if image.shape[0] == 3 else ""
        raise InputError(
            f"view {index} has shape {image.shape} with {image.shape[2]} channels; "
            f"expected an HWC RGB image (H, W, 3).{hint}"
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise InputError(f"view {index} is empty (shape {image.shape}); expected H > 0 and W > 0")


def _check_float_range(image: np.ndarray, index: int) -> None:
    """Check that float view ``index`` is finite and within [-1, 1] (up to ``FLOAT_RANGE_TOLERANCE``)."""
    if not np.isfinite(image).all():
        raise InputError(f"view {index} contains NaN or inf; expected finite values in [-1, 1]")
    low, high = float(image.min()), float(image.max())
    if low < -1.0 - FLOAT_RANGE_TOLERANCE or high > 1.0 + FLOAT_RANGE_TOLERANCE:
        raise InputError(
            f"float view {index} has values in [{low:.4g}, {high:.4g}]; expected uint8 in [0, 255] "
            "or float in [-1, 1]"
        )


def prepare_image_masks(image_masks, num_views: int) -> torch.Tensor:
    """Return a bool ``(num_views,)`` tensor saying which camera views are valid.

    ``None`` means every view is valid. Otherwise ``image_masks`` is a list, numpy array or tensor of
    ``num_views`` booleans (0/1 integers are accepted too); at least one view must be valid.
    """
    if image_masks is None:
        return torch.ones(num_views, dtype=torch.bool)
    if isinstance(image_masks, torch.Tensor):
        image_masks = image_masks.detach().cpu().numpy()
    try:
        masks = np.asarray(image_masks)
    except (TypeError, ValueError) as err:
        raise InputError(f"image_masks must be {num_views} booleans, one per view: {str(err)[:120]}") from None
    if masks.shape != (num_views,):
        raise InputError(
            f"image_masks has shape {masks.shape}; expected {num_views} booleans, one per view"
        )
    if masks.dtype != np.bool_:
        if not np.issubdtype(masks.dtype, np.integer) or not np.isin(masks, (0, 1)).all():
            raise InputError(
                f"image_masks {masks.tolist()} are not booleans; expected True/False for each view"
            )
        masks = masks.astype(np.bool_)
    if not masks.any():
        raise InputError("image_masks are all False; expected at least one valid camera view")
    return torch.from_numpy(masks.copy())
