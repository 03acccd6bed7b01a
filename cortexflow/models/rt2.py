"""RT-2-style policy over PaliGemma (SigLIP + Gemma-2B, the Pi0 prefix components): actions as tokens.

Sequence: ``[256 image tokens, emb(BOS + "Q: what action should the robot take to {task}? A:" + "\\n")]``
with PaliGemma's prefix-LM attention (the prompt is bidirectional; generated tokens are causal), then
``chunk_size * action_dim`` greedy tokens over the static KV cache. Actions use openpi's binning
scheme (the ``paligemma_binning_droid`` checkpoint): bin ``b`` of 256 is id ``V - 1 - 128 - b`` and
decodes to ``b / 256 * 2 - 1``. Decoding is constrained to those 256 ids by default (RT-2's output
constraint). Weights are the PaliGemma part of an openpi PyTorch / LeRobot checkpoint plus the
language model's final norm; there are no public RT-2 weights, so this runs whatever PaliGemma
backbone it is given.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch

from cortexflow.config import ModelConfig, VLAModelType
from cortexflow.errors import ConfigError, InputError
from cortexflow.models.base import Weights
from cortexflow.models.gemma import gemma_layer_shapes
from cortexflow.models.rt2_keys import match_rt2_keys
from cortexflow.models.siglip import siglip_tower, siglip_weight_shapes
from cortexflow.models.token_decoding import DecoderDims, DecoderLM, TokenDecodingModel
from cortexflow.processing.action_tokens import binning_action_id_range, binning_tokens_to_values

RT2_PROMPT = "Q: what action should the robot take to {instruction}? A:"


class GemmaLM(DecoderLM):
    """Gemma: RMSNorm with ``(1 + w)``, tanh-GELU gated MLP, embeddings scaled by sqrt(D), tied LM head."""

    gated_activation = "gelu_tanh"

    def __init__(self, dims: DecoderDims, width: int):
        super().__init__(dims)
        self.width = width

    def embed(self, ops, weights, ids: torch.Tensor) -> torch.Tensor:
        table = weights["llm.embed"]
        normalizer = torch.tensor(self.width**0.5, dtype=table.dtype).item()
        return (ops.embedding(ids, table) * normalizer).to(ops.dtype)

    def lm_head(self, weights) -> torch.Tensor:
        return weights["llm.embed"]


@dataclass
class RT2Config:
    """RT-2-style decoding over a PaliGemma backbone (``paligemma``: its SigLIP and Gemma dimensions).

    Defaults follow openpi's ``paligemma_binning_droid``: 8-D actions, chunks of 15, 256 bins."""

    paligemma: ModelConfig = field(default_factory=ModelConfig)
    action_dim: int = 8
    chunk_size: int = 15
    n_action_bins: int = 256
    max_text_tokens: int = 48
    prompt_template: str = RT2_PROMPT
    model_type: VLAModelType = VLAModelType.RT2

    def replace(self, **overrides: Any) -> "RT2Config":
        """A copy with fields changed; ``ModelConfig`` field names go to ``paligemma``; unknown names raise."""
        own = {f.name for f in dataclasses.fields(self)} - {"paligemma", "model_type"}
        mine = {k: v for k, v in overrides.items() if k in own}
        backbone = {k: v for k, v in overrides.items() if k not in own}
        paligemma = self.paligemma.replace(**backbone) if backbone else self.paligemma
        return dataclasses.replace(self, paligemma=paligemma, **mine)

    def validate(self) -> None:
        p = self.paligemma
        problems = []
        for name in ("action_dim", "chunk_size", "n_action_bins", "max_text_tokens"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)} must be positive")
        if p.vocab_size - 128 - self.n_action_bins < 0:
            problems.append(f"vocab_size {p.vocab_size} has no room for {self.n_action_bins} action ids before "
                            "the 128 special ids at its end")
        if p.num_heads % p.num_kv_heads or p.vision_encoder_dim % p.num_vision_heads or p.head_dim % 2:
            problems.append("inconsistent head counts / head_dim")
        if "{instruction}" not in self.prompt_template:
            problems.append("prompt_template must contain '{instruction}'")
        if problems:
            raise ConfigError("invalid RT-2 configuration: " + "; ".join(problems))

    @property
    def vocab_size(self) -> int:
        return self.paligemma.vocab_size

    @property
    def num_patches(self) -> int:
        return self.paligemma.num_patches

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "paligemma"}
        data["model_type"] = self.model_type.value
        data["paligemma"] = self.paligemma.to_dict()
        return data


class RT2Model(TokenDecodingModel):
    """SigLIP + linear projector + Gemma, greedy over 256 binned action ids (``chunk * action_dim`` tokens)."""

    model_type = VLAModelType.RT2

    def __init__(self, config: RT2Config):
        super().__init__(config)
        p = config.paligemma
        dims = DecoderDims(p.num_encoder_layers, p.num_heads, p.num_kv_heads, p.head_dim, p.rope_base, p.rms_norm_eps)
        self.lm = GemmaLM(dims, p.encoder_dim)

    # ---- declarations -------------------------------------------------------------------------
    def get_weight_shapes(self) -> dict[str, tuple[int, ...]]:
        p = self.config.paligemma
        shapes = siglip_weight_shapes(p)
        shapes["projector.weight"] = (p.encoder_dim, p.vision_encoder_dim)
        shapes["projector.bias"] = (p.encoder_dim,)
        shapes["llm.embed"] = (p.vocab_size, p.encoder_dim)
        shapes["llm.norm"] = (p.encoder_dim,)
        for i in range(p.num_encoder_layers):
            shapes.update(gemma_layer_shapes(f"llm.layers.{i}", p.encoder_dim, p.encoder_mlp_dim, p, False))
        return shapes

    def cache_length(self) -> int:
        return self.config.num_patches + self.config.max_text_tokens + self.num_generated_tokens

    def get_buffer_shapes(self, num_views: int = 1, chunk_size: int = 1, batch_size: int = 1,
                          prompt_len: int | None = None) -> dict[str, tuple[int, ...]]:
        """Static buffers with the prompt padded to ``prompt_len`` ids; one image, batch size 1."""
        c, p = self.config, self.config.paligemma
        if batch_size != 1:
            raise ConfigError("the RT-2-style policy decodes one observation at a time (batch size 1)")
        cache = (p.num_encoder_layers, 1, self.cache_length(), p.num_kv_heads, p.head_dim)
        return {
            "images": (1, 3, p.image_size, p.image_size),
            "token_ids": (1, prompt_len or c.max_text_tokens),
            "last_index": (1,),
            "start": (1,),
            "cache_k": cache,
            "cache_v": cache,
            "tokens": (1, self.num_generated_tokens),
        }

    def buffer_dtype(self, name: str, compute_dtype: torch.dtype) -> torch.dtype:
        if name in ("token_ids", "last_index", "start", "tokens"):
            return torch.int64
        return compute_dtype if name.startswith("cache") else torch.float32

    def weight_dtype(self, name: str, compute_dtype: torch.dtype) -> torch.dtype:
        """Patch/position embeddings and RMSNorm scales stay fp32, as in the Pi0 models."""
        if name.startswith(("vision.patch.", "vision.pos")) or name.endswith("norm"):
            return torch.float32
        return compute_dtype

    def preprocess_checkpoint(self, checkpoint: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """openpi / LeRobot PaliGemma keys -> canonical names (the action expert's tensors are skipped)."""
        match = match_rt2_keys(checkpoint.keys(), self.config, self.get_weight_shapes())
        match.raise_if_bad("checkpoint")
        return {name: checkpoint[raw] for name, raw in match.sources.items()}

    # ---- inputs and outputs -------------------------------------------------------------------
    @property
    def num_generated_tokens(self) -> int:
        return self.config.chunk_size * self.config.action_dim

    @property
    def action_id_range(self) -> tuple[int, int]:
        return binning_action_id_range(self.config.vocab_size, self.config.n_action_bins)

    def prepare_image(self, image: Any) -> torch.Tensor:
        """One RGB image -> ``(3, S, S)`` in [-1, 1], resized with padding as openpi does."""
        from cortexflow.processing.images import resize_with_pad
        from cortexflow.processing.vla_inputs import image_as_uint8

        size = self.config.paligemma.image_size
        pixels = resize_with_pad(image_as_uint8(image), size, size).astype(np.float32) / 255.0 * 2.0 - 1.0
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))

    def prompt_ids(self, tokenizer, task_prompt: str) -> list[int]:
        """``BOS + "Q: what action should the robot take to {task}? A:" + "\\n"`` ids."""
        from cortexflow.processing.tokenizer import clean_prompt

        if not isinstance(task_prompt, str) or not task_prompt.strip():
            raise InputError(f"task_prompt must be a non-empty string, got {task_prompt!r}")
        text = self.config.prompt_template.format(instruction=clean_prompt(task_prompt))
        return tokenizer.encode(text, add_bos=True) + tokenizer.encode("\n", add_bos=False)

    def finish_prompt_ids(self, ids: list[int]) -> list[int]:
        return ids

    def prefill_length(self, num_ids: int) -> int:
        return self.config.num_patches + num_ids

    def tokens_to_actions(self, tokens: np.ndarray) -> np.ndarray:
        """Ids ``(chunk * action_dim,)`` -> normalised actions ``(chunk, action_dim)`` in [-1, 1)."""
        values = binning_tokens_to_values(tokens, self.config.vocab_size, self.config.n_action_bins)
        return values.reshape(self.config.chunk_size, self.config.action_dim)

    # ---- stages -------------------------------------------------------------------------------
    def vision_encoder(self, ops, weights: Weights, inputs: Mapping[str, Any]) -> torch.Tensor:
        """``images (1, 3, S, S)`` in [-1, 1] -> projected image tokens ``(1, 256, D)`` (PaliGemma)."""
        tokens = siglip_tower(ops, weights, inputs["images"], self.config.paligemma, ops.dtype)
        return ops.linear(tokens, weights["projector.weight"], weights["projector.bias"])

    def embed_sequence(self, ops, weights, image_tokens: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """``[image tokens, emb(ids) * sqrt(D)]`` ``(1, P, D)``."""
        return torch.cat([image_tokens.to(ops.dtype), self.lm.embed(ops, weights, token_ids)], dim=1)

    def prefill_mask(self, length: int, real_length: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Prefix-LM ``(1, P, P)``: every row sees every real prefix token (none of the padding)."""
        valid = torch.arange(length, device=device)[None, :] < real_length[:, None]
        return valid[:, None, :].expand(1, length, length)
