"""PaliGemma weights for the RT-2-style policy, read from openpi PyTorch / LeRobot checkpoints.

The same key layouts as Pi0 (``pi0_layout.py``): the SigLIP tower, the projector and the Gemma-2B
language model, plus the language model's final norm (``...language_model.norm.weight``), which Pi0
never reads but a token-decoding head needs. The action expert and Pi0's action heads, when present,
are skipped without being read, so a Pi0 / Pi0.5 checkpoint also provides a backbone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from cortexflow.checkpoints.files import FLOAT_DTYPES, CheckpointFiles
from cortexflow.checkpoints.loader import infer_model_config
from cortexflow.checkpoints.pi0_layout import (
    EMBEDDING_KEYS,
    EXPERT,
    LANGUAGE,
    PI0_HEADS,
    PI05_HEADS,
    canonical_to_openpi,
    detect_layout,
    to_openpi_key,
)
from cortexflow.config import VLAModelType
from cortexflow.errors import CheckpointError, ConfigError
from cortexflow.models.rt2 import RT2Config, RT2Model

FINAL_NORM = LANGUAGE + "norm.weight"
_SKIPPED_PREFIXES = (EXPERT, "paligemma_with_expert.gemma_expert.", "time_mlp_")
_SKIPPED_HEADS = tuple(f"{h}." for h in (*PI0_HEADS, *PI05_HEADS))


@dataclass
class RT2Match:
    """How a checkpoint's keys map onto the RT-2 model's canonical names."""

    layout: str
    sources: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def raise_if_bad(self, what: str) -> None:
        if self.missing or self.unexpected:
            raise CheckpointError(
                f"{what} does not hold a PaliGemma backbone for the RT-2-style policy: "
                f"missing {self.missing[:20]}{' ...' if len(self.missing) > 20 else ''}; "
                f"unexpected {self.unexpected[:20]}{' ...' if len(self.unexpected) > 20 else ''}"
            )


def canonical_to_paligemma(config: RT2Config) -> dict[str, str]:
    """Canonical RT-2 weight name -> openpi key (vision, projector, language model and its final norm)."""
    wanted = set(RT2Model(config).get_weight_shapes())
    names = {k: v for k, v in canonical_to_openpi(config.paligemma).items() if k in wanted}
    names["llm.norm"] = FINAL_NORM
    return names


def match_rt2_keys(raw_keys: Iterable[str], config: RT2Config) -> RT2Match:
    """Map raw keys (openpi, LeRobot or legacy LeRobot spelling) onto the canonical names."""
    raw_keys = list(raw_keys)
    layout = detect_layout(raw_keys)
    by_openpi = {to_openpi_key(k, layout): k for k in raw_keys}
    match = RT2Match(layout=layout)
    used: set[str] = set()
    for canonical, key in canonical_to_paligemma(config).items():
        candidates = EMBEDDING_KEYS if canonical == "llm.embed" else (key,)
        found = [by_openpi[c] for c in candidates if c in by_openpi]
        if found:
            match.sources[canonical] = found[0]
            used.update(found)
        else:
            match.missing.append(f"{key} ({canonical})")
    for key, raw in by_openpi.items():
        if raw in used:
            continue
        if key.startswith(_SKIPPED_PREFIXES) or key.startswith(_SKIPPED_HEADS):
            match.skipped.append(raw)
        else:
            match.unexpected.append(raw)
    return match


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


def load_rt2_checkpoint(path: str | Path, device: torch.device, dtype: torch.dtype, model_config: Any = None):
    """Validate and load the PaliGemma part of a checkpoint. Returns ``(model, weights, match)``."""
    files = CheckpointFiles.open(path)
    try:
        config = rt2_config_from_checkpoint(files, model_config)
        config.validate()
    except ConfigError as err:
        raise CheckpointError(f"{path}: cannot derive a valid RT-2 configuration: {err}") from err
    model = RT2Model(config)
    match = match_rt2_keys(files.tensors, config)
    match.raise_if_bad(str(path))
    expected = model.get_weight_shapes()
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
        tensor = files.read(raw).to(device=device, dtype=model.weight_dtype(name, dtype))
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"tensor {raw!r} in {path} contains NaN or inf values")
        weights[name] = tensor
    return model, weights, match

