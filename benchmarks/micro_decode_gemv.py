"""Micro-benchmark of the token VLAs' single-token decode projections on one GPU (bf16, batch 1).

For each of OpenVLA-7B's four decode projections (norm + QKV, o + residual, norm + gate/up + SiLU gate,
down + residual) and RT-2's (Gemma-2B) gate/up: the cuBLAS path (RMSNorm kernel, ``F.linear`` / ``addmm``,
gate kernel) vs ``decode_gemv`` over a sweep of rows per program, K chunk and warps (each with the shape's
default K group and prefetch, ``decode_gemv.default_tiling``; ``micro_decode_chain.py --schedules`` sweeps
those). 50 calls in one CUDA
graph (see ``micro_decoder_kernels.graph_time_us``); GB/s counts the weight bytes. Writes
``$OUT/micro_decode_gemv.json`` and prints a table (best decode_gemv per shape last).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from micro_decoder_kernels import graph_time_us, rel  # noqa: E402

from cortexflow.kernels.decode_gemv import decode_gemv, decode_gemv_reference  # noqa: E402
from cortexflow.kernels.gelu_gate import gelu_tanh_gate_fused  # noqa: E402
from cortexflow.kernels.rms_norm import rms_norm  # noqa: E402

SHAPES = {  # label: (K, N, kind, gated activation)
    "openvla qkv (norm, 4096 -> 12288)": (4096, 12288, "norm", None),
    "openvla o + residual (4096 -> 4096)": (4096, 4096, "residual", None),
    "openvla gate/up + silu (norm, 4096 -> 2 x 11008)": (4096, 2 * 11008, "norm", "silu"),
    "openvla down + residual (11008 -> 4096)": (11008, 4096, "residual", None),
    "rt2 gate/up + gelu (norm, 2048 -> 2 x 16384)": (2048, 2 * 16384, "norm", "gelu_tanh"),
}


def main() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for label, (k, n, kind, gated) in SHAPES.items():
        x = (torch.randn(1, 1, k, device="cuda", generator=g) * 2).bfloat16()
        w = (torch.randn(n, k, device="cuda", generator=g) * k**-0.5).bfloat16()
        nw = 0.1 * torch.randn(k, device="cuda", generator=g)
        n_out = n // 2 if gated else n
        res = torch.randn(1, 1, n_out, device="cuda", generator=g).bfloat16()
        kwargs = {"norm_weight": nw, "eps": 1e-5} if kind == "norm" else {"residual": res}
        kwargs["gated"] = gated
        ref = decode_gemv_reference(x, w, **kwargs)
        if kind == "norm" and gated:
            cublas = lambda: gelu_tanh_gate_fused(F.linear(rms_norm(x, nw, 1e-5), w), silu=gated == "silu")  # noqa: E731
        elif kind == "norm":
            cublas = lambda: F.linear(rms_norm(x, nw, 1e-5), w)  # noqa: E731
        else:
            cublas = lambda: torch.addmm(res.view(1, -1), x.view(1, -1), w.T)  # noqa: E731
        variants = {"cuBLAS (+ norm / gate kernels)": cublas}
        for bn in (4, 8, 16, 32):
            for bk in (256, 512, 1024):
                for warps in (4, 8):
                    variants[f"decode_gemv bn={bn} bk={bk} w={warps}"] = (
                        lambda bn=bn, bk=bk, warps=warps: decode_gemv(x, w, block_n=bn, block_k=bk, num_warps=warps,
                                                                      **kwargs))
        for name, fn in variants.items():
            try:
                out = fn()
                us = graph_time_us(fn)
            except Exception as err:  # a tiling the compiler rejects (e.g. too many registers)
                rows.append({"shape": label, "variant": name, "error": str(err)[:200]})
                continue
            rows.append({"shape": label, "variant": name, "us": us, "gb_s": w.numel() * 2 / us / 1e3,
                         "rel_err": rel(out.view(-1), ref.view(-1))})
    out_dir = Path(os.environ.get("OUT", "."))
    (out_dir / "micro_decode_gemv.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
         "triton": __import__("triton").__version__, "rows": rows}, indent=2))
    for label in SHAPES:
        timed = [r for r in rows if r["shape"] == label and "us" in r]
        base = next(r for r in timed if r["variant"].startswith("cuBLAS"))
        best = min((r for r in timed if r["variant"].startswith("decode_gemv")), key=lambda r: r["us"])
        from cortexflow.kernels.decode_gemv import default_tiling
        k, n, _, gated = SHAPES[label]
        bn, bk, warps = default_tiling(n, k, gated is not None)[:3]
        default = next((r for r in timed if r["variant"] == f"decode_gemv bn={bn} bk={bk} w={warps}"), None)
        print(f"{label}")
        for r in (base, default, best):
            if r:
                print(f"   {r['variant']:34} {r['us']:8.2f} us {r['gb_s']:7.0f} GB/s  rel err {r['rel_err']:.1e}")


if __name__ == "__main__":
    main()
