"""Measurement tools behind ``cortexflow verify``, ``bench`` and ``profile``, plus their shared set-up.

- :mod:`cortexflow.tools.verify` — a backend's error against the reference, module by module;
- :mod:`cortexflow.tools.bench` — latency and memory of whole ``predict`` calls over a grid of workloads;
- :mod:`cortexflow.tools.profile` — one call under ``torch.profiler``: stages, kernels, roofline gap;
- :mod:`cortexflow.tools.flops` — FLOP and byte counts per stage and the floor they imply.

The helpers here resolve the common options (model size, device, dtype), build the model configuration
and describe the machine a result came from.
"""

from __future__ import annotations

import datetime
import platform
import sys
from importlib import metadata

import torch

from cortexflow.config import ModelConfig, parse_dtype
from cortexflow.errors import ConfigError

SIZES = ("tiny", "real")


def resolve_device_dtype(device: str, dtype: "str | torch.dtype") -> tuple[torch.device, torch.dtype]:
    """``device="auto"`` -> the GPU if there is one; ``dtype="auto"`` -> bfloat16 on a GPU, float32 on CPU."""
    from cortexflow.engine import resolve_device

    resolved = resolve_device(device)
    if isinstance(dtype, str) and dtype.strip().lower() == "auto":
        return resolved, torch.bfloat16 if resolved.type == "cuda" else torch.float32
    return resolved, parse_dtype(dtype)


def resolve_size(size: str, device: torch.device) -> str:
    """``"auto"`` -> ``"real"`` on a GPU, ``"tiny"`` on the CPU; else ``"tiny"`` or ``"real"``."""
    key = size.strip().lower()
    if key == "auto":
        return "real" if device.type == "cuda" else "tiny"
    if key not in SIZES:
        raise ConfigError(f"unknown model size {size!r}; expected tiny, real or auto")
    return key


def model_config(model: str, size: str, **overrides) -> ModelConfig:
    """The published (``size="real"``) or the tiny test configuration of ``model``, with ``overrides``."""
    from cortexflow.random_checkpoint import tiny_model_config

    if size == "tiny":
        return tiny_model_config(model, **overrides)
    return ModelConfig.for_model(model, **overrides)


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def package_version(name: str) -> str | None:
    """Installed version of a distribution, or None."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment_info(device: torch.device) -> dict:
    """Device name and software versions, the command line and the time: where a result came from."""
    cuda = device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "command": " ".join(sys.argv),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


__all__ = [
    "SIZES",
    "environment_info",
    "model_config",
    "package_version",
    "resolve_device_dtype",
    "resolve_size",
    "synchronize",
]
