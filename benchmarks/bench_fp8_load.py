"""GPU memory of preparing a token VLA's weights for ``precision="fp8"``, one GPU: the weights on the host (what
``create_openvla_inference`` / ``create_rt2_inference`` do with FP8: the triton backend moves them one language-model
layer at a time, quantising each before the next) against the weights already on the GPU (every layer in bf16 first,
quantised after). Random weights at the published size; each case records the peak allocated GPU memory during
``prepare_weights``, what stays allocated after it, and its seconds. Writes JSON to ``--out``.

    python3 benchmarks/bench_fp8_load.py --model openvla --out fp8_load.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cortexflow.backends.triton_backend import TritonBackend  # noqa: E402
from cortexflow.tools import random_token_weights, token_model  # noqa: E402

GIB = 2**30


def prepare(model, weights: dict, device: torch.device) -> dict:
    """``prepare_weights`` of the FP8 triton backend on ``weights``; the peak and final allocated GiB and seconds."""
    backend = TritonBackend.configured(fp8="decoder")(device, torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    prepared = backend.prepare_weights(model, model.prepare_weights(weights))
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    on_gpu = all(t.device.type == "cuda" for t in prepared.values())
    result = dict(peak_gib=torch.cuda.max_memory_allocated(device) / GIB, before_gib=before / GIB,
                  after_gib=torch.cuda.memory_allocated(device) / GIB, seconds=round(seconds, 2), all_on_gpu=on_gpu)
    del prepared
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("openvla", "rt2"), default="openvla")
    parser.add_argument("--size", choices=("real", "tiny"), default="real")
    parser.add_argument("--out", type=Path, required=True, help="write the JSON results here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_fp8_load.py needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    model = token_model(args.model, args.size)
    drawn = random_token_weights(model, 0, torch.bfloat16, device)
    host = {name: t.to(model.weight_dtype(name, torch.bfloat16)).cpu() for name, t in drawn.items()}
    del drawn
    gc.collect()
    torch.cuda.empty_cache()
    bf16_gib = sum(t.numel() * t.element_size() for t in host.values()) / GIB
    cases = {}
    cases["host (layer by layer)"] = prepare(model, dict(host), device)
    gc.collect()
    torch.cuda.empty_cache()
    cases["on the GPU first"] = prepare(model, {k: v.to(device) for k, v in host.items()}, device)
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, model=args.model, size=args.size,
                  bf16_weights_gib=bf16_gib, cases=cases)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"{args.model} ({args.size}), bf16 weights {bf16_gib:.2f} GiB")
    for name, case in cases.items():
        print(f"  {name:24} peak {case['peak_gib']:6.2f} GiB, after {case['after_gib']:6.2f} GiB, {case['seconds']:6.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
