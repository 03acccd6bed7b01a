"""Tests of cortexflow.processing: images, normalisation statistics and prompt tokenisation."""

import json
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cortexflow.errors import ConfigError, CortexFlowWarning, InputError, NormStatsError, TokenizerError
from cortexflow.processing import (
    NormStats,
    PromptTokenizer,
    clean_prompt,
    discretize_state,
    load_norm_stats,
    normalize,
    pad_to_dim,
    prepare_image_masks,
    prepare_images,
    prepare_images_on_device,
    resize_with_pad,
    tokenize_ids,
    tokenize_pi0_prompt,
    tokenize_pi05_prompt,
    unnormalize,
)


@pytest.fixture
def rng():
    return np.random.default_rng()


# ----------------------------------------------------------------------------------------------- images


def _pil_bilinear_weights(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) weights of PIL's antialiased bilinear resampling along one axis."""
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    weights = np.zeros((out_size, in_size))
    for out_index in range(out_size):
        center = (out_index + 0.5) * scale
        low = max(int(center - filter_scale + 0.5), 0)
        high = min(int(center + filter_scale + 0.5), in_size)
        taps = np.arange(low, high)
        row = np.clip(1.0 - np.abs((taps - center + 0.5) / filter_scale), 0.0, None)
        weights[out_index, low:high] = row / row.sum()
    return weights


def test_resize_with_pad_wide_uint8_geometry(rng):
    image = rng.integers(1, 256, size=(100, 200, 3), dtype=np.uint8)
    out = resize_with_pad(image, 224, 224)
    # ratio = 200/224 -> content 112 x 224 pasted at row int((224 - 112) / 2) = 56.
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    assert (out[:56] == 0).all() and (out[168:] == 0).all()
    assert (out[56:168] >= 1).all()


def test_resize_with_pad_tall_float_geometry(rng):
    image = rng.uniform(-0.5, 0.5, size=(300, 50, 3)).astype(np.float32)
    out = resize_with_pad(image, 224, 224)
    # ratio = 300/224 -> content 224 x int(50 / ratio) = 37 pasted at column int((224 - 37) / 2) = 93.
    assert out.shape == (224, 224, 3) and out.dtype == np.float32
    assert (out[:, :93] == -1.0).all() and (out[:, 130:] == -1.0).all()
    assert (out[:, 93:130] > -0.51).all() and (out[:, 93:130] < 0.51).all()


def test_resize_with_pad_matches_pil_bilinear_filter(rng):
    image = rng.uniform(-1, 1, size=(90, 180, 3)).astype(np.float32)
    out = resize_with_pad(image, 64, 64)
    rows, cols = _pil_bilinear_weights(90, 32), _pil_bilinear_weights(180, 64)
    expected = np.einsum("ij,jkc,lk->ilc", rows, image.astype(np.float64), cols)
    np.testing.assert_allclose(out[16:48], expected, atol=1e-5)


@pytest.mark.parametrize("size", [(100, 200), (480, 640), (37, 301)])
def test_resize_with_pad_keeps_uniform_colour(size):
    colour = np.array([10, 128, 250], dtype=np.uint8)
    image = np.broadcast_to(colour, (*size, 3)).copy()
    out = resize_with_pad(image, 224, 224)
    ratio = max(size[1] / 224, size[0] / 224)
    new_h, new_w = int(size[0] / ratio), int(size[1] / ratio)
    top, left = int((224 - new_h) / 2), int((224 - new_w) / 2)
    assert (out[top : top + new_h, left : left + new_w] == colour).all()
    float_image = np.full((*size, 3), 0.25, dtype=np.float32)
    float_out = resize_with_pad(float_image, 224, 224)
    np.testing.assert_allclose(float_out[top : top + new_h, left : left + new_w], 0.25, atol=1e-6)


def test_resize_with_pad_returns_target_size_unchanged(rng):
    image = rng.integers(0, 256, size=(224, 224, 3), dtype=np.uint8)
    assert resize_with_pad(image) is image


def test_prepare_images_uint8_to_nchw_minus_one_one(rng):
    images = rng.integers(0, 256, size=(2, 224, 224, 3), dtype=np.uint8)
    out = prepare_images(images, num_views=2)
    assert out.shape == (2, 3, 224, 224) and out.dtype == torch.float32
    expected = images.transpose(0, 3, 1, 2).astype(np.float32) / 255 * 2 - 1
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)
    assert out.min() >= -1 and out.max() <= 1


def test_prepare_images_into_out_is_bit_identical_and_in_place(rng):
    """Writing into the engine's staging buffer gives exactly openpi's ``x / 255 * 2 - 1`` in float32, and
    every view of the buffer is overwritten (it is reused call after call)."""
    images = [rng.integers(0, 256, size=(224, 224, 3), dtype=np.uint8),
              rng.integers(0, 256, size=(120, 200, 3), dtype=np.uint8),
              rng.uniform(-1, 1, size=(224, 224, 3)).astype(np.float64)]
    out = np.full((3, 3, 224, 224), np.nan, dtype=np.float32)
    tensor = prepare_images(images, num_views=3, out=out)
    assert tensor.data_ptr() == out.ctypes.data and np.isfinite(out).all()
    expected = [resize_with_pad(im).transpose(2, 0, 1).astype(np.float32) / 255.0 * 2.0 - 1.0 for im in images[:2]]
    expected.append(images[2].astype(np.float32).transpose(2, 0, 1))
    np.testing.assert_array_equal(out, np.stack(expected))
    np.testing.assert_array_equal(prepare_images(images, num_views=3).numpy(), out)


@pytest.mark.parametrize("bad", [np.zeros((2, 3, 224, 224), np.float32), np.zeros((3, 3, 224, 224), np.float64),
                                 np.zeros((3, 224, 224, 3), np.float32).transpose(0, 3, 1, 2)])
def test_prepare_images_rejects_a_wrong_out_buffer(rng, bad):
    images = rng.integers(0, 256, size=(3, 224, 224, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="C-contiguous float32"):
        prepare_images(images, num_views=3, out=bad)


def _mixed_views(rng):
    return [rng.integers(0, 256, size=(224, 224, 3), dtype=np.uint8),
            rng.integers(0, 256, size=(96, 160, 3), dtype=np.uint8),
            rng.uniform(-1, 1, size=(224, 224, 3)).astype(np.float64),
            rng.uniform(-1, 1, size=(120, 90, 3)).astype(np.float32)]


def test_prepare_images_on_device_matches_the_host_path_on_the_cpu(rng):
    """The device path's logic (per-view upload, resize-with-pad, scaling of the uint8 views only) gives the
    host path's values exactly when its device is the CPU (Pillow's pixels for uint8 views, the same float32
    interpolation for float views)."""
    views = _mixed_views(rng)
    out = torch.full((4, 3, 224, 224), float("nan"))
    assert prepare_images_on_device(views, 4, out) is out
    np.testing.assert_array_equal(out.numpy(), prepare_images(views, 4).numpy())
    uint8_only = views[:2]
    out2 = torch.full((2, 3, 224, 224), float("nan"))
    np.testing.assert_array_equal(prepare_images_on_device(uint8_only, 2, out2).numpy(), prepare_images(uint8_only, 2).numpy())
    with pytest.raises(ValueError, match=r"float32 \(4, 3, S, S\)"):
        prepare_images_on_device(views, 4, torch.zeros(4, 3, 224, 224, dtype=torch.float16))
    with pytest.raises(InputError, match="view 1 has shape"):
        prepare_images_on_device([views[0], views[1][..., :2]], 2, out2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the device path's numerics need a CUDA GPU")
def test_prepare_images_on_the_gpu_matches_the_host_path(rng):
    """On a GPU: uint8 views (resized or not) and target-size float views bit-identical to the host path,
    resized float views within float32 rounding (the GPU's interpolation sums in another order)."""
    views = _mixed_views(rng) + [rng.integers(0, 256, size=(480, 640, 3), dtype=np.uint8)]
    out = torch.full((5, 3, 224, 224), float("nan"), device="cuda")
    got = prepare_images_on_device(views, 5, out).cpu().numpy()
    want = prepare_images(views, 5).numpy()
    for index in (0, 1, 2, 4):
        np.testing.assert_array_equal(got[index], want[index])
    assert np.abs(got[3] - want[3]).max() < 1e-5


def test_prepare_images_list_of_different_sizes(rng):
    wide = rng.integers(0, 256, size=(100, 200, 3), dtype=np.uint8)
    exact = rng.uniform(-1, 1, size=(224, 224, 3)).astype(np.float32)
    small = torch.from_numpy(rng.integers(0, 256, size=(50, 80, 3), dtype=np.uint8))
    out = prepare_images([wide, exact, small], num_views=3)
    assert out.shape == (3, 3, 224, 224)
    np.testing.assert_allclose(out[1].numpy(), exact.transpose(2, 0, 1), atol=0)
    np.testing.assert_allclose(out[0, :, :56].numpy(), -1.0)
    expected_wide = resize_with_pad(wide).transpose(2, 0, 1).astype(np.float32) / 255 * 2 - 1
    np.testing.assert_allclose(out[0].numpy(), expected_wide, atol=1e-6)


def test_prepare_images_single_view_and_bfloat16_tensor(rng):
    image = torch.from_numpy(rng.uniform(-1, 1, size=(120, 160, 3)).astype(np.float32)).bfloat16()
    out = prepare_images(image, num_views=1, image_size=96)
    assert out.shape == (1, 3, 96, 96) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1


def test_prepare_images_accepts_float_slightly_outside_range(rng):
    image = rng.uniform(-1, 1, size=(224, 224, 3))
    image[0, 0, 0] = 1.0005
    out = prepare_images([image], num_views=1)
    assert out.max() == 1.0


def _uint8(rng, shape):
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


@pytest.mark.parametrize(
    ("make_images", "num_views", "message"),
    [
        (lambda rng: _uint8(rng, (3, 64, 64, 3)), 2, "got 3 camera views, expected num_views=2"),
        (lambda rng: [_uint8(rng, (64, 64, 3))], 2, "got 1 camera views, expected num_views=2"),
        (lambda rng: _uint8(rng, (64, 64, 3)), 2, "single HWC image"),
        (lambda rng: _uint8(rng, (1, 2, 64, 64, 3)), 1, "rank 5"),
        (lambda rng: [_uint8(rng, (64, 64))], 1, "rank 2"),
        (lambda rng: [_uint8(rng, (3, 64, 64))], 1, "looks like CHW"),
        (lambda rng: [_uint8(rng, (64, 64, 4))], 1, "4 channels"),
        (lambda rng: [rng.integers(0, 256, size=(64, 64, 3)).astype(np.int32)], 1, "dtype int32"),
        (lambda rng: [np.zeros((64, 64, 3), dtype=bool)], 1, "dtype bool"),
        (lambda rng: [np.full((64, 64, 3), np.nan, dtype=np.float32)], 1, "NaN or inf"),
        (lambda rng: [np.full((64, 64, 3), np.inf, dtype=np.float32)], 1, "NaN or inf"),
        (lambda rng: [_uint8(rng, (64, 64, 3)).astype(np.float32)], 1, r"float in \[-1, 1\]"),
        (lambda rng: [np.zeros((0, 64, 3), dtype=np.uint8)], 1, "empty"),
        (lambda rng: "camera.png", 1, "not supported"),
    ],
)
def test_prepare_images_errors(rng, make_images, num_views, message):
    with pytest.raises(InputError, match=message):
        prepare_images(make_images(rng), num_views=num_views)


def test_prepare_images_out_of_range_reports_min_max(rng):
    image = rng.uniform(0, 1, size=(32, 32, 3)).astype(np.float32) * 255
    with pytest.raises(InputError, match=r"uint8 in \[0, 255\]") as info:
        prepare_images([image], num_views=1)
    assert f"{image.max():.4g}" in str(info.value)


def test_prepare_image_masks():
    assert prepare_image_masks(None, 3).tolist() == [True, True, True]
    masks = prepare_image_masks([True, False, True], 3)
    assert masks.dtype == torch.bool and masks.tolist() == [True, False, True]
    assert prepare_image_masks(np.array([0, 1]), 2).tolist() == [False, True]
    assert prepare_image_masks(torch.tensor([True, False]), 2).tolist() == [True, False]


@pytest.mark.parametrize(
    ("masks", "message"),
    [
        ([True, True], "expected 3 booleans"),
        ([[True, True, True]], "expected 3 booleans"),
        ([False, False, False], "at least one valid"),
        ([0.5, 1.0, 1.0], "not booleans"),
        ([2, 1, 1], "not booleans"),
    ],
)
def test_prepare_image_masks_errors(masks, message):
    with pytest.raises(InputError, match=message):
        prepare_image_masks(masks, 3)


# --------------------------------------------------------------------------------------- normalisation


def _random_stats(rng, dim):
    mean = rng.normal(size=dim)
    std = rng.uniform(0.1, 2.0, size=dim)
    q01 = mean - rng.uniform(0.5, 3.0, size=dim)
    q99 = mean + rng.uniform(0.5, 3.0, size=dim)
    return NormStats(mean=mean, std=std, q01=q01, q99=q99)


def test_norm_stats_are_float32(rng):
    stats = _random_stats(rng, 5)
    assert all(getattr(stats, f).dtype == np.float32 for f in ("mean", "std", "q01", "q99"))
    assert stats.dim == 5


@pytest.mark.parametrize("mode", ["zscore", "quantile"])
def test_normalize_unnormalize_round_trip_with_padding(rng, mode):
    stats = _random_stats(rng, 7)
    x = rng.normal(size=(4, 10, 7)).astype(np.float32) * 3
    normalized = normalize(x, stats, mode)
    assert normalized.dtype == np.float32 and normalized.shape == x.shape
    padded = pad_to_dim(normalized, 32)
    padded[..., 7:] = rng.normal(size=(4, 10, 25))
    restored = unnormalize(padded, stats, mode)
    assert restored.shape == (4, 10, 32) and restored.dtype == np.float32
    np.testing.assert_allclose(restored[..., :7], x, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(restored[..., 7:], padded[..., 7:])


def test_normalize_formulas(rng):
    stats = _random_stats(rng, 4)
    x = rng.normal(size=(3, 4))
    mean, std = stats.mean.astype(np.float64), stats.std.astype(np.float64)
    q01, q99 = stats.q01.astype(np.float64), stats.q99.astype(np.float64)
    # normalize returns float32: near-zero outputs carry an absolute error of ~eps * (|x| + |mean|) / std
    # (std >= 0.1 here), hence the atol
    np.testing.assert_allclose(normalize(x, stats, "zscore"), (x - mean) / (std + 1e-6), rtol=1e-5, atol=1e-5)
    expected = (x - q01) / (q99 - q01 + 1e-6) * 2 - 1
    np.testing.assert_allclose(normalize(x, stats, "quantile"), expected, rtol=1e-5, atol=1e-6)


def test_normalize_errors(rng):
    stats = _random_stats(rng, 4)
    with pytest.raises(InputError, match="last dimension 5"):
        normalize(rng.normal(size=(2, 5)), stats, "zscore")
    with pytest.raises(InputError, match="at least 4"):
        unnormalize(rng.normal(size=(2, 3)), stats, "zscore")
    with pytest.raises(InputError, match="NaN"):
        normalize(np.array([0.0, np.nan, 0.0, 0.0]), stats, "zscore")
    with pytest.raises(ConfigError, match="unknown normalization mode"):
        normalize(rng.normal(size=4), stats, "minmax")
    zscore_only = NormStats(mean=stats.mean, std=stats.std)
    with pytest.raises(NormStatsError, match="q01, q99.*quantile"):
        normalize(rng.normal(size=4), zscore_only, "quantile")
    quantile_only = NormStats(q01=stats.q01, q99=stats.q99)
    with pytest.raises(NormStatsError, match="mean, std.*zscore"):
        unnormalize(rng.normal(size=32), quantile_only, "zscore")


def test_pad_to_dim(rng):
    x = rng.normal(size=(3, 7)).astype(np.float32)
    padded = pad_to_dim(x, 32)
    assert padded.shape == (3, 32) and padded.dtype == np.float32
    np.testing.assert_array_equal(padded[:, :7], x)
    assert (padded[:, 7:] == 0).all()
    with pytest.raises(InputError, match="D <= 4"):
        pad_to_dim(x, 4)


def _stats_dict(rng, state_dim=8, action_dim=7):
    def entry(dim):
        stats = _random_stats(rng, dim)
        return {f: getattr(stats, f).tolist() for f in ("mean", "std", "q01", "q99")}

    return {"state": entry(state_dim), "actions": entry(action_dim)}


def _assert_stats_equal(loaded, expected):
    for group in ("state", "actions"):
        for field, values in expected[group].items():
            np.testing.assert_allclose(getattr(loaded[group], field), values, rtol=1e-6)


def test_load_openpi_json_with_and_without_outer_level(tmp_path, rng):
    stats = _stats_dict(rng)
    with_outer = tmp_path / "with_outer.json"
    with_outer.write_text(json.dumps({"norm_stats": stats}))
    without_outer = tmp_path / "without_outer.json"
    without_outer.write_text(json.dumps(stats))
    for path in (with_outer, without_outer):
        loaded = load_norm_stats(path)
        assert set(loaded) == {"state", "actions"}
        assert loaded["state"].dim == 8 and loaded["actions"].dim == 7
        _assert_stats_equal(loaded, stats)


def test_load_openpi_json_with_null_quantiles(tmp_path, rng):
    stats = _stats_dict(rng)
    stats["actions"]["q01"] = stats["actions"]["q99"] = None
    path = tmp_path / "norm_stats.json"
    path.write_text(json.dumps({"norm_stats": stats}))
    loaded = load_norm_stats(path)
    assert loaded["actions"].q01 is None
    with pytest.raises(NormStatsError, match="q01, q99"):
        normalize(np.zeros(7), loaded["actions"], "quantile")


def test_load_from_checkpoint_directory(tmp_path, rng):
    stats = _stats_dict(rng)
    asset_dir = tmp_path / "assets" / "trossen"
    asset_dir.mkdir(parents=True)
    (asset_dir / "norm_stats.json").write_text(json.dumps({"norm_stats": stats}))
    _assert_stats_equal(load_norm_stats(tmp_path), stats)

    (tmp_path / "norm_stats.json").write_text(json.dumps({"norm_stats": stats}))
    with pytest.raises(NormStatsError, match="several") as info:
        load_norm_stats(tmp_path)
    assert "trossen" in str(info.value) and str(tmp_path / "norm_stats.json") in str(info.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NormStatsError, match="no norm stats found"):
        load_norm_stats(empty)


def test_load_lerobot_json(tmp_path, rng):
    stats = _stats_dict(rng)
    lerobot = {
        "observation.state": {**stats["state"], "min": [0.0] * 8, "max": [1.0] * 8, "count": [100]},
        "action": stats["actions"],
        "observation.images.base": {"mean": [[[0.5]], [[0.5]], [[0.5]]]},
    }
    path = tmp_path / "stats.json"
    path.write_text(json.dumps(lerobot))
    _assert_stats_equal(load_norm_stats(path), stats)


def test_load_lerobot_safetensors(tmp_path, rng):
    stats = _stats_dict(rng)
    tensors = {
        f"{lerobot_key}.{field}": torch.tensor(values, dtype=torch.float32)
        for lerobot_key, group in (("observation.state", "state"), ("action", "actions"))
        for field, values in stats[group].items()
    }
    tensors["observation.images.base.mean"] = torch.rand(3, 1, 1)
    tensors["action.count"] = torch.tensor([1000])
    path = tmp_path / "policy_preprocessor.safetensors"
    save_file(tensors, str(path))
    _assert_stats_equal(load_norm_stats(path), stats)


def test_load_norm_stats_errors(tmp_path, rng):
    with pytest.raises(NormStatsError, match="does not exist"):
        load_norm_stats(tmp_path / "missing.json")

    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    with pytest.raises(NormStatsError, match="valid JSON"):
        load_norm_stats(bad_json)

    bad_safetensors = tmp_path / "bad.safetensors"
    bad_safetensors.write_bytes(b"not a safetensors file")
    with pytest.raises(NormStatsError, match="valid safetensors"):
        load_norm_stats(bad_safetensors)

    cases = {
        "no_actions": lambda s: s.pop("actions"),
        "length_mismatch": lambda s: s["state"].update(std=s["state"]["std"][:-1]),
        "nan": lambda s: s["actions"]["mean"].__setitem__(2, float("nan")),
        "strings": lambda s: s["state"].update(mean=["a"] * 8),
        "nested": lambda s: s["state"].update(mean=[s["state"]["mean"]]),
        "no_fields": lambda s: s.update(actions={"median": [0.0] * 7}),
        "not_an_object": lambda s: s.update(actions=[1.0] * 7),
    }
    messages = {
        "no_actions": "no 'actions' entry",
        "length_mismatch": "different lengths",
        "nan": "NaN",
        "strings": "not a list of numbers",
        "nested": "expected a 1-D list",
        "no_fields": "none of mean, std, q01, q99",
        "not_an_object": "expected an object",
    }
    for name, corrupt in cases.items():
        stats = _stats_dict(rng)
        corrupt(stats)
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"norm_stats": stats}))
        with pytest.raises(NormStatsError, match=messages[name]):
            load_norm_stats(path)


# ----------------------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_path):
    return PromptTokenizer.from_path(tiny_tokenizer_path)


@pytest.fixture(scope="module")
def sentencepiece_processor(tiny_tokenizer_path):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(tiny_tokenizer_path))


def test_tokenizer_loading(tiny_tokenizer_path, tokenizer):
    assert tokenizer.bos_id == 2 and tokenizer.vocab_size == 320
    from_folder = PromptTokenizer.from_path(tiny_tokenizer_path.parent)
    text = "pick up the cup"
    assert from_folder.encode(text, add_bos=True) == tokenizer.encode(text, add_bos=True)


def test_tokenizer_encode_matches_sentencepiece(tokenizer, sentencepiece_processor):
    text = "put the red block in the drawer"
    assert tokenizer.encode(text, add_bos=False) == sentencepiece_processor.encode(text)
    assert tokenizer.encode(text, add_bos=True) == [2, *sentencepiece_processor.encode(text)]


def test_tokenizer_errors(tmp_path, monkeypatch):
    with pytest.raises(TokenizerError, match="does not exist"):
        PromptTokenizer.from_path(tmp_path / "missing.model")
    with pytest.raises(TokenizerError, match="no tokenizer found"):
        PromptTokenizer.from_path(tmp_path)
    corrupt_model = tmp_path / "tokenizer.model"
    corrupt_model.write_bytes(b"definitely not a protobuf")
    with pytest.raises(TokenizerError, match="cannot load SentencePiece model"):
        PromptTokenizer.from_path(corrupt_model)
    corrupt_json = tmp_path / "tokenizer.json"
    corrupt_json.write_text("{broken")
    with pytest.raises(TokenizerError, match="valid tokenizer.json"):
        PromptTokenizer.from_path(corrupt_json)
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    with pytest.raises(TokenizerError, match="pip install sentencepiece"):
        PromptTokenizer.from_path(corrupt_model)


def _write_tokenizer_json(path, special_tokens):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    hf_tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    hf_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    hf_tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=special_tokens, show_progress=False)
    hf_tokenizer.train_from_iterator(["pick up the red block", "place it in the bowl\n"] * 5, trainer)
    if "<bos>" in special_tokens:
        bos = ("<bos>", hf_tokenizer.token_to_id("<bos>"))
        hf_tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[bos])
    hf_tokenizer.save(str(path))
    return hf_tokenizer


def test_tokenizer_json(tmp_path):
    hf_tokenizer = _write_tokenizer_json(tmp_path / "tokenizer.json", ["<pad>", "<eos>", "<bos>", "<unk>"])
    tokenizer = PromptTokenizer.from_path(tmp_path)
    assert tokenizer.source.endswith("tokenizer.json")
    assert tokenizer.bos_id == 2 and tokenizer.vocab_size == hf_tokenizer.get_vocab_size()
    ids = tokenizer.encode("pick up the bowl", add_bos=True)
    assert ids[0] == 2 and ids.count(2) == 1
    assert ids[1:] == hf_tokenizer.encode("pick up the bowl", add_special_tokens=False).ids
    assert tokenizer.decode(ids) == "pick up the bowl"

    no_bos = tmp_path / "no_bos"
    no_bos.mkdir()
    _write_tokenizer_json(no_bos / "tokenizer.json", ["<pad>", "<unk>"])
    with pytest.raises(TokenizerError, match="'<bos>'"):
        PromptTokenizer.from_path(no_bos)


def test_folder_prefers_sentencepiece_model(tmp_path, tiny_tokenizer_path):
    (tmp_path / "tokenizer.model").write_bytes(tiny_tokenizer_path.read_bytes())
    _write_tokenizer_json(tmp_path / "tokenizer.json", ["<pad>", "<eos>", "<bos>", "<unk>"])
    assert PromptTokenizer.from_path(tmp_path).source.endswith("tokenizer.model")


def test_clean_prompt():
    assert clean_prompt("  pick_up the\nred block \n") == "pick up the red block"


def test_pi0_prompt_format(tokenizer, sentencepiece_processor):
    ids, mask = tokenize_pi0_prompt(tokenizer, " pick_up the red block\n", max_len=48)
    sp = sentencepiece_processor
    expected = [2, *sp.encode("pick up the red block"), *sp.encode("\n")]
    assert ids.dtype == np.int64 and mask.dtype == np.bool_ and ids.shape == mask.shape == (48,)
    assert ids[: len(expected)].tolist() == expected
    assert mask.tolist() == [True] * len(expected) + [False] * (48 - len(expected))
    assert (ids[len(expected) :] == 0).all()
    assert sp.decode(ids[mask].tolist()).startswith("pick up the red block")


def test_pi05_prompt_format(tokenizer, sentencepiece_processor):
    state = np.array([-1.5, -1.0, 0.0, 0.5, 0.999, 1.0])
    ids, mask = tokenize_pi05_prompt(tokenizer, "stack_the blocks", state, max_len=200)
    text = "Task: stack the blocks, State: -1 0 128 192 255 255;\nAction: "
    expected = sentencepiece_processor.encode(text, add_bos=True)
    assert expected[0] == 2
    assert ids[: mask.sum()].tolist() == expected and mask.sum() == len(expected)
    assert not mask[len(expected) :].any() and (ids[len(expected) :] == 0).all()
    assert sentencepiece_processor.decode(ids[mask].tolist()) == text.rstrip()


def test_pi05_without_state_uses_pi0_format(tokenizer):
    pi05_ids, pi05_mask = tokenize_pi05_prompt(tokenizer, "open the drawer", None, max_len=32)
    pi0_ids, pi0_mask = tokenize_pi0_prompt(tokenizer, "open the drawer", max_len=32)
    np.testing.assert_array_equal(pi05_ids, pi0_ids)
    np.testing.assert_array_equal(pi05_mask, pi0_mask)


def test_pi05_state_errors(tokenizer):
    with pytest.raises(InputError, match="1-D"):
        tokenize_pi05_prompt(tokenizer, "open", np.zeros((2, 3)), max_len=64)
    with pytest.raises(InputError, match="NaN"):
        tokenize_pi05_prompt(tokenizer, "open", np.array([0.0, np.nan]), max_len=64)
    with pytest.raises(InputError, match="expected a string"):
        tokenize_pi0_prompt(tokenizer, None, max_len=64)


def test_prompt_truncation_warns(tokenizer):
    prompt = "pick up the red block and place it in the bowl " * 4
    full = tokenizer.encode(clean_prompt(prompt), add_bos=True) + tokenizer.encode("\n", add_bos=False)
    with pytest.warns(CortexFlowWarning, match=f"{len(full)} tokens long but the limit is 8"):
        ids, mask = tokenize_pi0_prompt(tokenizer, prompt, max_len=8)
    assert ids.tolist() == full[:8] and mask.all()


def test_discretize_state_edges():
    values = np.array([-1.5, -1.0, -0.99, 0.0, 0.5, 0.999, 1.0, 3.0])
    assert discretize_state(values).tolist() == [-1, 0, 1, 128, 192, 255, 255, 255]
    assert discretize_state(values).dtype == np.int64


def test_discretize_state_matches_floor_formula(rng):
    values = rng.uniform(-1, 1, size=1000)
    expected = np.floor((values + 1) * 128).astype(np.int64)
    assert (np.abs(discretize_state(values) - expected) <= 1).all()
    assert (discretize_state(values) == expected).mean() > 0.99


def test_tokenize_ids(rng):
    tokens = rng.integers(0, 320, size=12)
    ids, mask = tokenize_ids(tokens.tolist(), max_len=20, vocab_size=320)
    assert ids.dtype == np.int64 and ids[:12].tolist() == tokens.tolist() and (ids[12:] == 0).all()
    assert mask.tolist() == [True] * 12 + [False] * 8
    ids_from_tensor, _ = tokenize_ids(torch.from_numpy(tokens.astype(np.int32)), max_len=20, vocab_size=320)
    np.testing.assert_array_equal(ids_from_tensor, ids)
    with pytest.warns(CortexFlowWarning, match="12 tokens long but the limit is 5"):
        truncated, truncated_mask = tokenize_ids(tokens, max_len=5, vocab_size=320)
    assert truncated.tolist() == tokens[:5].tolist() and truncated_mask.all()


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        ([5, -1, 7], r"ids \[-1\] outside the vocabulary"),
        ([5, 320, 400, 7], r"ids \[320, 400\] outside the vocabulary.*\[0, 320\)"),
        ([], "non-empty 1-D"),
        ([[1, 2], [3, 4]], "non-empty 1-D"),
        ([1.0, 2.5], "integer token ids"),
    ],
)
def test_tokenize_ids_errors(tokens, message):
    with pytest.raises(InputError, match=message):
        tokenize_ids(tokens, max_len=16, vocab_size=320)


def test_openvla_pixels_are_the_normalisation_formula_bit_for_bit():
    """The table lookup gives exactly ``(u / 255 - mean) / std`` computed in fp32 tensors, per view and
    channel, for every uint8 value, at the model size and through the resize path."""
    import torch

    from cortexflow.processing.vla_inputs import (
        DINO_MEAN, DINO_STD, SIGLIP_MEAN, SIGLIP_STD, prepare_openvla_image, resize_naive,
    )

    rng = np.random.default_rng(3)
    every_value = np.arange(256, dtype=np.uint8).repeat(3 * 196).reshape(224, 224, 3)
    for image in (every_value, rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
                  rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)):
        pixels = torch.from_numpy(resize_naive(image, 224)).permute(2, 0, 1).float() / 255.0
        expected = torch.cat([(pixels - torch.tensor(m)[:, None, None]) / torch.tensor(s)[:, None, None]
                              for m, s in ((DINO_MEAN, DINO_STD), (SIGLIP_MEAN, SIGLIP_STD))])
        got = prepare_openvla_image(image, 224)
        assert got.shape == (6, 224, 224) and got.dtype == torch.float32 and got.is_contiguous()
        assert torch.equal(got, expected)
