"""PaliGemma weights for the RT-2-style policy, read from openpi PyTorch / LeRobot checkpoints.

The same key layouts as Pi0 (``models/pi0_keys.py``): the SigLIP tower, the projector and the Gemma-2B
language model, plus the language model's final norm (``...language_model.norm.weight``), which Pi0
never reads but a token-decoding head needs. The action expert and Pi0's action heads, when present,
are skipped without being read, so a Pi0 / Pi0.5 checkpoint also provides a backbone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Collection

import torch

from cortexflow.checkpoints.files import FLOAT_DTYPES, CheckpointFiles
from cortexflow.checkpoints.loader import infer_model_config
from cortexflow.config import VLAModelType
from cortexflow.errors import CheckpointError, ConfigError
from cortexflow.models.rt2 import RT2Config, RT2Model
from cortexflow.models.rt2_keys import RT2Match, match_rt2_keys  # noqa: F401


def rt2_config_from_checkpoint(files: CheckpointFiles, overrides: Any = None) -> RT2Config:
    """The PaliGemma dimensions from the tensor shapes, then ``overrides`` (an ``RT2Config`` or a mapping of
    RT-2 / ``ModelConfig`` fields)."""
    if isinstance(overrides, RT2Config):
        return overrides
    shapes = {name: info.shape for name, info in files.tensors.items()}
    backbone = infer_model_config(shapes, {}, VLAModelType.PI0)
    config = RT2Config(paligemma=backbone)
    if overrides:
        config = config.replace(**dict(overrides))
    return config


def open_rt2_checkpoint(path: str | Path, model_config: Any = None) -> tuple[RT2Model, CheckpointFiles]:
    """The policy a checkpoint's headers describe (no tensor read) and its files; ``CheckpointError`` when they
    give no valid RT-2 configuration."""
    files = CheckpointFiles.open(path)
    try:
        config = rt2_config_from_checkpoint(files, model_config)
        config.validate()
    except ConfigError as err:
        raise CheckpointError(f"{path}: cannot derive a valid RT-2 configuration: {err}") from err
    return RT2Model(config), files


def load_rt2_checkpoint(path: str | Path, device: torch.device, dtype: torch.dtype, model_config: Any = None,
                        skip: Collection[str] = ()):
    """Validate and load the PaliGemma part of a checkpoint. Returns ``(model, weights, match)``. ``skip``:
    canonical names left out of ``weights`` and never read from disk (those an FP8 cache entry replaces); their
    headers are validated like every other tensor's."""
    model, files = open_rt2_checkpoint(path, model_config)
    expected = model.get_weight_shapes()
    match = match_rt2_keys(files.tensors, model.config, expected)
    match.raise_if_bad(str(path))
    problems = []
    for name, raw in match.sources.items():
        info = files.tensors[raw]
        if tuple(info.shape) != tuple(expected[name]):
            problems.append(f"{raw} {list(info.shape)} (expected {list(expected[name])})")
        elif info.dtype not in FLOAT_DTYPES:
            problems.append(f"{raw} {info.dtype} (expected a float type)")
    if problems:
        raise CheckpointError(f"{path}: mis-shaped or wrongly typed tensors: {', '.join(problems[:20])}")
    weights = {}
    for name, raw in match.sources.items():
        if name in skip:
            continue
        tensor = files.read(raw).to(device=device, dtype=model.weight_dtype(name, dtype))
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"tensor {raw!r} in {path} contains NaN or inf values")
        weights[name] = tensor
    return model, weights, match

