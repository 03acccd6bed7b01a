"""``cortexflow run``: one observation through a checkpoint, for every image + prompt family.

The command line parses and checks the options and prints the result; :func:`run_flow_policy` (Pi0, Pi0.5:
images, a prompt, the robot state) and :func:`run_token_policy` (OpenVLA, RT-2 style: one image and a prompt)
build the engine with the family's ``create_*_inference`` and return the actions of one ``predict`` call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from cortexflow.config import VLAModelType
from cortexflow.engine import resolve_device
from cortexflow.errors import InputError, TokenizerError
from cortexflow.factory import (
    create_inference,
    create_openvla_inference,
    create_rt2_inference,
)


@dataclass
class RunResult:
    """The actions of one call (flow matching ``(chunk, action_dim)``; OpenVLA ``(action_dim,)``, RT-2
    ``(chunk_size, action_dim)``), the call's wall time in ms, the engine (for its device, dtype, report and
    stage timings) and, for a token-decoding policy, the generated ids."""

    actions: np.ndarray
    latency_ms: float
    engine: Any
    tokens: list[int] | None = None


def run_flow_policy(model_type: VLAModelType, checkpoint: str | Path, images: list[np.ndarray], *,
                    prompt: str | None, prompt_tokens: np.ndarray | None, state: np.ndarray | None,
                    image_masks: Sequence[bool] | None, num_views: int, backend: str, device: str, dtype: str,
                    tokenizer: str | None, norm_stats: str | None, unnorm_key: str | None,
                    model_config: dict | None, use_cuda_graphs: bool, chunk: int | None, steps: int | None,
                    seed: int | None, log: Callable[[str], None] | None = None,
                    warn: Callable[[str], None] | None = None, precision: str = "default") -> RunResult:
    """Load ``checkpoint`` as ``model_type`` (pi0 or pi05) and run one observation through it.

    ``dtype`` is a dtype name (not ``auto``); ``seed`` seeds the starting noise (None: fresh noise). ``log``
    receives the loading line; ``warn`` the warning that a pi05 state is unused when the prompt comes as ids;
    ``precision``: "default" or "fp8" (the factories' argument).
    Raises ``TokenizerError`` for a text prompt without a tokenizer and ``InputError`` for ``unnorm_key`` (an
    OpenVLA option) or a pi0 call without a state."""
    if prompt is not None and tokenizer is None:
        raise TokenizerError(
            "--prompt needs --tokenizer (a PaliGemma tokenizer.model, a tokenizer.json, or a folder holding one); "
            "or pass --prompt-tokens with token ids"
        )
    if unnorm_key is not None:
        raise InputError("--unnorm-key picks an OpenVLA dataset's action statistics; pi0/pi05 use --norm-stats")
    if model_type == VLAModelType.PI0 and state is None:
        raise InputError("a pi0 policy needs the robot state: pass --state NUMBERS or --state-file FILE")
    if log is not None:
        log(f"loading {model_type.value} checkpoint {checkpoint} ({resolve_device(device)}, {dtype}) ...")
    engine = create_inference(
        model_type,
        checkpoint,
        num_views=num_views,
        chunk_size=chunk,
        backend=backend,
        device=device,
        dtype=dtype,
        tokenizer_path=tokenizer,
        norm_stats_path=norm_stats,
        use_cuda_graphs=use_cuda_graphs,
        model_config=model_config,
        num_steps=steps,
        precision=precision,
    )
    if (model_type == VLAModelType.PI05 and prompt_tokens is not None and state is not None
            and engine.config.discrete_state_input and warn is not None):
        warn("pi05 takes the state inside the prompt: with --prompt-tokens the --state is not used")
    noise = None
    if seed is not None:
        rng = np.random.default_rng(seed)
        noise = rng.standard_normal((engine.chunk_size, engine.config.action_dim)).astype(np.float32)
    start = time.perf_counter()
    actions = engine.predict(images, prompt, state, noise=noise, prompt_tokens=prompt_tokens, image_masks=image_masks)
    return RunResult(actions=actions, latency_ms=(time.perf_counter() - start) * 1e3, engine=engine)


def run_token_policy(model_type: VLAModelType, checkpoint: str | Path, images: list[np.ndarray], *,
                     prompt: str | None, prompt_tokens: np.ndarray | None, has_state: bool, backend: str,
                     device: str, dtype: str, tokenizer: str | None, norm_stats: str | None,
                     unnorm_key: str | None, model_config: dict | None, use_cuda_graphs: bool,
                     flow_options: dict[str, Any], precision: str = "default",
                     fp8_cache: "bool | str | Path" = False) -> RunResult:
    """Load ``checkpoint`` as ``model_type`` (openvla or rt2) and run one image and prompt through it
    (``precision`` and ``fp8_cache`` as the factories take them).

    ``prompt_tokens`` are the ids the model sees, BOS included. ``flow_options`` maps the command's
    flow-matching-only options (``--chunk``, ``--steps``, ...) to their values. Raises ``InputError`` for
    more than one image, a robot state or any of those options set, which these policies do not take."""
    name = model_type.value
    given = [option for option, value in flow_options.items() if value]
    if given:
        raise InputError(f"{', '.join(given)} do(es) not apply to {name} (pi0/pi05 only): drop {'them' if len(given) > 1 else 'it'}")
    if len(images) != 1:
        raise InputError(f"{name} takes one camera image; got {len(images)} --image options")
    if has_state:
        raise InputError(f"{name} takes no robot state: drop --state / --state-file")
    common: dict[str, Any] = dict(backend=backend, device=device, dtype=dtype, tokenizer_path=tokenizer,
                                  use_cuda_graphs=use_cuda_graphs, model_config=model_config, precision=precision,
                                  fp8_cache=fp8_cache)
    if model_type == VLAModelType.OPENVLA:
        if norm_stats is not None:
            raise InputError("openvla un-normalises with the statistics in its folder: drop --norm-stats "
                             "(pick a dataset with --unnorm-key)")
        engine = create_openvla_inference(checkpoint, unnorm_key=unnorm_key, **common)
    else:
        if unnorm_key is not None:
            raise InputError("--unnorm-key picks an OpenVLA dataset's statistics; rt2 takes --norm-stats")
        engine = create_rt2_inference(checkpoint, norm_stats_path=norm_stats, **common)
    if prompt_tokens is None and engine.tokenizer is None:
        raise TokenizerError(f"--prompt needs a tokenizer: {checkpoint} holds no tokenizer.model; pass --tokenizer "
                             "PATH, or --prompt-tokens with token ids")
    start = time.perf_counter()
    actions = engine.predict(images[0], prompt, prompt_tokens=prompt_tokens)
    latency = (time.perf_counter() - start) * 1e3
    return RunResult(actions=actions, latency_ms=latency, engine=engine, tokens=[int(t) for t in engine.last_tokens])
