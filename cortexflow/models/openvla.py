"""OpenVLA-7B (Prismatic ``dinosiglip-vit-so-224px`` + Llama-2-7B): image -> 7 greedy action tokens.

Sequence (``docs/reference_facts.md#F-OV-5``): ``[emb(BOS), 256 projected patches, emb(prompt ids after
BOS, ending with the "▁" id 29871)]``, positions ``0..P-1``, causal attention. Vision: DINOv2 ViT-L/14
(registers, LayerScale) and SigLIP So400m/14, each read after its second-to-last block, concatenated on
channels (1024 + 1152) and projected by ``fc1 -> GELU -> fc2 -> GELU -> fc3``. Decoding: one prefill,
then ``action_dim - 1`` single-token steps over the static KV cache (``token_decoding.py``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from cortexflow.config import VLAModelType
from cortexflow.errors import CheckpointError, ConfigError, InputError
from cortexflow.models.base import Weights
from cortexflow.models.openvla_keys import match_openvla_keys, to_canonical_tensor
from cortexflow.models.llama import LlamaLM, llama_weight_shapes, prepare_llama_norms
from cortexflow.models.token_decoding import DecoderDims, TokenDecodingModel, causal_mask
from cortexflow.models.vit import ViTSpec, gelu, vit_features, vit_weight_shapes
from cortexflow.processing.action_tokens import openvla_action_id_range, openvla_tokens_to_values
from cortexflow.processing.vla_inputs import prepare_openvla_image

OPENVLA_PROMPT = "In: What action should the robot take to {instruction}?\nOut:"


@dataclass
class OpenVLAConfig:
    """Architecture and decoding settings of OpenVLA. Defaults are OpenVLA-7B's.

    ``*_layers`` count the blocks stored in the checkpoint; the towers are read after block
    ``layers - 2`` (timm ``get_intermediate_layers(n={layers - 2})``). ``vocab_size`` is the padded
    embedding size (32064); the action tokenizer works on ``vocab_size - pad_to_multiple_of`` (32000)."""

    model_type: VLAModelType = VLAModelType.OPENVLA
    image_size: int = 224
    patch_size: int = 14
    dino_dim: int = 1024
    dino_heads: int = 16
    dino_mlp_dim: int = 4096
    dino_layers: int = 24
    dino_registers: int = 4
    siglip_dim: int = 1152
    siglip_heads: int = 16
    siglip_mlp_dim: int = 4304
    siglip_layers: int = 27
    vit_norm_eps: float = 1e-6
    projector_dim: int = 8704
    llm_dim: int = 4096
    llm_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    llm_mlp_dim: int = 11008
    vocab_size: int = 32064
    pad_to_multiple_of: int = 64
    rms_norm_eps: float = 1e-6
    rope_base: float = 10000.0
    n_action_bins: int = 256
    action_dim: int = 7
    max_text_tokens: int = 128
    bos_id: int = 1
    space_token_id: int = 29871
    prompt_template: str = OPENVLA_PROMPT

    def __post_init__(self) -> None:
        self.model_type = VLAModelType.parse(self.model_type)

    def replace(self, **overrides: Any) -> "OpenVLAConfig":
        """A copy with the given fields changed; unknown field names raise ``ConfigError``."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(f"unknown OpenVLAConfig field(s) {unknown}; valid fields: {sorted(names)}")
        return dataclasses.replace(self, **overrides)

    def validate(self) -> None:
        """Raise ``ConfigError`` when the dimensions cannot form a working model."""
        problems = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int) and not isinstance(value, bool) and value <= 0 and f.name != "pad_to_multiple_of":
                problems.append(f"{f.name}={value} must be positive")
        if self.image_size % self.patch_size:
            problems.append(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        for name in ("dino", "siglip"):
            dim, heads = getattr(self, f"{name}_dim"), getattr(self, f"{name}_heads")
            if heads > 0 and dim % heads:
                problems.append(f"{name}_dim {dim} not divisible by {name}_heads {heads}")
            if getattr(self, f"{name}_layers") < 2:
                problems.append(f"{name}_layers must be at least 2 (the tower is read after its second-to-last block)")
        if self.num_kv_heads > 0 and self.num_heads % self.num_kv_heads:
            problems.append(f"num_heads {self.num_heads} not divisible by num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            problems.append(f"head_dim {self.head_dim} must be even for RoPE")
        if self.text_vocab_size < self.n_action_bins:
            problems.append(f"text vocabulary {self.text_vocab_size} is smaller than n_action_bins {self.n_action_bins}")
        if "{instruction}" not in self.prompt_template:
            problems.append("prompt_template must contain '{instruction}'")
        if problems:
            raise ConfigError("invalid OpenVLA configuration: " + "; ".join(problems))

    @property
    def text_vocab_size(self) -> int:
        """The vocabulary the action tokenizer counts from (32000): embedding rows minus the padding."""
        return self.vocab_size - self.pad_to_multiple_of

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def fused_dim(self) -> int:
        return self.dino_dim + self.siglip_dim

    @property
    def action_id_range(self) -> tuple[int, int]:
        """Ids the action tokenizer can emit (31744..31999 for OpenVLA-7B), for constrained decoding."""
        return openvla_action_id_range(self.text_vocab_size, self.n_action_bins)


    def dino_spec(self) -> ViTSpec:
        return ViTSpec("dino", self.dino_dim, self.dino_heads, self.dino_mlp_dim, self.dino_layers - 2,
                       num_registers=self.dino_registers, class_token=True, layer_scale=True,
                       patch_size=self.patch_size, num_patches=self.num_patches, norm_eps=self.vit_norm_eps)

    def siglip_spec(self) -> ViTSpec:
        return ViTSpec("siglip", self.siglip_dim, self.siglip_heads, self.siglip_mlp_dim, self.siglip_layers - 2,
                       patch_size=self.patch_size, num_patches=self.num_patches, norm_eps=self.vit_norm_eps)

    def decoder_dims(self) -> DecoderDims:
        return DecoderDims(self.llm_layers, self.num_heads, self.num_kv_heads, self.head_dim, self.rope_base,
                           self.rms_norm_eps)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["model_type"] = self.model_type.value
        return data


class OpenVLAModel(TokenDecodingModel):
    """OpenVLA: fused DINOv2 + SigLIP patches, a 3-layer GELU projector, Llama-2, greedy action tokens."""

    model_type = VLAModelType.OPENVLA

    def __init__(self, config: OpenVLAConfig):
        super().__init__(config)
        self.lm = LlamaLM(config.decoder_dims())

    # ---- declarations -------------------------------------------------------------------------
    def get_weight_shapes(self) -> dict[str, tuple[int, ...]]:
        c = self.config
        shapes = vit_weight_shapes(c.dino_spec())
        shapes.update(vit_weight_shapes(c.siglip_spec()))
        for name, (out_f, in_f) in {
            "fc1": (c.projector_dim, c.fused_dim),
            "fc2": (c.llm_dim, c.projector_dim),
            "fc3": (c.llm_dim, c.llm_dim),
        }.items():
            shapes[f"projector.{name}.weight"] = (out_f, in_f)
            shapes[f"projector.{name}.bias"] = (out_f,)
        shapes.update(llama_weight_shapes(c.llm_layers, c.llm_dim, c.llm_mlp_dim, c.num_heads, c.num_kv_heads,
                                          c.head_dim, c.vocab_size))
        return shapes

    def cache_length(self) -> int:
        """KV-cache rows: image tokens + the longest prompt + the generated tokens."""
        c = self.config
        return c.num_patches + c.max_text_tokens + c.action_dim

    def get_buffer_shapes(self, num_views: int = 1, chunk_size: int = 1, batch_size: int = 1,
                          prompt_len: int | None = None) -> dict[str, tuple[int, ...]]:
        """Static buffers of one call with the prompt padded to ``prompt_len`` ids (default: the maximum).

        ``num_views`` and ``chunk_size`` are fixed for OpenVLA (one image, one action) and ignored."""
        c = self.config
        if batch_size != 1:
            raise ConfigError("OpenVLA decodes one observation at a time (batch size 1), as the reference does")
        prompt_len = prompt_len or c.max_text_tokens
        cache = (c.llm_layers, 1, self.cache_length(), c.num_kv_heads, c.head_dim)
        return {
            "images": (1, 6, c.image_size, c.image_size),
            "token_ids": (1, prompt_len),
            "last_index": (1,),
            "start": (1,),
            "cache_k": cache,
            "cache_v": cache,
            "tokens": (1, c.action_dim),
        }

    def buffer_dtype(self, name: str, compute_dtype: torch.dtype) -> torch.dtype:
        if name in ("token_ids", "last_index", "start", "tokens"):
            return torch.int64
        return compute_dtype if name.startswith("cache") else torch.float32

    def preprocess_checkpoint(self, checkpoint: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Hugging Face OpenVLA keys (or canonical names) -> canonical names; unknown keys are an error."""
        match = match_openvla_keys(checkpoint.keys(), self.config)
        if match.missing or match.unexpected:
            raise CheckpointError(f"checkpoint does not match OpenVLA: missing {match.missing[:20]}; "
                                  f"unexpected {match.unexpected[:20]}")
        expected = self.get_weight_shapes()
        return {name: to_canonical_tensor(checkpoint[raw], expected[name]) for name, raw in match.sources.items()}

    def prepare_weights(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Derived tensors computed once after loading (the fp32 ``w - 1`` of every Llama norm)."""
        return prepare_llama_norms(weights)

    def weight_dtype(self, name: str, compute_dtype: torch.dtype) -> torch.dtype:
        return compute_dtype

    # ---- inputs and outputs (used by the engine) -----------------------------------------------
    @property
    def num_generated_tokens(self) -> int:
        """Tokens decoded per call: one per action dimension."""
        return self.config.action_dim

    @property
    def action_id_range(self) -> tuple[int, int]:
        return self.config.action_id_range

    def prepare_image(self, image: Any) -> torch.Tensor:
        """One RGB image -> ``(6, S, S)`` pixel values (DINOv2 view, SigLIP view)."""
        return prepare_openvla_image(image, self.config.image_size)

    def prompt_ids(self, tokenizer, task_prompt: str) -> list[int]:
        """``BOS + "In: What action should the robot take to {task}?\nOut:"`` ids."""
        if not isinstance(task_prompt, str) or not task_prompt.strip():
            raise InputError(f"task_prompt must be a non-empty string, got {task_prompt!r}")
        return tokenizer.encode(self.config.prompt_template.format(instruction=task_prompt), add_bos=True)

    def finish_prompt_ids(self, ids: list[int]) -> list[int]:
        """Append the "▁" id (29871) unless the prompt already ends with it, as ``predict_action`` does."""
        return ids if ids and ids[-1] == self.config.space_token_id else [*ids, self.config.space_token_id]

    def prefill_length(self, num_ids: int) -> int:
        """Real sequence length of a prompt of ``num_ids`` ids: they plus the image tokens."""
        return num_ids + self.config.num_patches

    def tokens_to_actions(self, tokens: np.ndarray) -> np.ndarray:
        """Generated ids ``(action_dim,)`` -> normalised actions in [-1, 1] (by id, never via text)."""
        return openvla_tokens_to_values(tokens, self.config.text_vocab_size, self.config.n_action_bins)

    # ---- stages -------------------------------------------------------------------------------
    def vision_encoder(self, ops, weights: Weights, inputs: Mapping[str, Any]) -> torch.Tensor:
        """``images (1, 6, S, S)`` (DINOv2 view, SigLIP view; normalised) -> patch embeddings ``(1, 256, D_llm)``."""
        c = self.config
        images = inputs["images"]
        # The towers are independent until the concatenation: a GPU backend may overlap them (two streams).
        dino, siglip = ops.run_concurrently(
            lambda: vit_features(ops, weights, c.dino_spec(), images[:, :3], ops.dtype),
            lambda: vit_features(ops, weights, c.siglip_spec(), images[:, 3:], ops.dtype))
        x = torch.cat([dino, siglip], dim=-1)
        x = gelu(ops, ops.linear(x, weights["projector.fc1.weight"], weights["projector.fc1.bias"]))
        x = gelu(ops, ops.linear(x, weights["projector.fc2.weight"], weights["projector.fc2.bias"]))
        return ops.linear(x, weights["projector.fc3.weight"], weights["projector.fc3.bias"])

    def embed_sequence(self, ops, weights: Weights, image_tokens: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """``[emb(BOS), image tokens, emb(ids[1:])]`` ``(1, P, D)`` in the compute dtype."""
        text = self.lm.embed(ops, weights, token_ids)
        return torch.cat([text[:, :1], image_tokens.to(text.dtype), text[:, 1:]], dim=1)

    def prefill_mask(self, length: int, real_length: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Causal ``(1, P, P)``: padding rows after the prompt are computed but never attended to."""
        return causal_mask(length, 1, device)

