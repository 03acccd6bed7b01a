"""``backend="onnx"``: the policy's three stages run as ONNX graphs in ONNX Runtime.

On the first call the stages are exported (``torch.onnx.export(..., dynamo=True)``, dynamic batch) into
the export cache (:mod:`cortexflow.onnx.cache`), each checked in ONNX Runtime against PyTorch; later
engine starts with the same weights and settings load the cached files without exporting. Sessions
use the CPU provider, or the CUDA provider with IO binding when ``onnxruntime-gpu`` is installed and
the engine's device is a GPU. Single ops (``linear``, ``attention``, ...) are not exported: calling one
raises ``NotImplementedError`` (so a tool that checks ops reports them as not implemented instead of
silently measuring PyTorch); CUDA graphs are off for this backend.

Options (constructor keywords, or ``OnnxBackend.configured(**options)`` to get a class to pass as
``backend=``): ``cache_dir`` (default: see :func:`cortexflow.onnx.cache.default_cache_dir`, env
``CORTEXFLOW_ONNX_CACHE`` / ``CORTEXFLOW_CACHE``), ``batch`` (``"dynamic:1-16"``), ``opset`` (20 or 23),
``decoder`` (``"unrolled"``: the whole denoising loop in one graph; ``"step"``: one step per ORT call,
the Euler loop on the host), ``simplify`` (onnxslim), ``provider`` (``auto``/``cpu``/``cuda``),
``threads`` (ORT intra-op threads). Supported dtypes: float32 and float16.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from cortexflow.ops import ComputeBackend
from cortexflow.backends.pytorch import PyTorchBackend
from cortexflow.config import VLAModelType
from cortexflow.errors import ConfigError, InputError

#: The model types whose stages the exported bundles run (the Pi0 family).
FLOW_MATCHING_MODELS = (VLAModelType.PI0, VLAModelType.PI05)


class OnnxBackend(PyTorchBackend):
    """Runs ``vision_encoder``, ``transformer_encoder`` and ``transformer_decoder`` in ONNX Runtime."""

    name = "onnx"
    supports_cuda_graphs = False
    variable_prompt_length = False  # the exported prefix stage takes max_token_len tokens
    supports_guided_decoding = False  # the denoising loop is an exported graph
    runs_denoising_loop = False
    supports_host_embedding = False  # the exported prefix stage looks the token ids up itself
    _options: dict = {}

    def __init__(self, device: torch.device, dtype: torch.dtype, **options: Any):
        from cortexflow.onnx._deps import require_exporter, require_onnxruntime
        from cortexflow.onnx.settings import DEFAULT_BATCH, ExportSettings, parse_export_dtype

        super().__init__(device, dtype)
        require_onnxruntime()
        require_exporter()
        options = {**self._options, **options}
        unknown = sorted(set(options) - {"cache_dir", "batch", "opset", "decoder", "simplify", "provider", "threads"})
        if unknown:
            raise ConfigError(f"unknown OnnxBackend option(s) {unknown}; expected cache_dir, batch, opset, decoder, "
                              "simplify, provider, threads")
        parse_export_dtype(dtype)
        self.settings = ExportSettings.make(
            batch=options.get("batch", DEFAULT_BATCH), opset=options.get("opset", 20), dtype=dtype,
            decoder=options.get("decoder", "unrolled"), simplify=options.get("simplify", False),
        )
        self.cache_dir = options.get("cache_dir")
        self.provider = options.get("provider", "auto")
        self.threads = options.get("threads")
        self._bundles: dict[tuple, "_Bundle"] = {}
        self._fingerprint: tuple[Any, str] | None = None
        #: Number of exports this backend ran (0 when everything came from the cache).
        self.exports = 0
        #: The bundle folder of the last stage call.
        self.bundle_dir = None

    @classmethod
    def configured(cls, **options: Any) -> type["OnnxBackend"]:
        """A subclass with ``options`` as defaults, to pass as ``backend=`` to the engine factories."""
        return type(cls.__name__, (cls,), {"_options": {**cls._options, **options}})

    # ---- bundles ------------------------------------------------------------------------------
    def _weights_fingerprint(self, weights: Mapping[str, torch.Tensor]) -> str:
        from cortexflow.onnx.hashing import weights_fingerprint

        if self._fingerprint is None or self._fingerprint[0] is not weights:
            self._fingerprint = (weights, weights_fingerprint(weights))
        return self._fingerprint[1]

    def bundle(self, model, weights: Mapping[str, torch.Tensor], num_views: int, chunk_size: int | None = None) -> "_Bundle":
        """The ORT sessions for ``model`` at ``num_views`` and ``chunk_size`` (exported or loaded from the cache)."""
        from cortexflow.onnx.cache import cached_policy_bundle

        if getattr(model, "model_type", None) not in FLOW_MATCHING_MODELS:
            raise ConfigError(f"the onnx backend runs Pi0-family models (Pi0Model subclasses), not {type(model).__name__}")
        chunk = int(chunk_size or model.config.chunk_size)
        fingerprint = self._weights_fingerprint(weights)
        key = (id(model), fingerprint, num_views, chunk)
        if key not in self._bundles:
            folder, manifest, exported = cached_policy_bundle(
                model, weights, num_views=num_views, chunk_size=chunk, settings=self.settings,
                cache_dir=self.cache_dir, fingerprint=fingerprint,
            )
            self.exports += int(exported)
            self._bundles[key] = _Bundle(folder, manifest, self.device, self.provider, self.threads)
        self.bundle_dir = self._bundles[key].folder
        return self._bundles[key]

    @staticmethod
    def _views_from(model, stage: str, tensor: torch.Tensor, axis: int, what: str) -> int:
        if tensor.dim() <= axis:
            raise InputError(f"onnx stage {stage!r}: {what} has shape {tuple(tensor.shape)}; expected a batch-first "
                             f"tensor with at least {axis + 1} dimensions")
        return int(tensor.shape[axis])

    # ---- stages -------------------------------------------------------------------------------
    def vision_encoder(self, model, weights, inputs):
        images = inputs["images"]
        views = self._views_from(model, "vision", images, 1, "images")
        return self.bundle(model, weights, views).run("vision", images=images)["image_tokens"]

    def transformer_encoder(self, model, weights, inputs):
        from cortexflow.onnx.stages import kv_cache_list

        views = self._views_from(model, "prefix", inputs["image_masks"], 1, "image_masks")
        out = self.bundle(model, weights, views).run(
            "prefix", **{n: inputs[n] for n in ("image_tokens", "image_masks", "token_ids", "token_mask")}
        )
        out["kv_cache"] = kv_cache_list(out["kv_k"], out["kv_v"])
        return out

    def transformer_decoder(self, model, weights, inputs):
        c = model.config
        prefix_mask, noise = inputs["prefix_mask"], inputs["noise"]
        prefix_len = self._views_from(model, "decoder", prefix_mask, 1, "prefix_mask")
        views, rest = divmod(prefix_len - c.max_token_len, c.num_patches)
        if rest or views < 1:
            raise InputError(f"onnx stage 'decoder': prefix_mask has length {prefix_len}, which is not "
                             f"views x {c.num_patches} + {c.max_token_len} for any number of views")
        chunk = self._views_from(model, "decoder", noise, 1, "noise")
        bundle = self.bundle(model, weights, views, chunk)
        if "kv_k" in inputs:
            kv_k, kv_v = inputs["kv_k"], inputs["kv_v"]
        else:
            kv_k = torch.stack([k for k, _ in inputs["kv_cache"]])
            kv_v = torch.stack([v for _, v in inputs["kv_cache"]])
        feeds = {"kv_k": kv_k, "kv_v": kv_v, "prefix_mask": prefix_mask}
        if "state" in bundle.stage("decoder").input_names:
            if inputs.get("state") is None:
                raise InputError("onnx stage 'decoder': this Pi0 decoder needs a 'state' input (B, action_dim)")
            feeds["state"] = inputs["state"]
        if bundle.decoder_mode == "step":
            def velocity(x_t: torch.Tensor, t: float) -> torch.Tensor:
                t_tensor = torch.tensor(t, dtype=torch.float32, device=x_t.device)
                return bundle.run("decoder", x_t=x_t.contiguous(), t=t_tensor, **feeds)["velocity"]

            return model.integrate(velocity, noise)
        return bundle.run("decoder", noise=noise, **feeds)["actions"]


def _stage_only(op: str):
    def not_exported(self, *args, **kwargs):
        raise NotImplementedError(
            f"the onnx backend runs whole stages (vision_encoder, transformer_encoder, transformer_decoder) in "
            f"ONNX Runtime; the single op {op!r} is not exported"
        )

    not_exported.__name__ = op
    return not_exported


for _op in sorted(ComputeBackend.__abstractmethods__):
    setattr(OnnxBackend, _op, _stage_only(_op))
del _op


class _Bundle:
    """The sessions of one exported bundle folder."""

    def __init__(self, folder, manifest: dict, device: torch.device, provider: str, threads):
        from cortexflow.onnx.runtime import OrtStage

        self.folder = folder
        self.manifest = manifest
        self.decoder_mode = manifest["settings"]["decoder"]
        batch = manifest["settings"]["batch"]
        self._stages = {
            stage: OrtStage(stage, folder / entry["file"], entry, batch, device, provider, threads)
            for stage, entry in manifest["stages"].items()
        }

    def stage(self, name: str):
        return self._stages[name]

    def run(self, stage: str, **feeds) -> dict[str, torch.Tensor]:
        return self._stages[stage](**feeds)
