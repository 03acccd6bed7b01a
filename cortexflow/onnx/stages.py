"""The policy's three stages as ``torch.nn.Module``s the exporter can trace.

Each wrapper calls the model's own stage code over :class:`~cortexflow.backends.pytorch.PyTorchBackend`
ops, with the weights the stage reads registered as buffers (they become ONNX initializers). The KV
cache crosses the prefix -> decoder boundary as two stacked tensors:

====================  =================================================================  ==========
stage                 inputs                                                             outputs
====================  =================================================================  ==========
``vision``            ``images (B, V, 3, S, S) f32``                                     ``image_tokens (B, V*T, D)``
``prefix``            ``image_tokens (B, V*T, D)``, ``image_masks (B, V) bool``,         ``kv_k, kv_v (layers, B, P, Hkv, Dh)``,
                      ``token_ids (B, L) i64``, ``token_mask (B, L) bool``               ``prefix_mask (B, P) bool``
``decoder`` unrolled  ``kv_k``, ``kv_v``, ``prefix_mask``, ``noise (B, H, A) f32``,        ``actions (B, H, A) f32``
                      ``state (B, A) f32`` (Pi0 only)
``decoder`` step      ``kv_k``, ``kv_v``, ``prefix_mask``, ``x_t (B, H, A) f32``,          ``velocity (B, H, A) f32``
                      ``t () f32``, ``state`` (Pi0 only)
====================  =================================================================  ==========

``D``/``kv`` are in the export dtype; ``P = V*T + L``. The unrolled decoder holds every Euler step
(times are constants); the step decoder is one velocity evaluation and the host runs the loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from cortexflow.backends.pytorch import PyTorchBackend
from cortexflow.models.pi0 import Pi0Model


@dataclass(frozen=True)
class TensorSpec:
    """One stage input or output: name, shape (``None`` = the batch axis), dtype."""

    name: str
    shape: tuple
    dtype: torch.dtype

    @property
    def batch_axis(self) -> int | None:
        return self.shape.index(None) if None in self.shape else None

    def concrete(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if d is None else d for d in self.shape)


class WeightBank(torch.nn.Module):
    """Weights under their canonical (dotted) names, stored as buffers with ``.`` replaced by ``__``."""

    def __init__(self, weights: Mapping[str, torch.Tensor]):
        super().__init__()
        self._names: dict[str, str] = {}
        for name, tensor in weights.items():
            key = name.replace(".", "__")
            self.register_buffer(key, tensor.detach())
            self._names[name] = key

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, key) for name, key in self._names.items()}


class _RecordingDict(dict):
    """A dict that remembers which keys were read (to find the weights a stage uses)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read: set[str] = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


class PolicyStage(torch.nn.Module):
    """Base of the stage wrappers: the model, its ops in ``dtype`` on CPU, the weights it reads."""

    stage: str = ""

    def __init__(self, model: Pi0Model, weights: Mapping[str, torch.Tensor], dtype: torch.dtype,
                 num_views: int, chunk_size: int):
        super().__init__()
        self.model = model
        self.ops = PyTorchBackend(torch.device("cpu"), dtype)
        self.dtype = dtype
        self.num_views = num_views
        self.chunk_size = chunk_size
        config = model.config
        self.prefix_len = num_views * config.num_patches + config.max_token_len
        self.uses_state = "state" in model.get_buffer_shapes(num_views, chunk_size)
        used = self._used_weights(weights)
        self.weights = WeightBank({n: weights[n] for n in sorted(used)})

    # subclasses: input/output specs and the traced computation
    def input_specs(self) -> list[TensorSpec]:
        raise NotImplementedError

    def output_specs(self) -> list[TensorSpec]:
        raise NotImplementedError

    def compute(self, weights: Mapping[str, torch.Tensor], *args: torch.Tensor):
        raise NotImplementedError

    def forward(self, *args: torch.Tensor):
        return self.compute(self.weights.as_dict(), *args)

    def _used_weights(self, weights: Mapping[str, torch.Tensor]) -> set[str]:
        recorder = _RecordingDict(weights)
        with torch.inference_mode():
            self.compute(recorder, *example_inputs(self.input_specs(), 1, self.model, seed=0))
        return recorder.read

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.input_specs()]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.output_specs()]

    def dynamic_shapes(self, batch_dim) -> tuple:
        """``torch.export`` dynamic-shape spec: ``batch_dim`` on every input's batch axis."""
        return tuple({s.batch_axis: batch_dim} if s.batch_axis is not None else None for s in self.input_specs())

    def _kv_specs(self) -> list[TensorSpec]:
        c = self.model.config
        shape = (c.num_encoder_layers, None, self.prefix_len, c.num_kv_heads, c.head_dim)
        return [TensorSpec("kv_k", shape, self.dtype), TensorSpec("kv_v", shape, self.dtype),
                TensorSpec("prefix_mask", (None, self.prefix_len), torch.bool)]


class VisionStage(PolicyStage):
    """``images`` -> ``image_tokens`` (SigLIP tower + projector)."""

    stage = "vision"

    def input_specs(self):
        s = self.model.config.image_size
        return [TensorSpec("images", (None, self.num_views, 3, s, s), torch.float32)]

    def output_specs(self):
        c = self.model.config
        return [TensorSpec("image_tokens", (None, self.num_views * c.num_patches, c.encoder_dim), self.dtype)]

    def compute(self, weights, images):
        return self.model.vision_encoder(self.ops, weights, {"images": images})


class PrefixStage(PolicyStage):
    """Image tokens + prompt -> stacked per-layer KV cache and the prefix validity mask."""

    stage = "prefix"

    def input_specs(self):
        c = self.model.config
        return [
            TensorSpec("image_tokens", (None, self.num_views * c.num_patches, c.encoder_dim), self.dtype),
            TensorSpec("image_masks", (None, self.num_views), torch.bool),
            TensorSpec("token_ids", (None, c.max_token_len), torch.int64),
            TensorSpec("token_mask", (None, c.max_token_len), torch.bool),
        ]

    def output_specs(self):
        return self._kv_specs()

    def compute(self, weights, image_tokens, image_masks, token_ids, token_mask):
        out = self.model.transformer_encoder(self.ops, weights, {
            "image_tokens": image_tokens, "image_masks": image_masks,
            "token_ids": token_ids, "token_mask": token_mask,
        })
        kv_k = torch.stack([k for k, _ in out["kv_cache"]])
        kv_v = torch.stack([v for _, v in out["kv_cache"]])
        return kv_k, kv_v, out["prefix_mask"]


def kv_cache_list(kv_k: torch.Tensor, kv_v: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Stacked ``(layers, B, P, Hkv, Dh)`` K/V -> the model's per-layer ``[(k, v)]``."""
    return [(kv_k[i], kv_v[i]) for i in range(kv_k.shape[0])]


class DecoderStage(PolicyStage):
    """KV cache + noise (+ state) -> actions: every Euler step unrolled in one graph."""

    stage = "decoder"

    def input_specs(self):
        a = self.model.config.action_dim
        specs = self._kv_specs() + [TensorSpec("noise", (None, self.chunk_size, a), torch.float32)]
        if self.uses_state:
            specs.append(TensorSpec("state", (None, a), torch.float32))
        return specs

    def output_specs(self):
        return [TensorSpec("actions", (None, self.chunk_size, self.model.config.action_dim), torch.float32)]

    def compute(self, weights, kv_k, kv_v, prefix_mask, noise, state=None):
        inputs = {"kv_cache": kv_cache_list(kv_k, kv_v), "prefix_mask": prefix_mask, "noise": noise}
        if state is not None:
            inputs["state"] = state
        return self.model.transformer_decoder(self.ops, weights, inputs)


def decoder_context(model: Pi0Model, kv_cache, prefix_mask: torch.Tensor, chunk: int, state=None) -> dict[str, Any]:
    """The context ``Pi0Model.velocity`` reads (the first lines of ``Pi0Model.transformer_decoder``)."""
    mask = model.suffix_attention_mask(prefix_mask, chunk)
    start = prefix_mask.long().sum(dim=1, keepdim=True)
    positions = start + torch.arange(mask.shape[1], device=prefix_mask.device)[None, :]
    ctx = {"kv_cache": kv_cache, "prefix_mask": prefix_mask, "suffix_mask": mask, "suffix_positions": positions}
    if state is not None:
        ctx["state"] = state
    return ctx


class DecoderStepStage(DecoderStage):
    """One denoising step: ``velocity(x_t, t)`` against the KV cache; ``t`` is a 0-d fp32 tensor."""

    def input_specs(self):
        a = self.model.config.action_dim
        specs = self._kv_specs() + [TensorSpec("x_t", (None, self.chunk_size, a), torch.float32),
                                    TensorSpec("t", (), torch.float32)]
        if self.uses_state:
            specs.append(TensorSpec("state", (None, a), torch.float32))
        return specs

    def output_specs(self):
        return [TensorSpec("velocity", (None, self.chunk_size, self.model.config.action_dim), torch.float32)]

    def compute(self, weights, kv_k, kv_v, prefix_mask, x_t, t, state=None):
        ctx = decoder_context(self.model, kv_cache_list(kv_k, kv_v), prefix_mask, x_t.shape[1], state)
        return self.model.velocity(self.ops, weights, x_t, t, ctx).float()


def stage_class(stage: str, decoder_mode: str = "unrolled") -> Callable[..., PolicyStage]:
    if stage == "decoder":
        return DecoderStepStage if decoder_mode == "step" else DecoderStage
    return {"vision": VisionStage, "prefix": PrefixStage}[stage]


def example_inputs(specs: list[TensorSpec], batch: int, model: Pi0Model, seed: int = 0) -> list[torch.Tensor]:
    """Deterministic plausible inputs for ``specs`` at ``batch``: images in [-1, 1], masks with some views
    and prompt positions off, token ids in the vocabulary, unit-scale noise/state/cache values."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for spec in specs:
        shape = spec.concrete(batch)
        name = spec.name
        if name == "images":
            value = torch.rand(shape, generator=gen) * 2 - 1
        elif name == "image_masks":
            value = torch.ones(shape, dtype=torch.bool)
            if shape[1] > 1:
                value[0, -1] = False
        elif name == "token_ids":
            value = torch.randint(0, model.config.vocab_size, shape, generator=gen)
        elif name == "token_mask":
            lengths = torch.randint(1, shape[1] + 1, (shape[0], 1), generator=gen)
            value = torch.arange(shape[1])[None, :] < lengths
        elif name == "prefix_mask":
            value = torch.ones(shape, dtype=torch.bool)
            value[:, -(shape[1] // 4):] = torch.rand(shape[0], shape[1] // 4, generator=gen) < 0.5
        elif name == "t":
            value = torch.tensor(0.7, dtype=torch.float32)
        else:
            value = torch.randn(shape, generator=gen)
        out.append(value.to(spec.dtype) if value.dtype != spec.dtype else value)
    return out
