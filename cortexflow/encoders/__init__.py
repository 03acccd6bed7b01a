"""Perception encoders a robot stack runs beside the policy, exportable to ONNX like the policy stages.

=========================  ==========================================================  ====================
name                       what                                                        output
=========================  ==========================================================  ====================
``siglip``                 the policy's own SigLIP tower at real size (So400m/14, 224)  ``tokens (B, 256, 1152)``
``siglip_tiny``            the same tower at the tiny test size                         ``tokens (B, 256, 48)``
``vit_small_patch16_224``  timm ViT-S/16 (random init), ``forward_features``            ``tokens (B, 197, 384)``
``resnet18d``              timm ResNet-18-D (random init), ``forward_features``         ``features (B, 512, 7, 7)``
=========================  ==========================================================  ====================

All take ``images (B, 3, 224, 224)`` float in the model's input range. The SigLIP tower is written
against backend ops, so it runs on any compute backend (``ops="pytorch"``, ``"triton"``); the timm
models run in PyTorch. Weights are random (seeded): timm is an optional extra and nothing is
downloaded. :func:`export_encoder` writes ``encoder.onnx`` + ``manifest.json`` (static or dynamic batch)
the same way the policy stages are exported; :func:`load_encoder_session` runs it in ONNX Runtime.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cortexflow.config import ModelConfig, dtype_name, parse_dtype
from cortexflow.errors import ConfigError
from cortexflow.models.siglip import siglip_tower, siglip_weight_shapes

ENCODERS = ("siglip_tiny", "siglip", "vit_small_patch16_224", "resnet18d")
TIMM_ENCODERS = ("vit_small_patch16_224", "resnet18d")
ENCODER_FORMAT = "cortexflow-onnx-encoder/1"


def siglip_config(size: str) -> ModelConfig:
    """The SigLIP part of the Pi0 configuration: ``"real"`` (published) or ``"tiny"`` (tests)."""
    if size == "tiny":
        from cortexflow.random_checkpoint import tiny_model_config

        return tiny_model_config("pi0")
    return ModelConfig()


def siglip_random_weights(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded fp32 weights of the SigLIP tower only, drawn as :mod:`cortexflow.random_checkpoint` draws them."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in siglip_weight_shapes(config).items():
        tensor = torch.randn(shape, generator=gen)
        if name == "vision.pos":
            tensor *= 0.02
        elif len(shape) >= 2:
            tensor /= math.sqrt(math.prod(shape[1:]))
        else:
            tensor = tensor * 0.02 + 0.01
        weights[name] = tensor
    return weights


class SiglipTower(torch.nn.Module):
    """``images (B, 3, S, S)`` -> post-LN tokens ``(B, T, D)`` through ``ops`` (a compute backend)."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], ops):
        super().__init__()
        from cortexflow.onnx.stages import WeightBank

        self.config = config
        self.ops = ops
        self.bank = WeightBank(weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return siglip_tower(self.ops, self.bank.as_dict(), images, self.config, self.ops.dtype)


class TimmFeatures(torch.nn.Module):
    """A timm model's ``forward_features`` (no pooling, no classifier)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(images)


@dataclass
class PerceptionEncoder:
    """A ready encoder: ``module(images)`` on ``device`` in ``dtype``, plus what describes its work."""

    name: str
    module: torch.nn.Module
    image_size: int
    output_name: str
    source: str
    device: torch.device
    dtype: torch.dtype
    ops: str = "pytorch"
    seed: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def params(self) -> int:
        return sum(t.numel() for t in list(self.module.parameters()) + list(self.module.buffers()) if t.is_floating_point())

    def input_shape(self, batch: int) -> tuple[int, int, int, int]:
        return (batch, 3, self.image_size, self.image_size)

    def example_input(self, batch: int, seed: int = 0, device: "torch.device | str | None" = None) -> torch.Tensor:
        """Uniform [-1, 1] images ``(batch, 3, S, S)`` fp32 (seeded, drawn on the CPU)."""
        gen = torch.Generator().manual_seed(seed)
        images = torch.rand(self.input_shape(batch), generator=gen) * 2 - 1
        return images.to(device or self.device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(images)

    def flops_per_image(self) -> float:
        """FLOPs of one image counted by ``torch.utils.flop_counter`` (matmuls, convolutions, attention)."""
        if "flops_per_image" not in self.extra:
            from torch.utils.flop_counter import FlopCounterMode

            counter = FlopCounterMode(display=False)
            with torch.inference_mode(), counter:
                self.module(self.example_input(1))
            self.extra["flops_per_image"] = float(counter.get_total_flops())
        return self.extra["flops_per_image"]

    def fingerprint(self) -> str:
        from cortexflow.onnx.hashing import weights_fingerprint

        return weights_fingerprint({k: v for k, v in self.module.state_dict().items()})

    def cpu_float_module(self, dtype: torch.dtype | None = None) -> torch.nn.Module:
        """A CPU copy with PyTorch ops in ``dtype`` (default: the encoder's) for export and references."""
        dtype = dtype or self.dtype
        if isinstance(self.module, SiglipTower):
            from cortexflow.backends.pytorch import PyTorchBackend

            weights = {n: t.detach().to("cpu") for n, t in self.module.bank.as_dict().items()}
            weights = {n: (t if _keeps_fp32(n) else t.to(dtype)) for n, t in weights.items()}
            return SiglipTower(self.module.config, weights, PyTorchBackend(torch.device("cpu"), dtype)).eval()
        if self.device.type == "cpu" and dtype == self.dtype:
            return self.module
        import copy

        return copy.deepcopy(self.module).to(device="cpu", dtype=dtype).eval()


def _keeps_fp32(name: str) -> bool:
    return name.startswith(("vision.patch.", "vision.pos"))


def create_encoder(
    name: str,
    *,
    device: "torch.device | str" = "cpu",
    dtype: "torch.dtype | str" = "float32",
    seed: int = 0,
    ops: Any = "pytorch",
) -> PerceptionEncoder:
    """Build encoder ``name`` (see :data:`ENCODERS`) with seeded random weights on ``device`` in ``dtype``.

    ``ops`` (SigLIP only) is the compute backend running the tower: a name for
    :func:`cortexflow.backends.create_backend` (``"pytorch"``, ``"triton"``) or an instance. The timm
    models need the ``timm`` package (see :mod:`cortexflow.encoders.timm_compat`)."""
    key = str(name).strip().lower().replace("-", "_")
    device = torch.device(device)
    dtype = parse_dtype(dtype)
    if key in ("siglip", "siglip_tiny"):
        from cortexflow.backends import create_backend

        config = siglip_config("tiny" if key == "siglip_tiny" else "real")
        backend = create_backend(ops, device, dtype)
        weights = siglip_random_weights(config, seed)
        weights = {n: t.to(device=device, dtype=torch.float32 if _keeps_fp32(n) else dtype) for n, t in weights.items()}
        module = SiglipTower(config, weights, backend).eval()
        return PerceptionEncoder(key, module, config.image_size, "tokens", "cortexflow SigLIP (Pi0 vision tower)",
                                 device, dtype, ops=getattr(backend, "name", str(ops)), seed=seed)
    if key in TIMM_ENCODERS:
        if str(getattr(ops, "name", ops)).lower() != "pytorch":
            raise ConfigError(f"encoder {key!r} is a timm model and runs only with ops='pytorch' "
                              f"(the SigLIP tower runs on other backends), got ops={ops!r}")
        from cortexflow.encoders.timm_compat import import_timm

        timm = import_timm()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = timm.create_model(key, pretrained=False)
        module = TimmFeatures(model).eval().to(device=device, dtype=dtype)
        output = "tokens" if key.startswith("vit") else "features"
        return PerceptionEncoder(key, module, 224, output, f"timm {getattr(timm, '__version__', '?')} {key}",
                                 device, dtype, seed=seed)
    raise ConfigError(f"unknown encoder {name!r}; expected one of {', '.join(ENCODERS)}")


# ---- ONNX ---------------------------------------------------------------------------------------
def export_encoder(
    encoder: "PerceptionEncoder | str",
    out_dir: "str | Path",
    *,
    batch: str = "dynamic:1-6",
    opset: int = 20,
    dtype: "torch.dtype | str | None" = None,
    simplify: bool = False,
    check: bool = True,
    external_data_threshold: int | None = None,
    exporter: str = "dynamo",
) -> dict:
    """Export ``encoder`` (or the name of one, built with default seed) to ``out_dir/encoder.onnx`` and
    ``out_dir/manifest.json``; return the manifest.

    The manifest has the policy bundle's fields (``settings.batch``, ``opset``, ``dtype``, ``toolchain``,
    ``stages.encoder`` with inputs/outputs/parity) plus ``encoder`` (name, source, params, image size).
    ``check`` proves ORT matches PyTorch at two batch sizes; on failure nothing is written."""
    from cortexflow.onnx._deps import toolchain_versions
    from cortexflow.onnx.exporter import export_module
    from cortexflow.onnx.settings import EXTERNAL_DATA_THRESHOLD, ExportSettings
    from cortexflow.onnx.stages import TensorSpec

    if isinstance(encoder, str):
        encoder = create_encoder(encoder)
    dtype = parse_dtype(dtype) if dtype is not None else encoder.dtype
    settings = ExportSettings.make(batch=batch, opset=opset, dtype=dtype, simplify=simplify,
                                   external_data_threshold=EXTERNAL_DATA_THRESHOLD if external_data_threshold is None
                                   else external_data_threshold)
    module = encoder.cpu_float_module(settings.dtype)
    with torch.inference_mode():
        sample = module(encoder.example_input(1, device="cpu").to(encoder_input_dtype(encoder, settings.dtype)))
    in_dtype = encoder_input_dtype(encoder, settings.dtype)
    inputs = [TensorSpec("images", (None, 3, encoder.image_size, encoder.image_size), in_dtype)]
    outputs = [TensorSpec(encoder.output_name, (None, *sample.shape[1:]), sample.dtype)]
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    try:
        entry = export_module(
            module, staging / "encoder.onnx", stage="encoder", input_specs=inputs, output_specs=outputs,
            batch=settings.batch, opset=settings.opset, dtype=settings.dtype, simplify=settings.simplify,
            make_inputs=lambda b: [encoder.example_input(b, seed=b, device="cpu").to(in_dtype)],
            external_data_threshold=settings.external_data_threshold, check=check, exporter=exporter,
        )
        manifest = {
            "format": ENCODER_FORMAT,
            "encoder": {"name": encoder.name, "source": encoder.source, "params": encoder.params,
                        "image_size": encoder.image_size, "seed": encoder.seed, "weights_fingerprint": encoder.fingerprint()},
            "settings": {**settings.to_dict(), "batch": settings.batch.to_dict()},
            "toolchain": {"exporter": entry["exporter"], **toolchain_versions()},
            "stages": {"encoder": entry},
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
        for item in staging.iterdir():
            os.replace(item, out / item.name)
        return manifest
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def encoder_input_dtype(encoder: PerceptionEncoder, dtype: torch.dtype) -> torch.dtype:
    """The image dtype the encoder takes at compute ``dtype``: fp32 for the SigLIP tower (its patch
    embedding stays fp32), ``dtype`` for the timm modules."""
    return torch.float32 if isinstance(encoder.module, SiglipTower) else dtype


def cached_encoder_export(encoder: PerceptionEncoder, cache_dir: "str | Path | None" = None, **export_options) -> tuple[Path, dict, bool]:
    """``export_encoder`` into the export cache (keyed by encoder, weights and options); returns
    ``(folder, manifest, exported)`` — ``exported`` is False on a cache hit."""
    import torch as _torch

    from cortexflow.onnx._deps import version
    from cortexflow.onnx.cache import default_cache_dir
    from cortexflow.onnx.hashing import settings_key

    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    options = {k: (dtype_name(v) if isinstance(v, _torch.dtype) else v) for k, v in export_options.items()}
    key = "enc-" + settings_key(ENCODER_FORMAT, encoder.name, encoder.fingerprint(), dtype_name(encoder.dtype),
                                options, _torch.__version__, version("onnxscript"))
    folder = root / key
    if (folder / "manifest.json").exists():
        return folder, json.loads((folder / "manifest.json").read_text()), False
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    try:
        export_encoder(encoder, staging, **export_options)
        try:
            os.replace(staging, folder)
        except OSError:
            if not (folder / "manifest.json").exists():
                raise
        return folder, json.loads((folder / "manifest.json").read_text()), True
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_encoder_session(folder: "str | Path", device: "torch.device | str" = "cpu", provider: str = "auto",
                         threads: int | None = None):
    """An :class:`~cortexflow.onnx.runtime.OrtStage` for the exported encoder in ``folder``:
    ``session(images=...)["tokens" | "features"]``."""
    from cortexflow.onnx.runtime import OrtStage

    folder = Path(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    entry = manifest["stages"]["encoder"]
    return OrtStage("encoder", folder / entry["file"], entry, manifest["settings"]["batch"], device, provider, threads)


__all__ = [
    "ENCODERS",
    "TIMM_ENCODERS",
    "PerceptionEncoder",
    "SiglipTower",
    "TimmFeatures",
    "cached_encoder_export",
    "create_encoder",
    "encoder_input_dtype",
    "export_encoder",
    "load_encoder_session",
    "siglip_config",
    "siglip_random_weights",
]
