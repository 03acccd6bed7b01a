"""Compute backends and the registry that maps a backend name to its class.

``pytorch`` is always there; ``triton`` is imported only when asked for (it needs the ``triton``
package and a CUDA GPU, or ``TRITON_INTERPRET=1`` for CPU tests). A custom backend is any
:class:`ComputeBackend` subclass; register it under a name with :func:`register_backend`, or pass the
class or an instance directly as ``backend=`` to the engine factories.
"""

from __future__ import annotations

import importlib

import torch

from cortexflow.ops import ComputeBackend
from cortexflow.backends.pytorch import PyTorchBackend
from cortexflow.config import BackendType
from cortexflow.errors import BackendUnavailableError, ConfigError

_REGISTRY: dict[str, type[ComputeBackend]] = {BackendType.PYTORCH.value: PyTorchBackend}
# Backends whose module is imported on first use: name -> "module:Class".
_LAZY: dict[str, str] = {
    BackendType.TRITON.value: "cortexflow.backends.triton_backend:TritonBackend",
    BackendType.ONNX.value: "cortexflow.backends.onnx_backend:OnnxBackend",
}


def _lazy_class(name: str) -> type[ComputeBackend]:
    module_name, class_name = _LAZY[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def register_backend(name: str, backend_class: type[ComputeBackend]) -> None:
    """Make ``backend=name`` create ``backend_class(device, dtype)``."""
    if not (isinstance(backend_class, type) and issubclass(backend_class, ComputeBackend)):
        raise ConfigError(f"{backend_class!r} is not a ComputeBackend subclass")
    _REGISTRY[name.lower()] = backend_class


def available_backends() -> list[str]:
    """Names that ``create_backend`` accepts (lazy ones may still fail for lack of a package or GPU)."""
    return sorted(set(_REGISTRY) | set(_LAZY))


def create_backend(
    backend: "BackendType | str | ComputeBackend | type[ComputeBackend]",
    device: torch.device,
    dtype: torch.dtype,
) -> ComputeBackend:
    """Build the backend named by ``backend`` (an enum, a name, a class or an instance)."""
    if isinstance(backend, ComputeBackend):
        return backend
    if isinstance(backend, type) and issubclass(backend, ComputeBackend):
        return backend(device, dtype)
    name = backend.value if isinstance(backend, BackendType) else str(backend).strip().lower()
    if name in _LAZY and name not in _REGISTRY:
        return _lazy_class(name)(device, dtype)
    if name not in _REGISTRY:
        known = [m.value for m in BackendType]
        if name in known:
            raise BackendUnavailableError(
                f"backend {name!r} is not available in this version of CortexFlow; "
                f"available backends: {', '.join(available_backends())}"
            )
        raise ConfigError(f"unknown backend {backend!r}; available backends: {', '.join(available_backends())}")
    return _REGISTRY[name](device, dtype)


__all__ = ["ComputeBackend", "PyTorchBackend", "available_backends", "create_backend", "register_backend"]
