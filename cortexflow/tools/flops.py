"""FLOP and minimum-byte counts of a Pi0 / Pi0.5 call per stage, and the roofline floor they imply.

Counts follow ``docs/reference_facts.md#F-PI0-5``: FLOPs = 2 x multiply-accumulates of the linears and of the two
attention products (QK^T and PV, every query head), element-wise work ignored. The prefix holds
``views * num_patches + prompt_len`` *valid* tokens (padding is not useful work); the suffix is the
state token plus the chunk (Pi0) or the chunk alone (Pi0.5). Minimum bytes are the weights a stage
must read once (vision tower + projector; the prefix LLM's layers, not its embedding table; the
expert's layers and heads every step, plus the prefix KV cache it attends to), in ``weight_bytes``
bytes per element. Pi0.5's time-only modulation weights are counted as read every step, as the
engine computes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cortexflow.config import ModelConfig, VLAModelType


@dataclass(frozen=True)
class StageCost:
    """Work of one stage: ``flop`` and ``bytes`` per call, repeated ``repeats`` times (denoising steps).

    ``parts`` splits ``flop`` per call into its pieces (linears, attention, heads, ...)."""

    name: str
    flop: float
    bytes: float
    repeats: int = 1
    parts: dict[str, float] = field(default_factory=dict)

    @property
    def total_flop(self) -> float:
        return self.flop * self.repeats

    @property
    def total_bytes(self) -> float:
        return self.bytes * self.repeats

    def floor_s(self, peak_flops: float, peak_bytes_per_s: float) -> float:
        """Roofline lower bound in seconds: ``repeats * max(flop / peak, bytes / bandwidth)``."""
        return self.repeats * max(self.flop / peak_flops, self.bytes / peak_bytes_per_s)


def _gemma_layer_macs_per_token(config: ModelConfig, width: int, mlp_dim: int) -> int:
    """Multiply-accumulates of one Gemma layer's seven linears for one token."""
    q_dim = config.num_heads * config.head_dim
    kv_dim = config.num_kv_heads * config.head_dim
    return 2 * width * q_dim + 2 * width * kv_dim + 3 * width * mlp_dim


def _gemma_layer_params(config: ModelConfig, width: int, mlp_dim: int, adaptive: bool) -> int:
    """Parameters of one Gemma layer: the linears plus two RMSNorm scales or two modulation Denses."""
    norms = 2 * (3 * width * width + 3 * width) if adaptive else 2 * width
    return _gemma_layer_macs_per_token(config, width, mlp_dim) + norms


def vision_cost(config: ModelConfig, views: int, weight_bytes: int = 2) -> StageCost:
    """SigLIP over ``views`` images plus the projector (one call)."""
    d, m, t = config.vision_encoder_dim, config.vision_mlp_dim, config.num_patches
    tokens = views * t
    patch_in = 3 * config.patch_size**2
    layer_macs = 4 * d * d + 2 * d * m
    parts = {
        "linears": 2.0 * tokens * layer_macs * config.num_vision_layers,
        "attention": 2.0 * (2 * t * t * d) * views * config.num_vision_layers,
        "patch": 2.0 * tokens * patch_in * d,
        "projector": 2.0 * tokens * d * config.encoder_dim,
    }
    layer_params = layer_macs + 4 * d + m + 4 * d  # linears, their biases, two LayerNorms
    params = (
        layer_params * config.num_vision_layers
        + d * patch_in + d  # patch conv
        + t * d  # position embedding
        + 2 * d  # post LayerNorm
        + config.encoder_dim * d + config.encoder_dim  # projector
    )
    return StageCost("vision", sum(parts.values()), float(params * weight_bytes), 1, parts)


def prefix_len(config: ModelConfig, views: int, prompt_len: int) -> int:
    """Valid prefix tokens: ``views * num_patches + prompt_len``."""
    return views * config.num_patches + prompt_len


def prefix_cost(
    config: ModelConfig, views: int, prompt_len: int, weight_bytes: int = 2, last_layer_kv_only: bool = True
) -> StageCost:
    """The Gemma-2B prefix pass over ``views`` images and ``prompt_len`` tokens (one call).

    ``last_layer_kv_only``: the last layer computes K/V only (its output is unused), as the engine does."""
    p = prefix_len(config, views, prompt_len)
    d = config.encoder_dim
    q_dim = config.num_heads * config.head_dim
    kv_dim = config.num_kv_heads * config.head_dim
    layers = config.num_encoder_layers
    full_layers = layers - 1 if last_layer_kv_only else layers
    layer_macs = _gemma_layer_macs_per_token(config, d, config.encoder_mlp_dim)
    parts = {
        "linears": 2.0 * p * layer_macs * full_layers,
        "attention": 2.0 * (2 * p * p * q_dim) * full_layers,
    }
    params = _gemma_layer_params(config, d, config.encoder_mlp_dim, False) * full_layers
    if last_layer_kv_only:
        parts["last_layer_kv"] = 2.0 * p * 2 * d * kv_dim
        params += 2 * d * kv_dim + d  # K, V and the attention norm
    return StageCost("prefix", sum(parts.values()), float(params * weight_bytes), 1, parts)


def expert_cost(
    config: ModelConfig, views: int, prompt_len: int, chunk: int, steps: int, weight_bytes: int = 2
) -> StageCost:
    """One denoising step of the action expert against the prefix KV cache, repeated ``steps`` times."""
    pi05 = config.model_type == VLAModelType.PI05
    d, a = config.decoder_dim, config.action_dim
    p = prefix_len(config, views, prompt_len)
    s = chunk if pi05 else chunk + 1
    q_dim = config.num_heads * config.head_dim
    kv_dim = config.num_kv_heads * config.head_dim
    layers = config.num_decoder_layers
    parts = {
        "linears": 2.0 * s * _gemma_layer_macs_per_token(config, d, config.decoder_mlp_dim) * layers,
        "attention": 2.0 * (2 * s * (p + s) * q_dim) * layers,
    }
    if pi05:
        modulations = 2 * layers + 1
        head_params = (d * a + d) + (a * d + a) + 2 * (d * d + d)  # action in/out, time MLP in/out
        heads_macs = 2 * chunk * d * a + 2 * d * d + modulations * 3 * d * d
        parts["heads"] = 2.0 * heads_macs
        params = _gemma_layer_params(config, d, config.decoder_mlp_dim, True) * layers
        params += head_params + 3 * d * d + 3 * d  # final norm modulation
    else:
        head_params = (d * a + d) + (a * d + a) + (d * a + d) + (2 * d * d + d) + (d * d + d)  # in, out, state, MLP
        heads_macs = chunk * d * a + chunk * 2 * d * d + chunk * d * d + chunk * d * a + d * a
        parts["heads"] = 2.0 * heads_macs
        params = _gemma_layer_params(config, d, config.decoder_mlp_dim, False) * layers + head_params + d
    kv_cache = layers * 2 * p * kv_dim
    step_bytes = float((params + kv_cache) * weight_bytes)
    return StageCost("expert", sum(parts.values()), step_bytes, steps, parts)


def stage_costs(
    config: ModelConfig,
    views: int,
    prompt_len: int,
    chunk: int | None = None,
    steps: int | None = None,
    weight_bytes: int = 2,
    last_layer_kv_only: bool = True,
) -> dict[str, StageCost]:
    """``{"vision", "prefix", "expert"}`` costs of one call (chunk and steps default to the config's)."""
    chunk = config.chunk_size if chunk is None else chunk
    steps = config.num_diffusion_steps if steps is None else steps
    return {
        "vision": vision_cost(config, views, weight_bytes),
        "prefix": prefix_cost(config, views, prompt_len, weight_bytes, last_layer_kv_only),
        "expert": expert_cost(config, views, prompt_len, chunk, steps, weight_bytes),
    }


def floor_ms(costs: dict[str, StageCost], peak_flops: float, peak_bytes_per_s: float) -> float:
    """Sum over stages of ``max(flop / peak, bytes / bandwidth)`` in ms (stages run one after another)."""
    return 1e3 * sum(cost.floor_s(peak_flops, peak_bytes_per_s) for cost in costs.values())
