"""RT-1 step latency: one ``predict`` call (new frame -> tokenizer -> history -> transformer -> action dict).

Real-size RT-1 (FiLM-EfficientNet-B3, 8 layers, 6-frame window), random non-zero weights with calibrated
batch-norm statistics (``cortexflow.random_rt1``), random 256 x 320 uint8 frames and a random 512-D
instruction embedding. Variants: eager PyTorch ops and the whole step as one CUDA graph, in fp32 and
bf16, batch 1 and ``--batch``. Each: warm-up steps (the history fills), then the median (p10/p90) of
``--iters`` whole calls timed with CUDA events, plus the graph replay alone; each variant's tokens and
logits over one episode are compared with fp32 eager's. Writes ``$OUT/bench_rt1.json`` (or ``--json
PATH``) and prints a table last.

    python benchmarks/bench_rt1.py            # GPU: real size
    python benchmarks/bench_rt1.py --tiny     # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from cortexflow.models.rt1 import RT1Config, RT1Model
from cortexflow.random_rt1 import random_rt1_weights, tiny_rt1_config
from cortexflow.history_engine import RT1Engine


def _percentiles(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {"median_ms": statistics.median(ordered), "p10_ms": ordered[len(ordered) // 10],
            "p90_ms": ordered[(len(ordered) * 9) // 10]}


def _time(fn, iters: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def run_variant(model: RT1Model, weights, device, dtype, graphs: bool, batch: int, frames, context, iters: int,
                warmup: int) -> dict:
    engine = RT1Engine(model, weights, device=device, dtype=dtype, use_cuda_graphs=graphs)
    images = [frames[i % len(frames)] for i in range(batch)]
    contexts = np.repeat(context[None], batch, axis=0)
    step = (lambda: engine.predict(images[0], context)) if batch == 1 else (
        lambda: engine.predict_batch(images, contexts))
    for _ in range(warmup):
        step()
    calls = _time(step, iters, device)
    result = {"batch": batch, "dtype": str(dtype).removeprefix("torch."), "cuda_graph": engine.use_cuda_graphs,
              **_percentiles(calls)}
    if engine.use_cuda_graphs:
        graph = engine._graphs[batch]
        result["graph_replay"] = _percentiles(_time(graph.replay, iters, device))
    engine.reset()
    tokens, logits = [], []
    for frame in frames:
        engine.predict(frame, context)
        tokens.append(engine.last_tokens[0].copy())
        logits.append(engine.buffers(1)["logits"][0].float().cpu().numpy())
    result["episode_tokens"] = np.stack(tokens).tolist()
    result["episode_logits"] = np.stack(logits)
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny config on CPU (smoke test)")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    config = tiny_rt1_config() if args.tiny else RT1Config()
    iters = min(args.iters, 5) if device.type == "cpu" else args.iters
    model = RT1Model(config)
    weights = random_rt1_weights(model, seed=0, device=device)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (*config.input_size, 3), dtype=np.uint8) for _ in range(8)]
    context = rng.normal(size=config.context_dim).astype(np.float32)
    variants = [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False), (torch.bfloat16, True)]
    if device.type == "cpu":
        variants = [(torch.float32, False)]
    results = []
    for dtype, graphs in variants:
        for batch in sorted({1, args.batch}):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            results.append(run_variant(model, weights, device, dtype, graphs, batch, frames, context, iters,
                                       warmup=config.time_steps + 3))
    ref_tokens, ref_logits = np.array(results[0]["episode_tokens"]), results[0]["episode_logits"]  # fp32 eager
    for r in results:
        r["episode_token_agreement_vs_fp32"] = float(np.mean(np.array(r["episode_tokens"]) == ref_tokens))
        delta = r.pop("episode_logits") - ref_logits
        r["episode_logits_max_abs_diff_vs_fp32"] = float(np.abs(delta).max())
        r["episode_logits_rel_l2_vs_fp32"] = float(np.linalg.norm(delta) / np.linalg.norm(ref_logits))
    report = {
        "command": "python benchmarks/bench_rt1.py" + (" --tiny" if args.tiny else ""),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "config": {"time_steps": config.time_steps, "sequence_length": config.sequence_length,
                   "image_size": config.image_size, "input_size": list(config.input_size)},
        "iters": iters,
        "results": results,
    }
    out = args.json or Path(os.environ.get("OUT", ".")) / "bench_rt1.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"{'dtype':9} {'graph':5} {'batch':>5} {'call ms':>9} {'p10':>7} {'p90':>7} {'replay ms':>9} {'tok=fp32':>8} "
          f"{'logit rel':>9}")
    for r in results:
        replay = r.get("graph_replay", {}).get("median_ms", float("nan"))
        print(f"{r['dtype']:9} {str(r['cuda_graph']):5} {r['batch']:>5} {r['median_ms']:9.3f} {r['p10_ms']:7.3f} "
              f"{r['p90_ms']:7.3f} {replay:9.3f} {r['episode_token_agreement_vs_fp32']:8.3f} "
              f"{r['episode_logits_rel_l2_vs_fp32']:9.2e}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
