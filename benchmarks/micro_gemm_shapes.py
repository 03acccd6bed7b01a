"""Micro-benchmark of Pi0's vision-tower and prefix GEMM shapes (bf16, one GPU): cuBLAS as the Triton backend calls
it (``F.linear`` with the bias, ``torch._addmm_activation`` for SigLIP's fc1 + tanh-GELU, ``addmm`` into the residual
for the prefix's o and down) against a sweep of Triton GEMM tilings, with and without split-K (fp32 partials and a
second kernel that sums them, adds the bias and applies the activation).

Each case cycles over enough distinct weight copies that the weights come from HBM, as they do when a stage runs
its layers one after another; ``calls`` calls run back to back in one CUDA graph (``graph_time_us``). Every Triton
result is compared with cuBLAS's (‖Δ‖/‖ref‖). Writes ``$OUT/micro_gemm_shapes.json`` and prints a table per shape.

    python benchmarks/micro_gemm_shapes.py [--views 1,2,3] [--only v_o,v_fc2] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from micro_decoder_kernels import graph_time_us, rel  # noqa: E402

from cortexflow.kernels.gemm import GemmTiling, gemm  # noqa: E402
from cortexflow.tools import environment_info  # noqa: E402

#: (name, N, K, epilogue) of the Pi0 GEMMs; the vision ones run on 256 rows a view, the prefix ones on 256 a view plus
#: the prompt's 48 padded rows. Epilogue: "bias", "bias_gelu" or "residual" (out += a @ Wᵀ).
SHAPES = [
    ("v_qkv", 3456, 1152, "bias"), ("v_o", 1152, 1152, "bias"), ("v_fc1", 4304, 1152, "bias_gelu"),
    ("v_fc2", 1152, 4304, "bias"),
    ("p_qkv", 2560, 2048, "none"), ("p_o", 2048, 2048, "residual"), ("p_gate_up", 32768, 2048, "none"),
    ("p_down", 2048, 16384, "residual"),
]
#: Triton tilings swept: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages).
TILES = [
    (64, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (128, 128, 64, 8, 3), (128, 128, 64, 4, 4),
    (64, 256, 64, 8, 3), (128, 256, 64, 8, 3), (64, 64, 128, 4, 3), (64, 128, 128, 4, 3), (128, 128, 128, 8, 3),
]
SPLITS = (1, 2, 4)


def tiling_of(tile, splits: int, descriptors: bool) -> GemmTiling:
    bm, bn, bk, warps, stages = tile
    return GemmTiling(bm, bn, bk, splits, 8, descriptors, warps, stages)


def triton_gemm(a, w, bias, out, part, epilogue: str, tile, splits: int, descriptors: bool) -> None:
    tiling = tiling_of(tile, splits, descriptors)
    gemm(a, w, out, tiling, bias=bias if epilogue in ("bias", "bias_gelu") else None, gelu=epilogue == "bias_gelu",
         residual=epilogue == "residual", workspace=part)


def cublas(a, w, bias, out, epilogue: str) -> torch.Tensor:
    """The call the Triton backend makes for this GEMM."""
    if epilogue == "bias":
        return F.linear(a, w, bias)
    if epilogue == "bias_gelu":
        return torch._addmm_activation(bias, a, w.t(), use_gelu=True)
    if epilogue == "residual":
        return out.addmm_(a, w.t())
    return F.linear(a, w)


def shape_case(name: str, n: int, k: int, epilogue: str, views: int, calls: int, device, generator):
    """Inputs of one shape: ``calls``-bounded distinct weight copies (at least 120 MB in all, so they come from HBM),
    bias, activations, residual, cuBLAS's result on the first copy, and ``cycle(fn)``: a call of ``fn`` on the next
    weight copy."""
    dtype = torch.bfloat16
    m = 256 * views + (48 if name.startswith("p_") else 0)
    copies = max(2, min(calls, triton.cdiv(120 << 20, n * k * 2)))
    weights = [torch.randn(n, k, device=device, dtype=dtype, generator=generator) * k ** -0.5 for _ in range(copies)]
    bias = torch.randn(n, device=device, dtype=dtype, generator=generator)
    a = torch.randn(m, k, device=device, dtype=dtype, generator=generator)
    residual = torch.randn(m, n, device=device, dtype=dtype, generator=generator)
    ref = cublas(a, weights[0], bias, residual.clone(), epilogue)
    turn = [0]

    def cycle(fn):
        def call():
            fn(weights[turn[0] % copies])
            turn[0] += 1
        return call

    return m, weights, bias, a, residual, ref, cycle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--views", default="2", help="views of the sweep")
    parser.add_argument("--only", default="v_qkv,v_o,v_fc1,v_fc2,p_qkv,p_o", help="comma-separated shapes to sweep")
    parser.add_argument("--cublas-views", default="1,2,3", help="views at which every shape is timed in cuBLAS")
    parser.add_argument("--quick", action="store_true", help="split-K 1 and 2 only, pointer loads only")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--tilings-out", default=None, metavar="FILE",
                        help="write the fastest Triton tiling of each swept shape that beats cuBLAS by 3 %% or more, as "
                             "JSON {\"N,K\": GemmTiling fields} (for with_vision_tilings.py)")
    args = parser.parse_args()
    device = torch.device("cuda")
    only = set(args.only.split(","))
    out_dir = Path(os.environ.get("OUT", "."))
    result = {"environment": environment_info(device), "cublas": [], "sweep": []}
    g = torch.Generator(device=device).manual_seed(0)
    start = time.time()
    print("cuBLAS, as the backend calls it (us):")
    for views in [int(v) for v in args.cublas_views.split(",")]:
        for name, n, k, epilogue in SHAPES:
            m, weights, bias, a, residual, ref, cycle = shape_case(name, n, k, epilogue, views, args.calls, device, g)
            out = residual.clone()
            us = graph_time_us(cycle(lambda w: cublas(a, w, bias, out, epilogue)), args.calls)
            tflops = 2 * m * n * k / us / 1e6
            result["cublas"].append({"shape": name, "views": views, "M": m, "N": n, "K": k, "us": us, "tflops": tflops})
            print(f"  {name:<10} views {views}  M {m:4d} N {n:5d} K {k:5d}  {us:8.2f} us  {tflops:5.0f} TFLOP/s", flush=True)
    (out_dir / "micro_gemm_shapes.json").write_text(json.dumps(result, indent=1))
    best: dict[str, dict] = {}
    for views in [int(v) for v in args.views.split(",")]:
        for name, n, k, epilogue in SHAPES:
            if name not in only:
                continue
            m, weights, bias, a, residual, ref, cycle = shape_case(name, n, k, epilogue, views, args.calls, device, g)
            out = residual.clone()
            rows = [{"variant": "cublas", "us": graph_time_us(cycle(lambda w: cublas(a, w, bias, out, epilogue)),
                                                              args.calls)}]
            part = torch.empty((max(SPLITS), m, n), device=device, dtype=torch.float32)
            for descriptors in ((False,) if args.quick else (False, True)):
                for tile in TILES:
                    for splits in ((1, 2) if args.quick else SPLITS):
                        label = f"{'tma' if descriptors else 'ptr'} {tile} split {splits}"
                        try:
                            mine = residual.clone()
                            triton_gemm(a, weights[0], bias, mine, part, epilogue, tile, splits, descriptors)
                            err = rel(mine, ref)
                            us = graph_time_us(cycle(lambda w: triton_gemm(a, w, bias, out, part, epilogue,
                                                                           tile, splits, descriptors)), args.calls)
                            rows.append({"variant": label, "us": us, "rel_err": err,
                                         "tiling": dataclasses.asdict(tiling_of(tile, splits, descriptors))})
                        except Exception as error:  # a tiling that does not compile or fit: recorded, not fatal
                            rows.append({"variant": label, "error": f"{type(error).__name__}: {str(error)[:200]}"})
            base = rows[0]["us"]
            timed = sorted((r for r in rows[1:] if "us" in r and r["rel_err"] < 2e-2), key=lambda r: r["us"])
            print(f"\n{name} views {views}: M {m} N {n} K {k} ({epilogue}); cuBLAS {base:.2f} us; "
                  f"{time.time() - start:.0f} s", flush=True)
            for r in timed[:5]:
                print(f"  {r['variant']:<40} {r['us']:8.2f} us  {base / r['us']:5.2f}x  rel {r['rel_err']:.1e}")
            bad = [r for r in rows[1:] if "error" in r or r.get("rel_err", 0) >= 2e-2]
            if bad:
                print(f"  {len(bad)} variants failed or differ, e.g. {bad[0]}")
            if timed and timed[0]["us"] < 0.97 * base:
                best[f"{n},{k}"] = timed[0]["tiling"]
            result["sweep"].append({"shape": name, "views": views, "M": m, "N": n, "K": k, "epilogue": epilogue,
                                    "cublas_us": base, "rows": rows})
            (out_dir / "micro_gemm_shapes.json").write_text(json.dumps(result, indent=1))
            if args.tilings_out:
                Path(args.tilings_out).write_text(json.dumps(best, indent=1))


if __name__ == "__main__":
    main()
