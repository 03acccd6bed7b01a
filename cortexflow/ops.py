"""The op interface: the ops a model's forward pass is written against, the fused units, and the three stages.

Models (``cortexflow/models/``) and backends (``cortexflow/backends/``) both depend on this module and on
nothing of each other: a model calls the ops, a backend implements them.

Tensor layouts used by every op:
- activations ``(B, L, D)`` (batch, tokens, features);
- attention heads ``(B, L, H, head_dim)``;
- linear weights in torch layout ``(out_features, in_features)``.

Primitive ops (``linear``, ``rms_norm``, ``attention``, ...) are abstract: every backend implements them.
Fused units (``pre_ln_encoder``, ``prefix_kv_cache``, ``decoder_layer``, ``lm_head_argmax``,
``begin_denoising`` / ``expert_stack`` / ``denoising_step``) are what the fast paths accelerate; each has a
PyTorch composition of the primitive ops as its default, so the ``pytorch`` backend stays the reference and a
backend overrides only the units it accelerates. A unit receives weight names and dimensions (:class:`GatedLayer`,
:class:`EncoderStack`, :class:`ExpertStack`), never a model object. Weight re-layouts (concatenated
projections, folded norms) are the ``fuse_weights`` hook over the weight-name groups a model declares
(:class:`FusableWeights`).

The stage methods (``vision_encoder``, ``transformer_encoder``, ``transformer_decoder``) run the model's
own stage code over the backend's ops; a backend that runs whole stages elsewhere (ONNX Runtime) overrides
them and must return the same thing.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Mapping, Protocol, Sequence

import torch

Weights = Mapping[str, torch.Tensor]

#: Gated-MLP activations a :class:`GatedLayer` may name: ``act(gate) * up``.
GATED_ACTIVATIONS = ("gelu_tanh", "silu")


@dataclass(frozen=True)
class DecoderDims:
    """Attention geometry of a stack of decoder layers."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_base: float
    rms_norm_eps: float

    @property
    def attention_scale(self) -> float:
        """The query scaling ``head_dim ** -0.5``."""
        return 1.0 / math.sqrt(self.head_dim)


@dataclass(frozen=True)
class GatedLayer:
    """The weight names of one pre-norm decoder layer with a gated MLP (Gemma, Llama).

    Linears without bias: ``{prefix}.q (Hq*Dh, D)``, ``{prefix}.k`` / ``{prefix}.v`` ``(Hkv*Dh, D)``,
    ``{prefix}.o (D, Hq*Dh)``, ``{prefix}.gate`` / ``{prefix}.up`` ``(M, D)``, ``{prefix}.down (D, M)``.
    ``attn_norm`` / ``mlp_norm`` name the RMSNorm scales before attention and MLP in the ``(1 + w)``
    convention of ``rms_norm`` (None: the layer's norms are adaptive, their scales come per call).
    ``index`` is the layer's place in its stack (layer 0 reads the stack's input). ``foldable_norms``: a
    backend may fold the norm scales into the projections after them (``fuse_weights``)."""

    prefix: str
    index: int
    dims: DecoderDims
    activation: str = "gelu_tanh"
    attn_norm: str | None = None
    mlp_norm: str | None = None
    foldable_norms: bool = False

    def name(self, part: str) -> str:
        """The weight name ``{prefix}.{part}``."""
        return f"{self.prefix}.{part}"


@dataclass(frozen=True)
class EncoderStack:
    """The weight names of a pre-LN ViT encoder without class token (SigLIP) and its final LayerNorm.

    Layer ``i``: ``{prefix}.layers.{i}.{ln1,q,k,v,o,ln2,fc1,fc2}.{weight,bias}``; final norm
    ``{final_norm}.{weight,bias}``."""

    prefix: str
    num_layers: int
    num_heads: int
    eps: float
    final_norm: str

    def layer(self, i: int) -> str:
        return f"{self.prefix}.layers.{i}"


@dataclass(frozen=True)
class FusableWeights:
    """The weight-name groups a model lets a backend re-lay out once after loading (``fuse_weights``):
    ``vision_stacks``, pre-LN encoders whose q/k/v weights and biases may be concatenated; ``encoder_layers``
    and ``decoder_layers``, gated layers (of the prefix stage; of the decoder stages) whose q/k/v and
    gate/up weights may be concatenated."""

    vision_stacks: tuple[EncoderStack, ...] = ()
    encoder_layers: tuple[GatedLayer, ...] = ()
    decoder_layers: tuple[GatedLayer, ...] = ()


@dataclass(frozen=True)
class ExpertStack:
    """The action expert of a flow-matching policy: its layers and its final RMSNorm scale ``final_norm``
    (None: the final norm is adaptive, from :attr:`ExpertConditioning.final_modulation`)."""

    layers: tuple[GatedLayer, ...]
    final_norm: str | None = None


@dataclass
class ExpertConditioning:
    """What the expert layers take from the denoising time, per step, made once per weights and step count.

    ``norm_scales``: the column factor of every layer's attention and MLP norm, ``(layers, 2, D)`` fp32
    (``1 + w``, the same at every step) or ``(steps, layers, 2, D)`` (adaptive: ``1 + scale_t``).
    Adaptive norms also have ``modulation (steps, layers, 2, 3, D)`` (attention, MLP) x (scale, shift,
    gate) and ``final_modulation (steps, 3, D)`` for the final norm."""

    norm_scales: torch.Tensor
    modulation: torch.Tensor | None = None
    final_modulation: torch.Tensor | None = None


@dataclass(frozen=True)
class ActionPath:
    """What a flow-matching decoder computes around its expert at each Euler step, in tensors made once per
    weights and step count. The action tokens of the noisy actions ``x_t (B, H, A)`` (fp32):
    ``tokens = x_t @ in_weightᵀ + in_bias[step]``, and with ``mid_weight`` then
    ``tokens = silu(tokens) @ mid_weightᵀ + mid_bias``; they fill the last ``H`` suffix rows. The velocity:
    ``expert_stack(...) @ head_weightᵀ + head_bias`` in the compute dtype.

    ``in_weight (D, A)``, ``in_bias (steps, D)``, ``mid_weight (D, D)``, ``mid_bias (D,)``: fp32;
    ``head_weight (A, D)``, ``head_bias (A,)``: the model's weights."""

    in_weight: torch.Tensor
    in_bias: torch.Tensor
    head_weight: torch.Tensor
    head_bias: torch.Tensor
    mid_weight: torch.Tensor | None = None
    mid_bias: torch.Tensor | None = None


def action_tokens(ops: "ComputeBackend", path: ActionPath, x_t: torch.Tensor, step: int) -> torch.Tensor:
    """The action tokens of step ``step`` for ``x_t (B, H, A)`` as ``(B * H, D)`` fp32 (:class:`ActionPath`)."""
    tokens = torch.addmm(path.in_bias[step], x_t.reshape(-1, x_t.shape[-1]), path.in_weight.T)
    if path.mid_weight is not None:
        tokens = torch.addmm(path.mid_bias, ops.silu(tokens), path.mid_weight.T)
    return tokens


def kv_buffers(layers: int, batch: int, rows: int, head_shape: Sequence[int], dtype: torch.dtype,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty key and value buffers ``(layers, batch, rows, Hkv, Dh)``, ``head_shape = (Hkv, Dh)``."""
    keys = torch.empty((layers, batch, rows, *head_shape), dtype=dtype, device=device)
    return keys, torch.empty_like(keys)


class PrefixKVCache(list):
    """A prefix pass's KV cache written with room for a suffix: per layer ``(k, v)``, each ``(B, P, Hkv, Dh)``, the
    views ``keys[i, :, :P]`` / ``values[i, :, :P]`` of buffers ``(layers, B, P + room, Hkv, Dh)``.
    :meth:`ComputeBackend.begin_denoising` writes a suffix of ``room`` rows after the prefix's in these buffers,
    where a plain list of ``(k, v)`` is first copied into new ones."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, prefix_len: int):
        super().__init__((keys[i, :, :prefix_len], values[i, :, :prefix_len]) for i in range(keys.shape[0]))
        self.keys, self.values = keys, values


@dataclass
class DenoisingContext:
    """The per-call state of a flow-matching decoder between ``begin_denoising`` and its ``expert_stack`` calls.

    ``keys`` / ``values`` ``(layers, B, P + S, Hkv, Dh)``: each layer's prefix cache followed by the rows the
    suffix of the current step writes; ``positions (B, S)``, ``mask (B, S, P + S)``; ``chunk``: the action
    rows at the end of the suffix. ``backend_state``: what the backend keeps for the call (workspaces)."""

    expert: ExpertStack
    conditioning: ExpertConditioning
    keys: torch.Tensor
    values: torch.Tensor
    prefix_len: int
    positions: torch.Tensor
    mask: torch.Tensor
    chunk: int
    backend_state: dict[str, Any] = field(default_factory=dict)


class StagedModel(Protocol):
    """What a backend may ask of a model: its stages, written against this interface, and its fusable weights."""

    def vision_encoder(self, ops: "ComputeBackend", weights: Weights, inputs: Mapping[str, Any]) -> Any: ...

    def transformer_encoder(self, ops: "ComputeBackend", weights: Weights, inputs: Mapping[str, Any]) -> Any: ...

    def transformer_decoder(self, ops: "ComputeBackend", weights: Weights, inputs: Mapping[str, Any]) -> Any: ...

    def fusable_weights(self) -> FusableWeights: ...


def residual_add(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x + y``, or with ``scale (D,)`` (LayerScale) ``x + scale * y`` in one rounding (``torch.addcmul``)."""
    return x + y if scale is None else torch.addcmul(x, y, scale.to(y.dtype))


class ComputeBackend(ABC):
    """Computes a model's stages. Subclasses implement the primitive ops and may override fused units."""

    name: str = "abstract"
    supports_cuda_graphs: bool = True
    #: Runs prompts padded to any length (False: exported graphs fixed at ``max_token_len``).
    variable_prompt_length: bool = True
    #: ``transformer_decoder`` runs the model's own denoising loop on ops that autograd can differentiate
    #: with respect to the noisy actions, so real-time chunking can guide it (``engine.predict(prev_actions=)``).
    supports_guided_decoding: bool = True
    #: ``transformer_decoder`` runs the model's own Euler loop in Python, so a guidance that needs no autograd
    #: (real-time chunking with ``RTCConfig(jacobian="identity")``) can correct each step's velocity.
    runs_denoising_loop: bool = True
    #: Runs the model's own Python stages, so the engine may look a model's ``host_embedding`` up on the host and
    #: pass the rows in (False: exported graphs that take the token ids).
    supports_host_embedding: bool = True

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device = torch.device(device)
        self.dtype = dtype

    # ---- stages -------------------------------------------------------------------------------
    def vision_encoder(self, model: StagedModel, weights: Weights, inputs: Mapping[str, Any]) -> Any:
        """Images -> image tokens in the language model's width (see the model's ``vision_encoder``)."""
        return model.vision_encoder(self, weights, inputs)

    def transformer_encoder(self, model: StagedModel, weights: Weights, inputs: Mapping[str, Any]) -> Any:
        """Prefix (image + text tokens) -> per-layer KV cache (see the model's ``transformer_encoder``)."""
        return model.transformer_encoder(self, weights, inputs)

    def transformer_decoder(self, model: StagedModel, weights: Weights, inputs: Mapping[str, Any]) -> Any:
        """KV cache + state + noise -> actions (see the model's ``transformer_decoder``)."""
        return model.transformer_decoder(self, weights, inputs)

    def decoder_lm_layer(self, lm, weights: Weights, i: int, x: torch.Tensor, positions: torch.Tensor,
                         mask: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor],
                         write_at: torch.Tensor | None) -> torch.Tensor:
        """Layer ``i`` of a token VLA's decoder LM ``lm`` (``DecoderLM.layer``, which calls :meth:`decoder_layer`),
        for callers that hold the LM."""
        return lm.layer(self, weights, i, x, positions, mask, cache, write_at)

    def prepare_weights(self, model: StagedModel, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Re-lay out the weights once after loading: :meth:`fuse_weights` over the model's declared groups."""
        return self.fuse_weights(weights, model.fusable_weights())

    def fuse_weights(self, weights: dict[str, torch.Tensor], groups: FusableWeights) -> dict[str, torch.Tensor]:
        """Hook to fuse the weights of ``groups`` (concatenated projections, folded norms), in place, such
        that every unit's default composition still computes the same function on the result. Default: unchanged."""
        return weights

    def per_weights(self, weights: Weights, key: Hashable, build: Callable[[], Any]) -> Any:
        """``build()``, a value that depends only on ``weights`` and ``key`` (per-step tables of a denoising
        loop); a backend may keep it for later calls. Default: built on every call."""
        return build()

    def run_concurrently(self, first, second):
        """``(first(), second())`` for two independent computations (e.g. two vision towers). Default: one
        after the other; a GPU backend may overlap them on two streams."""
        return first(), second()

    # ---- primitive ops ------------------------------------------------------------------------
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

    # ---- fused units (default: a composition of the primitive ops) -----------------------------
    def add_layer_norm(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                       scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A pre-LN block's residual add and the next LayerNorm: ``s = x + y`` (``x + scale * y`` with ``scale
        (D,)``, LayerScale, in one rounding) and ``layer_norm(s)`` -> ``(s, normed)`` in ``x.dtype``. ``x`` is
        the caller's temporary (the residual stream): a backend may update it in place and return it as ``s``."""
        s = residual_add(x, y, scale)
        return s, self.layer_norm(s, weight, bias, eps)

    def pre_ln_encoder(self, weights: Weights, stack: EncoderStack, x: torch.Tensor) -> torch.Tensor:
        """Every layer of the pre-LN encoder ``stack`` over the embedded tokens ``x (N, T, D)``, then its final
        LayerNorm -> ``(N, T, D)`` in ``x.dtype``. Layer: ``x + o(MHA(LN1(x)))`` (q/k/v/o with bias, no mask,
        scale ``head_dim ** -0.5``), then ``+ fc2(gelu_tanh(fc1(LN2(.))))``. ``x`` is the caller's temporary:
        a backend may update it in place."""
        for i in range(stack.num_layers):
            x = encoder_layer(self, weights, stack, i, x)
        return self.layer_norm(x, weights[f"{stack.final_norm}.weight"], weights[f"{stack.final_norm}.bias"],
                               stack.eps)

    def prefix_kv_cache(self, weights: Weights, layers: Sequence[GatedLayer], x: torch.Tensor,
                        positions: torch.Tensor, mask: torch.Tensor,
                        room: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A prefill whose only output is its KV cache: the gated ``layers`` (plain norms) over ``x (B, P, D)``
        at ``positions (B, P)`` with ``mask (B, P, P)`` -> per layer ``(k, v)``, each ``(B, P, Hkv, Dh)``
        after RoPE. The last layer computes K/V only (its output is unused). ``x`` is the caller's temporary:
        a backend may update it in place. ``room > 0``: a :class:`PrefixKVCache` whose buffers have ``room`` rows
        after the prefix's, for the suffix of the denoising call that follows (``begin_denoising``)."""
        cache = []
        buffers = None

        def keep(k, v):
            nonlocal buffers
            if room:
                if buffers is None:
                    buffers = kv_buffers(len(layers), k.shape[0], k.shape[1] + room, k.shape[2:], k.dtype, k.device)
                i = len(cache)
                buffers[0][i, :, :k.shape[1]] = k
                buffers[1][i, :, :v.shape[1]] = v
            cache.append((k, v))
            return k, v

        last = layers[-1]
        for layer in layers[:-1]:
            x = gated_layer(self, weights, layer, x, positions, mask, keep)
        h = self.rms_norm(x, weights[last.attn_norm], last.dims.rms_norm_eps)
        _, k, v = project_qkv(self, weights, last, h, positions)
        keep(k, v)
        return PrefixKVCache(*buffers, k.shape[1]) if room else cache

    def decoder_layer(self, weights: Weights, layer: GatedLayer, x: torch.Tensor, positions: torch.Tensor,
                      mask: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor],
                      write_at: torch.Tensor | None) -> torch.Tensor:
        """One gated decoder layer (plain norms) of a token LM over ``x (B, L, D)`` at ``positions (B, L)``,
        with this layer's static KV cache ``cache = (k, v)``, each ``(B, L_max, Hkv, Dh)`` (keys after RoPE).

        Prefill (``write_at=None``): K/V go to cache rows ``0..L-1`` and ``mask (B, L, L)`` applies to this
        call's own keys. Step (``write_at`` a ``(1,)`` position tensor, ``L = 1``): K/V go to that row and
        ``mask (B, 1, L_max)`` applies to the whole cache. A layer of index > 0 may update ``x`` (the
        previous layer's output) in place."""
        cache_k, cache_v = cache

        def write(k, v):
            if write_at is None:
                cache_k[:, :k.shape[1]].copy_(k)
                cache_v[:, :v.shape[1]].copy_(v)
                return k, v
            cache_k.index_copy_(1, write_at, k)
            cache_v.index_copy_(1, write_at, v)
            return cache_k, cache_v

        return gated_layer(self, weights, layer, x, positions, mask, write)

    def lm_head_argmax(self, h: torch.Tensor, norm_weight: torch.Tensor, head: torch.Tensor, eps: float,
                       allowed: tuple[int, int] | None, dims: DecoderDims) -> torch.Tensor:
        """Greedy next token of the last hidden rows ``h (B, 1, D)``: RMSNorm with ``norm_weight`` (``(1 + w)``
        convention), logits ``h @ head.T`` (``head (V, D)``) upcast to fp32, argmax -> ids ``(B,)``.
        ``allowed=(lo, hi)`` restricts the argmax to ids ``lo..hi-1``; ``dims``: the LM's layers."""
        h = self.rms_norm(h, norm_weight, eps)
        if allowed is not None:
            lo, hi = allowed
            logits = self.linear(h[:, 0], head[lo:hi]).float()
            return logits.argmax(dim=-1) + lo
        return self.linear(h[:, 0], head).float().argmax(dim=-1)

    def table_denoising(self, weights: Weights, expert: ExpertStack) -> bool:
        """Whether a flow-matching model runs its decoder on per-step conditioning tables through
        :meth:`begin_denoising` / :meth:`denoising_step` (False: its op-by-op velocity, differentiable)."""
        return False

    def begin_denoising(self, weights: Weights, expert: ExpertStack, conditioning: ExpertConditioning,
                        kv_cache: Sequence[tuple[torch.Tensor, torch.Tensor]], positions: torch.Tensor,
                        mask: torch.Tensor, chunk: int, num_steps: int) -> DenoisingContext:
        """The context of one denoising call: the prefix ``kv_cache`` (per layer ``(B, P, Hkv, Dh)``) copied into
        per-layer key/value buffers with room for the ``S`` suffix rows (used in place, without a copy, when it is
        a :class:`PrefixKVCache` of this dtype with room for ``S``); ``positions (B, S)``,
        ``mask (B, S, P + S)``; ``chunk`` action rows at the end of the suffix; ``num_steps`` steps follow."""
        b, s = positions.shape
        p = kv_cache[0][0].shape[1]
        if (isinstance(kv_cache, PrefixKVCache) and kv_cache.keys.shape[2] == p + s
                and kv_cache.keys.dtype == self.dtype and kv_cache.keys.device == positions.device):
            keys, values = kv_cache.keys, kv_cache.values
        else:
            keys, values = kv_buffers(len(kv_cache), b, p + s, kv_cache[0][0].shape[2:], self.dtype, positions.device)
            for i, (k, v) in enumerate(kv_cache):
                keys[i, :, :p] = k
                values[i, :, :p] = v
        return DenoisingContext(expert, conditioning, keys, values, p, positions, mask, chunk)

    def expert_stack(self, weights: Weights, ctx: DenoisingContext, x: torch.Tensor, step: int) -> torch.Tensor:
        """Every expert layer of denoising step ``step`` over the suffix tokens ``x (B, S, D)`` (each layer's
        K/V written into ``ctx.keys/values[i][:, P:]``), then the final norm of the last ``ctx.chunk`` rows
        -> ``(B, chunk, D)``. Plain norms use the scales named by the layers; adaptive norms (and their
        residual gates) ``ctx.conditioning.modulation[step]``. ``x`` is never written."""
        cond = ctx.conditioning
        b = x.shape[0]
        p = ctx.prefix_len
        for layer in ctx.expert.layers:
            i = layer.index
            modulation = None
            if cond.modulation is not None:
                mod = cond.modulation[step, i]
                modulation = lambda j, mod=mod: tuple(m.expand(b, -1) for m in mod[j])  # noqa: E731

            def write(k, v, i=i):
                ctx.keys[i, :, p:] = k
                ctx.values[i, :, p:] = v
                return ctx.keys[i], ctx.values[i]

            x = gated_layer(self, weights, layer, x, ctx.positions, ctx.mask, write, modulation)
        eps = ctx.expert.layers[0].dims.rms_norm_eps
        rows = x[:, -ctx.chunk:]
        if cond.final_modulation is None:
            return self.rms_norm(rows, weights[ctx.expert.final_norm], eps)
        final = cond.final_modulation[step]
        return self.ada_rms_norm(rows, final[0].expand(b, -1), final[1].expand(b, -1), eps)

    def denoising_step(self, weights: Weights, ctx: DenoisingContext, path: ActionPath, hidden: torch.Tensor,
                       x_t: torch.Tensor, step: int, dt: float,
                       guide: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """One Euler step of the noisy actions ``x_t (B, H, A)`` fp32, in place: ``x_t += dt * v`` with the
        velocity ``v`` of step ``step``: :func:`action_tokens` into the last ``H`` rows of the suffix buffer
        ``hidden (B, S, D)`` (its first ``S - H`` rows, Pi0's state token, are the caller's and are only read;
        the last ``H`` are this unit's scratch), :meth:`expert_stack`, then ``path``'s action head. ``guide``
        (real-time chunking) maps the velocity to the one the step takes."""
        b, chunk, _ = x_t.shape
        hidden[:, -chunk:] = action_tokens(self, path, x_t, step).view(b, chunk, -1)
        h = self.expert_stack(weights, ctx, hidden, step)
        velocity = self.linear(h, path.head_weight, path.head_bias)
        if guide is not None:
            velocity = guide(velocity)
        x_t.add_(velocity, alpha=dt)  # fp32 += dt * velocity (upcast in the same kernel)


# ---- the compositions the fused units default to --------------------------------------------------
def project_qkv(ops: ComputeBackend, weights: Weights, layer: GatedLayer, h: torch.Tensor,
                positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalised hidden ``h (B, L, D)`` -> RoPE'd ``q (B, L, Hq, Dh)``, RoPE'd ``k`` and ``v (B, L, Hkv, Dh)``."""
    d = layer.dims
    b, length, _ = h.shape
    q = ops.linear(h, weights[layer.name("q")]).view(b, length, d.num_heads, d.head_dim)
    k = ops.linear(h, weights[layer.name("k")]).view(b, length, d.num_kv_heads, d.head_dim)
    v = ops.linear(h, weights[layer.name("v")]).view(b, length, d.num_kv_heads, d.head_dim)
    return ops.rope(q, positions, d.rope_base), ops.rope(k, positions, d.rope_base), v


def gated_mlp(ops: ComputeBackend, weights: Weights, layer: GatedLayer, h: torch.Tensor) -> torch.Tensor:
    """``down(act(gate(h)) * up(h))`` on ``h (B, L, D)``, ``act`` the layer's activation."""
    gate = ops.linear(h, weights[layer.name("gate")])
    up = ops.linear(h, weights[layer.name("up")])
    if layer.activation == "silu":
        return ops.linear(ops.silu(gate) * up, weights[layer.name("down")])
    return ops.linear(ops.gelu_tanh_gate(gate, up), weights[layer.name("down")])


def gated_layer(ops: ComputeBackend, weights: Weights, layer: GatedLayer, x: torch.Tensor, positions: torch.Tensor,
                mask: torch.Tensor, place_kv: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                modulation: Callable[[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
                ) -> torch.Tensor:
    """One pre-norm gated layer over ``x (B, L, D)``: ``x += o(attention(norm(x)))``, ``x += mlp(norm(x))``
    (new tensors). ``place_kv(k, v)`` puts this call's RoPE'd keys and values where they belong (after a
    cache, into one) and returns the keys and values the attention reads under ``mask``. Plain norms use
    the layer's scales; with ``modulation``, sublayer ``j`` (0 attention, 1 MLP) has the adaptive norm and
    gated residual of ``modulation(j) = (scale, shift, gate)``, each ``(B, D)``."""
    eps = layer.dims.rms_norm_eps

    def norm(j, name, x):
        if modulation is None:
            return ops.rms_norm(x, weights[name], eps), None
        scale, shift, gate = modulation(j)
        return ops.ada_rms_norm(x, scale, shift, eps), gate

    h, gate = norm(0, layer.attn_norm, x)
    q, k, v = project_qkv(ops, weights, layer, h, positions)
    keys, values = place_kv(k, v)
    out = ops.linear(ops.attention(q, keys, values, mask, layer.dims.attention_scale), weights[layer.name("o")])
    x = x + (out if gate is None else out * gate.to(x.dtype)[:, None, :])
    h, gate = norm(1, layer.mlp_norm, x)
    out = gated_mlp(ops, weights, layer, h)
    return x + (out if gate is None else out * gate.to(x.dtype)[:, None, :])


def encoder_layer(ops: ComputeBackend, weights: Weights, stack: EncoderStack, i: int, x: torch.Tensor) -> torch.Tensor:
    """Layer ``i`` of the pre-LN encoder ``stack`` (see :meth:`ComputeBackend.pre_ln_encoder`); ``x (N, T, D)``."""
    w = lambda name: weights[f"{stack.layer(i)}.{name}"]  # noqa: E731
    n, t, d = x.shape
    heads = stack.num_heads
    head_dim = d // heads
    h = ops.layer_norm(x, w("ln1.weight"), w("ln1.bias"), stack.eps)
    q = ops.linear(h, w("q.weight"), w("q.bias")).view(n, t, heads, head_dim)
    k = ops.linear(h, w("k.weight"), w("k.bias")).view(n, t, heads, head_dim)
    v = ops.linear(h, w("v.weight"), w("v.bias")).view(n, t, heads, head_dim)
    attn = ops.attention(q, k, v, None, 1.0 / math.sqrt(head_dim))
    x = x + ops.linear(attn, w("o.weight"), w("o.bias"))
    h = ops.layer_norm(x, w("ln2.weight"), w("ln2.bias"), stack.eps)
    h = ops.gelu_tanh(ops.linear(h, w("fc1.weight"), w("fc1.bias")))
    return x + ops.linear(h, w("fc2.weight"), w("fc2.bias"))
