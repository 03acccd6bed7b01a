"""The parameter tree of openpi's JAX Pi0 / Pi0.5 (Orbax ``params/``) and its map onto canonical weights.

Leaf names are ``/``-joined paths below ``params`` (``PaliGemma/llm/layers/attn/q_einsum/w``). Layers are
stacked along a leading axis (vision, LLM and expert alike); dense kernels are (in, out). The action
expert's modules carry the suffix ``_1`` (``q_einsum_1``, ``mlp_1``, ``pre_attention_norm_1``). Each
canonical weight is one slice of one leaf put through one recipe (transpose / head merge), as openpi's
JAX -> PyTorch converter does; ``lora_a`` / ``lora_b`` leaves of openpi's LoRA variants are merged into
their base weight first (:func:`merge_lora_leaves`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from cortexflow.config import ModelConfig, VLAModelType

IMG = "PaliGemma/img/"
BLOCK = IMG + "Transformer/encoderblock/"
ATTN = BLOCK + "MultiHeadDotProductAttention_0/"
LLM = "PaliGemma/llm/"
LAYERS = LLM + "layers/"
UNUSED_LEAVES = (LLM + "final_norm/scale",)  # the prefix LLM's final norm; prefix outputs are never read


@dataclass(frozen=True)
class LeafSlice:
    """Canonical weight = ``recipe(leaf[index])``.

    Recipes (input layout -> output layout): ``copy``; ``T`` (in, out) -> (out, in); ``heads_in``
    (N, D, H) -> (N*H, D); ``heads_out`` (N, H, D) -> (D, N*H); ``vit_in`` (W, N, H) -> (N*H, W);
    ``vit_out`` (N, H, W) -> (W, N*H); ``flat`` -> 1-D; ``patch`` HWIO -> OIHW; ``pos`` (1, P, W) -> (P, W)."""

    leaf: str
    index: tuple[int, ...] = ()
    recipe: str = "copy"


def _apply(recipe: str, a: np.ndarray) -> np.ndarray:
    if recipe == "copy":
        return a
    if recipe == "T":
        return a.T
    if recipe == "heads_in":
        return a.transpose(0, 2, 1).reshape(a.shape[0] * a.shape[2], a.shape[1])
    if recipe == "heads_out":
        return a.transpose(2, 0, 1).reshape(a.shape[2], a.shape[0] * a.shape[1])
    if recipe == "vit_in":
        return a.reshape(a.shape[0], -1).T
    if recipe == "vit_out":
        return a.reshape(-1, a.shape[-1]).T
    if recipe == "flat":
        return a.reshape(-1)
    if recipe == "patch":
        return a.transpose(3, 2, 0, 1)
    if recipe == "pos":
        return a.reshape(a.shape[-2], a.shape[-1])
    raise ValueError(f"unknown recipe {recipe!r}")


def slice_leaf(arrays: Mapping[str, np.ndarray], source: LeafSlice) -> np.ndarray:
    """The canonical-layout array ``source`` describes, contiguous."""
    return np.ascontiguousarray(_apply(source.recipe, arrays[source.leaf][source.index]))


def detect_jax_model_type(leaves) -> VLAModelType | None:
    """Pi0.5 when the expert norms are adaptive (``pre_attention_norm_1/Dense_0``), Pi0 when the tree is a
    PaliGemma-with-expert tree otherwise, ``None`` when it is neither."""
    leaves = set(leaves)
    if not any(name.startswith("PaliGemma/") for name in leaves):
        return None
    if LAYERS + "pre_attention_norm_1/Dense_0/kernel" in leaves:
        return VLAModelType.PI05
    return VLAModelType.PI0


def _gemma_sources(prefix: str, layer: int, suffix: str, names: dict[str, LeafSlice], adaptive: bool) -> None:
    """The seven linears and two norms of one Gemma layer (``suffix`` "" = PaliGemma LLM, "_1" = expert)."""
    attn, mlp = f"{LAYERS}attn/", f"{LAYERS}mlp{suffix}/"
    names[f"{prefix}.layers.{layer}.q"] = LeafSlice(f"{attn}q_einsum{suffix}/w", (layer,), "heads_in")
    names[f"{prefix}.layers.{layer}.k"] = LeafSlice(f"{attn}kv_einsum{suffix}/w", (layer, 0), "heads_in")
    names[f"{prefix}.layers.{layer}.v"] = LeafSlice(f"{attn}kv_einsum{suffix}/w", (layer, 1), "heads_in")
    names[f"{prefix}.layers.{layer}.o"] = LeafSlice(f"{attn}attn_vec_einsum{suffix}/w", (layer,), "heads_out")
    names[f"{prefix}.layers.{layer}.gate"] = LeafSlice(f"{mlp}gating_einsum", (layer, 0), "T")
    names[f"{prefix}.layers.{layer}.up"] = LeafSlice(f"{mlp}gating_einsum", (layer, 1), "T")
    names[f"{prefix}.layers.{layer}.down"] = LeafSlice(f"{mlp}linear", (layer,), "T")
    for short, norm in (("attn_norm", "pre_attention_norm"), ("mlp_norm", "pre_ffw_norm")):
        if adaptive:
            dense = f"{LAYERS}{norm}{suffix}/Dense_0/"
            names[f"{prefix}.layers.{layer}.{short}_mod.weight"] = LeafSlice(dense + "kernel", (layer,), "T")
            names[f"{prefix}.layers.{layer}.{short}_mod.bias"] = LeafSlice(dense + "bias", (layer,))
        else:
            names[f"{prefix}.layers.{layer}.{short}"] = LeafSlice(f"{LAYERS}{norm}{suffix}/scale", (layer,))


def canonical_sources(config: ModelConfig) -> dict[str, LeafSlice]:
    """Canonical weight name -> the leaf slice and recipe it comes from, for every weight of ``config``."""
    names: dict[str, LeafSlice] = {
        "vision.patch.weight": LeafSlice(IMG + "embedding/kernel", (), "patch"),
        "vision.patch.bias": LeafSlice(IMG + "embedding/bias"),
        "vision.pos": LeafSlice(IMG + "pos_embedding", (), "pos"),
        "vision.post_ln.weight": LeafSlice(IMG + "Transformer/encoder_norm/scale"),
        "vision.post_ln.bias": LeafSlice(IMG + "Transformer/encoder_norm/bias"),
        "projector.weight": LeafSlice(IMG + "head/kernel", (), "T"),
        "projector.bias": LeafSlice(IMG + "head/bias"),
        "llm.embed": LeafSlice(LLM + "embedder/input_embedding"),
    }
    for i in range(config.num_vision_layers):
        for short, norm in (("ln1", "LayerNorm_0"), ("ln2", "LayerNorm_1")):
            names[f"vision.layers.{i}.{short}.weight"] = LeafSlice(f"{BLOCK}{norm}/scale", (i,))
            names[f"vision.layers.{i}.{short}.bias"] = LeafSlice(f"{BLOCK}{norm}/bias", (i,))
        for short, proj in (("q", "query"), ("k", "key"), ("v", "value")):
            names[f"vision.layers.{i}.{short}.weight"] = LeafSlice(f"{ATTN}{proj}/kernel", (i,), "vit_in")
            names[f"vision.layers.{i}.{short}.bias"] = LeafSlice(f"{ATTN}{proj}/bias", (i,), "flat")
        names[f"vision.layers.{i}.o.weight"] = LeafSlice(f"{ATTN}out/kernel", (i,), "vit_out")
        names[f"vision.layers.{i}.o.bias"] = LeafSlice(f"{ATTN}out/bias", (i,))
        for short, dense in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
            names[f"vision.layers.{i}.{short}.weight"] = LeafSlice(f"{BLOCK}MlpBlock_0/{dense}/kernel", (i,), "T")
            names[f"vision.layers.{i}.{short}.bias"] = LeafSlice(f"{BLOCK}MlpBlock_0/{dense}/bias", (i,))
    for i in range(config.num_encoder_layers):
        _gemma_sources("llm", i, "", names, adaptive=False)
    adaptive = config.model_type == VLAModelType.PI05
    for i in range(config.num_decoder_layers):
        _gemma_sources("expert", i, "_1", names, adaptive)
    if adaptive:
        names["expert.norm_mod.weight"] = LeafSlice(LLM + "final_norm_1/Dense_0/kernel", (), "T")
        names["expert.norm_mod.bias"] = LeafSlice(LLM + "final_norm_1/Dense_0/bias")
        heads = ("action_in_proj", "time_mlp_in", "time_mlp_out", "action_out_proj")
    else:
        names["expert.norm"] = LeafSlice(LLM + "final_norm_1/scale")
        heads = ("state_proj", "action_in_proj", "action_time_mlp_in", "action_time_mlp_out", "action_out_proj")
    for head in heads:
        names[f"{head}.weight"] = LeafSlice(f"{head}/kernel", (), "T")
        names[f"{head}.bias"] = LeafSlice(f"{head}/bias")
    return names


def expected_leaf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Leaf name -> shape of every leaf the model reads, for the dimensions of ``config``."""
    c = config
    lv, w, hv = c.num_vision_layers, c.vision_encoder_dim, c.num_vision_heads
    dv, p = w // hv, c.patch_size
    n, k, h = c.num_heads, c.num_kv_heads, c.head_dim
    shapes = {
        IMG + "embedding/kernel": (p, p, 3, w),
        IMG + "embedding/bias": (w,),
        IMG + "pos_embedding": (1, c.num_patches, w),
        IMG + "Transformer/encoder_norm/scale": (w,),
        IMG + "Transformer/encoder_norm/bias": (w,),
        IMG + "head/kernel": (w, c.encoder_dim),
        IMG + "head/bias": (c.encoder_dim,),
        LLM + "embedder/input_embedding": (c.vocab_size, c.encoder_dim),
        BLOCK + "MlpBlock_0/Dense_0/kernel": (lv, w, c.vision_mlp_dim),
        BLOCK + "MlpBlock_0/Dense_0/bias": (lv, c.vision_mlp_dim),
        BLOCK + "MlpBlock_0/Dense_1/kernel": (lv, c.vision_mlp_dim, w),
        BLOCK + "MlpBlock_0/Dense_1/bias": (lv, w),
        ATTN + "out/kernel": (lv, hv, dv, w),
        ATTN + "out/bias": (lv, w),
    }
    for norm in ("LayerNorm_0", "LayerNorm_1"):
        shapes[f"{BLOCK}{norm}/scale"] = shapes[f"{BLOCK}{norm}/bias"] = (lv, w)
    for proj in ("query", "key", "value"):
        shapes[f"{ATTN}{proj}/kernel"] = (lv, w, hv, dv)
        shapes[f"{ATTN}{proj}/bias"] = (lv, hv, dv)
    adaptive = c.model_type == VLAModelType.PI05
    for suffix, layers, dim, mlp in (("", c.num_encoder_layers, c.encoder_dim, c.encoder_mlp_dim),
                                     ("_1", c.num_decoder_layers, c.decoder_dim, c.decoder_mlp_dim)):
        shapes[f"{LAYERS}attn/q_einsum{suffix}/w"] = (layers, n, dim, h)
        shapes[f"{LAYERS}attn/kv_einsum{suffix}/w"] = (layers, 2, k, dim, h)
        shapes[f"{LAYERS}attn/attn_vec_einsum{suffix}/w"] = (layers, n, h, dim)
        shapes[f"{LAYERS}mlp{suffix}/gating_einsum"] = (layers, 2, dim, mlp)
        shapes[f"{LAYERS}mlp{suffix}/linear"] = (layers, mlp, dim)
        for norm in ("pre_attention_norm", "pre_ffw_norm"):
            if adaptive and suffix:
                shapes[f"{LAYERS}{norm}{suffix}/Dense_0/kernel"] = (layers, dim, 3 * dim)
                shapes[f"{LAYERS}{norm}{suffix}/Dense_0/bias"] = (layers, 3 * dim)
            else:
                shapes[f"{LAYERS}{norm}{suffix}/scale"] = (layers, dim)
    d = c.decoder_dim
    if adaptive:
        shapes[LLM + "final_norm_1/Dense_0/kernel"] = (d, 3 * d)
        shapes[LLM + "final_norm_1/Dense_0/bias"] = (3 * d,)
        heads = {"action_in_proj": (c.action_dim, d), "time_mlp_in": (d, d), "time_mlp_out": (d, d),
                 "action_out_proj": (d, c.action_dim)}
    else:
        shapes[LLM + "final_norm_1/scale"] = (d,)
        heads = {"state_proj": (c.action_dim, d), "action_in_proj": (c.action_dim, d),
                 "action_time_mlp_in": (2 * d, d), "action_time_mlp_out": (d, d), "action_out_proj": (d, c.action_dim)}
    for head, (fan_in, fan_out) in heads.items():
        shapes[f"{head}/kernel"] = (fan_in, fan_out)
        shapes[f"{head}/bias"] = (fan_out,)
    return shapes


def infer_jax_config(shapes: Mapping[str, tuple[int, ...]], model_type: VLAModelType) -> ModelConfig:
    """The published config of ``model_type`` with every dimension the leaf shapes determine filled in
    (the SigLIP head count included: the query kernel keeps the head axis)."""
    found: dict[str, int] = {}

    def shape(name: str, rank: int) -> tuple[int, ...] | None:
        s = shapes.get(name)
        return tuple(s) if s is not None and len(s) == rank else None

    if s := shape(IMG + "embedding/kernel", 4):
        found["patch_size"], found["vision_encoder_dim"] = s[0], s[3]
    if s := shape(IMG + "pos_embedding", 3):
        side = math.isqrt(s[1])
        if side * side == s[1]:
            found["image_size"] = side * found.get("patch_size", 14)
    if s := shape(BLOCK + "LayerNorm_0/scale", 2):
        found["num_vision_layers"] = s[0]
    if s := shape(ATTN + "query/kernel", 4):
        found["num_vision_heads"] = s[2]
    if s := shape(BLOCK + "MlpBlock_0/Dense_0/kernel", 3):
        found["vision_mlp_dim"] = s[2]
    if s := shape(LLM + "embedder/input_embedding", 2):
        found["vocab_size"], found["encoder_dim"] = s
    if s := shape(LAYERS + "attn/q_einsum/w", 4):
        found["num_encoder_layers"], found["num_heads"], _, found["head_dim"] = s
    if s := shape(LAYERS + "attn/kv_einsum/w", 5):
        found["num_kv_heads"] = s[2]
    if s := shape(LAYERS + "mlp/gating_einsum", 4):
        found["encoder_mlp_dim"] = s[3]
    if s := shape(LAYERS + "attn/q_einsum_1/w", 4):
        found["num_decoder_layers"], found["decoder_dim"] = s[0], s[2]
    if s := shape(LAYERS + "mlp_1/gating_einsum", 4):
        found["decoder_mlp_dim"] = s[3]
    if s := shape("action_in_proj/kernel", 2):
        found["action_dim"] = s[0]
    return ModelConfig.for_model(model_type).replace(**found)


# openpi's LoRA leaves, next to their base weight: (base, lora_a, lora_b, merge rule).
_LORA_ATTN = re.compile(r"^(.*/attn/(?:q_einsum|kv_einsum|attn_vec_einsum)(?:_\d+)?)/lora_([ab])$")
_LORA_MLP = re.compile(r"^(.*/mlp(?:_\d+)?/(?:gating_einsum|linear))_lora_([ab])$")


def lora_pairs(leaves) -> dict[str, tuple[str | None, str | None]]:
    """Base leaf -> (its ``lora_a`` leaf, its ``lora_b`` leaf) for every LoRA leaf in ``leaves``
    (``None`` where one of the pair is absent)."""
    pairs: dict[str, list[str | None]] = {}
    for name in leaves:
        if m := _LORA_ATTN.match(name):
            base = m.group(1) + "/w"
        elif m := _LORA_MLP.match(name):
            base = m.group(1)
        else:
            continue
        pairs.setdefault(base, [None, None])["ab".index(m.group(2))] = name
    return {base: (a, b) for base, (a, b) in pairs.items()}


def lora_shape_problems(base: str, w: tuple, a: tuple, b: tuple) -> str | None:
    """Why LoRA leaves of shapes ``a``, ``b`` cannot update a base of shape ``w`` (``None`` if they can).

    A is ``w`` with its last axis replaced by the rank r; B is ``w`` with its second-to-last axis replaced
    by r (openpi's LoRA axes (-2, -1))."""
    if len(a) != len(w) or len(b) != len(w) or len(w) < 2:
        return f"{base}: LoRA A {list(a)} / B {list(b)} do not have the rank of the weight {list(w)}"
    r = a[-1]
    if a[:-1] != w[:-1] or b != w[:-2] + (r, w[-1]):
        return (f"{base}: LoRA A {list(a)} and B {list(b)} do not fit the weight {list(w)} "
                f"(expected A {list(w[:-1]) + [r]} and B {list(w[:-2]) + [r, w[-1]]})")
    return None


def merge_lora_leaves(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``arrays`` with every openpi LoRA pair folded into its base weight (fp32), LoRA leaves removed.

    Per openpi's LoRA einsums, with s = alpha / rank = 1 (both published variants set alpha = rank; the
    tree does not store alpha): q and kv W'[..] = W + A @ B per head / K-V slot; the FFN the same with no
    scaling term at all; attn_vec sums the head axis in both LoRA einsums, so W'[n] = W[n] + A[n] @ sum_m B[m]."""
    out = dict(arrays)
    for base, (a_name, b_name) in lora_pairs(arrays).items():
        w = out[base].astype(np.float32)
        a, b = arrays[a_name].astype(np.float32), arrays[b_name].astype(np.float32)
        if "/attn_vec_einsum" in base:
            b = np.broadcast_to(b.sum(axis=-3, keepdims=True), b.shape)
        out[base] = w + np.matmul(a, b)
        del out[a_name], out[b_name]
    return out
