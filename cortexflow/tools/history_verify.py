"""``cortexflow verify --model rt1``: a backend's RT-1 error against the fp32 reference, module by module.

Same method as :mod:`cortexflow.tools.verify`: random weights (batch-norm statistics calibrated, see
``random_rt1``), the reference in fp32 on the checked dtype's rounded weights, each module fed the
reference's output of the module before. Modules: the FiLM-EfficientNet feature map, TokenLearner, the
first decoder layer, the action logits over a full history, and a whole episode (``T + 2`` steps through
``forward``, so the window fills and rolls) whose de-tokenised continuous actions carry the verdict.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from cortexflow.backends import create_backend
from cortexflow.errors import ConfigError
from cortexflow.models.efficientnet_film import efficientnet_film
from cortexflow.models.rt1 import RT1Config, RT1Model, detokenize_actions, token_learner
from cortexflow.random_rt1 import random_rt1_weights, tiny_rt1_config
from cortexflow.tools import resolve_device_dtype, resolve_size
from cortexflow.tools.verify import (
    THRESHOLDS,
    error_stats,
    exact_fp32,
    median_ms,
    verify_report,
)

MODULES = ("tokenizer", "token_learner", "decoder_layer0", "logits", "actions")


class _Side:
    def __init__(self, backend, weights: dict[str, torch.Tensor]):
        self.backend, self.weights = backend, weights

    @property
    def dtype(self) -> torch.dtype:
        return self.backend.dtype


def _episode(model: RT1Model, side: _Side, frames: torch.Tensor, context: torch.Tensor) -> dict[str, np.ndarray]:
    """Run every frame through ``forward`` from a fresh history; tokens ``(S, A)`` and the continuous actions."""
    shapes = model.get_buffer_shapes()
    buffers = {k: torch.zeros(s, dtype=model.buffer_dtype(k, side.dtype), device=frames.device)
               for k, s in shapes.items()}
    buffers["context"].copy_(context)
    tokens = []
    for frame in frames:
        buffers["images"].copy_(frame[None])
        model.forward(side.backend, side.weights, buffers)
        tokens.append(buffers["tokens"][0].cpu().numpy().copy())
    tokens = np.stack(tokens)
    actions = detokenize_actions(tokens, model.config.actions, model.config.vocab_size)
    values = np.concatenate([v for f, v in zip(model.config.actions, actions.values()) if not f.discrete], axis=-1)
    return {"tokens": tokens, "values": torch.from_numpy(values)}


def _builders(model: RT1Model, frames: torch.Tensor, context: torch.Tensor, ref: dict[str, Any]):
    """Module name -> ``build(side) -> call``; each call starts from the reference's previous output."""
    c = model.config

    def cast(x: torch.Tensor, side: _Side) -> torch.Tensor:
        return x.to(side.dtype)

    resized = torch.nn.functional.interpolate(frames[:1].float(), size=(c.image_size, c.image_size),
                                              mode="bilinear", align_corners=False) * 255

    def tokenizer(side):
        rescale = model.constants(frames.device)["rescale"]
        return lambda: efficientnet_film(side.backend, side.weights, "tokenizer", model.blocks, resized,
                                         cast(context, side), rescale, c.bn_eps, c.padding)

    def learner(side):
        tokens = cast(ref["tokenizer"].flatten(2).transpose(1, 2), side)
        return lambda: token_learner(side.backend, side.weights, "token_learner", tokens, c.ln_eps)

    def layer0(side):
        x = cast(ref["sequence"], side)
        mask = model.constants(frames.device)["mask"][None]
        return lambda: model.layer(side.backend, side.weights, "transformer.layers.0", x, mask)

    def logits(side):
        inputs = {"history": cast(ref["history"], side), "slot": ref["slot"]}
        return lambda: model.transformer_decoder(side.backend, side.weights, inputs)

    def episode(side):
        return lambda: _episode(model, side, frames, context)

    return {"tokenizer": tokenizer, "token_learner": learner, "decoder_layer0": layer0, "logits": logits,
            "actions": episode}


def run_rt1_verify(backend: Any = "pytorch", against: str = "pytorch", size: str = "auto", device: str = "auto",
                   dtype: "str | torch.dtype" = "auto", seed: int = 0, repeats: int = 3,
                   log: Callable[[str], None] | None = None, *, model: str = "rt1", views: int | None = None,
                   modules: Any = None) -> dict:
    """Compare ``backend`` (in ``dtype``) with ``against`` (fp32) on RT-1; returns the verify report dict.
    ``model``, ``views`` and ``modules`` (:func:`~cortexflow.tools.verify.run_verify`'s) do not apply: RT-1's
    checks are fixed (:data:`MODULES`)."""
    if repeats < 1:
        raise ConfigError(f"repeats must be at least 1, got {repeats}")
    log = log or (lambda _message: None)
    resolved_device, compute_dtype = resolve_device_dtype(device, dtype)
    size = resolve_size(size, resolved_device)
    config: RT1Config = tiny_rt1_config() if size == "tiny" else RT1Config()
    model = RT1Model(config)
    threshold = THRESHOLDS[compute_dtype]
    log(f"drawing {size} rt1 weights on {resolved_device} ...")
    drawn = random_rt1_weights(model, seed, resolved_device)
    checked_weights = {k: v.to(model.weight_dtype(k, compute_dtype)) for k, v in drawn.items()}
    checked = _Side(create_backend(backend, resolved_device, compute_dtype), checked_weights)
    reference = _Side(create_backend(against, resolved_device, torch.float32),
                      {k: v.float() for k, v in checked_weights.items()})
    g = torch.Generator(device=resolved_device).manual_seed(seed + 1)
    frames = torch.rand(config.time_steps + 2, 3, *config.input_size, generator=g, device=resolved_device)
    context = torch.randn(1, config.context_dim, generator=g, device=resolved_device)
    ref: dict[str, Any] = {}
    rows = []
    with torch.inference_mode(), exact_fp32():
        builders = _builders(model, frames, context, ref)
        history = torch.stack([model.vision_encoder(reference.backend, reference.weights,
                                                    {"images": f[None], "context": context})[0]
                               for f in frames[:config.time_steps]])[None]
        ref["history"], ref["slot"] = history, torch.tensor([config.time_steps - 1], device=resolved_device)
        zeros = history.new_zeros(1, config.time_steps, config.num_action_tokens, config.embedding_dim)
        sequence = torch.cat([history, zeros], dim=2).reshape(1, config.sequence_length, -1)
        w = reference.weights
        sequence = reference.backend.linear(sequence, w["transformer.token_emb.weight"], w["transformer.token_emb.bias"])
        ref["sequence"] = sequence + (w["transformer.pos_emb.weight"].t() + w["transformer.pos_emb.bias"])[None]
        for name in MODULES:
            log(f"checking {name} ...")
            ref_fn = builders[name](reference)
            ref_out = ref_fn()
            ref[name] = ref_out
            fn = builders[name](checked)
            out = fn()
            row = {"name": name, "description": name.replace("_", " "), "threshold": threshold, "weights": "prepared",
                   "reason": None, "reference_ms": median_ms(ref_fn, repeats, resolved_device),
                   "backend_ms": median_ms(fn, repeats, resolved_device)}
            if name == "actions":
                got, want = out["values"], ref_out["values"]
                agree = int((out["tokens"] == ref_out["tokens"]).sum())
                row.update(tokens_agree=agree, tokens_total=int(ref_out["tokens"].size),
                           token_note=f"{len(frames)} steps x {config.num_action_tokens} tokens")
            else:
                got, want = out, ref_out
            row["shape"] = str(tuple(want.shape))
            stats = error_stats(got.float().cpu(), want.float().cpu())
            rows.append({**row, **stats, "status": "ok" if stats["rel_l2"] <= threshold else "over"})
    workload = {"summary": f"{len(frames)} frames of one episode ({config.time_steps}-frame window), "
                           f"{config.num_action_tokens} action tokens a step", "repeats": repeats}
    return verify_report("rt1", size, checked.backend, reference.backend, compute_dtype, threshold, seed, workload,
                         resolved_device, config, rows, rows[-1]["status"] == "ok")
