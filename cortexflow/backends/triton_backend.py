"""The ``triton`` backend: the model's ops as fused Triton kernels.

Fused in Triton (``cortexflow/kernels/``): LayerNorm, RMSNorm and adaptive RMSNorm (fp32 statistics,
one pass), split-half RoPE, tanh-GELU and the gated ``gelu(gate) * up`` product, attention (flash
style: fp32 online softmax, grouped/multi-query KV, boolean mask, never materialising the logits) and
optionally the patch embedding (one implicit-im2col GEMM reading the image directly).
For Pi0 / Pi0.5 the whole denoising loop is a fused stage (``triton_decoder.py``), each expert layer one
persistent kernel (``kernels/expert_layer.py``), and the vision tower and prefix are fused stages too
(``triton_encoder.py``: fused projections, in-place residuals).
Linears stay on cuBLAS through ``torch.nn.functional.linear`` (bias fused by cuBLASLt); see
``benchmarks/NOTES.md`` for where that leaves time. Shapes a kernel was not written for fall back to the
PyTorch op with a one-time warning naming the op.
"""

from __future__ import annotations

import os
import warnings

import torch

from cortexflow.backends.pytorch import PyTorchBackend
from cortexflow.errors import BackendUnavailableError, CortexFlowWarning

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
from cortexflow.kernels import gelu_gate, layer_norm, patch_embed, rms_norm, rope, skinny_gemm
from cortexflow.kernels.decode_gemv import decode_gemv
from cortexflow.kernels.pdl import pdl_supported
from cortexflow.kernels.runtime import compile_target, compute_capability, interpreting
from cortexflow.models.pi0 import Pi0Model
from cortexflow.models.token_decoding import TokenDecodingModel

MAX_NORM_WIDTH = 16384
MAX_HEAD_DIM = 256
#: With skinny GEMMs on, ``linear`` calls of at most this many rows (single-token decode steps) use them.
SKINNY_MAX_ROWS = 64
#: Whether CORTEXFLOW_TRITON_PDL=auto turns programmatic dependent launch on (where supported). H100,
#: one process, 100 calls: OpenVLA 45.18 -> 44.40 ms (decode GEMV for every projection), RT-2 224.0 ->
#: 211.0 ms (benchmarks/results/h100_2026-11-24_v9/).
PDL_DEFAULT = True
#: Default of CORTEXFLOW_TRITON_PERSISTENT_EXPERT. H100, same run, 100 calls, whole predict: Pi0 1/2/3 views
#: 16.74/20.48/24.13 -> 16.17/19.28/22.21 ms, Pi0.5 23.74 -> 20.25 ms (benchmarks/results/h100_2026-11-25_v10/).
PERSISTENT_EXPERT_DEFAULT = "1"
#: Default of CORTEXFLOW_TRITON_EXPERT_PREFETCH (0: no L2 prefetch in the persistent expert layer). H100, Pi0
#: 2 views: 16.45 ms without, 17.0-17.6 ms with any of the variants (h100_2026-11-25_v11/run3_*).
EXPERT_PREFETCH_DEFAULT = "0"
#: Default of CORTEXFLOW_TRITON_ACTION_MLP. H100, two interleaved rounds, Pi0 2 views: fp32 cuBLAS 17.30 / 17.05 ms,
#: bf16 second GEMM 17.34 / 17.14 ms, same final-actions error (h100_2026-11-25_v11/run7_*).
ACTION_MLP_DEFAULT = "fp32"
#: Default of CORTEXFLOW_TRITON_FUSED_ENCODER (the Pi0 family's fused SigLIP tower and Gemma prefix,
#: ``triton_encoder.py``). H100, same run, Pi0 1/2/3 views 15.70/18.81/22.44 -> 14.68/17.57/20.60 ms, Pi0.5
#: 20.72 -> 19.77 ms, same final-actions error (h100_2026-11-25_v11/run6_*).
FUSED_ENCODER_DEFAULT = "1"


class TritonBackend(PyTorchBackend):
    """PyTorch reference semantics, computed with fused Triton kernels (GPU, or CPU under the interpreter)."""

    name = "triton"

    def __init__(self, device: torch.device, dtype: torch.dtype):
        super().__init__(device, dtype)
        # A meta device stands for a GPU while ``cortexflow compile-check`` compiles the kernels for it.
        if self.device.type != "cuda" and not interpreting() and compile_target(self.device) is None:
            raise BackendUnavailableError(
                f"the triton backend runs on a CUDA GPU (asked for device {str(self.device)!r}); use backend='pytorch' "
                "on CPU, or set TRITON_INTERPRET=1 to run the kernels in Triton's (slow) CPU interpreter"
            )
        self._inv_freq: dict[tuple[int, float], torch.Tensor] = {}
        self._time_tables: dict[tuple[int, int], object] = {}
        self._warned: set[str] = set()
        # RMSNorm folded into the expert's QKV and gate/up GEMMs (kernels/norm_linear.py) instead of
        # a norm kernel + cuBLAS. Off by default: on the H100 the folded Triton GEMM took 13-20 us where
        # norm kernel + cuBLAS took 6-8 us (benchmarks/NOTES.md); CORTEXFLOW_TRITON_FOLD_NORMS=1 turns it on.
        self.fold_norms = self._flag("CORTEXFLOW_TRITON_FOLD_NORMS", "0")
        # The expert's GEMMs (QKV, o-proj + residual, gate/up + GELU gate, down + residual, action head +
        # Euler update) and every other ``linear`` of <= SKINNY_MAX_ROWS rows (the token VLAs' decode
        # steps) as split-K Triton GEMMs (kernels/skinny_gemm.py) instead of cuBLAS + epilogue kernels.
        # Off until timed on the GPU: CORTEXFLOW_TRITON_SKINNY_GEMM=1 turns it on.
        # CORTEXFLOW_TRITON_SKINNY_GEMM=mlp_head: only the expert's gate/up + GELU and action head + Euler
        # (one K range each), the two shapes where the kernel beat cuBLAS in the H100 micro-benchmark.
        skinny = self._setting("CORTEXFLOW_TRITON_SKINNY_GEMM", "0", ("0", "1", "mlp_head"))
        self.skinny_gemms = {"0": "off", "1": "all", "mlp_head": "mlp_head"}[skinny]
        # The patch embedding as one Triton implicit-im2col GEMM (kernels/patch_embed.py) instead of
        # cuDNN's convolution. Off until timed on the GPU: CORTEXFLOW_TRITON_PATCH_EMBED=1 turns it on.
        self.patch_embed_kernel = self._flag("CORTEXFLOW_TRITON_PATCH_EMBED", "0")
        # Token VLAs' single-token decode steps as fused decode GEMVs (kernels/decode_gemv.py: norm
        # prologue, residual / gated-activation epilogues) instead of cuBLAS + norm/activation kernels.
        # CORTEXFLOW_TRITON_DECODE_GEMV: "auto" (default: each LM's measured best, ``DecoderLM.decode_gemv``),
        # "1" every projection, "out" only the o and down projections (residual fused), "0" none.
        decode_gemv = self._setting("CORTEXFLOW_TRITON_DECODE_GEMV", "auto", ("auto", "0", "1", "out"))
        self.decode_gemv = {"auto": "auto", "0": "off", "1": "all", "out": "out"}[decode_gemv]
        # Token VLAs' decode GEMV for QKV with RoPE and the KV-cache write in its epilogue
        # (kernels/decode_qkv_rope.py) instead of a QKV GEMV + QKV/RoPE kernel:
        # CORTEXFLOW_TRITON_DECODE_QKV_ROPE=0|1.
        self.decode_qkv_rope = self._flag("CORTEXFLOW_TRITON_DECODE_QKV_ROPE", "1")
        # ... and the final RMSNorm + LM head (or its allowed rows) of a one-row step as one decode GEMV before
        # the argmax, instead of a norm kernel, cuBLAS and an fp32 copy: CORTEXFLOW_TRITON_DECODE_HEAD=0|1.
        self.decode_head = self._flag("CORTEXFLOW_TRITON_DECODE_HEAD", "1")
        # Token VLAs: the RMSNorm weights before QKV and gate/up folded into those weights at load, so a
        # decode step runs no norm kernel (its consumer applies the row statistic).
        # CORTEXFLOW_TRITON_FOLD_TOKEN_NORMS=0 keeps the norm kernels (for A/B runs).
        self.fold_token_norms = self._flag("CORTEXFLOW_TRITON_FOLD_TOKEN_NORMS", "1")
        # The split attention's ranges merged by the last-arriving program (kernels/attention.py) instead of a
        # combine kernel. CORTEXFLOW_TRITON_FUSED_COMBINE: "auto" (default: in the decoder layers of token VLAs
        # whose LM measured faster with it, ``DecoderLM.fused_combine``; Pi0's loop reads the variable at
        # import), "1" every attention call of this backend, "0" none.
        fused_combine = self._setting("CORTEXFLOW_TRITON_FUSED_COMBINE", "auto", ("auto", "0", "1"))
        self.fused_combine = {"auto": None, "0": False, "1": True}[fused_combine]
        # Independent stages on two CUDA streams (OpenVLA's two vision towers): CORTEXFLOW_TRITON_CONCURRENT=0|1.
        self.concurrent_stages = self._flag("CORTEXFLOW_TRITON_CONCURRENT", "1")
        # Chains of Triton kernels with programmatic dependent launch (kernels/pdl.py): each kernel may start
        # while the one before finishes (a GEMV or split-K GEMM loads its first weight tile early). Used
        # by the token VLAs' one-row decode steps and by the Pi0 family's expert layers.
        # CORTEXFLOW_TRITON_PDL: "auto" (default: on where the GPU supports it, compute capability >= 9.0,
        # if PDL_DEFAULT), "1" on (refused on an older GPU), "0" off.
        pdl = self._setting("CORTEXFLOW_TRITON_PDL", "auto", ("auto", "0", "1"))
        if pdl == "1" and not pdl_supported(self.device):
            raise BackendUnavailableError(
                "CORTEXFLOW_TRITON_PDL=1 needs a CUDA GPU of compute capability 9.0 or later (Hopper) and no "
                f"Triton interpreter; device {str(self.device)!r} has none: unset it or set it to 0 or auto")
        self.pdl = pdl == "1" or (pdl == "auto" and PDL_DEFAULT and pdl_supported(self.device))
        self._side_streams: dict[torch.device, torch.cuda.Stream] = {}
        # The Pi0 family's expert layers as one persistent kernel each (kernels/expert_layer.py: seven phases
        # separated by grid barriers) instead of ~10 kernels a layer: CORTEXFLOW_TRITON_PERSISTENT_EXPERT=0|1.
        self.persistent_expert = self._flag("CORTEXFLOW_TRITON_PERSISTENT_EXPERT", PERSISTENT_EXPERT_DEFAULT)
        # ... with bulk L2 prefetches of the weights its later phases (and the next layer) read, issued while
        # HBM would otherwise idle: CORTEXFLOW_TRITON_EXPERT_PREFETCH = a bit mask 0..7 (``ExpertTiling.prefetch``:
        # 1 o/gate-up/down at the attention phase, 2 the same at the QKV phase, 4 the next layer's QKV).
        self.expert_prefetch = int(self._setting("CORTEXFLOW_TRITON_EXPERT_PREFETCH", EXPERT_PREFETCH_DEFAULT,
                                                 tuple(str(v) for v in range(8))))
        capability = compute_capability(self.device)
        if self.expert_prefetch and capability is not None and capability < 90:
            # cp.async.bulk.prefetch.L2 is a Hopper (TMA) instruction: on an older GPU the kernel would not compile.
            raise BackendUnavailableError(
                f"CORTEXFLOW_TRITON_EXPERT_PREFETCH={self.expert_prefetch} needs a GPU of compute capability 9.0 or "
                f"later (Hopper: bulk L2 prefetches); device {str(self.device)!r} is {capability // 10}.{capability % 10}: "
                "unset it or set it to 0")
        # Pi0's time-conditioned action MLP per step: CORTEXFLOW_TRITON_ACTION_MLP=fp32 (cuBLAS fp32 GEMMs, as the
        # reference), bf16 (its second GEMM in the compute dtype) or fused (one fp32 Triton kernel).
        self.action_mlp = self._setting("CORTEXFLOW_TRITON_ACTION_MLP", ACTION_MLP_DEFAULT, ("fp32", "bf16", "fused"))
        # The Pi0 family's vision tower and prefix with fused Q/K/V (and gate/up) GEMMs, in-place residuals and
        # the prefix K/V written by the QKV/RoPE kernel (triton_encoder.py) instead of the model's op-by-op
        # stages: CORTEXFLOW_TRITON_FUSED_ENCODER=0|1.
        self.fused_encoder = self._flag("CORTEXFLOW_TRITON_FUSED_ENCODER", FUSED_ENCODER_DEFAULT)

    @staticmethod
    def _setting(name: str, default: str, choices: tuple[str, ...]) -> str:
        """Environment variable ``name`` (``default`` when unset), refused unless one of ``choices``."""
        value = os.environ.get(name, default)
        if value not in choices:
            allowed = f"{', '.join(choices[:-1])} or {choices[-1]}"
            raise BackendUnavailableError(f"{name} must be {allowed}, got {value!r}")
        return value

    @classmethod
    def _flag(cls, name: str, default: str) -> bool:
        return cls._setting(name, default, ("0", "1")) == "1"

    # ---- stages -------------------------------------------------------------------------------
    def prepare_weights(self, model, weights):
        """Fuse the Q/K/V and gate/up weights (the originals become views): the Pi0 family's expert, and
        every layer of a token VLA's decoder LM (in place, one layer at a time); for a token VLA whose
        layers the fused layer runs, also fold the pre-attention / pre-MLP norm weights into them."""
        if isinstance(model, Pi0Model):
            weights = fuse_expert_weights(model, weights)
            if self.fused_encoder:
                weights = fuse_encoder_weights(model, weights)
        elif isinstance(model, TokenDecodingModel):
            lm = model.lm
            weights = fuse_layer_projections(weights, (f"{lm.prefix}.layers.{i}" for i in range(lm.dims.num_layers)))
            if self.fold_token_norms and self._fused_token_layer_fits(lm):
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
        return fused_token_layer(self, lm, weights, i, x, positions, mask, cache, write_at, gemv=self._gemv_mode(lm))

    def _gemv_mode(self, lm) -> str:
        """Which projections of ``lm``'s one-row steps run as decode GEMVs: "all", "out" or "off"."""
        return lm.decode_gemv if self.decode_gemv == "auto" else self.decode_gemv

    def decoder_lm_next_token(self, lm, weights, h, allowed):
        """Token VLAs, one row (a decode step or the prefill's last row at batch 1) when the LM's decode
        steps run GEMVs: the final RMSNorm, the LM head (or its ``allowed`` rows) and the rounding to the
        compute dtype in one decode GEMV, then the argmax over those logits (the reference's argmax of the
        same rounded values upcast to fp32 picks the same first maximum)."""
        if (not self.decode_head or h.numel() != h.shape[-1] or self._gemv_mode(lm) != "all"
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
        both branches). Sequential on CPU or with CORTEXFLOW_TRITON_CONCURRENT=0."""
        if not self.concurrent_stages or self.device.type != "cuda":
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
        if not (self.fused_encoder and isinstance(model, Pi0Model) and encoder_weights_fused(model, weights)):
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
        persistent = self.persistent_expert
        if persistent:
            reason = persistent_layer_unsupported(model.config)
            if reason is not None:
                self._fallback("persistent expert layer", reason)
                persistent = False
        return fused_decoder(self, model, weights, inputs, self._time_tables[key], fold_norms=self.fold_norms,
                             skinny_gemms=self.skinny_gemms, pdl=self.pdl, persistent=persistent,
                             expert_prefetch=self.expert_prefetch,
                             action_mlp=self.action_mlp)

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

    def linear(self, x, weight, bias=None):
        if self.skinny_gemms != "all" or x.numel() > SKINNY_MAX_ROWS * x.shape[-1]:
            return super().linear(x, weight, bias)
        weight = weight if weight.dtype == x.dtype else weight.to(x.dtype)
        bias = bias if bias is None or bias.dtype == x.dtype else bias.to(x.dtype)
        return skinny_gemm.skinny_linear(x, weight, bias)

    def patch_embed(self, images, weight, bias):
        if not self.patch_embed_kernel:
            return super().patch_embed(images, weight, bias)
        p = weight.shape[-1]
        if images.shape[-2] % p or images.shape[-1] % p or weight.shape[-2] != p:
            self._fallback("patch_embed", f"images {tuple(images.shape[-2:])} do not tile into {p}x{p} patches")
            return super().patch_embed(images, weight, bias)
        return patch_embed.patch_embed(images, weight, bias)

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

    def attention(self, q, k, v, mask, scale, fused_combine: bool | None = None, pdl: bool = False):
        """``fused_combine``: the caller's preference, used when CORTEXFLOW_TRITON_FUSED_COMBINE is auto;
        ``pdl``: launch with programmatic dependent launch (the caller checked ``self.pdl``)."""
        if q.shape[-1] > MAX_HEAD_DIM:
            self._fallback("attention", f"head_dim {q.shape[-1]} > {MAX_HEAD_DIM}")
            return super().attention(q, k, v, mask, scale)
        fused = self.fused_combine if self.fused_combine is not None else fused_combine
        out = attention_kernel.attention(q, k, v, mask, scale, fused_combine=fused, pdl=pdl)
        return out.reshape(out.shape[0], out.shape[1], -1)

    def gelu_tanh(self, x):
        return gelu_gate.gelu_tanh(x)

    def gelu_tanh_gate(self, gate, up):
        return gelu_gate.gelu_tanh_gate(gate, up)
