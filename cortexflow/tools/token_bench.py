"""``cortexflow bench --models openvla,rt2``: whole ``predict`` latency of the token-decoding policies.

A row is one (backend, prompt length, CUDA graphs) case of :class:`~cortexflow.token_engine.TokenVLAEngine`
over random non-zero weights (:func:`~cortexflow.tools.random_token_weights`, drawn on the device in the
run's dtype; RT-2's fp32-kept tensors upcast) and timed like the Pi0 rows
(:func:`cortexflow.tools.bench.time_calls`): one random uint8 image of the model's input size and a
random prompt of ``prompt_len`` ids (BOS, random non-action ids, the model's closing id) through
``predict`` — preprocessing, vision, prefill, every greedy single-token step, de-tokenisation.

The grid's views, chunk and steps axes do not apply: the policies take one image, decode their own
number of tokens (OpenVLA: ``action_dim`` = 7 tokens, one action; RT-2: ``chunk_size * action_dim``) and
have no denoising steps. They are ignored, and each row records ``views=1``, ``chunk`` = the model's
action chunk (1 for OpenVLA), ``steps=None`` and ``generated_tokens``. Decoding is constrained to the
action ids as each model's factory does by default (OpenVLA: off, RT-2: on).
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch

from cortexflow.config import VLAModelType, dtype_name
from cortexflow.errors import ConfigError
from cortexflow.token_engine import TokenVLAEngine
from cortexflow.tools import backend_options, random_prompt_ids, random_token_image, random_token_weights, token_model

#: Whether greedy decoding is restricted to the action ids, as ``create_*_inference`` defaults.
CONSTRAINED = {VLAModelType.OPENVLA: False, VLAModelType.RT2: True}


class TokenWorkload:
    """One token-decoding policy of the bench: its model, its random weights (on ``device`` in ``dtype``),
    the rows it contributes, and the note saying which grid axes it ignores."""

    def __init__(self, model: str, size: str, seed: int, dtype: torch.dtype, device: torch.device):
        self.model = token_model(model, size)
        self.model.config.validate()
        self.dtype, self.device = dtype, device
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

    def cases(self, backend: str, prompt_lens, graph_modes):
        """The (prompt length, graphs) cases of ``backend`` as bench ``Case`` rows (views 1, steps None)."""
        from cortexflow.tools.bench import Case

        for p in dict.fromkeys(int(v) for v in prompt_lens):
            for g in graph_modes:
                yield Case(self.name, backend, 1, p, self.chunk, None, g)

    def run(self, case, memory, rng: np.random.Generator, iters: int, warmup: int, backend=None) -> dict:
        """Time one case like ``bench._run_case``; when it cannot run, a dict with ``reason`` and ``outcome``.
        ``backend``: what the engine's backend is created from (default: ``case.backend``, the name)."""
        from cortexflow.tools.bench import failed_case, time_calls

        entry = asdict(case)
        config = self.model.config
        if case.prompt_len > config.max_text_tokens:
            return {**entry, "outcome": "skipped",
                    "reason": f"prompt length {case.prompt_len} > the model's max_text_tokens {config.max_text_tokens}"}
        try:
            ids = random_prompt_ids(self.model, case.prompt_len, rng)
        except ConfigError as err:
            return {**entry, "outcome": "skipped", "reason": str(err)}
        image = random_token_image(self.model, rng)
        memory.reset()
        engine = None
        try:
            engine = TokenVLAEngine(self.model, self.weights, backend=backend or case.backend, device=self.device,
                                    dtype=self.dtype, use_cuda_graphs=case.cuda_graphs, constrained=self.constrained)
            stats = time_calls(lambda: engine.predict(image, prompt_tokens=ids), self.device, iters, warmup)
            padded = engine.bucket_length(len(ids))
            entry.update(stats)
            entry.update(
                cuda_graphs=engine.use_cuda_graphs,
                dtype=dtype_name(self.dtype),
                stages_ms=None if engine.use_cuda_graphs else dict(engine.last_timings),
                peak_gpu_gib=memory.peak_gib(),
                backend_options=backend_options(engine.backend),
                prefix_tokens=config.num_patches + padded,
                valid_prefix_tokens=config.num_patches + len(ids),
                padded_prompt_len=padded,
                generated_tokens=self.model.num_generated_tokens,
                constrained=self.constrained,
            )
            return entry
        except Exception as err:  # noqa: BLE001 - reported, and the grid goes on
            return failed_case(entry, err)
        finally:
            del engine
            memory.reset()
