"""``cortexflow bench --batch-scaling``: how an image encoder's latency grows with the batch, per backend.

For one perception encoder (:mod:`cortexflow.encoders`: the policy's SigLIP tower at real or tiny size,
timm ``vit_small_patch16_224``, ``resnet18d``) and each backend (``pytorch``; ``triton`` for the SigLIP
tower, whose ops it implements; ``onnx``: the encoder exported with a dynamic batch and run in ONNX
Runtime), every batch size B is timed on fresh random non-zero images after warm-up: the GPU is
synchronised around each call (CUDA) or the host clock is read (CPU). Reported per B:

- latency per batch L(B) (median, p90, min, standard deviation, runs), latency per image L(B)/B, images/s;
- scaling efficiency ``L(B) / (B · L(1))``: 1.0 = no gain from batching (every image costs as much as
  alone), 1/B = the whole batch as cheap as one image; and the marginal ms of each extra image;
- achieved FLOP/s = FLOPs per image (``torch.utils.flop_counter`` on the PyTorch module: matmuls,
  convolutions, attention) x B / L(B), and its share of a matmul measured on the same device and dtype
  at the start (the practical peak; spec sheets are not trusted).

The report also records the CPU or GPU name, core/thread counts and the versions of torch, onnx,
onnxruntime and timm. A backend that cannot run here is reported as skipped with the reason.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from cortexflow.config import dtype_name
from cortexflow.errors import BackendUnavailableError, ConfigError
from cortexflow.tools import environment_info, package_version, resolve_device_dtype, synchronize

BACKENDS = ("pytorch", "triton", "onnx")
SKIP_ERRORS = (BackendUnavailableError, NotImplementedError)


def cpu_name() -> str:
    """The CPU model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    """Where the numbers came from: device, CPU, cores, threads and the package versions."""
    info = environment_info(device)
    info.update(
        cpu=cpu_name(),
        cpu_cores=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        onnx=package_version("onnx"),
        onnxruntime=package_version("onnxruntime") or package_version("onnxruntime-gpu"),
        onnxscript=package_version("onnxscript"),
        timm=package_version("timm"),
        numpy=package_version("numpy"),
        load_average=_load_average(),
    )
    return info


def _load_average() -> list[float] | None:
    """1/5/15-minute load averages (other work on the machine skews CPU timings), or None."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, seconds: float = 0.5) -> dict:
    """FLOP/s of a square matmul in ``dtype`` on ``device`` (2048 on CPU, 8192 on GPU), median of runs
    for about ``seconds``: the practical peak the encoders' achieved FLOP/s are compared with."""
    size = 8192 if device.type == "cuda" else 2048
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    times = []
    torch.mm(a, b)
    deadline = time.perf_counter() + seconds
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return {"matmul": f"{dtype_name(dtype)} {size}x{size}x{size}", "flops": 2 * size**3 / statistics.median(times)}


def _batches(values: Sequence[int]) -> list[int]:
    batches = sorted({int(b) for b in values})
    if not batches or batches[0] < 1:
        raise ConfigError(f"batch sizes must be positive integers, got {list(values)}")
    return batches


def _runner(name: str, backend: str, device: torch.device, dtype: torch.dtype, seed: int, batches: list[int],
            cache_dir, opset: int, threads: int | None, log) -> tuple[Callable[[torch.Tensor], Any], torch.dtype, dict]:
    """``(call(images), input dtype, details)`` for encoder ``name`` on ``backend``."""
    from cortexflow.encoders import TIMM_ENCODERS, SiglipTower, create_encoder, encoder_input_dtype

    if backend == "pytorch":
        encoder = create_encoder(name, device=device, dtype=dtype, seed=seed)
        return encoder, encoder_input_dtype(encoder, dtype), {"ops": "pytorch"}
    if backend == "triton":
        if name in TIMM_ENCODERS:
            raise BackendUnavailableError(f"the triton backend implements the SigLIP tower's ops; {name} is a timm "
                                          "model with no triton path (use pytorch or onnx)")
        encoder = create_encoder(name, device=device, dtype=dtype, seed=seed, ops="triton")
        return encoder, encoder_input_dtype(encoder, dtype), {"ops": "triton"}
    if backend == "onnx":
        from cortexflow.encoders import cached_encoder_export, load_encoder_session

        encoder = create_encoder(name, device="cpu", dtype=dtype, seed=seed)
        batch = f"dynamic:{batches[0]}-{batches[-1]}" if len(batches) > 1 else f"static:{batches[0]}"
        log(f"exporting {name} to ONNX ({batch}, opset {opset}) or loading it from the cache ...")
        folder, manifest, exported = cached_encoder_export(encoder, cache_dir=cache_dir, batch=batch, opset=opset,
                                                           dtype=dtype)
        session = load_encoder_session(folder, device=device, threads=threads)
        output = manifest["stages"]["encoder"]["outputs"][0]["name"]
        in_dtype = torch.float32 if isinstance(encoder.module, SiglipTower) else dtype
        details = {"onnx_file": str(folder / manifest["stages"]["encoder"]["file"]), "exported_now": exported,
                   "export_batch": batch, "opset": opset, "providers": session.session.get_providers(),
                   "ort_threads": threads or "default (one per core)"}
        return (lambda images: session(images=images)[output]), in_dtype, details
    raise ConfigError(f"unknown backend {backend!r} for --batch-scaling; expected one of {', '.join(BACKENDS)}")


def _time_batch(call, images: torch.Tensor, device: torch.device, iters: int, warmup: int, max_seconds: float) -> list[float]:
    """Latencies in ms of ``call(images)``: ``warmup`` untimed runs, then up to ``iters`` timed ones
    (at least 3) until ``max_seconds`` of timed runs have passed."""
    with torch.inference_mode():
        for _ in range(warmup):
            call(images)
        times: list[float] = []
        spent = 0.0
        while len(times) < max(iters, 1) and (len(times) < 3 or spent < max_seconds):
            synchronize(device)
            start = time.perf_counter()
            call(images)
            synchronize(device)
            elapsed = time.perf_counter() - start
            spent += elapsed
            times.append(elapsed * 1e3)
    return times


def scaling_rows(latencies: dict[int, list[float]], flops_per_image: float | None, peak_flops: float | None) -> list[dict]:
    """Per batch size: latency statistics, per-image latency, images/s, scaling efficiency
    ``L(B)/(B·L(b0))·b0`` against the smallest batch ``b0`` (1 normally), marginal ms per extra image,
    achieved FLOP/s and its share of ``peak_flops``."""
    rows = []
    batches = sorted(latencies)
    base_b = batches[0]
    base = statistics.median(latencies[base_b])
    previous = None
    for b in batches:
        times = latencies[b]
        median = statistics.median(times)
        ordered = sorted(times)
        p90 = ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]
        achieved = flops_per_image * b / (median * 1e-3) if flops_per_image else None
        rows.append({
            "batch": b,
            "median_ms": median,
            "p90_ms": p90,
            "min_ms": ordered[0],
            "std_ms": statistics.pstdev(times),
            "runs": len(times),
            "ms_per_image": median / b,
            "images_per_s": b / (median * 1e-3),
            "scaling_efficiency": median / (b / base_b * base),
            "marginal_ms_per_image": None if previous is None else (median - previous[1]) / (b - previous[0]),
            "achieved_gflops": None if achieved is None else achieved / 1e9,
            "pct_of_matmul_peak": None if (achieved is None or not peak_flops) else 100 * achieved / peak_flops,
        })
        previous = (b, median)
    return rows


def run_batch_scaling(
    encoder: str = "siglip_tiny",
    backends: Sequence[str] = ("pytorch", "onnx"),
    batches: Sequence[int] = (1, 2, 3, 4, 5, 6),
    *,
    device: str = "cpu",
    dtype: "str | torch.dtype" = "float32",
    iters: int = 20,
    warmup: int = 2,
    max_seconds: float = 10.0,
    seed: int = 0,
    opset: int = 20,
    cache_dir: "str | Path | None" = None,
    threads: int | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Time ``encoder`` at each of ``batches`` on each of ``backends``; returns the report dict (see module doc).

    ``dtype="auto"``: bfloat16 on a GPU, float32 on CPU (the onnx backend takes float32 or float16).
    ``threads``: ONNX Runtime intra-op threads (default: ORT's, one per core)."""
    from cortexflow.encoders import ENCODERS, create_encoder

    log = log or (lambda _message: None)
    resolved, compute_dtype = resolve_device_dtype(device, dtype)
    batches = _batches(batches)
    names = [b.strip().lower() for b in backends if b.strip()]
    unknown = sorted(set(names) - set(BACKENDS))
    if unknown or not names:
        raise ConfigError(f"unknown backend(s) {unknown or names} for --batch-scaling; expected any of {', '.join(BACKENDS)}")
    key = encoder.strip().lower().replace("-", "_")
    if key not in ENCODERS:
        raise ConfigError(f"unknown encoder {encoder!r}; expected one of {', '.join(ENCODERS)}")
    log(f"building {key} and counting its FLOPs ...")
    reference = create_encoder(key, device="cpu", dtype=torch.float32, seed=seed)
    flops = reference.flops_per_image()
    with torch.inference_mode():
        output_shape = list(reference(reference.example_input(1, device="cpu")).shape[1:])
    info = {"name": key, "source": reference.source, "params": reference.params, "image_size": reference.image_size,
            "input": f"images (B, 3, {reference.image_size}, {reference.image_size})",
            "output": f"{reference.output_name} (B, {', '.join(map(str, output_shape))})",
            "flops_per_image": flops, "flops_counted_by": "torch.utils.flop_counter (matmul, convolution, attention)"}
    del reference
    environment = machine_info(resolved)
    log(f"measuring a {dtype_name(compute_dtype)} matmul on {resolved} ...")
    peak = measure_matmul_flops(resolved, compute_dtype)
    results = []
    for backend in names:
        entry: dict[str, Any] = {"backend": backend, "status": "ok", "reason": None, "details": {}, "rows": []}
        try:
            call, in_dtype, details = _runner(key, backend, resolved, compute_dtype, seed, batches, cache_dir, opset,
                                              threads, log)
            entry["details"] = details
            latencies = {}
            for b in batches:
                log(f"{backend}: batch {b} ...")
                gen = torch.Generator().manual_seed(seed + 1000 + b)
                size = info["image_size"]
                images = (torch.rand(b, 3, size, size, generator=gen) * 2 - 1).to(device=resolved, dtype=in_dtype)
                latencies[b] = _time_batch(call, images, resolved, iters, warmup, max_seconds)
            entry["rows"] = scaling_rows(latencies, flops, peak["flops"])
            del call
        except SKIP_ERRORS as err:
            entry.update(status="skipped", reason=f"{type(err).__name__}: {err}")
        except Exception as err:  # noqa: BLE001 - a failing backend is a result; the others still run
            entry.update(status="failed", reason=f"{type(err).__name__}: {' '.join(str(err).split())[:500]}")
        results.append(entry)
    return {
        "tool": "cortexflow bench --batch-scaling",
        "encoder": info,
        "device": str(resolved),
        "dtype": dtype_name(compute_dtype),
        "batches": batches,
        "timing": {"iters": iters, "warmup": warmup, "max_seconds": max_seconds,
                   "clock": "host clock, GPU synchronised around each call" if resolved.type == "cuda" else "host clock"},
        "calibration": {"matmul": peak["matmul"], "matmul_gflops": peak["flops"] / 1e9},
        "environment": {**environment, "load_average_after": _load_average()},
        "backends": results,
    }


def print_batch_scaling(report: dict, console) -> None:
    """One rich table per backend, then skipped/failed backends with their reasons."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    enc, env = report["encoder"], report["environment"]
    where = env["device"] if report["device"].startswith("cuda") else f"{env['cpu']} ({env['cpu_cores']} cores)"
    console.print(Text(f"{enc['name']} ({enc['params'] / 1e6:.1f} M params, {enc['flops_per_image'] / 1e9:.2f} GFLOP/image, "
                       f"{enc['output']}) on {where}, {report['dtype']}; matmul calibration "
                       f"{report['calibration']['matmul_gflops']:.0f} GFLOP/s ({report['calibration']['matmul']})",
                       style="bold"))
    for entry in report["backends"]:
        if entry["status"] != "ok":
            console.print(Text(f"{entry['backend']}: {entry['status']} — {entry['reason']}", style="yellow"))
            continue
        table = Table(title=entry["backend"], box=box.SIMPLE_HEAD, title_justify="left")
        for header in ("batch", "ms/batch", "p90 ms", "ms/image", "images/s", "L(B)/(B·L(1))", "marginal ms/img",
                       "GFLOP/s", "% of matmul"):
            table.add_column(header, justify="right")
        for row in entry["rows"]:
            marginal = "-" if row["marginal_ms_per_image"] is None else f"{row['marginal_ms_per_image']:.2f}"
            table.add_row(str(row["batch"]), f"{row['median_ms']:.2f}", f"{row['p90_ms']:.2f}", f"{row['ms_per_image']:.2f}",
                          f"{row['images_per_s']:.1f}", f"{row['scaling_efficiency']:.2f}", marginal,
                          f"{row['achieved_gflops']:.1f}", f"{row['pct_of_matmul_peak']:.0f}")
        console.print(table)
    t = report["timing"]
    load = env.get("load_average")
    console.print(Text(f"median of up to {t['iters']} runs per batch (at least 3, at most ~{t['max_seconds']:g} s) after "
                       f"{t['warmup']} warm-up runs; {t['clock']}"
                       + (f"; load average at start {load[0]:.2f} (other work skews CPU timings)" if load else ""),
                       style="dim"))


def plot_batch_scaling(report: dict, path: "str | Path") -> Path:
    """A PNG with latency per batch, images/s and scaling efficiency against the batch size, one line per backend."""
    from cortexflow.tools.png import line_chart

    ok = [e for e in report["backends"] if e["status"] == "ok" and e["rows"]]
    if not ok:
        raise ConfigError("nothing to plot: no backend produced timings")
    panels = [
        {"title": "latency per batch (ms)", "xlabel": "batch",
         "series": [[(r["batch"], r["median_ms"]) for r in e["rows"]] for e in ok]},
        {"title": "throughput (images/s)", "xlabel": "batch",
         "series": [[(r["batch"], r["images_per_s"]) for r in e["rows"]] for e in ok]},
        {"title": "L(B)/(B*L(1))", "xlabel": "batch",
         "series": [[(r["batch"], r["scaling_efficiency"]) for r in e["rows"]] for e in ok]},
    ]
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    title = f"{report['encoder']['name']} {report['dtype']} on {report['device']}"
    line_chart(path, panels, [e["backend"].upper() for e in ok], title=title)
    return path


__all__ = ["BACKENDS", "cpu_name", "machine_info", "measure_matmul_flops", "plot_batch_scaling",
           "print_batch_scaling", "run_batch_scaling", "scaling_rows"]
