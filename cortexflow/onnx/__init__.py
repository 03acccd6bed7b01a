"""ONNX export of Pi0 / Pi0.5 stages and of perception encoders, and running them in ONNX Runtime.

Needs the optional packages ``onnx``, ``onnxruntime``, ``onnxscript`` (and ``onnxslim`` to simplify):
``pip install "cortexflow[onnx]"``. Importing this package works without them; the functions raise
:class:`~cortexflow.errors.BackendUnavailableError` with that hint when called.

Main entry points:

- :func:`export_checkpoint` — a checkpoint folder -> a bundle folder (``vision.onnx``, ``prefix.onnx``,
  ``decoder.onnx``, ``manifest.json``); behind ``cortexflow export``;
- :func:`export_policy` — the same from an in-memory model and weights;
- :func:`export_encoder` — a perception encoder (:mod:`cortexflow.encoders`) -> ``encoder.onnx``;
- :func:`verify_onnx_stages` — per stage max |Δ| and ‖Δ‖/‖ref‖ of ONNX Runtime against PyTorch fp32;
- ``backend="onnx"`` (:class:`cortexflow.backends.onnx_backend.OnnxBackend`) — the engine on ONNX Runtime,
  exporting on first use into the cache (:mod:`cortexflow.onnx.cache`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from cortexflow.onnx.cache import cached_policy_bundle, default_cache_dir
from cortexflow.onnx.exporter import OnnxExportError, io_description, ort_session, rel_error
from cortexflow.onnx.hashing import checkpoint_hash, weights_fingerprint
from cortexflow.onnx.policy import MANIFEST, export_policy, read_manifest
from cortexflow.onnx.runtime import OrtStage
from cortexflow.onnx.settings import POLICY_STAGES, BatchSpec, ExportSettings, parse_stages


def export_checkpoint(
    checkpoint: "str | Path",
    out_dir: "str | Path",
    *,
    model: str = "auto",
    stages: "str | Sequence[str] | None" = "all",
    batch: str = "dynamic:1-16",
    opset: int = 20,
    dtype: str = "float32",
    simplify: bool = False,
    decoder: str = "unrolled",
    num_views: int = 2,
    check: bool = True,
    external_data_threshold: int | None = None,
    model_config: Mapping[str, Any] | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Load the checkpoint at ``checkpoint`` (openpi / LeRobot safetensors) on the CPU and export it.

    ``checkpoint="demo"`` exports the tiny random model of ``cortexflow demo`` (``model`` pi0 or pi05,
    weights seeded with ``seed``) instead. ``model``: ``"pi0"``, ``"pi05"`` or ``"auto"`` (detected from
    the tensors; a mismatch is an error). Other arguments as in ``cortexflow export --help``. Returns the
    manifest written to ``out_dir/manifest.json``; it records :func:`checkpoint_hash` of the files."""
    import torch

    from cortexflow.checkpoints.loader import load_pi0_checkpoint
    from cortexflow.config import VLAModelType
    from cortexflow.onnx.settings import EXTERNAL_DATA_THRESHOLD

    settings = ExportSettings.make(
        batch=batch, opset=opset, dtype=dtype, decoder=decoder, simplify=simplify,
        external_data_threshold=EXTERNAL_DATA_THRESHOLD if external_data_threshold is None else external_data_threshold,
    )
    model_key = str(model).strip().lower()
    if str(checkpoint) == "demo":
        from cortexflow.models.pi0 import model_class
        from cortexflow.random_checkpoint import random_weights, tiny_model_config

        config = tiny_model_config("pi0" if model_key == "auto" else VLAModelType.parse(model), **dict(model_config or {}))
        pi_model = model_class(config.model_type)(config)
        weights = random_weights(config, seed)
        source = {"checkpoint": f"demo (tiny random {config.model_type.value}, seed {seed})", "checkpoint_hash": None}
    else:
        expected = None if model_key == "auto" else VLAModelType.parse(model)
        if progress:
            progress(f"loading {checkpoint}")
        loaded = load_pi0_checkpoint(checkpoint, expected, torch.device("cpu"), settings.dtype, model_config)
        pi_model, weights = loaded.model, loaded.weights
        source = {"checkpoint": str(Path(checkpoint).expanduser().resolve()), "checkpoint_hash": checkpoint_hash(checkpoint)}
    return export_policy(
        pi_model, weights, out_dir, num_views=num_views, stages=stages, settings=settings, check=check,
        source=source, progress=progress,
    )


def export_encoder(*args, **kwargs) -> dict:
    """See :func:`cortexflow.encoders.export_encoder`."""
    from cortexflow.encoders import export_encoder as _export

    return _export(*args, **kwargs)


def verify_onnx_stages(*args, **kwargs) -> list[dict]:
    """See :func:`cortexflow.onnx.verify.verify_onnx_stages`."""
    from cortexflow.onnx.verify import verify_onnx_stages as _verify

    return _verify(*args, **kwargs)


__all__ = [
    "MANIFEST",
    "POLICY_STAGES",
    "BatchSpec",
    "ExportSettings",
    "OnnxExportError",
    "OrtStage",
    "cached_policy_bundle",
    "checkpoint_hash",
    "default_cache_dir",
    "export_checkpoint",
    "export_encoder",
    "export_policy",
    "io_description",
    "ort_session",
    "parse_stages",
    "read_manifest",
    "rel_error",
    "verify_onnx_stages",
    "weights_fingerprint",
]
