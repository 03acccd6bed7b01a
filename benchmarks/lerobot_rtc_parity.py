"""CortexFlow's real-time chunking against LeRobot 0.6.1's ``RTCProcessor`` on the same tiny random Pi0 / Pi0.5,
noise and previous chunk (CPU, fp32).

LeRobot 0.6.1 needs Python >= 3.12, so it is not installed: its RTC module (``lerobot/policies/rtc/``, torch
only) is imported from an unpacked wheel, with ``lerobot.configs`` reduced to its ``types.py`` (the enum the
module needs). Each guided Euler step of CortexFlow's engine is replaced by LeRobot's ``denoise_step`` on the
same velocity function, previous chunk (model space), ``inference_delay`` and overlap end; the chunk that comes
out is compared with CortexFlow's ``RTCConfig(jacobian="identity")`` (LeRobot's variant) and ``"vjp"`` (the
paper's).

    pip download lerobot==0.6.1 --no-deps --python-version 3.12 --only-binary=:all: -d /tmp/lr
    unzip -q /tmp/lr/lerobot-0.6.1-py3-none-any.whl -d /tmp/lr/wheel
    python3 benchmarks/lerobot_rtc_parity.py --lerobot /tmp/lr/wheel --json out.json
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import tempfile
import types
from pathlib import Path
from unittest import mock

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHUNK, STEPS, ACTION_DIM = 10, 5, 8


def import_lerobot_rtc(root: Path):
    """``lerobot.policies.rtc.modeling_rtc`` and ``configuration_rtc`` from the unpacked wheel at ``root``,
    without running the package ``__init__`` files (they import LeRobot's whole dependency set)."""
    base = root / "lerobot"
    if not (base / "policies" / "rtc" / "modeling_rtc.py").is_file():
        raise SystemExit(f"--lerobot {root}: no lerobot/policies/rtc/modeling_rtc.py there (unpack the 0.6.1 wheel)")
    for name, path in (("lerobot", base), ("lerobot.policies", base / "policies"),
                       ("lerobot.policies.rtc", base / "policies" / "rtc")):
        module = types.ModuleType(name)
        module.__path__ = [str(path)]
        sys.modules[name] = module
    spec = importlib.util.spec_from_file_location("lerobot.configs", base / "configs" / "types.py")
    configs = importlib.util.module_from_spec(spec)
    sys.modules["lerobot.configs"] = configs
    spec.loader.exec_module(configs)
    return (importlib.import_module("lerobot.policies.rtc.modeling_rtc"),
            importlib.import_module("lerobot.policies.rtc.configuration_rtc"), configs)


def make_engine(model_type: str, root: Path):
    from cortexflow import create_pi0_inference, create_pi05_inference
    from cortexflow.random_checkpoint import tiny_model_config, write_checkpoint

    config = tiny_model_config(model_type, action_dim=ACTION_DIM, chunk_size=CHUNK, num_diffusion_steps=STEPS)
    path = write_checkpoint(root / model_type, config, seed=3)
    create = create_pi05_inference if model_type == "pi05" else create_pi0_inference
    return create(path, num_views=2, device="cpu", dtype="float32", use_cuda_graphs=False, progress=False,
                  chunk_size=CHUNK, model_config={"num_vision_heads": 4, "num_diffusion_steps": STEPS})


def observation(engine, seed):
    rng = np.random.default_rng(seed)
    size = engine.config.image_size
    return dict(observation_images=rng.integers(0, 256, (2, size, size, 3), dtype=np.uint8),
                prompt_tokens=rng.integers(1, engine.config.vocab_size, 12).tolist(),
                state=rng.standard_normal(ACTION_DIM).astype(np.float32),
                noise=rng.standard_normal((CHUNK, ACTION_DIM)).astype(np.float32))


def compare(engine, lerobot, seed, executed, delay, overlap_end, beta):
    """LeRobot's guided chunk and CortexFlow's (identity and VJP) for one observation; max |Δ| and ‖Δ‖/‖ref‖."""
    import torch

    from cortexflow import RTCConfig
    from cortexflow.models import rtc as cf_rtc

    modeling, configuration, configs = lerobot
    processor = modeling.RTCProcessor(configuration.RTCConfig(
        prefix_attention_schedule=configs.RTCAttentionSchedule.LINEAR, max_guidance_weight=beta,
        execution_horizon=overlap_end))
    obs = observation(engine, seed)
    prev = engine.predict(**observation(engine, seed + 100))[executed:]
    remaining = len(prev)
    kwargs = dict(prev_actions=prev, inference_delay=delay, execution_horizon=CHUNK - overlap_end)

    def lerobot_step(self, velocity, x_t, t):
        return processor.denoise_step(x_t, self.target[:, :remaining], delay, t,
                                      lambda x: velocity(x, t).float(), execution_horizon=overlap_end).detach()

    with mock.patch.object(cf_rtc.ChunkGuidance, "velocity", lerobot_step), torch.no_grad():
        reference = engine.predict(**obs, **kwargs, rtc=RTCConfig(max_guidance_weight=beta, schedule="linear"))
    out = {}
    for jacobian in ("identity", "vjp"):
        got = engine.predict(**obs, **kwargs, rtc=RTCConfig(max_guidance_weight=beta, schedule="linear", jacobian=jacobian))
        out[jacobian] = {"max_abs": float(np.abs(got - reference).max()),
                         "rel_l2": float(np.linalg.norm(got - reference) / np.linalg.norm(reference))}
    plain = engine.predict(**obs)
    out["unguided"] = {"max_abs": float(np.abs(plain - reference).max()),
                       "rel_l2": float(np.linalg.norm(plain - reference) / np.linalg.norm(reference))}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lerobot", type=Path, required=True, help="folder of the unpacked lerobot 0.6.1 wheel")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    lerobot = import_lerobot_rtc(args.lerobot)
    import torch

    import cortexflow

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model_type in ("pi0", "pi05"):
            engine = make_engine(model_type, Path(tmp))
            for seed, executed, delay, overlap_end, beta in ((1, 2, 3, 8, 10.0), (2, 3, 2, 7, 5.0), (3, 0, 4, 10, 10.0)):
                result = compare(engine, lerobot, seed, executed, delay, overlap_end, beta)
                rows.append({"model": model_type, "seed": seed, "executed": executed, "inference_delay": delay,
                             "overlap_end": overlap_end, "max_guidance_weight": beta, **result})
                print(f"{model_type} delay {delay} overlap end {overlap_end} beta {beta}: "
                      f"identity max|Δ| {result['identity']['max_abs']:.2e}, vjp {result['vjp']['rel_l2']:.2e} rel, "
                      f"unguided {result['unguided']['rel_l2']:.2e} rel")
    summary = {"lerobot": "0.6.1 (lerobot/policies/rtc/modeling_rtc.py from the wheel)", "torch": torch.__version__,
               "cortexflow": cortexflow.__version__, "chunk": CHUNK, "steps": STEPS, "action_dim": ACTION_DIM,
               "schedule": "linear", "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
