"""``cortexflow profile --model openvla|rt2``: one token-decoding ``predict`` under ``torch.profiler``.

The report has the same shape as the Pi0 one (:func:`cortexflow.tools.profile.run_profile`): engine
timings, the top kernels (GPU) or ops (CPU), and two roofline rows whose floors add up to the call's:

- ``prefill``: the vision tower(s) + projector over the image tokens and the LLM over the image tokens
  plus the prompt ids, logits for the last position only. FLOPs = 2 x the linear weights' elements x the
  tokens that pass through them, plus the two attention products (causal: half of ``P² x q_dim`` each
  per layer); bytes = every weight read once (the LLM's embedding table excluded: only rows are read).
- ``decode``: each of the remaining ``generated - 1`` single-token steps reads the LLM layers and the
  output head again, plus the KV cache of the prefill: memory-bound.

The engine runs one fused call, so only the whole call's time is measured (no split between the rows).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from cortexflow.decoding_engine import TokenVLAEngine
from cortexflow.errors import ConfigError
from cortexflow.tools import (
    random_prompt_ids,
    random_token_image,
    random_token_weights,
    resolve_device_dtype,
    resolve_size,
    token_model,
)
from cortexflow.tools.flops import StageCost
from cortexflow.tools.profile import (
    build_report,
    device_peaks,
    profile_call,
    row_with_floor,
)


def token_costs(model, weights: dict[str, torch.Tensor], prompt_len: int, weight_bytes: int) -> list[StageCost]:
    """``prefill`` and ``decode`` costs of one call with ``prompt_len`` ids (see the module doc)."""
    dims = model.lm.dims
    tokens = model.prefill_length(prompt_len)
    layer_params = sum(t.numel() for name, t in weights.items() if name.startswith("llm.layers.") and t.dim() == 2)
    head = weights.get("llm.lm_head", weights["llm.embed"])
    head_params = head.numel()
    vision_params = sum(t.numel() for name, t in weights.items() if not name.startswith("llm.") and t.dim() >= 2)
    image_tokens = tokens - prompt_len
    q_dim = dims.num_heads * dims.head_dim
    kv_dim = dims.num_kv_heads * dims.head_dim
    attention = 2 * tokens * tokens * q_dim * dims.num_layers  # QK^T and PV, causal halves
    prefill = StageCost(
        "prefill",
        flop=2 * vision_params * image_tokens + 2 * layer_params * tokens + 2 * head_params + attention,
        bytes=(vision_params + layer_params + head_params) * weight_bytes,
        parts={"vision": 2 * vision_params * image_tokens, "llm_linears": 2 * layer_params * tokens,
               "attention": attention, "head": 2 * head_params},
    )
    kv_cache = 2 * dims.num_layers * tokens * kv_dim * weight_bytes
    decode = StageCost(
        "decode",
        flop=2 * (layer_params + head_params),
        bytes=(layer_params + head_params) * weight_bytes + kv_cache,
        repeats=max(model.num_generated_tokens - 1, 0),
        parts={"llm_linears": 2 * layer_params, "head": 2 * head_params},
    )
    return [prefill, decode]


def run_token_profile(*, model: str, backend: str, size: str, device: str, dtype: Any, prompt_len: int, top: int,
                      repeats: int, seed: int, peak_tflops: float | None, peak_gbps: float | None,
                      log: Callable[[str], None] | None, views: Any = None, chunk: Any = None, steps: Any = None) -> dict:
    """:func:`~cortexflow.tools.profile.run_profile` (whose arguments these are) for a token-decoding policy:
    one un-graphed ``TokenVLAEngine.predict`` of ``model``. ``views``, ``chunk`` and ``steps`` do not apply:
    the models take one image and decode their own number of tokens."""

    resolved_device, compute_dtype = resolve_device_dtype(device, dtype)
    size = resolve_size(size, resolved_device)
    log = log or (lambda _message: None)
    if top < 1 or repeats < 1:
        raise ConfigError(f"top and repeats must be at least 1, got {top}, {repeats}")
    vla = token_model(model, size)
    if prompt_len > vla.config.max_text_tokens:
        raise ConfigError(f"prompt length must be at most {vla.config.max_text_tokens} ids, got {prompt_len}")
    rng = np.random.default_rng(seed)
    ids = random_prompt_ids(vla, prompt_len, rng)
    peaks = device_peaks(resolved_device, peak_tflops, peak_gbps, log)

    log(f"drawing {size} {vla.model_type.value} weights on {resolved_device} ...")
    weights = random_token_weights(vla, seed, compute_dtype, resolved_device)
    costs = token_costs(vla, weights, len(ids), torch.finfo(compute_dtype).bits // 8)
    engine = TokenVLAEngine(vla, weights, backend=backend, device=resolved_device, dtype=compute_dtype,
                            use_cuda_graphs=False)
    del weights
    image = random_token_image(vla, rng)
    stages_ms, kernels = profile_call(lambda: engine.predict(image, prompt_tokens=ids), engine, resolved_device,
                                      repeats, top, log)
    rows = [row_with_floor(cost.name, cost, cost, None, peaks) for cost in costs]
    padded = engine.bucket_length(len(ids))
    workload = {"views": 1, "prompt_tokens": len(ids), "padded_prompt_tokens": padded,
                "generated_tokens": vla.num_generated_tokens, "repeats": repeats, "cuda_graphs": False,
                "description": (f"1 image, {len(ids)} prompt ids (padded to {padded}), "
                                f"{vla.num_generated_tokens} greedy tokens")}
    return build_report(vla.model_type.value, engine, size, compute_dtype, seed, workload, resolved_device, peaks,
                        stages_ms, rows, stages_ms["model"], kernels)
