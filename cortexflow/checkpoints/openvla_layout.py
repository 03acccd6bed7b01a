"""OpenVLA checkpoints in the Hugging Face layout: key map, detection, config, validation and loading.

The folder holds ``model.safetensors.index.json`` + shards (bf16), ``config.json`` (``OpenVLAConfig``
with ``norm_stats`` and ``text_config``), optionally ``dataset_statistics.json``, and the Llama
``tokenizer.model``. Keys (``docs/reference_facts.md#F-OV-1``): ``vision_backbone.featurizer.*`` (DINOv2, LayerScale as
``ls{1,2}.scale_factor``; Prismatic's ``.gamma`` is accepted too), ``vision_backbone.fused_featurizer.*``
(SigLIP), ``projector.fc{1,2,3}.*``, ``language_model.model.*`` and ``language_model.lm_head.weight``.
The blocks after each tower's output block, the towers' final norms and SigLIP's attention-pool head are
present but never used: they are skipped without being read.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Mapping

import torch

from cortexflow.checkpoints.files import FLOAT_DTYPES, CheckpointFiles
from cortexflow.checkpoints.key_problems import KeyProblems
from cortexflow.config import VLAModelType
from cortexflow.errors import CheckpointError, ConfigError
from cortexflow.models.openvla import OpenVLAConfig, OpenVLAModel

from cortexflow.models.openvla_keys import (  # noqa: F401
    DINO_HEAD_DIM,
    FEATURIZER,
    FUSED,
    LANGUAGE,
    LLAMA_HEAD_DIM,
    LM_HEAD,
    SIGLIP_HEAD_DIM,
    OpenVLAMatch,
    canonical_to_hf,
    is_openvla_checkpoint,
    match_openvla_keys,
    to_canonical_tensor,
)


def _raw_shape_ok(raw: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    return raw == tuple(expected) or raw == (1, *expected) or (len(expected) == 1 and raw == (1, 1, *expected))


def _blocks(keys: list[str], root: str) -> int:
    pattern = re.compile(re.escape(root) + r"blocks\.(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def infer_openvla_config(
    shapes: Mapping[str, tuple[int, ...]], checkpoint_config: Mapping[str, Any], overrides: Any = None
) -> OpenVLAConfig:
    """OpenVLA-7B's config with every dimension the tensor shapes determine, ``config.json``'s
    ``text_config`` (heads, RMSNorm eps, RoPE base), ``pad_to_multiple_of`` and ``n_action_bins``,
    then ``overrides`` (an ``OpenVLAConfig`` replaces it, a mapping overrides the fields it names)."""
    if isinstance(overrides, OpenVLAConfig):
        return overrides
    keys = list(shapes)
    found: dict[str, Any] = {}
    get = lambda key: tuple(shapes[key]) if key in shapes else None  # noqa: E731
    for name, root, head_dim in (("dino", FEATURIZER, DINO_HEAD_DIM), ("siglip", FUSED, SIGLIP_HEAD_DIM)):
        if (s := get(root + "patch_embed.proj.weight")) and len(s) == 4:
            found[f"{name}_dim"], found["patch_size"] = s[0], s[3]
            if s[0] % head_dim == 0:
                found[f"{name}_heads"] = s[0] // head_dim
        if (s := get(root + "pos_embed")) and len(s) >= 2:
            side = math.isqrt(s[-2])
            if side * side == s[-2]:
                found["image_size"] = side * found.get("patch_size", 14)
        if n := _blocks(keys, root):
            found[f"{name}_layers"] = n
        if (s := get(root + "blocks.0.mlp.fc1.weight")) and len(s) == 2:
            found[f"{name}_mlp_dim"] = s[0]
    if (s := get(FEATURIZER + "reg_token")) and len(s) == 3:
        found["dino_registers"] = s[1]
    if (s := get("projector.fc1.weight")) and len(s) == 2:
        found["projector_dim"] = s[0]
    if (s := get(LANGUAGE + "embed_tokens.weight")) and len(s) == 2:
        found["vocab_size"], found["llm_dim"] = s
    pattern = re.compile(re.escape(LANGUAGE) + r"layers\.(\d+)\.")
    layers = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    if layers:
        found["llm_layers"] = max(layers) + 1
    if (s := get(LANGUAGE + "layers.0.mlp.gate_proj.weight")) and len(s) == 2:
        found["llm_mlp_dim"] = s[0]
    text = checkpoint_config.get("text_config") if isinstance(checkpoint_config.get("text_config"), Mapping) else {}
    llm_dim = found.get("llm_dim", OpenVLAConfig.llm_dim)
    heads = text.get("num_attention_heads") or (llm_dim // LLAMA_HEAD_DIM if llm_dim % LLAMA_HEAD_DIM == 0 else None)
    if heads:
        found["num_heads"] = int(heads)
        found["head_dim"] = llm_dim // int(heads)
        if (s := get(LANGUAGE + "layers.0.self_attn.k_proj.weight")) and len(s) == 2 and s[0] % found["head_dim"] == 0:
            found["num_kv_heads"] = s[0] // found["head_dim"]
    if text.get("rms_norm_eps") is not None:
        found["rms_norm_eps"] = float(text["rms_norm_eps"])
    if text.get("rope_theta") is not None:
        found["rope_base"] = float(text["rope_theta"])
    for name in ("pad_to_multiple_of", "n_action_bins"):
        if checkpoint_config.get(name) is not None:
            found[name] = int(checkpoint_config[name])
    config = OpenVLAConfig().replace(**found)
    if overrides:
        config = config.replace(**dict(overrides))
    return config


@dataclass
class OpenVLAReport(KeyProblems):
    """What ``cortexflow info`` prints for an OpenVLA checkpoint."""

    path: str
    config: OpenVLAConfig
    num_parameters: int
    dtypes: dict[str, int]
    total_bytes: int
    datasets: list[str]
    model_type: VLAModelType = VLAModelType.OPENVLA
    layout: str = "openvla-hf"
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mis_shaped: list[str] = field(default_factory=list)
    wrong_dtype: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def inspect_openvla_checkpoint(path: str | Path, model_config: Any = None,
                               files: CheckpointFiles | None = None) -> OpenVLAReport:
    """Read headers only: dimensions, parameters, dtypes, datasets with statistics, key problems."""
    from cortexflow.processing.action_tokens import read_dataset_statistics

    files = files or CheckpointFiles.open(path)
    if not is_openvla_checkpoint(files.tensors):
        sample = ", ".join(sorted(files.tensors)[:5])
        raise CheckpointError(f"{path} is not an OpenVLA checkpoint: no 'vision_backbone.featurizer.*' and "
                              f"'language_model.model.*' tensors (found e.g. {sample})")
    shapes = {name: info.shape for name, info in files.tensors.items()}
    try:
        config = infer_openvla_config(shapes, files.config, model_config)
        config.validate()
    except ConfigError as err:
        raise CheckpointError(f"{path}: cannot derive a valid OpenVLA configuration: {err}") from err
    match = match_openvla_keys(files.tensors, config)
    dtypes: dict[str, int] = {}
    for info in files.tensors.values():
        dtypes[info.dtype] = dtypes.get(info.dtype, 0) + 1
    report = OpenVLAReport(
        path=str(path), config=config, num_parameters=0, dtypes=dtypes, total_bytes=files.total_bytes,
        datasets=sorted(read_dataset_statistics(files.root, files.config)),
        missing=match.missing, unexpected=match.unexpected, skipped=match.skipped,
    )
    expected = OpenVLAModel(config).get_weight_shapes()
    for name, raw in match.sources.items():
        info = files.tensors[raw]
        if not _raw_shape_ok(info.shape, expected[name]):
            report.mis_shaped.append(f"{raw} {list(info.shape)} (expected {list(expected[name])})")
        elif info.dtype not in FLOAT_DTYPES:
            report.wrong_dtype.append(f"{raw} {info.dtype} (expected a float type)")
        else:
            report.num_parameters += math.prod(info.shape)
    return report


def load_openvla_checkpoint(path: str | Path, device: torch.device, dtype: torch.dtype, model_config: Any = None,
                            skip: Collection[str] = ()):
    """Validate and load an OpenVLA folder onto ``device`` in ``dtype``.

    Returns ``(model, weights, report, files)``; one ``CheckpointError`` lists every bad tensor, and
    tensors with NaN or inf are refused. ``skip``: canonical names left out of ``weights`` and never read from
    disk (those an FP8 cache entry replaces); their headers are validated like every other tensor's."""
    files = CheckpointFiles.open(path)
    report = inspect_openvla_checkpoint(path, model_config, files)
    if not report.ok:
        raise CheckpointError(f"{path} does not match the OpenVLA architecture: {report.problems()}")
    model = OpenVLAModel(report.config)
    expected = model.get_weight_shapes()
    weights = {}
    for name, raw in match_openvla_keys(files.tensors, report.config).sources.items():
        if name in skip:
            continue
        tensor = to_canonical_tensor(files.read(raw), expected[name]).to(device=device, dtype=dtype)
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"tensor {raw!r} in {path} contains NaN or inf values")
        weights[name] = tensor
    return model, weights, report, files


def to_hf_keys(weights: Mapping[str, torch.Tensor], config: OpenVLAConfig) -> dict[str, torch.Tensor]:
    """Canonical weights -> Hugging Face OpenVLA keys and shapes (for writing checkpoints)."""
    names = canonical_to_hf(config)
    out = {}
    for canonical, tensor in weights.items():
        key = names[canonical]
        if key.endswith(("cls_token", "reg_token", "pos_embed")):
            tensor = tensor.reshape(1, -1, tensor.shape[-1])
        out[key] = tensor
    return out


def inspect_any_checkpoint(path: str | Path, model_config: Any = None):
    """``cortexflow info``: an :class:`OpenVLAReport` for an OpenVLA folder, else the Pi0-family report
    (safetensors, Orbax ``params/`` or LoRA adapter, as :func:`open_checkpoint` reads them)."""
    from cortexflow.checkpoints.loader import inspect_checkpoint
    from cortexflow.checkpoints.sources import open_checkpoint

    files = open_checkpoint(path)
    if is_openvla_checkpoint(files.tensors):
        return inspect_openvla_checkpoint(path, model_config, files)
    return inspect_checkpoint(path, model_config, files)
