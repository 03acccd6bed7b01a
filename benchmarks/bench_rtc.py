"""What real-time chunking costs per call: Pi0 / Pi0.5 ``predict`` unguided (CUDA graph on a GPU, and eager)
against a guided call (``prev_actions`` of 40 remaining actions, ``inference_delay`` 4, the paper's exp
schedule, beta 5; the paper's VJP guidance and LeRobot's identity-Jacobian variant), on the PyTorch backend
(``--backend triton``: the fused loop, identity guidance only) with random non-zero weights, 2 views, 224x224 uint8 images,
20 prompt ids, chunk 50, 10 steps. Also reports how far the guided chunk's first ``inference_delay``
actions are from the previous chunk against the unguided one (same noise).

    python benchmarks/bench_rtc.py --json rtc.json            # GPU: real size, bf16, 30 calls each
    python benchmarks/bench_rtc.py --size tiny --iters 5      # CPU smoke test (tiny model, fp32)
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from cortexflow import RTCConfig
from cortexflow.checkpoints.pi0_layout import to_checkpoint_keys
from cortexflow.random_checkpoint import random_weights
from cortexflow.tools import environment_info, model_config, resolve_device_dtype, resolve_size
from cortexflow.tools.bench import make_engine, random_observation, time_calls

PREV_LEFT = 40
DELAY = 4


def bench_model(model: str, size: str, device, dtype, iters: int, warmup: int, backend: str = "pytorch") -> dict:
    config = model_config(model, size)
    state_dict = to_checkpoint_keys(random_weights(config, 0, dtype, device), config, "openpi")
    rng = np.random.default_rng(0)
    obs = random_observation(config, 2, 20, rng)
    prev_obs = random_observation(config, 2, 20, rng)
    out = {"model": model, "size": size, "backend": backend}
    graphs = device.type == "cuda"
    engines = {"unguided_graph": make_engine(state_dict, config, 2, True, dtype, device, backend)} if graphs else {}
    engines["unguided_eager"] = make_engine(state_dict, config, 2, False, dtype, device, backend)
    eager = engines["unguided_eager"]
    state = obs.state if "state" in eager.buffers(1) else None
    prev = eager.predict(prev_obs.images, state=state, prompt_tokens=prev_obs.tokens, noise=prev_obs.noise)
    prev_left = prev[config.chunk_size - PREV_LEFT:]

    def call(engine, jacobian=None):
        kwargs = {} if jacobian is None else dict(prev_actions=prev_left, inference_delay=DELAY,
                                                  rtc=RTCConfig(jacobian=jacobian))
        return lambda: engine.predict(obs.images, state=state, prompt_tokens=obs.tokens, noise=obs.noise, **kwargs)

    for name, engine in engines.items():
        out[name] = time_calls(call(engine), device, iters, warmup)
    jacobians = ("vjp", "identity") if eager.backend.supports_guided_decoding else ("identity",)
    if "vjp" in jacobians:
        out["guided_eager"] = time_calls(call(eager, "vjp"), device, iters, warmup)
    out["guided_identity_eager"] = time_calls(call(eager, "identity"), device, iters, warmup)
    plain = call(eager)()
    out["gap_to_previous_first_delay_actions"] = {"unguided": float(np.linalg.norm(plain[:DELAY] - prev_left[:DELAY]))}
    for jacobian in jacobians:
        guided = call(eager, jacobian)()
        out["gap_to_previous_first_delay_actions"][f"guided_{jacobian}"] = float(
            np.linalg.norm(guided[:DELAY] - prev_left[:DELAY]))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="pi0,pi05")
    parser.add_argument("--size", default="auto", help="real, tiny or auto (real on a GPU)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--backend", default="pytorch", help="pytorch (both guidances) or triton (the identity Jacobian)")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    size = resolve_size(args.size, device)
    results = {"environment": environment_info(device), "dtype": str(dtype), "views": 2, "prompt_ids": 20,
               "prev_actions_left": PREV_LEFT, "inference_delay": DELAY, "backend": args.backend, "models": []}
    for model in args.models.split(","):
        results["models"].append(bench_model(model, size, device, dtype, args.iters, args.warmup, args.backend))
        torch.cuda.empty_cache() if device.type == "cuda" else None
    text = json.dumps(results, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    for entry in results["models"]:
        cells = "  ".join(f"{k} {v['median_ms']:.2f} ms" for k, v in entry.items() if isinstance(v, dict) and "median_ms" in v)
        gap = entry["gap_to_previous_first_delay_actions"]
        guided = ", ".join(f"{k.removeprefix('guided_')} {v:.3f}" for k, v in gap.items() if k != "unguided")
        print(f"{entry['model']} ({entry['size']}, {entry['backend']}): {cells}  gap {gap['unguided']:.3f} -> {guided}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
