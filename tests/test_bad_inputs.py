"""Every bad input raises a CortexFlow error type whose message says what was wrong.

All engines are tiny random Pi0 / Pi0.5 models on CPU in fp32 (2 camera views, chunk 5, action_dim 8,
vocabulary 320), written to disk in the real openpi layout and loaded through the public factories.
"""

import json
import re
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import cortexflow as cf
from cortexflow import (
    BackendUnavailableError,
    CheckpointError,
    ConfigError,
    CortexFlowError,
    CortexFlowWarning,
    InputError,
    NormStatsError,
    TokenizerError,
)
from cortexflow.random_checkpoint import tiny_model_config, write_checkpoint

ACTION_DIM = 8
CHUNK = 5
VOCAB = 320
STATE = np.linspace(-0.5, 0.5, ACTION_DIM).astype(np.float32)
TOKENS = [2, 17, 42, 108]
UNUSED_DOWN_PROJ = "paligemma_with_expert.paligemma.model.language_model.layers.1.mlp.down_proj.weight"


def _engine(path, **kwargs):
    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("dtype", "float32")
    kwargs.setdefault("num_views", 2)
    kwargs.setdefault("chunk_size", CHUNK)  # the chunk these tests are written for
    kwargs.setdefault("num_steps", 3)
    return cf.create_pi0_inference(path, **kwargs)


def _images(num_views=2, height=48, width=64):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(num_views, height, width, 3), dtype=np.uint8)


def _write_norm_stats(path, dim):
    stats = {
        "norm_stats": {
            "state": {"mean": [0.1] * dim, "std": [0.5] * dim},
            "actions": {"mean": [0.0] * dim, "std": [1.0] * dim},
        }
    }
    path.write_text(json.dumps(stats))
    return path


@pytest.fixture(scope="module")
def pi0_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("pi0"), tiny_model_config("pi0"), seed=0)


@pytest.fixture(scope="module")
def pi05_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("pi05"), tiny_model_config("pi05"), seed=0)


@pytest.fixture(scope="module")
def state_dict(pi0_dir):
    return load_file(str(pi0_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def engine(pi0_dir):
    return _engine(pi0_dir)


def test_good_call_works(engine):
    """The baseline every other test changes one thing of."""
    actions = engine.predict(_images(), state=STATE, prompt_tokens=TOKENS)
    assert actions.shape == (CHUNK, ACTION_DIM)
    assert np.isfinite(actions).all()


# ---- images ---------------------------------------------------------------------------------
@pytest.mark.parametrize("count", [1, 3])
def test_wrong_image_count(engine, count):
    images = list(_images(count))
    with pytest.raises(InputError, match=rf"got {count} camera views, expected num_views=2"):
        engine.predict(images, state=STATE, prompt_tokens=TOKENS)


def test_single_image_for_two_views(engine):
    with pytest.raises(InputError, match=r"single HWC image .* num_views=2"):
        engine.predict(_images(1)[0], state=STATE, prompt_tokens=TOKENS)


def test_chw_image(engine):
    chw = [np.zeros((3, 48, 64), np.uint8)] * 2
    with pytest.raises(InputError, match=r"view 0 has shape \(3, 48, 64\) with 64 channels.*looks like CHW"):
        engine.predict(chw, state=STATE, prompt_tokens=TOKENS)


def test_two_dimensional_image(engine):
    with pytest.raises(InputError, match=r"view 0 has rank 2 .*expected an HWC image"):
        engine.predict([np.zeros((48, 64), np.uint8)] * 2, state=STATE, prompt_tokens=TOKENS)


def test_four_channel_image(engine):
    rgba = [np.zeros((48, 64, 4), np.uint8)] * 2
    with pytest.raises(InputError, match=r"view 0 has shape \(48, 64, 4\) with 4 channels"):
        engine.predict(rgba, state=STATE, prompt_tokens=TOKENS)


def test_image_array_of_wrong_rank(engine):
    with pytest.raises(InputError, match=r"images have rank 5"):
        engine.predict(np.zeros((1, 2, 48, 64, 3), np.uint8), state=STATE, prompt_tokens=TOKENS)


@pytest.mark.parametrize("dtype", [np.int32, np.bool_])
def test_wrong_image_dtype(engine, dtype):
    images = _images().astype(dtype)
    with pytest.raises(InputError, match=rf"view 0 has dtype {np.dtype(dtype)}; expected uint8"):
        engine.predict(images, state=STATE, prompt_tokens=TOKENS)


def test_float_image_out_of_range(engine):
    images = _images().astype(np.float32)  # [0, 255] floats: forgot to scale
    with pytest.raises(InputError, match=r"float view 0 has values in \[0, 255\]; expected uint8 in \[0, 255\] or float in \[-1, 1\]"):
        engine.predict(images, state=STATE, prompt_tokens=TOKENS)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_image(engine, bad):
    images = np.zeros((2, 48, 64, 3), np.float32)
    images[1, 5, 5, 0] = bad
    with pytest.raises(InputError, match=r"view 1 contains NaN or inf"):
        engine.predict(images, state=STATE, prompt_tokens=TOKENS)


def test_image_masks_all_false(engine):
    with pytest.raises(InputError, match=r"image_masks are all False"):
        engine.predict(_images(), state=STATE, prompt_tokens=TOKENS, image_masks=[False, False])


def test_image_masks_wrong_length(engine):
    with pytest.raises(InputError, match=r"image_masks has shape \(3,\); expected 2 booleans"):
        engine.predict(_images(), state=STATE, prompt_tokens=TOKENS, image_masks=[True, True, False])


# ---- state ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_state(engine, bad):
    state = STATE.copy()
    state[3] = bad
    with pytest.raises(InputError, match=r"state contains NaN or inf at indices \[3\]"):
        engine.predict(_images(), state=state, prompt_tokens=TOKENS)


def test_state_too_long(engine):
    with pytest.raises(InputError, match=rf"state has length {ACTION_DIM + 1}; the model takes at most {ACTION_DIM}"):
        engine.predict(_images(), state=np.zeros(ACTION_DIM + 1), prompt_tokens=TOKENS)


def test_state_not_one_dimensional(engine):
    with pytest.raises(InputError, match=r"state must be a non-empty 1-D array, got shape \(2, 4\)"):
        engine.predict(_images(), state=np.zeros((2, 4)), prompt_tokens=TOKENS)


def test_state_not_numbers(engine):
    with pytest.raises(InputError, match=r"state must be a 1-D array of numbers"):
        engine.predict(_images(), state=["a", "b"], prompt_tokens=TOKENS)


def test_state_length_differs_from_norm_stats(pi0_dir, tmp_path):
    stats = _write_norm_stats(tmp_path / "norm_stats.json", dim=6)
    engine = _engine(pi0_dir, norm_stats_path=str(stats))
    assert engine.predict(_images(), state=np.zeros(6), prompt_tokens=TOKENS).shape == (CHUNK, ACTION_DIM)
    with pytest.raises(InputError, match=r"state has length 8 but the norm stats describe a state of length 6"):
        engine.predict(_images(), state=STATE, prompt_tokens=TOKENS)


def test_pi0_without_state(engine):
    with pytest.raises(InputError, match=r"pi0 policy needs the robot state: pass state="):
        engine.predict(_images(), prompt_tokens=TOKENS)


# ---- prompt ---------------------------------------------------------------------------------
def test_string_prompt_without_tokenizer(engine):
    with pytest.raises(TokenizerError, match=r"a string prompt needs a tokenizer: pass tokenizer_path="):
        engine.predict(_images(), "pick up the cube", STATE)


def test_prompt_and_prompt_tokens(engine):
    with pytest.raises(InputError, match=r"either task_prompt or prompt_tokens, not both"):
        engine.predict(_images(), "pick up the cube", STATE, prompt_tokens=TOKENS)


def test_no_prompt(engine):
    with pytest.raises(InputError, match=r"no prompt: pass task_prompt"):
        engine.predict(_images(), state=STATE)


@pytest.mark.parametrize("bad_id", [VOCAB, -1, 10**6])
def test_prompt_tokens_out_of_vocab(engine, bad_id):
    with pytest.raises(InputError, match=rf"prompt_tokens contain ids \[{bad_id}\] outside the vocabulary; expected ids in \[0, {VOCAB}\)"):
        engine.predict(_images(), state=STATE, prompt_tokens=[2, bad_id, 5])


def test_prompt_tokens_not_integers(engine):
    with pytest.raises(InputError, match=r"prompt_tokens have dtype float64; expected integer token ids"):
        engine.predict(_images(), state=STATE, prompt_tokens=[2.0, 3.5])


def test_prompt_tokens_empty(engine):
    with pytest.raises(InputError, match=r"prompt_tokens have shape \(0,\); expected a non-empty 1-D list"):
        engine.predict(_images(), state=STATE, prompt_tokens=[])


def test_prompt_not_a_string(engine):
    with pytest.raises(InputError, match=r"task_prompt must be a string, got int"):
        engine.predict(_images(), 42, STATE)


def test_prompt_longer_than_max_is_truncated_with_warning(pi0_dir, tiny_tokenizer_path):
    engine = _engine(pi0_dir, tokenizer_path=str(tiny_tokenizer_path), max_tokenize_len=12)
    long_prompt = "pick up the red block and place it in the bowl then open the top drawer"
    with pytest.warns(CortexFlowWarning, match=r"prompt is \d+ tokens long but the limit is 12; truncated to 12 tokens"):
        actions = engine.predict(_images(), long_prompt, STATE)
    assert actions.shape == (CHUNK, ACTION_DIM)
    assert np.isfinite(actions).all()
    with warnings.catch_warnings():  # a short prompt gives no warning
        warnings.simplefilter("error", CortexFlowWarning)
        engine.predict(_images(), "cup", STATE)


# ---- norm stats -----------------------------------------------------------------------------
def test_normalize_without_norm_stats(pi0_dir):
    with pytest.raises(NormStatsError, match=r"normalize=True but no norm stats were given"):
        _engine(pi0_dir, normalize=True)


def test_norm_stats_of_unequal_lengths(pi0_dir, tmp_path):
    path = tmp_path / "norm_stats.json"
    path.write_text(json.dumps({"norm_stats": {"state": {"mean": [0.0, 1.0], "std": [1.0]},
                                               "actions": {"mean": [0.0], "std": [1.0]}}}))
    with pytest.raises(NormStatsError, match=r"'state'.*different lengths"):
        _engine(pi0_dir, norm_stats_path=str(path))


def test_norm_stats_not_json(pi0_dir, tmp_path):
    path = tmp_path / "norm_stats.json"
    path.write_text("{not json")
    with pytest.raises(NormStatsError, match=r"cannot read norm stats JSON .*norm_stats.json"):
        _engine(pi0_dir, norm_stats_path=str(path))


def test_norm_stats_with_nan(pi0_dir, tmp_path):
    path = tmp_path / "norm_stats.json"
    path.write_text(json.dumps({"state": {"mean": [0.0, float("nan")], "std": [1.0, 1.0]},
                                "actions": {"mean": [0.0, 0.0], "std": [1.0, 1.0]}}))
    with pytest.raises(NormStatsError, match=r"'mean' contains NaN or inf"):
        _engine(pi0_dir, norm_stats_path=str(path))


def test_norm_stats_path_missing(pi0_dir, tmp_path):
    with pytest.raises(NormStatsError, match=r"norm stats path .*nowhere.json does not exist"):
        _engine(pi0_dir, norm_stats_path=str(tmp_path / "nowhere.json"))


# ---- noise and batches ----------------------------------------------------------------------
def test_noise_of_wrong_shape(engine):
    with pytest.raises(InputError, match=rf"noise has shape \(3, {ACTION_DIM}\); expected \({CHUNK}, {ACTION_DIM}\)"):
        engine.predict(_images(), state=STATE, prompt_tokens=TOKENS, noise=np.zeros((3, ACTION_DIM)))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_noise_not_finite(engine, bad):
    noise = np.zeros((CHUNK, ACTION_DIM), np.float32)
    noise[0, 0] = bad
    with pytest.raises(InputError, match=r"noise contains NaN or inf"):
        engine.predict(_images(), state=STATE, prompt_tokens=TOKENS, noise=noise)


def test_predict_batch_mismatched_lengths(engine):
    images = [_images(), _images()]
    with pytest.raises(InputError, match=r"batch_states has 1 entries but batch_images has 2"):
        engine.predict_batch(images, batch_states=[STATE], batch_prompt_tokens=[TOKENS, TOKENS])
    with pytest.raises(InputError, match=r"batch_prompt_tokens has 3 entries but batch_images has 2"):
        engine.predict_batch(images, batch_states=[STATE, STATE], batch_prompt_tokens=[TOKENS] * 3)


def test_predict_batch_noise_of_wrong_batch(engine):
    with pytest.raises(InputError, match=rf"noise has shape \(1, {CHUNK}, {ACTION_DIM}\); expected \(2, {CHUNK}, {ACTION_DIM}\)"):
        engine.predict_batch([_images(), _images()], batch_states=[STATE, STATE],
                             batch_prompt_tokens=[TOKENS, TOKENS], noise=np.zeros((1, CHUNK, ACTION_DIM)))


def test_predict_batch_empty(engine):
    with pytest.raises(InputError, match=r"empty batch"):
        engine.predict_batch([])


# ---- checkpoints ----------------------------------------------------------------------------
def _save_variant(tmp_path, tensors):
    directory = tmp_path / "ckpt"
    directory.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"))
    return directory


def test_checkpoint_path_does_not_exist(tmp_path):
    missing = tmp_path / "no_such_checkpoint"
    with pytest.raises(CheckpointError, match=r"checkpoint path .*no_such_checkpoint.* does not exist"):
        _engine(missing)


def test_checkpoint_folder_without_weights(tmp_path):
    with pytest.raises(CheckpointError, match=r"no model.safetensors .*in"):
        _engine(tmp_path)


def test_corrupt_checkpoint(tmp_path):
    directory = tmp_path / "corrupt"
    directory.mkdir()
    (directory / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match=r"corrupt.model\.safetensors is not a valid safetensors file"):
        _engine(directory)


def test_truncated_checkpoint(pi0_dir, tmp_path):
    data = (pi0_dir / "model.safetensors").read_bytes()
    directory = tmp_path / "truncated"
    directory.mkdir()
    (directory / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated.model\.safetensors is truncated: tensor 'paligemma_with_expert\..*' ends at byte"):
        _engine(directory)


def test_checkpoint_of_another_model(tmp_path):
    llama = {
        "model.embed_tokens.weight": torch.zeros(16, 8),
        "model.layers.0.self_attn.q_proj.weight": torch.zeros(8, 8),
        "model.layers.0.mlp.down_proj.weight": torch.zeros(8, 16),
    }
    directory = _save_variant(tmp_path, llama)
    with pytest.raises(CheckpointError, match=r"ckpt is not a Pi0/Pi0.5 checkpoint: .*model\.layers\.0\.self_attn\.q_proj\.weight"):
        _engine(directory)


def test_missing_tensor(state_dict, tmp_path):
    directory = _save_variant(tmp_path, {k: v for k, v in state_dict.items() if k != UNUSED_DOWN_PROJ})
    with pytest.raises(CheckpointError, match=r"missing tensors: " + re.escape(UNUSED_DOWN_PROJ)):
        _engine(directory)


def test_mis_shaped_tensor(state_dict, tmp_path):
    tensors = dict(state_dict)
    tensors["action_out_proj.weight"] = torch.zeros(3, 3)
    directory = _save_variant(tmp_path, tensors)
    with pytest.raises(CheckpointError, match=r"mis-shaped tensors: action_out_proj\.weight \[3, 3\] \(expected \[8, 32\]\)"):
        _engine(directory)


def test_integer_typed_tensor(state_dict, tmp_path):
    tensors = dict(state_dict)
    tensors["action_out_proj.bias"] = state_dict["action_out_proj.bias"].to(torch.int32)
    directory = _save_variant(tmp_path, tensors)
    with pytest.raises(CheckpointError, match=r"wrongly typed tensors: action_out_proj\.bias I32 \(expected a float type\)"):
        _engine(directory)


def test_unexpected_tensor(state_dict, tmp_path):
    tensors = dict(state_dict)
    tensors["paligemma_with_expert.extra_head.weight"] = torch.zeros(2, 2)
    directory = _save_variant(tmp_path, tensors)
    with pytest.raises(CheckpointError, match=r"unexpected tensors: paligemma_with_expert\.extra_head\.weight"):
        _engine(directory)


def test_nan_in_weight(state_dict, tmp_path):
    tensors = dict(state_dict)
    weight = state_dict["action_in_proj.weight"].clone()
    weight[0, 0] = float("nan")
    tensors["action_in_proj.weight"] = weight
    directory = _save_variant(tmp_path, tensors)
    with pytest.raises(CheckpointError, match=r"tensor 'action_in_proj\.weight' in .*ckpt contains NaN or inf"):
        _engine(directory)


def test_pi05_checkpoint_with_pi0_factory(pi05_dir):
    with pytest.raises(CheckpointError, match=r"holds a pi05 model .*not pi0; use create_pi05_inference"):
        _engine(pi05_dir)


def test_pi0_checkpoint_with_pi05_factory(pi0_dir):
    with pytest.raises(CheckpointError, match=r"holds a pi0 model .*not pi05; use create_pi0_inference"):
        cf.create_pi05_inference(pi0_dir, device="cpu", dtype="float32")


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.* is not a \.safetensors file"):
        _engine(path)


# ---- backend, device, dtype, config -----------------------------------------------------------
def test_unknown_backend(pi0_dir):
    with pytest.raises(ConfigError, match=r"unknown backend 'tensorflow'"):
        _engine(pi0_dir, backend="tensorflow")


def test_backend_not_available(pi0_dir):
    with pytest.raises(BackendUnavailableError, match=r"backend 'cuda' is not available in this version"):
        _engine(pi0_dir, backend="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_triton_backend_needs_a_gpu(pi0_dir, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match=r"triton backend runs on a CUDA GPU"):
        _engine(pi0_dir, backend="triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_without_gpu(pi0_dir):
    with pytest.raises(BackendUnavailableError, match=r"device 'cuda' asked for but no CUDA GPU is available"):
        _engine(pi0_dir, device="cuda")


def test_unknown_device(pi0_dir):
    with pytest.raises(BackendUnavailableError, match=r"unknown device 'gpu0'"):
        _engine(pi0_dir, device="gpu0")


@pytest.mark.parametrize("dtype", ["float64", "int8", "fp8"])
def test_bad_dtype(pi0_dir, dtype):
    with pytest.raises(ConfigError, match=rf"unsupported dtype '{dtype}'; expected bfloat16, float16 or float32"):
        _engine(pi0_dir, dtype=dtype)


def test_bad_num_views(pi0_dir):
    with pytest.raises(ConfigError, match=r"num_views must be a positive integer, got 0"):
        _engine(pi0_dir, num_views=0)


def test_unknown_model_config_field(pi0_dir):
    with pytest.raises(ConfigError, match=r"unknown ModelConfig field\(s\) \['hidden_size'\]"):
        _engine(pi0_dir, model_config={"hidden_size": 12})


def test_every_error_is_a_cortexflow_error():
    for error in (InputError, ConfigError, CheckpointError, TokenizerError, NormStatsError, BackendUnavailableError):
        assert issubclass(error, CortexFlowError)
