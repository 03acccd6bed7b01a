"""Serving RT-1 (``serve --model rt1``): one camera frame per request, an episode history per connection.

RT-1 conditions each step on the image tokens of the episode's last frames, so the server keeps one episode
per connection (:meth:`~cortexflow.history_engine.RT1Engine.new_episode`): a robot's requests continue its own
episode whatever other robots send in between. The observation (``--robot raw``, RT-1's own inputs):

* ``image``: one ``(H, W, 3)`` frame at the model's ``input_size``, uint8 or float in [0, 1];
* ``instruction_embedding``: the 512-D Universal Sentence Encoder embedding of the instruction, or ``prompt``
  (text) when the server was started with a sentence encoder (none from the command line yet);
* ``reset`` (optional, bool): start a new episode with this frame (as after ``engine.reset()``).

The reply's ``actions`` is ``(1, D)`` float32: the action dict's entries concatenated in the model's action
order (RT-1: ``terminate_episode`` one-hot 3, ``world_vector`` 3, ``rotation_delta`` 3,
``gripper_closedness_action`` 1, ``base_displacement_vertical_rotation`` 1, ``base_displacement_vector`` 2);
the metadata's ``action_layout`` lists the names and widths.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np

from cortexflow.config import VLAModelType, is_auto
from cortexflow.errors import ConfigError, InputError
from cortexflow.serving.policy import (
    DEMO_CHECKPOINT,
    MappedPolicy,
    PolicyOptions,
    checkpoint_name,
    common_metadata,
    engine_timings,
)
from cortexflow.serving.robots import (
    EngineRequest,
    RobotMapping,
    _check_keys,
    _example_image,
)


@dataclass
class RT1Request:
    """One RT-1 step as ``RT1Engine.predict_episode`` arguments."""

    image: Any
    instruction_embedding: Any = None
    prompt: str | None = None
    reset: bool = False


class RT1Mapping(RobotMapping):
    """RT-1's own inputs: ``image``, ``instruction_embedding`` or ``prompt``, optional ``reset``."""

    name = "raw"
    required = ("image",)
    optional = ("instruction_embedding", "prompt", "reset")
    slots = {"image": "image"}

    def __init__(self, input_size: tuple[int, int], context_dim: int):
        self.input_size = tuple(input_size)
        self.context_dim = context_dim

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "num_views": 1, "input_size": list(self.input_size)}

    def to_engine(self, obs: Any, default_prompt: str | None = None) -> RT1Request:  # type: ignore[override]
        obs = _check_keys(obs, "rt1", self.required, self.optional)
        reset = obs.get("reset", False)
        if isinstance(reset, np.ndarray) and reset.shape == ():
            reset = reset.item()
        if not isinstance(reset, (bool, np.bool_)):
            raise InputError(f"reset must be true or false, got {type(reset).__name__}")
        prompt = obs.get("prompt", default_prompt if "instruction_embedding" not in obs else None)
        if prompt is not None and not isinstance(prompt, str):
            raise InputError(f"prompt must be a string, got {type(prompt).__name__}")
        if "instruction_embedding" not in obs and prompt is None:
            raise InputError(f"missing 'instruction_embedding' (the {self.context_dim}-D sentence embedding of the "
                             "instruction); the server has no --default-prompt")
        return RT1Request(obs["image"], obs.get("instruction_embedding"), prompt, bool(reset))

    def example_observation(self, seed: int = 0, height: int = 224, width: int = 224, **_: Any) -> dict[str, Any]:
        rng = np.random.default_rng(seed)
        embedding = rng.standard_normal(self.context_dim).astype(np.float32)
        return {"image": _example_image(rng, *self.input_size),
                "instruction_embedding": embedding / np.linalg.norm(embedding)}


def action_vector(actions: dict[str, np.ndarray], layout: list[tuple[str, int]]) -> np.ndarray:
    """The action dict as one ``(1, D)`` float32 row, entries in ``layout`` order."""
    return np.concatenate([np.asarray(actions[name], dtype=np.float32).reshape(-1) for name, _ in layout])[None]


@dataclass
class RT1ServedPolicy(MappedPolicy):
    """An :class:`~cortexflow.history_engine.RT1Engine` served with one episode per connection (one thread at a time)."""

    keeps_episodes: ClassVar[bool] = True

    engine: Any
    mapping: RT1Mapping
    checkpoint: str = "?"
    default_prompt: str | None = None
    prompt_encoding: str | None = None
    _episode: Any = field(default=None, repr=False)

    @property
    def layout(self) -> list[tuple[str, int]]:
        return [(f.name, f.size) for f in self.engine.config.actions]

    @property
    def metadata(self) -> dict[str, Any]:
        width = sum(size for _, size in self.layout)
        prompt = {"text": self.prompt_encoding is not None, "encoding": self.prompt_encoding,
                  "default": self.default_prompt}
        return {
            **common_metadata(self.engine, self.mapping, self.checkpoint, prompt),
            "action_dim": width,
            "model_action_dim": width,
            "chunk_size": 1,
            "action_horizon": 1,
            "action_decoding": "tokens",
            "action_layout": [[name, size] for name, size in self.layout],
            "history_frames": self.engine.config.time_steps,
            "num_steps": None,
            "num_views": 1,
            "state_dim": None,
            "actions_unnormalized": True,
            "noise_seed": None,
        }

    def new_episode(self) -> Any:
        """A fresh episode (its frame history) for one connection."""
        return self.engine.new_episode()

    def infer_episode(self, request: RT1Request, episode: Any) -> tuple[np.ndarray, dict[str, float]]:
        """One step of ``episode``: the actions ``(1, D)`` and the engine's timings (ms)."""
        start = time.perf_counter()
        actions = self.engine.predict_episode(episode, request.image, request.instruction_embedding,
                                              request.prompt, reset=request.reset)
        return action_vector(actions, self.layout), engine_timings(self.engine, start)

    def infer(self, request: EngineRequest) -> tuple[np.ndarray, dict[str, float]]:
        """One step of the policy's own episode (direct calls and the warm-up, which starts it afresh)."""
        if self._episode is None:
            self._episode = self.new_episode()
        return self.infer_episode(request, self._episode)


def build_rt1_policy(options: PolicyOptions, model_type: VLAModelType = VLAModelType.RT1,
                     log: Callable[[str], None] | None = None) -> RT1ServedPolicy:
    """Load an RT-1 engine (``create_rt1_inference``: a TF2 checkpoint or a converted folder) and wrap it."""
    from cortexflow.factory import create_rt1_inference
    from cortexflow.serving.policy import _resolve_dtype

    if str(options.checkpoint).strip().lower() == DEMO_CHECKPOINT:
        raise ConfigError("--checkpoint demo is the tiny random pi0/pi05; serve rt1 from a TF2 checkpoint or a "
                          "folder written by cortexflow convert")
    robot = (options.robot or "raw").strip().lower()
    problems = [flag for flag, value in (("--steps", options.steps), ("--seed", options.seed),
                                         ("--views", options.views), ("--norm-stats", options.norm_stats),
                                         ("--tokenizer", options.tokenizer), ("--chunk", options.chunk),
                                         ("--unnorm-key", options.unnorm_key), ("--config", options.config),
                                         ("--rtc-jacobian", options.rtc_jacobian),
                                         ("--precision", None if options.precision == "default" else options.precision),
                                         ("--fp8-cache", options.fp8_cache))
                if value is not None]
    if robot != "raw":
        problems.append(f"--robot {robot} (RT-1 takes its own inputs: --robot raw)")
    if problems:
        raise ConfigError(f"--model rt1 does not take: {', '.join(problems)}")
    dtype = "float32" if is_auto(options.dtype) else _resolve_dtype(options.dtype, options.device)
    (log or (lambda message: None))(f"loading rt1 checkpoint {options.checkpoint} ({options.device}, {dtype}) ...")
    engine = create_rt1_inference(options.checkpoint, backend=options.backend, device=options.device, dtype=dtype,
                                  use_cuda_graphs=options.cuda_graphs, model_config=options.model_config or None)
    mapping = RT1Mapping(engine.config.input_size, engine.config.context_dim)
    return RT1ServedPolicy(engine=engine, mapping=mapping, checkpoint=checkpoint_name(options.checkpoint),
                           default_prompt=options.default_prompt, prompt_encoding=None)

