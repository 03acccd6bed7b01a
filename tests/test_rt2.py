"""The RT-2-style policy over PaliGemma (SigLIP + Gemma-2B) on CPU with tiny random openpi / LeRobot checkpoints.

Covered: loading the PaliGemma part of Pi0-layout checkpoints, KV-cached decoding against a no-cache
recompute (prefix-LM mask), the image reaching the actions, openpi's binning map, the VQA prompt,
quantile un-normalisation by hand, bad inputs, and the Triton backend under the interpreter.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import cortexflow as cf
from cortexflow.models.rt2_keys import FINAL_NORM
from cortexflow.errors import CheckpointError, InputError, NormStatsError
from cortexflow.processing.action_tokens import (
    binning_action_id_range,
    binning_bins_to_tokens,
    binning_tokens_to_values,
)
from cortexflow.random_token_vla import tiny_rt2_config, write_rt2_checkpoint

# The Triton backend runs on the GPU where there is one, else under TRITON_INTERPRET=1 (set by conftest).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

PROMPT = "pick up the red block"


def _image(kind: str) -> np.ndarray:
    if kind == "black":
        return np.zeros((224, 224, 3), np.uint8)
    if kind == "white":
        return np.full((224, 224, 3), 255, np.uint8)
    return np.random.default_rng(int(kind)).integers(0, 256, (240, 320, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def config():
    return tiny_rt2_config()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, config):
    return write_rt2_checkpoint(tmp_path_factory.mktemp("rt2_openpi"), config, seed=4)


@pytest.fixture(scope="module")
def engine(checkpoint, config, tiny_tokenizer_path):
    return cf.create_rt2_inference(checkpoint, device="cpu", dtype="float32", tokenizer_path=tiny_tokenizer_path,
                                   model_config=config, constrained_decoding=False)


def test_binning_map():
    vocab = 257152
    assert binning_bins_to_tokens([0, 255], vocab).tolist() == [vocab - 129, vocab - 384]
    assert binning_tokens_to_values([vocab - 129, vocab - 129 - 128, vocab - 384], vocab).tolist() == [
        -1.0, 0.0, 255 / 256 * 2 - 1]
    assert binning_action_id_range(vocab) == (vocab - 384, vocab - 128)
    bins = np.arange(256)
    assert (binning_tokens_to_values(binning_bins_to_tokens(bins, vocab), vocab) == bins / 128 - 1).all()


def test_loads_paligemma_part_of_openpi_and_lerobot_layouts(tmp_path, config, engine):
    assert engine.checkpoint_report.layout == "openpi"
    assert any("gemma_expert" in k for k in engine.checkpoint_report.skipped)
    lerobot = write_rt2_checkpoint(tmp_path, config, seed=4, layout="lerobot")
    other = cf.create_rt2_inference(lerobot, device="cpu", dtype="float32", model_config=config,
                                    constrained_decoding=False)
    assert other.checkpoint_report.layout == "lerobot"
    ids = engine.prompt_ids(PROMPT)
    a = engine.predict(_image("1"), prompt_tokens=ids)
    b = other.predict(_image("1"), prompt_tokens=ids)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (config.chunk_size, config.action_dim)


def test_vqa_prompt_ids(engine, tiny_tokenizer_path):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(tiny_tokenizer_path))
    text = f"Q: what action should the robot take to {PROMPT}? A:"
    assert engine.prompt_ids(PROMPT) == [2, *sp.encode(text), *sp.encode("\n")]


@pytest.mark.parametrize("constrained", [False, True])
def test_kv_cached_decode_equals_full_recompute(engine, constrained):
    engine.constrained = constrained
    try:
        engine.predict(_image("2"), PROMPT)
        ids = engine.prompt_ids(PROMPT)
        pixels = engine.model.prepare_image(_image("2"))[None]
        with torch.inference_mode():
            reference = engine.model.reference_tokens(engine.backend, engine.weights, pixels, torch.tensor([ids]),
                                                      constrained)
        assert engine.last_tokens.tolist() == reference[0].tolist()
        if constrained:
            lo, hi = engine.model.action_id_range
            assert ((engine.last_tokens >= lo) & (engine.last_tokens < hi)).all()
    finally:
        engine.constrained = False


def test_black_and_white_images_give_different_tokens(engine):
    engine.predict(_image("black"), PROMPT)
    black = engine.last_tokens.copy()
    engine.predict(_image("white"), PROMPT)
    assert black.tolist() != engine.last_tokens.tolist()


def test_quantile_unnormalisation_by_hand(tmp_path, checkpoint, config, tiny_tokenizer_path):
    stats = {"norm_stats": {"actions": {"mean": [0, 0], "std": [1, 1], "q01": [-2.0, 0.0], "q99": [2.0, 10.0]},
                            "state": {"mean": [0], "std": [1], "q01": [0], "q99": [1]}}}
    (tmp_path / "norm_stats.json").write_text(json.dumps(stats))
    engine = cf.create_rt2_inference(checkpoint, device="cpu", dtype="float32", tokenizer_path=tiny_tokenizer_path,
                                     norm_stats_path=tmp_path / "norm_stats.json", model_config=config)
    actions = engine.predict(_image("1"), PROMPT)
    norm = binning_tokens_to_values(engine.last_tokens, config.vocab_size).reshape(config.chunk_size, -1)
    expected = norm.copy()
    expected[:, 0] = (norm[:, 0] + 1) / 2 * (4.0 + 1e-6) - 2.0
    expected[:, 1] = (norm[:, 1] + 1) / 2 * (10.0 + 1e-6)
    np.testing.assert_allclose(actions, expected, rtol=1e-5, atol=1e-6)
    too_wide = {"norm_stats": {"actions": {"q01": [0.0] * 5, "q99": [1.0] * 5}, "state": {"q01": [0], "q99": [1]}}}
    (tmp_path / "norm_stats.json").write_text(json.dumps(too_wide))
    with pytest.raises(NormStatsError, match="5-D action statistics"):
        cf.create_rt2_inference(checkpoint, device="cpu", dtype="float32", norm_stats_path=tmp_path / "norm_stats.json",
                                model_config=config)


def test_missing_final_norm_is_named(tmp_path, config):
    from safetensors.torch import load_file, save_file

    write_rt2_checkpoint(tmp_path, config, seed=0)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state[FINAL_NORM]
    state["paligemma_with_expert.paligemma.model.surprise"] = torch.zeros(2)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="language_model.norm.weight.*surprise"):
        cf.create_rt2_inference(tmp_path, device="cpu", dtype="float32", model_config=config)


def test_bad_inputs(engine):
    with pytest.raises(InputError, match="CHW"):
        engine.predict(_image("black").transpose(2, 0, 1), PROMPT)
    with pytest.raises(InputError, match="NaN"):
        engine.predict(np.full((8, 8, 3), np.nan, np.float32), PROMPT)
    with pytest.raises(InputError, match="task_prompt"):
        engine.predict(_image("black"), None)
    with pytest.raises(InputError, match="at most 64"):
        engine.predict(_image("black"), "pick up the block " * 20)


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """The tiny RT-2 with 56 px images (16 image tokens instead of 256), for the Triton interpreter."""
    config = tiny_rt2_config(image_size=56)
    return write_rt2_checkpoint(tmp_path_factory.mktemp("rt2_56px"), config, seed=4), config


@pytest.mark.parametrize("options", [{}, {"decode_gemv": "off", "decode_qkv_rope": False, "decode_head": False,
                                          "fold_token_norms": False, "fused_combine": "off"}],
                         ids=["default", "unfused decode"])
def test_triton_backend_matches_pytorch(small_checkpoint, tiny_tokenizer_path, options):
    """Same tokens and chunk on the Triton backend, with the default fused decode path and with every token
    switch of TritonOptions off (cuBLAS decode steps, separate norms, QKV/RoPE and combine kernels)."""
    pytest.importorskip("triton")
    from cortexflow.backends.triton_backend import TritonBackend

    checkpoint, config = small_checkpoint
    engine = cf.create_rt2_inference(checkpoint, device="cpu", dtype="float32", tokenizer_path=tiny_tokenizer_path,
                                     model_config=config, constrained_decoding=False)
    triton_engine = cf.create_rt2_inference(checkpoint, backend=TritonBackend.configured(**options),
                                            device=TRITON_DEVICE, dtype="float32",
                                            model_config=config, constrained_decoding=False)
    ids = engine.prompt_ids(PROMPT)
    expected = engine.predict(_image("1"), prompt_tokens=ids)
    got = triton_engine.predict(_image("1"), prompt_tokens=ids)
    assert triton_engine.last_tokens.tolist() == engine.last_tokens.tolist()
    np.testing.assert_array_equal(got, expected)
