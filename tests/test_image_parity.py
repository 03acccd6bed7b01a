"""Camera images exactly as the references prepare them: openpi's resize-with-pad (Pillow bilinear on uint8)
and OpenVLA's processor (Pillow bicubic), on the host path and on the device path's torch arithmetic.

The references are written here from ``docs/reference_facts.md#F-OP-7`` and ``F-OV-2``: Pillow's own
``Image.resize``, ``Image.new`` + ``paste`` for the padding, ``x / 255 * 2 - 1`` or the two normalisations.
Every comparison is exact (zero differing pixels / bit-identical floats) on fresh random images.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from cortexflow.processing import prepare_images, prepare_images_on_device, resize_with_pad
from cortexflow.processing.resample import (
    fixed_point_coefficients,
    pillow_resamples_height_first,
    resize_uint8_torch,
)
from cortexflow.processing.vla_inputs import (
    DINO_MEAN,
    DINO_STD,
    SIGLIP_MEAN,
    SIGLIP_STD,
    prepare_openvla_image,
    resize_naive,
)

# camera sizes (H, W): DROID/ZED 180x320, OpenVLA's 256x320, odd sizes and aspect ratios, a tall image (more
# than 2:1, where Pillow 13 resamples the height first), upscaled small images, 1-pixel edge cases
CAMERA_SIZES = [(180, 320), (256, 320), (479, 641), (224, 224), (100, 500), (500, 100), (640, 200),
                (480, 640), (37, 301), (96, 128), (1, 1), (3, 640), (223, 225)]


@pytest.fixture
def rng():
    return np.random.default_rng()


def openpi_resize_with_pad(image: np.ndarray, size: int = 224) -> np.ndarray:
    """openpi's client ``resize_with_pad`` of one uint8 HWC image (``docs/reference_facts.md#F-OP-7``), written with Pillow."""
    pil = Image.fromarray(image)
    width, height = pil.size
    if (width, height) == (size, size):
        return image
    ratio = max(width / size, height / size)
    new_height, new_width = int(height / ratio), int(width / ratio)
    resized = pil.resize((new_width, new_height), resample=Image.BILINEAR)
    canvas = Image.new(resized.mode, (size, size), 0)
    canvas.paste(resized, (int((size - new_width) / 2), int((size - new_height) / 2)))
    return np.array(canvas)


def openvla_pixel_values(image: np.ndarray, size: int = 224) -> np.ndarray:
    """OpenVLA's ``pixel_values`` (6, size, size) for one uint8 HWC image (``docs/reference_facts.md#F-OV-2``): Pillow bicubic to
    ``size x size``, ``u / 255``, DINOv2 then SigLIP normalisation, in float32 tensors."""
    pil = Image.fromarray(image).convert("RGB")
    if pil.size != (size, size):
        pil = pil.resize((size, size), resample=Image.BICUBIC)
    pixels = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float() / 255.0
    views = [(pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
             for mean, std in ((DINO_MEAN, DINO_STD), (SIGLIP_MEAN, SIGLIP_STD))]
    return torch.cat(views).numpy()


def _camera(rng, size) -> np.ndarray:
    return rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)


def _differing(got: np.ndarray, want: np.ndarray) -> int:
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.shape, want.dtype)
    return int((got != want).sum())


@pytest.mark.parametrize("size", CAMERA_SIZES)
def test_resize_with_pad_gives_openpi_pixels(rng, size):
    image = _camera(rng, size)
    assert _differing(resize_with_pad(image), openpi_resize_with_pad(image)) == 0


@pytest.mark.parametrize("size", [s for s in CAMERA_SIZES if s != (224, 224)])
def test_resize_with_pad_of_a_non_contiguous_view(rng, size):
    """A view rotated by slicing (LIBERO's ``[::-1, ::-1]``) resizes like its contiguous copy."""
    image = _camera(rng, size)[::-1, ::-1]
    assert _differing(resize_with_pad(image), openpi_resize_with_pad(np.ascontiguousarray(image))) == 0


def test_prepare_images_host_and_device_paths_give_openpi_values(rng):
    """Both paths (the device path's arithmetic run on the CPU) give openpi's model input bit for bit: its
    uint8 resize-with-pad, then ``x.astype(float32) / 255 * 2 - 1``."""
    views = [_camera(rng, size) for size in CAMERA_SIZES]
    want = np.stack([openpi_resize_with_pad(v).transpose(2, 0, 1).astype(np.float32) / 255.0 * 2.0 - 1.0
                     for v in views])
    host = prepare_images(views, len(views)).numpy()
    device = prepare_images_on_device(views, len(views), torch.full((len(views), 3, 224, 224), float("nan"))).numpy()
    assert _differing(host, want) == 0
    assert _differing(device, want) == 0


@pytest.mark.parametrize("filter", ["bilinear", "bicubic"])
def test_fixed_point_resampling_equals_pillow(rng, filter):
    """The device path's torch arithmetic gives Pillow's pixels for random sizes: shrinking, enlarging, one
    axis only, mixed, and the sizes where Pillow 13 resamples the height first."""
    pil_filter = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[filter]
    sizes = [((300, 100), (100, 50)), ((100, 100), (50, 200)), ((640, 200), (224, 70)), ((3, 35), (25, 267)),
             ((64, 48), (64, 17)), ((64, 48), (9, 48)), ((1, 1), (7, 3)), ((5, 700), (1, 224))]
    for _ in range(24):
        in_size = tuple(int(n) for n in rng.integers(1, 400, 2))
        out_size = tuple(int(n) for n in rng.integers(1, 300, 2))
        sizes.append((in_size, out_size))
    for (in_h, in_w), (out_h, out_w) in sizes:
        image = _camera(rng, (in_h, in_w))
        want = np.array(Image.fromarray(image).resize((out_w, out_h), resample=pil_filter))
        got = resize_uint8_torch(torch.from_numpy(image).permute(2, 0, 1), out_h, out_w, filter)
        assert _differing(got.permute(1, 2, 0).to(torch.uint8).numpy(), want) == 0, ((in_h, in_w), (out_h, out_w))


def test_pass_order_follows_the_installed_pillow():
    """The sizes the tests above use on both sides of Pillow 13's rule; with an older Pillow the width is
    always resampled first."""
    import PIL

    newer = int(PIL.__version__.split(".")[0]) >= 13
    assert pillow_resamples_height_first(300, 100, 100, 50) is newer  # 200 rows lost > 2 * 50 columns
    assert pillow_resamples_height_first(100, 100, 50, 200) is newer  # the width grows
    assert not pillow_resamples_height_first(300, 100, 201, 50)  # 99 rows lost, not more than 2 * 50
    assert not pillow_resamples_height_first(100, 100, 150, 20)  # the height grows
    assert not pillow_resamples_height_first(300, 100, 100, 100)  # the width does not change


def test_fixed_point_coefficients_are_normalised_integer_weights():
    """Each output's integer weights sum to 2**22 within rounding (one unit per tap) and point at taps around
    its centre; unused taps have weight 0."""
    for in_size, out_size, filter in ((320, 224, "bilinear"), (641, 224, "bicubic"), (7, 224, "bicubic")):
        taps, weights = fixed_point_coefficients(in_size, out_size, filter)
        assert taps.shape == weights.shape and weights.dtype == np.int32
        assert np.abs(weights.sum(axis=1) - (1 << 22)).max() <= taps.shape[1]
        assert taps.min() >= 0 and taps.max() < in_size
        centre = (np.arange(out_size) + 0.5) * in_size / out_size
        support = {"bilinear": 1, "bicubic": 2}[filter] * max(in_size / out_size, 1.0)
        used = weights != 0
        assert (np.abs(taps + 0.5 - centre[:, None])[used] <= support + 0.5).all()


def test_resize_with_pad_keeps_a_row_where_openpi_would_get_none(rng):
    """A 1 x 640 image fits as int(1 / (640 / 224)) = 0 rows, which Pillow refuses; CortexFlow keeps one row:
    Pillow's resize to 224 x 1, pasted at row int((224 - 1) / 2) = 111."""
    image = _camera(rng, (1, 640))
    with pytest.raises(ValueError, match="height and width must be > 0"):
        openpi_resize_with_pad(image)
    out = resize_with_pad(image)
    want = np.zeros((224, 224, 3), dtype=np.uint8)
    want[111] = np.array(Image.fromarray(image).resize((224, 1), resample=Image.BILINEAR))[0]
    assert _differing(out, want) == 0


@pytest.mark.parametrize("size", CAMERA_SIZES)
def test_openvla_pixel_values_are_the_processors(rng, size):
    image = _camera(rng, size)
    want = np.array(Image.fromarray(image).resize((224, 224), resample=Image.BICUBIC))
    assert _differing(resize_naive(image, 224), want) == 0
    assert _differing(prepare_openvla_image(image).numpy(), openvla_pixel_values(image)) == 0


def test_openvla_accepts_a_pil_image_as_the_processor_does(rng):
    image = _camera(rng, (256, 320))
    pil = Image.fromarray(image).convert("RGBA")  # the processor converts to RGB first
    assert _differing(prepare_openvla_image(pil).numpy(), openvla_pixel_values(image)) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the device path on a GPU needs a CUDA GPU")
def test_device_path_on_the_gpu_gives_openpi_values(rng):
    """On a GPU the integer arithmetic gives the same pixels as on the CPU: openpi's values bit for bit."""
    views = [_camera(rng, size) for size in CAMERA_SIZES]
    want = np.stack([openpi_resize_with_pad(v).transpose(2, 0, 1).astype(np.float32) / 255.0 * 2.0 - 1.0
                     for v in views])
    out = torch.full((len(views), 3, 224, 224), float("nan"), device="cuda")
    assert _differing(prepare_images_on_device(views, len(views), out).cpu().numpy(), want) == 0
    for filter in ("bilinear", "bicubic"):
        image = _camera(rng, (479, 641))
        pil_filter = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[filter]
        want_pixels = np.array(Image.fromarray(image).resize((224, 168), resample=pil_filter))
        got = resize_uint8_torch(torch.from_numpy(image).cuda().permute(2, 0, 1), 168, 224, filter)
        assert _differing(got.permute(1, 2, 0).to(torch.uint8).cpu().numpy(), want_pixels) == 0
