"""RT-1-X weights from the published Flax checkpoint (``open_x_embodiment/models/rt1.py``, restored there by
``flax.training.checkpoints.restore_checkpoint(path, None)`` into ``{params, batch_stats}``), onto
``RT1Model``'s canonical names (``docs/reference_facts.md#F-RT1-6``). Reading needs msgpack (and
orbax-checkpoint for an Orbax PyTree folder), never flax: see ``flax_checkpoint``.

Flax names (Linen auto-naming: ``<Class>_<n>`` per class inside a compact module, ``name=`` where given):

- ``image_tokenizer/EfficientNetWithFilm_0/``: ``Stem_0/{conv2d, batch_normalization}``; per MBConv
  block ``MBConvBlock_<i>/`` with ``expand_conv2d_0`` (expand ratio != 1), ``depthwise_conv2d``
  (``depthwise_kernel`` ``[k, k, C, 1]``), ``SqueezeExcite_0/{reduce_conv2d_0, expand_conv2d_0}``
  (1x1 convs with bias), ``project_conv2d_0`` and ``batch_normalization_<j>`` numbered in that order;
  ``FilmConditioning_<i>/{Dense_0 (add), Dense_1 (mult)}`` after block ``i``; ``Head_0/{conv2d,
  batch_normalization}``;
- ``image_tokenizer/Conv_0`` (the 1x1 projection), ``image_tokenizer/FilmConditioning_0``,
  ``image_tokenizer/TokenLearnerModuleV11_0/{LayerNorm_0, token_masking/{Dense_0, Dense_1}}``;
- ``Transformer_0/``: ``Dense_0`` (token embedding), ``Dense_1`` (position embedding over the one-hot
  position), ``TransformerBlock_<i>/{LayerNorm_0, MultiHeadDotProductAttention_0/{query, key, value,
  out}, LayerNorm_1, Dense_0, Dense_1, Dense_2}`` (SwiGLU: ``Dense_2(swish(Dense_0 y) * Dense_1 y)``,
  no biases; the linear option has ``Dense_0`` only, no bias), ``Dense_2`` (the vocabulary logits).

Layouts: Dense kernel ``[in, out] -> [out, in]``; Conv ``[kh, kw, in, out] -> [out, in, kh, kw]``;
depthwise ``[kh, kw, C, 1] -> [C, 1, kh, kw]``; attention ``[D, H, Dh] -> [H*Dh, D]``, out
``[H, Dh, D] -> [D, H*Dh]``; BatchNorm ``scale``/``bias`` (params) and ``mean``/``var``
(``batch_stats``) -> ``gamma``/``beta``/``mean``/``var``; LayerNorm ``scale``/``bias``. The input
normalisation is not a variable in Flax (``(x - MEAN_RGB) / STDDEV_RGB`` on [0, 1] images): the converter
writes ImageNet mean and std**2 as ``tokenizer.norm.{mean,variance}`` (with ``input_rescale`` 1). A
linear-FFN checkpoint gets zero ``ff.bias``. Collections other than ``params``/``batch_stats`` (``step``,
optimizer state) are skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from cortexflow.checkpoints.key_problems import RT1CheckpointReport
from cortexflow.checkpoints.layout_transforms import Transform, match_variables
from cortexflow.checkpoints.layout_transforms import conv as _conv
from cortexflow.checkpoints.layout_transforms import dense as _dense
from cortexflow.checkpoints.layout_transforms import depthwise as _depthwise
from cortexflow.checkpoints.layout_transforms import flat as _flat
from cortexflow.checkpoints.layout_transforms import heads_in as _heads_in
from cortexflow.checkpoints.layout_transforms import same as _same
from cortexflow.errors import CheckpointError
from cortexflow.models.rt1 import IMAGENET_MEAN, IMAGENET_STD, RT1Config, RT1Model

PARAMS, STATS = "params/", "batch_stats/"
ANCHOR = "Transformer_0/TransformerBlock_0/MultiHeadDotProductAttention_0/query/kernel"
NET = "image_tokenizer/EfficientNetWithFilm_0/"
TOKEN_LEARNER = "image_tokenizer/TokenLearnerModuleV11_0/"


def orbax_holds_rt1x(location: Path) -> bool:
    """Whether the Orbax tree at ``location`` names RT-1-X's transformer (its metadata only; False when it
    cannot be read, e.g. without orbax-checkpoint)."""
    from cortexflow.checkpoints.orbax_reader import read_leaf_infos

    try:
        names = read_leaf_infos(location)
    except (CheckpointError, ImportError, OSError):
        return False
    return any(name.endswith(ANCHOR) for name in names)


def _bn(out: dict, canonical: str, flax: str) -> None:
    out[f"{canonical}.gamma"] = (PARAMS, f"{flax}/scale", _same)
    out[f"{canonical}.beta"] = (PARAMS, f"{flax}/bias", _same)
    out[f"{canonical}.mean"] = (STATS, f"{flax}/mean", _same)
    out[f"{canonical}.var"] = (STATS, f"{flax}/var", _same)


def _dense_pair(out: dict, canonical: str, flax: str, bias: bool = True) -> None:
    out[f"{canonical}.weight"] = (PARAMS, f"{flax}/kernel", _dense)
    if bias:
        out[f"{canonical}.bias"] = (PARAMS, f"{flax}/bias", _same)


def _film(out: dict, canonical: str, flax: str) -> None:
    _dense_pair(out, f"{canonical}.add", f"{flax}/Dense_0")
    _dense_pair(out, f"{canonical}.mult", f"{flax}/Dense_1")


def flax_variable_map(model: RT1Model) -> dict[str, tuple[str, str, Transform]]:
    """Canonical name -> (collection prefix, Flax path below the RT-1 module, layout map), for every
    weight the checkpoint holds (the input normalisation, and a linear FFN's bias, are not in it)."""
    c = model.config
    out: dict[str, tuple[str, str, Transform]] = {}
    out["tokenizer.stem.conv"] = (PARAMS, f"{NET}Stem_0/conv2d/kernel", _conv)
    _bn(out, "tokenizer.stem.bn", f"{NET}Stem_0/batch_normalization")
    for i, block in enumerate(model.blocks):
        p, f = f"tokenizer.blocks.{i}", f"{NET}MBConvBlock_{i}"
        bn = iter(range(3))
        if block.expand != 1:
            out[f"{p}.expand.conv"] = (PARAMS, f"{f}/expand_conv2d_0/kernel", _conv)
            _bn(out, f"{p}.expand.bn", f"{f}/batch_normalization_{next(bn)}")
        out[f"{p}.dw.conv"] = (PARAMS, f"{f}/depthwise_conv2d/depthwise_kernel", _depthwise)
        _bn(out, f"{p}.dw.bn", f"{f}/batch_normalization_{next(bn)}")
        _dense_pair(out, f"{p}.se.reduce", f"{f}/SqueezeExcite_0/reduce_conv2d_0")
        _dense_pair(out, f"{p}.se.expand", f"{f}/SqueezeExcite_0/expand_conv2d_0")
        out[f"{p}.project.conv"] = (PARAMS, f"{f}/project_conv2d_0/kernel", _conv)
        _bn(out, f"{p}.project.bn", f"{f}/batch_normalization_{next(bn)}")
        _film(out, f"{p}.film", f"{NET}FilmConditioning_{i}")
    out["tokenizer.top.conv"] = (PARAMS, f"{NET}Head_0/conv2d/kernel", _conv)
    _bn(out, "tokenizer.top.bn", f"{NET}Head_0/batch_normalization")
    out["tokenizer.conv1x1"] = (PARAMS, "image_tokenizer/Conv_0/kernel", _conv)
    _film(out, "tokenizer.film", "image_tokenizer/FilmConditioning_0")
    out["token_learner.norm.weight"] = (PARAMS, f"{TOKEN_LEARNER}LayerNorm_0/scale", _same)
    out["token_learner.norm.bias"] = (PARAMS, f"{TOKEN_LEARNER}LayerNorm_0/bias", _same)
    _dense_pair(out, "token_learner.hidden", f"{TOKEN_LEARNER}token_masking/Dense_0")
    _dense_pair(out, "token_learner.output", f"{TOKEN_LEARNER}token_masking/Dense_1")
    _dense_pair(out, "transformer.token_emb", "Transformer_0/Dense_0")
    _dense_pair(out, "transformer.pos_emb", "Transformer_0/Dense_1")
    _dense_pair(out, "transformer.output", "Transformer_0/Dense_2")
    for i in range(c.num_layers):
        p, f = f"transformer.layers.{i}", f"Transformer_0/TransformerBlock_{i}"
        for ln, norm in (("ln1", "LayerNorm_0"), ("ln2", "LayerNorm_1")):
            out[f"{p}.{ln}.weight"] = (PARAMS, f"{f}/{norm}/scale", _same)
            out[f"{p}.{ln}.bias"] = (PARAMS, f"{f}/{norm}/bias", _same)
        attn = f"{f}/MultiHeadDotProductAttention_0"
        for mine, theirs in (("q", "query"), ("k", "key"), ("v", "value")):
            out[f"{p}.{mine}.weight"] = (PARAMS, f"{attn}/{theirs}/kernel", _heads_in)
            out[f"{p}.{mine}.bias"] = (PARAMS, f"{attn}/{theirs}/bias", _flat)
        _dense_pair(out, f"{p}.o", f"{attn}/out")
        if c.ffn == "swiglu":
            for mine, theirs in (("gate", "Dense_0"), ("up", "Dense_1"), ("down", "Dense_2")):
                out[f"{p}.ff.{mine}"] = (PARAMS, f"{f}/{theirs}/kernel", _dense)
        else:
            out[f"{p}.ff.weight"] = (PARAMS, f"{f}/Dense_0/kernel", _dense)
    return out


def constant_weights(model: RT1Model) -> dict[str, torch.Tensor]:
    """The canonical weights the Flax model computes with but does not store: the ImageNet input
    normalisation (mean, std**2) and, for the linear FFN, zero biases."""
    c = model.config
    out = {"tokenizer.norm.mean": torch.tensor(IMAGENET_MEAN, dtype=torch.float32),
           "tokenizer.norm.variance": torch.tensor(IMAGENET_STD, dtype=torch.float32) ** 2}
    if c.ffn == "linear":
        for i in range(c.num_layers):
            out[f"transformer.layers.{i}.ff.bias"] = torch.zeros(c.d_model)
    return out


def module_prefix(names) -> str:
    """The path of the RT-1 module in the ``params`` collection (``params/`` in the released checkpoint)."""
    found = sorted(n[: -len(ANCHOR)] for n in names if n.endswith(ANCHOR))
    if not found:
        raise CheckpointError(f"no RT-1 transformer in this Flax checkpoint (no variable ending in {ANCHOR!r})")
    if len(found) > 1:
        raise CheckpointError(f"several RT-1 networks in this Flax checkpoint: {found}")
    return found[0]


def _stats_prefix(prefix: str) -> str:
    return STATS + (prefix[len(PARAMS):] if prefix.startswith(PARAMS) else prefix)


def full_name(collection: str, prefix: str, rel: str) -> str:
    return (prefix if collection == PARAMS else _stats_prefix(prefix)) + rel


def infer_flax_config(shapes: Mapping[str, tuple[int, ...]], prefix: str, base: RT1Config) -> RT1Config:
    """``base`` with the transformer, TokenLearner and FiLM widths, the FFN kind and the history length read
    from the shapes (the EfficientNet width/depth and the action spec are not inferred)."""
    def shape(rel: str) -> tuple[int, ...]:
        return tuple(shapes[prefix + rel])

    layers = {n[len(prefix + "Transformer_0/"):].split("/")[0] for n in shapes
              if n.startswith(prefix + "Transformer_0/TransformerBlock_")}
    block0 = prefix + "Transformer_0/TransformerBlock_0/"
    swiglu = block0 + "Dense_1/kernel" in shapes
    try:
        d_model, heads, head_dim = shape("Transformer_0/TransformerBlock_0/MultiHeadDotProductAttention_0/query/kernel")
        embedding = shape("Transformer_0/Dense_0/kernel")[0]
        sequence = shape("Transformer_0/Dense_1/kernel")[0]
        context_dim = shape("image_tokenizer/FilmConditioning_0/Dense_0/kernel")[0]
        overrides: dict[str, Any] = dict(
            num_layers=len(layers), d_model=d_model, num_heads=heads, head_dim=head_dim, embedding_dim=embedding,
            context_dim=context_dim, vocab_size=shape("Transformer_0/Dense_2/kernel")[-1],
            num_tokens=shape(TOKEN_LEARNER + "token_masking/Dense_1/kernel")[-1],
            token_learner_dim=shape(TOKEN_LEARNER + "token_masking/Dense_0/kernel")[-1],
            ffn="swiglu" if swiglu else "linear")
        if swiglu:
            overrides["ffn_dim"] = shape("Transformer_0/TransformerBlock_0/Dense_0/kernel")[-1]
    except KeyError as err:
        raise CheckpointError(f"the Flax checkpoint lacks the RT-1 variable {err.args[0]!r}") from err
    config = base.replace(**overrides)
    steps, rest = divmod(sequence, config.tokens_per_step)
    if rest:
        raise CheckpointError(f"position table of {sequence} rows is not a whole number of "
                              f"{config.tokens_per_step}-token steps")
    return config.replace(time_steps=steps)


def match_flax_checkpoint(shapes: Mapping[str, tuple[int, ...]], model: RT1Model, prefix: str,
                          fmt: str = "flax-msgpack") -> tuple[dict[str, tuple[str, Transform]], RT1CheckpointReport]:
    """Canonical name -> (full Flax name, layout map), and the report naming every missing, unexpected and
    mis-shaped variable."""
    report = RT1CheckpointReport(format=fmt, prefix=prefix)
    wanted = model.get_weight_shapes()
    mapping = flax_variable_map(model)
    sources = match_variables(shapes, {name: (full_name(collection, prefix, rel), transform)
                                       for name, (collection, rel, transform) in mapping.items()}, wanted, report)
    used = {full_name(collection, prefix, rel) for collection, rel, _ in mapping.values()}
    ours = (prefix, _stats_prefix(prefix))
    for name in shapes:
        if not name.startswith(ours):
            report.skipped += 1
        elif name not in used:
            report.unexpected.append(name)
    return sources, report


def load_flax_checkpoint(path: str | Path, model_config: "RT1Config | Mapping[str, Any] | None" = None
                         ) -> tuple[RT1Model, dict[str, torch.Tensor], RT1CheckpointReport]:
    """Read an RT-1-X Flax checkpoint into ``(model, fp32 canonical weights on CPU, report)``. The config
    starts from ``model_config`` (an ``RT1Config``) or ``RT1Config.rt1x_jax()``, takes the widths from
    the checkpoint, then field overrides (a mapping ``model_config``)."""
    from cortexflow.checkpoints.flax_checkpoint import read_flax_arrays

    fmt, arrays = read_flax_arrays(path)
    shapes = {name: tuple(np.shape(a)) for name, a in arrays.items()}
    prefix = module_prefix(shapes)
    base = model_config if isinstance(model_config, RT1Config) else RT1Config.rt1x_jax()
    config = infer_flax_config(shapes, prefix, base)
    if isinstance(model_config, Mapping):
        config = config.replace(**model_config)
    model = RT1Model(config)
    sources, report = match_flax_checkpoint(shapes, model, prefix, fmt)
    for name, (full, _) in sources.items():
        if not np.issubdtype(np.asarray(arrays[full]).dtype, np.floating):
            report.wrong_dtype.append(f"{full} {np.asarray(arrays[full]).dtype}")
    report.raise_if_bad(path)
    weights = {name: torch.from_numpy(np.ascontiguousarray(transform(np.asarray(arrays[full])), dtype=np.float32))
               for name, (full, transform) in sources.items()}
    weights.update(constant_weights(model))
    return model, model.preprocess_checkpoint(weights), report
