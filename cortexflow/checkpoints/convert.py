"""``cortexflow convert``: write any Pi0-family checkpoint CortexFlow reads as a plain safetensors folder.

The main use is an openpi JAX checkpoint (Orbax ``params/``): the result loads without JAX. A LoRA
adapter folder is written merged into its base. The destination holds

- ``model.safetensors``: every tensor of the source under its key (openpi PyTorch keys for Orbax; the
  base's own layout for an adapter), validated first as the loader validates it;
- ``config.json``: the source's ``config.json`` fields (if any) plus ``model_type``, ``action_dim``,
  ``precision`` and the SigLIP head count (``vision_config.num_attention_heads``), which the tensor
  shapes do not show;
- ``assets/``: a copy of the source's ``assets/`` folder (openpi norm stats, ``assets/<asset_id>/norm_stats.json``).

``dtype="stored"`` keeps every tensor's dtype (a LoRA-merged tensor is fp32); ``"float32"`` casts all
float tensors; ``"bfloat16"`` casts them except those openpi's PyTorch model keeps in fp32 (patch and
position embedding, every RMSNorm weight and adaptive-norm dense layer).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from cortexflow.checkpoints.loader import inspect_checkpoint
from cortexflow.checkpoints.sources import open_checkpoint
from cortexflow.errors import CheckpointError, ConfigError

DTYPES = {"stored": None, "float32": torch.float32, "bfloat16": torch.bfloat16}
KEPT_IN_FP32 = ("embeddings.patch_embedding.", "embeddings.position_embedding.", "input_layernorm",
                "post_attention_layernorm", "model.norm")


@dataclass(frozen=True)
class ConversionResult:
    """What ``convert_checkpoint`` wrote."""

    destination: Path
    model_type: str
    layout: str
    num_tensors: int
    total_bytes: int
    assets: list[str]


def _target_dtype(key: str, tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is None or not tensor.is_floating_point():
        return tensor.dtype
    if dtype == torch.bfloat16 and any(part in key for part in KEPT_IN_FP32):
        return torch.float32
    return dtype


def convert_checkpoint(
    source: "str | Path",
    destination: "str | Path",
    dtype: str = "stored",
    base_checkpoint: "str | Path | None" = None,
) -> ConversionResult:
    """Write ``source`` (any checkpoint :func:`open_checkpoint` reads) to the folder ``destination`` as
    ``model.safetensors`` + ``config.json`` + ``assets/`` (see module doc). ``destination`` must not
    hold a ``model.safetensors`` yet."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    source, destination = Path(source).expanduser(), Path(destination).expanduser()
    if (destination / "model.safetensors").exists():
        raise CheckpointError(f"{destination / 'model.safetensors'} exists already; remove it or choose another folder")
    files = open_checkpoint(source, base_checkpoint)
    report = inspect_checkpoint(source, None, files)
    if not report.ok:
        raise CheckpointError(f"{source} does not match the {report.model_type.value} architecture: {report.problems()}")
    tensors = {}
    for key in files.tensors:
        tensor = files.read(key)
        tensors[key] = tensor.to(_target_dtype(key, tensor, DTYPES[dtype])).contiguous()
    destination.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(destination / "model.safetensors"))
    config = {
        **files.config,
        "model_type": report.model_type.value,
        "action_dim": report.config.action_dim,
        "precision": dtype,
        "vision_config": {**(files.config.get("vision_config") or {}),
                          "num_attention_heads": report.config.num_vision_heads},
    }
    (destination / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    assets = []
    if (files.root / "assets").is_dir():
        shutil.copytree(files.root / "assets", destination / "assets", dirs_exist_ok=True)
        assets = sorted(str(p.relative_to(destination)) for p in (destination / "assets").rglob("*") if p.is_file())
    return ConversionResult(
        destination=destination,
        model_type=report.model_type.value,
        layout=report.layout,
        num_tensors=len(tensors),
        total_bytes=sum(t.numel() * t.element_size() for t in tensors.values()),
        assets=assets,
    )
