"""``precision``: the engines' switch between the compute dtype's weights ("default") and FP8 weights ("fp8").

``precision="fp8"`` runs the ``triton`` backend with ``TritonOptions.fp8=PRECISION_FP8_STAGES`` ("decoder": a
token VLA's language model, the Pi0 family's action expert; see :mod:`cortexflow.backends.triton_fp8`), or with
the stages a ``TritonBackend.configured(fp8=...)`` class names (the per-stage switch: "prefix" and "all" add the
Pi0 family's Gemma prefix, whose E4M3 activations failed ``verify``'s limit on the H100, benchmarks/NOTES.md). It is checked when the engine is created: FP8 needs a CUDA GPU of compute capability
8.9 or later (Ada, Hopper), not Triton's CPU interpreter, bfloat16 activations and the triton backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cortexflow.config import PRECISIONS, option_setting, parse_precision
from cortexflow.errors import ConfigError

__all__ = ["PRECISIONS", "PRECISION_FP8_STAGES", "backend_for_precision", "fp8_cache_setting", "parse_precision"]

#: The ``TritonOptions.fp8`` stages that ``precision="fp8"`` picks: the stages whose FP8 path passed ``cortexflow
#: verify --size real`` on the H100 (final actions within 5e-2 of fp32).
PRECISION_FP8_STAGES = "decoder"


def fp8_cache_setting(value: "str | None", precision: Any) -> "bool | Path":
    """The factories' ``fp8_cache`` for the command-line option ``--fp8-cache DIR|default``: False when not given,
    True for "default" (the default folder, :mod:`cortexflow.quantization.fp8_cache`), else the folder. Raises
    :class:`ConfigError` in the command line's words when it is given without ``--precision fp8``."""
    if value is None:
        return False
    text = str(value).strip()
    if not text:
        raise ConfigError("--fp8-cache needs a folder, or 'default' for ~/.cache/cortexflow/fp8")
    if parse_precision(precision, "--precision") != "fp8":
        raise ConfigError(f"--fp8-cache {text} keeps the FP8 layers of --precision fp8; got --precision {precision}: "
                          "add --precision fp8 or drop --fp8-cache")
    return True if text.lower() == "default" else Path(text).expanduser()


def backend_for_precision(backend: Any, precision: Any, device: torch.device, dtype: torch.dtype,
                          source: str = "precision") -> Any:
    """The ``backend`` argument to build an engine's backend from, for ``precision``: unchanged for "default";
    for "fp8" a ``TritonBackend`` class whose options hold FP8 stages (the given class's when it names some,
    else :data:`PRECISION_FP8_STAGES`). Raises :class:`ConfigError` saying what to change when FP8 cannot run."""
    if parse_precision(precision, source) == "default":
        return backend
    from cortexflow.quantization.fp8 import fp8_unsupported_reason

    reason = fp8_unsupported_reason(device)
    if reason is not None:
        raise ConfigError(f"{option_setting(source, 'fp8')}: {reason}; use {option_setting(source, 'default')}")
    if dtype != torch.bfloat16:
        dtype_setting = option_setting("--dtype" if source.startswith("--") else "dtype", "bfloat16")
        raise ConfigError(f"{option_setting(source, 'fp8')} keeps activations in bfloat16; got dtype {dtype}: use "
                          f"{dtype_setting}")
    name = getattr(backend, "value", backend)
    if isinstance(name, str) and name.strip().lower() == "triton":
        from cortexflow.backends.triton_backend import TritonBackend

        return TritonBackend.configured(fp8=PRECISION_FP8_STAGES)
    from cortexflow.backends.triton_backend import TritonBackend

    if isinstance(backend, type) and issubclass(backend, TritonBackend):
        return backend if backend.default_options().fp8 != "off" else backend.configured(fp8=PRECISION_FP8_STAGES)
    if isinstance(backend, TritonBackend):
        if backend.options.fp8 == "off":
            raise ConfigError(f"{option_setting(source, 'fp8')} with a TritonBackend instance made without FP8: pass backend='triton' "
                              f"or TritonBackend.configured(fp8={PRECISION_FP8_STAGES!r})")
        return backend
    shown = getattr(backend, "name", None) or (backend.__name__ if isinstance(backend, type) else name)
    raise ConfigError(f"{option_setting(source, 'fp8')} runs on the triton backend; got backend {shown!r}: use "
                      f"{option_setting('--backend' if source.startswith('--') else 'backend', 'triton')}")
