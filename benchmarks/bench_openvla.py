"""OpenVLA-7B latency and memory: the PyTorch backend without CUDA graphs (the reference's behaviour) and the
fast paths (CUDA graphs; Triton kernels + CUDA graphs), side by side in one run.

Real-size OpenVLA-7B config, random non-zero bf16 weights drawn on the GPU (no checkpoint files), one
224 x 224 uint8 image, a 26-id prompt, 7 greedy action tokens, un-normalised with example statistics.
Each variant: warm-up calls, then the median (and p10/p90) of ``--iters`` whole ``predict`` calls timed
with CUDA events (input copies, vision, prefill, 6 cached decode steps, copy back, de-tokenisation);
peak GPU memory over the variant (weights included). Writes JSON to ``$OUT/bench_openvla.json`` (or
``--json PATH``) and prints a short table last.

    python benchmarks/bench_openvla.py                 # H100: real size, bf16, 100 iterations
    python benchmarks/bench_openvla.py --tiny          # CPU smoke test (tiny config, fp32, PyTorch only)
    python benchmarks/bench_openvla.py --triton-only --triton-options no_fold=fold_token_norms=0
        # A/B: the default Triton path and one more with those TritonOptions (same weights drawn
        # again for every variant: a Triton engine re-lays its weights out in place)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cortexflow.backends.triton_options import TritonOptions
from cortexflow.errors import ConfigError
from cortexflow.models.openvla import OpenVLAConfig, OpenVLAModel
from cortexflow.processing.action_tokens import ActionStats
from cortexflow.random_token_vla import example_norm_stats, random_openvla_weights, tiny_openvla_config
from cortexflow.decoding_engine import TokenVLAEngine

PROMPT_IDS = 26


def _variants(device: torch.device, triton_only: bool,
              triton_options: list[str]) -> list[tuple[str, str, bool, TritonOptions | None]]:
    """(name, backend, CUDA graphs, Triton options) to run on ``device`` (the options are checked everywhere)."""
    extra = []
    for spec in triton_options:
        name, _, settings = spec.partition("=")
        if not name or not settings:
            raise SystemExit(f"--triton-options wants NAME=FIELD=VALUE[,FIELD=VALUE...], got {spec!r}")
        try:
            extra.append((f"triton [{name}]", "triton", True, TritonOptions.parse(settings, f"--triton-options {name}")))
        except ConfigError as err:
            raise SystemExit(str(err)) from None
    if device.type != "cuda":
        return [("pytorch (eager)", "pytorch", False, None)]
    variants = [] if triton_only else [("pytorch (eager)", "pytorch", False, None),
                                       ("pytorch + graphs", "pytorch", True, None)]
    variants.append(("triton + graphs", "triton", True, TritonOptions()))
    variants.extend(extra)
    return variants


def _time_calls(engine: TokenVLAEngine, image, ids, iters: int, device: torch.device,
                host: dict[str, list[float]]) -> list[float]:
    """Per-call ms (CUDA events around ``predict`` on a GPU); appends the engine's host-side preprocess
    and model times of each call to ``host``."""
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            engine.predict(image, prompt_tokens=ids)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            engine.predict(image, prompt_tokens=ids)
            times.append((time.perf_counter() - t0) * 1e3)
        for key in ("preprocess", "model"):
            host.setdefault(key, []).append(engine.last_timings[key])
    return times


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny config on CPU in fp32 (smoke test)")
    parser.add_argument("--iters", type=int, default=None, help="timed calls per variant [100; tiny: 5]")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per variant before timing")
    parser.add_argument("--device", default=None, help="[cuda; tiny: cpu]")
    parser.add_argument("--json", dest="json_path", default=None, help="output path [$OUT/bench_openvla.json]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--triton-only", action="store_true", help="skip the PyTorch variants (A/B runs)")
    parser.add_argument("--triton-options", action="append", default=[], metavar="NAME=FIELD=VALUE[,FIELD=VALUE]",
                        help="one more Triton + graphs variant with these TritonOptions fields (repeatable)")
    parser.add_argument("--gc-freeze", action="store_true",
                        help="gc.collect() + gc.freeze() after each engine's warm-up: Python's collector then "
                             "skips every object alive at that point (shows whether its pauses reach the timings)")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    iters = args.iters or (5 if args.tiny else 100)
    config = tiny_openvla_config() if args.tiny else OpenVLAConfig()
    model_vocab = config.text_vocab_size
    t0 = time.perf_counter()
    weights = random_openvla_weights(config, seed=args.seed, dtype=dtype, device=device)
    draw_s = time.perf_counter() - t0
    num_parameters = sum(t.numel() for t in weights.values())
    stats = ActionStats.from_entry("bridge_orig", example_norm_stats(config.action_dim)["bridge_orig"])
    rng = np.random.default_rng(args.seed)
    image = rng.integers(0, 256, (config.image_size, config.image_size, 3), dtype=np.uint8)
    ids = [config.bos_id, *rng.integers(3, model_vocab - config.n_action_bins, PROMPT_IDS - 2).tolist()]

    rows, tokens_by_variant = [], {}
    for name, backend, graphs, options in _variants(device, args.triton_only, args.triton_options):
        if weights is None:  # a Triton engine fused / folded the last draw in place: draw the same values again
            weights = random_openvla_weights(config, seed=args.seed, dtype=dtype, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        if backend == "triton":
            from cortexflow.backends.triton_backend import TritonBackend

            backend = TritonBackend.configured(options)
        engine = TokenVLAEngine(OpenVLAModel(config), weights, backend=backend, device=device, dtype=dtype,
                                unnormalize=stats.unnormalize, use_cuda_graphs=graphs)
        if options is not None:
            weights = None
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            engine.predict(image, prompt_tokens=ids)
        warm_s = time.perf_counter() - t0
        if args.gc_freeze:
            gc.collect()
            gc.freeze()
        host: dict[str, list[float]] = {}
        times = _time_calls(engine, image, ids, iters, device, host)
        if args.gc_freeze:
            gc.unfreeze()
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        tokens_by_variant[name] = engine.last_tokens.tolist()
        q = np.percentile(times, [10, 90])
        rows.append({
            "variant": name, "backend": engine.backend.name, "cuda_graphs": engine.use_cuda_graphs,
            "triton_options": None if options is None else options.as_dict(),
            "median_ms": statistics.median(times), "p10_ms": float(q[0]), "p90_ms": float(q[1]),
            "min_ms": min(times), "iters": iters, "warmup_s": warm_s,
            "peak_gpu_gib": None if peak is None else peak / 2**30,
            "peak_gpu_gb": None if peak is None else peak / 1e9,
            "tokens": engine.last_tokens.tolist(),
            "gc_frozen": args.gc_freeze, "times_ms": times,
            "host_preprocess_ms": host["preprocess"], "host_model_ms": host["model"],
        })
        del engine
        if device.type == "cuda":
            torch.cuda.synchronize()

    reference = rows[0]["tokens"]
    for row in rows:
        row["same_tokens_as_eager"] = row["tokens"] == reference  # the first variant's, with --triton-only
    result = {
        "benchmark": "openvla-7b" if not args.tiny else "openvla-tiny",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "config": config.to_dict(),
        "workload": {"images": 1, "image_size": config.image_size, "prompt_ids": len(ids) + 1,
                     "action_tokens": config.action_dim},
        "num_parameters_used": num_parameters,
        "weights_draw_s": draw_s,
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0],
                     "cuda": torch.version.cuda, "triton": _triton_version()},
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "results": rows,
    }
    out_path = Path(args.json_path) if args.json_path else Path(os.environ.get("OUT", "benchmarks/results")) / (
        "bench_openvla.json" if not args.tiny else "bench_openvla_tiny.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2))

    print(f"\nOpenVLA {'tiny' if args.tiny else '7B'} on {result['device']} ({result['dtype']}), 1 image, "
          f"{config.action_dim} tokens, {iters} calls per variant -> {out_path}")
    print(f"{'variant':<28}{'median ms':>11}{'p10':>9}{'p90':>9}{'peak GiB':>10}  same tokens")
    for row in rows:
        peak = "-" if row["peak_gpu_gib"] is None else f"{row['peak_gpu_gib']:.2f}"
        print(f"{row['variant']:<28}{row['median_ms']:>11.2f}{row['p10_ms']:>9.2f}{row['p90_ms']:>9.2f}{peak:>10}"
              f"  {row['same_tokens_as_eager']}")
    return result


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()
