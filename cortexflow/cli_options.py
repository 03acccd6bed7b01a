"""Checks of the options the ``cortexflow`` commands share, worded for the command line.

Model names come from :data:`cortexflow.config.SUPPORTED_MODELS` and backend names from the backend
registry, so every command's help and errors list the same names. The cheap options (device, dtype,
backend) are checked before a command reads any file, and their errors name the option to change
(``--device cpu``), not the Python argument.
"""

from __future__ import annotations

from typing import Sequence

from cortexflow.config import (
    SUPPORTED_MODELS,
    BackendType,
    VLAModelType,
    dtype_name,
    is_auto,
    model_names,
    parse_dtype,
)
from cortexflow.errors import BackendUnavailableError, ConfigError

DTYPE_CHOICES = "auto, bfloat16, float16 or float32"


#: ``--fp8-cache``'s help in ``run`` and ``serve``.
FP8_CACHE_HELP = ("openvla/rt2 with --precision fp8: keep the quantised language-model layers in the folder DIR "
                  "('default': $CORTEXFLOW_CACHE/fp8 or ~/.cache/cortexflow/fp8), keyed by the checkpoint and the FP8 "
                  "settings; the next start reads them instead of the bfloat16 projections (OpenVLA-7B: about 6.5 GB "
                  "instead of 13).")


def cli_option(*flags: str, help: str, metavar: str | None = None) -> dict:
    """``dataclasses.field(metadata=...)`` for an options dataclass field that is also a command-line option:
    its ``flags`` (``"--chunk"``, or ``"--cuda-graphs/--no-cuda-graphs"`` for a switch), ``metavar`` and
    ``help``. In ``help``, ``{backends}``, ``{all_models}`` and ``{token_models}`` stand for the current names
    (filled in when the command is built, so the dataclass's module imports no backend)."""
    return {"cli": {"flags": flags, "metavar": metavar, "help": help}}


def backend_names() -> str:
    """``"onnx, pytorch, triton"``: every backend name a command accepts (registered and lazily imported)."""
    from cortexflow.backends import available_backends

    return ", ".join(available_backends())


def parse_model_option(value: str, allowed: Sequence[VLAModelType] = SUPPORTED_MODELS,
                       option: str = "--model", command: str = "this command") -> VLAModelType:
    """The model named by ``option``'s ``value``; a name outside ``allowed`` says which names work."""
    try:
        model_type = VLAModelType.parse(value)
    except ConfigError:
        raise ConfigError(f"{option} {value!r} is not a model name; expected one of: {model_names(allowed)}") from None
    if model_type not in SUPPORTED_MODELS:
        raise ConfigError(f"{option} {value}: {model_type.value} is not implemented in CortexFlow yet; "
                          f"expected one of: {model_names(allowed)}")
    if model_type not in allowed:
        raise ConfigError(f"{option} {value}: {command} takes {model_names(allowed)}")
    return model_type


def check_device_option(value: str, option: str = "--device") -> None:
    """Raise when ``value`` is not auto, cpu, cuda or cuda:N, or names a GPU this machine lacks."""
    import torch

    text = value.strip().lower()
    if text == "auto":
        return
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        raise BackendUnavailableError(f"{option} {value!r} is not a device; expected auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise BackendUnavailableError(f"{option} {value!r}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailableError(
                f"{option} {value}: no CUDA GPU is available to this PyTorch ({torch.__version__}); "
                f"pass {option} cpu (with --dtype float32 for speed on CPU) or {option} auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BackendUnavailableError(
                f"{option} {value}: this machine has {torch.cuda.device_count()} GPU(s) (cuda:0..cuda:"
                f"{torch.cuda.device_count() - 1})")


def check_dtype_option(value: str, option: str = "--dtype") -> None:
    """Raise when ``value`` is not auto or a dtype name such as bfloat16 / bf16 / float32."""
    if is_auto(value):
        return
    try:
        dtype_name(parse_dtype(value))
    except ConfigError:
        raise ConfigError(f"{option} {value!r}: expected {DTYPE_CHOICES}") from None


def check_backend_option(value: str, option: str = "--backend") -> None:
    """Raise when ``value`` names no backend of this version (a planned one, such as ``cuda``, says so)."""
    from cortexflow.backends import available_backends

    name = value.strip().lower()
    if name in available_backends():
        return
    if name in {b.value for b in BackendType}:
        raise BackendUnavailableError(f"{option} {name}: backend {name!r} is not available in this version of "
                                      f"CortexFlow; expected one of {backend_names()}")
    raise ConfigError(f"{option} {value!r}: expected one of {backend_names()}")


def check_common_options(device: str | None = None, dtype: str | None = None, backend: str | None = None) -> None:
    """Check the cheap options a command was given, in the order device, backend, dtype."""
    if device is not None:
        check_device_option(device)
    if backend is not None:
        check_backend_option(backend)
    if dtype is not None:
        check_dtype_option(dtype)
