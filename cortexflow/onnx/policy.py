"""Export a Pi0 / Pi0.5 policy's stages to a folder of ONNX files with a ``manifest.json``, and load it back.

A bundle folder holds ``vision.onnx``, ``prefix.onnx``, ``decoder.onnx`` (each possibly with a
``.onnx.data`` external-data file) and ``manifest.json``:

- ``format``, ``created``, ``model`` (pi0/pi05), ``model_class``, ``model_config``, ``num_views``,
  ``chunk_size``, ``max_token_len``, ``prefix_len``, ``num_steps``;
- ``settings``: ``batch`` (``{"mode", "min", "max", "dim_name"}``), ``opset``, ``dtype``, ``decoder``
  (``unrolled`` or ``step``), ``simplify``, ``external_data_threshold``;
- ``source``: the checkpoint path and :func:`~cortexflow.onnx.hashing.checkpoint_hash` (when exported
  from a path), the weights fingerprint, and how each was computed;
- ``toolchain``: exporter name and package versions (torch, onnx, onnxscript, onnxruntime, onnxslim, ...);
- ``stages``: per stage the file, external-data file, bytes, exporter actually used, simplifier, the
  inputs and outputs (name, shape with ``"batch"`` for the symbolic axis, dtype) and the parity check
  (batches, max |Δ|, ‖Δ‖/‖ref‖ against the PyTorch module).

Files are written into a temporary sibling folder and moved into place only after every stage loaded in
ONNX Runtime and passed the parity check, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from cortexflow.config import dtype_name
from cortexflow.errors import ConfigError
from cortexflow.models.pi0 import Pi0Model
from cortexflow.onnx._deps import toolchain_versions
from cortexflow.onnx.exporter import OnnxExportError, export_module
from cortexflow.onnx.hashing import CHECKPOINT_HASH_METHOD, WEIGHTS_FINGERPRINT_METHOD, weights_fingerprint
from cortexflow.onnx.settings import ExportSettings, parse_stages
from cortexflow.onnx.stages import example_inputs, stage_class

MANIFEST = "manifest.json"
FORMAT = "cortexflow-onnx/1"


def export_policy(
    model: Pi0Model,
    weights: Mapping[str, torch.Tensor],
    out_dir: "str | Path",
    *,
    num_views: int,
    chunk_size: int | None = None,
    stages: "str | Sequence[str] | None" = None,
    settings: ExportSettings | None = None,
    check: bool = True,
    source: Mapping[str, Any] | None = None,
    fingerprint: str | None = None,
    exporter: str = "dynamo",
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Export ``stages`` of ``model`` (with canonical ``weights``) into ``out_dir``; return the manifest.

    ``settings`` (default :class:`ExportSettings`) fixes batch range, opset, dtype, decoder form,
    simplification and the external-data threshold; weights are cast to ``settings.dtype`` the way
    the engine stores them (norm scales and patch/position embeddings stay fp32). ``check`` runs each
    file in ONNX Runtime against PyTorch at two batch sizes; a failure raises
    :class:`~cortexflow.onnx.exporter.OnnxExportError` and writes nothing. ``source`` is recorded in the
    manifest (checkpoint path and hash). ``out_dir`` may exist; files of the same names are replaced."""
    if not isinstance(model, Pi0Model):
        raise ConfigError(f"ONNX export supports Pi0-family models (Pi0Model subclasses), not {type(model).__name__}")
    settings = settings or ExportSettings()
    stages = parse_stages(stages)
    chunk = int(chunk_size or model.config.chunk_size)
    if num_views < 1:
        raise ConfigError(f"num_views must be >= 1, got {num_views}")
    dtype = settings.dtype
    cpu_weights = {n: t.detach().to(device="cpu", dtype=model.weight_dtype(n, dtype)) for n, t in weights.items()}
    fingerprint = fingerprint or weights_fingerprint(weights)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    try:
        entries = {}
        for stage in stages:
            if progress:
                progress(f"exporting stage {stage} ({settings.batch.describe()} batch, opset {settings.opset}, "
                         f"{dtype_name(dtype)})")
            cls = stage_class(stage, settings.decoder)
            module = cls(model, cpu_weights, dtype, num_views, chunk)
            specs = module.input_specs()
            entries[stage] = export_module(
                module, staging / f"{stage}.onnx", stage=stage, input_specs=specs, output_specs=module.output_specs(),
                batch=settings.batch, make_inputs=lambda b, specs=specs: example_inputs(specs, b, model, seed=b),
                opset=settings.opset, dtype=dtype, simplify=settings.simplify,
                external_data_threshold=settings.external_data_threshold, check=check, exporter=exporter,
            )
            entries[stage]["decoder_mode"] = settings.decoder if stage == "decoder" else None
            del module
        manifest = _manifest(model, num_views, chunk, settings, entries, source, fingerprint)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        for item in staging.iterdir():
            os.replace(item, out / item.name)
        return manifest
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _manifest(model, num_views, chunk, settings: ExportSettings, entries, source, fingerprint) -> dict:
    c = model.config
    exporters = sorted({e["exporter"] for e in entries.values()})
    return {
        "format": FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": c.model_type.value,
        "model_class": type(model).__name__,
        "model_config": c.to_dict(),
        "num_views": num_views,
        "chunk_size": chunk,
        "max_token_len": c.max_token_len,
        "prefix_len": num_views * c.num_patches + c.max_token_len,
        "num_steps": c.num_diffusion_steps,
        "settings": {**settings.to_dict(), "batch": settings.batch.to_dict()},
        "source": {
            **dict(source or {}),
            "checkpoint_hash_method": CHECKPOINT_HASH_METHOD,
            "weights_fingerprint": fingerprint,
            "weights_fingerprint_method": WEIGHTS_FINGERPRINT_METHOD,
        },
        "toolchain": {"exporter": exporters[0] if len(exporters) == 1 else exporters, **toolchain_versions()},
        "stages": entries,
    }


def read_manifest(bundle: "str | Path") -> dict:
    """The manifest of the bundle folder ``bundle`` (``OnnxExportError`` when missing or not ours)."""
    path = Path(bundle) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise OnnxExportError(f"{path} is missing or not valid JSON: {err}") from err
    if manifest.get("format") != FORMAT:
        raise OnnxExportError(f"{path} is not a CortexFlow ONNX manifest (format {manifest.get('format')!r})")
    for stage, entry in manifest.get("stages", {}).items():
        if not (Path(bundle) / entry["file"]).exists():
            raise OnnxExportError(f"{path}: the file {entry['file']!r} of stage {stage!r} is missing")
    return manifest
