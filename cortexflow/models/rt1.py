"""RT-1 (Robotics Transformer) and RT-1-X: FiLM-EfficientNet + TokenLearner + a causal action transformer.

Facts: ``docs/reference_facts.md#S-RT1``. One step of the policy:

1. the new frame ``(B, 3, H, W)`` in [0, 1] is resized to 300x300 (bilinear, half-pixel centres, no
   antialias, as ``tf.image.resize``), scaled to [0, 255] and tokenized by the FiLM-EfficientNet
   conditioned on the 512-D instruction embedding -> ``(B, E, h, w)`` -> ``h*w`` tokens;
2. TokenLearner: ``LayerNorm -> Dense -> GELU(tanh) -> Dense`` gives per-position weights ``(B, hw, N)``,
   softmax over the ``hw`` positions, weighted sums of the **un-normalised** tokens -> ``(B, N, E)``;
3. the frame's ``N`` tokens are written into the episode history ``(B, T, N, E)`` at slot
   ``t = min(step, T - 1)`` (the history shifts left by one frame once full);
4. the sequence is ``T`` steps of ``[N image tokens, A zero action tokens]`` (``T (N + A)`` rows; 114 for
   RT-1), embedded by ``Dense(x) + Dense(one_hot(position))`` and run through pre-LN layers
   (``x + MHA(LN1 x)``, ``x + FFN(LN2 x)``; the FFN is one linear layer for RT-1, SwiGLU for RT-1-X),
   no final norm, then ``Dense -> vocab`` logits;
5. the logits of rows ``N + (N + A) t - 1 + k`` (``k = 0..A-1``: the last image token of step ``t``
   and its first ``A - 1`` action slots) are the ``A`` action tokens, argmax, then de-tokenised.

Since action inputs are zeros and action rows never see action columns, this single pass gives the
logits of the reference's ``A`` sequential passes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from cortexflow.config import VLAModelType
from cortexflow.errors import CheckpointError, ConfigError
from cortexflow.models.base import VLAModel, Weights
from cortexflow.models.efficientnet_film import (
    MBConvBlock,
    efficientnet_blocks,
    efficientnet_film,
    efficientnet_film_shapes,
    round_filters,
)

#: Keras EfficientNet's extra ``Rescaling(1 / sqrt(std))`` after its Normalization layer (ImageNet std).
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_MEAN = (0.485, 0.456, 0.406)


@dataclass(frozen=True)
class ActionField:
    """One entry of the action spec: ``size`` floats uniform over ``[low, high]`` (one token each), or
    a ``discrete`` one-hot of ``size`` classes (one token: the class index)."""

    name: str
    size: int
    low: float = -1.0
    high: float = 1.0
    discrete: bool = False

    @property
    def num_tokens(self) -> int:
        return 1 if self.discrete else self.size


#: RT-1's action spec in token order (``docs/reference_facts.md#F-RT1-5``; bounds from ``rt1main/policy_specs.pbtxt``).
RT1_ACTIONS = (
    ActionField("terminate_episode", 3, discrete=True),
    ActionField("world_vector", 3, -1.0, 1.0),
    ActionField("rotation_delta", 3, -math.pi / 2, math.pi / 2),
    ActionField("gripper_closedness_action", 1, -1.0, 1.0),
    ActionField("base_displacement_vertical_rotation", 1, -math.pi, math.pi),
    ActionField("base_displacement_vector", 2, -1.0, 1.0),
)
#: RT-1-X (JAX): world vector over (-2, 2), otherwise as RT-1 (``docs/reference_facts.md#F-RT1-6``).
RT1X_ACTIONS = tuple(dataclasses.replace(f, low=-2.0, high=2.0) if f.name == "world_vector" else f
                     for f in RT1_ACTIONS)


@dataclass
class RT1Config:
    """Dimensions of RT-1 (defaults: the published TF model, 35.3M parameters).

    ``width`` / ``depth``: EfficientNet scaling (B3: 1.2 / 1.4); ``embedding_dim``: the tokenizer's
    output width (the 1x1 projection, 512); ``context_dim``: the instruction embedding (USE, 512);
    ``num_tokens``: TokenLearner tokens per frame; ``d_model`` / ``num_heads`` / ``head_dim``: the
    transformer (Keras ``feed_forward_size`` / ``num_heads`` / ``layer_size``); ``ffn``: ``"linear"``
    (one Dense, RT-1) or ``"swiglu"`` (RT-1-X, hidden ``ffn_dim``, no biases); ``image_sees_actions``:
    whether image rows may attend earlier action slots (RT-1 yes, RT-1-X no); ``padding``: ``"keras"``
    or ``"same"`` (see ``efficientnet_film``); ``input_size``: the camera frame ``(H, W)`` predict takes.
    """

    image_size: int = 300
    input_size: tuple[int, int] = (256, 320)
    width: float = 1.2
    depth: float = 1.4
    depth_divisor: int = 8
    embedding_dim: int = 512
    context_dim: int = 512
    num_tokens: int = 8
    token_learner_dim: int = 64
    num_layers: int = 8
    d_model: int = 512
    num_heads: int = 8
    head_dim: int = 128
    ffn: str = "linear"
    ffn_dim: int = 512
    vocab_size: int = 256
    time_steps: int = 6
    bn_eps: float = 1e-3
    ln_eps: float = 1e-6
    padding: str = "keras"
    image_sees_actions: bool = True
    input_rescale: tuple[float, float, float] = tuple(1.0 / math.sqrt(s) for s in IMAGENET_STD)
    actions: tuple[ActionField, ...] = field(default=RT1_ACTIONS)
    model_type: VLAModelType = VLAModelType.RT1

    @classmethod
    def rt1x_jax(cls, **overrides: Any) -> "RT1Config":
        """RT-1-X as released in Flax (``docs/reference_facts.md#F-RT1-6``): 15 frames, 81 tokens per frame, 8 heads of 256, SwiGLU,
        512 bins, world vector over (-2, 2), SAME padding, plain ImageNet mean/std input scaling."""
        base = dict(time_steps=15, num_tokens=81, head_dim=256, ffn="swiglu", vocab_size=512, padding="same",
                    image_sees_actions=False, input_rescale=(1.0, 1.0, 1.0), actions=RT1X_ACTIONS)
        base.update(overrides)
        return cls(**base)

    def replace(self, **overrides: Any) -> "RT1Config":
        """A copy with fields changed (JSON lists accepted for tuples, dicts for ``actions``); unknown
        names raise ``ConfigError``."""
        names = {f.name for f in dataclasses.fields(self)} - {"model_type"}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(f"unknown RT-1 config fields {unknown}; known: {sorted(names)}")
        for key in ("input_size", "input_rescale"):
            if key in overrides:
                overrides[key] = tuple(overrides[key])
        if "actions" in overrides:
            overrides["actions"] = tuple(f if isinstance(f, ActionField) else ActionField(**f)
                                         for f in overrides["actions"])
        return dataclasses.replace(self, **overrides)

    def validate(self) -> None:
        problems = []
        for name in ("image_size", "embedding_dim", "context_dim", "num_tokens", "token_learner_dim", "num_layers",
                     "d_model", "num_heads", "head_dim", "ffn_dim", "vocab_size", "time_steps"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)} must be positive")
        if self.ffn not in ("linear", "swiglu"):
            problems.append(f"ffn={self.ffn!r} must be 'linear' or 'swiglu'")
        if self.padding not in ("keras", "same"):
            problems.append(f"padding={self.padding!r} must be 'keras' or 'same'")
        if self.embedding_dim != self.d_model:
            problems.append(f"embedding_dim {self.embedding_dim} must equal d_model {self.d_model}")
        for f in self.actions:
            if f.discrete and f.size > self.vocab_size:
                problems.append(f"action {f.name} has {f.size} classes, more than the {self.vocab_size} tokens")
        if problems:
            raise ConfigError("invalid RT-1 configuration: " + "; ".join(problems))

    @property
    def num_action_tokens(self) -> int:
        return sum(f.num_tokens for f in self.actions)

    @property
    def tokens_per_step(self) -> int:
        return self.num_tokens + self.num_action_tokens

    @property
    def sequence_length(self) -> int:
        """``T (N + A)``: 114 for RT-1, 1380 for RT-1-X."""
        return self.time_steps * self.tokens_per_step

    def blocks(self) -> list[MBConvBlock]:
        return efficientnet_blocks(self.width, self.depth, self.depth_divisor)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["model_type"] = self.model_type.value
        return data


def rt1_attention_mask(time_steps: int, num_image: int, num_action: int,
                       image_sees_actions: bool = True) -> torch.Tensor:
    """``(L, L)`` bool, True = query row may attend key column, over ``time_steps`` steps of
    ``[num_image image tokens, num_action action tokens]``.

    Causal, minus action->action pairs whose key step is earlier or whose key is at or before the query
    in the same step (so action rows see only image tokens of their own and earlier steps); with
    ``image_sees_actions=False`` image rows also never see action columns (RT-1-X)."""
    per_step = num_image + num_action
    length = time_steps * per_step
    idx = torch.arange(length)
    step, within = idx // per_step, idx % per_step
    is_action = within >= num_image
    causal = idx[None, :] <= idx[:, None]
    both_actions = is_action[:, None] & is_action[None, :]
    earlier = (step[None, :] < step[:, None]) | ((step[None, :] == step[:, None]) & causal)
    mask = causal & ~(both_actions & earlier)
    if not image_sees_actions:
        mask &= ~(~is_action[:, None] & is_action[None, :])
    return mask


def action_logit_rows(slot: torch.Tensor, num_image: int, num_action: int) -> torch.Tensor:
    """Rows ``N + (N + A) t - 1 + k`` (``k = 0..A-1``) holding step ``t``'s action logits: ``slot (B,)``
    -> ``(B, A)`` int64."""
    k = torch.arange(num_action, device=slot.device)
    return num_image + (num_image + num_action) * slot[:, None] - 1 + k[None, :]


def detokenize_actions(tokens: np.ndarray, actions: tuple[ActionField, ...], vocab_size: int) -> dict[str, np.ndarray]:
    """Action tokens ``(..., A)`` -> the action dict, exactly as RT-1's ``RT1ActionTokenizer.detokenize``:
    a float dim is ``token / (V - 1) * (high - low) + low`` in float32; a discrete dim is the one-hot
    (int32) of its token, a token past the class count giving class 0."""
    tokens = np.asarray(tokens)
    out: dict[str, np.ndarray] = {}
    i = 0
    for f in actions:
        if f.discrete:
            t = tokens[..., i]
            t = np.where(t >= f.size, 0, t)
            out[f.name] = np.eye(f.size, dtype=np.int32)[t]
            i += 1
        else:
            t = tokens[..., i:i + f.size].astype(np.float32)
            low, high = np.float32(f.low), np.float32(f.high)
            out[f.name] = (t / np.float32(vocab_size - 1)) * (high - low) + low
            i += f.size
    return out


def tokenize_actions(action: Mapping[str, Any], actions: tuple[ActionField, ...], vocab_size: int) -> np.ndarray:
    """The inverse map (RT-1's ``tokenize``): clip, ``floor((a - low) / (high - low) * (V - 1))``; a
    discrete one-hot gives its argmax. Returns ``(..., A)`` int64."""
    parts = []
    for f in actions:
        a = np.asarray(action[f.name])
        if f.discrete:
            parts.append(np.argmax(a, axis=-1)[..., None])
        else:
            low, high = np.float32(f.low), np.float32(f.high)
            norm = (np.clip(a.astype(np.float32), low, high) - low) / (high - low)
            parts.append((norm * np.float32(vocab_size - 1)).astype(np.int64))
    return np.concatenate(parts, axis=-1).astype(np.int64)


class RT1Model(VLAModel):
    """RT-1 / RT-1-X over backend ops (see the module docstring for the computation)."""

    model_type = VLAModelType.RT1

    def __init__(self, config: RT1Config):
        super().__init__(config)
        self.blocks = config.blocks()
        self._constants: dict[torch.device, dict[str, torch.Tensor]] = {}

    # ---- declarations -------------------------------------------------------------------------
    @property
    def stem_filters(self) -> int:
        return round_filters(32, self.config.width, self.config.depth_divisor)

    @property
    def top_filters(self) -> int:
        return round_filters(1280, self.config.width, self.config.depth_divisor)

    def get_weight_shapes(self) -> dict[str, tuple[int, ...]]:
        c = self.config
        shapes = efficientnet_film_shapes("tokenizer", self.blocks, self.stem_filters, self.top_filters,
                                          c.embedding_dim, c.context_dim)
        shapes.update({
            "token_learner.norm.weight": (c.embedding_dim,),
            "token_learner.norm.bias": (c.embedding_dim,),
            "token_learner.hidden.weight": (c.token_learner_dim, c.embedding_dim),
            "token_learner.hidden.bias": (c.token_learner_dim,),
            "token_learner.output.weight": (c.num_tokens, c.token_learner_dim),
            "token_learner.output.bias": (c.num_tokens,),
            "transformer.token_emb.weight": (c.d_model, c.embedding_dim),
            "transformer.token_emb.bias": (c.d_model,),
            "transformer.pos_emb.weight": (c.d_model, c.sequence_length),
            "transformer.pos_emb.bias": (c.d_model,),
            "transformer.output.weight": (c.vocab_size, c.d_model),
            "transformer.output.bias": (c.vocab_size,),
        })
        inner = c.num_heads * c.head_dim
        for i in range(c.num_layers):
            p = f"transformer.layers.{i}"
            for ln in ("ln1", "ln2"):
                shapes[f"{p}.{ln}.weight"] = (c.d_model,)
                shapes[f"{p}.{ln}.bias"] = (c.d_model,)
            for proj in ("q", "k", "v"):
                shapes[f"{p}.{proj}.weight"] = (inner, c.d_model)
                shapes[f"{p}.{proj}.bias"] = (inner,)
            shapes[f"{p}.o.weight"] = (c.d_model, inner)
            shapes[f"{p}.o.bias"] = (c.d_model,)
            if c.ffn == "linear":
                shapes[f"{p}.ff.weight"] = (c.d_model, c.d_model)
                shapes[f"{p}.ff.bias"] = (c.d_model,)
            else:
                shapes[f"{p}.ff.gate"] = (c.ffn_dim, c.d_model)
                shapes[f"{p}.ff.up"] = (c.ffn_dim, c.d_model)
                shapes[f"{p}.ff.down"] = (c.d_model, c.ffn_dim)
        return shapes

    def get_buffer_shapes(self, num_views: int = 1, chunk_size: int = 1,
                          batch_size: int = 1) -> dict[str, tuple[int, ...]]:
        """One step for ``batch_size`` episodes: the new frames, instruction embeddings, per-episode frame
        counts and token history (inputs, updated in place), the action logits and tokens (outputs)."""
        c = self.config
        h, w = c.input_size
        return {
            "images": (batch_size, 3, h, w),
            "context": (batch_size, c.context_dim),
            "step": (batch_size,),
            "history": (batch_size, c.time_steps, c.num_tokens, c.embedding_dim),
            "logits": (batch_size, c.num_action_tokens, c.vocab_size),
            "tokens": (batch_size, c.num_action_tokens),
        }

    def buffer_dtype(self, name: str, compute_dtype: torch.dtype) -> torch.dtype:
        if name in ("step", "tokens"):
            return torch.int64
        return compute_dtype if name == "history" else torch.float32

    def weight_dtype(self, name: str, compute_dtype: torch.dtype) -> torch.dtype:
        """Input normalisation and batch-norm statistics stay fp32."""
        if ".bn." in name or name.startswith("tokenizer.norm."):
            return torch.float32
        return compute_dtype

    def preprocess_checkpoint(self, checkpoint: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Canonical-name tensors (a converted safetensors file) checked against the declared shapes."""
        shapes = self.get_weight_shapes()
        missing = sorted(set(shapes) - set(checkpoint))
        unexpected = sorted(set(checkpoint) - set(shapes))
        mis_shaped = sorted(f"{k} {tuple(checkpoint[k].shape)} != {shapes[k]}" for k in shapes
                            if k in checkpoint and tuple(checkpoint[k].shape) != shapes[k])
        if missing or unexpected or mis_shaped:
            raise CheckpointError(f"the RT-1 weights do not match this configuration: missing {missing}; "
                                  f"unexpected {unexpected}; mis-shaped {mis_shaped}")
        return {k: checkpoint[k] for k in shapes}

    # ---- stages -------------------------------------------------------------------------------
    def vision_encoder(self, ops, weights: Weights, inputs: Mapping[str, Any]) -> torch.Tensor:
        """``images (B, 3, H, W)`` in [0, 1] and ``context (B, Dc)`` -> one frame's tokens ``(B, N, E)``."""
        c = self.config
        images = inputs["images"].float()
        if images.shape[-2:] != (c.image_size, c.image_size):
            images = F.interpolate(images, size=(c.image_size, c.image_size), mode="bilinear", align_corners=False,
                                   antialias=False)
        images = images * 255.0
        context = inputs["context"].to(ops.dtype)
        rescale = self.constants(images.device)["rescale"]
        fmap = efficientnet_film(ops, weights, "tokenizer", self.blocks, images, context, rescale, c.bn_eps, c.padding)
        tokens = fmap.flatten(2).transpose(1, 2)  # (B, h*w, E), row-major over (h, w) as the Keras reshape
        return token_learner(ops, weights, "token_learner", tokens, c.ln_eps)

    def transformer_encoder(self, ops, weights: Weights, inputs: Mapping[str, Any]) -> torch.Tensor:
        """Write the new frame's tokens into ``history (B, T, N, E)`` at slot ``min(step, T - 1)``, shifting
        the history left by one frame for episodes past ``T`` frames; returns the slots ``(B,)``."""
        history, step, new = inputs["history"], inputs["step"], inputs["frame_tokens"]
        t = self.config.time_steps
        full = (step >= t)[:, None, None, None]
        history.copy_(torch.where(full, torch.roll(history, shifts=-1, dims=1), history))
        slot = step.clamp(max=t - 1)
        index = slot[:, None, None, None].expand(-1, 1, *history.shape[2:])
        history.scatter_(1, index, new[:, None].to(history.dtype))
        return slot

    def transformer_decoder(self, ops, weights: Weights, inputs: Mapping[str, Any]) -> torch.Tensor:
        """``history (B, T, N, E)`` and ``slot (B,)`` -> action logits ``(B, A, V)`` (fp32)."""
        c = self.config
        history, slot = inputs["history"], inputs["slot"]
        batch = history.shape[0]
        zeros = history.new_zeros(batch, c.time_steps, c.num_action_tokens, c.embedding_dim)
        x = torch.cat([history.to(ops.dtype), zeros.to(ops.dtype)], dim=2).reshape(batch, c.sequence_length, -1)
        x = ops.linear(x, weights["transformer.token_emb.weight"], weights["transformer.token_emb.bias"])
        positions = (weights["transformer.pos_emb.weight"].t() + weights["transformer.pos_emb.bias"]).to(x.dtype)
        x = x + positions[None]
        mask = self.constants(x.device)["mask"][None].expand(batch, -1, -1)
        for i in range(c.num_layers):
            x = self.layer(ops, weights, f"transformer.layers.{i}", x, mask)
        rows = action_logit_rows(slot, c.num_tokens, c.num_action_tokens)
        picked = torch.gather(x, 1, rows[:, :, None].expand(-1, -1, x.shape[-1]))
        logits = ops.linear(picked, weights["transformer.output.weight"], weights["transformer.output.bias"])
        return logits.float()

    def layer(self, ops, weights: Weights, p: str, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Pre-LN block: ``x + MHA(LN1 x)`` (Keras MultiHeadAttention, queries scaled by head_dim^-0.5),
        then ``x + FFN(LN2 x)``."""
        c = self.config
        batch, length, _ = x.shape
        h = ops.layer_norm(x, weights[f"{p}.ln1.weight"], weights[f"{p}.ln1.bias"], c.ln_eps)
        q, k, v = (ops.linear(h, weights[f"{p}.{n}.weight"], weights[f"{p}.{n}.bias"]).view(
            batch, length, c.num_heads, c.head_dim) for n in ("q", "k", "v"))
        attn = ops.attention(q, k, v, mask, c.head_dim ** -0.5)
        x = x + ops.linear(attn, weights[f"{p}.o.weight"], weights[f"{p}.o.bias"])
        h = ops.layer_norm(x, weights[f"{p}.ln2.weight"], weights[f"{p}.ln2.bias"], c.ln_eps)
        if c.ffn == "linear":
            return x + ops.linear(h, weights[f"{p}.ff.weight"], weights[f"{p}.ff.bias"])
        gated = ops.silu(ops.linear(h, weights[f"{p}.ff.gate"])) * ops.linear(h, weights[f"{p}.ff.up"])
        return x + ops.linear(gated, weights[f"{p}.ff.down"])

    def constants(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Per-device constants, built once (so that a captured CUDA graph copies nothing from the host):
        ``mask``, the ``(L, L)`` mask of :func:`rt1_attention_mask`, and ``rescale``, the ``(3,)`` input
        scaling after the Normalization layer."""
        if device not in self._constants:
            c = self.config
            mask = rt1_attention_mask(c.time_steps, c.num_tokens, c.num_action_tokens, c.image_sees_actions)
            rescale = torch.tensor(c.input_rescale, dtype=torch.float32)
            self._constants[device] = {"mask": mask.to(device), "rescale": rescale.to(device)}
        return self._constants[device]

    def forward(self, backend, weights: Weights, buffers: Mapping[str, torch.Tensor],
                timer: Any = None) -> torch.Tensor:
        """One policy step over the static ``buffers`` (see ``get_buffer_shapes``): tokenizes the new frame,
        updates ``history`` and ``step`` in place, writes ``logits`` and argmax ``tokens``."""
        frame = backend.vision_encoder(self, weights, buffers)
        slot = backend.transformer_encoder(self, weights, dict(buffers, frame_tokens=frame))
        logits = backend.transformer_decoder(self, weights, dict(buffers, slot=slot))
        buffers["logits"].copy_(logits)
        buffers["tokens"].copy_(logits.argmax(dim=-1))
        buffers["step"].add_(1)
        return buffers["tokens"]


def token_learner(ops, weights: Weights, prefix: str, tokens: torch.Tensor, eps: float) -> torch.Tensor:
    """TokenLearner v1.1: ``tokens (B, P, E)`` -> ``(B, N, E)``.

    ``w = Dense2(gelu_tanh(Dense1(LayerNorm(tokens))))`` is ``(B, P, N)``; its softmax over the ``P``
    positions (fp32) weights the un-normalised ``tokens``."""
    h = ops.layer_norm(tokens, weights[f"{prefix}.norm.weight"], weights[f"{prefix}.norm.bias"], eps)
    h = ops.gelu_tanh(ops.linear(h, weights[f"{prefix}.hidden.weight"], weights[f"{prefix}.hidden.bias"]))
    scores = ops.linear(h, weights[f"{prefix}.output.weight"], weights[f"{prefix}.output.bias"])
    attn = torch.softmax(scores.float().transpose(1, 2), dim=-1)
    return torch.matmul(attn.to(tokens.dtype), tokens)
