"""Micro-benchmark: a token VLA's single-token decode layers as the engine chains them, per tiling (one GPU).

OpenVLA-7B's 32 Llama-2-7B layers (``--model rt2``: RT-2's 18 Gemma-2B layers, 8 query heads on 1 KV head, 330
cached keys, GELU gate) with their own random bf16 weights (13 GB, so nothing is served from L2), each
the Triton decode step of ``backends/triton_token_decoder.py``: QKV GEMV with RoPE and the cache write,
split attention over 290 cached keys (+ combine, or the fused combine for RT-2), o GEMV + residual, gate/up GEMV +
gated activation, down GEMV
+ residual; all 32 in one CUDA graph, launched with programmatic dependent launch (PDL) unlike the
isolated kernels of a profile. Coordinate descent over the tiling of each projection (rows per program,
K chunk, warps, and with ``--schedules`` the K group and prefetch of
``decode_gemv``; the others at their current choice; ``--projections`` limits the sweep to some), then the chosen tiling
with PDL off for reference. ``--fp8``: the same with
E4M3 weights and per-row scales (weight-only FP8, 6.6 GB). Prints per-layer µs and the weight stream's TB/s;
writes ``$OUT/micro_decode_chain[_rt2][_fp8].json``.

    python benchmarks/micro_decode_chain.py [--model openvla|rt2] [--fp8] [--only-current] [--projections qkv,o]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cortexflow.kernels.attention import attention  # noqa: E402
from cortexflow.kernels import decode_qkv_rope as qkv_rope_kernel  # noqa: E402
from cortexflow.kernels.decode_gemv import WIDE_MODEL, decode_gemv, default_tiling  # noqa: E402
from cortexflow.quantization.fp8 import quantize_weight  # noqa: E402
from cortexflow.kernels.rope import inverse_frequencies  # noqa: E402



class Decoder(NamedTuple):
    layers: int
    width: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    keys: int  # cache rows filled at the timed step
    activation: str


MODELS = {
    "openvla": Decoder(32, 4096, 11008, 32, 32, 128, 290, "silu"),
    "rt2": Decoder(18, 2048, 16384, 8, 1, 256, 330, "gelu_tanh"),
}
#: Tilings per projection (pairs or rows per program, K chunk, warps); E4M3 weights take twice the K chunk.
SWEEP = {
    "qkv": [(bh, bk, w) for bh in (4, 8, 16, 32) for bk in (512, 1024) for w in (4, 8)],
    "o": [(bn, bk, w) for bn in (4, 8, 16) for bk in (512, 1024) for w in (4, 8)],
    "gate_up": [(bn, bk, w) for bn in (4, 8, 16, 32) for bk in (256, 512, 1024) for w in (4, 8)],
    "down": [(bn, bk, w) for bn in (2, 4, 8, 16) for bk in (512, 1024, 2048) for w in (4, 8)],
}
#: ``--schedules``: tilings (rows, K chunk, warps) each tried with every (K group, prefetch) of ``SCHEDULES``.
SCHEDULE_TILINGS = {
    "bf16": [(b, bk, w) for b in (8, 16, 32) for bk in (512, 1024) for w in (4, 8)],
    "fp8": [(b, bk, w) for b in (4, 8, 16) for bk in (1024, 2048) for w in (4, 8)],
}
SCHEDULES = {"bf16": [(8, False), (8, True)], "fp8": [(16, False), (16, True)]}
#: fp32 accumulators per thread past which a tiling is left out (it spills and compiles for minutes).
MAX_ACCUMULATORS_PER_THREAD = 128
#: Weight bytes a thread may hold in registers (two chunks with prefetch) before a tiling is left out.
MAX_WEIGHT_BYTES_PER_THREAD = 256


def fits(tiling: tuple, two: int, element_bytes: int) -> bool:
    """Whether a (rows, K chunk, warps, K group, prefetch) tiling keeps its accumulators and weights in registers."""
    rows, block_k, warps, group, prefetch = tiling
    per_thread = rows * block_k * two / (32 * warps)
    return (per_thread / group <= MAX_ACCUMULATORS_PER_THREAD
            and per_thread * element_bytes * (2 if prefetch else 1) <= MAX_WEIGHT_BYTES_PER_THREAD)


def sweep(proj: str, fp8: bool, schedules: bool) -> list[tuple[int, int, int, int, bool]]:
    """The tilings tried for ``proj`` with bf16 or E4M3 weights, those that would spill left out: the plain
    sweep, or (``schedules``) the K-group and prefetch schedules over their tilings."""
    two = 2 if proj in ("gate_up", "qkv") else 1  # gated rows, or RoPE's pairs of rows
    fmt = "fp8" if fp8 else "bf16"
    if schedules:
        tilings = [t + schedule for t in SCHEDULE_TILINGS[fmt] for schedule in SCHEDULES[fmt]]
    else:
        tilings = [(b, bk * (2 if fp8 else 1), w, 1, False) for b, bk, w in SWEEP[proj]]
    return [t for t in tilings if fits(t, two, 1 if fp8 else 2)]


def current_tilings(m: Decoder, fp8: bool) -> dict[str, tuple[int, int, int, int, bool]]:
    """The tilings the engine uses now for ``m``: :func:`default_tiling` and the QKV/RoPE defaults."""
    k = qkv_rope_kernel
    if fp8:
        qkv = k.DEFAULT_FP8_TILING if m.width >= WIDE_MODEL else k.NARROW_FP8_TILING
    else:
        qkv = k.DEFAULT_TILING if m.width >= WIDE_MODEL else k.NARROW_TILING
    return {"qkv": tuple(qkv),
            "o": tuple(default_tiling(m.width, m.heads * m.head_dim, False, fp8)),
            "gate_up": tuple(default_tiling(2 * m.ffn, m.width, True, fp8)),
            "down": tuple(default_tiling(m.width, m.ffn, False, fp8))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="openvla")
    parser.add_argument("--projections", default=",".join(SWEEP),
                        help="comma-separated projections to sweep, in this order (default: all four)")
    parser.add_argument("--fp8", action="store_true", help="E4M3 weights with per-row scales (weight-only FP8)")
    parser.add_argument("--only-current", action="store_true", help="time the current tilings only, no sweep")
    parser.add_argument("--schedules", action="store_true",
                        help="sweep the K-group and prefetch schedules (SCHEDULES) instead of the plain tilings")
    args = parser.parse_args()
    m = MODELS[args.model]
    projections = [p.strip() for p in args.projections.split(",") if p.strip()]
    unknown = sorted(set(projections) - set(SWEEP))
    if unknown:
        parser.error(f"--projections: unknown {unknown}; expected some of {', '.join(SWEEP)}")
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)

    def rand(*shape, scale):
        return (torch.randn(*shape, device=dev, generator=g) * scale).bfloat16()

    def weight(n, k):
        """A random projection as (weight, per-row scale or None): bf16, or E4M3 with ``--fp8``."""
        w = rand(n, k, scale=k**-0.5)
        if not args.fp8:
            return w, None
        q = quantize_weight(w)
        return q.data, q.scale

    length = m.keys + 8
    layers = [{"qkv": weight((m.heads + 2 * m.kv_heads) * m.head_dim, m.width),
               "o": weight(m.width, m.heads * m.head_dim), "gate_up": weight(2 * m.ffn, m.width),
               "down": weight(m.width, m.ffn), "k": rand(1, length, m.kv_heads, m.head_dim, scale=1.0),
               "v": rand(1, length, m.kv_heads, m.head_dim, scale=1.0)}
              for _ in range(m.layers)]
    weight_bytes = sum(layer[n][0].numel() * layer[n][0].element_size() for layer in layers
                       for n in ("qkv", "o", "gate_up", "down"))
    x0 = rand(1, 1, m.width, scale=1.0)
    position = torch.tensor([m.keys - 1], device=dev)
    mask = (torch.arange(length, device=dev) <= m.keys - 1)[None, None]
    inv_freq = inverse_frequencies(m.head_dim, 10000.0, dev)

    def chain(t: dict[str, tuple[int, int, int, int, bool]], pdl: bool) -> torch.Tensor:
        x = x0.clone()
        for layer in layers:
            (w, scale), (bh, bk, nw, kg, pf) = layer["qkv"], t["qkv"]
            q = qkv_rope_kernel.decode_qkv_rope(x, w, m.heads, m.kv_heads, position, inv_freq, layer["k"], layer["v"],
                                                position,
                                normalize=True, eps=1e-5, weight_scale=scale, block_h=bh, block_k=bk, num_warps=nw,
                                k_group=kg, prefetch=pf, pdl=pdl)
            a = attention(q, layer["k"], layer["v"], mask, 1.0 / math.sqrt(m.head_dim),
                          fused_combine=m.kv_heads < m.heads, pdl=pdl).reshape(1, 1, -1)
            (w, scale), (bn, bk, nw, kg, pf) = layer["o"], t["o"]
            decode_gemv(a, w, residual=x, out=x.view(-1), weight_scale=scale, block_n=bn, block_k=bk, num_warps=nw,
                        k_group=kg, prefetch=pf, pdl=pdl)
            (w, scale), (bn, bk, nw, kg, pf) = layer["gate_up"], t["gate_up"]
            act = decode_gemv(x, w, normalize=True, eps=1e-5, gated=m.activation, weight_scale=scale, block_n=bn,
                              block_k=bk, num_warps=nw, k_group=kg, prefetch=pf, pdl=pdl)
            (w, scale), (bn, bk, nw, kg, pf) = layer["down"], t["down"]
            decode_gemv(act, w, residual=x, out=x.view(-1), weight_scale=scale, block_n=bn, block_k=bk, num_warps=nw,
                        k_group=kg, prefetch=pf, pdl=pdl)
        return x

    def time_us(t, pdl) -> float:
        chain(t, pdl)  # compile
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            chain(t, pdl)
        for _ in range(3):
            graph.replay()
        times = []
        for _ in range(15):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / m.layers)
        del graph
        return sorted(times)[len(times) // 2]

    rows = []
    per_layer_bytes = weight_bytes / m.layers
    suffix = ("" if args.model == "openvla" else f"_{args.model}") + ("_fp8" if args.fp8 else "")
    out = Path(os.environ.get("OUT", ".")) / f"micro_decode_chain{suffix}.json"

    def save():
        """Everything measured so far to ``out`` (a run cut short keeps it)."""
        out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                   "triton": __import__("triton").__version__, "fp8": args.fp8, "model": args.model,
                                   "weight_mb_per_layer": per_layer_bytes / 1e6, "rows": rows}, indent=2))

    best = current_tilings(m, args.fp8)
    base = time_us(best, True)
    rows.append({"stage": "current", "tilings": dict(best), "us_per_layer": base})
    print(f"current tilings {best}: {base:.1f} us/layer", flush=True)
    save()
    best_us = base
    for proj in () if args.only_current else projections:
        results = [(best_us, best[proj])]
        for option in sweep(proj, args.fp8, args.schedules):
            if option == best[proj]:
                continue
            trial = dict(best, **{proj: option})
            try:
                us = time_us(trial, True)
            except Exception as err:  # a tiling the compiler rejects
                rows.append({"stage": proj, "option": option, "error": str(err)[:160]})
                continue
            results.append((us, option))
            rows.append({"stage": proj, "option": option, "us_per_layer": us})
        best_us, option = min(results)
        print(f"{proj:8} best {option} {best_us:.1f} us/layer (was {best[proj]})", flush=True)
        best[proj] = option
        save()
    final = time_us(best, True)
    no_pdl = time_us(best, False)
    rows.append({"stage": "chosen", "tilings": dict(best), "us_per_layer": final, "us_per_layer_no_pdl": no_pdl})
    save()
    print(f"weights per layer {per_layer_bytes / 1e6:.1f} MB")
    print(f"{'tiling':40} {'us/layer':>9} {'TB/s':>6}")
    for name, us in (("current (PDL)", base), ("chosen (PDL)", final), ("chosen, PDL off", no_pdl)):
        print(f"{name:40} {us:9.1f} {per_layer_bytes / us / 1e6:6.2f}")
    print(f"chosen: {best}")


if __name__ == "__main__":
    main()
