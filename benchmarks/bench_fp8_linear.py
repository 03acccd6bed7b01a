"""GPU micro-benchmark: the weight-only FP8 linear kernel against bf16 ``F.linear`` (cuBLAS) at Pi0's expert
shapes (51 rows: chunk 50 + state) and one OpenVLA decode GEMV shape, over a sweep of tilings.

Each case cycles through enough weight copies (> 2x the L2 cache) that every call streams its weight from
HBM, as in the model, and times a CUDA graph of ``--calls`` calls (median of ``--repeats`` replays). It also
checks each kernel's result against the PyTorch reference (``‖Δ‖/‖ref‖``). Writes JSON (``--json``).

    python3 benchmarks/bench_fp8_linear.py --json fp8_linear.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cortexflow.kernels.fp8_linear import Fp8Tiling, fp8_linear  # noqa: E402
from cortexflow.quantization.fp8 import quantize_weight, weight_only_linear_reference  # noqa: E402

# (name, rows M, out N, in K): Pi0's action expert (gemma_300m: width 1024, MLP 4096, 8 heads + 1 KV head of 256)
# and OpenVLA's Llama-2 7B decode step (one row).
SHAPES = [
    ("expert.qkv", 51, 2560, 1024),
    ("expert.o", 51, 1024, 2048),
    ("expert.gate_up", 51, 8192, 1024),
    ("expert.down", 51, 1024, 4096),
    ("openvla.o (decode)", 1, 4096, 4096),
]
L2_BYTES = 50 * 2 ** 20


def time_graph(fn, calls: int, repeats: int) -> float:
    """Median microseconds per call of ``fn(i)`` for i in range(calls), replayed as one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(calls):  # warm-up / compile outside the capture
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return statistics.median(times)


def tilings(m: int):
    block_ms = (16,) if m <= 16 else (64,)
    for bm, bn, bk, split, warps in itertools.product(block_ms, (32, 64, 128), (128, 256), (1, 2, 4, 8), (4,)):
        yield Fp8Tiling(block_m=bm, block_n=bn, block_k=bk, split_k=split, warps=warps)


def bench_shape(name, m, n, k, calls, repeats):
    copies = max(2, int(2 * L2_BYTES // (n * k * 2)) + 1)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
    w16 = [(torch.randn(n, k, device="cuda", generator=g) * k ** -0.5).bfloat16() for _ in range(copies)]
    w8 = [quantize_weight(w) for w in w16]
    bf16_us = time_graph(lambda i: F.linear(x, w16[i % copies]), calls, repeats)
    ref = weight_only_linear_reference(x, w8[0]).float()
    row = {"name": name, "m": m, "n": n, "k": k, "weight_copies": copies, "bf16_us": round(bf16_us, 2),
           "bf16_gbps": round(n * k * 2 / bf16_us / 1e3, 1), "fp8": []}
    for t in tilings(m):
        try:
            err = ((fp8_linear(x, w8[0], tiling=t).float() - ref).norm() / ref.norm()).item()
            us = time_graph(lambda i, t=t: fp8_linear(x, w8[i % copies], tiling=t), calls, repeats)
        except Exception as exc:  # a tiling the compiler rejects (shared memory) is reported, not fatal
            row["fp8"].append({"tiling": t.__dict__, "error": f"{type(exc).__name__}: {str(exc)[:160]}"})
            continue
        row["fp8"].append({"tiling": t.__dict__, "us": round(us, 2), "gbps": round(n * k / us / 1e3, 1),
                           "rel_err_vs_reference": err})
    timed = [r for r in row["fp8"] if "us" in r]
    if timed:
        best = min(timed, key=lambda r: r["us"])
        row["fp8_best"] = best
        row["speedup_vs_bf16"] = round(bf16_us / best["us"], 3)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=50, help="calls per CUDA graph (default 50)")
    parser.add_argument("--repeats", type=int, default=20, help="graph replays timed; the median counts (default 20)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_fp8_linear.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton
    rows = []
    for shape in SHAPES:
        row = bench_shape(*shape, args.calls, args.repeats)
        rows.append(row)
        best = row.get("fp8_best", {})
        print(f"{row['name']:<20} M={row['m']:<3} N={row['n']:<5} K={row['k']:<5} bf16 {row['bf16_us']:7.2f} us "
              f"({row['bf16_gbps']} GB/s)  fp8 best {best.get('us', float('nan')):7.2f} us ({best.get('gbps')} GB/s) "
              f"{best.get('tiling')}  err {best.get('rel_err_vs_reference', float('nan')):.1e}", flush=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "calls_per_graph": args.calls, "repeats": args.repeats, "shapes": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
