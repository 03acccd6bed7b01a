"""Lazy imports of the optional ONNX packages, with one clear error when they are missing.

``cortexflow`` itself imports without onnx / onnxruntime / onnxscript; everything in
:mod:`cortexflow.onnx` that needs them calls one of these helpers at the point of use.
"""

from __future__ import annotations

import importlib
from importlib import metadata
from types import ModuleType

from cortexflow.errors import BackendUnavailableError

INSTALL_HINT = 'pip install "cortexflow[onnx]"  (onnx, onnxruntime, onnxscript, onnxslim)'


def _require(module: str, purpose: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise BackendUnavailableError(
            f"{purpose} needs the Python package {module!r}, which is not installed ({err}); {INSTALL_HINT}"
        ) from err


def require_onnx() -> ModuleType:
    """The ``onnx`` package (model files, external data, manifests)."""
    return _require("onnx", "ONNX export")


def require_onnxruntime() -> ModuleType:
    """The ``onnxruntime`` package (CPU, or ``onnxruntime-gpu`` for the CUDA provider)."""
    return _require("onnxruntime", "running ONNX models")


def require_exporter() -> None:
    """The packages ``torch.onnx.export(..., dynamo=True)`` needs (onnx, onnxscript)."""
    require_onnx()
    _require("onnxscript", "the torch.onnx dynamo exporter")


def optional(module: str) -> ModuleType | None:
    """``module`` if importable, else None (onnxslim, onnxsim)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def version(distribution: str) -> str | None:
    """Installed version of a distribution, or None."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def toolchain_versions() -> dict[str, str | None]:
    """Versions recorded in every manifest (what produced and what checked the files)."""
    import platform

    import torch

    ort_dist = next((d for d in ("onnxruntime", "onnxruntime-gpu") if version(d)), "onnxruntime")
    return {
        "cortexflow": version("cortexflow"),
        "torch": torch.__version__,
        "onnx": version("onnx"),
        "onnxscript": version("onnxscript"),
        "onnx_ir": version("onnx-ir") or version("onnx_ir"),
        ort_dist: version(ort_dist),
        "onnxslim": version("onnxslim"),
        "onnxsim": version("onnxsim"),
        "python": platform.python_version(),
    }
