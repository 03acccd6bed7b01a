"""What weight-only FP8 costs the final actions of Pi0 / Pi0.5, stage by stage, simulated in fp32 on the CPU.

Each stage's linear weights are replaced by their E4M3 values with one scale per output channel
(:func:`cortexflow.quantization.fp8.quantize_weight`, dequantised back to fp32), cumulatively: the action expert
(what ``precision="fp8"`` quantises), then also the Gemma prefix, then also the SigLIP tower. Everything else is
exact fp32 on the PyTorch backend, so the numbers isolate the weights' rounding (the bf16 compute of a GPU run adds
~3e-3, ``verify --size real``). Weights and inputs are ``cortexflow verify``'s (random, seed 0; 2 views, prompt 20),
so the final actions' ‖Δ‖/‖ref‖ compare with its FP8 threshold (5e-2, cosine ≥ 0.998, issue 19).

    python benchmarks/sim_fp8_weights.py --model pi0 --out benchmarks/results/<folder>/sim_fp8_weights_pi0.json

Real size needs ~14 GB of host memory (the fp32 weights, quantised in place) and a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time

import torch

from cortexflow.backends.pytorch import PyTorchBackend
from cortexflow.models.pi0 import Pi0Model, Pi05Model
from cortexflow.quantization.fp8 import quantize_weight
from cortexflow.random_checkpoint import random_weights
from cortexflow.tools import model_config
from cortexflow.tools.verify import error_stats, random_inputs

#: Stage -> the canonical names of its linear weights (2-D, output channels first).
STAGES = {
    "expert": re.compile(r"expert\.layers\.\d+\.(q|k|v|o|gate|up|down)$"),
    "prefix": re.compile(r"llm\.layers\.\d+\.(q|k|v|o|gate|up|down)$"),
    "vision": re.compile(r"vision\.layers\.\d+\.(q|k|v|o|fc1|fc2)\.weight$"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("pi0", "pi05"), default="pi0")
    parser.add_argument("--size", choices=("real", "tiny"), default="real")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    config = model_config(args.model, args.size)
    model = (Pi0Model if args.model == "pi0" else Pi05Model)(config)
    cpu = torch.device("cpu")
    started = time.perf_counter()
    weights = random_weights(config, args.seed, torch.float32, cpu)
    inputs = random_inputs(model, 2, min(20, config.max_token_len), args.seed + 1, cpu)
    backend = PyTorchBackend(cpu, torch.float32)

    def actions() -> torch.Tensor:
        buffers = {name: tensor.clone() for name, tensor in inputs.items()}
        return model.forward(backend, weights, buffers).clone()

    reference = actions()
    rows = []
    quantised: list[str] = []
    for stage, pattern in STAGES.items():
        names = [name for name in weights if pattern.search(name)]
        weight_error = []
        for name in names:
            exact = weights[name]
            rounded = quantize_weight(exact, name).dequantize()
            weight_error.append(float((rounded - exact).norm() / exact.norm()))
            weights[name] = rounded
        quantised.append(stage)
        got = actions()
        rows.append({"stages": "+".join(quantised), "weights": len(names),
                     "weight_rel_l2_mean": sum(weight_error) / len(weight_error),
                     "parameters": sum(weights[n].numel() for n in names), **error_stats(got, reference)})
        print(rows[-1], flush=True)
    report = {"tool": "benchmarks/sim_fp8_weights.py", "model": args.model, "size": args.size, "seed": args.seed,
              "views": 2, "prompt_len": min(20, config.max_token_len), "compute": "fp32, PyTorch backend, CPU",
              "torch": torch.__version__, "machine": platform.machine(), "seconds": time.perf_counter() - started,
              "rows": rows}
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
