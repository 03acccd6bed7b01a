"""Load a Pi0 / Pi0.5 checkpoint: detect the model, derive its config, validate every tensor, load.

Detection uses the tensors present, never the path. Dimensions come from tensor shapes; chunk size,
denoising steps and prompt length from the checkpoint's ``config.json`` when it has them; the user's
``model_config`` overrides both. Tensors are converted one at a time on their way to the device, so
peak host memory stays near one tensor beyond the result.
"""

from __future__ import annotations

import math
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Mapping

import torch

from cortexflow.checkpoints.files import FLOAT_DTYPES, CheckpointFiles
from cortexflow.checkpoints.key_problems import KeyProblems
from cortexflow.models.pi0_keys import (
    EMBEDDING_KEYS,
    EXPERT,
    LANGUAGE,
    LOOKUP_TABLE_KEYS,
    VISION,
    LayoutMatch,
    _LEGACY_PREFIXES,
    canonical_to_openpi,
    detect_layout,
    detect_model_type,
    match_keys,
    to_openpi_key,
)
from cortexflow.checkpoints.sources import open_checkpoint
from cortexflow.checkpoints.vision_heads import siglip_head_count
from cortexflow.config import ModelConfig, VLAModelType
from cortexflow.errors import CheckpointError, ConfigError, CortexFlowWarning
from cortexflow.models.pi0 import Pi0Model, model_class

PROGRESS_MIN_BYTES = 64 * 2**20
#: The ``config.json`` entry holding every ``ModelConfig`` field (written by CortexFlow's checkpoint writer).
MODEL_CONFIG_KEY = "cortexflow_model_config"
_CONFIG_FIELDS = {
    "chunk_size": ("action_horizon", "chunk_size"),
    "num_diffusion_steps": ("num_steps", "num_inference_steps"),
    "max_token_len": ("max_token_len", "tokenizer_max_length"),
    "discrete_state_input": ("discrete_state_input",),
}


@dataclass
class CheckpointReport(KeyProblems):
    """What ``cortexflow info`` prints: the model found, its dimensions, and any key problems."""

    path: str
    model_type: VLAModelType
    layout: str
    config: ModelConfig
    num_parameters: int
    dtypes: dict[str, int]
    total_bytes: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mis_shaped: list[str] = field(default_factory=list)
    wrong_dtype: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _layer_count(openpi_keys: list[str], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"layers\.(\d+)\.")
    indices = {int(m.group(1)) for k in openpi_keys if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def infer_model_config(
    raw_shapes: Mapping[str, tuple[int, ...]], checkpoint_config: Mapping[str, Any], model_type: VLAModelType
) -> ModelConfig:
    """Published config of ``model_type`` with every dimension the tensor shapes determine filled in,
    and chunk size / steps / prompt length from the checkpoint's ``config.json`` when present."""
    layout = detect_layout(raw_shapes)
    shapes = {to_openpi_key(k, layout): tuple(s) for k, s in raw_shapes.items()}
    keys = list(shapes)
    config = ModelConfig.for_model(model_type)
    found: dict[str, Any] = {}

    def shape(key: str) -> tuple[int, ...] | None:
        return shapes.get(key)

    if (s := shape(VISION + "embeddings.patch_embedding.weight")) and len(s) == 4:
        found["vision_encoder_dim"], found["patch_size"] = s[0], s[3]
    if (s := shape(VISION + "embeddings.position_embedding.weight")) and len(s) == 2:
        side = round(s[0] ** 0.5)
        if side * side == s[0]:
            found["image_size"] = side * found.get("patch_size", config.patch_size)
    if n := _layer_count(keys, VISION + "encoder."):
        found["num_vision_layers"] = n
    if (s := shape(VISION + "encoder.layers.0.mlp.fc1.weight")) and len(s) == 2:
        found["vision_mlp_dim"] = s[0]
    for key in LOOKUP_TABLE_KEYS[layout]:
        if (s := shape(key)) and len(s) == 2:
            found["vocab_size"], found["encoder_dim"] = s
            break
    for prefix, dim_field, mlp_field, depth_field in (
        (LANGUAGE, "encoder_dim", "encoder_mlp_dim", "num_encoder_layers"),
        (EXPERT, "decoder_dim", "decoder_mlp_dim", "num_decoder_layers"),
    ):
        if n := _layer_count(keys, prefix):
            found[depth_field] = n
        if (s := shape(prefix + "layers.0.mlp.gate_proj.weight")) and len(s) == 2:
            found[mlp_field], found[dim_field] = s
    k_shape = shape(LANGUAGE + "layers.0.self_attn.k_proj.weight")
    q_shape = shape(LANGUAGE + "layers.0.self_attn.q_proj.weight")
    if k_shape and q_shape and k_shape[0] % config.num_kv_heads == 0:
        head_dim = k_shape[0] // config.num_kv_heads
        if q_shape[0] % head_dim == 0:
            found["head_dim"], found["num_heads"] = head_dim, q_shape[0] // head_dim
    if (s := shape("action_in_proj.weight")) and len(s) == 2:
        found["action_dim"] = s[1]
    for field_name, names in _CONFIG_FIELDS.items():
        for name in names:
            if checkpoint_config.get(name) is not None:
                found[field_name] = checkpoint_config[name]
                break
    found.update(_written_model_config(checkpoint_config, model_type))
    return config.replace(**found)


def _written_model_config(checkpoint_config: Mapping[str, Any], model_type: VLAModelType) -> dict[str, Any]:
    """The ``ModelConfig`` fields in ``config.json``'s :data:`MODEL_CONFIG_KEY` entry (none when absent).

    They describe what the tensor shapes cannot (head counts, chunk, steps, prompt length); a written model
    type that the tensors contradict, or an unknown field, is a ``CheckpointError``."""
    written = checkpoint_config.get(MODEL_CONFIG_KEY)
    if written is None:
        return {}
    if not isinstance(written, Mapping):
        raise CheckpointError(f"config.json: {MODEL_CONFIG_KEY!r} must be a JSON object of ModelConfig fields")
    fields = dict(written)
    written_type = fields.pop("model_type", model_type.value)
    if VLAModelType.parse(written_type) != model_type:
        raise CheckpointError(f"config.json says {MODEL_CONFIG_KEY}.model_type {written_type!r}, but the tensors "
                              f"hold a {model_type.value} model")
    try:
        ModelConfig.for_model(model_type).replace(**fields)
    except ConfigError as err:
        raise CheckpointError(f"config.json: {MODEL_CONFIG_KEY}: {err}") from None
    return fields


def resolve_model_config(
    raw_shapes: Mapping[str, tuple[int, ...]],
    checkpoint_config: Mapping[str, Any],
    model_type: VLAModelType,
    model_config: "ModelConfig | Mapping[str, Any] | None",
) -> ModelConfig:
    """Config inferred from the checkpoint, then ``model_config``: a full ``ModelConfig`` replaces it,
    a mapping overrides only the fields it names."""
    if isinstance(model_config, ModelConfig):
        if model_config.model_type != model_type:
            raise ConfigError(
                f"model_config is for {model_config.model_type.value} but the checkpoint holds {model_type.value}"
            )
        return model_config
    config = infer_model_config(raw_shapes, checkpoint_config, model_type)
    overrides = dict(model_config or {})
    if "num_vision_heads" not in overrides:
        config = config.replace(num_vision_heads=siglip_head_count(checkpoint_config, config.vision_encoder_dim))
    return config.replace(**overrides)


def inspect_checkpoint(
    path: str | Path,
    model_config: "ModelConfig | Mapping[str, Any] | None" = None,
    files: CheckpointFiles | None = None,
) -> CheckpointReport:
    """Read headers only and report model type, dimensions, parameter count, dtypes and key problems.

    ``path`` is any checkpoint :func:`open_checkpoint` reads (safetensors, Orbax ``params/``, LoRA adapter)."""
    files = files or open_checkpoint(path)
    model_type = detect_model_type(files.tensors)
    if model_type is None:
        sample = ", ".join(sorted(files.tensors)[:5])
        raise CheckpointError(
            f"{path} is not a Pi0/Pi0.5 checkpoint: no 'paligemma_with_expert.*' tensors (found e.g. {sample})"
        )
    shapes = {name: info.shape for name, info in files.tensors.items()}
    config = resolve_model_config(shapes, files.config, model_type, model_config)
    model = model_class(model_type)(config)
    match = match_keys(files.tensors, config)
    dtypes: dict[str, int] = {}
    for info in files.tensors.values():
        dtypes[info.dtype] = dtypes.get(info.dtype, 0) + 1
    report = CheckpointReport(
        path=str(path),
        model_type=model_type,
        layout=match.layout,
        config=config,
        num_parameters=0,
        dtypes=dtypes,
        total_bytes=files.total_bytes,
        missing=_missing_keys(match, config),
        unexpected=list(match.unexpected),
        skipped=list(match.skipped),
    )
    _check_tensors(files, model, match, report)
    return report


def _missing_keys(match: LayoutMatch, config: ModelConfig) -> list[str]:
    """Each missing weight as ``<key expected in the checkpoint's layout> (<canonical name>)``."""
    names = canonical_to_openpi(config)
    out = []
    for canonical in match.missing:
        key = names.get(canonical)
        if key is None:
            out.append(canonical)
            continue
        if match.layout == "lerobot-legacy":
            for old, new in _LEGACY_PREFIXES:
                if key.startswith(new):
                    key = old + key[len(new):]
                    break
        if match.layout.startswith("lerobot"):
            key = "model." + key
        out.append(f"{key} ({canonical})")
    return out


def _check_tensors(files: CheckpointFiles, model: Pi0Model, match: LayoutMatch, report: CheckpointReport) -> None:
    expected = model.get_weight_shapes()
    for name, raw in match.sources.items():
        info = files.tensors[raw]
        if info.shape != tuple(expected[name]):
            report.mis_shaped.append(f"{raw} {list(info.shape)} (expected {list(expected[name])})")
        elif info.dtype not in FLOAT_DTYPES:
            report.wrong_dtype.append(f"{raw} {info.dtype} (expected a float type)")
        else:
            report.num_parameters += math.prod(info.shape)


@dataclass
class LoadedCheckpoint:
    """A validated model and its weights on the target device (canonical names)."""

    model: Pi0Model
    weights: dict[str, torch.Tensor]
    report: CheckpointReport
    files: CheckpointFiles


def load_pi0_checkpoint(
    path: str | Path,
    expected_type: VLAModelType | None,
    device: torch.device,
    dtype: torch.dtype,
    model_config: "ModelConfig | Mapping[str, Any] | None" = None,
    progress: bool | None = None,
    base_checkpoint: "str | Path | None" = None,
    host_weights: Collection[str] = (),
) -> LoadedCheckpoint:
    """Validate and load the checkpoint at ``path`` onto ``device``; one ``CheckpointError`` lists every bad tensor.
    The canonical names in ``host_weights`` are loaded into host memory instead (the engine's host-side lookup
    tables, :class:`~cortexflow.models.base.HostEmbedding`).

    ``path`` is safetensors, an openpi Orbax checkpoint or a LoRA adapter folder (:func:`open_checkpoint`;
    ``base_checkpoint`` is an adapter's base). ``expected_type`` (when given) must match the type detected
    from the tensors. Unused tensors (the action expert's LM head, the prefix final norm, the model's
    ``unread_weights``: the last prefix layer's o-projection and MLP) are never read.
    ``progress=None`` shows a bar for checkpoints over 64 MiB."""
    files = open_checkpoint(path, base_checkpoint)
    report = inspect_checkpoint(path, model_config, files)
    if expected_type is not None and report.model_type != expected_type:
        factory = "create_pi05_inference" if report.model_type == VLAModelType.PI05 else "create_pi0_inference"
        raise CheckpointError(
            f"{path} holds a {report.model_type.value} model (detected from its tensors), "
            f"not {expected_type.value}; use {factory}"
        )
    if not report.ok:
        raise CheckpointError(f"{path} does not match the {report.model_type.value} architecture: {report.problems()}")
    model = model_class(report.model_type)(report.config)
    match = match_keys(files.tensors, report.config)
    show = progress if progress is not None else files.total_bytes >= PROGRESS_MIN_BYTES
    unread = set(model.unread_weights())
    sources = {name: raw for name, raw in match.sources.items() if name not in unread}
    weights = {}
    with _progress_bar(show, sum(files.tensors[r].nbytes for r in sources.values()), str(path)) as advance:
        for name, raw in sources.items():
            tensor = files.read(raw)
            target = model.weight_dtype(name, dtype)
            weights[name] = tensor.to(device="cpu" if name in host_weights else device, dtype=target)
            if not torch.isfinite(weights[name]).all():
                raise CheckpointError(f"tensor {raw!r} in {path} contains NaN or inf values")
            del tensor
            advance(files.tensors[raw].nbytes)
    _warn_if_embedding_tables_differ(files, match)
    return LoadedCheckpoint(model=model, weights=weights, report=report, files=files)


def _warn_if_embedding_tables_differ(files: CheckpointFiles, match: LayoutMatch) -> None:
    """Warn when the checkpoint stores both token-embedding tables (``lm_head`` and ``embed_tokens``) and
    they differ: only the one the layout's reference looks tokens up in was loaded."""
    used = match.sources.get("llm.embed")
    others = [raw for raw in match.skipped if to_openpi_key(raw, match.layout) in EMBEDDING_KEYS]
    if used is None or not others:
        return
    table = files.read(used)
    for other in others:
        if files.tensors[other].shape != files.tensors[used].shape or not torch.equal(files.read(other).to(table.dtype), table):
            warnings.warn(
                f"{files.root} stores two different token-embedding tables: {used!r} is used (the {match.layout} "
                f"reference looks tokens up there) and {other!r} is ignored",
                CortexFlowWarning,
                stacklevel=3,
            )


class _progress_bar:
    """Context manager yielding ``advance(nbytes)``; draws a rich progress bar on stderr when enabled."""

    def __init__(self, enabled: bool, total: int, label: str):
        self.enabled, self.total, self.label = enabled, total, label
        self._progress = None

    def __enter__(self):
        if not self.enabled:
            return lambda _n: None
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("loading {task.description}"),
            BarColumn(),
            DownloadColumn(),
            TimeRemainingColumn(),
            console=Console(file=sys.stderr),
        )
        self._progress.__enter__()
        task = self._progress.add_task(Path(self.label).name, total=self.total)
        return lambda n: self._progress.update(task, advance=n)

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)
        return False
