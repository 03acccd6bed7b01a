"""Public configuration types: which model, which backend, which dimensions, how to run.

``ModelConfig`` holds the architecture (filled from the checkpoint's tensor shapes and config, then
overridden by the user); ``InferenceConfig`` holds the run-time choices (views, chunk, backend,
device, dtype, CUDA graphs, tokenizer and norm-stats paths).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch

from cortexflow.errors import ConfigError


class BackendType(str, Enum):
    """How a model is computed. ``pytorch`` is the reference every other backend is checked against."""

    PYTORCH = "pytorch"
    TRITON = "triton"
    CUDA = "cuda"
    ONNX = "onnx"

    @classmethod
    def parse(cls, value: "BackendType | str") -> "BackendType":
        """Accept an enum member or its name/value in any case (``"triton"``, ``"TRITON"``)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            key = value.strip().lower()
            for member in cls:
                if key in (member.value, member.name.lower()):
                    return member
        choices = ", ".join(m.value for m in cls)
        raise ConfigError(f"unknown backend {value!r}; expected one of: {choices}")


class VLAModelType(str, Enum):
    """Which policy architecture a checkpoint holds."""

    PI0 = "pi0"
    PI05 = "pi05"
    OPENVLA = "openvla"
    RT1 = "rt1"
    RT2 = "rt2"

    @classmethod
    def parse(cls, value: "VLAModelType | str") -> "VLAModelType":
        """Accept an enum member or a name such as ``"pi0"``, ``"pi05"``, ``"pi0.5"``."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            key = value.strip().lower().replace(".", "").replace("_", "").replace("-", "")
            for member in cls:
                if key in (member.value, member.name.lower()):
                    return member
        choices = ", ".join(m.value for m in cls)
        raise ConfigError(f"unknown model type {value!r}; expected one of: {choices}")


#: The flow-matching policies (continuous actions from denoising steps).
FLOW_MATCHING_MODELS = (VLAModelType.PI0, VLAModelType.PI05)
#: The token-decoding policies (one image, greedy action tokens).
TOKEN_DECODING_MODELS = (VLAModelType.OPENVLA, VLAModelType.RT2)
#: The policies with a per-episode history of frames (one image per step, an instruction embedding).
HISTORY_MODELS = (VLAModelType.RT1,)
#: Every policy this version builds, loads and runs.
SUPPORTED_MODELS = FLOW_MATCHING_MODELS + TOKEN_DECODING_MODELS + HISTORY_MODELS
#: The policies ``demo``, ``run`` and ``profile`` take (the image + prompt policies).
IMAGE_PROMPT_MODELS = FLOW_MATCHING_MODELS + TOKEN_DECODING_MODELS


def model_names(models: "tuple[VLAModelType, ...]" = SUPPORTED_MODELS) -> str:
    """``"pi0, pi05, openvla, rt2, rt1"``: the names of ``models`` for messages and help texts."""
    return ", ".join(m.value for m in models)


_DTYPE_NAMES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}


def parse_dtype(value: "torch.dtype | str") -> torch.dtype:
    """Map ``torch.bfloat16`` / ``"bfloat16"`` / ``"bf16"`` (and the fp16/fp32 spellings) to a dtype."""
    if isinstance(value, torch.dtype):
        if value in (torch.bfloat16, torch.float16, torch.float32):
            return value
    elif isinstance(value, str):
        key = value.strip().lower().removeprefix("torch.")
        if key in _DTYPE_NAMES:
            return _DTYPE_NAMES[key]
    raise ConfigError(f"unsupported dtype {value!r}; expected bfloat16, float16 or float32")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def is_auto(value: Any) -> bool:
    """Whether an option value is the word ``auto`` (any case, surrounding spaces ignored)."""
    return isinstance(value, str) and value.strip().lower() == "auto"


#: The engines' ``precision`` values: weights in the compute dtype, or the triton backend's FP8 weights
#: (:mod:`cortexflow.quantization.precision`).
PRECISIONS = ("default", "fp8")


def option_setting(source: str, value: str) -> str:
    """``source`` set to ``value`` as the interface writes it: ``--precision fp8`` or ``precision='fp8'``."""
    return f"{source} {value}" if source.startswith("--") else f"{source}={value!r}"


def parse_precision(precision: Any, source: str = "precision") -> str:
    """``precision`` checked: "default" (also None) or "fp8"."""
    value = "default" if precision is None else str(precision).strip().lower()
    if value not in PRECISIONS:
        raise ConfigError(f"{source} must be 'default' or 'fp8', got {precision!r}")
    return value


def resolve_dtype(dtype: "torch.dtype | str", device: torch.device) -> torch.dtype:
    """The compute dtype for ``dtype`` on ``device``: ``"auto"`` -> bfloat16 on a GPU, float32 on the CPU;
    anything else as :func:`parse_dtype` reads it."""
    if is_auto(dtype):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return parse_dtype(dtype)


@dataclass
class ModelConfig:
    """Architecture of a Pi0 / Pi0.5 policy. Defaults are the published Pi0 sizes.

    Vision: SigLIP (``vision_*``); prefix LLM: Gemma-2B (``encoder_*``); action expert: Gemma-300M
    (``decoder_*``). Both Gemmas share ``num_heads``, ``num_kv_heads`` and ``head_dim`` because they
    attend jointly.
    """

    model_type: VLAModelType = VLAModelType.PI0
    image_size: int = 224
    patch_size: int = 14
    vision_encoder_dim: int = 1152
    num_vision_layers: int = 27
    num_vision_heads: int = 16
    vision_mlp_dim: int = 4304
    vision_norm_eps: float = 1e-6
    encoder_dim: int = 2048
    num_encoder_layers: int = 18
    encoder_mlp_dim: int = 16384
    decoder_dim: int = 1024
    num_decoder_layers: int = 18
    decoder_mlp_dim: int = 4096
    num_heads: int = 8
    num_kv_heads: int = 1
    head_dim: int = 256
    vocab_size: int = 257152
    rms_norm_eps: float = 1e-6
    rope_base: float = 10000.0
    action_dim: int = 32
    chunk_size: int = 50
    num_diffusion_steps: int = 10
    max_token_len: int = 48
    discrete_state_input: bool = False

    def __post_init__(self) -> None:
        self.model_type = VLAModelType.parse(self.model_type)

    @classmethod
    def for_model(cls, model_type: "VLAModelType | str", **overrides: Any) -> "ModelConfig":
        """The published configuration of ``model_type`` (Pi0: prompt 48; Pi0.5: prompt 200, discrete state)."""
        model_type = VLAModelType.parse(model_type)
        if model_type == VLAModelType.PI05:
            base = cls(model_type=model_type, max_token_len=200, discrete_state_input=True)
        elif model_type == VLAModelType.PI0:
            base = cls(model_type=model_type)
        else:
            raise ConfigError(f"no Pi0-family configuration for model type {model_type.value!r}")
        return base.replace(**overrides)

    def replace(self, **overrides: Any) -> "ModelConfig":
        """A copy with the given fields changed; unknown field names raise ``ConfigError``."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(f"unknown ModelConfig field(s) {unknown}; valid fields: {sorted(names)}")
        return dataclasses.replace(self, **overrides)

    def validate(self) -> None:
        """Raise ``ConfigError`` when the dimensions cannot form a working model."""
        problems = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int) and not isinstance(value, bool) and value <= 0:
                problems.append(f"{f.name}={value} must be positive")
        if self.image_size % self.patch_size:
            problems.append(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.vision_encoder_dim % self.num_vision_heads:
            problems.append(
                f"vision_encoder_dim {self.vision_encoder_dim} not divisible by num_vision_heads {self.num_vision_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            problems.append(f"num_heads {self.num_heads} not divisible by num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            problems.append(f"head_dim {self.head_dim} must be even for RoPE")
        if self.num_encoder_layers != self.num_decoder_layers:
            problems.append(
                f"num_encoder_layers {self.num_encoder_layers} != num_decoder_layers {self.num_decoder_layers}: "
                "the action expert attends to the prefix layer by layer"
            )
        if self.decoder_dim % 2:
            problems.append(f"decoder_dim {self.decoder_dim} must be even (sin/cos time embedding)")
        if problems:
            raise ConfigError("invalid model configuration: " + "; ".join(problems))

    @property
    def num_patches(self) -> int:
        """Image tokens per view (256 for 224/14)."""
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON view (enum as its value)."""
        data = dataclasses.asdict(self)
        data["model_type"] = self.model_type.value
        return data


@dataclass
class InferenceConfig:
    """Run-time choices of an engine. ``None`` means: take it from the checkpoint / model.

    ``backend`` is a :class:`BackendType`, its name, or a ``ComputeBackend`` class or instance;
    ``device`` is ``"cuda"``, ``"cuda:N"``, ``"cpu"`` or ``"auto"``; ``normalize=None`` normalises
    state and actions exactly when norm stats are given.

    ``prompt_buckets``: the padded prompt lengths a call may use (see :func:`prompt_bucket_lengths`):
    ``"auto"`` (32, 64, 128, ... below ``max_token_len``, and ``max_token_len``), ``"off"`` (always
    ``max_token_len``, as openpi pads), or a list of lengths. A prompt runs at the smallest bucket it fits;
    padded tokens are masked either way, so the bucket changes the work, not the result. With CUDA
    graphs each bucket (and batch size) has its own graph, captured at its first call or by
    ``engine.warmup()``.

    ``base_checkpoint_path``: the base checkpoint when the checkpoint is a PEFT LoRA adapter folder
    (default: the adapter's ``base_model_name_or_path``).

    ``image_preprocessing``: where the camera images are resized-with-pad and scaled: ``"host"`` (numpy /
    torch on the CPU, then one float32 copy), ``"device"`` (each view copied as it comes, uint8 usually, and
    prepared on the engine's GPU), ``"auto"`` (the device on a GPU, else the host).

    ``token_embedding``: where the prompt's text embeddings are looked up: ``"host"`` (the model's lookup table,
    Pi0's 1 GB text embedding, stays in host memory; each call gathers the prompt's rows on the CPU and copies
    them in with the other inputs), ``"device"`` (the table on the engine's device, looked up inside the call),
    ``"auto"`` (the host on a GPU where the model and backend allow it, else the device). Both give the same
    bits; "host" takes the table's bytes off the GPU.

    ``check_finite_actions``: ``predict`` / ``predict_batch`` raise
    :class:`~cortexflow.errors.NonFiniteActionsError` instead of returning actions holding NaN or inf.
    ``precision``: "default" (weights in ``dtype``) or "fp8" (the triton backend's FP8 weights, Ada / Hopper GPUs
    only; :mod:`cortexflow.quantization.precision`)."""

    num_views: int = 2
    chunk_size: int | None = None
    backend: Any = BackendType.PYTORCH
    device: str = "cuda"
    dtype: torch.dtype | str = torch.bfloat16
    use_cuda_graphs: bool = True
    tokenizer_path: str | None = None
    norm_stats_path: str | None = None
    base_checkpoint_path: str | None = None
    max_tokenize_len: int | None = None
    discrete_state_input: bool | None = None
    normalize: bool | None = None
    num_steps: int | None = None
    prompt_buckets: Any = "auto"
    image_preprocessing: str = "auto"
    token_embedding: str = "auto"
    check_finite_actions: bool = False
    precision: str = "default"

    def __post_init__(self) -> None:
        if isinstance(self.backend, str):
            try:
                self.backend = BackendType.parse(self.backend)
            except ConfigError:  # maybe a name given to register_backend; checked when the backend is created
                self.backend = self.backend.strip().lower()
        self.dtype = parse_dtype(self.dtype)
        self.precision = parse_precision(self.precision)
        if not isinstance(self.num_views, int) or self.num_views < 1:
            raise ConfigError(f"num_views must be a positive integer, got {self.num_views!r}")
        self.prompt_buckets = parse_prompt_buckets(self.prompt_buckets)
        if self.image_preprocessing not in ("auto", "device", "host"):
            raise ConfigError(f"image_preprocessing must be 'auto', 'device' or 'host', got {self.image_preprocessing!r}")
        if self.token_embedding not in ("auto", "device", "host"):
            raise ConfigError(f"token_embedding must be 'auto', 'device' or 'host', got {self.token_embedding!r}")
        for name in ("chunk_size", "max_tokenize_len", "num_steps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a positive integer or None, got {value!r}")


def parse_prompt_buckets(spec: Any) -> str | tuple[int, ...]:
    """Check an ``InferenceConfig.prompt_buckets`` value: ``"auto"``, ``"off"`` or positive lengths (sorted)."""
    if isinstance(spec, str):
        name = spec.strip().lower()
        if name in ("auto", "off"):
            return name
        try:
            spec = [int(part) for part in name.split(",") if part.strip()]
        except ValueError:
            raise ConfigError(f"prompt_buckets must be 'auto', 'off' or token lengths like '32,64,200', got {spec!r}") from None
    try:
        lengths = tuple(sorted({int(value) for value in spec}))
    except (TypeError, ValueError):
        raise ConfigError(f"prompt_buckets must be 'auto', 'off' or a list of token lengths, got {spec!r}") from None
    if not lengths or lengths[0] < 1:
        raise ConfigError(f"prompt_buckets must be positive token lengths, got {spec!r}")
    return lengths


def prompt_bucket_lengths(spec: str | tuple[int, ...], max_token_len: int) -> tuple[int, ...]:
    """The padded prompt lengths for ``spec`` (see :func:`parse_prompt_buckets`), ending at ``max_token_len``:
    ``"auto"`` -> 32, 64, 128, ... below it; ``"off"`` -> only it; lengths above it are an error."""
    if spec == "off":
        return (max_token_len,)
    if spec == "auto":
        lengths, length = [], 32
        while length < max_token_len:
            lengths.append(length)
            length *= 2
        return (*lengths, max_token_len)
    too_long = [length for length in spec if length > max_token_len]
    if too_long:
        raise ConfigError(f"prompt_buckets {too_long} exceed the model's max_token_len {max_token_len}")
    return tuple(length for length in spec if length < max_token_len) + (max_token_len,)
