"""A LeRobot Pi0 / Pi0.5 folder's processor files read as a :class:`~cortexflow.policies.pipeline.PolicyPipeline`.

Reads ``config.json`` (``type``, ``input_features``, ``output_features``, ``empty_cameras``, ``chunk_size``),
``policy_preprocessor.json`` and ``policy_postprocessor.json`` (``docs/reference_facts.md#S-LR``) and the
normaliser stats safetensors their normaliser steps name. Steps are found by ``registry_name``, never by index;
a step this reader does not know is an error naming it (nothing is skipped silently).

Pipeline built: camera slots from the VISUAL ``input_features`` in file order plus ``empty_cameras`` -> normalise
``observation.state`` in the mode ``norm_map`` gives its feature type (LeRobot numerics) -> prompt (Pi0: prompt +
"\\n" as one string; Pi0.5: the state's bins in the prompt) -> model -> keep the ``output_features`` action
width -> un-normalise -> absolute actions (``relative_actions_processor`` mask) when enabled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cortexflow.config import VLAModelType
from cortexflow.errors import CheckpointError, ConfigError
from cortexflow.policies.normalize import FeatureNormalizer
from cortexflow.policies.pipeline import PolicyPipeline
from cortexflow.policies.transforms import AbsoluteActions, CameraSlots, SliceActions, Unnormalize
from cortexflow.processing.normalization import load_norm_stats

PREPROCESSOR_FILE = "policy_preprocessor.json"
POSTPROCESSOR_FILE = "policy_postprocessor.json"
STATE_KEY, ACTION_KEY = "observation.state", "action"
#: Steps that change nothing for CortexFlow's engine: it batches, places tensors and takes images in slot order.
PASS_THROUGH_STEPS = {"to_batch_processor", "device_processor", "rename_observations_processor"}
PRE_STEPS = PASS_THROUGH_STEPS | {"pi0_new_line_processor", "tokenizer_processor", "relative_actions_processor",
                                  "normalizer_processor", "pi05_prepare_state_tokenizer_processor_step"}
POST_STEPS = PASS_THROUGH_STEPS | {"unnormalizer_processor", "absolute_actions_processor"}


def has_lerobot_processors(folder: str | Path) -> bool:
    """Whether ``folder`` holds LeRobot's ``policy_preprocessor.json``."""
    return Path(folder).is_dir() and (Path(folder) / PREPROCESSOR_FILE).is_file()


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; a LeRobot policy folder has config.json, {PREPROCESSOR_FILE} "
                              f"and {POSTPROCESSOR_FILE}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}; expected a JSON object")
    return data


def _steps(path: Path, known: set[str]) -> dict[str, dict]:
    """``{registry_name: step}`` of a processor file; unknown or unregistered steps are one error naming them."""
    data = _read_json(path)
    steps = data.get("steps")
    if not isinstance(steps, list):
        raise CheckpointError(f"{path} has no 'steps' list")
    by_name, unknown = {}, []
    for index, step in enumerate(steps):
        name = step.get("registry_name") if isinstance(step, dict) else None
        if name is None:
            what = f"class {step.get('class')}" if isinstance(step, dict) else f"not a step object: {step!r}"
            unknown.append(f"step {index}: {what}")
        elif name not in known:
            unknown.append(f"step {index}: {name}")
        else:
            by_name[name] = step
    if unknown:
        raise ConfigError(f"{path} has processor steps CortexFlow does not implement: {'; '.join(unknown)}; "
                          f"known steps: {', '.join(sorted(known))}")
    return by_name


def relative_mask(action_dim: int, exclude_joints: list[str] | None, action_names: list[str] | None) -> tuple[bool, ...]:
    """LeRobot's relative-action mask over ``action_dim`` dims: dim i stays absolute when a lower-cased exclude
    token equals or is a substring of the lower-cased name i; without names or exclusions every dim is relative."""
    if not action_names or not exclude_joints:
        return (True,) * action_dim
    tokens = [str(token).lower() for token in exclude_joints]
    mask = []
    for i in range(action_dim):
        name = str(action_names[i]).lower() if i < len(action_names) else None
        mask.append(name is None or not any(token in name for token in tokens))
    return tuple(mask)


def _normalizer(folder: Path, step: dict | None, key: str, feature: str) -> FeatureNormalizer | None:
    """The normaliser of ``key`` in a (un)normaliser step: its mode from ``norm_map`` and the feature's type, its
    stats from the step's ``state_file``. None (pass-through) when the step, the feature or its stats are absent."""
    if step is None:
        return None
    config = step.get("config") or {}
    features, norm_map = config.get("features") or {}, config.get("norm_map") or {}
    if key not in features or "state_file" not in step:
        return None
    mode = str(norm_map.get(features[key].get("type"), "IDENTITY")).upper()
    path = folder / step["state_file"]
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the {step['registry_name']} step names it as its stats file")
    stats = load_norm_stats(path)["state" if key == STATE_KEY else "actions"]
    return FeatureNormalizer(feature, mode, stats, convention="lerobot", eps=float(config.get("eps", 1e-8)))


def lerobot_pipeline(folder: str | Path, state_prompt_width: int | None = None) -> PolicyPipeline:
    """The pipeline LeRobot's processor files in ``folder`` describe. ``state_prompt_width``: zero-pad the
    normalised state to this width before Pi0.5 writes it into the prompt (LeRobot 0.4.x padded to
    ``max_state_dim``; 0.5 and later do not, and nothing in the files records the version)."""
    folder = Path(folder)
    config = _read_json(folder / "config.json")
    kind = str(config.get("type", "")).lower()
    if kind not in ("pi0", "pi05"):
        raise ConfigError(f"{folder}/config.json has type {config.get('type')!r}; CortexFlow reads pi0 and pi05 policies")
    model_type = VLAModelType.parse(kind)
    pre = _steps(folder / PREPROCESSOR_FILE, PRE_STEPS)
    post = _steps(folder / POSTPROCESSOR_FILE, POST_STEPS)

    features: dict[str, Any] = config.get("input_features") or {}
    cameras = tuple(name for name, spec in features.items() if str(spec.get("type")).upper() == "VISUAL")
    empty = int(config.get("empty_cameras", 0) or 0)
    if not cameras and not empty:
        raise ConfigError(f"{folder}/config.json lists no VISUAL input_features and no empty_cameras")
    state_dim = int(features[STATE_KEY]["shape"][0]) if STATE_KEY in features else None
    action_dim = int(((config.get("output_features") or {}).get(ACTION_KEY) or {}).get("shape", [0])[0]) or None

    state_norm = _normalizer(folder, pre.get("normalizer_processor"), STATE_KEY, "state")
    action_norm = _normalizer(folder, post.get("unnormalizer_processor"), ACTION_KEY, "actions")
    outputs: list = [SliceActions(action_dim)] if action_dim else []
    if action_norm is not None:
        outputs.append(Unnormalize(action_norm))
    absolute = (post.get("absolute_actions_processor") or {}).get("config", {}).get("enabled", False)
    relative = pre.get("relative_actions_processor")
    if absolute:
        if relative is None:
            raise ConfigError(f"{folder}/{POSTPROCESSOR_FILE} adds the state back (absolute_actions_processor) but "
                              f"{PREPROCESSOR_FILE} has no relative_actions_processor giving its mask")
        rel = relative.get("config") or {}
        width = action_dim or state_dim or 0
        outputs.append(AbsoluteActions(relative_mask(width, rel.get("exclude_joints"), rel.get("action_names"))))

    tokenizer = (pre.get("tokenizer_processor") or {}).get("config") or {}
    overrides: dict[str, Any] = {"discrete_state_input": "pi05_prepare_state_tokenizer_processor_step" in pre}
    if tokenizer.get("max_length") or config.get("tokenizer_max_length"):
        overrides["max_token_len"] = int(tokenizer.get("max_length") or config["tokenizer_max_length"])
    if config.get("chunk_size"):
        overrides["chunk_size"] = int(config["chunk_size"])
    notes = []
    saved_tokenizer = folder / str(tokenizer.get("tokenizer_name", ""))
    tokenizer_path = str(saved_tokenizer) if tokenizer.get("tokenizer_name") and saved_tokenizer.is_dir() else None
    rename = ((pre.get("rename_observations_processor") or {}).get("config") or {}).get("rename_map")
    if rename:
        notes.append(f"rename_map {rename} applies to observation keys; images are taken in camera order")
    if state_norm is None:
        notes.append("the state is not normalised (no normaliser stats for observation.state)")
    return PolicyPipeline(
        name=folder.name,
        source=f"LeRobot processors in {folder}",
        model_type=model_type,
        model_overrides=overrides,
        input_steps=(CameraSlots(cameras, empty),),
        state_normalizer=state_norm,
        output_steps=tuple(outputs),
        num_views=len(cameras) + empty,
        state_dim=state_dim,
        prompt_format="lerobot" if "pi0_new_line_processor" in pre else "openpi",
        state_prompt_width=state_prompt_width,
        tokenizer_path=tokenizer_path,
        notes=notes,
    )
