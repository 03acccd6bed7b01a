"""Measurement tools behind ``cortexflow verify``, ``bench`` and ``profile``, plus their shared set-up.

- :mod:`cortexflow.tools.verify` — a backend's error against the reference, module by module
  (:mod:`cortexflow.tools.decoding_verify` for the token-decoding OpenVLA and RT-2);
- :mod:`cortexflow.tools.bench` — latency and memory of whole ``predict`` calls over a grid of workloads
  (:mod:`cortexflow.tools.bench_workloads` for OpenVLA, RT-2 and RT-1);
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
from typing import TYPE_CHECKING, Sequence

import torch

from cortexflow.config import TOKEN_DECODING_MODELS, ModelConfig, VLAModelType, model_names, resolve_dtype
from cortexflow.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np

SIZES = ("tiny", "real")


def resolve_device_dtype(device: str, dtype: "str | torch.dtype") -> tuple[torch.device, torch.dtype]:
    """``device="auto"`` -> the GPU if there is one; ``dtype="auto"`` -> bfloat16 on a GPU, float32 on CPU."""
    from cortexflow.engine import resolve_device

    resolved = resolve_device(device)
    return resolved, resolve_dtype(dtype, resolved)


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


def token_model(model: str, size: str, **overrides):
    """The token-decoding policy ``model`` (``openvla`` / ``rt2``) in its published (``size="real"``:
    OpenVLA-7B; RT-2 style over PaliGemma-3B) or tiny test configuration with ``overrides``, as an
    ``OpenVLAModel`` / ``RT2Model``."""
    from cortexflow.models.openvla import OpenVLAConfig, OpenVLAModel
    from cortexflow.models.rt2 import RT2Config, RT2Model
    from cortexflow.random_token_vla import tiny_openvla_config, tiny_rt2_config

    kind = VLAModelType.parse(model)
    if kind == VLAModelType.OPENVLA:
        return OpenVLAModel(tiny_openvla_config(**overrides) if size == "tiny" else OpenVLAConfig().replace(**overrides))
    if kind == VLAModelType.RT2:
        return RT2Model(tiny_rt2_config(**overrides) if size == "tiny" else RT2Config().replace(**overrides))
    raise ConfigError(f"{kind.value} is not a token-decoding policy; expected one of {model_names(TOKEN_DECODING_MODELS)}")


def random_token_weights(model, seed: int, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Random non-zero canonical-name weights of a token-decoding ``model``, drawn on ``device``."""
    from cortexflow.random_token_vla import random_openvla_weights, random_rt2_weights

    draw = random_openvla_weights if model.config.model_type == VLAModelType.OPENVLA else random_rt2_weights
    return draw(model.config, seed, dtype, device)


def random_token_image(model, rng) -> "np.ndarray":
    """One random HWC uint8 image of a token-decoding ``model``'s input size (numpy generator ``rng``)."""
    import numpy as np

    size = getattr(model.config, "paligemma", model.config).image_size
    return rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)


def random_prompt_ids(model, length: int, rng) -> list[int]:
    """``length`` prompt ids for a token-decoding ``model`` as its engine sees them: BOS, random ids below
    the action ids (from the numpy generator ``rng``), and the model's closing id (OpenVLA's "▁") last."""
    bos = model.config.bos_id if model.model_type == VLAModelType.OPENVLA else 2  # PaliGemma's BOS
    high = min(model.action_id_range[0], model.config.vocab_size)
    base = [bos, *rng.integers(3, high, size=max(length - 1, 0)).tolist()]
    ids = model.finish_prompt_ids(base[:length])
    if len(ids) > length:
        ids = model.finish_prompt_ids(base[:length - 1])
    if len(ids) != length or ids[0] != bos:
        shortest = len(model.finish_prompt_ids([bos]))
        raise ConfigError(f"{model.model_type.value} needs a prompt of at least {shortest} ids (BOS and its closing "
                          f"id), got {length}")
    return ids


def backend_options(backend) -> dict | None:
    """The typed options of a backend instance as a dict (``TritonBackend.options``), None for a backend
    without any: what bench and verify record beside the backend's name."""
    options = getattr(backend, "options", None)
    return options.as_dict() if hasattr(options, "as_dict") else None


def backend_specs(names: Sequence[str], triton_options=None, source: str = "triton_options") -> dict:
    """What each backend name is created from: the name itself, or for ``triton`` the backend class configured
    with ``triton_options`` (a :class:`~cortexflow.backends.triton_options.TritonOptions`, its text, or None
    for the defaults). Options given without ``triton`` among ``names`` are an error; ``source`` names the
    argument or CLI option in errors."""
    if triton_options is None:
        return {name: name for name in names}
    from cortexflow.backends.triton_options import TritonOptions

    if isinstance(triton_options, str):
        triton_options = TritonOptions.parse(triton_options, source)
    elif not isinstance(triton_options, TritonOptions):
        raise ConfigError(f"{source} must be a TritonOptions or 'name=value,...' text, got {triton_options!r}")
    if "triton" not in names:
        raise ConfigError(f"{source} applies to the triton backend, which is not among {list(names)}: add triton "
                          f"or leave {source} out")
    specs = {name: name for name in names}
    if triton_options != TritonOptions():  # the defaults stay a name, so a machine without Triton skips the rows
        from cortexflow.backends.triton_backend import TritonBackend

        specs["triton"] = TritonBackend.configured(triton_options)
    return specs


def options_for_precision(triton_options, precision: str, device: str, dtype: "str | torch.dtype",
                          source: str = "--precision"):
    """``triton_options`` (a TritonOptions, its text or None) for ``precision``: unchanged for "default"; for
    "fp8", checked like an engine's ``precision="fp8"`` on the resolved ``device`` and ``dtype`` (a CUDA GPU of
    compute capability 8.9+, no interpreter, bfloat16) and with ``fp8`` set to the stages ``precision="fp8"`` picks
    unless they name FP8 stages."""
    from cortexflow.quantization.precision import backend_for_precision, parse_precision

    if parse_precision(precision, source) == "default":
        return triton_options
    from cortexflow.backends.triton_options import TritonOptions

    resolved_device, resolved_dtype = resolve_device_dtype(device, dtype)
    backend_for_precision("triton", precision, resolved_device, resolved_dtype, source)
    if triton_options is None:
        triton_options = TritonOptions()
    elif isinstance(triton_options, str):
        triton_options = TritonOptions.parse(triton_options)
    if triton_options.fp8 != "off":
        return triton_options
    from cortexflow.quantization.precision import PRECISION_FP8_STAGES

    return TritonOptions.from_mapping({**triton_options.as_dict(), "fp8": PRECISION_FP8_STAGES}, source)


def triton_options_dict(spec) -> dict | None:
    """The options a ``triton`` spec runs with (None when the grid has no triton backend)."""
    if spec is None:
        return None
    from cortexflow.backends.triton_options import TritonOptions

    return (TritonOptions() if isinstance(spec, str) else spec.default_options()).as_dict()


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
    "backend_options",
    "backend_specs",
    "environment_info",
    "model_config",
    "package_version",
    "random_prompt_ids",
    "random_token_weights",
    "resolve_device_dtype",
    "resolve_size",
    "synchronize",
    "token_model",
    "triton_options_dict",
    "options_for_precision",
]
