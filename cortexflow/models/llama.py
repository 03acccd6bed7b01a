"""Llama-2 decoder (transformers ``LlamaForCausalLM`` semantics) written against backend ops.

Canonical weights: ``llm.embed (V, D)``, ``llm.layers.{i}.{q,k,v,o} (H*Dh, D)/(D, H*Dh)``,
``llm.layers.{i}.{gate,up} (M, D)``, ``llm.layers.{i}.down (D, M)`` (no biases),
``llm.layers.{i}.{attn_norm,mlp_norm} (D,)``, ``llm.norm (D,)``, ``llm.lm_head (V, D)`` (untied).

RMSNorm is ``x * rsqrt(mean(x^2) + eps) * w`` in fp32. The backends' ``rms_norm`` op scales by
``(1 + w)`` (Gemma's convention), so :func:`prepare_llama_norms` stores ``w - 1`` in fp32 once, under
``{name}.minus_one``; ``1 + (w - 1)`` is then exactly ``w`` in fp32. RoPE is rotate-half over the whole
head (Hugging Face checkpoints are permuted for it), base from the config; attention is causal.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from cortexflow.models.gemma import gated_decoder_linear_shapes
from cortexflow.models.token_decoding import DecoderDims, DecoderLM

if TYPE_CHECKING:
    from cortexflow.ops import ComputeBackend

NORM_OFFSET_SUFFIX = ".minus_one"


def llama_weight_shapes(
    num_layers: int, dim: int, mlp_dim: int, num_heads: int, num_kv_heads: int, head_dim: int, vocab_size: int
) -> dict[str, tuple[int, ...]]:
    """Shapes of every Llama weight."""
    q_dim, kv_dim = num_heads * head_dim, num_kv_heads * head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "llm.embed": (vocab_size, dim),
        "llm.norm": (dim,),
        "llm.lm_head": (vocab_size, dim),
    }
    for i in range(num_layers):
        p = f"llm.layers.{i}"
        shapes.update(gated_decoder_linear_shapes(p, dim, mlp_dim, q_dim, kv_dim))
        shapes.update({f"{p}.attn_norm": (dim,), f"{p}.mlp_norm": (dim,)})
    return shapes


def is_llama_norm(name: str) -> bool:
    """Whether canonical weight ``name`` is a Llama RMSNorm scale."""
    return name == "llm.norm" or name.endswith((".attn_norm", ".mlp_norm"))


def prepare_llama_norms(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add ``{name}.minus_one = w - 1`` (fp32) for every Llama norm scale ``w`` (see the module doc), in place
    (the dict is the one the loader returned; a copy would keep every original tensor alive while a
    backend re-lays the weights out)."""
    for name, tensor in list(weights.items()):
        if name.startswith("llm.") and is_llama_norm(name):
            weights[name + NORM_OFFSET_SUFFIX] = tensor.float() - 1.0
    return weights


class LlamaLM(DecoderLM):
    """Llama-2: RMSNorm with a plain ``w`` scale, SiLU-gated MLP, untied LM head, unscaled embeddings."""

    gated_activation = "silu"

    def norm_scale_name(self, name: str) -> str:
        return name + NORM_OFFSET_SUFFIX

    def embed(self, ops: "ComputeBackend", weights, ids: torch.Tensor) -> torch.Tensor:
        return ops.embedding(ids, weights["llm.embed"])

    def lm_head(self, weights) -> torch.Tensor:
        return weights["llm.lm_head"]


__all__ = ["DecoderDims", "LlamaLM", "llama_weight_shapes", "prepare_llama_norms"]
