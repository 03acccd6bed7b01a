"""How far torch's antialiased interpolation is from the references' Pillow pixels, and what the exact
resize costs on the device path.

For each camera size, on fresh random uint8 images (uniform noise, the worst case, and a smooth image made
of low-frequency waves plus a little noise, closer to a camera frame), against Pillow:

- ``interpolate``: ``F.interpolate(..., antialias=True)`` in float32, rounded to uint8 (what the device path
  and OpenVLA's host path computed before they followed Pillow; bilinear for openpi's resize-with-pad,
  bicubic for OpenVLA's 224 x 224 resize);
- ``fixed_point``: :func:`cortexflow.processing.resample.resize_uint8_torch` (the device path now).

Counts the differing uint8 values and the largest difference in levels. With ``--device cuda`` the
comparison runs there, and for the bilinear rows the GPU time (median of 200 calls, CUDA events) of each
resize alone and of the whole device path for one view is measured.
Writes ``--json`` and prints a table last.

    python benchmarks/image_parity.py [--device cpu|cuda] [--json image_parity.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import numpy as np
import PIL
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cortexflow.processing.images import _fitted_size, prepare_images_on_device  # noqa: E402
from cortexflow.processing.resample import resize_uint8_torch  # noqa: E402

SIZES = [(180, 320), (240, 320), (256, 256), (256, 320), (480, 640), (479, 641), (720, 1280), (96, 128)]
PIL_FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A uint8 HWC image of a few random low-frequency waves per channel plus +-4 levels of noise."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    channels = []
    for _ in range(3):
        value = sum(np.sin(2 * np.pi * (rng.uniform(0.5, 4) * x + rng.uniform(0.5, 4) * y) + rng.uniform(0, 6))
                    for _ in range(3))
        channels.append(127.5 + 40 * value + rng.uniform(-4, 4, (height, width)))
    return np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.uint8)


def interpolate_uint8(chw: torch.Tensor, height: int, width: int, filter: str) -> torch.Tensor:
    """torch's antialiased interpolation of a uint8 (C, H, W) tensor in float32, rounded to uint8 values."""
    out = F.interpolate(chw[None].float(), size=(height, width), mode=filter, antialias=True, align_corners=False)
    return out[0].round().clamp(0, 255)


def compare(image: np.ndarray, height: int, width: int, filter: str, device: str) -> dict:
    want = torch.from_numpy(np.array(Image.fromarray(image).resize((width, height), PIL_FILTERS[filter])))
    chw = torch.from_numpy(image).to(device).permute(2, 0, 1)
    row = {}
    for name, fn in (("interpolate", interpolate_uint8), ("fixed_point", resize_uint8_torch)):
        got = fn(chw, height, width, filter).permute(1, 2, 0).cpu().to(torch.int32)
        diff = (got - want.to(torch.int32)).abs()
        row[name] = {"differing_values": int((diff > 0).sum()), "values": diff.numel(),
                     "max_levels": int(diff.max())}
    return row


def cuda_median_ms(fn, calls: int = 200) -> float:
    """Median ms of ``fn()`` over ``calls`` calls after 20 warm-up calls (CUDA events)."""
    for _ in range(20):
        fn()
    samples = []
    for _ in range(calls):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def device_times_ms(image: np.ndarray, height: int, width: int) -> dict:
    """The resize alone on a uint8 view already on the GPU (fixed point vs interpolate), and the whole
    device path for one view (``prepare_images_on_device``: upload, resize-with-pad, scaling)."""
    chw = torch.from_numpy(image).cuda().permute(2, 0, 1)
    out = torch.empty((1, 3, 224, 224), device="cuda")
    return {"resize_fixed_point": cuda_median_ms(lambda: resize_uint8_torch(chw, height, width, "bilinear")),
            "resize_interpolate": cuda_median_ms(lambda: interpolate_uint8(chw, height, width, "bilinear")),
            "prepare_images_on_device": cuda_median_ms(lambda: prepare_images_on_device([image], 1, out))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json", default="image_parity.json")
    args = parser.parse_args()
    rng = np.random.default_rng()
    rows = []
    for height, width in SIZES:
        for kind in ("noise", "smooth"):
            image = (rng.integers(0, 256, (height, width, 3), dtype=np.uint8) if kind == "noise"
                     else smooth_image(rng, height, width))
            fitted = _fitted_size(height, width, 224, 224)
            for use, filter, out_size in (("openpi resize-with-pad", "bilinear", fitted),
                                          ("OpenVLA resize-naive", "bicubic", (224, 224))):
                if (height, width) == out_size:
                    continue
                row = {"size": [height, width], "image": kind, "use": use, "filter": filter, "out": list(out_size)}
                row.update(compare(image, *out_size, filter, args.device))
                if args.device == "cuda" and filter == "bilinear" and kind == "noise":
                    row["device_ms"] = device_times_ms(image, *out_size)
                rows.append(row)
    result = {
        "what": "uint8 values differing from Pillow's resize, torch interpolate vs Pillow's fixed-point arithmetic",
        "device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({platform.processor() or 'host'})",
        "versions": {"torch": torch.__version__, "pillow": PIL.__version__, "numpy": np.__version__},
        "command": f"python benchmarks/image_parity.py --device {args.device} --json {args.json}",
        "rows": rows,
    }
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"{'size':>10} {'image':>6} {'filter':>8} {'out':>8} | {'interpolate: differ':>20} {'max':>4} | "
          f"{'fixed point: differ':>20} {'max':>4} | GPU ms: resize fixed / interpolate, whole view")
    for row in rows:
        a, b = row["interpolate"], row["fixed_point"]
        times = row.get("device_ms")
        timing = (f"{times['resize_fixed_point']:.3f} / {times['resize_interpolate']:.3f}, "
                  f"{times['prepare_images_on_device']:.3f}") if times else ""
        size, out = "x".join(map(str, row["size"])), "x".join(map(str, row["out"]))
        print(f"{size:>10} {row['image']:>6} {row['filter']:>8} {out:>8} | "
              f"{a['differing_values']:>8} of {a['values']:<9} {a['max_levels']:>4} | "
              f"{b['differing_values']:>8} of {b['values']:<9} {b['max_levels']:>4} | {timing}")


if __name__ == "__main__":
    main()
