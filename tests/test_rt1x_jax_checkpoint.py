"""RT-1-X (JAX / Flax) checkpoints and the RT-1-X configuration (``docs/reference_facts.md#F-RT1-6``).

flax is not installed here, so the fixture is written by this file in flax's own on-disk format: the
variable tree of ``open_x_embodiment/models/rt1.py`` (Linen names, Flax layouts) built with numpy and
serialised as ``flax.serialization.msgpack_serialize`` does (msgpack; ndarray = extension type 1 holding
``msgpack((shape, dtype name, C bytes))``, numpy scalar = type 3). The network is then recomputed from that
tree by a direct NHWC implementation of the Flax model written here, and compared with ``RT1Model``.
"""

from __future__ import annotations

import copy
import json
import math

import msgpack
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cortexflow as cf
from cortexflow.backends.pytorch import PyTorchBackend
from cortexflow.checkpoints.flax_checkpoint import (
    decode_state_dict,
    is_flax_checkpoint,
    read_flax_arrays,
    resolve_flax_checkpoint,
)
from cortexflow.checkpoints.rt1_layout import load_rt1_checkpoint
from cortexflow.checkpoints.rt1x_jax_layout import load_flax_checkpoint
from cortexflow.errors import CheckpointError
from cortexflow.models.efficientnet_film import conv_padding, efficientnet_blocks, round_filters
from cortexflow.models.rt1 import (
    RT1Config,
    RT1Model,
    action_logit_rows,
    detokenize_actions,
    rt1_attention_mask,
)

OPS = PyTorchBackend("cpu", torch.float32)
MEAN_RGB = (0.485, 0.456, 0.406)
STDDEV_RGB = (0.229, 0.224, 0.225)
# What the checkpoint cannot tell (EfficientNet scaling and the image size); the rest is read from it.
SHAPE_FREE = dict(image_size=96, input_size=(96, 96), width=0.2, depth=0.5)
TINY = RT1Config.rt1x_jax(embedding_dim=32, d_model=32, context_dim=16, num_tokens=4, token_learner_dim=8,
                          num_layers=2, num_heads=2, head_dim=8, ffn_dim=24, vocab_size=40, time_steps=3, **SHAPE_FREE)


# ---- the fixture: a Flax RT-1 variable tree and flax's msgpack encoding ---------------------------------
def _ext(obj):
    if isinstance(obj, np.ndarray):
        return msgpack.ExtType(1, msgpack.packb((obj.shape, obj.dtype.name, obj.tobytes("C")), use_bin_type=True))
    if isinstance(obj, np.generic):
        return msgpack.ExtType(3, msgpack.packb(((), obj.dtype.name, np.asarray(obj).tobytes("C")), use_bin_type=True))
    raise TypeError(type(obj))


def flax_msgpack(tree) -> bytes:
    """``flax.serialization.msgpack_serialize`` for trees of dicts, numpy arrays and numpy scalars."""
    return msgpack.packb(tree, default=_ext, strict_types=True)


def _put(tree: dict, path: str, value: np.ndarray) -> None:
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def flax_rt1_variables(config: RT1Config, seed: int = 0, values: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
    """``{"params", "batch_stats", "step"}`` with the Linen names and Flax layouts of ``models/rt1.py`` for
    ``config``, and the canonical torch-layout tensors each leaf must become (written independently of
    the converter's table). ``values=False``: parameters are zero-stride zeros (shapes only, any size)."""
    rng = np.random.default_rng(seed)
    tree: dict = {"params": {}, "batch_stats": {}, "step": np.int64(900000)}
    expected: dict[str, np.ndarray] = {}

    def param(path, shape, scale=None, offset=0.0):
        fan_in = math.prod(shape[:-1]) if len(shape) > 1 else 1
        scale = scale if scale is not None else 1 / math.sqrt(fan_in)
        if not values:
            value = np.broadcast_to(np.float32(offset), shape)
        else:
            value = (offset + rng.standard_normal(shape) * scale).astype(np.float32)
        _put(tree["params"], path, value)
        return value

    def conv(canonical, path, shape):
        expected[canonical] = param(path + "/kernel", shape).transpose(3, 2, 0, 1)

    def dense(canonical, path, n_in, n_out, bias=True, scale=None):
        expected[canonical + (".weight" if bias else "")] = param(path + "/kernel", (n_in, n_out), scale).T
        if bias:
            expected[canonical + ".bias"] = param(path + "/bias", (n_out,), 0.1)

    def bn(canonical, path, channels):
        expected[canonical + ".gamma"] = param(path + "/scale", (channels,), 0.2, offset=1.0)
        expected[canonical + ".beta"] = param(path + "/bias", (channels,), 0.1)
        mean = (0.1 * rng.standard_normal(channels)).astype(np.float32)
        var = (0.5 + rng.random(channels)).astype(np.float32)
        _put(tree["batch_stats"], path + "/mean", mean)
        _put(tree["batch_stats"], path + "/var", var)
        expected[canonical + ".mean"], expected[canonical + ".var"] = mean, var

    def film(canonical, path, channels):
        dense(canonical + ".add", path + "/Dense_0", config.context_dim, channels, scale=0.25)
        dense(canonical + ".mult", path + "/Dense_1", config.context_dim, channels, scale=0.25)

    net = "image_tokenizer/EfficientNetWithFilm_0"
    stem = round_filters(32, config.width)
    conv("tokenizer.stem.conv", f"{net}/Stem_0/conv2d", (3, 3, 3, stem))
    bn("tokenizer.stem.bn", f"{net}/Stem_0/batch_normalization", stem)
    blocks = efficientnet_blocks(config.width, config.depth)
    for i, b in enumerate(blocks):
        p, f = f"tokenizer.blocks.{i}", f"{net}/MBConvBlock_{i}"
        filters, n = b.filters_in * b.expand, 0
        if b.expand != 1:
            conv(f"{p}.expand.conv", f"{f}/expand_conv2d_0", (1, 1, b.filters_in, filters))
            bn(f"{p}.expand.bn", f"{f}/batch_normalization_{n}", filters)
            n += 1
        expected[f"{p}.dw.conv"] = param(f"{f}/depthwise_conv2d/depthwise_kernel",
                                         (b.kernel, b.kernel, filters, 1), 1 / b.kernel).transpose(2, 3, 0, 1)
        bn(f"{p}.dw.bn", f"{f}/batch_normalization_{n}", filters)
        se = max(1, int(b.filters_in * 0.25))
        for part, shape in (("reduce", (1, 1, filters, se)), ("expand", (1, 1, se, filters))):
            expected[f"{p}.se.{part}.weight"] = param(f"{f}/SqueezeExcite_0/{part}_conv2d_0/kernel", shape)[0, 0].T
            expected[f"{p}.se.{part}.bias"] = param(f"{f}/SqueezeExcite_0/{part}_conv2d_0/bias", (shape[-1],), 0.1)
        conv(f"{p}.project.conv", f"{f}/project_conv2d_0", (1, 1, filters, b.filters_out))
        bn(f"{p}.project.bn", f"{f}/batch_normalization_{n + 1}", b.filters_out)
        film(f"{p}.film", f"{net}/FilmConditioning_{i}", b.filters_out)
    top = round_filters(1280, config.width)
    conv("tokenizer.top.conv", f"{net}/Head_0/conv2d", (1, 1, blocks[-1].filters_out, top))
    bn("tokenizer.top.bn", f"{net}/Head_0/batch_normalization", top)
    conv("tokenizer.conv1x1", "image_tokenizer/Conv_0", (1, 1, top, config.embedding_dim))
    film("tokenizer.film", "image_tokenizer/FilmConditioning_0", config.embedding_dim)
    tl = "image_tokenizer/TokenLearnerModuleV11_0"
    expected["token_learner.norm.weight"] = param(f"{tl}/LayerNorm_0/scale", (config.embedding_dim,), 0.2, offset=1.0)
    expected["token_learner.norm.bias"] = param(f"{tl}/LayerNorm_0/bias", (config.embedding_dim,), 0.1)
    dense("token_learner.hidden", f"{tl}/token_masking/Dense_0", config.embedding_dim, config.token_learner_dim)
    dense("token_learner.output", f"{tl}/token_masking/Dense_1", config.token_learner_dim, config.num_tokens)
    d, inner = config.d_model, config.num_heads * config.head_dim
    dense("transformer.token_emb", "Transformer_0/Dense_0", config.embedding_dim, d)
    dense("transformer.pos_emb", "Transformer_0/Dense_1", config.sequence_length, d, scale=0.5)
    for i in range(config.num_layers):
        p, f = f"transformer.layers.{i}", f"Transformer_0/TransformerBlock_{i}"
        for ln, norm in (("ln1", "LayerNorm_0"), ("ln2", "LayerNorm_1")):
            expected[f"{p}.{ln}.weight"] = param(f"{f}/{norm}/scale", (d,), 0.2, offset=1.0)
            expected[f"{p}.{ln}.bias"] = param(f"{f}/{norm}/bias", (d,), 0.1)
        attn = f"{f}/MultiHeadDotProductAttention_0"
        for mine, theirs in (("q", "query"), ("k", "key"), ("v", "value")):
            expected[f"{p}.{mine}.weight"] = param(f"{attn}/{theirs}/kernel", (d, config.num_heads, config.head_dim),
                                                   1 / math.sqrt(d)).reshape(d, inner).T
            expected[f"{p}.{mine}.bias"] = param(f"{attn}/{theirs}/bias", (config.num_heads, config.head_dim),
                                                 0.1).reshape(inner)
        expected[f"{p}.o.weight"] = param(f"{attn}/out/kernel", (config.num_heads, config.head_dim, d)).reshape(inner, d).T
        expected[f"{p}.o.bias"] = param(f"{attn}/out/bias", (d,), 0.1)
        for mine, theirs, shape in (("gate", "Dense_0", (d, config.ffn_dim)), ("up", "Dense_1", (d, config.ffn_dim)),
                                    ("down", "Dense_2", (config.ffn_dim, d))):
            expected[f"{p}.ff.{mine}"] = param(f"{f}/{theirs}/kernel", shape).T
    dense("transformer.output", "Transformer_0/Dense_2", d, config.vocab_size)
    expected["tokenizer.norm.mean"] = np.array(MEAN_RGB, np.float32)
    expected["tokenizer.norm.variance"] = np.array(STDDEV_RGB, np.float32) ** 2
    return tree, expected


def _leaf(tree: dict, path: str):
    for part in path.split("/"):
        tree = tree[part]
    return tree


def _drop(tree: dict, path: str) -> None:
    *parents, leaf = path.split("/")
    del _leaf(tree, "/".join(parents))[leaf]


@pytest.fixture(scope="module")
def fixture_tree():
    return flax_rt1_variables(TINY)


@pytest.fixture()
def checkpoint_dir(tmp_path, fixture_tree):
    """The published layout: ``rt_1_x_jax/<run>/checkpoint`` (Orbax-aggregated msgpack file)."""
    run = tmp_path / "rt_1_x_jax" / "b321733791_75882326_000900000"
    run.mkdir(parents=True)
    (run / "checkpoint").write_bytes(flax_msgpack(fixture_tree[0]))
    return tmp_path / "rt_1_x_jax"


# ---- a direct implementation of the Flax RT-1 forward (NHWC, Flax names), float64 -----------------------
def _t(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


def _same_conv(x, kernel, stride, depthwise=False):
    """``nn.Conv(padding='SAME')`` of NHWC ``x`` by an HWIO kernel (depthwise: ``[k, k, C, 1]``)."""
    k = kernel.shape[0]
    pads = []
    for n in x.shape[1:3]:
        total = max((-(-n // stride) - 1) * stride + k - n, 0)
        pads.append((total // 2, total - total // 2))
    xp = F.pad(x.permute(0, 3, 1, 2), (pads[1][0], pads[1][1], pads[0][0], pads[0][1]))
    w = _t(kernel).permute(2, 3, 0, 1) if depthwise else _t(kernel).permute(3, 2, 0, 1)
    y = F.conv2d(xp, w, stride=stride, groups=x.shape[-1] if depthwise else 1)
    return y.permute(0, 2, 3, 1)


def _bn(x, params, stats):
    return (x - _t(stats["mean"])) / torch.sqrt(_t(stats["var"]) + 1e-3) * _t(params["scale"]) + _t(params["bias"])


def _swish(x):
    return x * torch.sigmoid(x)


def _dense(x, p, bias=True):
    y = x @ _t(p["kernel"])
    return y + _t(p["bias"]) if bias else y


def _film(x, p, context):
    add, mult = _dense(context, p["Dense_0"]), _dense(context, p["Dense_1"])
    return (1 + mult[:, None, None, :]) * x + add[:, None, None, :]


def _layer_norm(x, p):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-6) * _t(p["scale"]) + _t(p["bias"])


def flax_image_tokens(variables, config, images, context):
    """``ImageTokenizer``: images ``(B, H, W, 3)`` in [0, 1] at 300x300-equivalent size, context ``(B, Dc)``."""
    params = variables["params"]["image_tokenizer"]
    stats = variables["batch_stats"]["image_tokenizer"]["EfficientNetWithFilm_0"]
    net = params["EfficientNetWithFilm_0"]
    x = (_t(images) - _t(MEAN_RGB)) / _t(STDDEV_RGB)
    x = _swish(_bn(_same_conv(x, net["Stem_0"]["conv2d"]["kernel"], 2), net["Stem_0"]["batch_normalization"],
                   stats["Stem_0"]["batch_normalization"]))
    for i, b in enumerate(efficientnet_blocks(config.width, config.depth)):
        p, s = net[f"MBConvBlock_{i}"], stats[f"MBConvBlock_{i}"]
        h, n = x, 0
        if b.expand != 1:
            h = _swish(_bn(_same_conv(h, p["expand_conv2d_0"]["kernel"], 1), p["batch_normalization_0"],
                           s["batch_normalization_0"]))
            n = 1
        h = _same_conv(h, p["depthwise_conv2d"]["depthwise_kernel"], b.stride, depthwise=True)
        h = _swish(_bn(h, p[f"batch_normalization_{n}"], s[f"batch_normalization_{n}"]))
        se = h.mean(dim=(1, 2), keepdim=True)
        se = _swish(_same_conv(se, p["SqueezeExcite_0"]["reduce_conv2d_0"]["kernel"], 1)
                    + _t(p["SqueezeExcite_0"]["reduce_conv2d_0"]["bias"]))
        se = torch.sigmoid(_same_conv(se, p["SqueezeExcite_0"]["expand_conv2d_0"]["kernel"], 1)
                           + _t(p["SqueezeExcite_0"]["expand_conv2d_0"]["bias"]))
        h = _bn(_same_conv(h * se, p["project_conv2d_0"]["kernel"], 1), p[f"batch_normalization_{n + 1}"],
                s[f"batch_normalization_{n + 1}"])
        if b.stride == 1 and b.filters_in == b.filters_out:
            h = h + x
        x = _film(h, net[f"FilmConditioning_{i}"], context)
    x = _swish(_bn(_same_conv(x, net["Head_0"]["conv2d"]["kernel"], 1), net["Head_0"]["batch_normalization"],
                   stats["Head_0"]["batch_normalization"]))
    x = _film(_same_conv(x, params["Conv_0"]["kernel"], 1), params["FilmConditioning_0"], context)
    tl = params["TokenLearnerModuleV11_0"]
    feats = x.reshape(x.shape[0], -1, x.shape[-1])
    hidden = F.gelu(_dense(_layer_norm(feats, tl["LayerNorm_0"]), tl["token_masking"]["Dense_0"]), approximate="tanh")
    selected = torch.softmax(_dense(hidden, tl["token_masking"]["Dense_1"]).transpose(1, 2), dim=-1)
    return selected @ feats, x.shape[1:3]


def flax_attention_mask(config) -> torch.Tensor:
    """``RT1._construct_attn_mask`` with ``include_prev_timesteps_actions=False``, written as its loops."""
    n, a = config.num_tokens, config.num_action_tokens
    length = config.time_steps * (n + a)

    def action_index(k):
        return -1 if k % (n + a) < n else k // (n + a)

    allowed = torch.zeros(length, length, dtype=torch.bool)
    for i in range(length):
        for j in range(i + 1):
            ai, aj = action_index(i), action_index(j)
            masked = (ai != -1 and aj != -1 and (aj < ai or (aj == ai and j <= i))) or (ai == -1 and aj != -1 and j < i)
            allowed[i, j] = not masked
    return allowed


def flax_action_logits(variables, config, image_tokens):
    """``Transformer`` on ``T`` steps of [image tokens, zero action tokens], the last step's logits at
    positions ``[N - 1 : -1]``: ``image_tokens (T, N, E)`` -> ``(A, V)``."""
    p = variables["params"]["Transformer_0"]
    a = config.num_action_tokens
    steps = image_tokens.shape[0]
    tokens = torch.cat([image_tokens, torch.zeros(steps, a, image_tokens.shape[-1], dtype=torch.float64)], 1)
    x = tokens.reshape(1, -1, tokens.shape[-1])
    length = x.shape[1]
    x = _dense(x, p["Dense_0"]) + _dense(torch.eye(length, dtype=torch.float64)[None], p["Dense_1"])
    mask = flax_attention_mask(config)
    dh = config.head_dim
    for i in range(config.num_layers):
        b = p[f"TransformerBlock_{i}"]
        h = _layer_norm(x, b["LayerNorm_0"])
        attn = b["MultiHeadDotProductAttention_0"]
        q, k, v = (torch.einsum("bld,dhk->blhk", h, _t(attn[n]["kernel"])) + _t(attn[n]["bias"])
                   for n in ("query", "key", "value"))
        scores = torch.einsum("bqhk,bshk->bhqs", q / math.sqrt(dh), k)
        scores = torch.where(mask, scores, torch.finfo(torch.float64).min)
        mixed = torch.einsum("bhqs,bshk->bqhk", torch.softmax(scores, -1), v)
        x = x + torch.einsum("bqhk,hkd->bqd", mixed, _t(attn["out"]["kernel"])) + _t(attn["out"]["bias"])
        y = _layer_norm(x, b["LayerNorm_1"])
        x = x + (_swish(y @ _t(b["Dense_0"]["kernel"])) * (y @ _t(b["Dense_1"]["kernel"]))) @ _t(b["Dense_2"]["kernel"])
    logits = _dense(x, p["Dense_2"]).reshape(steps, config.tokens_per_step, -1)
    return logits[-1, config.num_tokens - 1:-1]


# ---- tests ------------------------------------------------------------------------------------------------
def test_msgpack_encoding_round_trip_scalars_bfloat16_and_chunks():
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    bf16 = (np.array([1.5, -2.25], np.float32).view(np.uint32) >> 16).astype(np.uint16)
    payload = msgpack.packb({"a": {"k": array}, "s": np.int64(7),
                             "b": msgpack.ExtType(1, msgpack.packb(((2,), "bfloat16", bf16.tobytes()), use_bin_type=True)),
                             "c": {"__msgpack_chunked_array__": True, "shape": {"0": 2, "1": 2},
                                   "chunks": {"0": np.arange(3.0), "1": np.array([3.0])}}},
                            default=_ext, strict_types=True)
    tree = decode_state_dict(payload)
    np.testing.assert_array_equal(tree["a"]["k"], array)
    assert tree["s"] == 7 and tree["a"]["k"].flags.writeable
    np.testing.assert_array_equal(tree["b"], np.array([1.5, -2.25], np.float32))
    np.testing.assert_array_equal(tree["c"], np.arange(4.0).reshape(2, 2))
    with pytest.raises(CheckpointError, match="msgpack"):
        decode_state_dict(b"\x81\xa1a\xc1")


def test_every_tensor_maps_exactly_and_config_comes_from_shapes(checkpoint_dir, fixture_tree):
    _, expected = fixture_tree
    model, weights, report = load_rt1_checkpoint(checkpoint_dir, SHAPE_FREE)
    assert report.ok and report.format == "flax-msgpack" and report.skipped == 1  # the step counter
    assert set(weights) == set(expected) == set(model.get_weight_shapes())
    for name, value in expected.items():
        np.testing.assert_array_equal(weights[name].numpy(), value, err_msg=name)
    c = model.config
    assert (c.num_layers, c.num_heads, c.head_dim, c.ffn, c.ffn_dim, c.vocab_size, c.num_tokens, c.time_steps) == (
        2, 2, 8, "swiglu", 24, 40, 4, 3)
    assert (c.padding, c.image_sees_actions, c.input_rescale) == ("same", False, (1.0, 1.0, 1.0))
    assert c == TINY


def test_logits_match_a_direct_flax_formula_over_a_rolling_window(checkpoint_dir, fixture_tree):
    """Frames fed one by one (window 3, 5 frames): once the window is full, every step's action logits
    equal the Flax model's on the last 3 frames (float64 reference, fp32 model)."""
    tree, _ = fixture_tree
    model, weights, _ = load_rt1_checkpoint(checkpoint_dir, SHAPE_FREE)
    g = torch.Generator().manual_seed(3)
    frames = torch.rand(5, 3, 96, 96, generator=g)
    context = torch.randn(1, TINY.context_dim, generator=g)
    reference_tokens, grid = flax_image_tokens(tree, TINY, frames.permute(0, 2, 3, 1).numpy(),
                                               _t(context).expand(5, -1))
    assert tuple(grid) == (3, 3)  # SAME padding: 96 -> 48 -> 24 -> 12 -> 6 -> 3
    buffers = {k: torch.zeros(s, dtype=model.buffer_dtype(k, torch.float32))
               for k, s in model.get_buffer_shapes().items()}
    buffers["context"].copy_(context)
    for step in range(5):
        buffers["images"].copy_(frames[step:step + 1])
        model.forward(OPS, weights, buffers)
        if step >= TINY.time_steps - 1:
            expected = flax_action_logits(tree, TINY, reference_tokens[step - 2:step + 1])
            assert (buffers["logits"][0].double() - expected).abs().max() < 1e-4 * max(1.0, expected.abs().max())
            np.testing.assert_array_equal(buffers["tokens"][0].numpy(), expected.argmax(-1).numpy())
    assert reference_tokens.std() > 0.1 and expected.std() > 0.1


def test_checkpoint_forms_resolve_like_restore_checkpoint(tmp_path, fixture_tree, checkpoint_dir):
    tree, expected = fixture_tree
    data = flax_msgpack(tree)
    steps = tmp_path / "steps"
    steps.mkdir()
    (steps / "checkpoint_9").write_bytes(b"\x80")  # an empty state dict, older step
    (steps / "checkpoint_100").write_bytes(data)
    assert resolve_flax_checkpoint(steps) == ("msgpack", steps / "checkpoint_100")
    assert resolve_flax_checkpoint(checkpoint_dir)[1].name == "checkpoint"
    _, weights, _ = load_rt1_checkpoint(steps / "checkpoint_100", SHAPE_FREE)
    np.testing.assert_array_equal(weights["transformer.output.weight"].numpy(), expected["transformer.output.weight"])
    tf_like = tmp_path / "tf"
    tf_like.mkdir()
    (tf_like / "checkpoint").write_text('model_checkpoint_path: "ckpt-1"\n')
    assert not is_flax_checkpoint(tf_like) and is_flax_checkpoint(steps)


def test_orbax_pytree_folder(tmp_path, fixture_tree):
    """Flax's ``save_checkpoint`` with current Orbax writes a PyTree folder (``_METADATA``)."""
    ocp = pytest.importorskip("orbax.checkpoint")
    tree, expected = fixture_tree
    folder = tmp_path / "checkpoint_900000"
    ocp.PyTreeCheckpointer().save(folder, {"params": tree["params"], "batch_stats": tree["batch_stats"]})
    _, weights, report = load_rt1_checkpoint(folder, SHAPE_FREE)
    assert report.format == "flax-orbax" and report.ok
    from cortexflow.checkpoints.rt1_layout import is_rt1_checkpoint

    assert is_rt1_checkpoint(folder) and is_rt1_checkpoint(tmp_path)   # the folder, or the run folder holding it
    for name in ("tokenizer.blocks.3.dw.conv", "tokenizer.top.bn.var", "transformer.layers.1.ff.down"):
        np.testing.assert_array_equal(weights[name].numpy(), expected[name])


def test_missing_unexpected_and_mis_shaped_variables_are_all_named(tmp_path, fixture_tree):
    tree = copy.deepcopy(fixture_tree[0])
    gone = ["params/image_tokenizer/EfficientNetWithFilm_0/MBConvBlock_2/depthwise_conv2d/depthwise_kernel",
            "batch_stats/image_tokenizer/EfficientNetWithFilm_0/Head_0/batch_normalization/var",
            "params/Transformer_0/TransformerBlock_1/Dense_1/kernel"]
    for path in gone:
        _drop(tree, path)
    _put(tree, "params/Transformer_0/TransformerBlock_1/extra/kernel", np.zeros((2, 2), np.float32))
    _put(tree, "params/Transformer_0/TransformerBlock_0/MultiHeadDotProductAttention_0/out/bias",
         np.zeros(5, np.float32))
    path = tmp_path / "checkpoint_1"
    path.write_bytes(flax_msgpack(tree))
    with pytest.raises(CheckpointError) as err:
        load_flax_checkpoint(path, SHAPE_FREE)
    message = str(err.value)
    for name in gone:
        assert name in message
    assert "unexpected tensors: params/Transformer_0/TransformerBlock_1/extra/kernel" in message
    assert "mis-shaped tensors: params/Transformer_0/TransformerBlock_0/MultiHeadDotProductAttention_0/out/bias (5,)" in message
    with pytest.raises(CheckpointError, match="mis-shaped"):  # a wrong EfficientNet scaling for these weights
        load_flax_checkpoint(tmp_path / "checkpoint_1", dict(SHAPE_FREE, width=0.3))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no Flax checkpoint"):
        read_flax_arrays(tmp_path / "empty")
    other = tmp_path / "other"
    other.write_bytes(flax_msgpack({"params": {"Dense_0": {"kernel": np.zeros((2, 2), np.float32)}}}))
    with pytest.raises(CheckpointError, match="no RT-1 transformer"):
        load_flax_checkpoint(other)


def test_cli_convert_auto_detects_flax_and_safetensors_give_the_same_step(tmp_path, checkpoint_dir):
    from typer.testing import CliRunner

    from cortexflow.cli import app

    result = CliRunner().invoke(app, ["convert", str(checkpoint_dir), str(tmp_path / "out"), "--model-config",
                                      json.dumps(dict(SHAPE_FREE, input_size=[96, 96]))])
    assert result.exit_code == 0, result.output
    assert "skipped 1 variable" in result.output
    stored = json.loads((tmp_path / "out" / "config.json").read_text())["rt1"]
    assert stored["ffn"] == "swiglu" and stored["vocab_size"] == 40 and stored["padding"] == "same"
    converted = cf.create_rt1_inference(tmp_path / "out", device="cpu")
    direct = cf.create_rt1_inference(checkpoint_dir, device="cpu", model_config=SHAPE_FREE)
    assert converted.config == direct.config == TINY
    g = np.random.default_rng(4)
    context = g.standard_normal(TINY.context_dim).astype(np.float32)
    for _ in range(4):
        frame = g.integers(0, 256, (96, 96, 3), dtype=np.uint8)
        a, b = converted.predict(frame, context), direct.predict(frame, context)
        # Same tensors, differently aligned buffers: CPU kernels may sum in another order (~1e-6).
        torch.testing.assert_close(converted.buffers(1)["logits"], direct.buffers(1)["logits"], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(converted.last_tokens, direct.last_tokens)
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])
    bad = CliRunner().invoke(app, ["convert", str(checkpoint_dir), str(tmp_path / "x"), "--model", "pi0"])
    assert bad.exit_code == 2 and "Flax checkpoint (RT-1-X)" in bad.output


# ---- F-RT1-6, each difference against its formula at the real RT-1-X size --------------------------------------
def test_published_rt1x_variable_tree_maps_onto_the_rt1x_config():
    """The full-size Flax tree of ``RT1(num_image_tokens=81, layer_size=256, vocab_size=512)`` (shapes only)
    matches ``RT1Config.rt1x_jax()`` exactly, with the config read back from its shapes."""
    from cortexflow.checkpoints.flax_checkpoint import flatten
    from cortexflow.checkpoints.rt1x_jax_layout import infer_flax_config, match_flax_checkpoint, module_prefix

    config = RT1Config.rt1x_jax()
    tree, _ = flax_rt1_variables(config, values=False)
    shapes = {name: tuple(np.shape(a)) for name, a in flatten(tree).items()}
    assert shapes["params/Transformer_0/Dense_1/kernel"] == (1380, 512)
    assert shapes["params/image_tokenizer/TokenLearnerModuleV11_0/token_masking/Dense_1/kernel"] == (64, 81)
    prefix = module_prefix(shapes)
    assert prefix == "params/" and infer_flax_config(shapes, prefix, RT1Config.rt1x_jax()) == config
    _, report = match_flax_checkpoint(shapes, RT1Model(config), prefix)
    assert report.ok and report.skipped == 1
    params = sum(math.prod(s) for n, s in shapes.items() if n.startswith("params/"))
    declared = sum(math.prod(s) for n, s in RT1Model(config).get_weight_shapes().items()
                   if not n.startswith("tokenizer.norm.") and not n.endswith((".bn.mean", ".bn.var")))
    assert params == declared


def test_rt1x_same_padding_gives_a_10x10_map_and_81_tokens():
    config = RT1Config.rt1x_jax()
    size = [300, 300]
    for stride, kernel in [(2, 3)] + [(b.stride, b.kernel) for b in config.blocks()]:
        top, bottom, left, right = conv_padding(tuple(size), kernel, stride, config.padding)
        size = [(n + lo + hi - kernel) // stride + 1 for n, lo, hi in zip(size, (top, left), (bottom, right))]
    assert size == [10, 10]
    assert config.num_tokens == 81 and config.tokens_per_step == 92 and config.sequence_length == 1380
    assert RT1Model(config).get_weight_shapes()["token_learner.output.weight"] == (81, 64)


def test_rt1x_attention_widths_and_swiglu_without_biases():
    config = RT1Config.rt1x_jax()
    shapes = RT1Model(config).get_weight_shapes()
    assert shapes["transformer.layers.0.q.weight"] == (2048, 512) and config.num_heads == 8 and config.head_dim == 256
    assert {k.rsplit(".", 1)[-1] for k in shapes if k.startswith("transformer.layers.0.ff.")} == {"gate", "up", "down"}
    assert shapes["transformer.layers.0.ff.gate"] == (512, 512) and shapes["transformer.output.weight"] == (512, 512)
    small = RT1Config.rt1x_jax(num_layers=1, d_model=8, embedding_dim=8, num_heads=2, head_dim=4, ffn_dim=6,
                               time_steps=1, num_tokens=1, vocab_size=16)
    model = RT1Model(small)
    g = torch.Generator().manual_seed(0)
    w = {k: torch.randn(s, generator=g) for k, s in model.get_weight_shapes().items()}
    x = torch.randn(1, small.sequence_length, 8, generator=g)
    mask = torch.ones(small.sequence_length, small.sequence_length, dtype=torch.bool)[None]
    p = "transformer.layers.0"
    h = F.layer_norm(x, (8,), w[f"{p}.ln1.weight"], w[f"{p}.ln1.bias"], 1e-6)
    q, k, v = ((h @ w[f"{p}.{n}.weight"].T + w[f"{p}.{n}.bias"]).view(1, -1, 2, 4).transpose(1, 2) for n in "qkv")
    attn = torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1) @ v
    x1 = x + attn.transpose(1, 2).reshape(1, -1, 8) @ w[f"{p}.o.weight"].T + w[f"{p}.o.bias"]
    y = F.layer_norm(x1, (8,), w[f"{p}.ln2.weight"], w[f"{p}.ln2.bias"], 1e-6)
    ff = (F.silu(y @ w[f"{p}.ff.gate"].T) * (y @ w[f"{p}.ff.up"].T)) @ w[f"{p}.ff.down"].T
    torch.testing.assert_close(model.layer(OPS, w, p, x, mask), x1 + ff, rtol=1e-5, atol=1e-5)


def test_rt1x_mask_keeps_image_rows_off_every_action_column():
    config = RT1Config.rt1x_jax()
    mask = rt1_attention_mask(config.time_steps, 81, 11, config.image_sees_actions)
    small = RT1Config.rt1x_jax(time_steps=3, num_tokens=4)
    torch.testing.assert_close(rt1_attention_mask(3, 4, 11, False), flax_attention_mask(small))
    idx = torch.arange(1380)
    is_action = idx % 92 >= 81
    assert not mask[~is_action][:, is_action].any()
    causal_images = torch.tril(torch.ones(1380, 1380, dtype=torch.bool))[~is_action][:, ~is_action]
    assert torch.equal(mask[~is_action][:, ~is_action], causal_images)
    assert mask[is_action].sum(1).min() == 81  # the first step's action rows see its 81 image tokens


def test_rt1x_last_step_logits_positions_and_512_bin_detokenisation():
    rows = action_logit_rows(torch.tensor([14]), 81, 11)[0]
    assert rows.tolist() == [14 * 92 + p for p in range(80, 91)]
    config = RT1Config.rt1x_jax()
    tokens = np.array([[1, 0, 255, 511, 0, 511, 256, 511, 0, 100, 511]])
    actions = detokenize_actions(tokens, config.actions, config.vocab_size)
    np.testing.assert_array_equal(actions["terminate_episode"], [[0, 1, 0]])
    np.testing.assert_allclose(actions["world_vector"], [[-2.0, 255 / 511 * 4 - 2, 2.0]], rtol=0, atol=1e-6)
    np.testing.assert_allclose(actions["rotation_delta"], [[-math.pi / 2, math.pi / 2, 256 / 511 * math.pi - math.pi / 2]],
                               rtol=0, atol=1e-6)
    np.testing.assert_allclose(actions["gripper_closedness_action"], [[1.0]], rtol=0, atol=1e-6)
    np.testing.assert_allclose(actions["base_displacement_vertical_rotation"], [[-math.pi]], rtol=0, atol=1e-6)
    np.testing.assert_allclose(actions["base_displacement_vector"], [[100 / 511 * 2 - 1, 1.0]], rtol=0, atol=1e-6)


def test_rt1x_input_is_imagenet_normalised_from_0_1():
    """With the converter's constant normalisation weights and ``input_rescale`` 1 the tokenizer's input is
    ``(x - mean) / std`` of the [0, 1] image."""
    from cortexflow.checkpoints.rt1x_jax_layout import constant_weights
    from cortexflow.models.efficientnet_film import normalize_input

    model = RT1Model(TINY)
    weights = {f"tokenizer.norm.{k}": v for k, v in
               ((n.rsplit(".", 1)[-1], t) for n, t in constant_weights(model).items() if n.startswith("tokenizer.norm."))}
    images = torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    got = normalize_input(weights, "tokenizer", images * 255.0, torch.tensor(TINY.input_rescale), torch.float32)
    expected = (images - torch.tensor(MEAN_RGB)[:, None, None]) / torch.tensor(STDDEV_RGB)[:, None, None]
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
