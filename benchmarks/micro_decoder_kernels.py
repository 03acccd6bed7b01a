"""Micro-benchmark of the denoising step's attention on one GPU (real Pi0 shapes, bf16).

Attention over the cached prefix: split-KV counts (1 = one program per row block) vs the default
choice, the fused (last-arriver) combine and torch's ``scaled_dot_product_attention`` (K/V expanded to
the query heads, boolean mask); the prefix and vision shapes for comparison. (The folded-norm and split-K
GEMM kernels this script also timed were deleted after measuring no gain: benchmarks/NOTES.md.)

Each variant is captured 50 times in one CUDA graph and replayed (no launch overhead, as in ``predict``);
the time per call is the median over 20 replays / 50. Writes ``$OUT/micro_decoder_kernels.json``.

    python benchmarks/micro_decoder_kernels.py [TEXT]   # TEXT: only the shapes whose label contains it
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cortexflow.kernels.attention import attention, attention_reference  # noqa: E402

CALLS = 50


def graph_time_us(fn, calls: int = CALLS) -> float:
    """Median GPU time of one ``fn()`` when ``calls`` calls (50) run back to back inside a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def rel(out, ref) -> float:
    out, ref = out.float(), ref.float()
    return ((out - ref).norm() / ref.norm()).item()


def attention_cases(rows: list, only: str | None = None) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = {
        "decoder (51 q x 8 heads, 611 keys, 1 kv head, D 256)": (1, 51, 8, 611, 1, 256, True),
        "prefix (560 x 8 heads, 1 kv head, D 256)": (1, 560, 8, 560, 1, 256, True),
        "vision (2 images, 256 x 16 heads, D 72)": (2, 256, 16, 256, 16, 72, False),
        "openvla decode (1 q x 32 heads, 290 keys, 32 kv heads, D 128)": (1, 1, 32, 290, 32, 128, True),
    }
    for label, (b, lq, hq, lk, hkv, d, masked) in shapes.items():
        if only and only not in label:
            continue
        q = torch.randn(b, lq, hq, d, device="cuda", generator=g).bfloat16()
        k = torch.randn(b, lk, hkv, d, device="cuda", generator=g).bfloat16()
        v = torch.randn(b, lk, hkv, d, device="cuda", generator=g).bfloat16()
        mask = (torch.rand(b, lq, lk, device="cuda", generator=g) > 0.2) if masked else None
        scale = d**-0.5
        ref = attention_reference(q, k, v, mask, scale)
        variants = {"default": lambda: attention(q, k, v, mask, scale, fused_combine=False),
                    "default, fused combine": lambda: attention(q, k, v, mask, scale, fused_combine=True)}
        for splits in (1, 2, 3, 5, 10, 20):
            variants[f"splits={splits}"] = (lambda s=splits: attention(q, k, v, mask, scale, num_splits=s))
        if label.startswith("openvla"):
            # One query row per KV head: shorter key steps allow more key ranges (a range is whole steps).
            # In OpenVLA's decode the layer's GEMVs stream ~400 MB between two attention calls, so K/V come
            # from HBM: "cold" variants cycle through 16 copies of K/V (76 MB, past the 50 MB L2).
            copies = [(k.clone(), v.clone()) for _ in range(16)]
            turn = [0]

            def cold(**kw):
                turn[0] = (turn[0] + 1) % len(copies)
                kc, vc = copies[turn[0]]
                return attention(q, kc, vc, mask, scale, **kw)

            variants["cold default"] = cold
            for bn in (16, 32, 64):
                for splits in (5, 10, 20):
                    for warps in (1, 2, 4):
                        variants[f"bn={bn} splits={splits} warps={warps}"] = (
                            lambda bn=bn, s=splits, w=warps: attention(
                                q, k, v, mask, scale, num_splits=s, block_n=bn, num_warps=w))
                        variants[f"cold bn={bn} splits={splits} warps={warps}"] = (
                            lambda bn=bn, s=splits, w=warps: cold(num_splits=s, block_n=bn, num_warps=w))
        if label.startswith(("decoder", "openvla")) and not only:
            # The tuning sweep: row tile x key ranges x warps x rows per combine program.
            for bm in (16, 32, 64):
                for splits in (None, 10, 20):
                    for warps in (4, 8):
                        for cbm in (4, 16, 64):
                            variants[f"bm={bm} splits={splits or 'auto'} warps={warps} cbm={cbm}"] = (
                                lambda bm=bm, s=splits, w=warps, c=cbm: attention(
                                    q, k, v, mask, scale, num_splits=s, fused_combine=False, block_m=bm,
                                    num_warps=w, combine_block_m=c))
        ke, ve = k.repeat_interleave(hq // hkv, 2).transpose(1, 2), v.repeat_interleave(hq // hkv, 2).transpose(1, 2)
        qt = q.transpose(1, 2)
        sdpa_mask = None if mask is None else mask[:, None]
        variants["torch sdpa"] = lambda: F.scaled_dot_product_attention(qt, ke, ve, attn_mask=sdpa_mask, scale=scale)
        for name, fn in variants.items():
            out = fn()
            out = out.transpose(1, 2) if name == "torch sdpa" else out
            rows.append({"kernel": "attention", "shape": label, "variant": name,
                         "us": graph_time_us(fn), "rel_err": rel(out, ref)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("only", nargs="?", metavar="TEXT",
                        help="time only the shapes whose label contains TEXT (decoder, prefix, vision, openvla)")
    rows: list = []
    attention_cases(rows, parser.parse_args().only)
    out = Path(os.environ.get("OUT", "."))
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": __import__("triton").__version__, "calls_per_graph": CALLS, "rows": rows}
    (out / "micro_decoder_kernels.json").write_text(json.dumps(result, indent=2))
    print(f"{'kernel':12} {'shape':52} {'variant':36} {'us':>8} {'rel err':>9}")
    for r in rows:
        err = "-" if r["rel_err"] is None else f"{r['rel_err']:.2e}"
        print(f"{r['kernel']:12} {r['shape'][:52]:52} {r['variant']:36} {r['us']:8.2f} {err:>9}")


if __name__ == "__main__":
    main()
