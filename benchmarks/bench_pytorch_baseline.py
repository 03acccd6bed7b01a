"""Baseline timing of the PyTorch backend at real size (random non-zero weights) on one GPU.

Workloads: Pi0 and Pi0.5, 1/2/3 views, prompt 20 tokens, chunk 50, 10 denoising steps, with and
without a whole-predict CUDA graph. Reports median / p90 / min latency of whole ``predict`` calls
(input copies, forward, copy back; CUDA events and host clock), a per-stage breakdown from an
un-graphed call, peak GPU memory, and the bf16-vs-fp32 error of the final actions for Pi0 2 views.
A thin wrapper over ``cortexflow.tools.bench`` (the grid) and ``cortexflow.tools.verify`` (the error);
``cortexflow bench`` runs any other grid.

Writes ``$OUT/pytorch_baseline.json`` (or ``--out``) and prints a short table last.

    python benchmarks/bench_pytorch_baseline.py --iters 100
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cortexflow.tools.bench import run_bench  # noqa: E402
from cortexflow.tools.verify import run_verify  # noqa: E402

PROMPT_LEN = 20
CHUNK = 50
STEPS = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--models", default="pi0,pi05")
    parser.add_argument("--views", default="1,2,3")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU: a smoke test of this script")
    args = parser.parse_args()
    device = "cpu" if args.tiny else "cuda"
    results = run_bench(
        models=args.models.split(","),
        backends=["pytorch"],
        views=[int(v) for v in args.views.split(",")],
        prompt_lens=[PROMPT_LEN],
        chunks=[CHUNK],
        steps=[STEPS],
        graphs=[True, False],
        iters=args.iters,
        iters_without_graphs=max(20, args.iters // 3),
        warmup=args.warmup,
        size="tiny" if args.tiny else "real",
        device=device,
        dtype="float32" if args.tiny else "bfloat16",
        seed=1,
        log=lambda line: print(line, flush=True),
    )
    if "pi0" in [m.strip().lower() for m in args.models.split(",")] and not args.tiny:
        report = run_verify("pi0", "pytorch", size="real", device=device, dtype="bfloat16", seed=1, views=2,
                            repeats=1, modules=["actions"])
        actions = report["modules"][0]
        results["accuracy_pi0_2views"] = {k: actions[k] for k in ("max_abs", "rel_l2", "ref_norm")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pytorch_baseline.json").write_text(json.dumps(results, indent=2))
    print_table(results)


def print_table(results):
    env = results["environment"]
    dtype = {"bfloat16": "bf16", "float32": "fp32"}.get(results["workload"]["dtype"], results["workload"]["dtype"])
    print(f"\n{env['device']}  torch {env['torch']}  (prompt {PROMPT_LEN}, chunk {CHUNK}, {STEPS} steps, {dtype})")
    print(f"{'model':6} {'views':>5} {'graphs':>6} {'median':>9} {'p90':>9} {'min':>9} {'peak GiB':>9}")
    for r in results["runs"]:
        print(f"{r['model']:6} {r['views']:>5} {str(r['cuda_graphs']):>6} {r['median_ms']:>9.2f} "
              f"{r['p90_ms']:>9.2f} {r['min_ms']:>9.2f} {r['peak_gpu_gib']:>9.2f}")
    for r in results["runs"]:
        if r["stages_ms"]:
            stages = ", ".join(f"{k} {v:.1f}" for k, v in r["stages_ms"].items())
            print(f"stages {r['model']} views={r['views']}: {stages}")
    for r in results["skipped"] + results["failed"]:
        print(f"not run {r['model']} {r['backend']}: {r['reason']}")
    if "accuracy_pi0_2views" in results:
        a = results["accuracy_pi0_2views"]
        print(f"pi0 2 views bf16 vs fp32 actions: rel_l2 {a['rel_l2']:.3e}  max_abs {a['max_abs']:.3e}")


if __name__ == "__main__":
    main()
