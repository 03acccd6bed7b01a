"""The compute-backend interface: the ops a model's forward pass is written against, and the three stages.

Tensor layouts used by every op:
- activations ``(B, L, D)`` (batch, tokens, features);
- attention heads ``(B, L, H, head_dim)``;
- linear weights in torch layout ``(out_features, in_features)``.

A backend implements the ops. The stage methods (``vision_encoder``, ``transformer_encoder``,
``transformer_decoder``) run the model's own stage code over the backend's ops by default; a backend
may override a whole stage with a fused path for a model it knows, and must return the same thing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Mapping

import torch

if TYPE_CHECKING:
    from cortexflow.models.base import VLAModel

Weights = Mapping[str, torch.Tensor]


class ComputeBackend(ABC):
    """Computes a model's stages. Subclasses implement the ops; stages default to the model's code."""

    name: str = "abstract"
    supports_cuda_graphs: bool = True
    #: Runs prompts padded to any length (False: exported graphs fixed at ``max_token_len``).
    variable_prompt_length: bool = True
    #: ``transformer_decoder`` runs the model's own denoising loop on ops that autograd can differentiate
    #: with respect to the noisy actions, so real-time chunking can guide it (``engine.predict(prev_actions=)``).
    supports_guided_decoding: bool = True

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device = torch.device(device)
        self.dtype = dtype

    # ---- stages -------------------------------------------------------------------------------
    def vision_encoder(self, model: "VLAModel", weights: Weights, inputs: Mapping[str, Any]) -> Any:
        """Images -> image tokens in the language model's width (see the model's ``vision_encoder``)."""
        return model.vision_encoder(self, weights, inputs)

    def transformer_encoder(self, model: "VLAModel", weights: Weights, inputs: Mapping[str, Any]) -> Any:
        """Prefix (image + text tokens) -> per-layer KV cache (see the model's ``transformer_encoder``)."""
        return model.transformer_encoder(self, weights, inputs)

    def transformer_decoder(self, model: "VLAModel", weights: Weights, inputs: Mapping[str, Any]) -> Any:
        """KV cache + state + noise -> actions (see the model's ``transformer_decoder``)."""
        return model.transformer_decoder(self, weights, inputs)

    def decoder_lm_layer(self, lm, weights: Weights, i: int, x: torch.Tensor, positions: torch.Tensor,
                         mask: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor],
                         write_at: torch.Tensor | None) -> torch.Tensor:
        """Layer ``i`` of a token VLA's decoder LM (see ``DecoderLM.layer``; default: its op-by-op code)."""
        return lm.layer(self, weights, i, x, positions, mask, cache, write_at)

    def decoder_lm_next_token(self, lm, weights: Weights, h: torch.Tensor,
                              allowed: tuple[int, int] | None) -> torch.Tensor:
        """A token VLA's greedy next token from the last hidden rows ``h (B, 1, D)`` (see
        ``DecoderLM.next_token``; default: its op-by-op code)."""
        return lm.next_token(self, weights, h, allowed)

    def prepare_weights(self, model: "VLAModel", weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Hook to re-lay-out or fuse weights once after loading (default: unchanged)."""
        return weights

    def run_concurrently(self, first, second):
        """``(first(), second())`` for two independent computations (e.g. two vision towers). Default: one
        after the other; a GPU backend may overlap them on two streams."""
        return first(), second()

    # ---- ops ----------------------------------------------------------------------------------
    @abstractmethod
    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ weight.T + bias`` computed in ``x.dtype`` (weights are promoted, as JAX does)."""

    @abstractmethod
    def layer_norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        """LayerNorm over the last dim with fp32 statistics, result in ``x.dtype``."""

    @abstractmethod
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        """Gemma RMSNorm ``x * rsqrt(mean(x^2) + eps) * (1 + weight)`` in fp32, result in ``x.dtype``.

        ``weight=None`` gives the plain normalisation (no scale)."""

    @abstractmethod
    def ada_rms_norm(
        self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float
    ) -> torch.Tensor:
        """Adaptive RMSNorm ``rmsnorm(x) * (1 + scale) + shift`` in fp32; scale/shift ``(B, D)``; result in ``x.dtype``."""

    @abstractmethod
    def rope(self, x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
        """Split-half rotary embedding of ``x (B, L, H, Dh)`` at integer ``positions (B, L)``, in fp32."""

    @abstractmethod
    def attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
    ) -> torch.Tensor:
        """Softmax attention with fp32 logits.

        ``q (B, Lq, Hq, Dh)``, ``k, v (B, Lk, Hkv, Dh)`` with ``Hq`` a multiple of ``Hkv`` (grouped /
        multi-query), ``mask (B, Lq, Lk)`` bool (True = may attend) or None (every query sees every key).
        Returns ``(B, Lq, Hq * Dh)``."""

    @abstractmethod
    def gelu_tanh(self, x: torch.Tensor) -> torch.Tensor:
        """GELU with the tanh approximation."""

    @abstractmethod
    def gelu_tanh_gate(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """``gelu_tanh(gate) * up`` (Gemma's gated MLP)."""

    @abstractmethod
    def silu(self, x: torch.Tensor) -> torch.Tensor:
        """``x * sigmoid(x)`` (swish)."""

    @abstractmethod
    def patch_embed(self, images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Non-overlapping patch convolution: ``images (N, C, H, W)``, ``weight (D, C, p, p)`` -> ``(N, (H/p)*(W/p), D)``."""

    @abstractmethod
    def embedding(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Row lookup ``table[ids]``: ``ids (B, L)`` int64 -> ``(B, L, D)``."""

    @abstractmethod
    def conv2d(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int,
               padding: tuple[int, int, int, int], groups: int = 1) -> torch.Tensor:
        """2-D convolution of ``x (N, C, H, W)`` zero-padded by ``padding = (top, bottom, left, right)``
        (explicit, possibly asymmetric), then ``weight (O, C / groups, kh, kw)`` at ``stride`` with no
        further padding; ``groups = C = O`` is a depthwise convolution. Returns ``(N, O, H', W')``."""

    @abstractmethod
    def batch_norm(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, gamma: torch.Tensor,
                   beta: torch.Tensor, eps: float) -> torch.Tensor:
        """Inference batch norm over channel dim 1 of ``x (N, C, H, W)``:
        ``(x - mean) / sqrt(var + eps) * gamma + beta`` with per-channel ``(C,)`` statistics, in fp32,
        result in ``x.dtype``."""

    @abstractmethod
    def sigmoid(self, x: torch.Tensor) -> torch.Tensor:
        """``1 / (1 + exp(-x))``."""
