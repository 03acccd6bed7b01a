"""The ``triton`` backend: the model's ops as fused Triton kernels.

Fused in Triton (``cortexflow/kernels/``): LayerNorm, RMSNorm and adaptive RMSNorm (fp32 statistics,
one pass), split-half RoPE, tanh-GELU and the gated ``gelu(gate) * up`` product, and attention (flash
style: fp32 online softmax, grouped/multi-query KV, boolean mask, never materialising the logits).
The fused units of the op interface (:mod:`cortexflow.ops`) are overridden where a kernel exists: the
expert stack of a denoising step (``triton_decoder.py``; each expert layer one persistent kernel,
``kernels/expert_layer.py``), the SigLIP tower and the Gemma prefix (``triton_encoder.py``: fused projections,
in-place residuals), a token LM's decoder layer and greedy head (``triton_token_decoder.py``: decode GEMVs).
Linears stay on cuBLAS through ``torch.nn.functional.linear`` (bias fused by cuBLASLt); see
``benchmarks/NOTES.md`` for where that leaves time. Shapes a kernel was not written for fall back to the
PyTorch op with a one-time warning naming the op. The fused paths are switched by
:class:`~cortexflow.backends.triton_options.TritonOptions`, never by environment variables.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from cortexflow.backends.pytorch import PyTorchBackend
from cortexflow.backends.triton_options import TritonOptions
from cortexflow.errors import BackendUnavailableError, ConfigError, CortexFlowWarning

try:
    import triton  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised only where triton is absent
    from cortexflow.kernels import TRITON_INSTALL_HINT

    raise BackendUnavailableError(f"the triton backend needs the 'triton' package: {TRITON_INSTALL_HINT}") from err

from cortexflow.backends.triton_decoder import (  # noqa: E402
    euler_step,
    euler_step_unsupported,
    expert_weights_fp8,
    fused_expert_stack,
    persistent_layer_unsupported,
    start_workspace,
    step_tables,
)
from cortexflow.backends.triton_fp8 import (  # noqa: E402
    fp8_layers,
    on_device,
    quantize_layers,
    stream_layers_to_device,
)
from cortexflow.backends.triton_encoder import (  # noqa: E402
    fuse_encoder_weights,
    fused_prefix,
    fused_vision_tower,
    prefix_layers_fused,
    prefix_unsupported,
    vision_stack_fused,
    vision_stack_unsupported,
)
from cortexflow.backends.triton_token_decoder import (  # noqa: E402
    MAX_HEAD_DIM,
    fits_fused_layer,
    fold_norm_weights,
    fuse_layer_projections,
    fused_token_layer,
    fuses_combine,
    greedy_head,
)
from cortexflow.kernels import attention as attention_kernel
from cortexflow.kernels import gelu_gate, layer_norm, rms_norm, rope
from cortexflow.kernels.pdl import pdl_supported
from cortexflow.kernels.runtime import compile_target, compute_capability, interpreting
from cortexflow.quantization.fp8 import FP8_MIN_CAPABILITY, is_fp8

MAX_NORM_WIDTH = 16384


class TritonBackend(PyTorchBackend):
    """PyTorch reference semantics, computed with fused Triton kernels (GPU, or CPU under the interpreter).

    ``options`` (:class:`~cortexflow.backends.triton_options.TritonOptions`, default: the measured best)
    switches the fused paths; :meth:`configured` makes a class with options to pass as ``backend=``."""

    name = "triton"
    supports_guided_decoding = False  # the denoising loop runs on per-step tables over fused expert weights
    _options = TritonOptions()

    def __init__(self, device: torch.device, dtype: torch.dtype, options: TritonOptions | None = None):
        super().__init__(device, dtype)
        # A meta device stands for a GPU while ``cortexflow compile-check`` compiles the kernels for it.
        if self.device.type != "cuda" and not interpreting() and compile_target(self.device) is None:
            raise BackendUnavailableError(
                f"the triton backend runs on a CUDA GPU (asked for device {str(self.device)!r}); use backend='pytorch' "
                "on CPU, or set TRITON_INTERPRET=1 to run the kernels in Triton's (slow) CPU interpreter"
            )
        if options is not None and not isinstance(options, TritonOptions):
            raise ConfigError(f"TritonBackend(options=...) takes a TritonOptions, got {type(options).__name__}")
        self.options = options = self._options if options is None else options
        self._inv_freq: dict[tuple[int, float], torch.Tensor] = {}
        self._per_weights: dict[tuple[int, object], object] = {}
        self._warned: set[str] = set()
        self._side_streams: dict[torch.device, torch.cuda.Stream] = {}
        if options.pdl == "on" and not pdl_supported(self.device):
            raise BackendUnavailableError(
                "TritonOptions.pdl='on' needs a CUDA GPU of compute capability 9.0 or later (Hopper) and no "
                f"Triton interpreter; device {str(self.device)!r} has none: use pdl='auto' or 'off'")
        if options.fp8_stages:
            from cortexflow.quantization.fp8 import fp8_unsupported_reason

            reason = fp8_unsupported_reason(self.device, allow_interpreter=True)
            if reason is not None:
                raise BackendUnavailableError(f"TritonOptions.fp8={options.fp8!r}: {reason}; use fp8='off'")
            if dtype != torch.bfloat16:
                raise ConfigError(f"TritonOptions.fp8={options.fp8!r} runs with bfloat16 activations, got dtype "
                                  f"{dtype}; use dtype='bfloat16' or fp8='off'")
        #: Whether the Triton kernel chains launch with programmatic dependent launch (kernels/pdl.py).
        self.pdl = options.pdl == "on" or (options.pdl == "auto" and pdl_supported(self.device))

    @classmethod
    def configured(cls, options: TritonOptions | None = None, **fields: Any) -> type["TritonBackend"]:
        """A subclass whose default options are ``options`` with ``fields`` replaced (validated here, once),
        to pass as ``backend=`` to the engine factories and tools."""
        base = cls._options if options is None else options
        if not isinstance(base, TritonOptions):
            raise ConfigError(f"TritonBackend.configured(options=...) takes a TritonOptions, got {type(base).__name__}")
        chosen = TritonOptions.from_mapping({**base.as_dict(), **fields}, "TritonBackend.configured")
        return type(cls.__name__, (cls,), {"_options": chosen})

    @classmethod
    def default_options(cls) -> TritonOptions:
        """The options an instance of this class gets without ``options=`` (:meth:`configured`'s choice)."""
        return cls._options

    # ---- weights ------------------------------------------------------------------------------
    def fuse_weights(self, weights, groups):
        """Concatenate Q/K/V and gate/up of every decoder layer (the Pi0 family's expert, a token VLA's LM) and,
        with ``fused_encoder``, SigLIP's Q/K/V and the prefix layers' projections (the originals become views,
        one layer at a time, in place); fold the norm scales of decoder layers that allow it into their fused
        projections when the fused layer runs them (``fold_token_norms``); then make the projections of the
        ``fp8`` stages E4M3 (``triton_fp8.py``). Weights not on this backend's device yet (loaded on the host, as the
        engines do with ``precision="fp8"``) move there one FP8 layer at a time, each fused, folded and quantised
        before the next moves (:func:`~cortexflow.backends.triton_fp8.stream_layers_to_device`), so the device
        never holds the whole model in bfloat16."""
        stages = self.options.fp8_stages
        if "prefix" in stages and groups.encoder_layers and not self.options.fused_encoder:
            raise ConfigError("TritonOptions.fp8 with 'prefix' needs fused_encoder=True (the op-by-op prefix runs "
                              "cuBLAS GEMMs on bf16 weights); set fp8='decoder' or fused_encoder=1")
        foldable = [layer for layer in groups.decoder_layers if layer.foldable_norms and fits_fused_layer(layer.dims)
                    and self.options.fold_token_norms]
        quantised = fp8_layers(groups, stages)
        if quantised and not all(on_device(t, self.device) for t in weights.values()):
            stream_layers_to_device(weights, quantised, self.device,
                                    lambda layer: prepare_fp8_layer(weights, layer, layer in foldable))
        weights = fuse_layer_projections(weights, (layer.prefix for layer in groups.decoder_layers))
        if self.options.fused_encoder:
            weights = fuse_encoder_weights(groups, weights)
        if foldable:
            weights = fold_norm_weights(foldable, weights)
        return quantize_layers(weights, quantised)

    def per_weights(self, weights, key, build):
        """Kept per weights dict and key (the tables of a denoising loop are made on the first call)."""
        full_key = (id(weights), key)
        if full_key not in self._per_weights:
            self._per_weights[full_key] = build()
        return self._per_weights[full_key]

    # ---- fused units --------------------------------------------------------------------------
    def pre_ln_encoder(self, weights, stack, x):
        """The fused SigLIP tower (``triton_encoder.py``) when its weights were fused; else op by op."""
        if not self._encoder_fused(vision_stack_fused(stack, weights),
                                   vision_stack_unsupported(stack, x.shape[-1], MAX_NORM_WIDTH, MAX_HEAD_DIM)):
            return super().pre_ln_encoder(weights, stack, x)
        return fused_vision_tower(weights, stack, x, gelu_epilogue=self.options.vision_gelu == "epilogue")

    def prefix_kv_cache(self, weights, layers, x, positions, mask, room=0):
        """The fused Gemma prefix (``triton_encoder.py``) when its weights were fused; else op by op."""
        if not self._encoder_fused(prefix_layers_fused(layers, weights),
                                   prefix_unsupported(layers, x.shape[-1], MAX_NORM_WIDTH, MAX_HEAD_DIM)):
            return super().prefix_kv_cache(weights, layers, x, positions, mask, room)
        return fused_prefix(self, weights, layers, x, positions, mask, room=room)

    def _encoder_fused(self, fused: bool, unsupported: str | None) -> bool:
        """Whether a fused encoder unit runs: its weights were fused (``fused_encoder``) and its config fits;
        a config it was not written for falls back to the op-by-op composition (whose ops fall back one by
        one) with a one-time warning."""
        if not (self.options.fused_encoder and fused):
            return False
        if unsupported is not None:
            self._fallback("fused vision tower / prefix", unsupported)
            return False
        return True

    def decoder_layer(self, weights, layer, x, positions, mask, cache, write_at):
        """The fused layer (``triton_token_decoder.py``) when the weights were fused for it. E4M3 projection
        weights run only there (the op-by-op composition multiplies in the compute dtype): a ConfigError when
        such a layer cannot run fused."""
        if layer.name("qkv") not in weights or not fits_fused_layer(layer.dims):
            if is_fp8(weights[layer.name("q")]):
                raise ConfigError(f"decoder layer {layer.prefix!r} has FP8 (E4M3) weights but cannot run as the fused "
                                  f"layer (fused weights: {layer.name('qkv') in weights}, head_dim "
                                  f"{layer.dims.head_dim}: even and <= {MAX_HEAD_DIM} needed); quantise only layers "
                                  "that fits_fused_layer accepts, after fuse_layer_projections")
            return super().decoder_layer(weights, layer, x, positions, mask, cache, write_at)
        return fused_token_layer(self, weights, layer, x, positions, mask, cache, write_at,
                                 gemv=self.options.decode_gemv == "all")

    def fuses_combine(self, dims) -> bool:
        """Whether the attention of fused layers with ``dims`` merges its key ranges in the last-arriving
        program: with ``fused_combine="grouped"``, in layers whose query heads share a KV head."""
        return fuses_combine(self, dims)

    def lm_head_argmax(self, h, norm_weight, head, eps, allowed, dims):
        """One row (a decode step or the prefill's last row at batch 1) when the LM's decode steps run GEMVs:
        the final RMSNorm, the LM head (or its ``allowed`` rows) and the rounding to the compute dtype in one
        decode GEMV, then the argmax (``triton_token_decoder.greedy_head``)."""
        if (not self.options.decode_head or h.numel() != h.shape[-1] or self.options.decode_gemv != "all"
                or not fits_fused_layer(dims)):
            return super().lm_head_argmax(h, norm_weight, head, eps, allowed, dims)
        return greedy_head(self, h, norm_weight, head, eps, allowed)

    def table_denoising(self, weights, expert):
        """The denoising loop on per-step tables whenever the expert's projections were fused."""
        return expert.layers[0].name("qkv") in weights

    def begin_denoising(self, weights, expert, conditioning, kv_cache, positions, mask, chunk, num_steps):
        """Adds the RoPE frequencies, whether the expert's Triton kernels launch with programmatic dependent
        launch and, with ``persistent_expert`` (for an expert the kernel was written for), the persistent
        kernel's workspace for ``num_steps`` steps (and with ``expert_launch="step"`` or "euler" the step kernel's
        weight tables, made once per weights). E4M3 expert weights run only in the persistent kernel:
        without it, a ConfigError."""
        persistent = self.options.persistent_expert
        reason = persistent_layer_unsupported(weights, expert) if persistent else None
        if self.table_denoising(weights, expert) and expert_weights_fp8(weights, expert):
            self._check_fp8_expert(persistent, reason)
        ctx = super().begin_denoising(weights, expert, conditioning, kv_cache, positions, mask, chunk, num_steps)
        d = expert.layers[0].dims
        ctx.backend_state["inv_freq"] = self.inverse_frequencies(d.head_dim, d.rope_base, positions.device)
        ctx.backend_state["pdl"] = self.pdl
        if reason is not None:
            self._fallback("persistent expert layer", reason)
            persistent = False
        if persistent:
            ctx.backend_state["workspace"] = start_workspace(ctx, weights, num_steps)
            if self.options.expert_launch in ("step", "euler"):
                ctx.backend_state["step_tables"] = self.per_weights(weights, "expert_step_tables",
                                                                    lambda: step_tables(weights, expert))
        return ctx

    def _check_fp8_expert(self, persistent: bool, reason: str | None) -> None:
        """ConfigError unless E4M3 expert weights can run: in the persistent kernel (``persistent`` and no
        ``reason`` against it) on a device that converts E4M3 (compute capability 8.9 or later, or the CPU
        interpreter)."""
        if not persistent:
            raise ConfigError("FP8 expert weights need TritonOptions(persistent_expert=True): the kernel chain's "
                              "cuBLAS GEMMs take no E4M3 weights")
        if reason is not None:
            raise ConfigError(f"FP8 expert weights run only in the persistent expert kernel, which cannot run this "
                              f"expert: {reason}")
        capability = compute_capability(self.device)
        if capability is not None and capability < FP8_MIN_CAPABILITY:
            raise ConfigError(f"FP8 expert weights need a GPU of compute capability 8.9 or later (Ada, Hopper) to "
                              f"convert E4M3; {str(self.device)!r} has {capability // 10}.{capability % 10}")

    def expert_stack(self, weights, ctx, x, step):
        """Every expert layer of the step as a persistent kernel or a kernel chain (``triton_decoder.py``)."""
        if ctx.expert.layers[0].name("qkv") not in weights:
            return super().expert_stack(weights, ctx, x, step)
        return fused_expert_stack(self, weights, ctx, x, step)

    def denoising_step(self, weights, ctx, path, hidden, x_t, step, dt, guide=None):
        """With ``expert_launch="euler"``, the whole Euler step as one launch (``triton_decoder.euler_step``);
        otherwise, with a ``guide`` (whose velocity correction runs between the head and the update), or where that
        launch cannot run, the composition around :meth:`expert_stack`."""
        if self.options.expert_launch != "euler" or not self.options.persistent_expert or guide is not None:
            return super().denoising_step(weights, ctx, path, hidden, x_t, step, dt, guide)
        reason = euler_step_unsupported(ctx, path)
        if reason is not None:
            self._fallback("Euler step in one launch", reason)
            return super().denoising_step(weights, ctx, path, hidden, x_t, step, dt, guide)
        euler_step(self, weights, ctx, path, hidden, x_t, step, dt)

    def run_concurrently(self, first, second):
        """``(first(), second())``: on a GPU ``first`` runs on a side stream while ``second`` runs on the
        current one, which then waits for the side stream (a fork and a join, so a CUDA graph captures
        both branches). Sequential on CPU or with ``concurrent_stages=False``."""
        if not self.options.concurrent_stages or self.device.type != "cuda":
            return super().run_concurrently(first, second)
        main = torch.cuda.current_stream(self.device)
        side = self._side_streams.get(self.device)
        if side is None:
            side = self._side_streams[self.device] = torch.cuda.Stream(self.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            a = first()
        b = second()
        main.wait_stream(side)
        a.record_stream(main)  # a's memory was allocated on the side stream and is read on this one
        return a, b

    def inverse_frequencies(self, head_dim: int, base: float, device: torch.device) -> torch.Tensor:
        """Cached RoPE ``base ** (-2i/head_dim)`` (fp32)."""
        key = (head_dim, float(base))
        if key not in self._inv_freq:
            self._inv_freq[key] = rope.inverse_frequencies(head_dim, base, device)
        return self._inv_freq[key]

    # ---- ops ----------------------------------------------------------------------------------

    def _fallback(self, op: str, reason: str) -> None:
        if op not in self._warned:
            self._warned.add(op)
            warnings.warn(f"triton backend: {op} falls back to the PyTorch op ({reason})", CortexFlowWarning, stacklevel=3)

    def layer_norm(self, x, weight, bias, eps):
        if x.shape[-1] > MAX_NORM_WIDTH:
            self._fallback("layer_norm", f"width {x.shape[-1]} > {MAX_NORM_WIDTH}")
            return super().layer_norm(x, weight, bias, eps)
        return layer_norm.layer_norm(x, weight, bias, eps)

    def add_layer_norm(self, x, y, weight, bias, eps, scale=None):
        """The residual add in the LayerNorm kernel (``x`` updated in place, no add kernel) when ``x`` is a
        contiguous stream of the same shape and dtype as ``y``; else the default composition."""
        if x.shape[-1] > MAX_NORM_WIDTH or not x.is_contiguous() or y.shape != x.shape or y.dtype != x.dtype:
            return super().add_layer_norm(x, y, weight, bias, eps, scale)
        residual_scale = None if scale is None else scale.to(x.dtype)
        return x, layer_norm.layer_norm(x, weight, bias, eps, residual=y, residual_scale=residual_scale)

    def rms_norm(self, x, weight, eps):
        if x.shape[-1] > MAX_NORM_WIDTH:
            self._fallback("rms_norm", f"width {x.shape[-1]} > {MAX_NORM_WIDTH}")
            return super().rms_norm(x, weight, eps)
        return rms_norm.rms_norm(x, weight, eps)

    def ada_rms_norm(self, x, scale, shift, eps):
        if x.shape[-1] > MAX_NORM_WIDTH or x.dim() != 3:
            self._fallback("ada_rms_norm", f"shape {tuple(x.shape)} (expects (B, L, D), D <= {MAX_NORM_WIDTH})")
            return super().ada_rms_norm(x, scale, shift, eps)
        return rms_norm.rms_norm(x, None, eps, scale, shift)

    def rope(self, x, positions, base):
        return rope.rope(x, positions, self.inverse_frequencies(x.shape[-1], base, x.device))

    def attention(self, q, k, v, mask, scale, fused_combine: bool = False, pdl: bool = False,
                  fresh_row: torch.Tensor | None = None):
        """``fused_combine``: merge the split key ranges in the last-arriving program (the caller checked
        :meth:`fuses_combine`); ``pdl``: launch with programmatic dependent launch (the caller checked ``self.pdl``);
        ``fresh_row``: a decode step's cache row written by the kernel just before, every other row settled
        (:func:`cortexflow.kernels.attention.attention`)."""
        if q.shape[-1] > MAX_HEAD_DIM:
            self._fallback("attention", f"head_dim {q.shape[-1]} > {MAX_HEAD_DIM}")
            return super().attention(q, k, v, mask, scale)
        out = attention_kernel.attention(q, k, v, mask, scale, fused_combine=fused_combine, pdl=pdl,
                                         fresh_row=fresh_row)
        return out.reshape(out.shape[0], out.shape[1], -1)

    def gelu_tanh(self, x):
        return gelu_gate.gelu_tanh(x)

    def gelu_tanh_gate(self, gate, up):
        return gelu_gate.gelu_tanh_gate(gate, up)


def prepare_fp8_layer(weights: dict[str, torch.Tensor], layer, fold: bool) -> None:
    """``layer`` as :meth:`TritonBackend.fuse_weights` leaves an FP8 layer, in place: Q/K/V and gate/up fused, its
    norm scales folded into them (``fold``), its projections E4M3. Every step is idempotent, so the whole-model
    pass after it changes nothing in this layer."""
    fuse_layer_projections(weights, [layer.prefix])
    if fold:
        fold_norm_weights([layer], weights)
    quantize_layers(weights, [layer])
