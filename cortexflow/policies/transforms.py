"""Composable steps around a Pi0 / Pi0.5 model, like openpi's transform groups and LeRobot's processor steps.

Input steps take and return an :class:`EngineRequest` (images in slot order, masks, the robot state, the prompt)
before the state is normalised and the prompt tokenised. Output steps take the action chunk ``(..., H, W)`` and
the robot state ``(..., D)`` the input steps produced (``None`` when the call had none) and return the new chunk.
Every step has ``describe()``, one line for ``cortexflow info``.

ALOHA's conversion (``adapt_to_pi``) uses the constants openpi has used since 2025-07
(``docs/reference_facts.md#F-OP-4``): Pi gripper angles span (0.5476, 1.6296) rad.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import numpy as np

from cortexflow.errors import ConfigError, InputError
from cortexflow.policies.normalize import FeatureNormalizer


@dataclass
class EngineRequest:
    """One observation as ``VLAInferenceEngine.predict`` arguments."""

    images: Any
    image_masks: Any = None
    state: np.ndarray | None = None
    prompt: str | None = None
    prompt_tokens: Any = None
    noise: Any = None


# ---- ALOHA <-> Pi conventions (openpi aloha_policy, adapt_to_pi=True) -----------------------------------------
ALOHA_JOINT_FLIP = np.array([1, -1, -1, 1, 1, 1, 1, 1, -1, -1, 1, 1, 1, 1], dtype=np.float64)
ALOHA_GRIPPERS = [6, 13]
PUPPET_GRIPPER_POSITION = (0.01844, 0.05800)  # open, closed linear positions (ALOHA runtime)
PUPPET_GRIPPER_JOINT = (-0.6213, 1.4910)  # joint angle range the ALOHA runtime expects
PI_GRIPPER_ANGLE = (0.5476, 1.6296)  # gripper angle range of Pi's training space, radians
GRIPPER_ARM_LENGTH, GRIPPER_HORN_RADIUS = 0.036, 0.022


def aloha_gripper_to_angular(value: np.ndarray) -> np.ndarray:
    """ALOHA's normalised linear gripper position -> Pi's normalised gripper angle (0 open, 1 closed)."""
    low, high = PUPPET_GRIPPER_POSITION
    linear = value * (high - low) + low
    a, r = GRIPPER_ARM_LENGTH, GRIPPER_HORN_RADIUS
    with np.errstate(divide="ignore", invalid="ignore"):
        angle = np.arcsin(np.clip((r * r + linear * linear - a * a) / (2.0 * r * linear), -1.0, 1.0))
    return (angle - PI_GRIPPER_ANGLE[0]) / (PI_GRIPPER_ANGLE[1] - PI_GRIPPER_ANGLE[0])


def aloha_gripper_from_angular(value: np.ndarray) -> np.ndarray:
    """A predicted gripper value (radians, as trossen-trained models emit) -> ALOHA's normalised gripper joint
    command: ``(a + 0.5476 - (-0.6213)) / (1.4910 - (-0.6213))``."""
    low, high = PUPPET_GRIPPER_JOINT
    return (value + PI_GRIPPER_ANGLE[0] - low) / (high - low)


def make_bool_mask(*dims: int) -> tuple[bool, ...]:
    """openpi ``make_bool_mask``: a positive n appends n True, a negative n appends |n| False."""
    mask: list[bool] = []
    for n in dims:
        mask.extend([n > 0] * abs(int(n)))
    return tuple(mask)


# ---- input steps ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InjectDefaultPrompt:
    """Use ``prompt`` when the call has neither a prompt nor prompt tokens (openpi ``InjectDefaultPrompt``)."""

    prompt: str

    def __call__(self, request: EngineRequest) -> EngineRequest:
        if request.prompt is None and request.prompt_tokens is None:
            return replace(request, prompt=self.prompt)
        return request

    def describe(self) -> str:
        return f"default prompt {self.prompt!r} when none is given"


@dataclass(frozen=True)
class AlohaStateToPi:
    """ALOHA state (14: left joints 6, left gripper, right joints 6, right gripper) -> Pi's space: joints 1 and 2
    of each arm negated, grippers converted from linear position to normalised angle (``_decode_state``)."""

    def __call__(self, request: EngineRequest) -> EngineRequest:
        if request.state is None:
            return request
        state = np.asarray(request.state, dtype=np.float64)
        if state.shape[-1] != len(ALOHA_JOINT_FLIP):
            raise InputError(f"an ALOHA state has {len(ALOHA_JOINT_FLIP)} values, got shape {state.shape}")
        state = ALOHA_JOINT_FLIP * state
        state[..., ALOHA_GRIPPERS] = aloha_gripper_to_angular(state[..., ALOHA_GRIPPERS])
        return replace(request, state=state.astype(np.float32))

    def describe(self) -> str:
        return "ALOHA state -> Pi space: flip joints 1, 2 of each arm; grippers linear -> angle (2025-07 constants)"


@dataclass(frozen=True)
class CameraSlots:
    """LeRobot camera slots: ``images`` as ``{camera: image}`` or a list of the ``cameras`` in order; cameras not
    given, and the ``empty`` placeholder slots at the end, become black images with mask False. Present cameras
    come first in ``cameras`` order, missing ones after them (LeRobot's slot order)."""

    cameras: tuple[str, ...]
    empty: int = 0

    @property
    def num_views(self) -> int:
        return len(self.cameras) + self.empty

    def __call__(self, request: EngineRequest) -> EngineRequest:
        images = request.images
        if isinstance(images, Mapping):
            unknown = sorted(str(k) for k in images if k not in self.cameras)
            if unknown:
                raise InputError(f"unknown camera(s) {unknown}; this policy's cameras are {list(self.cameras)}")
            present = [images[name] for name in self.cameras if name in images]
        elif (isinstance(images, np.ndarray) and images.ndim == 4) or isinstance(images, (list, tuple)):
            present = list(images)
            if len(present) > len(self.cameras) + self.empty:
                raise InputError(f"got {len(present)} images; this policy has cameras {list(self.cameras)} "
                                 f"and {self.empty} empty slot(s)")
            if len(present) == self.num_views:
                return request
        else:
            raise InputError("images must be a map {camera: image} or a list of images in camera order "
                             f"{list(self.cameras)}, got {type(images).__name__}")
        if not present:
            raise InputError(f"no camera image given; expected some of {list(self.cameras)}")
        blank = np.zeros_like(np.asarray(present[0]))
        fill = self.num_views - len(present)
        masks = [True] * len(present) + [False] * fill
        return replace(request, images=[*present, *([blank] * fill)], image_masks=masks)

    def describe(self) -> str:
        empty = f" + {self.empty} empty slot(s)" if self.empty else ""
        return f"camera slots {list(self.cameras)}{empty}; missing cameras black with mask False"


# ---- output steps ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Unnormalize:
    """Actions back to robot units with the actions' :class:`FeatureNormalizer`."""

    normalizer: FeatureNormalizer

    def __call__(self, actions: np.ndarray, state: np.ndarray | None) -> np.ndarray:
        return self.normalizer.unnormalize(actions)

    def inverse(self, actions: np.ndarray, state: np.ndarray | None) -> np.ndarray:
        """Robot-unit actions ``(..., W)`` normalised again (dims past the statistics as given)."""
        dim, width = self.normalizer.dim, actions.shape[-1]
        if dim is None:
            return self.normalizer.normalize(actions)
        padded = np.zeros((*actions.shape[:-1], dim), dtype=np.float32)
        padded[..., : min(width, dim)] = actions[..., :dim]
        head = self.normalizer.normalize(padded)[..., : min(width, dim)]
        return np.concatenate([head, actions[..., dim:]], axis=-1).astype(np.float32)

    def describe(self) -> str:
        return f"un-normalise actions: {self.normalizer.describe()}"


@dataclass(frozen=True)
class AbsoluteActions:
    """Delta -> absolute: ``a[..., :m] += where(mask, state[:m], 0)`` over the horizon (openpi ``AbsoluteActions``,
    LeRobot ``absolute_actions_processor``). ``state`` is the robot state after the input steps, un-normalised."""

    mask: tuple[bool, ...]

    def __call__(self, actions: np.ndarray, state: np.ndarray | None) -> np.ndarray:
        if state is None:
            raise InputError("this policy predicts actions relative to the robot state: pass state=")
        width = min(len(self.mask), actions.shape[-1], np.asarray(state).shape[-1])
        mask = np.asarray(self.mask[:width], dtype=bool)
        offset = np.where(mask, np.asarray(state, dtype=np.float32)[..., :width], 0.0)
        out = np.array(actions, dtype=np.float32)
        out[..., :width] += offset[..., None, :]
        return out

    def inverse(self, actions: np.ndarray, state: np.ndarray | None) -> np.ndarray:
        """Absolute -> delta against ``state`` (the state of the call the deltas are for)."""
        if state is None:
            raise InputError("this policy predicts actions relative to the robot state: pass state=")
        width = min(len(self.mask), actions.shape[-1], np.asarray(state).shape[-1])
        offset = np.where(np.asarray(self.mask[:width], dtype=bool), np.asarray(state, dtype=np.float32)[..., :width], 0.0)
        out = np.array(actions, dtype=np.float32)
        out[..., :width] -= offset[..., None, :]
        return out

    def describe(self) -> str:
        relative = [i for i, m in enumerate(self.mask) if m]
        return f"absolute actions: add the state to dims {_ranges(relative)} (of {len(self.mask)})"


@dataclass(frozen=True)
class SliceActions:
    """Keep the first ``width`` action dimensions (the robot's; the rest is zero-padding)."""

    width: int

    def __call__(self, actions: np.ndarray, state: np.ndarray | None) -> np.ndarray:
        if actions.shape[-1] < self.width:
            raise ConfigError(f"the model returns {actions.shape[-1]}-D actions; this policy needs {self.width}")
        return np.ascontiguousarray(actions[..., : self.width])

    def inverse(self, actions: np.ndarray, state: np.ndarray | None) -> np.ndarray:
        """The kept dims as they are (the dims sliced off are not recovered: the caller pads them)."""
        return np.asarray(actions, dtype=np.float32)

    def describe(self) -> str:
        return f"keep action dims 0..{self.width - 1}"


@dataclass(frozen=True)
class AlohaActionsFromPi:
    """Pi-space actions (14) -> ALOHA: joints 1 and 2 of each arm negated, grippers to ALOHA's joint command."""

    def __call__(self, actions: np.ndarray, state: np.ndarray | None) -> np.ndarray:
        out = ALOHA_JOINT_FLIP * np.asarray(actions[..., : len(ALOHA_JOINT_FLIP)], dtype=np.float64)
        out[..., ALOHA_GRIPPERS] = aloha_gripper_from_angular(out[..., ALOHA_GRIPPERS])
        return out.astype(np.float32)

    def inverse(self, actions: np.ndarray, state: np.ndarray | None) -> np.ndarray:
        """ALOHA actions -> Pi space: grippers from ALOHA's joint command back to angles, joints flipped again."""
        low, high = PUPPET_GRIPPER_JOINT
        out = np.array(actions[..., : len(ALOHA_JOINT_FLIP)], dtype=np.float64)
        out[..., ALOHA_GRIPPERS] = out[..., ALOHA_GRIPPERS] * (high - low) + low - PI_GRIPPER_ANGLE[0]
        return (ALOHA_JOINT_FLIP * out).astype(np.float32)

    def describe(self) -> str:
        return "Pi actions -> ALOHA: flip joints 1, 2 of each arm; grippers angle -> joint command (2025-07 constants)"


def _ranges(indices: Sequence[int]) -> str:
    """``[0, 1, 2, 4]`` -> ``"0-2, 4"``."""
    parts, start = [], None
    for i, index in enumerate(indices):
        if start is None:
            start = index
        if i + 1 == len(indices) or indices[i + 1] != index + 1:
            parts.append(str(start) if start == index else f"{start}-{index}")
            start = None
    return ", ".join(parts) or "none"


def robot_steps(robot: str, adapt_to_pi: bool = True) -> tuple[tuple, tuple]:
    """(input steps, output steps) of openpi's robot adapters: DROID keeps 8 action dims, LIBERO 7, ALOHA 14
    with the Pi conversion both ways when ``adapt_to_pi``; ``raw`` has none."""
    key = str(robot).strip().lower()
    if key == "droid":
        return (), (SliceActions(8),)
    if key == "libero":
        return (), (SliceActions(7),)
    if key == "aloha":
        if adapt_to_pi:
            return (AlohaStateToPi(),), (SliceActions(14), AlohaActionsFromPi())
        return (), (SliceActions(14),)
    if key == "raw":
        return (), ()
    raise ConfigError(f"unknown robot {robot!r}; expected one of: droid, libero, aloha, raw")


def apply_inputs(steps: Sequence[Any], request: EngineRequest) -> EngineRequest:
    """``request`` through each input step in order."""
    for step in steps:
        request = step(request)
    return request


def apply_outputs(steps: Sequence[Any], actions: np.ndarray, state: np.ndarray | None) -> np.ndarray:
    """``actions`` through each output step in order, every step seeing ``state``."""
    out = np.asarray(actions, dtype=np.float32)
    for step in steps:
        out = step(out, state)
    return np.asarray(out, dtype=np.float32)


def invert_outputs(steps: Sequence[Any], actions: np.ndarray, state: np.ndarray | None) -> np.ndarray:
    """Robot actions back through each output step's ``inverse`` in reverse order (to the model's normalised
    space, without the padding dims a slice removed); a step without ``inverse`` is a ConfigError naming it."""
    out = np.asarray(actions, dtype=np.float32)
    for step in reversed(tuple(steps)):
        inverse = getattr(step, "inverse", None)
        if inverse is None:
            raise ConfigError(f"the output step {type(step).__name__} ({step.describe()}) has no inverse, so "
                              "previous actions cannot be mapped back to the model's space")
        out = inverse(out, state)
    return np.asarray(out, dtype=np.float32)
