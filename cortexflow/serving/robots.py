"""Robot observation / action mappings as openpi defines them (``DroidInputs``, ``LiberoInputs``,
``AlohaInputs`` and their ``*Outputs``), plus ``raw`` (the engine's own arguments).

Pi0 / Pi0.5 have three image slots: ``base_0_rgb``, ``left_wrist_0_rgb``, ``right_wrist_0_rgb``.

* ``droid``: ``observation/exterior_image_1_left`` -> base, ``observation/wrist_image_left`` -> left wrist,
  right wrist = zeros with ``image_mask`` False; state = ``observation/joint_position`` (7) +
  ``observation/gripper_position`` (1) = 8; actions: the first 8 dims.
* ``libero``: ``observation/image`` -> base, ``observation/wrist_image`` -> left wrist, right wrist masked;
  state = ``observation/state`` (8); actions: the first 7 dims.
* ``aloha``: ``images`` = {``cam_high`` (required), ``cam_low`` (accepted, unused), ``cam_left_wrist``,
  ``cam_right_wrist``}; a missing wrist camera is zeros with ``image_mask`` False; ``state`` (14); actions:
  the first 14 dims. With ``adapt_to_pi`` (openpi's default) joints are sign-flipped and the grippers mapped
  between ALOHA's linear space and the angular space Pi0 was trained in, both ways.
* ``raw``: ``images`` (V, H, W, 3) or a list, ``image_masks``, ``prompt`` or ``prompt_tokens``, ``state``,
  ``noise`` - passed to ``engine.predict`` as they are; actions: all the model's dims.

Every robot takes an optional ``prompt`` (text). Images are HWC or CHW, uint8 or float in [0, 1] (as openpi's
``_parse_image``: floats become ``uint8(255 * x)``). Unknown keys, missing keys and wrong shapes are
:class:`~cortexflow.errors.InputError` with a message naming the key and what was expected.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from cortexflow.errors import ConfigError, InputError
from cortexflow.policies.transforms import (
    EngineRequest,
    apply_inputs,
    apply_outputs,
    robot_steps,
)

IMAGE_SLOTS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
ROBOT_NAMES = ("droid", "libero", "aloha", "raw")
EXAMPLE_PROMPT = "pick up the red cube"


# ---- field parsing -------------------------------------------------------------------------------
def _check_keys(obs: Any, robot: str, required: tuple[str, ...], optional: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(obs, Mapping):
        raise InputError(f"a {robot} request must be a map of observation keys, got {type(obs).__name__}")
    bad_keys = [k for k in obs if not isinstance(k, str)]
    if bad_keys:
        raise InputError(f"observation keys must be strings, got {bad_keys[:5]!r}")
    allowed = set(required) | set(optional)
    unknown = sorted(k for k in obs if k not in allowed)
    missing = [k for k in required if k not in obs]
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"unknown key(s) {unknown}")
        if missing:
            parts.append(f"missing key(s) {missing}")
        raise InputError(
            f"{' and '.join(parts)} for robot {robot!r}; expected {list(required)}"
            + (f" and optionally {list(optional)}" if optional else "")
        )
    return obs


def parse_image(value: Any, key: str) -> np.ndarray:
    """An HWC uint8 image from HWC or CHW, uint8 or float in [0, 1] (openpi ``_parse_image``)."""
    if not isinstance(value, np.ndarray):
        raise InputError(f"{key} must be an image array (H, W, 3) or (3, H, W), got {type(value).__name__}")
    image = value
    if image.ndim != 3:
        raise InputError(f"{key} has shape {tuple(image.shape)}; expected an image (H, W, 3) or (3, H, W)")
    if image.shape[-1] != 3:
        if image.shape[0] != 3:
            raise InputError(f"{key} has shape {tuple(image.shape)}; expected 3 colour channels, (H, W, 3) or (3, H, W)")
        image = image.transpose(1, 2, 0)
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise InputError(f"{key} has shape {tuple(value.shape)}: the image is empty")
    if np.issubdtype(image.dtype, np.floating):
        if not np.isfinite(image).all():
            raise InputError(f"{key} contains NaN or inf")
        image = np.clip(255.0 * image.astype(np.float32), 0.0, 255.0).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise InputError(f"{key} has dtype {image.dtype}; expected uint8 (0..255) or float (0..1)")
    return np.ascontiguousarray(image)


def parse_vector(value: Any, key: str, length: int | None, allow_scalar: bool = False) -> np.ndarray:
    """A finite 1-D float32 vector of ``length`` values (a scalar too when ``allow_scalar``)."""
    if isinstance(value, (list, tuple, int, float)) and not isinstance(value, bool):
        try:
            value = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise InputError(f"{key} must be a list of numbers") from None
    if isinstance(value, np.generic):
        value = np.asarray(value)
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "iuf":
        raise InputError(f"{key} must be a numeric array, got {getattr(value, 'dtype', type(value).__name__)}")
    array = value.reshape(1) if (allow_scalar and value.ndim == 0) else value
    if array.ndim != 1 or (length is not None and array.shape[0] != length) or array.size == 0:
        expected = f"({length},)" if length is not None else "a non-empty 1-D vector"
        raise InputError(f"{key} has shape {tuple(value.shape)}; expected {expected}")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise InputError(f"{key} contains NaN or inf")
    return array


def parse_prompt(obs: Mapping[str, Any], default_prompt: str | None) -> str:
    if "prompt" in obs:
        prompt = obs["prompt"]
        if isinstance(prompt, np.ndarray) and prompt.dtype.kind == "U" and prompt.ndim == 0:
            prompt = str(prompt)
        if not isinstance(prompt, str):
            raise InputError(f"prompt must be a string, got {type(prompt).__name__}")
        return prompt
    if default_prompt is None:
        raise InputError("missing key 'prompt' (the task instruction); the server has no --default-prompt")
    return default_prompt


# ---- mappings ------------------------------------------------------------------------------------
class RobotMapping:
    """Base class: ``to_engine(observation) -> EngineRequest`` and ``to_robot(actions) -> actions``.

    ``input_steps`` / ``output_steps`` are the robot's transforms (:func:`~cortexflow.policies.transforms.robot_steps`):
    ``to_engine`` ends with the input steps, ``to_robot`` is the output steps. A policy config runs those steps in
    the engine instead and serves the mapping with :meth:`keys_only`."""

    input_steps: tuple = ()
    output_steps: tuple = ()

    name: str = ""
    action_dim: int | None = None  # None: every dimension of the model's actions
    state_dim: int | None = None
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ("prompt",)
    slots: dict[str, str | None] = {}

    def to_engine(self, obs: Any, default_prompt: str | None = None) -> EngineRequest:
        raise NotImplementedError

    def to_robot(self, actions: np.ndarray) -> np.ndarray:
        return apply_outputs(self.output_steps, actions, None)

    def keys_only(self) -> "RobotMapping":
        """This mapping without its transforms: observation keys to image slots, state and prompt only."""
        self.input_steps, self.output_steps = (), ()
        return self

    def describe(self) -> dict[str, Any]:
        """A plain description for the connection metadata."""
        return {
            "name": self.name,
            "action_dim": self.action_dim,
            "state_dim": self.state_dim,
            "required_keys": list(self.required),
            "optional_keys": list(self.optional),
            "image_slots": dict(self.slots),
        }

    def example_observation(self, seed: int = 0, height: int = 224, width: int = 224, **_: Any) -> dict[str, Any]:
        raise NotImplementedError


def _example_image(rng: np.random.Generator, height: int, width: int, chw: bool = False) -> np.ndarray:
    shape = (3, height, width) if chw else (height, width, 3)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def example_prompt(text_prompt: bool = True) -> dict[str, Any]:
    """The example task as ``{"prompt": text}``, or as ``{"prompt_tokens": [BOS=2] + UTF-8 bytes}`` for a
    server without a tokenizer."""
    if text_prompt:
        return {"prompt": EXAMPLE_PROMPT}
    return {"prompt_tokens": np.array([2, *(b % 256 for b in EXAMPLE_PROMPT.encode())], dtype=np.int64)}


class DroidMapping(RobotMapping):
    name = "droid"
    action_dim = 8
    state_dim = 8
    input_steps, output_steps = robot_steps("droid")
    required = (
        "observation/exterior_image_1_left",
        "observation/wrist_image_left",
        "observation/joint_position",
        "observation/gripper_position",
    )
    slots = {
        "base_0_rgb": "observation/exterior_image_1_left",
        "left_wrist_0_rgb": "observation/wrist_image_left",
        "right_wrist_0_rgb": None,
    }

    def to_engine(self, obs: Any, default_prompt: str | None = None) -> EngineRequest:
        obs = _check_keys(obs, self.name, self.required, self.optional)
        base = parse_image(obs["observation/exterior_image_1_left"], "observation/exterior_image_1_left")
        wrist = parse_image(obs["observation/wrist_image_left"], "observation/wrist_image_left")
        joints = parse_vector(obs["observation/joint_position"], "observation/joint_position", 7)
        gripper = parse_vector(obs["observation/gripper_position"], "observation/gripper_position", 1, allow_scalar=True)
        return EngineRequest(
            images=[base, wrist, np.zeros_like(base)],
            image_masks=[True, True, False],
            state=np.concatenate([joints, gripper]),
            prompt=parse_prompt(obs, default_prompt),
        )

    def example_observation(self, seed: int = 0, height: int = 224, width: int = 224, **_: Any) -> dict[str, Any]:
        rng = np.random.default_rng(seed)
        return {
            "observation/exterior_image_1_left": _example_image(rng, height, width),
            "observation/wrist_image_left": _example_image(rng, height, width),
            "observation/joint_position": rng.uniform(-1.0, 1.0, 7),
            "observation/gripper_position": rng.uniform(0.0, 1.0, 1),
            "prompt": EXAMPLE_PROMPT,
        }


class LiberoMapping(RobotMapping):
    name = "libero"
    action_dim = 7
    state_dim = 8
    input_steps, output_steps = robot_steps("libero")
    required = ("observation/image", "observation/wrist_image", "observation/state")
    slots = {"base_0_rgb": "observation/image", "left_wrist_0_rgb": "observation/wrist_image", "right_wrist_0_rgb": None}

    def to_engine(self, obs: Any, default_prompt: str | None = None) -> EngineRequest:
        obs = _check_keys(obs, self.name, self.required, self.optional)
        base = parse_image(obs["observation/image"], "observation/image")
        wrist = parse_image(obs["observation/wrist_image"], "observation/wrist_image")
        return EngineRequest(
            images=[base, wrist, np.zeros_like(base)],
            image_masks=[True, True, False],
            state=parse_vector(obs["observation/state"], "observation/state", self.state_dim),
            prompt=parse_prompt(obs, default_prompt),
        )

    def example_observation(self, seed: int = 0, height: int = 224, width: int = 224, **_: Any) -> dict[str, Any]:
        rng = np.random.default_rng(seed)
        return {
            "observation/image": _example_image(rng, height, width),
            "observation/wrist_image": _example_image(rng, height, width),
            "observation/state": rng.uniform(-1.0, 1.0, 8),
            "prompt": EXAMPLE_PROMPT,
        }


class AlohaMapping(RobotMapping):
    name = "aloha"
    action_dim = 14
    state_dim = 14
    required = ("images", "state")
    cameras = ("cam_high", "cam_low", "cam_left_wrist", "cam_right_wrist")
    slots = {"base_0_rgb": "cam_high", "left_wrist_0_rgb": "cam_left_wrist", "right_wrist_0_rgb": "cam_right_wrist"}

    def __init__(self, adapt_to_pi: bool = True):
        self.adapt_to_pi = bool(adapt_to_pi)
        self.input_steps, self.output_steps = robot_steps(self.name, self.adapt_to_pi)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "cameras": list(self.cameras), "required_cameras": ["cam_high"],
                "adapt_to_pi": self.adapt_to_pi}

    def to_engine(self, obs: Any, default_prompt: str | None = None) -> EngineRequest:
        obs = _check_keys(obs, self.name, self.required, self.optional)
        cams = obs["images"]
        if not isinstance(cams, Mapping):
            raise InputError(f"images must be a map of camera name -> image, got {type(cams).__name__}")
        unknown = sorted(str(k) for k in cams if k not in self.cameras)
        if unknown:
            raise InputError(f"unknown camera(s) {unknown} in images; expected some of {list(self.cameras)}")
        if "cam_high" not in cams:
            raise InputError(f"images has no 'cam_high' (the base camera, required); got {sorted(map(str, cams))}")
        parsed = {name: parse_image(image, f"images/{name}") for name, image in cams.items()}
        base = parsed["cam_high"]
        images, masks = [base], [True]
        for camera in ("cam_left_wrist", "cam_right_wrist"):
            present = camera in parsed
            images.append(parsed[camera] if present else np.zeros_like(base))
            masks.append(present)
        request = EngineRequest(images=images, image_masks=masks, state=parse_vector(obs["state"], "state", self.state_dim),
                                prompt=parse_prompt(obs, default_prompt))
        return apply_inputs(self.input_steps, request)

    def example_observation(self, seed: int = 0, height: int = 224, width: int = 224, **_: Any) -> dict[str, Any]:
        rng = np.random.default_rng(seed)
        return {
            "images": {camera: _example_image(rng, height, width, chw=True) for camera in self.cameras},
            "state": rng.uniform(0.0, 1.0, 14),
            "prompt": EXAMPLE_PROMPT,
        }


class RawMapping(RobotMapping):
    """The engine's own ``predict`` arguments; validated by the engine."""

    name = "raw"
    required = ("images",)
    optional = ("image_masks", "prompt", "prompt_tokens", "state", "noise")

    def __init__(self, num_views: int = 3, state_dim: int | None = None):
        self.num_views = num_views
        self.state_dim = state_dim
        self.slots = {f"view_{i}": "images" for i in range(num_views)}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "num_views": self.num_views}

    def to_engine(self, obs: Any, default_prompt: str | None = None) -> EngineRequest:
        obs = _check_keys(obs, self.name, self.required, self.optional)
        images = obs["images"]
        if not isinstance(images, (np.ndarray, list, tuple)):
            raise InputError(f"images must be an array (V, H, W, 3) or a list of images, got {type(images).__name__}")
        prompt, tokens = obs.get("prompt"), obs.get("prompt_tokens")
        if prompt is not None and not isinstance(prompt, str):
            raise InputError(f"prompt must be a string, got {type(prompt).__name__}")
        if prompt is None and tokens is None:
            if default_prompt is None:
                raise InputError("missing 'prompt' (text) or 'prompt_tokens' (ids); the server has no --default-prompt")
            prompt = default_prompt
        return EngineRequest(
            images=images,
            image_masks=obs.get("image_masks"),
            state=obs.get("state"),
            prompt=prompt,
            prompt_tokens=tokens,
            noise=obs.get("noise"),
        )

    def example_observation(self, seed: int = 0, height: int = 224, width: int = 224, *,
                            text_prompt: bool = True, state_dim: int | None = None, **_: Any) -> dict[str, Any]:
        rng = np.random.default_rng(seed)
        dim = state_dim or self.state_dim or 8
        obs: dict[str, Any] = {
            "images": np.stack([_example_image(rng, height, width) for _ in range(self.num_views)]),
            "state": rng.uniform(-1.0, 1.0, dim).astype(np.float32),
        }
        obs.update(example_prompt(text_prompt))
        return obs


def make_mapping(robot: str, *, adapt_to_pi: bool = True, num_views: int = 3, state_dim: int | None = None) -> RobotMapping:
    """The mapping for ``robot`` (``droid``, ``libero``, ``aloha`` or ``raw``)."""
    key = str(robot).strip().lower()
    if key == "droid":
        return DroidMapping()
    if key == "libero":
        return LiberoMapping()
    if key == "aloha":
        return AlohaMapping(adapt_to_pi=adapt_to_pi)
    if key == "raw":
        return RawMapping(num_views=num_views, state_dim=state_dim)
    raise ConfigError(f"unknown robot {robot!r}; expected one of: {', '.join(ROBOT_NAMES)}")
