"""``cortexflow profile``: where one ``predict`` call's time goes, and how far each stage is from its floor.

One un-graphed ``predict`` runs under ``torch.profiler`` (CPU and, on a GPU, CUDA activities). The
report has the per-stage times (the engine's ``last_timings``: median of a few un-profiled calls, and
those of the profiled call), the top kernels by total GPU time (on a CPU: the top ops by self CPU time)
with their call counts and shares, and per stage the FLOPs and minimum bytes of
:mod:`cortexflow.tools.flops`, the achieved FLOP/s and bytes/s, and, against the device's peaks measured
at the start (a large bf16 matmul, a large device-to-device copy), the floor
``max(flop / peak, bytes / bandwidth)`` and the gap to it.
"""

from __future__ import annotations

import statistics
from typing import Any, Callable

import numpy as np
import torch
from torch.autograd import DeviceType

from cortexflow.checkpoints.pi0_layout import to_checkpoint_keys
from cortexflow.config import VLAModelType, dtype_name
from cortexflow.errors import ConfigError
from cortexflow.families import family_of
from cortexflow.random_checkpoint import random_weights
from cortexflow.tools import (
    backend_options,
    environment_info,
    model_config,
    resolve_device_dtype,
    resolve_size,
    synchronize,
)
from cortexflow.tools.bench import make_engine, predict_call, random_observation
from cortexflow.tools.flops import stage_costs
from cortexflow.tools.native_stderr import dropping_native_lines

#: Engine stage name -> the cost in :func:`cortexflow.tools.flops.stage_costs` it runs.
STAGES = (("vision_encoder", "vision"), ("transformer_encoder", "prefix"), ("transformer_decoder", "expert"))


def measure_device_peaks(device: torch.device, matmul_size: int = 8192, copy_bytes: int = 2**30, iters: int = 20) -> dict:
    """Measured peaks of a GPU: TFLOP/s of a ``matmul_size``-cubed bf16 matmul and GB/s of a device copy
    of ``copy_bytes`` (read + written bytes over time), each the mean of ``iters`` runs timed with CUDA events."""
    a = torch.randn(matmul_size, matmul_size, device=device, dtype=torch.bfloat16)
    b = torch.randn(matmul_size, matmul_size, device=device, dtype=torch.bfloat16)
    c = torch.empty_like(a)
    matmul_ms = _event_ms(lambda: torch.mm(a, b, out=c), iters)
    a = b = c = None  # freed before the copy's gigabyte is allocated
    src = torch.randint(0, 255, (copy_bytes,), device=device, dtype=torch.uint8)
    dst = torch.empty_like(src)
    copy_ms = _event_ms(lambda: dst.copy_(src), iters)
    src = dst = None
    torch.cuda.empty_cache()
    return {
        "matmul_tflops": 2 * matmul_size**3 / (matmul_ms * 1e-3) / 1e12,
        "copy_gbps": 2 * copy_bytes / (copy_ms * 1e-3) / 1e9,
        "matmul": f"bf16 {matmul_size}x{matmul_size}x{matmul_size}",
        "copy_bytes": copy_bytes,
    }


def _event_ms(fn: Callable[[], object], iters: int) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def kernel_rows(prof, cuda: bool, top: int) -> tuple[list[dict], float]:
    """Top ``top`` kernels by total GPU time (CPU: ops by self CPU time) and the total over all of them, ms."""
    averages = prof.key_averages()
    if cuda:
        items = [(e.key, e.count, e.self_device_time_total) for e in averages if e.device_type == DeviceType.CUDA]
    else:
        items = [(e.key, e.count, e.self_cpu_time_total) for e in averages
                 if e.device_type == DeviceType.CPU and not e.is_user_annotation]
    items = [item for item in items if item[2] > 0]
    total_us = sum(us for _, _, us in items)
    rows = [
        {"name": name, "count": count, "total_ms": us / 1e3, "mean_us": us / count,
         "share": us / total_us if total_us else 0.0}
        for name, count, us in sorted(items, key=lambda item: -item[2])[:top]
    ]
    return rows, total_us / 1e3


def run_profile(
    model: str = "pi0",
    backend: Any = "pytorch",
    views: int = 2,
    size: str = "auto",
    device: str = "auto",
    dtype: "str | torch.dtype" = "auto",
    prompt_len: int = 20,
    chunk: int | None = None,
    steps: int | None = None,
    top: int = 20,
    repeats: int = 3,
    seed: int = 0,
    peak_tflops: float | None = None,
    peak_gbps: float | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Profile one un-graphed ``predict`` of ``model`` on ``backend`` (a name, or a backend class such as a
    ``TritonBackend.configured(...)``); returns the report dict.

    ``peak_tflops`` / ``peak_gbps`` replace the measured peaks (on a CPU nothing is measured, so without
    them there is no floor). The model's family (:mod:`cortexflow.families`) supplies the run:
    :func:`run_flow_profile` for pi0 / pi05, :func:`cortexflow.tools.decoding_profile.run_token_profile` for
    openvla / rt2 (one image: ``views``, ``chunk`` and ``steps`` do not apply)."""
    profile = family_of(model).part("profile")
    return profile(model=model, backend=backend, views=views, size=size, device=device, dtype=dtype,
                   prompt_len=prompt_len, chunk=chunk, steps=steps, top=top, repeats=repeats, seed=seed,
                   peak_tflops=peak_tflops, peak_gbps=peak_gbps, log=log)


def run_flow_profile(*, model: str, backend: Any, views: int, size: str, device: str, dtype: Any, prompt_len: int,
                     chunk: int | None, steps: int | None, top: int, repeats: int, seed: int,
                     peak_tflops: float | None, peak_gbps: float | None, log: Callable[[str], None] | None) -> dict:
    """:func:`run_profile` (whose arguments these are) for a flow-matching policy: vision, prefix and expert
    stages against their floors."""
    resolved_device, compute_dtype = resolve_device_dtype(device, dtype)
    size = resolve_size(size, resolved_device)
    log = log or (lambda _message: None)
    overrides = {k: v for k, v in (("chunk_size", chunk), ("num_diffusion_steps", steps)) if v is not None}
    config = model_config(VLAModelType.parse(model).value, size, **overrides)
    if not 1 <= prompt_len <= config.max_token_len:
        raise ConfigError(f"prompt length must be 1..{config.max_token_len} (the model's max_token_len), got {prompt_len}")
    if views < 1 or top < 1 or repeats < 1:
        raise ConfigError(f"views, top and repeats must be at least 1, got {views}, {top}, {repeats}")

    peaks = device_peaks(resolved_device, peak_tflops, peak_gbps, log)
    log(f"drawing {size} {config.model_type.value} weights on {resolved_device} ...")
    weights = random_weights(config, seed, compute_dtype, resolved_device)
    engine = make_engine(to_checkpoint_keys(weights, config, "openpi"), config, views, False, compute_dtype,
                         resolved_device, backend)
    del weights
    call = predict_call(engine, random_observation(config, views, prompt_len, np.random.default_rng(seed)))
    stages_ms, kernels = profile_call(call, engine, resolved_device, repeats, top, log)

    weight_bytes = torch.finfo(compute_dtype).bits // 8
    costs = stage_costs(config, views, prompt_len, weight_bytes=weight_bytes)
    executed = stage_costs(config, views, config.max_token_len, weight_bytes=weight_bytes)
    rows = [row_with_floor(stage, costs[key], executed[key], stages_ms.get(stage, 0.0), peaks) for stage, key in STAGES]
    workload = {"views": views, "prompt_tokens": prompt_len, "padded_prompt_tokens": config.max_token_len,
                "chunk": config.chunk_size, "steps": config.num_diffusion_steps, "repeats": repeats,
                "cuda_graphs": False}
    return build_report(config.model_type.value, engine, size, compute_dtype, seed, workload, resolved_device,
                        peaks, stages_ms, rows, sum(r["time_ms"] for r in rows), kernels)


def device_peaks(device: torch.device, peak_tflops: float | None, peak_gbps: float | None,
                 log: Callable[[str], None]) -> dict | None:
    """The peaks the floor divides by: measured on a GPU, replaced by the given ones; None on a CPU
    without given peaks. Giving only one of the two is an error."""
    peaks = None
    if device.type == "cuda":
        log("measuring the device's matmul and copy peaks ...")
        peaks = {**measure_device_peaks(device), "source": "measured"}
    if peak_tflops is not None or peak_gbps is not None:
        if peak_tflops is None or peak_gbps is None:
            raise ConfigError("give both peak TFLOP/s and peak GB/s, or neither")
        peaks = {**(peaks or {}), "matmul_tflops": peak_tflops, "copy_gbps": peak_gbps, "source": "given"}
    return peaks


def profile_call(call: Callable[[], object], engine, device: torch.device, repeats: int, top: int,
                 log: Callable[[str], None]) -> tuple[dict, dict]:
    """Two warm-up calls, the median ``engine.last_timings`` of ``repeats`` calls, then one call under
    ``torch.profiler``: ``(stages_ms, kernels)`` with ``kernels`` the report's kernel section."""
    cuda = device.type == "cuda"
    with torch.inference_mode():
        for _ in range(2):
            call()
        timings = []
        for _ in range(repeats):
            call()
            timings.append(dict(engine.last_timings))
        stages_ms = {name: statistics.median(t[name] for t in timings) for name in timings[0]}
        log("profiling one call ...")
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        synchronize(device)
        with dropping_native_lines(), torch.profiler.profile(activities=activities) as prof:
            call()
            synchronize(device)
    top_rows, total_ms = kernel_rows(prof, cuda, top)
    return stages_ms, {"source": "CUDA kernels (GPU time)" if cuda else "CPU ops (self CPU time)",
                       "total_ms": total_ms, "top": top_rows}


def build_report(model: str, engine, size: str, dtype: torch.dtype, seed: int, workload: dict, device: torch.device,
                 peaks: dict | None, stages_ms: dict, rows: list[dict], model_ms: float, kernels: dict) -> dict:
    """The profile report: workload, environment, peaks, stage times, roofline rows with their totals
    (the floor is the sum of the rows' floors) and the kernels."""
    floor = sum(r["floor_ms"] for r in rows) if peaks else None
    return {
        "tool": "cortexflow profile",
        "model": model,
        "backend": engine.backend.name,
        "backend_options": backend_options(engine.backend),
        "size": size,
        "dtype": dtype_name(dtype),
        "seed": seed,
        "workload": workload,
        "environment": environment_info(device),
        "peaks": peaks,
        "stages_ms": stages_ms,
        "profiled_stages_ms": dict(engine.last_timings),
        "stages": rows,
        "totals": {
            "stages_ms": model_ms,
            "flop": sum(r["flop"] for r in rows),
            "bytes": sum(r["bytes"] for r in rows),
            "floor_ms": floor,
            "gap": model_ms / floor if floor else None,
        },
        "kernels": kernels,
    }


def row_with_floor(stage: str, cost, executed, time_ms: float | None, peaks: dict | None) -> dict:
    """One stage: time, work, achieved rates and, with peaks, the floor and the gap to it (``time_ms``
    None: the stage is not timed on its own; its rates and gap are None)."""
    time_ms = None if time_ms is None else float(time_ms)
    seconds = (time_ms or 0.0) / 1e3
    row = {
        "stage": stage,
        "time_ms": time_ms,
        "flop": cost.total_flop,
        "bytes": cost.total_bytes,
        "repeats": cost.repeats,
        "flop_parts_per_call": cost.parts,
        "flop_executed": executed.total_flop,
        "achieved_tflops": cost.total_flop / seconds / 1e12 if seconds else None,
        "achieved_gbps": cost.total_bytes / seconds / 1e9 if seconds else None,
        "compute_ms": None, "memory_ms": None, "floor_ms": None, "bound": None, "gap": None,
    }
    if peaks:
        flops, bandwidth = peaks["matmul_tflops"] * 1e12, peaks["copy_gbps"] * 1e9
        compute_ms, memory_ms = 1e3 * cost.total_flop / flops, 1e3 * cost.total_bytes / bandwidth
        floor = 1e3 * cost.floor_s(flops, bandwidth)
        row.update(compute_ms=compute_ms, memory_ms=memory_ms, floor_ms=floor,
                   bound="compute" if compute_ms >= memory_ms else "memory",
                   gap=time_ms / floor if floor and time_ms is not None else None)
    return row


def _rate(value: float | None) -> str:
    """A rate with three significant digits and no exponent (``0.0925``, ``41.3``, ``796000``); ``-`` for None."""
    if value is None:
        return "-"
    if value >= 100 or value == 0:
        return f"{value:,.0f}"
    digits = max(0, 2 - int(np.floor(np.log10(abs(value)))))
    return f"{value:.{digits}f}"


def print_profile(report: dict, console, name_width: int = 90) -> None:
    """Peaks, the per-stage roofline table and the top-kernel table."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    env, work, peaks = report["environment"], report["workload"], report["peaks"]
    description = work.get("description") or (
        f"{work['views']} views, prompt {work['prompt_tokens']} (padded to {work['padded_prompt_tokens']}), "
        f"chunk {work['chunk']}, {work['steps']} steps")
    console.print(Text(f"{report['model']} ({report['size']}) on {env['device']}, backend {report['backend']} "
                       f"{report['dtype']}: {description}, no CUDA graph", style="bold"))
    if peaks:
        console.print(f"peaks ({peaks['source']}): {peaks['matmul_tflops']:.0f} TFLOP/s matmul, "
                      f"{peaks['copy_gbps']:.0f} GB/s copy")
    else:
        console.print(Text("no device peaks on the CPU: no floor (give --peak-tflops and --peak-gbps for one)", style="dim"))
    stages = Table(title=f"Stages (median of {work['repeats']} un-profiled calls)", box=box.SIMPLE_HEAD,
                   title_justify="left")
    headers = ("stage", "ms", "GFLOP", "MB", "GFLOP/s", "GB/s") + (("floor ms", "bound", "x floor") if peaks else ())
    for header in headers:
        stages.add_column(header, justify="left" if header in ("stage", "bound") else "right")
    fmt = lambda value, spec: "-" if value is None else format(value, spec)  # noqa: E731
    for r in report["stages"]:
        gflops = None if r["achieved_tflops"] is None else r["achieved_tflops"] * 1e3
        row = [r["stage"], fmt(r["time_ms"], ".2f"), f"{r['flop'] / 1e9:.4g}", f"{r['bytes'] / 1e6:.4g}",
               _rate(gflops), _rate(r["achieved_gbps"])]
        if peaks:
            row += [fmt(r["floor_ms"], ".3f"), r["bound"] or "-", fmt(r["gap"], ".1f")]
        stages.add_row(*row)
    t = report["totals"]
    total = ["total", f"{t['stages_ms']:.2f}", f"{t['flop'] / 1e9:.4g}", f"{t['bytes'] / 1e6:.4g}", "", ""]
    if peaks:
        total += [fmt(t["floor_ms"], ".3f"), "", fmt(t["gap"], ".1f")]
    stages.add_row(*total, style="bold")
    console.print(stages)
    other = {k: v for k, v in report["stages_ms"].items() if k not in {s for s, _ in STAGES}}
    console.print(Text("other timings (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in other.items()), style="dim"))
    k = report["kernels"]
    kernels = Table(title=f"Top {len(k['top'])} {k['source']}", box=box.SIMPLE_HEAD, title_justify="left")
    for header in ("kernel" if report["environment"]["device_type"] == "cuda" else "op", "calls", "total ms",
                   "mean us", "share"):
        kernels.add_column(header, justify="left" if header in ("kernel", "op") else "right")
    for r in k["top"]:
        name = r["name"] if len(r["name"]) <= name_width else r["name"][: name_width - 3] + "..."
        kernels.add_row(name, str(r["count"]), f"{r['total_ms']:.3f}", f"{r['mean_us']:.1f}", f"{100 * r['share']:.1f}%")
    console.print(kernels)
    console.print(Text(f"all {k['source']} of the profiled call: {k['total_ms']:.2f} ms", style="dim"))
