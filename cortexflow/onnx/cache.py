"""The export cache: one bundle folder per (weights, model, views, chunk, settings, toolchain).

Location: ``cache_dir`` when given, else ``$CORTEXFLOW_ONNX_CACHE``, else ``$CORTEXFLOW_CACHE/onnx``, else
``$XDG_CACHE_HOME/cortexflow/onnx``, else ``~/.cache/cortexflow/onnx``. The folder name is a hash of the
weights fingerprint (:func:`~cortexflow.onnx.hashing.weights_fingerprint`), the model class and
configuration, views, chunk, :class:`~cortexflow.onnx.settings.ExportSettings`, and the torch /
onnxscript versions (a new exporter re-exports). A bundle is exported into a temporary folder and
renamed into place only after every stage passed the ONNX Runtime load and parity checks, so a failed
or interrupted export is never found by the next engine start.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Mapping

import torch

from cortexflow.onnx import policy as _policy
from cortexflow.onnx._deps import version
from cortexflow.onnx.exporter import OnnxExportError
from cortexflow.onnx.hashing import cache_root, settings_key, weights_fingerprint
from cortexflow.onnx.settings import ExportSettings


def default_cache_dir() -> Path:
    """The cache root (see module doc)."""
    if os.environ.get("CORTEXFLOW_ONNX_CACHE"):
        return Path(os.environ["CORTEXFLOW_ONNX_CACHE"]).expanduser()
    return cache_root("onnx")


def bundle_key(fingerprint: str, model, num_views: int, chunk: int, settings: ExportSettings, extra=None) -> str:
    """The cache folder name of one export."""
    return settings_key(
        _policy.FORMAT, fingerprint, type(model).__module__ + "." + type(model).__qualname__,
        model.config.to_dict(), num_views, chunk, settings.to_dict(), torch.__version__, version("onnxscript"), extra,
    )


def cached_policy_bundle(
    model,
    weights: Mapping[str, torch.Tensor],
    *,
    num_views: int,
    chunk_size: int,
    settings: ExportSettings,
    cache_dir: "str | Path | None" = None,
    fingerprint: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[Path, dict, bool]:
    """The bundle folder for this export, exporting it first if the cache lacks it.

    Returns ``(folder, manifest, exported)``; ``exported`` is False on a cache hit."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    fingerprint = fingerprint or weights_fingerprint(weights)
    key = bundle_key(fingerprint, model, num_views, chunk_size, settings)
    folder = root / key
    if (folder / _policy.MANIFEST).exists():
        try:
            return folder, _policy.read_manifest(folder), False
        except OnnxExportError:
            shutil.rmtree(folder, ignore_errors=True)  # damaged entry: export again
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    try:
        _policy.export_policy(
            model, weights, staging, num_views=num_views, chunk_size=chunk_size, settings=settings, check=True,
            source={"cache_key": key}, fingerprint=fingerprint, progress=progress,
        )
        try:
            os.replace(staging, folder)
        except OSError:
            if not (folder / _policy.MANIFEST).exists():  # not a concurrent writer that won the race
                raise
        return folder, _policy.read_manifest(folder), True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
