"""The bench workloads of the token-decoding (OpenVLA, RT-2 style) and history (RT-1) families.

:func:`cortexflow.tools.bench.run_bench` asks a model's family (:mod:`cortexflow.families`) for its workload
and runs the cases it yields; each case is timed like the flow-matching rows
(:func:`cortexflow.tools.bench.time_calls`) as whole ``predict`` calls over random non-zero weights drawn on
the device in the run's dtype (RT-2's fp32-kept tensors upcast).

* Token decoding (:class:`TokenWorkload`): one random uint8 image of the model's input size and a random
  prompt of ``prompt_len`` ids (BOS, random non-action ids, the model's closing id) through ``predict`` —
  preprocessing, vision, prefill, every greedy single-token step, de-tokenisation. Rows record ``views=1``,
  ``chunk`` = the model's action chunk (1 for OpenVLA), ``steps=None`` and ``generated_tokens``. Decoding is
  constrained to the action ids as each model's factory does by default (OpenVLA: off, RT-2: on).
* History (:class:`RT1Workload`): one random frame and instruction embedding per step of an episode
  (warm-up at least the history length); rows record ``views=1``, ``prompt=0``.

The grid's views, chunk and steps axes (and, for RT-1, the prompt length) do not apply and are ignored.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch

from cortexflow.config import VLAModelType
from cortexflow.decoding_engine import TokenVLAEngine
from cortexflow.errors import ConfigError
from cortexflow.history_engine import RT1Engine
from cortexflow.models.rt1 import RT1Config, RT1Model
from cortexflow.random_rt1 import random_rt1_weights, tiny_rt1_config
from cortexflow.tools import (
    backend_options,
    random_prompt_ids,
    random_token_image,
    random_token_weights,
    token_model,
)
from cortexflow.tools.bench import BenchGrid, Case, GpuMemory, timed_entry

#: Whether greedy decoding is restricted to the action ids, as ``create_*_inference`` defaults.
CONSTRAINED = {VLAModelType.OPENVLA: False, VLAModelType.RT2: True}


class TokenWorkload:
    """One token-decoding policy of the bench: its model, its random weights (on ``device`` in ``dtype``),
    the rows it contributes, and the note saying which grid axes it ignores."""

    def __init__(self, model: str, size: str, seed: int, dtype: torch.dtype, device: torch.device,
                 grid: BenchGrid):
        self.model = token_model(model, size)
        self.model.config.validate()
        self.dtype, self.device, self.grid = dtype, device, grid
        drawn = random_token_weights(self.model, seed, dtype, device)
        self.weights = {name: t.to(self.model.weight_dtype(name, dtype)) for name, t in drawn.items()}
        self.constrained = CONSTRAINED[self.model.model_type]

    @property
    def name(self) -> str:
        return self.model.model_type.value

    @property
    def chunk(self) -> int:
        return getattr(self.model.config, "chunk_size", 1)

    def note(self) -> str:
        return (f"{self.name}: --views, --chunk and --steps do not apply (one image, {self.model.num_generated_tokens} "
                f"greedy tokens, no denoising) and are ignored; its rows record views=1, chunk={self.chunk}, steps=-; "
                f"--prompt-len counts the ids the model sees (BOS ... closing id)")

    def weight_bytes(self, memory: GpuMemory) -> int:
        return memory.allocated()

    def cases(self, backend: str):
        """The (prompt length, graphs) cases of ``backend`` as bench ``Case`` rows (views 1, steps None)."""
        for p in dict.fromkeys(int(v) for v in self.grid.prompt_lens):
            for g in self.grid.graph_modes:
                yield Case(self.name, backend, 1, p, self.chunk, None, g)

    def run(self, case: Case, memory: GpuMemory, rng: np.random.Generator, iters: int, warmup: int,
            backend=None) -> dict:
        """Time one case like ``bench._run_case``; when it cannot run, a dict with ``reason`` and ``outcome``.
        ``backend``: what the engine's backend is created from (default: ``case.backend``, the name)."""
        config = self.model.config
        if case.prompt_len > config.max_text_tokens:
            return {**asdict(case), "outcome": "skipped",
                    "reason": f"prompt length {case.prompt_len} > the model's max_text_tokens {config.max_text_tokens}"}
        try:
            ids = random_prompt_ids(self.model, case.prompt_len, rng)
        except ConfigError as err:
            return {**asdict(case), "outcome": "skipped", "reason": str(err)}
        image = random_token_image(self.model, rng)

        def describe(engine: TokenVLAEngine) -> dict:
            padded = engine.bucket_length(len(ids))
            return dict(backend_options=backend_options(engine.backend), prefix_tokens=config.num_patches + padded,
                        valid_prefix_tokens=config.num_patches + len(ids), padded_prompt_len=padded,
                        generated_tokens=self.model.num_generated_tokens, constrained=self.constrained)

        return timed_entry(
            case,
            lambda: TokenVLAEngine(self.model, self.weights, backend=backend or case.backend, device=self.device,
                                   dtype=self.dtype, use_cuda_graphs=case.cuda_graphs, constrained=self.constrained),
            lambda engine: lambda: engine.predict(image, prompt_tokens=ids),
            memory, self.device, iters, warmup, self.dtype, describe)


class RT1Workload:
    """RT-1 in the bench grid: its model, random weights on ``device``, its rows and its note."""

    name = "rt1"

    def __init__(self, model: str, size: str, seed: int, dtype: torch.dtype, device: torch.device,
                 grid: BenchGrid):
        self.model = RT1Model(tiny_rt1_config() if size == "tiny" else RT1Config())
        self.dtype, self.device, self.grid = dtype, device, grid
        drawn = random_rt1_weights(self.model, seed, device)
        self.weights = {name: t.to(self.model.weight_dtype(name, dtype)) for name, t in drawn.items()}

    def note(self) -> str:
        c = self.model.config
        return (f"rt1: --views, --prompt-len, --chunk and --steps do not apply (one {c.input_size[0]}x"
                f"{c.input_size[1]} frame, a {c.context_dim}-D instruction embedding, {c.num_action_tokens} action "
                f"tokens over a {c.time_steps}-frame history) and are ignored; its rows record views=1, prompt=0")

    def weight_bytes(self, memory: GpuMemory) -> int:
        return memory.allocated()

    def cases(self, backend: str):
        for g in self.grid.graph_modes:
            yield Case(self.name, backend, 1, 0, 1, None, g)

    def run(self, case: Case, memory: GpuMemory, rng: np.random.Generator, iters: int, warmup: int,
            backend=None) -> dict:
        """Time one case like ``bench._run_case`` (``backend``: the configured backend spec, else the case's
        name); when it cannot run, a dict with ``reason`` and ``outcome``."""
        c = self.model.config
        frame = rng.integers(0, 256, (*c.input_size, 3), dtype=np.uint8)
        context = rng.normal(size=c.context_dim).astype(np.float32)
        return timed_entry(
            case,
            lambda: RT1Engine(self.model, self.weights, backend=backend or case.backend, device=self.device,
                              dtype=self.dtype, use_cuda_graphs=case.cuda_graphs),
            lambda engine: lambda: engine.predict(frame, context),
            memory, self.device, iters, max(warmup, c.time_steps), self.dtype,
            lambda engine: dict(prefix_tokens=c.sequence_length, valid_prefix_tokens=c.sequence_length),
            preprocess_ms=True)
