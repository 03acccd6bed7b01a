"""An openpi JAX checkpoint (Orbax ``params/``) presented as openpi PyTorch tensors.

:class:`OrbaxCheckpoint` has the interface of :class:`CheckpointFiles`: ``tensors`` names every weight
by its openpi PyTorch key (``paligemma_with_expert...``) with the shape the PyTorch layout gives it, and
``read`` returns one tensor. Opening reads the tree metadata only and checks every leaf against the
dimensions the tree itself implies (one ``CheckpointError`` lists all missing, mis-shaped, unexpected
or non-float leaves and ill-fitting LoRA leaves); the first ``read`` restores the whole tree to host
memory once (as openpi does), merges openpi LoRA leaves, and each ``read`` then slices one leaf.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cortexflow.checkpoints.files import FLOAT_DTYPES, CheckpointFiles, TensorInfo
from cortexflow.checkpoints.key_problems import MAX_NAMES_PER_KIND
from cortexflow.checkpoints.openpi_jax_layout import (
    UNUSED_LEAVES,
    LeafSlice,
    canonical_sources,
    detect_jax_model_type,
    expected_leaf_shapes,
    infer_jax_config,
    lora_pairs,
    lora_shape_problems,
    merge_lora_leaves,
    slice_leaf,
)
from cortexflow.checkpoints.orbax_reader import LeafInfo, numpy_to_torch, read_leaf_infos, restore_arrays
from cortexflow.models.pi0_keys import canonical_to_openpi
from cortexflow.config import ModelConfig
from cortexflow.errors import CheckpointError
from cortexflow.models.pi0 import model_class


def leaf_problems(leaves: dict[str, LeafInfo], config: ModelConfig) -> list[str]:
    """Every way ``leaves`` differ from the tree of ``config``: missing, mis-shaped, unexpected and
    non-float leaves, and LoRA leaves without a partner or that do not fit their weight."""
    expected = expected_leaf_shapes(config)
    pairs = lora_pairs(leaves)
    lora_leaves = {name for pair in pairs.values() for name in pair if name}
    problems: dict[str, list[str]] = {"missing": [], "mis-shaped": [], "unexpected": [], "non-float": [], "LoRA": []}
    for name, shape in expected.items():
        info = leaves.get(name)
        if info is None:
            problems["missing"].append(f"{name} {list(shape)}")
        elif info.shape != shape:
            problems["mis-shaped"].append(f"{name} {list(info.shape)} (expected {list(shape)})")
        elif info.dtype not in FLOAT_DTYPES:
            problems["non-float"].append(f"{name} {info.dtype}")
    for name in sorted(set(leaves) - set(expected) - lora_leaves - set(UNUSED_LEAVES)):
        problems["unexpected"].append(f"{name} {list(leaves[name].shape)}")
    for base, (a, b) in sorted(pairs.items()):
        if a is None or b is None:
            problems["LoRA"].append(f"{a or b}: its {'lora_b' if b is None else 'lora_a'} is missing")
            continue
        if base not in leaves:
            problems["LoRA"].append(f"{a}: its base weight {base} is missing")
            continue
        if why := lora_shape_problems(base, leaves[base].shape, leaves[a].shape, leaves[b].shape):
            problems["LoRA"].append(why)
    out = []
    for label, items in problems.items():
        if items:
            shown = ", ".join(items[:MAX_NAMES_PER_KIND])
            if len(items) > MAX_NAMES_PER_KIND:
                shown += f", ... ({len(items)} in all)"
            out.append(f"{label} leaves: {shown}")
    return out


@dataclass
class OrbaxCheckpoint(CheckpointFiles):
    """The ``params/`` item of an openpi JAX checkpoint, keyed by openpi PyTorch names (see module doc)."""

    params_dir: Path = Path()
    model_config: ModelConfig | None = None
    sources: dict[str, LeafSlice] = field(default_factory=dict)
    lora_merged: list[str] = field(default_factory=list)
    _arrays: dict[str, np.ndarray] | None = None

    @classmethod
    def open_params(cls, params_dir: Path) -> "OrbaxCheckpoint":
        """Read and check the metadata of ``params_dir``; ``CheckpointError`` lists every bad leaf."""
        leaves = read_leaf_infos(params_dir)
        model_type = detect_jax_model_type(leaves)
        if model_type is None:
            sample = ", ".join(sorted(leaves)[:5])
            raise CheckpointError(
                f"{params_dir} is an Orbax checkpoint but not an openpi Pi0/Pi0.5 one: no 'PaliGemma/...' "
                f"leaves (found e.g. {sample})"
            )
        config = infer_jax_config({name: info.shape for name, info in leaves.items()}, model_type)
        problems = leaf_problems(leaves, config)
        if problems:
            raise CheckpointError(
                f"{params_dir} does not match the openpi {model_type.value} parameter tree: " + "; ".join(problems)
            )
        openpi_names = canonical_to_openpi(config)
        shapes = model_class(model_type)(config).get_weight_shapes()
        sources, tensors = {}, {}
        for canonical, source in canonical_sources(config).items():
            key = openpi_names[canonical]
            sources[key] = source
            tensors[key] = TensorInfo(file=params_dir, shape=tuple(shapes[canonical]), dtype=leaves[source.leaf].dtype)
        root = params_dir.parent if params_dir.name == "params" else params_dir
        return cls(
            root=root,
            files=[params_dir],
            tensors=tensors,
            config=_checkpoint_config(root, config),
            params_dir=params_dir,
            model_config=config,
            sources=sources,
            lora_merged=sorted(lora_pairs(leaves)),
        )

    def read(self, name: str) -> torch.Tensor:
        """One tensor in the openpi PyTorch layout (CPU, stored dtype; fp32 where LoRA was merged)."""
        if self._arrays is None:
            self._arrays = merge_lora_leaves(restore_arrays(self.params_dir))
        return numpy_to_torch(slice_leaf(self._arrays, self.sources[name]))


def _checkpoint_config(root: Path, config: ModelConfig) -> dict:
    """``config.json`` beside ``params/`` when there is one, plus the SigLIP head count the tree shows
    (under the Hugging Face PaliGemma key ``vision_config.num_attention_heads``)."""
    data: dict = {}
    path = root / "config.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except ValueError as err:
            raise CheckpointError(f"{path} is not valid JSON: {err}") from err
        if not isinstance(data, dict):
            raise CheckpointError(f"{path} must hold a JSON object, found {type(data).__name__}")
    vision = dict(data.get("vision_config") or {})
    vision["num_attention_heads"] = config.num_vision_heads
    return {**data, "vision_config": vision}
