"""Pi0 and Pi0.5 (Physical Intelligence): SigLIP + Gemma-2B prefix, Gemma-300M action expert, flow matching.

Token layout (``docs/reference_facts.md#F-PI0-2``): the prefix is ``[V x 256 image tokens][L text tokens]``
with bidirectional attention among valid tokens; the suffix is ``[state][H actions]`` (Pi0) or
``[H actions]`` (Pi0.5). RoPE positions count valid tokens only, so masked views and padding take no
positions. The prefix pass fills a per-layer KV cache that every denoising step reuses.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from cortexflow.models.pi0_keys import match_keys
from cortexflow.config import VLAModelType
from cortexflow.errors import CheckpointError
from cortexflow.models.base import HostEmbedding, VLAModel, Weights
from cortexflow.models.flow_matching import euler_integrate, euler_times, sinusoidal_time_embedding
from cortexflow.models.rtc import guided_euler_integrate
from cortexflow.models.gemma import (
    adaptive_gemma_layer,
    gemma_dims,
    gemma_layer,
    gemma_layer_shapes,
    gemma_layers,
    modulation,
)
from cortexflow.models.siglip import siglip_stack, siglip_tower, siglip_weight_shapes
from cortexflow.ops import ActionPath, ExpertConditioning, ExpertStack, FusableWeights


def _no_timer(_stage: str):
    return contextlib.nullcontext()


@dataclass
class DenoisingTables:
    """What the decoder computes from the time alone, for the Euler ``times``, made once per weights and step
    count (fp32): the expert's per-step ``conditioning`` and the ``action`` path around it. Pi0's
    ``action_in_proj`` is folded into the action half of ``action_time_mlp_in`` (``in_weight``), whose time half
    is applied to each step's time embedding (``in_bias``), and ``action_time_mlp_out`` is the path's middle
    layer; Pi0.5's path is ``action_in_proj`` alone."""

    times: list[float]
    conditioning: ExpertConditioning
    action: ActionPath


class Pi0Model(VLAModel):
    """Pi0: state token + action tokens mixed with the time embedding by an MLP; plain RMSNorm expert."""

    model_type = VLAModelType.PI0
    variable_prompt_length = True  # padded tokens are masked keys; every length derives from the buffers
    #: The 257k-row text embedding (1 GB in bf16) is only looked up at the prompt's ids.
    host_embedding = HostEmbedding(table="llm.embed", ids="token_ids", embeddings="token_embeddings")

    # ---- declarations -------------------------------------------------------------------------
    def get_weight_shapes(self) -> dict[str, tuple[int, ...]]:
        c = self.config
        shapes = siglip_weight_shapes(c)
        shapes["projector.weight"] = (c.encoder_dim, c.vision_encoder_dim)
        shapes["projector.bias"] = (c.encoder_dim,)
        shapes["llm.embed"] = (c.vocab_size, c.encoder_dim)
        adaptive = self.model_type == VLAModelType.PI05
        for i in range(c.num_encoder_layers):
            shapes.update(gemma_layer_shapes(f"llm.layers.{i}", c.encoder_dim, c.encoder_mlp_dim, c, False))
        for i in range(c.num_decoder_layers):
            shapes.update(gemma_layer_shapes(f"expert.layers.{i}", c.decoder_dim, c.decoder_mlp_dim, c, adaptive))
        if adaptive:
            shapes["expert.norm_mod.weight"] = (3 * c.decoder_dim, c.decoder_dim)
            shapes["expert.norm_mod.bias"] = (3 * c.decoder_dim,)
        else:
            shapes["expert.norm"] = (c.decoder_dim,)
        shapes.update(self._head_shapes())
        return shapes

    def _head_shapes(self) -> dict[str, tuple[int, ...]]:
        d, a = self.config.decoder_dim, self.config.action_dim
        shapes = {
            "state_proj": ((d, a), (d,)),
            "action_in_proj": ((d, a), (d,)),
            "action_time_mlp_in": ((d, 2 * d), (d,)),
            "action_time_mlp_out": ((d, d), (d,)),
            "action_out_proj": ((a, d), (a,)),
        }
        return {f"{k}.{p}": s for k, (w, b) in shapes.items() for p, s in (("weight", w), ("bias", b))}

    def prefix_layers(self):
        """The Gemma-2B prefix layers ``llm.layers.i``."""
        return gemma_layers("llm.layers", gemma_dims(self.config, self.config.num_encoder_layers))

    def unread_weights(self) -> tuple[str, ...]:
        """The last prefix layer's o-projection, MLP norm and MLP: the prefix pass computes only that layer's K/V
        (nothing reads its output), 105 M parameters (0.2 GB in bf16) at the published size."""
        last = self.prefix_layers()[-1]
        return (last.name("o"), last.mlp_norm, last.name("gate"), last.name("up"), last.name("down"))

    def expert(self) -> ExpertStack:
        """The action expert's layers ``expert.layers.i`` and its final norm (plain RMSNorm for Pi0)."""
        dims = gemma_dims(self.config, self.config.num_decoder_layers)
        adaptive = self.model_type == VLAModelType.PI05
        return ExpertStack(gemma_layers("expert.layers", dims, adaptive), None if adaptive else "expert.norm")

    def fusable_weights(self) -> FusableWeights:
        """SigLIP's q/k/v, and q/k/v and gate/up of every prefix and expert layer."""
        return FusableWeights((siglip_stack(self.config),), self.prefix_layers(), self.expert().layers)

    def get_buffer_shapes(self, num_views: int, chunk_size: int, batch_size: int = 1) -> dict[str, tuple[int, ...]]:
        c = self.config
        return {
            "images": (batch_size, num_views, 3, c.image_size, c.image_size),
            "image_masks": (batch_size, num_views),
            "token_ids": (batch_size, c.max_token_len),
            "token_mask": (batch_size, c.max_token_len),
            "state": (batch_size, c.action_dim),
            "noise": (batch_size, chunk_size, c.action_dim),
            "actions": (batch_size, chunk_size, c.action_dim),
        }

    def buffer_dtype(self, name: str, compute_dtype: torch.dtype) -> torch.dtype:
        dtypes = {"image_masks": torch.bool, "token_mask": torch.bool, "token_ids": torch.int64,
                  "token_embeddings": compute_dtype}
        return dtypes.get(name, torch.float32)

    def weight_dtype(self, name: str, compute_dtype: torch.dtype) -> torch.dtype:
        """Patch/position embeddings and RMSNorm scales stay fp32 (as openpi PyTorch keeps them)."""
        if name.startswith(("vision.patch.", "vision.pos")) or name.endswith("norm"):
            return torch.float32
        return compute_dtype

    def preprocess_checkpoint(self, checkpoint: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        match = match_keys(checkpoint.keys(), self.config)
        if match.missing or match.unexpected:
            raise CheckpointError(
                f"checkpoint does not match {self.model_type.value}: "
                f"missing {match.missing[:20]}{' ...' if len(match.missing) > 20 else ''}; "
                f"unexpected {match.unexpected[:20]}{' ...' if len(match.unexpected) > 20 else ''}"
            )
        return {name: checkpoint[raw] for name, raw in match.sources.items()}

    # ---- stages -------------------------------------------------------------------------------
    def vision_encoder(self, ops, weights: Weights, inputs: Mapping[str, Any]) -> torch.Tensor:
        """``images (B, V, 3, S, S)`` fp32 in [-1, 1] -> image tokens ``(B, V*T, D_llm)`` (projected, unscaled)."""
        images = inputs["images"]
        b, views = images.shape[:2]
        tokens = siglip_tower(ops, weights, images.flatten(0, 1), self.config, ops.dtype)
        tokens = ops.linear(tokens, weights["projector.weight"], weights["projector.bias"])
        return tokens.reshape(b, views * tokens.shape[1], tokens.shape[2])

    def text_normalizer(self, table_dtype: torch.dtype) -> float:
        """Gemma's embedding scale sqrt(D), rounded to the table's dtype."""
        return torch.tensor(self.config.encoder_dim**0.5, dtype=table_dtype).item()

    def host_table(self, table: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
        """The text embedding x bf16(sqrt(D)) in ``compute_dtype``: row for row what :meth:`embed_prefix`
        computes from the looked-up rows (an elementwise product, so the same bits)."""
        return (table * self.text_normalizer(table.dtype)).to(compute_dtype)

    def embed_prefix(self, ops, weights: Weights, inputs: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix embeddings ``(B, P, D)`` = [image tokens, text embeddings x bf16(sqrt(D))] and validity ``(B, P)``.

        The text embeddings are ``inputs["token_embeddings"]`` when the engine looked them up on the host
        (:attr:`host_embedding`), else rows of ``weights["llm.embed"]`` at ``inputs["token_ids"]``."""
        image_tokens = inputs["image_tokens"]
        if "token_embeddings" in inputs:
            text = inputs["token_embeddings"].to(ops.dtype)
        else:
            table = weights["llm.embed"]
            text = (ops.embedding(inputs["token_ids"], table) * self.text_normalizer(table.dtype)).to(ops.dtype)
        x = torch.cat([image_tokens.to(ops.dtype), text], dim=1)
        per_view = image_tokens.shape[1] // inputs["image_masks"].shape[1]
        valid = torch.cat([inputs["image_masks"].repeat_interleave(per_view, dim=1), inputs["token_mask"]], dim=1)
        return x, valid

    @staticmethod
    def prefix_positions_and_mask(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """From the prefix validity ``(B, P)``: RoPE positions ``(B, P)`` (counting valid tokens only) and the
        bidirectional attention mask ``(B, P, P)`` among valid tokens."""
        return torch.cumsum(valid.long(), dim=1) - 1, valid[:, None, :] & valid[:, :, None]

    def transformer_encoder(self, ops, weights: Weights, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """Prefix pass over the Gemma-2B layers -> ``{"kv_cache": [(k, v)] per layer, "prefix_mask": (B, P)}``.

        k/v are ``(B, P, Hkv, Dh)`` after RoPE. The last layer computes K/V only (its output is unused). With
        ``inputs["chunk"]`` (the action chunk of the denoising call that follows) the cache is written with room
        for that call's suffix rows (``ops.prefix_kv_cache``'s ``room``), which it then fills without a copy."""
        x, valid = self.embed_prefix(ops, weights, inputs)
        positions, mask = self.prefix_positions_and_mask(valid)
        chunk = inputs.get("chunk")
        room = 0 if chunk is None else self.suffix_length(chunk)
        cache = ops.prefix_kv_cache(weights, self.prefix_layers(), x, positions, mask, room)
        return {"kv_cache": cache, "prefix_mask": valid}

    def suffix_length(self, chunk_size: int) -> int:
        """Suffix tokens of a denoising call: the state token and ``chunk_size`` action tokens."""
        return chunk_size + 1

    def suffix_attention_mask(self, prefix_mask: torch.Tensor, chunk_size: int) -> torch.Tensor:
        """``(B, S, P+S)``: every suffix token sees the valid prefix; the state token sees itself, not the actions."""
        b = prefix_mask.shape[0]
        s = self.suffix_length(chunk_size)
        suffix = torch.ones(s, s, dtype=torch.bool, device=prefix_mask.device)
        suffix[0, 1:] = False
        return torch.cat([prefix_mask[:, None, :].expand(b, s, -1), suffix[None].expand(b, s, s)], dim=2)

    def suffix_tokens(self, ops, weights: Weights, x_t: torch.Tensor, t: float, inputs: Mapping[str, Any]):
        """Pi0 suffix ``[state_proj(state), mlp_out(swish(mlp_in([action_in_proj(x_t), emb(t)])))]`` in fp32."""
        b, h, _ = x_t.shape
        d = self.config.decoder_dim
        state = ops.linear(inputs["state"].float(), weights["state_proj.weight"], weights["state_proj.bias"])
        actions = ops.linear(x_t, weights["action_in_proj.weight"], weights["action_in_proj.bias"])
        emb = sinusoidal_time_embedding(t, d, b, x_t.device)
        mixed = torch.cat([actions, emb[:, None, :].expand(b, h, d)], dim=-1)
        mixed = ops.silu(ops.linear(mixed, weights["action_time_mlp_in.weight"], weights["action_time_mlp_in.bias"]))
        mixed = ops.linear(mixed, weights["action_time_mlp_out.weight"], weights["action_time_mlp_out.bias"])
        return torch.cat([state[:, None, :], mixed], dim=1), None

    def expert_layer(self, ops, weights, i, x, positions, mask, kv, cond):
        """One action-expert layer (plain RMSNorm for Pi0)."""
        return gemma_layer(ops, weights, f"expert.layers.{i}", x, positions, mask, self.config, kv)[0]

    def final_norm(self, ops, weights, x, cond):
        """Expert output norm before ``action_out_proj``."""
        return ops.rms_norm(x, weights["expert.norm"], self.config.rms_norm_eps)

    def velocity(self, ops, weights: Weights, x_t: torch.Tensor, t: float, ctx: Mapping[str, Any]) -> torch.Tensor:
        """The flow ``v(x_t, t)`` ``(B, H, A)``: suffix through the 18 expert layers against the prefix cache."""
        tokens, cond = self.suffix_tokens(ops, weights, x_t, t, ctx)
        x = tokens.to(ops.dtype)
        for i, kv in enumerate(ctx["kv_cache"]):
            x = self.expert_layer(ops, weights, i, x, ctx["suffix_positions"], ctx["suffix_mask"], kv, cond)
        x = self.final_norm(ops, weights, x, cond)[:, -x_t.shape[1]:]
        return ops.linear(x, weights["action_out_proj.weight"], weights["action_out_proj.bias"]).float()

    def transformer_decoder(self, ops, weights: Weights, inputs: Mapping[str, Any]) -> torch.Tensor:
        """``num_diffusion_steps`` Euler steps from ``noise (B, H, A)`` at t=1 to actions at t=0 (fp32); with a
        ``guidance`` input (:class:`~cortexflow.models.rtc.ChunkGuidance`) each step is guided towards the
        previous chunk (real-time chunking)."""
        noise = inputs["noise"]
        prefix_mask = inputs["prefix_mask"]
        chunk = noise.shape[1]
        mask = self.suffix_attention_mask(prefix_mask, chunk)
        suffix_len = mask.shape[1]
        start = prefix_mask.long().sum(dim=1, keepdim=True)
        positions = start + torch.arange(suffix_len, device=noise.device)[None, :]
        guidance = inputs.get("guidance")
        expert = self.expert()
        if (guidance is None or guidance.jacobian == "identity") and ops.table_denoising(weights, expert):
            return self.decode_with_tables(ops, weights, inputs, expert, mask, positions, guidance)
        ctx = dict(inputs, suffix_mask=mask, suffix_positions=positions)
        step = lambda x_t, t: self.velocity(ops, weights, x_t, t, ctx)  # noqa: E731
        if guidance is not None:
            return guided_euler_integrate(step, noise, self.config.num_diffusion_steps, guidance)
        return self.integrate(step, noise)

    def integrate(self, velocity: Callable[[torch.Tensor, float], torch.Tensor], noise: torch.Tensor) -> torch.Tensor:
        """``num_diffusion_steps`` Euler steps of ``velocity(x_t, t)`` from ``noise (B, H, A)`` at t=1 -> fp32 actions."""
        return euler_integrate(velocity, noise, self.config.num_diffusion_steps)

    # ---- the decoder on per-step tables ---------------------------------------------------------
    def denoising_tables(self, weights: Weights, num_steps: int) -> DenoisingTables:
        """Everything in the decoder that depends only on t, for the ``num_steps`` Euler times (fp32)."""
        c = self.config
        d = c.decoder_dim
        times = euler_times(num_steps)
        device = weights["action_in_proj.weight"].device
        emb = torch.cat([sinusoidal_time_embedding(t, d, 1, device) for t in times])  # (steps, D) fp32
        w = lambda name: weights[name].float()  # noqa: E731
        mlp_in = w("action_time_mlp_in.weight")
        action_half, time_half = mlp_in[:, :d], mlp_in[:, d:]
        action_weight = action_half @ w("action_in_proj.weight")
        action_bias = action_half @ w("action_in_proj.bias") + emb @ time_half.T + w("action_time_mlp_in.bias")
        norm_scales = torch.stack([
            torch.stack([1.0 + w(f"expert.layers.{i}.attn_norm"), 1.0 + w(f"expert.layers.{i}.mlp_norm")])
            for i in range(c.num_decoder_layers)
        ])
        action = ActionPath(action_weight, action_bias, weights["action_out_proj.weight"],
                            weights["action_out_proj.bias"], mid_weight=w("action_time_mlp_out.weight"),
                            mid_bias=w("action_time_mlp_out.bias"))
        return DenoisingTables(times, ExpertConditioning(norm_scales), action)

    def table_suffix_start(self, weights: Weights, inputs: Mapping[str, Any], hidden: torch.Tensor) -> None:
        """Write the suffix rows that do not change between steps into ``hidden (B, S, D)``: Pi0's state token."""
        state = F.linear(inputs["state"].float(), weights["state_proj.weight"].float(), weights["state_proj.bias"].float())
        hidden[:, 0] = state.to(hidden.dtype)

    def decode_with_tables(self, ops, weights: Weights, inputs: Mapping[str, Any], expert: ExpertStack,
                           mask: torch.Tensor, positions: torch.Tensor, guidance: Any = None) -> torch.Tensor:
        """The Euler integration of ``transformer_decoder`` on the per-step tables (:meth:`denoising_tables`,
        kept per weights by the backend), each Euler step one unit (``ops.denoising_step``: action tokens, the
        expert, the action head); the same function as the op-by-op velocity, not differentiable. ``guidance``: an
        identity-Jacobian :class:`~cortexflow.models.rtc.ChunkGuidance` applied to each step's velocity. Returns
        ``(B, H, A)`` fp32."""
        c = self.config
        steps = c.num_diffusion_steps
        tables = ops.per_weights(weights, ("denoising_tables", steps), lambda: self.denoising_tables(weights, steps))
        noise = inputs["noise"]
        b, chunk, _ = noise.shape
        ctx = ops.begin_denoising(weights, expert, tables.conditioning, inputs["kv_cache"], positions, mask, chunk,
                                  len(tables.times))
        hidden = torch.empty((b, mask.shape[1], c.decoder_dim), dtype=ops.dtype, device=noise.device)
        self.table_suffix_start(weights, inputs, hidden)
        dt = float(np.float32(-1.0 / len(tables.times)))
        x_t = noise.to(torch.float32, copy=True)  # updated in place by the Euler step
        for step, t in enumerate(tables.times):
            guide = None if guidance is None else lambda v, t=t: guidance.guide(v, x_t, t)
            ops.denoising_step(weights, ctx, tables.action, hidden, x_t, step, dt, guide)
        return x_t

    # ---- whole call ---------------------------------------------------------------------------
    def forward(self, backend, weights: Weights, buffers: Mapping[str, torch.Tensor], timer: Any = None,
                guidance: Any = None) -> torch.Tensor:
        """Vision -> prefix -> denoising over the static ``buffers``; writes and returns ``buffers["actions"]``.

        ``guidance``: a :class:`~cortexflow.models.rtc.ChunkGuidance` for a real-time-chunking call (the paper's
        VJP guidance needs a backend whose ``supports_guided_decoding`` is true and autograd enabled; the identity
        Jacobian any backend that ``runs_denoising_loop``)."""
        timer = timer or _no_timer
        with timer("vision_encoder"):
            image_tokens = backend.vision_encoder(self, weights, {"images": buffers["images"]})
        with timer("transformer_encoder"):
            prefix = backend.transformer_encoder(
                self,
                weights,
                {
                    "image_tokens": image_tokens,
                    "image_masks": buffers["image_masks"],
                    "token_mask": buffers["token_mask"],
                    "chunk": buffers["noise"].shape[1],
                    **{name: buffers[name] for name in ("token_ids", "token_embeddings") if name in buffers},
                },
            )
        with timer("transformer_decoder"):
            decoder_inputs = dict(prefix, noise=buffers["noise"])
            if "state" in buffers:
                decoder_inputs["state"] = buffers["state"]
            if guidance is not None:
                decoder_inputs["guidance"] = guidance
            actions = backend.transformer_decoder(self, weights, decoder_inputs)
        buffers["actions"].copy_(actions)
        return buffers["actions"]


class Pi05Model(Pi0Model):
    """Pi0.5: no state token (state is in the prompt), adaptive RMSNorm expert conditioned on time."""

    model_type = VLAModelType.PI05

    def _head_shapes(self) -> dict[str, tuple[int, ...]]:
        d, a = self.config.decoder_dim, self.config.action_dim
        shapes = {
            "action_in_proj": ((d, a), (d,)),
            "time_mlp_in": ((d, d), (d,)),
            "time_mlp_out": ((d, d), (d,)),
            "action_out_proj": ((a, d), (a,)),
        }
        return {f"{k}.{p}": s for k, (w, b) in shapes.items() for p, s in (("weight", w), ("bias", b))}

    def get_buffer_shapes(self, num_views: int, chunk_size: int, batch_size: int = 1) -> dict[str, tuple[int, ...]]:
        shapes = super().get_buffer_shapes(num_views, chunk_size, batch_size)
        del shapes["state"]
        return shapes

    def suffix_length(self, chunk_size: int) -> int:
        """Suffix tokens of a denoising call: the ``chunk_size`` action tokens (the state is in the prompt)."""
        return chunk_size

    def suffix_attention_mask(self, prefix_mask: torch.Tensor, chunk_size: int) -> torch.Tensor:
        """``(B, H, P+H)``: actions see the valid prefix and every action."""
        b = prefix_mask.shape[0]
        suffix = torch.ones(b, chunk_size, chunk_size, dtype=torch.bool, device=prefix_mask.device)
        return torch.cat([prefix_mask[:, None, :].expand(b, chunk_size, -1), suffix], dim=2)

    def suffix_tokens(self, ops, weights: Weights, x_t: torch.Tensor, t: float, inputs: Mapping[str, Any]):
        """Pi0.5 suffix ``action_in_proj(x_t)`` and the time condition ``swish(mlp_out(swish(mlp_in(emb(t)))))``."""
        b = x_t.shape[0]
        emb = sinusoidal_time_embedding(t, self.config.decoder_dim, b, x_t.device)
        cond = ops.silu(ops.linear(emb, weights["time_mlp_in.weight"], weights["time_mlp_in.bias"]))
        cond = ops.silu(ops.linear(cond, weights["time_mlp_out.weight"], weights["time_mlp_out.bias"]))
        tokens = ops.linear(x_t, weights["action_in_proj.weight"], weights["action_in_proj.bias"])
        return tokens, cond

    def expert_layer(self, ops, weights, i, x, positions, mask, kv, cond):
        """One adaptive-norm expert layer (Pi0.5)."""
        return adaptive_gemma_layer(ops, weights, f"expert.layers.{i}", x, positions, mask, self.config, kv, cond)

    def final_norm(self, ops, weights, x, cond):
        """Adaptive final norm: scale and shift from the time condition; its gate is unused."""
        scale, shift, _ = modulation(ops, weights, "expert.norm_mod", cond)
        return ops.ada_rms_norm(x, scale, shift, self.config.rms_norm_eps)

    def denoising_tables(self, weights: Weights, num_steps: int) -> DenoisingTables:
        """The time condition of every step, all 2 x layers + 1 adaptive-norm modulations from it, and fp32
        copies of ``action_in_proj``."""
        c = self.config
        d = c.decoder_dim
        times = euler_times(num_steps)
        device = weights["action_in_proj.weight"].device
        emb = torch.cat([sinusoidal_time_embedding(t, d, 1, device) for t in times])  # (steps, D) fp32
        w = lambda name: weights[name].float()  # noqa: E731
        cond = F.silu(F.linear(emb, w("time_mlp_in.weight"), w("time_mlp_in.bias")))
        cond = F.silu(F.linear(cond, w("time_mlp_out.weight"), w("time_mlp_out.bias")))
        mods = []
        for i in range(c.num_decoder_layers):
            for norm in ("attn_norm_mod", "mlp_norm_mod"):
                name = f"expert.layers.{i}.{norm}"
                mods.append(F.linear(cond, w(f"{name}.weight"), w(f"{name}.bias")))
        mod = torch.stack(mods, 1).view(num_steps, c.num_decoder_layers, 2, 3, d)
        final = F.linear(cond, w("expert.norm_mod.weight"), w("expert.norm_mod.bias")).view(num_steps, 3, d)
        norm_scales = 1.0 + mod[:, :, :, 0]  # (steps, layers, 2, D)
        conditioning = ExpertConditioning(norm_scales.contiguous(), mod.contiguous(), final.contiguous())
        in_bias = w("action_in_proj.bias").expand(num_steps, -1).contiguous()
        action = ActionPath(w("action_in_proj.weight"), in_bias, weights["action_out_proj.weight"],
                            weights["action_out_proj.bias"])
        return DenoisingTables(times, conditioning, action)

    def table_suffix_start(self, weights: Weights, inputs: Mapping[str, Any], hidden: torch.Tensor) -> None:
        """Pi0.5's suffix is the action tokens only."""


def model_class(model_type: VLAModelType) -> type[Pi0Model]:
    """The model class implementing ``model_type``."""
    return {VLAModelType.PI0: Pi0Model, VLAModelType.PI05: Pi05Model}[model_type]
