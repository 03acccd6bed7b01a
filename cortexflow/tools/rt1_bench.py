"""``cortexflow bench --models rt1``: whole ``predict`` latency of one RT-1 step.

A row is one (backend, CUDA graphs) case of :class:`~cortexflow.rt1_engine.RT1Engine` over random
weights (:func:`~cortexflow.random_rt1.random_rt1_weights`, batch-norm statistics calibrated), timed like
the Pi0 rows (:func:`cortexflow.tools.bench.time_calls`): one random uint8 frame of the model's input size
and a random instruction embedding through ``predict`` (the warm-up fills the frame window, so timed
steps attend over a full history) — frame copy, tokenizer, history update, transformer, argmax,
de-tokenisation. The grid's views, prompt length, chunk and steps do not apply: rows record views=1,
prompt_len=0, chunk=1, steps=None.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch

from cortexflow.config import dtype_name
from cortexflow.models.rt1 import RT1Config, RT1Model
from cortexflow.random_rt1 import random_rt1_weights, tiny_rt1_config
from cortexflow.rt1_engine import RT1Engine


class RT1Workload:
    """RT-1 in the bench grid: its model, random weights on ``device``, its rows and its note."""

    name = "rt1"

    def __init__(self, size: str, seed: int, dtype: torch.dtype, device: torch.device):
        self.model = RT1Model(tiny_rt1_config() if size == "tiny" else RT1Config())
        self.dtype, self.device = dtype, device
        drawn = random_rt1_weights(self.model, seed, device)
        self.weights = {name: t.to(self.model.weight_dtype(name, dtype)) for name, t in drawn.items()}

    def note(self) -> str:
        c = self.model.config
        return (f"rt1: --views, --prompt-len, --chunk and --steps do not apply (one {c.input_size[0]}x"
                f"{c.input_size[1]} frame, a {c.context_dim}-D instruction embedding, {c.num_action_tokens} action "
                f"tokens over a {c.time_steps}-frame history) and are ignored; its rows record views=1, prompt=0")

    def cases(self, backend: str, prompt_lens, graph_modes):
        from cortexflow.tools.bench import Case

        for g in graph_modes:
            yield Case(self.name, backend, 1, 0, 1, None, g)

    def run(self, case, memory, rng: np.random.Generator, iters: int, warmup: int, backend=None) -> dict:
        """Time one case like ``bench._run_case`` (``backend``: the configured backend spec, else the case's
        name); when it cannot run, a dict with ``reason`` and ``outcome``."""
        from cortexflow.tools.bench import failed_case, time_calls

        entry = asdict(case)
        c = self.model.config
        frame = rng.integers(0, 256, (*c.input_size, 3), dtype=np.uint8)
        context = rng.normal(size=c.context_dim).astype(np.float32)
        memory.reset()
        engine = None
        try:
            engine = RT1Engine(self.model, self.weights, backend=backend or case.backend, device=self.device, dtype=self.dtype,
                               use_cuda_graphs=case.cuda_graphs)
            stats = time_calls(lambda: engine.predict(frame, context), self.device, iters,
                               max(warmup, c.time_steps), lambda: engine.last_timings["preprocess"])
            entry.update(stats)
            entry.update(cuda_graphs=engine.use_cuda_graphs, dtype=dtype_name(self.dtype),
                         stages_ms=None if engine.use_cuda_graphs else dict(engine.last_timings),
                         peak_gpu_gib=memory.peak_gib(), prefix_tokens=c.sequence_length,
                         valid_prefix_tokens=c.sequence_length)
            return entry
        except Exception as err:  # noqa: BLE001 - reported, and the grid goes on
            return failed_case(entry, err)
        finally:
            del engine
            memory.reset()
