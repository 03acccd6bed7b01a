"""Baseline timing of the PyTorch backend at real size (random non-zero weights) on one GPU.

Workloads: Pi0 and Pi0.5, 1/2/3 views, prompt 20 tokens, chunk 50, 10 denoising steps, with and
without a whole-predict CUDA graph. Reports median / p90 / min latency of whole ``predict`` calls
(input copies, forward, copy back; CUDA events and host clock), a per-stage breakdown from an
un-graphed call, peak GPU memory, and the bf16-vs-fp32 error of the final actions for Pi0 2 views.

Writes ``$OUT/pytorch_baseline.json`` (or ``--out``) and prints a short table last.

    python benchmarks/bench_pytorch_baseline.py --iters 100
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cortexflow import InferenceConfig, VLAInferenceEngine  # noqa: E402
from cortexflow.checkpoints.pi0_layout import to_checkpoint_keys  # noqa: E402
from cortexflow.config import ModelConfig  # noqa: E402
from cortexflow.models.pi0 import model_class  # noqa: E402
from cortexflow.random_checkpoint import tiny_model_config  # noqa: E402

PROMPT_LEN = 20
CHUNK = 50
STEPS = 10


def random_real_size_weights(config: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int) -> dict:
    """Canonical weights of the full-size model drawn on the GPU: N(0, 1/fan_in) matrices, small non-zero vectors."""
    generator = torch.Generator(device=device).manual_seed(seed)
    weights = {}
    for name, shape in model_class(config.model_type)(config).get_weight_shapes().items():
        tensor = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        if len(shape) >= 2 and name not in ("vision.pos", "llm.embed"):
            tensor /= float(np.prod(shape[1:])) ** 0.5
        else:
            tensor = tensor * 0.02 + 0.01
        weights[name] = tensor.to(dtype)
    return weights


def make_engine(state_dict, config, views, graphs, dtype, device):
    model = model_class(config.model_type)(config)
    inference = InferenceConfig(num_views=views, device=str(device), dtype=dtype, use_cuda_graphs=graphs)
    return VLAInferenceEngine(state_dict, inference_config=inference, model=model)


def observation(views: int, rng: np.random.Generator, config: ModelConfig):
    action_dim = config.action_dim
    images = rng.integers(0, 256, size=(views, 224, 224, 3), dtype=np.uint8)
    tokens = rng.integers(3, config.vocab_size, size=PROMPT_LEN).tolist()
    tokens[0] = 2
    state = rng.standard_normal(action_dim).astype(np.float32)
    noise = rng.standard_normal((config.chunk_size, action_dim)).astype(np.float32)
    return images, tokens, state, noise


def time_engine(engine, views, iters, warmup, rng):
    images, tokens, state, noise = observation(views, rng, engine.config)
    cuda = engine.device.type == "cuda"
    state_arg = state if "state" in engine.buffers(1) else None
    call = lambda: engine.predict(images, state=state_arg, prompt_tokens=tokens, noise=noise)  # noqa: E731
    for _ in range(warmup):
        call()
    event_ms, host_ms = [], []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
        t0 = time.perf_counter()
        call()
        host_ms.append((time.perf_counter() - t0) * 1e3)
        if cuda:
            end.record()
            end.synchronize()
            event_ms.append(start.elapsed_time(end))
    event_ms = sorted(event_ms or host_ms)
    event_ms.sort()
    return {
        "median_ms": statistics.median(event_ms),
        "p90_ms": event_ms[int(0.9 * (len(event_ms) - 1))],
        "min_ms": event_ms[0],
        "host_median_ms": statistics.median(host_ms),
        "iters": iters,
        "stages_ms": engine.last_timings if not engine.use_cuda_graphs else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--models", default="pi0,pi05")
    parser.add_argument("--views", default="1,2,3")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU: a smoke test of this script")
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    cuda = device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False
    rng = np.random.default_rng(0)
    results = {
        "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
        "workload": {"prompt_tokens": PROMPT_LEN, "chunk": CHUNK, "steps": STEPS, "dtype": "bfloat16"},
        "runs": [],
    }
    for model_name in args.models.split(","):
        if args.tiny:
            config = tiny_model_config(model_name, chunk_size=CHUNK, num_diffusion_steps=STEPS)
        else:
            config = ModelConfig.for_model(model_name, chunk_size=CHUNK, num_diffusion_steps=STEPS)
        dtype = torch.bfloat16 if cuda else torch.float32
        memory = GpuMemory(cuda)
        weights = random_real_size_weights(config, device, dtype, seed=1)
        state_dict = to_checkpoint_keys(weights, config, "openpi")
        weight_bytes = memory.allocated()
        for views in (int(v) for v in args.views.split(",")):
            for graphs in (True, False):
                memory.reset()
                engine = make_engine(state_dict, config, views, graphs, dtype, device)
                iters = args.iters if graphs else max(20, args.iters // 3)
                stats = time_engine(engine, views, iters, args.warmup, rng)
                stats.update(
                    model=model_name, views=views, cuda_graphs=graphs and cuda,
                    peak_gpu_gib=memory.peak() / 2**30,
                    weights_gib=weight_bytes / 2**30,
                    prefix_tokens=views * 256 + config.max_token_len,
                )
                results["runs"].append(stats)
                print(f"{model_name} views={views} graphs={graphs}: median {stats['median_ms']:.2f} ms "
                      f"peak {stats['peak_gpu_gib']:.2f} GiB", flush=True)
                del engine
                memory.reset()
        if model_name == "pi0" and cuda:
            results["accuracy_pi0_2views"] = bf16_vs_fp32(state_dict, config, rng, device)
        del weights, state_dict
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pytorch_baseline.json").write_text(json.dumps(results, indent=2))
    print_table(results)


class GpuMemory:
    """Peak/current allocated GPU bytes (zeros on CPU)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.reset()

    def reset(self):
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def allocated(self) -> int:
        return torch.cuda.memory_allocated() if self.cuda else 0

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated() if self.cuda else 0


def bf16_vs_fp32(state_dict, config, rng, device):
    """Final actions of the bf16 engine vs an fp32 engine on the same (bf16-representable) weights."""
    images, tokens, state, noise = observation(2, rng, config)
    outputs = {}
    for dtype in (torch.bfloat16, torch.float32):
        engine = make_engine(state_dict, config, 2, dtype == torch.bfloat16, dtype, device)
        outputs[str(dtype)] = engine.predict(images, state=state, prompt_tokens=tokens, noise=noise)
        del engine
        torch.cuda.empty_cache()
    ref, fast = outputs["torch.float32"], outputs["torch.bfloat16"]
    delta = fast - ref
    return {
        "max_abs": float(np.abs(delta).max()),
        "rel_l2": float(np.linalg.norm(delta) / np.linalg.norm(ref)),
        "ref_norm": float(np.linalg.norm(ref)),
    }


def print_table(results):
    print(f"\n{results['device']}  torch {results['torch']}  (prompt {PROMPT_LEN}, chunk {CHUNK}, {STEPS} steps, bf16)")
    print(f"{'model':6} {'views':>5} {'graphs':>6} {'median':>9} {'p90':>9} {'min':>9} {'peak GiB':>9}")
    for r in results["runs"]:
        print(f"{r['model']:6} {r['views']:>5} {str(r['cuda_graphs']):>6} {r['median_ms']:>9.2f} "
              f"{r['p90_ms']:>9.2f} {r['min_ms']:>9.2f} {r['peak_gpu_gib']:>9.2f}")
    for r in results["runs"]:
        if r["stages_ms"]:
            stages = ", ".join(f"{k} {v:.1f}" for k, v in r["stages_ms"].items())
            print(f"stages {r['model']} views={r['views']}: {stages}")
    if "accuracy_pi0_2views" in results:
        a = results["accuracy_pi0_2views"]
        print(f"pi0 2 views bf16 vs fp32 actions: rel_l2 {a['rel_l2']:.3e}  max_abs {a['max_abs']:.3e}")


if __name__ == "__main__":
    main()
