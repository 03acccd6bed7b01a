"""Micro-benchmark: OpenVLA-7B's decode GEMVs with a persistent grid of 1, 2 or 4 programs per SM (one GPU).

The question before a persistent decode layer (one launch per token or layer, phases separated by grid barriers,
as ``kernels/expert_layer.py`` does for the Pi0 expert): grid barriers need every program resident at once, so a
GEMV phase inside such a kernel runs with one or two programs per SM, where ``decode_gemv`` launches one program per
row block and keeps up to 9 resident per SM. Here each projection (norm + QKV, o + residual, norm + gate/up + SiLU
gate, down + residual; bf16 and E4M3 weights at their default tilings) runs as ``decode_gemv`` and as a persistent
kernel whose ``programs_per_sm x SMs`` programs loop over the row blocks (the same ``gemv_rows`` and epilogue).
Weights are cycled past the L2 cache; 50 calls in one CUDA graph, median of 20 replays; every variant is checked
against ``decode_gemv``'s output first. Prints µs and TB/s of weight bytes; writes ``--out`` JSON.

    python benchmarks/micro_persistent_gemv.py --out persistent_gemv.json
    TRITON_INTERPRET=1 python benchmarks/micro_persistent_gemv.py --check   # CPU: the kernel's values only
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_fp8_decode import time_graph  # noqa: E402  (a sibling script: 50 calls in one CUDA graph, median)
from cortexflow.kernels.decode_gemv import decode_gemv, default_tiling, gemv_rows, store_rows  # noqa: E402
from cortexflow.kernels.runtime import processor_count  # noqa: E402
from cortexflow.quantization.fp8 import quantize_weight  # noqa: E402

WIDTH, MLP = 4096, 11008
#: label: (N, K, prologue / epilogue, gated), OpenVLA-7B's decode projections.
SHAPES = {
    "qkv (norm, 4096 -> 12288)": (3 * WIDTH, WIDTH, "norm", False),
    "o + residual (4096 -> 4096)": (WIDTH, WIDTH, "residual", False),
    "gate_up + silu (norm, 4096 -> 2 x 11008)": (2 * MLP, WIDTH, "norm", True),
    "down + residual (11008 -> 4096)": (WIDTH, MLP, "residual", False),
}
L2_BYTES = 50 * 2 ** 20


@triton.jit
def _persistent_gemv_kernel(
    x_ptr, w_ptr, out_ptr, res_ptr, w_scale_ptr, n_out, k_dim, up_offset, stride_w, eps,
    NORM: tl.constexpr, RESIDUAL: tl.constexpr, GATED: tl.constexpr, W_SCALE: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, K_GROUP: tl.constexpr, PREFETCH: tl.constexpr,
):
    """``decode_gemv``'s work with a fixed grid: program ``p`` computes row blocks ``p, p + programs, ...``."""
    for block in range(tl.program_id(0), tl.cdiv(n_out, BLOCK_N), tl.num_programs(0)):
        rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n_out
        y, y_up = gemv_rows(x_ptr, w_ptr, x_ptr, w_scale_ptr, rows, row_ok, k_dim, up_offset, stride_w, eps,
                            NORM, False, GATED, W_SCALE, BLOCK_N, BLOCK_K, False, K_GROUP, PREFETCH)
        store_rows(y, y_up, rows, row_ok, out_ptr, res_ptr, RESIDUAL, GATED, True)


def persistent_gemv(x, weight, weight_scale, residual, gated: bool, programs: int, eps: float = 1e-5):
    """What ``decode_gemv(x, weight, normalize=residual is None, residual=residual, gated="silu" if gated,
    weight_scale=weight_scale)`` computes, on ``programs`` persistent programs at the default tiling."""
    k = x.shape[-1]
    n_out = weight.shape[0] // 2 if gated else weight.shape[0]
    t = default_tiling(weight.shape[0], k, gated, weight_scale is not None)
    out = torch.empty(n_out, dtype=x.dtype, device=x.device)
    _persistent_gemv_kernel[(min(programs, triton.cdiv(n_out, t.block_n)),)](
        x.reshape(k), weight, out, residual.reshape(n_out) if residual is not None else out,
        weight_scale if weight_scale is not None else x, n_out, k, n_out, weight.stride(0), eps,
        NORM=residual is None, RESIDUAL=residual is not None, GATED=gated, W_SCALE=weight_scale is not None,
        BLOCK_N=t.block_n, BLOCK_K=t.block_k, K_GROUP=t.k_group, PREFETCH=t.prefetch, num_warps=t.warps)
    return out


def cases(device: torch.device, shapes: dict, copies: int | None):
    """Per shape and format: (label, format, x, weight copies as (weight, scale), residual, gated)."""
    g = torch.Generator(device=device).manual_seed(0)
    for label, (n, k, kind, gated) in shapes.items():
        count = copies or max(2, int(2 * L2_BYTES // (n * k)) + 1)
        x = (torch.randn(1, 1, k, device=device, generator=g) * 2).bfloat16()
        n_out = n // 2 if gated else n
        residual = torch.randn(1, 1, n_out, device=device, generator=g).bfloat16() if kind == "residual" else None
        w16 = [(torch.randn(n, k, device=device, generator=g) * k ** -0.5).bfloat16() for _ in range(count)]
        yield label, "bf16", x, [(w, None) for w in w16], residual, gated
        yield label, "fp8", x, [(q.data, q.scale) for q in map(quantize_weight, w16)], residual, gated


def check(device: torch.device, shapes: dict, copies: int | None, programs: tuple[int, ...]) -> list[dict]:
    """The persistent kernel's outputs against ``decode_gemv``'s (same sums, same order: equal up to the last
    rounding of a few outputs)."""
    rows = []
    for label, fmt, x, weights, residual, gated in cases(device, shapes, copies):
        w, scale = weights[0]
        ref = decode_gemv(x, w, weight_scale=scale, residual=residual, normalize=residual is None, eps=1e-5,
                          gated="silu" if gated else None).float().flatten()
        for p in programs:
            out = persistent_gemv(x, w, scale, residual, gated, p).float()
            rel = ((out - ref).norm() / ref.norm()).item()
            rows.append({"shape": label, "format": fmt, "programs": p, "rel_to_decode_gemv": rel})
            if rel > 1e-2:
                raise SystemExit(f"{label} {fmt} with {p} programs: ‖Δ‖/‖decode_gemv‖ {rel:.2e}")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the JSON results here")
    parser.add_argument("--per-sm", default="1,2,4", help="programs per SM of the persistent variants (default 1,2,4)")
    parser.add_argument("--check", action="store_true",
                        help="only compare the persistent kernel's values with decode_gemv's at small sizes (runs on "
                             "the CPU under TRITON_INTERPRET=1)")
    args = parser.parse_args()
    per_sm = tuple(int(v) for v in args.per_sm.split(","))
    if args.check:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        small = {"o + residual (small)": (64, 256, "residual", False), "gate_up + silu (small)": (96, 320, "norm", True)}
        for row in check(device, small, 1, (1, 3)):
            print(row)
        return 0
    if not torch.cuda.is_available() or args.out is None:
        print("micro_persistent_gemv.py needs a CUDA GPU and --out (or --check)", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    sms = processor_count(device)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "sms": sms, "check": check(device, SHAPES, 2, tuple(p * sms for p in per_sm)), "timings": []}
    for label, fmt, x, weights, residual, gated in cases(device, SHAPES, None):
        count, (w0, _) = len(weights), weights[0]
        nbytes = w0.numel() * w0.element_size()
        variants = {"decode_gemv": lambda i: decode_gemv(x, weights[i % count][0], weight_scale=weights[i % count][1],
                                                        residual=residual, normalize=residual is None, eps=1e-5,
                                                        gated="silu" if gated else None)}
        for p in per_sm:
            variants[f"persistent, {p} a SM"] = (lambda i, p=p: persistent_gemv(
                x, weights[i % count][0], weights[i % count][1], residual, gated, p * sms))
        for name, fn in variants.items():
            us = time_graph(fn, calls=50, repeats=20)
            result["timings"].append({"shape": label, "format": fmt, "variant": name, "us": round(us, 2),
                                      "tb_s": round(nbytes / us / 1e6, 2)})
            print(f"{label:44} {fmt:5} {name:22} {us:8.2f} us {nbytes / us / 1e6:6.2f} TB/s", flush=True)
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
