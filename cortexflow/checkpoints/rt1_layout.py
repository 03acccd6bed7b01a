"""RT-1 weights from the published TF2 object checkpoint (``ckpt-N.index`` + ``.data-*``) or a converted
safetensors file, onto ``RT1Model``'s canonical names (``docs/reference_facts.md#F-RT1-7``).

TF names are object-graph paths under the actor network (``agent/_actor_network/`` in the released
checkpoints, found from where ``_transformer/_output_tokens`` sits) with the suffix
``/.ATTRIBUTES/VARIABLE_VALUE``. The EfficientNet is a Keras functional model, so its variables are
named by creation order, ``net/layer_with_weights-N``: 0 the input Normalization, 1-2 the stem conv and
BN, then per MBConv block [expand conv, BN] (expand ratio != 1), depthwise conv, BN, SE reduce, SE
expand, project conv, BN, FiLM; then the top conv and BN. Keras layouts become torch layouts: conv
``[kh, kw, in, out] -> [out, in, kh, kw]``, depthwise ``[kh, kw, C, 1] -> [C, 1, kh, kw]``, Dense
``[in, out] -> [out, in]``, MultiHeadAttention ``[D, H, Dh] -> [H*Dh, D]`` and ``[H, Dh, D] -> [D, H*Dh]``.
Optimizer slots and objects outside the actor network are skipped; the unused ``_action_token_emb``
and the Normalization's ``count`` are read past; any other actor variable not mapped is an error.
"""

from __future__ import annotations

import json
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
from cortexflow.errors import CheckpointError, ConfigError
from cortexflow.models.rt1 import RT1Config, RT1Model

SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
SLOT_MARK = "/.OPTIMIZER_SLOT/"
ANCHOR = "_transformer/_output_tokens/kernel" + SUFFIX
NET = "_image_tokenizer/_tokenizer/net/"
#: Actor variables that exist in the checkpoint but that inference never reads.
UNUSED = ("_action_token_emb/kernel", "_action_token_emb/bias", NET + "layer_with_weights-0/count")




def _bn(out: dict, canonical: str, tf: str) -> None:
    for mine, theirs in (("gamma", "gamma"), ("beta", "beta"), ("mean", "moving_mean"), ("var", "moving_variance")):
        out[f"{canonical}.{mine}"] = (f"{tf}/{theirs}", _same)


def _film(out: dict, canonical: str, tf: str) -> None:
    for part in ("add", "mult"):
        out[f"{canonical}.{part}.weight"] = (f"{tf}/_projection_{part}/kernel", _dense)
        out[f"{canonical}.{part}.bias"] = (f"{tf}/_projection_{part}/bias", _same)


def tf_variable_map(model: RT1Model) -> dict[str, tuple[str, Transform]]:
    """Canonical name -> (TF object path relative to the actor network, without the suffix; layout map)."""
    c = model.config
    out: dict[str, tuple[str, Transform]] = {}
    counter = iter(range(10**6))

    def layer() -> str:
        return f"{NET}layer_with_weights-{next(counter)}"

    norm = layer()
    out["tokenizer.norm.mean"] = (f"{norm}/mean", _same)
    out["tokenizer.norm.variance"] = (f"{norm}/variance", _same)
    out["tokenizer.stem.conv"] = (f"{layer()}/kernel", _conv)
    _bn(out, "tokenizer.stem.bn", layer())
    for i, block in enumerate(model.blocks):
        p = f"tokenizer.blocks.{i}"
        if block.expand != 1:
            out[f"{p}.expand.conv"] = (f"{layer()}/kernel", _conv)
            _bn(out, f"{p}.expand.bn", layer())
        out[f"{p}.dw.conv"] = (f"{layer()}/depthwise_kernel", _depthwise)
        _bn(out, f"{p}.dw.bn", layer())
        for part in ("reduce", "expand"):
            se = layer()
            out[f"{p}.se.{part}.weight"] = (f"{se}/kernel", _dense)
            out[f"{p}.se.{part}.bias"] = (f"{se}/bias", _same)
        out[f"{p}.project.conv"] = (f"{layer()}/kernel", _conv)
        _bn(out, f"{p}.project.bn", layer())
        _film(out, f"{p}.film", layer())
    out["tokenizer.top.conv"] = (f"{layer()}/kernel", _conv)
    _bn(out, "tokenizer.top.bn", layer())
    out["tokenizer.conv1x1"] = ("_image_tokenizer/_tokenizer/conv1x1/kernel", _conv)
    _film(out, "tokenizer.film", "_image_tokenizer/_tokenizer/film_layer")
    tl = "_image_tokenizer/_token_learner"
    out["token_learner.norm.weight"] = (f"{tl}/layernorm/gamma", _same)
    out["token_learner.norm.bias"] = (f"{tl}/layernorm/beta", _same)
    for mine, theirs in (("hidden", "_hidden_layer"), ("output", "_output_layer")):
        out[f"token_learner.{mine}.weight"] = (f"{tl}/mlp/{theirs}/kernel", _dense)
        out[f"token_learner.{mine}.bias"] = (f"{tl}/mlp/{theirs}/bias", _same)
    for mine, theirs in (("token_emb", "_token_emb"), ("pos_emb", "_position_emb"), ("output", "_output_tokens")):
        out[f"transformer.{mine}.weight"] = (f"_transformer/{theirs}/kernel", _dense)
        out[f"transformer.{mine}.bias"] = (f"_transformer/{theirs}/bias", _same)
    for i in range(c.num_layers):
        p, t = f"transformer.layers.{i}", f"_transformer/_layers/{i}"
        for ln in ("1", "2"):
            out[f"{p}.ln{ln}.weight"] = (f"{t}/layernorm{ln}/gamma", _same)
            out[f"{p}.ln{ln}.bias"] = (f"{t}/layernorm{ln}/beta", _same)
        for mine, theirs in (("q", "_query_dense"), ("k", "_key_dense"), ("v", "_value_dense")):
            out[f"{p}.{mine}.weight"] = (f"{t}/mha1/{theirs}/kernel", _heads_in)
            out[f"{p}.{mine}.bias"] = (f"{t}/mha1/{theirs}/bias", _flat)
        out[f"{p}.o.weight"] = (f"{t}/mha1/_output_dense/kernel", _dense)
        out[f"{p}.o.bias"] = (f"{t}/mha1/_output_dense/bias", _same)
        if c.ffn != "linear":
            raise ConfigError("the TF RT-1 checkpoint has a single-linear FFN; ffn='swiglu' is the RT-1-X JAX model")
        out[f"{p}.ff.weight"] = (f"{t}/ff/kernel", _dense)
        out[f"{p}.ff.bias"] = (f"{t}/ff/bias", _same)
    return out


def actor_prefix(names) -> str:
    """The object path of the actor network (``agent/_actor_network/`` in the released checkpoints)."""
    found = sorted(n[: -len(ANCHOR)] for n in names if n.endswith(ANCHOR) and SLOT_MARK not in n)
    if not found:
        raise CheckpointError(f"no RT-1 transformer in this checkpoint (no variable ending in {ANCHOR!r})")
    actors = [p for p in found if "_actor_network" in p] or found
    if len(actors) > 1:
        raise CheckpointError(f"several RT-1 networks in this checkpoint: {actors}")
    return actors[0]


def infer_tf_config(shapes: Mapping[str, tuple[int, ...]], prefix: str, base: RT1Config) -> RT1Config:
    """``base`` with the transformer and tokenizer widths read from the checkpoint's variable shapes."""
    def shape(rel: str) -> tuple[int, ...]:
        return tuple(shapes[prefix + rel + SUFFIX])

    layers = {n[len(prefix + "_transformer/_layers/"):].split("/")[0] for n in shapes
              if n.startswith(prefix + "_transformer/_layers/") and SLOT_MARK not in n}
    try:
        d_model, heads, head_dim = shape("_transformer/_layers/0/mha1/_query_dense/kernel")
        sequence = shape("_transformer/_position_emb/kernel")[0]
        num_tokens = shape("_image_tokenizer/_token_learner/mlp/_output_layer/bias")[0]
        context_dim, embedding = shape("_image_tokenizer/_tokenizer/film_layer/_projection_add/kernel")
        config = base.replace(
            num_layers=len(layers), d_model=d_model, num_heads=heads, head_dim=head_dim,
            vocab_size=shape("_transformer/_output_tokens/bias")[0], num_tokens=num_tokens,
            token_learner_dim=shape("_image_tokenizer/_token_learner/mlp/_hidden_layer/bias")[0],
            context_dim=context_dim, embedding_dim=embedding)
    except KeyError as err:
        raise CheckpointError(f"the checkpoint lacks the RT-1 variable {err.args[0]!r}") from err
    steps, rest = divmod(sequence, config.tokens_per_step)
    if rest:
        raise CheckpointError(f"position table of {sequence} rows is not a whole number of "
                              f"{config.tokens_per_step}-token steps")
    return config.replace(time_steps=steps)


def match_tf_checkpoint(shapes: Mapping[str, tuple[int, ...]], model: RT1Model, prefix: str) -> tuple[
        dict[str, tuple[str, Transform]], RT1CheckpointReport]:
    """Canonical name -> (full TF name, layout map), and the report of missing / unexpected / mis-shaped."""
    report = RT1CheckpointReport(format="tf2-checkpoint", prefix=prefix)
    wanted = model.get_weight_shapes()
    sources = match_variables(shapes, {name: (prefix + rel + SUFFIX, transform)
                                       for name, (rel, transform) in tf_variable_map(model).items()}, wanted, report)
    mapped = [rel for rel, _ in tf_variable_map(model).values()]
    used = {prefix + rel + SUFFIX for rel in (*UNUSED, *mapped)}
    for name in shapes:
        if not name.startswith(prefix) or SLOT_MARK in name:
            report.skipped += 1
        elif name not in used:
            report.unexpected.append(name)
    return sources, report


def load_tf_checkpoint(path: str | Path, model_config: "RT1Config | Mapping[str, Any] | None" = None
                       ) -> tuple[RT1Model, dict[str, torch.Tensor], RT1CheckpointReport]:
    """Read a TF2 RT-1 checkpoint into ``(model, fp32 canonical weights on CPU, report)``."""
    from cortexflow.checkpoints.tf_bundle import TensorBundle

    bundle = TensorBundle(path)
    shapes = {name: entry.shape for name, entry in bundle.entries.items()}
    prefix = actor_prefix(shapes)
    base = model_config if isinstance(model_config, RT1Config) else RT1Config()
    config = infer_tf_config(shapes, prefix, base)
    if isinstance(model_config, Mapping):
        config = config.replace(**model_config)
    model = RT1Model(config)
    sources, report = match_tf_checkpoint(shapes, model, prefix)
    report.raise_if_bad(bundle.prefix)
    weights = {}
    for name, (full, transform) in sources.items():
        array = bundle.read(full)
        if array.dtype != np.float32:
            report.wrong_dtype.append(f"{full} {array.dtype}")
            continue
        weights[name] = torch.from_numpy(np.ascontiguousarray(transform(array)))
    report.raise_if_bad(bundle.prefix)
    return model, weights, report


def load_safetensors(path: Path, model_config: "RT1Config | Mapping[str, Any] | None" = None
                     ) -> tuple[RT1Model, dict[str, torch.Tensor], RT1CheckpointReport]:
    """A converted checkpoint: canonical names in safetensors, the config in ``config.json`` beside it."""
    from cortexflow.checkpoints.files import CheckpointFiles

    files = CheckpointFiles.open(path)
    stored = dict(files.config.get("rt1", {}))
    stored.pop("model_type", None)
    config = model_config if isinstance(model_config, RT1Config) else RT1Config().replace(**stored)
    if isinstance(model_config, Mapping):
        config = config.replace(**model_config)
    model = RT1Model(config)
    raw = {name: files.read(name) for name in files.tensors}
    weights = model.preprocess_checkpoint({k: v.float() for k, v in raw.items()})
    return model, weights, RT1CheckpointReport(format="safetensors")


def load_rt1_checkpoint(path: str | Path, model_config: "RT1Config | Mapping[str, Any] | None" = None
                        ) -> tuple[RT1Model, dict[str, torch.Tensor], RT1CheckpointReport]:
    """Load RT-1 from a TF2 checkpoint (prefix, ``.index`` file or folder), an RT-1-X Flax checkpoint
    (msgpack file, Orbax folder, or a folder of them: see ``rt1x_jax_layout``) or a converted safetensors
    file / folder; returns fp32 CPU weights."""
    from cortexflow.checkpoints.flax_checkpoint import is_flax_checkpoint

    path = Path(path).expanduser()
    if not path.exists() and not Path(f"{path}.index").exists():
        raise CheckpointError(f"checkpoint path {str(path)!r} does not exist")
    is_safetensors = path.suffix == ".safetensors" or (path.is_dir() and any(path.glob("*.safetensors")))
    if is_safetensors:
        return load_safetensors(path, model_config)
    if is_flax_checkpoint(path):
        from cortexflow.checkpoints.rt1x_jax_layout import load_flax_checkpoint

        return load_flax_checkpoint(path, model_config)
    return load_tf_checkpoint(path, model_config)


def is_rt1_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is an RT-1 source checkpoint: a TF2 checkpoint, a Flax msgpack state dict (RT-1-X's
    format), or an Orbax tree whose variable names include RT-1-X's transformer (an openpi ``params/`` tree is
    Orbax too); reads file names, first bytes and the Orbax metadata only."""
    from cortexflow.checkpoints.flax_checkpoint import resolve_flax_checkpoint
    from cortexflow.checkpoints.rt1x_jax_layout import orbax_holds_rt1x
    from cortexflow.checkpoints.tf_bundle import is_tf_checkpoint

    if is_tf_checkpoint(path):
        return True
    try:
        kind, location = resolve_flax_checkpoint(path)
    except (CheckpointError, OSError):
        return False
    return kind == "msgpack" or orbax_holds_rt1x(location)


def is_converted_rt1(path: str | Path) -> bool:
    """Whether ``path`` is a folder (or its ``model.safetensors``) written by :func:`save_converted`: a
    ``config.json`` with an ``"rt1"`` entry beside the safetensors; reads that small file only."""
    path = Path(path).expanduser()
    folder = path.parent if path.suffix == ".safetensors" else path
    config = folder / "config.json"
    if not config.is_file() or not any(folder.glob("*.safetensors")):
        return False
    try:
        return "rt1" in json.loads(config.read_text())
    except (OSError, ValueError, TypeError):
        return False


def save_converted(model: RT1Model, weights: Mapping[str, torch.Tensor], out_dir: str | Path) -> Path:
    """Write ``model.safetensors`` (canonical names, fp32) and ``config.json`` (``{"rt1": config}``)."""
    from safetensors.torch import save_file

    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().contiguous().cpu() for k, v in weights.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({"rt1": model.config.to_dict()}, indent=1))
    return out
