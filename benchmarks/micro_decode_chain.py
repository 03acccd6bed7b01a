"""Micro-benchmark: OpenVLA-7B's single-token decode layers as the engine chains them, per tiling (one GPU).

32 Llama-2-7B layers with their own random bf16 weights (13 GB, so nothing is served from L2), each
the Triton decode step of ``backends/triton_token_decoder.py``: QKV GEMV with RoPE and the cache write,
split attention over 290 cached keys (+ combine), o GEMV + residual, gate/up GEMV + SiLU gate, down GEMV
+ residual; all 32 in one CUDA graph, launched with programmatic dependent launch (PDL) unlike the
isolated kernels of a profile. Coordinate descent over the tiling of each projection (rows per program,
K chunk, warps; the others at their current choice), then the chosen tiling with PDL off for reference.
Prints per-layer µs and the weight stream's TB/s; writes ``$OUT/micro_decode_chain.json``.

    python benchmarks/micro_decode_chain.py
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cortexflow.kernels.attention import attention  # noqa: E402
from cortexflow.kernels.decode_gemv import decode_gemv, default_tiling  # noqa: E402
from cortexflow.kernels.decode_qkv_rope import decode_qkv_rope  # noqa: E402
from cortexflow.kernels.rope import inverse_frequencies  # noqa: E402

LAYERS, WIDTH, FFN, HEADS, HEAD_DIM, KEYS = 32, 4096, 11008, 32, 128, 290
SWEEP = {
    "qkv": [(bh, bk, w) for bh in (4, 8, 16, 32) for bk in (512, 1024) for w in (4, 8)],
    "o": [(bn, bk, w) for bn in (4, 8, 16) for bk in (512, 1024) for w in (4, 8)],
    "gate_up": [(bn, bk, w) for bn in (4, 8, 16, 32) for bk in (256, 512, 1024) for w in (4, 8)],
    "down": [(bn, bk, w) for bn in (2, 4, 8, 16) for bk in (512, 1024, 2048) for w in (4, 8)],
}


def current_tilings() -> dict[str, tuple[int, int, int]]:
    qkv_rows, qkv_k, qkv_w = default_tiling(3 * WIDTH, WIDTH, False)
    return {"qkv": (qkv_rows // 2, qkv_k, qkv_w), "o": default_tiling(WIDTH, WIDTH, False),
            "gate_up": default_tiling(2 * FFN, WIDTH, True), "down": default_tiling(WIDTH, FFN, False)}


def main() -> None:
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)

    def rand(*shape, scale):
        return (torch.randn(*shape, device=dev, generator=g) * scale).bfloat16()

    layers = [{"qkv": rand(3 * WIDTH, WIDTH, scale=WIDTH**-0.5), "o": rand(WIDTH, WIDTH, scale=WIDTH**-0.5),
               "gate_up": rand(2 * FFN, WIDTH, scale=WIDTH**-0.5), "down": rand(WIDTH, FFN, scale=FFN**-0.5),
               "k": rand(1, KEYS + 8, HEADS, HEAD_DIM, scale=1.0), "v": rand(1, KEYS + 8, HEADS, HEAD_DIM, scale=1.0)}
              for _ in range(LAYERS)]
    weight_bytes = sum(t.numel() * 2 for layer in layers for n, t in layer.items() if n not in ("k", "v"))
    x0 = rand(1, 1, WIDTH, scale=1.0)
    position = torch.tensor([KEYS - 1], device=dev)
    mask = (torch.arange(KEYS + 8, device=dev) <= KEYS - 1)[None, None]
    inv_freq = inverse_frequencies(HEAD_DIM, 10000.0, dev)

    def chain(t: dict[str, tuple[int, int, int]], pdl: bool) -> torch.Tensor:
        x = x0.clone()
        for layer in layers:
            bh, bk, w = t["qkv"]
            q = decode_qkv_rope(x, layer["qkv"], HEADS, HEADS, position, inv_freq, layer["k"], layer["v"], position,
                                normalize=True, eps=1e-5, block_h=bh, block_k=bk, num_warps=w, pdl=pdl)
            a = attention(q, layer["k"], layer["v"], mask, 1.0 / math.sqrt(HEAD_DIM), pdl=pdl).reshape(1, 1, -1)
            bn, bk, w = t["o"]
            decode_gemv(a, layer["o"], residual=x, out=x.view(-1), block_n=bn, block_k=bk, num_warps=w, pdl=pdl)
            bn, bk, w = t["gate_up"]
            act = decode_gemv(x, layer["gate_up"], normalize=True, eps=1e-5, gated="silu", block_n=bn, block_k=bk,
                              num_warps=w, pdl=pdl)
            bn, bk, w = t["down"]
            decode_gemv(act, layer["down"], residual=x, out=x.view(-1), block_n=bn, block_k=bk, num_warps=w, pdl=pdl)
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
            times.append(start.elapsed_time(end) * 1e3 / LAYERS)
        del graph
        return sorted(times)[len(times) // 2]

    rows = []
    best = current_tilings()
    base = time_us(best, True)
    rows.append({"stage": "current", "tilings": dict(best), "us_per_layer": base})
    print(f"current tilings {best}: {base:.1f} us/layer", flush=True)
    for proj, options in SWEEP.items():
        results = []
        for option in options:
            trial = dict(best, **{proj: option})
            try:
                us = time_us(trial, True)
            except Exception as err:  # a tiling the compiler rejects
                rows.append({"stage": proj, "option": option, "error": str(err)[:160]})
                continue
            results.append((us, option))
            rows.append({"stage": proj, "option": option, "us_per_layer": us})
        us, option = min(results)
        print(f"{proj:8} best {option} {us:.1f} us/layer (was {best[proj]})", flush=True)
        best[proj] = option
    final = time_us(best, True)
    no_pdl = time_us(best, False)
    rows.append({"stage": "chosen", "tilings": dict(best), "us_per_layer": final, "us_per_layer_no_pdl": no_pdl})
    per_layer_bytes = weight_bytes / LAYERS
    out = Path(os.environ.get("OUT", ".")) / "micro_decode_chain.json"
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "triton": __import__("triton").__version__, "weight_mb_per_layer": per_layer_bytes / 1e6,
                               "rows": rows}, indent=2))
    print(f"weights per layer {per_layer_bytes / 1e6:.1f} MB")
    print(f"{'tiling':40} {'us/layer':>9} {'TB/s':>6}")
    for name, us in (("current (PDL)", base), ("chosen (PDL)", final), ("chosen, PDL off", no_pdl)):
        print(f"{name:40} {us:9.1f} {per_layer_bytes / us / 1e6:6.2f}")
    print(f"chosen: {best}")


if __name__ == "__main__":
    main()
