"""Export settings: the batch range, the stages, the opset, the dtype and the decoder form."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import torch

from cortexflow.config import dtype_name, parse_dtype
from cortexflow.errors import ConfigError

#: The policy's stages in call order; the engine calls them ``vision_encoder``,
#: ``transformer_encoder`` and ``transformer_decoder``.
POLICY_STAGES = ("vision", "prefix", "decoder")
DECODER_MODES = ("unrolled", "step")
OPSETS = (20, 23)
#: Files whose initializers exceed this many bytes keep their weights in a ``.data`` file beside them
#: (protobuf cannot serialise a model over 2 GiB).
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3
DEFAULT_BATCH = "dynamic:1-16"
BATCH_DIM = "batch"


@dataclass(frozen=True)
class BatchSpec:
    """The batch sizes an export accepts: one static size, or a dynamic range ``[min, max]``.

    Written ``static`` (batch 1), ``static:N``, ``dynamic`` (1-16) or ``dynamic:A-B``."""

    min: int = 1
    max: int = 16
    dynamic: bool = True

    @classmethod
    def parse(cls, value: "BatchSpec | str | int") -> "BatchSpec":
        if isinstance(value, BatchSpec):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return cls._checked(value, value, False, str(value))
        text = str(value).strip().lower()
        match = re.fullmatch(r"static(?::(\d+))?", text)
        if match:
            size = int(match.group(1) or 1)
            return cls._checked(size, size, False, value)
        match = re.fullmatch(r"dynamic(?::(\d+)-(\d+))?", text)
        if match:
            lo, hi = (int(match.group(1)), int(match.group(2))) if match.group(1) else (1, 16)
            return cls._checked(lo, hi, True, value)
        raise ConfigError(
            f"batch {value!r} is not understood; expected 'static', 'static:N', 'dynamic' or 'dynamic:A-B' (e.g. dynamic:1-6)"
        )

    @classmethod
    def _checked(cls, lo: int, hi: int, dynamic: bool, text) -> "BatchSpec":
        if lo < 1 or hi < lo:
            raise ConfigError(f"batch {text!r}: sizes must satisfy 1 <= min <= max, got {lo}-{hi}")
        if dynamic and lo == hi:
            dynamic = False
        return cls(lo, hi, dynamic)

    @property
    def example(self) -> int:
        """The batch size the exporter traces with: 2 when the range allows it (never 1, which the
        tracer specialises), else the smallest size."""
        if not self.dynamic:
            return self.min
        return 2 if self.min <= 2 <= self.max else self.min

    @property
    def check_sizes(self) -> list[int]:
        """Sizes the export is checked at: the smallest and one that differs from the traced size, so an
        exporter that froze the batch to the traced size fails the check."""
        if not self.dynamic:
            return [self.min]
        sizes = {self.min, min(self.max, max(self.example + 1, self.min))}
        return sorted(sizes)

    def allows(self, batch: int) -> bool:
        return self.min <= batch <= self.max

    def describe(self) -> str:
        return f"dynamic {self.min}..{self.max}" if self.dynamic else f"static {self.min}"

    def __str__(self) -> str:
        return f"dynamic:{self.min}-{self.max}" if self.dynamic else f"static:{self.min}"

    def to_dict(self) -> dict:
        return {"mode": "dynamic" if self.dynamic else "static", "min": self.min, "max": self.max,
                "dim_name": BATCH_DIM if self.dynamic else None}


def parse_stages(value: "str | list[str] | tuple[str, ...] | None") -> tuple[str, ...]:
    """``"all"`` / ``"vision,prefix"`` / a list -> stages in call order."""
    if value is None:
        return POLICY_STAGES
    items = value.replace(" ", "").split(",") if isinstance(value, str) else list(value)
    items = [i.strip().lower() for i in items if i and i.strip()]
    if not items or items == ["all"]:
        return POLICY_STAGES
    aliases = {"vision_encoder": "vision", "transformer_encoder": "prefix", "transformer_decoder": "decoder"}
    items = [aliases.get(i, i) for i in items]
    unknown = sorted(set(items) - set(POLICY_STAGES))
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; expected any of {', '.join(POLICY_STAGES)} or 'all'")
    return tuple(s for s in POLICY_STAGES if s in items)


def parse_export_dtype(value: "str | torch.dtype") -> torch.dtype:
    """fp32 / fp16 (ONNX Runtime has no bf16 kernels on CPU)."""
    dtype = parse_dtype(value)
    if dtype == torch.bfloat16:
        raise ConfigError(
            "ONNX export supports float32 and float16, not bfloat16 (ONNX Runtime has no bf16 kernels for most "
            "ops); pass dtype='float32' (reference precision) or 'float16'"
        )
    return dtype


@dataclass(frozen=True)
class ExportSettings:
    """Everything that changes the exported files (and so is part of the cache key)."""

    batch: BatchSpec = field(default_factory=lambda: BatchSpec.parse(DEFAULT_BATCH))
    opset: int = 20
    dtype: torch.dtype = torch.float32
    decoder: str = "unrolled"
    simplify: bool = False
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD

    @classmethod
    def make(cls, batch="dynamic:1-16", opset: int = 20, dtype="float32", decoder: str = "unrolled",
             simplify: bool = False, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> "ExportSettings":
        """Validated settings from user-facing values (strings accepted)."""
        opset = int(opset)
        if opset not in OPSETS:
            raise ConfigError(f"opset {opset} is not supported; expected one of {OPSETS}")
        decoder = str(decoder).strip().lower()
        if decoder not in DECODER_MODES:
            raise ConfigError(f"decoder {decoder!r} is not understood; expected 'unrolled' (the whole denoising "
                              "loop in one graph) or 'step' (one denoising step; the loop runs on the host)")
        if external_data_threshold < 0:
            raise ConfigError("external_data_threshold must be >= 0 bytes")
        return cls(BatchSpec.parse(batch), opset, parse_export_dtype(dtype), decoder, bool(simplify),
                   int(external_data_threshold))

    def to_dict(self) -> dict:
        data = asdict(self)
        data["batch"] = str(self.batch)
        data["dtype"] = dtype_name(self.dtype)
        return data
