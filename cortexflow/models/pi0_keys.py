"""Key names of Pi0 / Pi0.5 checkpoints and their map onto CortexFlow's canonical weight names.

Canonical names are short and layout-free (``llm.layers.3.q``, ``vision.layers.0.fc1.weight``). Three
on-disk layouts map onto them:

- ``openpi``: the openpi PyTorch ``model.safetensors`` (``paligemma_with_expert.paligemma.model...``;
  the token embedding is stored once, as ``paligemma_with_expert.paligemma.lm_head.weight``);
- ``lerobot``: the same keys behind a ``model.`` prefix (the embedding may also appear as
  ``...language_model.embed_tokens.weight``, the table LeRobot looks tokens up in);
- ``lerobot-legacy``: LeRobot before Sep 2025, Hugging Face PaliGemma nesting
  (``paligemma.language_model.model.layers...``, ``paligemma.vision_tower...``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from cortexflow.config import ModelConfig, VLAModelType

PALIGEMMA = "paligemma_with_expert.paligemma."
PALIGEMMA_MODEL = PALIGEMMA + "model."
VISION = PALIGEMMA_MODEL + "vision_tower.vision_model."
LANGUAGE = PALIGEMMA_MODEL + "language_model."
EXPERT = "paligemma_with_expert.gemma_expert.model."
EMBEDDING_KEYS = (PALIGEMMA + "lm_head.weight", LANGUAGE + "embed_tokens.weight")
# The token-lookup table each layout's reference reads when a checkpoint stores both: openpi PyTorch
# ties the two and loads ``lm_head`` last; LeRobot looks tokens up in ``embed_tokens``, which wins over
# the copy it makes from ``lm_head``.
LOOKUP_TABLE_KEYS = {
    "openpi": EMBEDDING_KEYS,
    "lerobot": EMBEDDING_KEYS[::-1],
    "lerobot-legacy": EMBEDDING_KEYS[::-1],
}
# Present in real checkpoints but never used for actions: the expert's random LM head and the
# prefix LLM's final norm (prefix hidden states are never read out).
UNUSED_KEYS = ("paligemma_with_expert.gemma_expert.lm_head.weight", LANGUAGE + "norm.weight")

_LEGACY_PREFIXES = (
    (PALIGEMMA + "language_model.model.", LANGUAGE),
    (PALIGEMMA + "language_model.lm_head.", PALIGEMMA + "lm_head."),
    (PALIGEMMA + "vision_tower.", PALIGEMMA_MODEL + "vision_tower."),
    (PALIGEMMA + "multi_modal_projector.", PALIGEMMA_MODEL + "multi_modal_projector."),
)
_LEGACY_MARKERS = tuple(old for old, _ in _LEGACY_PREFIXES)

_VISION_LAYER = {
    "ln1": "layer_norm1",
    "ln2": "layer_norm2",
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.out_proj",
    "fc1": "mlp.fc1",
    "fc2": "mlp.fc2",
}
_GEMMA_LINEARS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
PI0_HEADS = ("state_proj", "action_in_proj", "action_time_mlp_in", "action_time_mlp_out", "action_out_proj")
PI05_HEADS = ("action_in_proj", "time_mlp_in", "time_mlp_out", "action_out_proj")


def canonical_to_openpi(config: ModelConfig) -> dict[str, str]:
    """Canonical weight name -> openpi PyTorch key, for every weight the model uses.

    The embedding maps to its openpi home (``...paligemma.lm_head.weight``)."""
    names: dict[str, str] = {
        "vision.patch.weight": VISION + "embeddings.patch_embedding.weight",
        "vision.patch.bias": VISION + "embeddings.patch_embedding.bias",
        "vision.pos": VISION + "embeddings.position_embedding.weight",
        "vision.post_ln.weight": VISION + "post_layernorm.weight",
        "vision.post_ln.bias": VISION + "post_layernorm.bias",
        "projector.weight": PALIGEMMA_MODEL + "multi_modal_projector.linear.weight",
        "projector.bias": PALIGEMMA_MODEL + "multi_modal_projector.linear.bias",
        "llm.embed": EMBEDDING_KEYS[0],
    }
    for i in range(config.num_vision_layers):
        for short, long in _VISION_LAYER.items():
            for param in ("weight", "bias"):
                names[f"vision.layers.{i}.{short}.{param}"] = f"{VISION}encoder.layers.{i}.{long}.{param}"
    for i in range(config.num_encoder_layers):
        for short, long in _GEMMA_LINEARS.items():
            names[f"llm.layers.{i}.{short}"] = f"{LANGUAGE}layers.{i}.{long}.weight"
        names[f"llm.layers.{i}.attn_norm"] = f"{LANGUAGE}layers.{i}.input_layernorm.weight"
        names[f"llm.layers.{i}.mlp_norm"] = f"{LANGUAGE}layers.{i}.post_attention_layernorm.weight"
    adaptive = config.model_type == VLAModelType.PI05
    for i in range(config.num_decoder_layers):
        for short, long in _GEMMA_LINEARS.items():
            names[f"expert.layers.{i}.{short}"] = f"{EXPERT}layers.{i}.{long}.weight"
        for short, long in (("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm")):
            if adaptive:
                for param in ("weight", "bias"):
                    names[f"expert.layers.{i}.{short}_mod.{param}"] = f"{EXPERT}layers.{i}.{long}.dense.{param}"
            else:
                names[f"expert.layers.{i}.{short}"] = f"{EXPERT}layers.{i}.{long}.weight"
    if adaptive:
        names["expert.norm_mod.weight"] = EXPERT + "norm.dense.weight"
        names["expert.norm_mod.bias"] = EXPERT + "norm.dense.bias"
    else:
        names["expert.norm"] = EXPERT + "norm.weight"
    for head in PI05_HEADS if adaptive else PI0_HEADS:
        for param in ("weight", "bias"):
            names[f"{head}.{param}"] = f"{head}.{param}"
    return names


@dataclass
class LayoutMatch:
    """How the keys of one checkpoint map onto canonical names.

    ``sources`` maps canonical name -> the raw key to read; ``unexpected`` lists raw keys that are
    neither used nor known-unused; ``missing`` lists canonical names with no source; ``skipped`` are
    raw keys deliberately not loaded (the expert LM head, the prefix final norm, a duplicate embedding).
    """

    layout: str
    sources: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def detect_layout(keys: Iterable[str]) -> str:
    """``"openpi"``, ``"lerobot"`` or ``"lerobot-legacy"`` from the key names alone."""
    keys = list(keys)
    prefixed = sum(k.startswith("model.") for k in keys) > len(keys) / 2
    stripped = [k.removeprefix("model.") for k in keys] if prefixed else keys
    if any(k.startswith(_LEGACY_MARKERS) for k in stripped):
        return "lerobot-legacy"
    return "lerobot" if prefixed else "openpi"


def to_openpi_key(raw_key: str, layout: str) -> str:
    """Rewrite one raw key of ``layout`` into its openpi PyTorch spelling."""
    key = raw_key.removeprefix("model.") if layout.startswith("lerobot") else raw_key
    if layout == "lerobot-legacy":
        for old, new in _LEGACY_PREFIXES:
            if key.startswith(old):
                return new + key[len(old):]
    return key


def detect_model_type(keys: Iterable[str]) -> VLAModelType | None:
    """Pi0 vs Pi0.5 from the tensors present: Pi0.5's expert norms carry a ``dense`` modulation layer.

    Returns ``None`` when the keys are not those of a Pi0-family checkpoint."""
    keys = [k.removeprefix("model.") for k in keys]
    if not any(k.startswith("paligemma_with_expert.") for k in keys):
        return None
    if any(k.startswith(EXPERT) and ".input_layernorm.dense." in k for k in keys):
        return VLAModelType.PI05
    return VLAModelType.PI0


def match_keys(raw_keys: Iterable[str], config: ModelConfig) -> LayoutMatch:
    """Map a checkpoint's raw keys onto the canonical names ``config`` needs."""
    raw_keys = list(raw_keys)
    layout = detect_layout(raw_keys)
    by_openpi = {to_openpi_key(k, layout): k for k in raw_keys}
    if config.model_type == VLAModelType.PI0 and "action_time_mlp_in.weight" not in by_openpi:
        # Some LeRobot Pi0 exports name the action-time MLP like Pi0.5's time MLP.
        for param in ("weight", "bias"):
            for stage in ("in", "out"):
                old = f"time_mlp_{stage}.{param}"
                if old in by_openpi:
                    by_openpi[f"action_time_mlp_{stage}.{param}"] = by_openpi.pop(old)
    match = LayoutMatch(layout=layout)
    wanted = canonical_to_openpi(config)
    used: set[str] = set()
    for canonical, openpi_key in wanted.items():
        candidates = LOOKUP_TABLE_KEYS[layout] if canonical == "llm.embed" else (openpi_key,)
        found = [by_openpi[c] for c in candidates if c in by_openpi]
        if found:
            match.sources[canonical] = found[0]
            used.update(found)
            match.skipped.extend(found[1:])
        else:
            match.missing.append(canonical)
    for openpi_key, raw in by_openpi.items():
        if raw in used:
            continue
        if openpi_key in UNUSED_KEYS:
            match.skipped.append(raw)
        else:
            match.unexpected.append(raw)
    return match


def to_checkpoint_keys(weights: dict, config: ModelConfig, layout: str = "openpi") -> dict:
    """Rename canonical weights to an on-disk layout (``openpi`` or ``lerobot``), for writing checkpoints.

    The LeRobot layout stores the embedding as ``...language_model.embed_tokens.weight``."""
    if layout not in ("openpi", "lerobot"):
        raise ValueError(f"cannot write layout {layout!r}; expected 'openpi' or 'lerobot'")
    names = canonical_to_openpi(config)
    out = {}
    for canonical, tensor in weights.items():
        key = names[canonical]
        if layout == "lerobot":
            if canonical == "llm.embed":
                key = EMBEDDING_KEYS[1]
            key = "model." + key
        out[key] = tensor
    return out
