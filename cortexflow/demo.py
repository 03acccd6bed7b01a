"""A self-contained demo: a small deterministic random Pi0 / Pi0.5, a synthetic observation, one seeded call
(:func:`run_token_demo`: the same for the token-decoding OpenVLA / RT-2).

Everything runs through the public path a real checkpoint takes: the random weights are written as an
openpi-layout ``model.safetensors`` into a temporary folder, loaded with ``create_pi0_inference`` /
``create_pi05_inference`` (CPU, fp32) and called with ``predict``. The demo model has no tokenizer, so the
prompt is encoded as BOS followed by its UTF-8 byte values (mod the vocabulary size).

``cortexflow demo`` prints what these functions return; they are usable on their own too::

    from cortexflow.demo import build_demo_engine, demo_observation, demo_noise
    with build_demo_engine("pi0") as demo:
        obs = demo_observation(demo.engine, seed=0)
        actions = demo.engine.predict(obs.images, state=obs.state, prompt_tokens=obs.prompt_tokens,
                                      noise=demo_noise(demo.engine, seed=0))
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from cortexflow.config import ModelConfig, VLAModelType
from cortexflow.demo_checkpoint import DEMO_LAYOUT, save_demo_checkpoint
from cortexflow.engine import VLAInferenceEngine
from cortexflow.errors import ConfigError
from cortexflow.factory import (
    create_inference,
    create_openvla_inference,
    create_rt2_inference,
)
from cortexflow.processing import discretize_state
from cortexflow.random_checkpoint import tiny_model_config, write_checkpoint
from cortexflow.random_token_vla import (
    example_norm_stats,
    tiny_openvla_config,
    tiny_rt2_config,
    write_openvla_checkpoint,
    write_rt2_checkpoint,
)

DEMO_PROMPT = "pick up the red cube"
DEMO_IMAGE_HEIGHT = 480
DEMO_IMAGE_WIDTH = 640
DEMO_BOS_ID = 2  # PaliGemma's BOS id; the demo vocabulary is random, but the prompt keeps the real shape
STAGES = ("preprocess", "vision_encoder", "transformer_encoder", "transformer_decoder")


@dataclass
class DemoEngine:
    """A demo engine and where its checkpoint was written. Use as a context manager (or call ``close``)
    to remove the temporary checkpoint folder."""

    engine: VLAInferenceEngine
    config: ModelConfig
    checkpoint_dir: Path
    layout: str
    seed: int
    _tempdir: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    @property
    def temporary(self) -> bool:
        """Whether the checkpoint folder is a temporary one (removed by :meth:`close`) rather than kept."""
        return self._tempdir is not None

    @property
    def model_type(self) -> VLAModelType:
        return self.config.model_type

    @property
    def num_parameters(self) -> int:
        report = self.engine.checkpoint_report
        return report.num_parameters if report is not None else 0

    @property
    def checkpoint_bytes(self) -> int:
        report = self.engine.checkpoint_report
        return report.total_bytes if report is not None else 0

    def close(self) -> None:
        """Delete the temporary checkpoint folder (if the demo created one); the engine keeps working."""
        if self._tempdir is not None:
            self._tempdir.cleanup()
            self._tempdir = None

    def __enter__(self) -> "DemoEngine":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False


def build_demo_engine(
    model: "VLAModelType | str" = VLAModelType.PI0,
    num_views: int = 2,
    chunk_size: int | None = None,
    num_steps: int | None = None,
    seed: int = 0,
    directory: "str | Path | None" = None,
) -> DemoEngine:
    """Write a small deterministic random ``model`` checkpoint (openpi layout) and load it on CPU in fp32.

    ``chunk_size`` / ``num_steps`` override the tiny config's action chunk (5) and denoising steps (3).
    ``seed`` seeds the weights. ``directory=None`` writes into a temporary folder that
    :meth:`DemoEngine.close` removes; a ``directory`` gets the complete checkpoint folder of
    :func:`~cortexflow.demo_checkpoint.save_demo_checkpoint` (config, tokenizer and norm stats too) and is kept."""
    model_type = VLAModelType.parse(model)
    if model_type not in (VLAModelType.PI0, VLAModelType.PI05):
        raise ConfigError(f"build_demo_engine builds pi0 or pi05 models, not {model_type.value!r}; "
                          "cortexflow.demo.run_token_demo runs openvla and rt2")
    for name, value in (("num_views", num_views), ("chunk_size", chunk_size), ("num_steps", num_steps)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    overrides: dict[str, Any] = {}
    if chunk_size is not None:
        overrides["chunk_size"] = chunk_size
    if num_steps is not None:
        overrides["num_diffusion_steps"] = num_steps
    config = tiny_model_config(model_type, **overrides)
    tempdir = None
    if directory is None:
        tempdir = tempfile.TemporaryDirectory(prefix=f"cortexflow-demo-{model_type.value}-")
        directory = tempdir.name
    try:
        if tempdir is None:
            checkpoint_dir = save_demo_checkpoint(directory, config, seed=seed).directory
        else:
            checkpoint_dir = write_checkpoint(directory, config, seed=seed, layout=DEMO_LAYOUT)
        engine = create_inference(
            model_type,
            checkpoint_dir,
            num_views=num_views,
            device="cpu",
            dtype="float32",
            use_cuda_graphs=False,
            model_config=config,
            progress=False,
        )
    except BaseException:
        if tempdir is not None:
            tempdir.cleanup()
        raise
    return DemoEngine(
        engine=engine,
        config=engine.config,
        checkpoint_dir=Path(checkpoint_dir),
        layout=DEMO_LAYOUT,
        seed=seed,
        _tempdir=tempdir,
    )


@dataclass
class DemoObservation:
    """One synthetic observation: ``images (V, H, W, 3)`` uint8, ``state (D,)`` fp32, and the prompt as ids."""

    images: np.ndarray
    state: np.ndarray
    prompt: str
    prompt_text: str
    prompt_tokens: np.ndarray


def synthetic_image(view: int, seed: int = 0, height: int = DEMO_IMAGE_HEIGHT, width: int = DEMO_IMAGE_WIDTH) -> np.ndarray:
    """A deterministic HWC uint8 camera image: smooth colour gradients plus a red square whose place
    depends on ``seed`` and ``view``."""
    rng = np.random.default_rng([seed, view])
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    phase = float(rng.uniform(0, 2 * np.pi))
    red = 0.5 + 0.5 * np.sin(2 * np.pi * x + phase) * np.ones_like(y)
    green = (0.25 + 0.5 * y) * np.ones_like(x)
    blue = 0.5 + 0.5 * np.cos(np.pi * (x + y) + phase)
    image = np.stack([red, green, blue], axis=-1) * 200.0
    side = max(1, min(height, width) // 5)
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    image[top : top + side, left : left + side] = (220.0, 30.0, 30.0)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def byte_token_ids(text: str, vocab_size: int, bos_id: int = DEMO_BOS_ID) -> np.ndarray:
    """``[BOS] + UTF-8 bytes of text`` as int64 ids, each taken mod ``vocab_size`` (no tokenizer needed)."""
    return np.array([bos_id % vocab_size, *(b % vocab_size for b in text.encode("utf-8"))], dtype=np.int64)


def demo_observation(
    engine: VLAInferenceEngine,
    seed: int = 0,
    prompt: str = DEMO_PROMPT,
    height: int = DEMO_IMAGE_HEIGHT,
    width: int = DEMO_IMAGE_WIDTH,
) -> DemoObservation:
    """Synthetic images for ``engine.num_views`` cameras, a state in [-1, 1] of length ``action_dim`` and
    the prompt encoded as byte ids. For Pi0.5 (discrete state input) the prompt text is openpi's
    ``"Task: ..., State: <256-bin ids>;\\nAction: "`` so the state reaches the model as it does with a tokenizer."""
    config = engine.config
    images = np.stack([synthetic_image(v, seed, height, width) for v in range(engine.num_views)])
    rng = np.random.default_rng([seed, 10_000])
    state = np.round(rng.uniform(-0.9, 0.9, size=config.action_dim), 3).astype(np.float32)
    if config.discrete_state_input:
        bins = " ".join(str(b) for b in discretize_state(state))
        text = f"Task: {prompt}, State: {bins};\nAction: "
    else:
        text = prompt + "\n"
    tokens = byte_token_ids(text, config.vocab_size)
    if len(tokens) > config.max_token_len:
        tokens = tokens[: config.max_token_len]
    return DemoObservation(images=images, state=state, prompt=prompt, prompt_text=text, prompt_tokens=tokens)


def demo_noise(engine: VLAInferenceEngine, seed: int = 0) -> np.ndarray:
    """Seeded standard-normal starting noise ``(chunk_size, action_dim)`` fp32 for a reproducible call."""
    rng = np.random.default_rng([seed, 20_000])
    return rng.standard_normal((engine.chunk_size, engine.config.action_dim)).astype(np.float32)


@dataclass
class DemoResult:
    """Actions of the last call, per-call latencies (ms) and the stage timings of the last call."""

    actions: np.ndarray
    latencies_ms: list[float]
    timings_ms: dict[str, float]
    deterministic: bool

    @property
    def first_ms(self) -> float:
        return self.latencies_ms[0]

    @property
    def median_rest_ms(self) -> float | None:
        rest = self.latencies_ms[1:]
        return statistics.median(rest) if rest else None


def run_demo(demo: DemoEngine, observation: DemoObservation, seed: int = 0, repeat: int = 3) -> DemoResult:
    """Call ``predict`` ``repeat`` times with the same seeded noise; check every call gives the same actions."""
    if not isinstance(repeat, int) or repeat < 1:
        raise ConfigError(f"repeat must be a positive integer, got {repeat!r}")
    engine = demo.engine
    noise = demo_noise(engine, seed)
    actions, latencies, deterministic = repeated_calls(
        lambda: engine.predict(observation.images, state=observation.state, prompt_tokens=observation.prompt_tokens,
                               noise=noise),
        repeat,
    )
    return DemoResult(
        actions=actions, latencies_ms=latencies, timings_ms=dict(engine.last_timings), deterministic=deterministic
    )


def repeated_calls(call: Callable[[], np.ndarray], repeat: int) -> tuple[np.ndarray, list[float], bool]:
    """``call()`` ``repeat`` times: the last actions, each call's wall time in ms, and whether every call
    returned the same actions as the first."""
    latencies, first, actions, deterministic = [], None, None, True
    for _ in range(repeat):
        start = time.perf_counter()
        actions = call()
        latencies.append((time.perf_counter() - start) * 1e3)
        if first is None:
            first = actions
        elif not np.array_equal(first, actions):
            deterministic = False
    return actions, latencies, deterministic


@dataclass
class TokenDemoResult:
    """What the demo prints: the model, the prompt ids, the decoded tokens, actions and latencies."""

    model: str
    config: dict
    prompt_token_ids: list[int]
    tokens: list[int]
    actions: np.ndarray
    latencies_ms: list[float]
    deterministic: bool

    def to_dict(self) -> dict:
        rest = self.latencies_ms[1:]
        return {
            "model": self.model,
            "config": self.config,
            "device": "cpu",
            "dtype": "float32",
            "prompt": DEMO_PROMPT,
            "prompt_token_ids": self.prompt_token_ids,
            "prompt_encoding": "no tokenizer: [BOS] + UTF-8 bytes",
            "generated_token_ids": self.tokens,
            "actions": self.actions.tolist(),
            "latency_ms": {"first": self.latencies_ms[0], "median_rest": statistics.median(rest) if rest else None},
            "deterministic": self.deterministic,
        }


def run_token_demo(model: "VLAModelType | str", seed: int = 0, repeat: int = 3) -> TokenDemoResult:
    """``cortexflow demo --model openvla|rt2``: build the tiny random ``model`` in its real on-disk format (a sharded
    Hugging Face OpenVLA folder, or an openpi-layout PaliGemma ``model.safetensors``), load it on CPU in fp32 and
    call ``predict`` ``repeat`` times on one synthetic image; the prompt is fed as ids (BOS + UTF-8 bytes)."""
    model_type = VLAModelType.parse(model)
    with tempfile.TemporaryDirectory(prefix=f"cortexflow-demo-{model_type.value}-") as directory:
        if model_type == VLAModelType.OPENVLA:
            config = tiny_openvla_config()
            write_openvla_checkpoint(directory, config, seed=seed, dtype=torch.float32,
                                     norm_stats=example_norm_stats(config.action_dim))
            engine = create_openvla_inference(directory, device="cpu", dtype="float32",
                                              model_config={"space_token_id": config.space_token_id})
            bos, vocab = config.bos_id, config.text_vocab_size
        elif model_type == VLAModelType.RT2:
            config = tiny_rt2_config()
            write_rt2_checkpoint(directory, config, seed=seed)
            engine = create_rt2_inference(directory, device="cpu", dtype="float32", model_config=config)
            bos, vocab = 2, config.vocab_size
        else:
            raise ValueError(f"the token demo builds openvla or rt2, not {model_type.value!r}")
    ids = [bos, *(b % vocab for b in DEMO_PROMPT.encode("utf-8"))]
    image = synthetic_image(0, seed)
    actions, latencies, deterministic = repeated_calls(lambda: engine.predict(image, prompt_tokens=ids), max(1, repeat))
    return TokenDemoResult(
        model=model_type.value, config=engine.config.to_dict(), prompt_token_ids=engine.prompt_ids(None, ids),
        tokens=engine.last_tokens.tolist(), actions=actions, latencies_ms=latencies, deterministic=deterministic,
    )
