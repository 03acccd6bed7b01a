"""GPU micro-benchmark: FP8 (E4M3) against bf16 weights in OpenVLA-7B's (or RT-2's, ``--model rt2``) decoder projections, one GPU.

Decode (one row): ``decode_gemv`` (o + residual, norm + gate/up + SiLU gate, down + residual, norm + QKV) and
``decode_qkv_rope`` (norm + QKV + RoPE + cache write, what a decode step runs) with bf16 weights and with E4M3
weights (weight-only FP8, ``weight_scale=``), each over a sweep of tilings (rows per program, K chunk, warps;
the default tiling is marked), plus bf16 cuBLAS ``F.linear`` for scale. Prefill (``--prefill-rows`` rows,
280 by default): ``fp8_linear`` (activation quantisation + ``torch._scaled_mm``) against bf16 ``F.linear``,
with the quantisation kernel and ``_scaled_mm`` also timed alone.

Each case cycles through enough weight copies (> 2x the L2 cache) that every call streams its weight from
HBM, as in the model, and times a CUDA graph of ``--calls`` calls (median of ``--repeats`` replays). Every
variant's result is checked against its PyTorch reference first (``rel_err``: ‖Δ‖/‖ref‖); a variant that
fails to compile or run is recorded with its error and the sweep goes on. GB/s counts the weight bytes
(bf16: 2 per weight; E4M3: 1 per weight + 4 per row scale). Writes JSON to ``--out``.

    python3 benchmarks/bench_fp8_decode.py --out fp8_decode.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import traceback
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cortexflow.kernels.decode_gemv import GemvTiling, decode_gemv, decode_gemv_reference, default_tiling  # noqa: E402
from cortexflow.kernels.decode_qkv_rope import (  # noqa: E402
    DEFAULT_FP8_TILING,
    DEFAULT_TILING,
    decode_qkv_rope,
    decode_qkv_rope_reference,
)
from cortexflow.kernels.fp8_gemm import fp8_linear, fp8_linear_reference, quantize_activation_rows  # noqa: E402
from cortexflow.kernels.rope import inverse_frequencies  # noqa: E402
from cortexflow.quantization.fp8 import quantize_weight  # noqa: E402

class LanguageModel(NamedTuple):
    """The decoder dimensions whose projections are timed."""

    width: int
    mlp: int
    heads: int
    kv_heads: int
    head_dim: int
    activation: str

    @property
    def qkv_rows(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim

    def decode_shapes(self) -> dict:
        """label: (N, K, prologue / epilogue, gated activation) of the four decode projections."""
        d, f, qkv = self.width, self.mlp, self.qkv_rows
        return {f"qkv (norm, {d} -> {qkv})": (qkv, d, "norm", None),
                f"o + residual ({self.heads * self.head_dim} -> {d})": (d, self.heads * self.head_dim, "residual", None),
                f"gate_up + {self.activation} (norm, {d} -> 2 x {f})": (2 * f, d, "norm", self.activation),
                f"down + residual ({f} -> {d})": (d, f, "residual", None)}

    def prefill_shapes(self) -> dict:
        d, f = self.width, self.mlp
        return {"qkv": (self.qkv_rows, d), "o": (d, self.heads * self.head_dim), "gate_up": (2 * f, d), "down": (d, f)}


#: OpenVLA-7B's Llama-2 and RT-2's (PaliGemma-3B's) Gemma-2B decoders.
MODELS = {"openvla": LanguageModel(4096, 11008, 32, 32, 128, "silu"),
          "rt2": LanguageModel(2048, 16384, 8, 1, 256, "gelu_tanh")}
L2_BYTES = 50 * 2 ** 20
#: fp32 accumulators per thread above which a decode_gemv tiling is left out of a sweep: ``decode_gemv`` holds
#: ``(BLOCK_N, BLOCK_K)`` of them (two with a gated activation), and past 128 a thread spills and the compile
#: alone takes minutes (gate/up at 16 x 4096 ran past a device call's limit twice).
MAX_ACCUMULATORS_PER_THREAD = 128
SWEEPS = {  # (rows per program, K chunk, warps) for decode_gemv; (pairs per program, K chunk, warps) for QKV/RoPE
    ("gemv", "bf16"): ((8, 16, 32), (512, 1024, 2048), (4, 8)),
    ("gemv", "fp8"): ((4, 8, 16), (1024, 2048, 4096), (4, 8)),
    ("qkv_rope", "bf16"): ((2, 4, 8), (256, 512, 1024), (4, 8)),
    ("qkv_rope", "fp8"): ((2, 4, 8), (512, 1024, 2048), (4, 8)),
}


def swept_tilings(kernel: str, fmt: str, default: GemvTiling, two: bool) -> list[GemvTiling]:
    """``default`` first, then the tilings of ``kernel`` ("gemv" or "qkv_rope") for ``fmt`` with the default's K
    group and prefetch, those whose accumulators fit a thread (``two``: two rows per output, gated or RoPE pairs)."""
    rows = 2 if two else 1
    swept = [GemvTiling(*t, default.k_group, default.prefetch) for t in itertools.product(*SWEEPS[(kernel, fmt)])]
    swept = [t for t in swept if t.block_n * t.block_k * rows / (32 * t.warps * t.k_group) <= MAX_ACCUMULATORS_PER_THREAD]
    return [default] + [t for t in swept if t != default]


def time_graph(fn, calls: int, repeats: int) -> float:
    """Median microseconds per call of ``fn(i)`` for i in range(calls), replayed as one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(3):  # compile and warm up outside the capture
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


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float().flatten(), ref.float().flatten()
    return ((out - ref).norm() / ref.norm()).item()


def measure(variant: dict, fn, check, weight_bytes: int, calls: int, repeats: int) -> dict:
    """``variant`` with ``rel_err`` (``check()``), ``us`` and ``gb_s`` of ``fn(i)``, or ``error`` if it fails."""
    try:
        variant["rel_err"] = check()
        us = time_graph(fn, calls, repeats)
    except Exception as exc:  # a tiling the compiler rejects (registers, shared memory) is reported, not fatal
        variant["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        torch.cuda.synchronize()
        return variant
    variant["us"] = round(us, 2)
    variant["gb_s"] = round(weight_bytes / us / 1e3, 1)
    return variant


def weight_copies(n: int, k: int, g: torch.Generator):
    """``(bf16 copies, E4M3 copies)`` of a random ``(n, k)`` weight, as many as make the E4M3 set > 2x L2."""
    count = max(2, int(2 * L2_BYTES // (n * k)) + 1)
    w16 = [(torch.randn(n, k, device="cuda", generator=g) * k ** -0.5).bfloat16() for _ in range(count)]
    return w16, [quantize_weight(w) for w in w16]


def decode_cases(lm: LanguageModel, calls: int, repeats: int, sweep: frozenset, rows: list, save,
                 wanted: tuple = ()) -> list[dict]:
    """Every decode shape's variants appended to ``rows`` (``save()`` after each shape, so a run cut short keeps
    what it measured); ``sweep``: the formats ("bf16", "fp8") whose tilings are swept beyond the default."""
    g = torch.Generator(device="cuda").manual_seed(0)
    for label, (n, k, kind, gated) in lm.decode_shapes().items():
        if wanted and not label.startswith(wanted):
            continue
        w16, w8 = weight_copies(n, k, g)
        count = len(w16)
        x = (torch.randn(1, 1, k, device="cuda", generator=g) * 2).bfloat16()
        n_out = n // 2 if gated else n
        residual = torch.randn(1, 1, n_out, device="cuda", generator=g).bfloat16()
        kwargs = {"gated": gated}
        kwargs.update({"norm_weight": 0.1 * torch.randn(k, device="cuda", generator=g), "eps": 1e-5}
                      if kind == "norm" else {"residual": residual})
        row = {"shape": label, "n": n, "k": k, "weight_copies": count, "variants": []}
        rows.append(row)
        print(f"decode {label}: {count} weight copies", flush=True)
        bf16_bytes, fp8_bytes = n * k * 2, n * k + 4 * n
        row["variants"].append(measure(
            {"name": "cuBLAS F.linear bf16 (projection only)"}, lambda i: F.linear(x.view(1, k), w16[i % count]),
            lambda: rel_err(F.linear(x.view(1, k), w16[0]), x.view(1, k).float() @ w16[0].float().T),
            bf16_bytes, calls, repeats))
        for fmt in ("bf16", "fp8"):
            ref = decode_gemv_reference(x, w8[0].data, weight_scale=w8[0].scale, **kwargs) if fmt == "fp8" else \
                decode_gemv_reference(x, w16[0], **kwargs)
            default = default_tiling(n, k, gated is not None, fmt == "fp8")
            tilings = swept_tilings("gemv", fmt, default, gated is not None) if fmt in sweep else [default]
            for t in tilings:
                def call(i, t=t, fmt=fmt):
                    options = {"block_n": t.block_n, "block_k": t.block_k, "num_warps": t.warps, "k_group": t.k_group,
                               "prefetch": t.prefetch}
                    if fmt == "fp8":
                        return decode_gemv(x, w8[i % count].data, weight_scale=w8[i % count].scale, **options,
                                           **kwargs)
                    return decode_gemv(x, w16[i % count], **options, **kwargs)
                variant = {"name": f"decode_gemv {fmt} {tuple(t)}", "format": fmt, **t._asdict(),
                           "default": t == default}
                row["variants"].append(measure(variant, call, lambda call=call: rel_err(call(0), ref),
                                               fp8_bytes if fmt == "fp8" else bf16_bytes, calls, repeats))
                print(f"   {variant['name']}: {variant.get('us', variant.get('error', ''))}", flush=True)
        save()
        if label.startswith("qkv"):
            rows.append(qkv_rope_case(lm, x, w16, w8, kwargs["norm_weight"], calls, repeats, sweep))
            save()
    return rows


def qkv_rope_case(lm: LanguageModel, x, w16, w8, norm_weight, calls, repeats, sweep) -> dict:
    """``decode_qkv_rope`` (norm + QKV + RoPE + cache write) with bf16 and E4M3 weights over its tilings."""
    count, (n, k) = len(w16), w16[0].shape
    max_len = 512
    caches = [torch.zeros(1, max_len, lm.kv_heads, lm.head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    position = torch.tensor([300], device="cuda")
    write_at = torch.tensor([300], device="cuda")
    inv_freq = inverse_frequencies(lm.head_dim, 10000.0, torch.device("cuda"))
    row = {"shape": f"qkv + rope + cache write (norm, {k} -> {n})", "n": n, "k": k, "weight_copies": count,
           "variants": []}
    for fmt in ("bf16", "fp8"):
        weight = (lambda i: w8[i % count].data) if fmt == "fp8" else (lambda i: w16[i % count])
        scale = (lambda i: w8[i % count].scale) if fmt == "fp8" else (lambda i: None)
        ref_q, _, _ = decode_qkv_rope_reference(x, weight(0), lm.heads, lm.kv_heads, position, inv_freq,
                                                norm_weight=norm_weight, eps=1e-5, weight_scale=scale(0))
        default = DEFAULT_FP8_TILING if fmt == "fp8" else DEFAULT_TILING
        tilings = swept_tilings("qkv_rope", fmt, default, True) if fmt in sweep else [default]
        for t in tilings:
            def call(i, t=t, weight=weight, scale=scale):
                return decode_qkv_rope(x, weight(i), lm.heads, lm.kv_heads, position, inv_freq, caches[0], caches[1], write_at,
                                       norm_weight=norm_weight, eps=1e-5, weight_scale=scale(i), block_h=t.block_n,
                                       block_k=t.block_k, num_warps=t.warps, k_group=t.k_group, prefetch=t.prefetch)
            variant = {"name": f"decode_qkv_rope {fmt} {tuple(t)}", "format": fmt, **t._asdict(),
                       "default": t == default}
            row["variants"].append(measure(variant, call, lambda call=call: rel_err(call(0), ref_q),
                                           n * k + 4 * n if fmt == "fp8" else n * k * 2, calls, repeats))
    return row


def prefill_cases(lm: LanguageModel, m: int, calls: int, repeats: int) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(1)
    rows = []
    for label, (n, k) in lm.prefill_shapes().items():
        w16, w8 = weight_copies(n, k, g)
        count = len(w16)
        x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
        qx = quantize_activation_rows(x)
        exact = x.float() @ w16[0].float().T
        row = {"shape": f"prefill {label} ({m} x {k} -> {n})", "m": m, "n": n, "k": k, "weight_copies": count,
               "variants": []}
        rows.append(row)
        print(f"{row['shape']}: {count} weight copies", flush=True)
        bf16_bytes, fp8_bytes = n * k * 2, n * k + 4 * n
        row["variants"].append(measure({"name": "F.linear bf16"}, lambda i: F.linear(x, w16[i % count]),
                                       lambda: rel_err(F.linear(x, w16[0]), exact), bf16_bytes, calls, repeats))
        ref = fp8_linear_reference(x, w8[0].data, w8[0].scale)
        row["variants"].append(measure(
            {"name": "fp8_linear (quantise x + _scaled_mm)"},
            lambda i: fp8_linear(x, w8[i % count].data, w8[i % count].scale),
            lambda: rel_err(fp8_linear(x, w8[0].data, w8[0].scale), ref), fp8_bytes, calls, repeats))
        row["variants"].append(measure(
            {"name": "_scaled_mm row-wise scales (x quantised once)"},
            lambda i: torch._scaled_mm(qx.data, w8[i % count].data.t(), scale_a=qx.scale[:, None],
                                       scale_b=w8[i % count].scale[None, :], out_dtype=torch.bfloat16),
            lambda: rel_err(torch._scaled_mm(qx.data, w8[0].data.t(), scale_a=qx.scale[:, None],
                                             scale_b=w8[0].scale[None, :], out_dtype=torch.bfloat16), ref),
            fp8_bytes, calls, repeats))
        # The same product with one scale per tensor (cuBLAS's other FP8 scaling mode): x's largest row scale and the
        # weight's largest channel scale, so the values are not what fp8_linear computes; it times the kernel cuBLAS
        # picks for tensor-wise scales (rel_err against the row-scaled product says how far it is).
        scale_x, scale_w = qx.scale.max().reshape(()), w8[0].scale.max().reshape(())
        row["variants"].append(measure(
            {"name": "_scaled_mm tensor-wise scales (timing)"},
            lambda i: torch._scaled_mm(qx.data, w8[i % count].data.t(), scale_a=scale_x, scale_b=scale_w,
                                       out_dtype=torch.bfloat16),
            lambda: rel_err(torch._scaled_mm(qx.data, w8[0].data.t(), scale_a=scale_x, scale_b=scale_w,
                                             out_dtype=torch.bfloat16), ref),
            fp8_bytes, calls, repeats))
        row["variants"].append(measure(
            {"name": "quantize_activation_rows alone"}, lambda i: quantize_activation_rows(x),
            lambda: 0.0 if torch.equal(quantize_activation_rows(x).data.view(torch.uint8),
                                       qx.data.view(torch.uint8)) else 1.0, 0, calls, repeats))
    return rows


def print_summary(rows: list[dict]) -> None:
    for row in rows:
        print(row["shape"])
        timed = [v for v in row["variants"] if "us" in v]
        shown = [v for v in timed if "format" not in v or v.get("default")]
        for fmt in ("bf16", "fp8"):
            of_format = [v for v in timed if v.get("format") == fmt]
            if of_format:
                best = min(of_format, key=lambda v: v["us"])
                shown.append({**best, "name": best["name"] + " (best)"})
        for v in shown:
            print(f"   {v['name']:48} {v['us']:9.2f} us {v['gb_s']:8.1f} GB/s  rel err {v['rel_err']:.1e}")
        failed = [v for v in row["variants"] if "error" in v]
        if failed:
            print(f"   {len(failed)} variant(s) failed, e.g. {failed[0]['name']}: {failed[0]['error'][:120]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="write the JSON results here")
    parser.add_argument("--model", choices=sorted(MODELS), default="openvla",
                        help="whose decoder projections are timed (default openvla)")
    parser.add_argument("--calls", type=int, default=50, help="calls per CUDA graph (default 50)")
    parser.add_argument("--repeats", type=int, default=20, help="graph replays timed; the median counts (default 20)")
    parser.add_argument("--prefill-rows", type=int, default=280, help="rows of the prefill GEMMs (default 280)")
    parser.add_argument("--sweep", choices=("none", "fp8", "all"), default="fp8",
                        help="formats whose decode tilings are swept beyond the default (default: fp8; bf16's were "
                             "tuned before)")
    parser.add_argument("--no-sweep", action="store_true", help="the same as --sweep none")
    parser.add_argument("--shapes", metavar="TEXT", default="",
                        help="only the decode shapes whose label starts with one of these comma-separated words "
                             "(qkv, o, gate_up, down)")
    parser.add_argument("--skip", choices=("decode", "prefill"), action="append", default=[],
                        help="leave out a part (repeatable)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_fp8_decode.py needs a CUDA GPU (FP8: compute capability 8.9 or later)", file=sys.stderr)
        return 2
    import triton

    result = {"device": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
              "torch": torch.__version__, "triton": triton.__version__, "calls_per_graph": args.calls,
              "repeats": args.repeats, "decode": [], "prefill": [], "errors": []}
    sweep = frozenset() if args.no_sweep or args.sweep == "none" else \
        frozenset({"fp8"} if args.sweep == "fp8" else {"bf16", "fp8"})
    result["sweep"] = sorted(sweep)

    def save():
        args.out.write_text(json.dumps(result, indent=1))

    wanted = tuple(w.strip() + " " for w in args.shapes.split(",") if w.strip())
    lm = MODELS[args.model]
    result["model"] = {"name": args.model, **lm._asdict()}
    parts = {"decode": lambda: decode_cases(lm, args.calls, args.repeats, sweep, result["decode"], save, wanted),
             "prefill": lambda: prefill_cases(lm, args.prefill_rows, args.calls, args.repeats)}
    for part, run in parts.items():
        if part in args.skip:
            continue
        try:
            result[part] = run()
        except Exception:  # a whole part failing (e.g. out of memory) still leaves the other part's results
            result["errors"].append({"part": part, "traceback": traceback.format_exc()[-3000:]})
        print_summary(result[part])
        args.out.write_text(json.dumps(result, indent=1))
    args.out.write_text(json.dumps(result, indent=1))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
