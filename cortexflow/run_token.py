"""``cortexflow run`` for the token-decoding policies (OpenVLA, RT-2 style): one image, a prompt, no state.

The command line parses and checks the options; :func:`run_token_policy` builds the engine with
``create_openvla_inference`` / ``create_rt2_inference`` and returns the actions of one ``predict`` call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cortexflow.config import VLAModelType
from cortexflow.errors import InputError, TokenizerError


@dataclass
class TokenRunResult:
    """The actions of one call (OpenVLA ``(action_dim,)``, RT-2 ``(chunk_size, action_dim)``), the generated
    ids, the call's wall time in ms and the engine (for its device, dtype and stage timings)."""

    actions: np.ndarray
    tokens: list[int]
    latency_ms: float
    engine: Any


def run_token_policy(model_type: VLAModelType, checkpoint: str | Path, images: list[np.ndarray], *,
                     prompt: str | None, prompt_tokens: np.ndarray | None, has_state: bool, backend: str,
                     device: str, dtype: str, tokenizer: str | None, norm_stats: str | None,
                     unnorm_key: str | None, model_config: dict | None, use_cuda_graphs: bool,
                     flow_options: dict[str, Any]) -> TokenRunResult:
    """Load ``checkpoint`` as ``model_type`` (openvla or rt2) and run one image and prompt through it.

    ``prompt_tokens`` are the ids the model sees, BOS included. ``flow_options`` maps the command's
    flow-matching-only options (``--chunk``, ``--steps``, ...) to their values. Raises ``InputError`` for
    more than one image, a robot state or any of those options set, which these policies do not take."""
    from cortexflow.factory import create_openvla_inference, create_rt2_inference

    name = model_type.value
    given = [option for option, value in flow_options.items() if value]
    if given:
        raise InputError(f"{', '.join(given)} do(es) not apply to {name} (pi0/pi05 only): drop {'them' if len(given) > 1 else 'it'}")
    if len(images) != 1:
        raise InputError(f"{name} takes one camera image; got {len(images)} --image options")
    if has_state:
        raise InputError(f"{name} takes no robot state: drop --state / --state-file")
    common: dict[str, Any] = dict(backend=backend, device=device, dtype=dtype, tokenizer_path=tokenizer,
                                  use_cuda_graphs=use_cuda_graphs, model_config=model_config)
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
    return TokenRunResult(actions=actions, tokens=[int(t) for t in engine.last_tokens], latency_ms=latency,
                          engine=engine)
