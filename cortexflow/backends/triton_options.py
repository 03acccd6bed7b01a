"""``TritonOptions``: the typed switches of the ``triton`` backend, validated once.

Each field turns one fused path of the backend off (or picks its mode); the defaults are the paths that
measured fastest on the H100 (``benchmarks/NOTES.md`` has the A/B runs behind each). Pass them as
``backend=TritonBackend.configured(persistent_expert=False)`` (or ``configured(TritonOptions(...))``), or on
the command line as ``--triton-options persistent_expert=0,pdl=off``. No field is read from the environment.
This module needs neither Triton nor a GPU, so tools and the CLI can validate options anywhere.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from cortexflow.errors import ConfigError

#: Allowed values of the fields that are not booleans.
CHOICES: dict[str, tuple[str, ...]] = {
    "pdl": ("auto", "on", "off"),
    "decode_gemv": ("all", "off"),
    "fused_combine": ("grouped", "off"),
    "preload_decode_keys": ("grouped", "off"),
    "expert_launch": ("layer", "step", "euler"),
    "vision_gelu": ("kernel", "epilogue"),
}

#: The stages whose linear weights ``fp8`` may hold in E4M3: the Gemma prefix of the Pi0 family, and the decoder
#: layers (the Pi0 family's action expert; a token VLA's language model, prefill and decode steps).
FP8_STAGES = ("prefix", "decoder")

_TRUE = ("1", "true", "on", "yes")
_FALSE = ("0", "false", "off", "no")


@dataclass(frozen=True)
class TritonOptions:
    """How the ``triton`` backend computes a model (every field's default is the measured best).

    Pi0 family (flow matching):
    - ``persistent_expert``: each expert layer of a denoising step as one persistent kernel
      (``kernels/expert_layer.py``); False: the chain of ~10 kernels a layer (cuBLAS GEMMs + Triton glue).
    - ``expert_launch``: with ``persistent_expert``, "euler": one launch per Euler step, the action path
      included (action tokens, the layers, final norm, action head, the update of the noisy actions;
      ``kernels/expert_step.py``; on the H100 Pi0 4 % and Pi0.5 2 % faster than "layer": benchmarks/NOTES.md,
      session 28); "step": one launch per denoising step that runs every layer, with ~7 kernels a step around it;
      "layer": one launch per expert layer. A real-time-chunking call, whose guidance changes each velocity,
      runs "step" where "euler" is asked for.
    - ``fused_encoder``: the SigLIP tower and Gemma prefix with fused Q/K/V and gate/up GEMMs, in-place
      residuals and the prefix K/V written by the QKV/RoPE kernel; False: the model's op-by-op stages.
    - ``vision_gelu``: with ``fused_encoder``, where SigLIP's tanh-GELU after fc1 runs: "epilogue": in
      cuBLASLt's epilogue of the fc1 GEMM (``torch._addmm_activation``, the fp32 sum plus bias through tanh-GELU,
      rounded once; one kernel a layer fewer; on the H100 Pi0 0.8 % faster, benchmarks/NOTES.md, session 28);
      "kernel": a Triton kernel over the GEMM's rounded output. CUDA only: elsewhere that operator computes the
      erf GELU, so other devices run the kernel.

    Token VLAs (OpenVLA, RT-2):
    - ``decode_gemv``: "all": every projection of a one-row decode step as a fused decode GEMV (norm
      prologue, residual / gated-activation epilogue); "off": cuBLAS and separate norm / activation kernels.
    - ``decode_qkv_rope``: the QKV decode GEMV applies RoPE and writes the KV cache in its epilogue; False:
      a separate QKV/RoPE kernel after the GEMV.
    - ``decode_head``: the final RMSNorm and LM head of a one-row step as one decode GEMV before the argmax.
    - ``fold_token_norms``: the pre-attention / pre-MLP RMSNorm weights folded into the QKV and gate/up
      weights at load (the projection's consumer applies the row statistic).
    - ``fused_combine``: "grouped": the split attention's key ranges merged by the last-arriving program
      (no combine kernel) in decoder layers whose query heads share a KV head (RT-2's Gemma); "off": a
      combine kernel everywhere. Layers with one KV head per query head (OpenVLA's Llama) never fuse it.
    - ``preload_decode_keys``: with ``pdl``, a decode step's attention loads each key range's first block of
      the cache (every row but the one the step writes) and its mask entries while the QKV/RoPE GEMV before it
      still runs: "grouped": in layers whose query heads share a KV head (RT-2's Gemma: 14 programs; OpenVLA's
      Llama, 160 programs, measured slower with it); "off": after that GEMV has finished, like every other kernel's
      inputs.
    - ``concurrent_stages``: independent stages (OpenVLA's two vision towers) on two CUDA streams.

    Both:
    - ``fp8``: which stages hold their linear weights in FP8 (E4M3, one fp32 scale per output channel, quantised
      once at load; the bf16 weights are released): "off", "all", or stages of :data:`FP8_STAGES` joined by "+"
      ("prefix+decoder"). Weight-only in the memory-bound kernels (the persistent expert layer, decode GEMVs:
      E4M3 converted in the kernel, fp32 sums); E4M3 activations with per-row scales through cuBLASLt
      (``torch._scaled_mm``) in the multi-row GEMMs (the prefix, a token VLA's prefill). Needs a GPU of compute
      capability 8.9 or later (Triton's interpreter runs it for tests). ``precision="fp8"`` in the engine
      factories and ``--precision fp8`` set "decoder" (:data:`~cortexflow.quantization.precision.PRECISION_FP8_STAGES`).
    - ``pdl``: programmatic dependent launch for the Triton kernel chains (decode steps, expert layers):
      "auto" on where the GPU supports it (compute capability >= 9.0), "on" (refused on older GPUs), "off".
    """

    persistent_expert: bool = True
    expert_launch: str = "euler"
    fused_encoder: bool = True
    vision_gelu: str = "epilogue"
    decode_gemv: str = "all"
    decode_qkv_rope: bool = True
    decode_head: bool = True
    fold_token_norms: bool = True
    fused_combine: str = "grouped"
    preload_decode_keys: str = "grouped"
    concurrent_stages: bool = True
    fp8: str = "off"
    pdl: str = "auto"

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "fp8":
                _check_fp8(value)
            elif f.name in CHOICES:
                if value not in CHOICES[f.name]:
                    raise ConfigError(f"TritonOptions.{f.name} must be {_either(CHOICES[f.name])}, got {value!r}")
            elif not isinstance(value, bool):
                raise ConfigError(f"TritonOptions.{f.name} must be True or False, got {value!r}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "TritonOptions") -> "TritonOptions":
        """Options from ``{field: value}``; string values ("0"/"1", "on"/"off", "true"/"false") are converted
        for boolean fields. ``source`` names the interface in errors (an argument or a CLI option)."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ConfigError(f"{source}: unknown Triton option(s) {unknown}; expected {', '.join(names)}")
        converted = {}
        for name, value in values.items():
            if name not in CHOICES and name != "fp8" and isinstance(value, str):
                text = value.strip().lower()
                if text not in _TRUE + _FALSE:
                    raise ConfigError(f"{source}: {name} must be 1 or 0 (on/off, true/false), got {value!r}")
                value = text in _TRUE
            converted[name] = value
        try:
            return cls(**converted)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    @classmethod
    def parse(cls, text: str, source: str = "--triton-options") -> "TritonOptions":
        """Options from ``"name=value,name=value"`` (empty: the defaults)."""
        values = {}
        for item in (part.strip() for part in text.split(",")):
            if not item:
                continue
            name, sep, value = item.partition("=")
            if not sep or not name.strip():
                raise ConfigError(f"{source}: expected NAME=VALUE items separated by commas, got {item!r}")
            values[name.strip()] = value.strip()
        return cls.from_mapping(values, source)

    @property
    def fp8_stages(self) -> frozenset[str]:
        """The stages of :data:`FP8_STAGES` that ``fp8`` names (empty when "off")."""
        if self.fp8 == "off":
            return frozenset()
        if self.fp8 == "all":
            return frozenset(FP8_STAGES)
        return frozenset(self.fp8.split("+"))

    def as_dict(self) -> dict[str, Any]:
        """Every field and its value (what bench / verify / compile-check record in their JSON)."""
        return dataclasses.asdict(self)

    def changed(self) -> dict[str, Any]:
        """The fields that differ from the defaults."""
        default = TritonOptions()
        return {k: v for k, v in self.as_dict().items() if getattr(default, k) != v}


def _check_fp8(value: Any) -> None:
    if not isinstance(value, str):
        raise ConfigError(f"TritonOptions.fp8 must be 'off', 'all' or stages joined by '+', got {value!r}")
    if value in ("off", "all"):
        return
    stages = value.split("+")
    unknown = [s for s in stages if s not in FP8_STAGES]
    if unknown or len(set(stages)) != len(stages):
        raise ConfigError(f"TritonOptions.fp8 must be 'off', 'all' or some of {', '.join(repr(s) for s in FP8_STAGES)} joined by '+' "
                          f"(e.g. 'prefix+decoder'), got {value!r}")


def _either(choices: tuple[str, ...]) -> str:
    return f"{', '.join(repr(c) for c in choices[:-1])} or {choices[-1]!r}"


__all__ = ["CHOICES", "FP8_STAGES", "TritonOptions"]
