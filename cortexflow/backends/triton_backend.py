"""The ``triton`` backend: the model's ops as fused Triton kernels.

Fused in Triton (``cortexflow/kernels/``): LayerNorm, RMSNorm and adaptive RMSNorm (fp32 statistics,
one pass), split-half RoPE, tanh-GELU and the gated ``gelu(gate) * up`` product, and attention (flash
style: fp32 online softmax, grouped/multi-query KV, boolean mask, never materialising the logits).
For Pi0 / Pi0.5 the whole denoising loop is a fused stage (``triton_decoder.py``), each expert layer one
persistent kernel (``kernels/expert_layer.py``), and the vision tower and prefix are fused stages too
(``triton_encoder.py``: fused projections, in-place residuals).
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
    build_time_tables,
    fuse_expert_weights,
    fused_decoder,
    persistent_layer_unsupported,
)
from cortexflow.backends.triton_encoder import (  # noqa: E402
    encoder_weights_fused,
    fuse_encoder_weights,
    fused_encoder_unsupported,
    fused_prefix,
    fused_vision_tower,
)
from cortexflow.backends.triton_token_decoder import (  # noqa: E402
    fold_norm_weights,
    fuse_layer_projections,
    fused_token_layer,
)
from cortexflow.kernels import attention as attention_kernel
from cortexflow.kernels import gelu_gate, layer_norm, rms_norm, rope
from cortexflow.kernels.decode_gemv import decode_gemv
from cortexflow.kernels.pdl import pdl_supported
from cortexflow.kernels.runtime import compile_target, interpreting
from cortexflow.models.pi0 import Pi0Model
from cortexflow.models.token_decoding import TokenDecodingModel

MAX_NORM_WIDTH = 16384
MAX_HEAD_DIM = 256


class TritonBackend(PyTorchBackend):
    """PyTorch reference semantics, computed with fused Triton kernels (GPU, or CPU under the interpreter).

    ``options`` (:class:`~cortexflow.backends.triton_options.TritonOptions`, default: the measured best)
    switches the fused paths; :meth:`configured` makes a class with options to pass as ``backend=``."""

    name = "triton"
    supports_guided_decoding = False  # the Pi0 denoising loop is fused over repacked expert weights
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
        self._time_tables: dict[tuple[int, int], object] = {}
        self._warned: set[str] = set()
        self._side_streams: dict[torch.device, torch.cuda.Stream] = {}
        if options.pdl == "on" and not pdl_supported(self.device):
            raise BackendUnavailableError(
                "TritonOptions.pdl='on' needs a CUDA GPU of compute capability 9.0 or later (Hopper) and no "
                f"Triton interpreter; device {str(self.device)!r} has none: use pdl='auto' or 'off'")
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

    # ---- stages -------------------------------------------------------------------------------
    def prepare_weights(self, model, weights):
        """Fuse the Q/K/V and gate/up weights (the originals become views): the Pi0 family's expert, and
        every layer of a token VLA's decoder LM (in place, one layer at a time); for a token VLA whose
        layers the fused layer runs, also fold the pre-attention / pre-MLP norm weights into them."""
        if isinstance(model, Pi0Model):
            weights = fuse_expert_weights(model, weights)
            if self.options.fused_encoder:
                weights = fuse_encoder_weights(model, weights)
        elif isinstance(model, TokenDecodingModel):
            lm = model.lm
            weights = fuse_layer_projections(weights, (f"{lm.prefix}.layers.{i}" for i in range(lm.dims.num_layers)))
            if self.options.fold_token_norms and self._fused_token_layer_fits(lm):
                weights = fold_norm_weights(lm, weights)
        return weights

    @staticmethod
    def _fused_token_layer_fits(lm) -> bool:
        """Whether the fused token layer's kernels were written for ``lm``'s head size."""
        return lm.dims.head_dim <= MAX_HEAD_DIM and lm.dims.head_dim % 2 == 0

    def decoder_lm_layer(self, lm, weights, i, x, positions, mask, cache, write_at):
        """Token VLAs: the fused layer (``triton_token_decoder.py``) when the weights were fused for it."""
        if f"{lm.prefix}.layers.{i}.qkv" not in weights or not self._fused_token_layer_fits(lm):
            return super().decoder_lm_layer(lm, weights, i, x, positions, mask, cache, write_at)
        return fused_token_layer(self, lm, weights, i, x, positions, mask, cache, write_at,
                                 gemv=self.options.decode_gemv == "all")

    def fuses_combine(self, lm) -> bool:
        """Whether the attention of ``lm``'s fused layers merges its key ranges in the last-arriving program:
        with ``fused_combine="grouped"``, in LMs whose query heads share a KV head."""
        return self.options.fused_combine == "grouped" and lm.dims.num_kv_heads < lm.dims.num_heads

    def decoder_lm_next_token(self, lm, weights, h, allowed):
        """Token VLAs, one row (a decode step or the prefill's last row at batch 1) when the LM's decode
        steps run GEMVs: the final RMSNorm, the LM head (or its ``allowed`` rows) and the rounding to the
        compute dtype in one decode GEMV, then the argmax over those logits (the reference's argmax of the
        same rounded values upcast to fp32 picks the same first maximum)."""
        if (not self.options.decode_head or h.numel() != h.shape[-1] or self.options.decode_gemv != "all"
                or not self._fused_token_layer_fits(lm)):
            return super().decoder_lm_next_token(lm, weights, h, allowed)
        head = lm.lm_head(weights)
        lo = 0
        if allowed is not None:
            lo, hi = allowed
            head = head[lo:hi]
        logits = decode_gemv(h, head, norm_weight=lm.norm_scale(weights, f"{lm.prefix}.norm"),
                             eps=lm.dims.rms_norm_eps, pdl=self.pdl)
        return logits.view(1, -1).argmax(dim=-1) + lo

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

    def _encoder_fused(self, model, weights) -> bool:
        """Whether the fused vision tower / prefix run ``model``; a config they were not written for falls back
        to the op-by-op stages (whose ops fall back one by one) with a one-time warning."""
        if not (self.options.fused_encoder and isinstance(model, Pi0Model) and encoder_weights_fused(model, weights)):
            return False
        reason = fused_encoder_unsupported(model.config, MAX_NORM_WIDTH, MAX_HEAD_DIM)
        if reason is not None:
            self._fallback("fused vision tower / prefix", reason)
            return False
        return True

    def vision_encoder(self, model, weights, inputs):
        """Pi0 family: the fused SigLIP tower (``triton_encoder.py``) and the projector; others: op by op."""
        if not self._encoder_fused(model, weights):
            return super().vision_encoder(model, weights, inputs)
        images = inputs["images"]
        b, views = images.shape[:2]
        tokens = fused_vision_tower(self, model, weights, images.flatten(0, 1))
        tokens = torch.nn.functional.linear(tokens, weights["projector.weight"], weights["projector.bias"])
        return tokens.reshape(b, views * tokens.shape[1], tokens.shape[2])

    def transformer_encoder(self, model, weights, inputs):
        """Pi0 family: the fused Gemma prefix (``triton_encoder.py``); others: op by op."""
        if not self._encoder_fused(model, weights):
            return super().transformer_encoder(model, weights, inputs)
        return fused_prefix(self, model, weights, inputs)

    def transformer_decoder(self, model, weights, inputs):
        """Pi0 family: the fused denoising loop (``triton_decoder.py``); other models: op by op."""
        if not isinstance(model, Pi0Model) or "expert.layers.0.qkv" not in weights:
            return super().transformer_decoder(model, weights, inputs)
        steps = model.config.num_diffusion_steps
        key = (id(weights), steps)
        if key not in self._time_tables:
            self._time_tables[key] = build_time_tables(model, weights, steps)
        persistent = self.options.persistent_expert
        if persistent:
            reason = persistent_layer_unsupported(model.config)
            if reason is not None:
                self._fallback("persistent expert layer", reason)
                persistent = False
        return fused_decoder(self, model, weights, inputs, self._time_tables[key], pdl=self.pdl, persistent=persistent)

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

    def attention(self, q, k, v, mask, scale, fused_combine: bool = False, pdl: bool = False):
        """``fused_combine``: merge the split key ranges in the last-arriving program (the caller checked
        :meth:`fuses_combine`); ``pdl``: launch with programmatic dependent launch (the caller checked ``self.pdl``)."""
        if q.shape[-1] > MAX_HEAD_DIM:
            self._fallback("attention", f"head_dim {q.shape[-1]} > {MAX_HEAD_DIM}")
            return super().attention(q, k, v, mask, scale)
        out = attention_kernel.attention(q, k, v, mask, scale, fused_combine=fused_combine, pdl=pdl)
        return out.reshape(out.shape[0], out.shape[1], -1)

    def gelu_tanh(self, x):
        return gelu_gate.gelu_tanh(x)

    def gelu_tanh_gate(self, gate, up):
        return gelu_gate.gelu_tanh_gate(gate, up)
