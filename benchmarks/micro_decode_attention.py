"""Micro-benchmark: where a token VLA's decode-step attention runs, timed in the engine's decode chain (one GPU).

Every decode layer of OpenVLA-7B (Llama-2: 32 query heads, 32 KV heads, D 128) or RT-2 (Gemma-2B: 8 query
heads on 1 KV head, D 256) with its own random weights (bf16, or E4M3 with per-row scales with ``--fp8``), as
``backends/triton_token_decoder.py`` chains them with PDL in one CUDA graph: QKV GEMV with RoPE and the cache
write, attention over the cache, o GEMV + residual, gate/up GEMV + gated activation, down GEMV + residual, each
kernel at its default tiling. Variants of the attention:

- ``launch``: the attention kernel after the QKV/RoPE GEMV (split key ranges, combine kernel or the fused
  combine as the engine picks), as the engine runs it by default;
- ``in_qkv/N``: the attention in the QKV/RoPE GEMV's last-arriving program of each KV head
  (:func:`~cortexflow.kernels.decode_qkv_rope.decode_qkv_rope_attention`) with ``N`` keys a step; ``in_qkv/N+p``
  with the next key tile loaded before the current one is used (``key_prefetch``, one query head per KV head).

Each variant is timed in ``--rounds`` interleaved rounds (median of 15 graph replays each); prints µs per layer and
writes ``$OUT/micro_decode_attention_{model}[_fp8].json``. Checks first that both placements give the same
attention output on one layer (max |Δ| printed).

    python benchmarks/micro_decode_attention.py [--model openvla|rt2] [--fp8] [--rounds 2]
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
from cortexflow.kernels.decode_gemv import decode_gemv  # noqa: E402
from cortexflow.kernels.decode_qkv_rope import decode_qkv_rope, decode_qkv_rope_attention  # noqa: E402
from cortexflow.kernels.rope import inverse_frequencies  # noqa: E402
from cortexflow.quantization.fp8 import quantize_weight  # noqa: E402


class Decoder(NamedTuple):
    layers: int
    width: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    keys: int  # cache rows filled at the timed step (image tokens + prompt + generated)
    activation: str


MODELS = {
    "openvla": Decoder(32, 4096, 11008, 32, 32, 128, 290, "silu"),
    "rt2": Decoder(18, 2048, 16384, 8, 1, 256, 330, "gelu_tanh"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="openvla")
    parser.add_argument("--fp8", action="store_true", help="E4M3 weights with per-row scales (weight-only FP8)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of every variant")
    parser.add_argument("--block-n", default="16,32,64,16+p,32+p",
                        help="keys a step of the in-QKV attention, comma-separated; N+p: with key_prefetch")
    args = parser.parse_args()
    m = MODELS[args.model]
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)

    def rand(*shape, scale):
        return (torch.randn(*shape, device=dev, generator=g) * scale).bfloat16()

    def weight(n, k):
        w = rand(n, k, scale=k**-0.5)
        if not args.fp8:
            return w, None
        q = quantize_weight(w)
        return q.data, q.scale

    length = m.keys + 8
    layers = [{"qkv": weight((m.heads + 2 * m.kv_heads) * m.head_dim, m.width), "o": weight(m.width, m.heads * m.head_dim),
               "gate_up": weight(2 * m.ffn, m.width), "down": weight(m.width, m.ffn),
               "k": rand(1, length, m.kv_heads, m.head_dim, scale=1.0),
               "v": rand(1, length, m.kv_heads, m.head_dim, scale=1.0)} for _ in range(m.layers)]
    x0 = rand(1, 1, m.width, scale=1.0)
    at = torch.tensor([m.keys - 1], device=dev)
    mask = (torch.arange(length, device=dev) <= m.keys - 1)[None, None]
    inv_freq = inverse_frequencies(m.head_dim, 10000.0, dev)
    scale = 1.0 / math.sqrt(m.head_dim)
    grouped = m.kv_heads < m.heads

    def attend(layer, x, variant):
        w, s = layer["qkv"]
        common = dict(normalize=True, eps=1e-5, weight_scale=s, pdl=True)
        if variant == "launch":
            q = decode_qkv_rope(x, w, m.heads, m.kv_heads, at, inv_freq, layer["k"], layer["v"], at, **common)
            return attention(q, layer["k"], layer["v"], mask, scale, fused_combine=grouped, pdl=True)
        block_n, _, prefetch = variant.split("/")[1].partition("+")
        return decode_qkv_rope_attention(x, w, m.heads, m.kv_heads, at, inv_freq, layer["k"], layer["v"], at, mask,
                                         scale, block_n=int(block_n), key_prefetch=prefetch == "p", **common)

    def chain(variant):
        x = x0.clone()
        for layer in layers:
            a = attend(layer, x, variant).reshape(1, 1, -1)
            w, s = layer["o"]
            decode_gemv(a, w, residual=x, out=x.view(-1), weight_scale=s, pdl=True)
            w, s = layer["gate_up"]
            act = decode_gemv(x, w, normalize=True, eps=1e-5, gated=m.activation, weight_scale=s, pdl=True)
            w, s = layer["down"]
            decode_gemv(act, w, residual=x, out=x.view(-1), weight_scale=s, pdl=True)
        return x

    def time_us(variant) -> float:
        chain(variant)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            chain(variant)
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

    variants = ["launch"] + [f"in_qkv/{n}" for n in args.block_n.split(",")]
    x = rand(1, 1, m.width, scale=1.0)
    reference = attend(layers[0], x, "launch").float()
    agreement = {v: (attend(layers[0], x, v).float() - reference).abs().max().item() for v in variants[1:]}
    print(f"{args.model} fp8={args.fp8}: max |in_qkv - launch| on one layer {agreement}", flush=True)
    rows = []
    out = Path(os.environ.get("OUT", ".")) / f"micro_decode_attention_{args.model}{'_fp8' if args.fp8 else ''}.json"
    for r in range(args.rounds):
        for variant in variants:
            us = time_us(variant)
            rows.append({"round": r + 1, "variant": variant, "us_per_layer": us})
            print(f"round {r + 1} {variant:12} {us:8.2f} us/layer", flush=True)
            out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                       "triton": __import__("triton").__version__, "model": args.model,
                                       "fp8": args.fp8, "decoder": m._asdict(), "max_abs_diff": agreement,
                                       "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
