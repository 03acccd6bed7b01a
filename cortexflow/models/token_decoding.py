"""Greedy autoregressive decoding over a pre-allocated KV cache, shared by OpenVLA (Llama) and RT-2 (Gemma).

A :class:`DecoderLM` is a pre-norm decoder-only LM written against backend ops (each layer one
``decoder_layer`` unit, the head one ``lm_head_argmax``); subclasses say where a norm's scale lives
(``norm_scale_name``), which gated activation the MLP has, how ids are embedded and how logits are read.
The cache is two static tensors ``(layers, B, L_max, H_kv, D_h)`` (keys after RoPE, values). The
prefill writes positions ``0..P-1`` (``P`` is the padded prompt length: rows past the real length are
computed but never attended to), then each single-token step writes its own position, given as a
tensor so that a CUDA graph can replay the whole loop, and attends to every cached key at or before it.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Mapping

import torch

from cortexflow.models.base import VLAModel
from cortexflow.ops import DecoderDims, FusableWeights, GatedLayer

if TYPE_CHECKING:
    from cortexflow.ops import ComputeBackend


class DecoderLM:
    """A decoder-only LM with canonical weights ``{prefix}.layers.{i}.{q,k,v,o,gate,up,down,...}``."""

    prefix = "llm"
    #: The gated MLP's activation, ``act(gate) * up``: "silu" (Llama) or "gelu_tanh" (Gemma).
    gated_activation = "silu"

    def __init__(self, dims: DecoderDims):
        self.dims = dims

    # ---- what differs between LMs -------------------------------------------------------------
    def norm_scale_name(self, name: str) -> str:
        """The weight holding RMSNorm ``name``'s scale in the backends' ``(1 + w)`` convention (Gemma's own weight)."""
        return name

    def norm_scale(self, weights, name: str) -> torch.Tensor:
        """The RMSNorm ``name``'s weight in the backends' ``(1 + w)`` convention."""
        return weights[self.norm_scale_name(name)]

    def norm(self, ops: "ComputeBackend", weights, name: str, x: torch.Tensor) -> torch.Tensor:
        """RMSNorm ``name`` of ``x``."""
        return ops.rms_norm(x, self.norm_scale(weights, name), self.dims.rms_norm_eps)

    def embed(self, ops: "ComputeBackend", weights, ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``(B, L)`` -> input embeddings ``(B, L, D)`` in the compute dtype."""
        raise NotImplementedError

    def lm_head(self, weights) -> torch.Tensor:
        """The output projection ``(V, D)``."""
        raise NotImplementedError

    # ---- shared -------------------------------------------------------------------------------
    def gated_layer(self, i: int) -> GatedLayer:
        """Layer ``i`` by weight name: ``{prefix}.layers.{i}.{q,k,v,o,gate,up,down}``, norms ``attn_norm`` /
        ``mlp_norm`` (whose scales a backend may fold into the projections after them)."""
        p = f"{self.prefix}.layers.{i}"
        return GatedLayer(p, i, self.dims, self.gated_activation, self.norm_scale_name(f"{p}.attn_norm"),
                          self.norm_scale_name(f"{p}.mlp_norm"), foldable_norms=True)

    def layers(self) -> tuple[GatedLayer, ...]:
        return tuple(self.gated_layer(i) for i in range(self.dims.num_layers))

    def layer(
        self,
        ops: "ComputeBackend",
        weights,
        i: int,
        x: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor],
        write_at: torch.Tensor | None,
    ) -> torch.Tensor:
        """One pre-norm layer over ``x (B, L, D)`` at ``positions (B, L)`` with the cache
        ``(layers, B, L_max, Hkv, Dh)`` pair ``cache`` (see ``ComputeBackend.decoder_layer``).

        Prefill (``write_at=None``): K/V go to cache rows ``0..L-1`` and ``mask (B, L, L)`` applies to
        this call's own keys. Step (``write_at`` a ``(1,)`` position tensor, ``L = 1``): K/V go to that
        row and ``mask (B, 1, L_max)`` applies to the whole cache."""
        return ops.decoder_layer(weights, self.gated_layer(i), x, positions, mask, (cache[0][i], cache[1][i]),
                                 write_at)

    def next_token(
        self, ops: "ComputeBackend", weights, h: torch.Tensor, allowed: tuple[int, int] | None
    ) -> torch.Tensor:
        """Final norm, LM head (logits upcast to fp32) and greedy argmax of ``h (B, 1, D)`` -> ids ``(B,)``.

        ``allowed=(lo, hi)`` restricts the argmax to ids ``lo..hi-1``."""
        return ops.lm_head_argmax(h, self.norm_scale(weights, f"{self.prefix}.norm"), self.lm_head(weights),
                                  self.dims.rms_norm_eps, allowed, self.dims)

    def prefill(
        self,
        ops: "ComputeBackend",
        weights,
        x: torch.Tensor,
        mask: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor],
        last_index: torch.Tensor,
        allowed: tuple[int, int] | None,
    ) -> torch.Tensor:
        """Run the prompt embeddings ``x (B, P, D)`` (positions ``0..P-1``) through every layer, filling
        the cache; return the greedy token read at sequence index ``last_index (1,)`` -> ``(B,)``."""
        positions = torch.arange(x.shape[1], device=x.device)[None].expand(x.shape[0], -1)
        for i in range(self.dims.num_layers):
            x = self.layer(ops, weights, i, x, positions, mask, cache, None)
        return self.next_token(ops, weights, x.index_select(1, last_index), allowed)

    def step(
        self,
        ops: "ComputeBackend",
        weights,
        token: torch.Tensor,
        position: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor],
        allowed: tuple[int, int] | None,
    ) -> torch.Tensor:
        """One single-token pass: ``token (B,)`` at ``position (1,)`` -> the next greedy token ``(B,)``."""
        x = self.embed(ops, weights, token[:, None])
        max_len = cache[0].shape[2]
        visible = torch.arange(max_len, device=x.device)[None, :] <= position[:, None]  # (1, L_max)
        mask = visible[:, None, :].expand(x.shape[0], 1, max_len)
        positions = position[None].expand(x.shape[0], 1)
        for i in range(self.dims.num_layers):
            x = self.layer(ops, weights, i, x, positions, mask, cache, position)
        return self.next_token(ops, weights, x, allowed)

    def generate(
        self,
        ops: "ComputeBackend",
        weights,
        first_token: torch.Tensor,
        start: torch.Tensor,
        num_tokens: int,
        cache: tuple[torch.Tensor, torch.Tensor],
        allowed: tuple[int, int] | None,
    ) -> torch.Tensor:
        """Greedy tokens ``(B, num_tokens)``: ``first_token`` (from the prefill) and ``num_tokens - 1``
        cached steps, the ``s``-th feeding the previous token at position ``start + s``."""
        tokens = [first_token]
        for s in range(num_tokens - 1):
            tokens.append(self.step(ops, weights, tokens[-1], start + s, cache, allowed))
        return torch.stack(tokens, dim=1)

    def full_recompute(
        self,
        ops: "ComputeBackend",
        weights,
        x: torch.Tensor,
        prefix_mask: torch.Tensor,
        num_tokens: int,
        allowed: tuple[int, int] | None,
    ) -> torch.Tensor:
        """The same greedy tokens without a cache: each token re-runs the whole sequence (for tests).

        ``x (B, P, D)`` holds exactly the real prompt embeddings, ``prefix_mask (B, P, P)`` their mask;
        generated tokens attend causally to everything before them."""
        b, p, _ = x.shape
        max_len = p + num_tokens
        scratch = tuple(
            torch.zeros(self.dims.num_layers, b, max_len, self.dims.num_kv_heads, self.dims.head_dim,
                        dtype=x.dtype, device=x.device)
            for _ in range(2)
        )
        tokens: list[torch.Tensor] = []
        for _ in range(num_tokens):
            seq = x if not tokens else torch.cat([x, self.embed(ops, weights, torch.stack(tokens, 1))], dim=1)
            n = seq.shape[1]
            mask = torch.ones(b, n, n, dtype=torch.bool, device=x.device).tril()
            mask[:, :p, :p] = prefix_mask
            last = torch.tensor([n - 1], device=x.device)
            tokens.append(self.prefill(ops, weights, seq, mask, scratch, last, allowed))
        return torch.stack(tokens, dim=1)


def causal_mask(length: int, batch: int, device: torch.device) -> torch.Tensor:
    """``(B, L, L)`` lower-triangular bool mask (True = may attend)."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()[None].expand(batch, -1, -1)


def _no_timer(_stage: str):
    return contextlib.nullcontext()


class TokenDecodingModel(VLAModel):
    """A policy that embeds one image and a prompt, prefills ``self.lm`` and greedily decodes tokens.

    Subclasses define ``lm`` (a :class:`DecoderLM`), ``num_generated_tokens``, ``action_id_range``,
    ``vision_encoder``, ``embed_sequence`` (image tokens + prompt ids -> prefill embeddings) and
    ``prefill_mask`` (which prefill keys each prefill row sees, given the real length)."""

    lm: DecoderLM

    @property
    def num_generated_tokens(self) -> int:
        raise NotImplementedError

    @property
    def action_id_range(self) -> tuple[int, int]:
        raise NotImplementedError

    def embed_sequence(self, ops, weights, image_tokens: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def prefill_mask(self, length: int, real_length: torch.Tensor, device: torch.device) -> torch.Tensor:
        raise NotImplementedError

    def prepare_weights(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Derived tensors computed once after loading (default: none)."""
        return weights

    def fusable_weights(self) -> FusableWeights:
        """Q/K/V and gate/up of every decoder-LM layer (and the norm scales before them)."""
        return FusableWeights(decoder_layers=self.lm.layers())

    def transformer_encoder(self, ops, weights, inputs: Mapping[str, Any]) -> torch.Tensor:
        """Prefill: fills the KV cache and returns the first generated token ``(1,)``."""
        x = self.embed_sequence(ops, weights, inputs["image_tokens"], inputs["token_ids"])
        mask = self.prefill_mask(x.shape[1], inputs["start"], x.device)
        return self.lm.prefill(ops, weights, x, mask, inputs["cache"], inputs["last_index"], inputs["allowed"])

    def transformer_decoder(self, ops, weights, inputs: Mapping[str, Any]) -> torch.Tensor:
        """The cached single-token steps after the first token -> all tokens ``(1, num_generated_tokens)``."""
        return self.lm.generate(ops, weights, inputs["first_token"], inputs["start"], self.num_generated_tokens,
                                inputs["cache"], inputs["allowed"])

    def forward(self, backend, weights, buffers: Mapping[str, torch.Tensor], timer: Any = None,
                constrained: bool = False) -> torch.Tensor:
        """Vision -> prefill -> decode over the static ``buffers``; writes and returns ``buffers["tokens"]``."""
        timer = timer or _no_timer
        allowed = self.action_id_range if constrained else None
        cache = (buffers["cache_k"], buffers["cache_v"])
        with timer("vision_encoder"):
            image_tokens = backend.vision_encoder(self, weights, {"images": buffers["images"]})
        with timer("transformer_encoder"):
            first = backend.transformer_encoder(self, weights, {
                "image_tokens": image_tokens, "token_ids": buffers["token_ids"], "cache": cache,
                "last_index": buffers["last_index"], "start": buffers["start"], "allowed": allowed,
            })
        with timer("transformer_decoder"):
            tokens = backend.transformer_decoder(self, weights, {
                "first_token": first, "start": buffers["start"], "cache": cache, "allowed": allowed,
            })
        buffers["tokens"].copy_(tokens)
        return buffers["tokens"]

    def reference_tokens(self, backend, weights, images: torch.Tensor, token_ids: torch.Tensor,
                         constrained: bool = False) -> torch.Tensor:
        """The greedy tokens recomputed without a cache (every token re-runs the whole sequence).

        ``token_ids (1, n)`` are exactly the real prompt ids (no padding); for tests."""
        image_tokens = backend.vision_encoder(self, weights, {"images": images})
        x = self.embed_sequence(backend, weights, image_tokens, token_ids)
        real = torch.tensor([x.shape[1]], device=x.device)
        mask = self.prefill_mask(x.shape[1], real, x.device)
        allowed = self.action_id_range if constrained else None
        return self.lm.full_recompute(backend, weights, x, mask, self.num_generated_tokens, allowed)
