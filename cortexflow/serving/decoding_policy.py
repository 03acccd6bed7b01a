"""Serving the token-decoding policies (OpenVLA, RT-2 style): one camera image and a prompt -> actions.

These models have no state input and a single image slot, so the robot mappings reduce to:

* ``raw``: ``image`` (one HWC/float image), ``prompt`` (text) or ``prompt_tokens`` (ids, BOS included) -
  ``TokenVLAEngine.predict(image, task_prompt, prompt_tokens=...)``'s own arguments.
* ``libero``: ``observation/image`` and ``prompt``; ``droid``: ``observation/exterior_image_1_left`` and
  ``prompt``. Their other keys (wrist cameras, state) are accepted, so unchanged openpi clients work, and
  ignored (logged once); the metadata's ``robot_config`` lists ``used_keys`` and ``ignored_keys``.
* ``aloha`` is refused: it needs 14-D actions, several cameras and the state.

A robot's action dimension must equal the model's (OpenVLA: 7, RT-2: its ``action_dim``); a mismatch is a
:class:`~cortexflow.errors.ConfigError` when the policy is built, before the server listens. Replies are
``(chunk, action_dim)`` like openpi's: OpenVLA ``(1, 7)``, RT-2 ``(chunk_size, action_dim)``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np

from cortexflow.config import VLAModelType
from cortexflow.decoding_engine import TokenVLAEngine
from cortexflow.errors import ConfigError, InputError
from cortexflow.serving.policy import (
    DEMO_CHECKPOINT,
    MappedPolicy,
    PolicyOptions,
    _resolve_dtype,
    check_precision_option,
    checkpoint_name,
    common_metadata,
    engine_timings,
)
from cortexflow.serving.robots import (
    EngineRequest,
    RobotMapping,
    _check_keys,
    _example_image,
    example_prompt,
    make_mapping,
    parse_image,
    parse_prompt,
)

logger = logging.getLogger("cortexflow.serving")

PRIMARY_CAMERA = {"libero": "observation/image", "droid": "observation/exterior_image_1_left"}
RAW_IMAGE_KEY = "image"


class TokenRobotMapping(RobotMapping):
    """One robot format (``raw``, ``libero`` or ``droid``) as a single image and a prompt."""

    def __init__(self, robot: str):
        key = str(robot).strip().lower()
        if key == "raw":
            self.name, self.primary, self.action_dim = "raw", RAW_IMAGE_KEY, None
            self.required, self.optional, self.ignored = (RAW_IMAGE_KEY,), ("prompt", "prompt_tokens"), ()
            self._base: RobotMapping | None = None
        elif key in PRIMARY_CAMERA:
            base = make_mapping(key)
            self.name, self.primary, self.action_dim = base.name, PRIMARY_CAMERA[key], base.action_dim
            self.ignored = tuple(k for k in base.required if k != self.primary)
            self.required, self.optional = (self.primary,), (*self.ignored, *base.optional)
            self._base = base
        else:
            raise ConfigError(f"unknown robot {robot!r} for a token-decoding model; expected raw, libero or droid")
        self.state_dim = None
        self.slots = {"image": self.primary}
        self._warned = False

    def describe(self) -> dict[str, Any]:
        used = [self.primary, *(k for k in self.optional if k not in self.ignored)]
        return {**super().describe(), "used_keys": used, "ignored_keys": list(self.ignored), "num_views": 1}

    def to_engine(self, obs: Any, default_prompt: str | None = None) -> EngineRequest:
        obs = _check_keys(obs, self.name, self.required, self.optional)
        if self._base is None:
            return self._raw_request(obs, default_prompt)
        ignored = [k for k in self.ignored if k in obs]
        if ignored and not self._warned:
            self._warned = True
            logger.info("robot %s on a token-decoding model: using %s and the prompt; ignoring %s (no state "
                        "input, one image; logged once)", self.name, self.primary, ignored)
        return EngineRequest(images=parse_image(obs[self.primary], self.primary),
                             prompt=parse_prompt(obs, default_prompt))

    @staticmethod
    def _raw_request(obs: Any, default_prompt: str | None) -> EngineRequest:
        """``image`` as sent (the engine checks it) and ``prompt`` / ``prompt_tokens`` (or the default)."""
        prompt, tokens = obs.get("prompt"), obs.get("prompt_tokens")
        if tokens is None:
            prompt = parse_prompt(obs, default_prompt)
        elif prompt is not None:
            raise InputError("pass either 'prompt' or 'prompt_tokens', not both")
        return EngineRequest(images=obs[RAW_IMAGE_KEY], prompt=prompt, prompt_tokens=tokens)

    def example_observation(self, seed: int = 0, height: int = 224, width: int = 224, *,
                            text_prompt: bool = True, **_: Any) -> dict[str, Any]:
        if self._base is not None:
            return self._base.example_observation(seed, height, width)
        rng = np.random.default_rng(seed)
        return {RAW_IMAGE_KEY: _example_image(rng, height, width), **example_prompt(text_prompt)}


def token_chunk_size(engine: TokenVLAEngine) -> int:
    """Actions per reply: RT-2's ``chunk_size``; 1 for OpenVLA (one action per call)."""
    return int(getattr(engine.config, "chunk_size", 1))


def make_token_mapping(robot: str, engine: TokenVLAEngine) -> TokenRobotMapping:
    """The mapping for ``robot``, checked against ``engine`` (its action dimension, its tokenizer)."""
    model, dim = engine.config.model_type.value, engine.config.action_dim
    key = str(robot).strip().lower()
    if key == "aloha":
        raise ConfigError(f"--robot aloha needs 14-D actions from up to 4 cameras and a 14-D state; {model} decodes "
                          f"{dim}-D actions from one image and takes no state: serve it with --robot raw, libero or droid")
    mapping = TokenRobotMapping(key)
    if mapping.action_dim is not None and mapping.action_dim != dim:
        hint = (" (an RT-2 policy's action_dim is set with --model-config '{\"action_dim\": N}')"
                if engine.config.model_type == VLAModelType.RT2 else "")
        raise ConfigError(f"--robot {key} takes {mapping.action_dim}-D actions but {model} decodes {dim}-D actions; "
                          f"use --robot raw or a robot with {dim}-D actions{hint}")
    if key != "raw" and engine.tokenizer is None:
        raise ConfigError(f"--robot {key} clients send the task as text and this {model} checkpoint has no "
                          "tokenizer.model: pass --tokenizer PATH, or use --robot raw with 'prompt_tokens'")
    return mapping


@dataclass
class TokenServedPolicy(MappedPolicy):
    """A :class:`~cortexflow.decoding_engine.TokenVLAEngine` behind a token robot mapping (one thread at a time)."""

    engine: TokenVLAEngine
    mapping: TokenRobotMapping
    checkpoint: str = "?"
    default_prompt: str | None = None
    prompt_encoding: str | None = None

    @property
    def metadata(self) -> dict[str, Any]:
        """Sent to every client on connect; ``chunk_size`` is 1 for OpenVLA."""
        engine, config = self.engine, self.engine.config
        chunk = token_chunk_size(engine)
        prompt = {"text": self.prompt_encoding is not None, "encoding": self.prompt_encoding,
                  "max_tokens": config.max_text_tokens, "default": self.default_prompt}
        return {
            **common_metadata(engine, self.mapping, self.checkpoint, prompt),
            "action_dim": config.action_dim,
            "model_action_dim": config.action_dim,
            "chunk_size": chunk,
            "action_horizon": chunk,
            "action_decoding": "tokens",
            "num_steps": None,
            "num_views": 1,
            "state_dim": None,
            "actions_unnormalized": engine.unnormalize is not None,
            "unnorm_key": engine.unnorm_key,
            "noise_seed": None,
        }

    def infer(self, request: EngineRequest) -> tuple[np.ndarray, dict[str, float]]:
        """Run the engine: actions ``(chunk, action_dim)`` fp32 (OpenVLA ``(1, 7)``) and stage timings (ms)."""
        start = time.perf_counter()
        actions = self.engine.predict(request.images, request.prompt, prompt_tokens=request.prompt_tokens)
        actions = np.ascontiguousarray(actions.reshape(token_chunk_size(self.engine), -1), dtype=np.float32)
        return actions, engine_timings(self.engine, start)


def _check_token_options(options: PolicyOptions, model_type: VLAModelType) -> None:
    """Refuse the ``serve`` options that mean nothing for a token-decoding model (before any loading)."""
    model = model_type.value
    if str(options.checkpoint).strip().lower() == DEMO_CHECKPOINT:
        raise ConfigError(f"--checkpoint demo is the tiny random pi0/pi05; serve {model} from a checkpoint folder "
                          f"('cortexflow demo --model {model}' runs a tiny random {model} locally)")
    problems = [f"{flag} ({why})" for flag, value, why in (
        ("--steps", options.steps, "no denoising steps: actions are decoded greedily"),
        ("--seed", options.seed, "greedy decoding is already deterministic"),
        ("--views", options.views, "the model takes one image"),
        ("--rtc-jacobian", options.rtc_jacobian, "real-time chunking guides flow-matching policies"),
    ) if value is not None]
    if model_type == VLAModelType.OPENVLA:
        if options.norm_stats is not None:
            problems.append("--norm-stats (OpenVLA's statistics are in the checkpoint: pick a dataset with --unnorm-key)")
        if options.chunk not in (None, 1):
            problems.append("--chunk (OpenVLA decodes one action per call)")
    elif options.unnorm_key is not None:
        problems.append("--unnorm-key (for OpenVLA; RT-2 un-normalises with --norm-stats)")
    if problems:
        raise ConfigError(f"--model {model} does not take: {'; '.join(problems)}")


def build_token_policy(options: PolicyOptions, model_type: VLAModelType,
                       log: Callable[[str], None] | None = None) -> TokenServedPolicy:
    """Load an OpenVLA (``create_openvla_inference``) or RT-2 (``create_rt2_inference``) engine and wrap it;
    ``--chunk`` sets RT-2's ``chunk_size``; the robot defaults to droid."""
    from cortexflow.factory import create_openvla_inference, create_rt2_inference
    from cortexflow.quantization.precision import fp8_cache_setting

    options = replace(options, robot=options.robot or "droid")
    _check_token_options(options, model_type)
    make_mapping(options.robot)  # validates the robot name before any loading
    dtype = _resolve_dtype(options.dtype, options.device)
    check_precision_option(options, dtype)
    overrides = dict(options.model_config or {})
    common = dict(backend=options.backend, device=options.device, dtype=dtype, tokenizer_path=options.tokenizer,
                  use_cuda_graphs=options.cuda_graphs, precision=options.precision,
                  fp8_cache=fp8_cache_setting(options.fp8_cache, options.precision))
    (log or (lambda message: None))(f"loading {model_type.value} checkpoint {options.checkpoint} "
                                    f"({options.device}, {dtype}) ...")
    if model_type == VLAModelType.OPENVLA:
        engine = create_openvla_inference(options.checkpoint, unnorm_key=options.unnorm_key,
                                          model_config=overrides or None, **common)
    else:
        if options.chunk is not None:
            overrides["chunk_size"] = options.chunk
        engine = create_rt2_inference(options.checkpoint, norm_stats_path=options.norm_stats,
                                      model_config=overrides or None, **common)
    mapping = make_token_mapping(options.robot, engine)
    if options.tokenizer is not None:
        encoding = f"tokenizer {options.tokenizer}"
    elif engine.tokenizer is not None:
        encoding = "the checkpoint's tokenizer.model"
    else:
        encoding = None
    return TokenServedPolicy(engine=engine, mapping=mapping, checkpoint=checkpoint_name(options.checkpoint),
                             default_prompt=options.default_prompt, prompt_encoding=encoding)
