"""OpenVLA (Prismatic, Hugging Face) checkpoint keys and their map onto OpenVLA's canonical weight names.

The model matches a checkpoint with these (``OpenVLAModel.preprocess_checkpoint``); the readers in
``checkpoints/openvla_layout.py`` use them too. ``config`` is an ``OpenVLAConfig``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Iterable

import torch

FEATURIZER = "vision_backbone.featurizer."
FUSED = "vision_backbone.fused_featurizer."
LANGUAGE = "language_model.model."
LM_HEAD = "language_model.lm_head.weight"
_BLOCK = {"norm1": "norm1", "qkv": "attn.qkv", "proj": "attn.proj", "norm2": "norm2", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
_LLAMA = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
          "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
DINO_HEAD_DIM = 64
SIGLIP_HEAD_DIM = 72
LLAMA_HEAD_DIM = 128


def is_openvla_checkpoint(keys: Iterable[str]) -> bool:
    """Whether the tensor names are those of an OpenVLA (Prismatic HF) checkpoint."""
    keys = list(keys)
    return any(k.startswith(FEATURIZER) for k in keys) and any(k.startswith(LANGUAGE) for k in keys)


def canonical_to_hf(config) -> dict[str, str]:
    """Canonical weight name -> Hugging Face OpenVLA key, for every weight the model uses."""
    names: dict[str, str] = {}
    for spec, root in ((config.dino_spec(), FEATURIZER), (config.siglip_spec(), FUSED)):
        p = spec.prefix
        names[f"{p}.patch.weight"] = root + "patch_embed.proj.weight"
        names[f"{p}.patch.bias"] = root + "patch_embed.proj.bias"
        names[f"{p}.pos"] = root + "pos_embed"
        if spec.class_token:
            names[f"{p}.cls"] = root + "cls_token"
        if spec.num_registers:
            names[f"{p}.reg"] = root + "reg_token"
        for i in range(spec.out_layer + 1):
            for short, long in _BLOCK.items():
                for param in ("weight", "bias"):
                    names[f"{p}.blocks.{i}.{short}.{param}"] = f"{root}blocks.{i}.{long}.{param}"
            if spec.layer_scale:
                names[f"{p}.blocks.{i}.ls1"] = f"{root}blocks.{i}.ls1.scale_factor"
                names[f"{p}.blocks.{i}.ls2"] = f"{root}blocks.{i}.ls2.scale_factor"
    for fc in ("fc1", "fc2", "fc3"):
        for param in ("weight", "bias"):
            names[f"projector.{fc}.{param}"] = f"projector.{fc}.{param}"
    names["llm.embed"] = LANGUAGE + "embed_tokens.weight"
    names["llm.norm"] = LANGUAGE + "norm.weight"
    names["llm.lm_head"] = LM_HEAD
    for i in range(config.llm_layers):
        for short, long in _LLAMA.items():
            names[f"llm.layers.{i}.{short}"] = f"{LANGUAGE}layers.{i}.{long}.weight"
        names[f"llm.layers.{i}.attn_norm"] = f"{LANGUAGE}layers.{i}.input_layernorm.weight"
        names[f"llm.layers.{i}.mlp_norm"] = f"{LANGUAGE}layers.{i}.post_attention_layernorm.weight"
    return names


def _is_unused(key: str, config) -> bool:
    """Tensors real checkpoints hold that the model never reads (dead blocks, final norms, MAP head)."""
    for root, out_layer in ((FEATURIZER, config.dino_layers - 2), (FUSED, config.siglip_layers - 2)):
        if not key.startswith(root):
            continue
        rest = key[len(root):]
        if rest.startswith(("norm.", "attn_pool.", "fc_norm.", "head.")) or rest == "mask_token":
            return True
        m = re.match(r"blocks\.(\d+)\.", rest)
        if m and out_layer < int(m.group(1)) < getattr(config, "dino_layers" if root == FEATURIZER else "siglip_layers"):
            return True
    return key.endswith("rotary_emb.inv_freq")


@dataclass
class OpenVLAMatch:
    """``sources``: canonical name -> raw key; ``missing`` canonical names; ``unexpected`` raw keys;
    ``skipped`` raw keys deliberately not loaded."""

    sources: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def match_openvla_keys(raw_keys: Iterable[str], config) -> OpenVLAMatch:
    """Map a checkpoint's raw keys onto the canonical names ``config`` needs (canonical names pass through)."""
    raw_keys = list(raw_keys)
    present = set(raw_keys)
    match = OpenVLAMatch()
    used: set[str] = set()
    for canonical, hf in canonical_to_hf(config).items():
        candidates = [hf, canonical]
        if hf.endswith(".scale_factor"):
            candidates.insert(1, hf.removesuffix(".scale_factor") + ".gamma")
        found = next((c for c in candidates if c in present), None)
        if found is None:
            match.missing.append(f"{hf} ({canonical})")
        else:
            match.sources[canonical] = found
            used.add(found)
    for key in raw_keys:
        if key in used:
            continue
        (match.skipped if _is_unused(key, config) else match.unexpected).append(key)
    return match


def to_canonical_tensor(tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Drop the leading singleton dims of ``cls_token [1,1,D]``, ``reg_token [1,R,D]``, ``pos_embed [1,N,D]``."""
    if tuple(tensor.shape) != tuple(shape) and tensor.numel() == math.prod(shape) and tensor.shape[0] == 1:
        return tensor.reshape(shape)
    return tensor
