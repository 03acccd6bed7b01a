"""RT-1 from a TF2 checkpoint written by TensorFlow itself (``fixtures/rt1_tiny``, see its
``make_rt1_tiny.py``: tensorflow-cpu 2.21 + tf-keras 2.21), read without TensorFlow: logits against the
Keras model's over an episode longer than the history window, actions, the engine's episode state and
its bad inputs, broken checkpoint files, and the safetensors conversion."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import cortexflow as cf
from cortexflow.checkpoints.rt1_layout import (
    SUFFIX,
    actor_prefix,
    load_rt1_checkpoint,
    match_tf_checkpoint,
)
from cortexflow.checkpoints.tf_bundle import TensorBundle
from cortexflow.errors import CheckpointError, InputError, TokenizerError
from cortexflow.models.rt1 import RT1Config, detokenize_actions

FIXTURE = Path(__file__).parent / "fixtures" / "rt1_tiny"
# What make_rt1_tiny.py fixes and the checkpoint cannot tell (the other dimensions are read from it).
CONFIG = RT1Config(image_size=64, input_size=(48, 64), width=0.2, depth=0.5)


@pytest.fixture(scope="module")
def expected():
    return np.load(FIXTURE / "outputs.npz")


@pytest.fixture(scope="module")
def engine():
    return cf.create_rt1_inference(FIXTURE, device="cpu", model_config=CONFIG)


def test_fixture_was_written_by_tensorflow(expected):
    assert str(expected["tf_version"]).startswith("2.21")
    bundle = TensorBundle(FIXTURE / "ckpt-1.index")
    assert "_CHECKPOINTABLE_OBJECT_GRAPH" in bundle.entries
    assert actor_prefix(bundle.entries) == "agent/_actor_network/"


def test_reader_values_and_layouts():
    """Spot values read by the bundle reader land in torch layout (Keras conv / Dense / MHA transposes)."""
    bundle = TensorBundle(FIXTURE)
    model, weights, report = load_rt1_checkpoint(FIXTURE, CONFIG)
    p = "agent/_actor_network/"
    stem = bundle.read(p + "_image_tokenizer/_tokenizer/net/layer_with_weights-1/kernel" + SUFFIX)
    np.testing.assert_array_equal(weights["tokenizer.stem.conv"].numpy(), stem.transpose(3, 2, 0, 1))
    query = bundle.read(p + "_transformer/_layers/1/mha1/_query_dense/kernel" + SUFFIX)  # (D, H, Dh)
    np.testing.assert_array_equal(weights["transformer.layers.1.q.weight"].numpy(), query.reshape(query.shape[0], -1).T)
    dw = bundle.read(p + "_image_tokenizer/_tokenizer/net/layer_with_weights-3/depthwise_kernel" + SUFFIX)
    np.testing.assert_array_equal(weights["tokenizer.blocks.0.dw.conv"].numpy(), dw.transpose(2, 3, 0, 1))
    assert (model.config.num_layers, model.config.time_steps, model.config.num_tokens) == (2, 3, 4)
    assert report.ok and report.skipped == 1  # the object graph


def test_episode_matches_keras(engine, expected):
    """Five frames through a 3-frame window: every step's logits within 1e-4 of Keras (fp32), tokens and
    de-tokenised actions exact."""
    engine.reset()
    for step, frame in enumerate(expected["frames"]):
        actions = engine.predict(frame, expected["context"])
        logits = engine.buffers(1)["logits"][0].numpy()
        assert np.abs(logits - expected["logits"][step]).max() <= 1e-4
        np.testing.assert_array_equal(engine.last_tokens[0], expected["tokens"][step])
        reference = detokenize_actions(expected["tokens"][step], engine.config.actions, engine.config.vocab_size)
        for name, value in reference.items():
            np.testing.assert_array_equal(actions[name], value)
    assert engine.frames_seen()[0] == len(expected["frames"])


def test_reset_starts_a_new_episode_and_batch_keeps_episodes_apart(engine, expected):
    frames, context = expected["frames"], expected["context"]
    engine.reset()
    engine.predict(frames[0], context)
    engine.predict(frames[1], context)
    engine.reset()
    engine.predict(frames[0], context)
    np.testing.assert_array_equal(engine.last_tokens[0], expected["tokens"][0])
    uint8 = (frames[2] * 255).round().astype(np.uint8)
    batch = engine.predict_batch([frames[0], uint8], [context, -context])
    np.testing.assert_array_equal(engine.last_tokens[0], expected["tokens"][0])
    batch_again = engine.predict_batch([frames[1], uint8], np.stack([context, -context]), reset=[False, True])
    np.testing.assert_array_equal(engine.last_tokens[0], expected["tokens"][1])
    np.testing.assert_array_equal(batch_again["world_vector"][1], batch["world_vector"][1])
    np.testing.assert_array_equal(engine.frames_seen(2), [2, 1])
    single = cf.create_rt1_inference(FIXTURE, device="cpu", model_config=CONFIG).predict(uint8, -context)
    np.testing.assert_array_equal(single["world_vector"], batch["world_vector"][1])


def test_bad_inputs(engine, expected):
    frame, context = expected["frames"][0], expected["context"]
    with pytest.raises(InputError, match=r"\(48, 64, 3\)"):
        engine.predict(np.zeros((64, 64, 3), np.uint8), context)
    with pytest.raises(InputError, match="dtype int16"):
        engine.predict(np.zeros((48, 64, 3), np.int16), context)
    with pytest.raises(InputError, match=r"within \[0, 1\]"):
        engine.predict(frame * 255, context)
    with pytest.raises(InputError, match="16-D instruction embedding"):
        engine.predict(frame, np.ones(15, np.float32))
    with pytest.raises(InputError, match="instruction_embedding"):
        engine.predict(frame)
    with pytest.raises(TokenizerError, match="use_model_path"):
        engine.predict(frame, task_prompt="pick up the can")
    with pytest.raises(InputError, match="reset has 1 flags for 2 episodes"):
        engine.predict_batch([frame, frame], [context, context], reset=[True])


def test_task_prompt_through_a_text_encoder(expected):
    calls = []

    def encoder(text):
        calls.append(text)
        return expected["context"]

    engine = cf.create_rt1_inference(FIXTURE, device="cpu", model_config=CONFIG, text_encoder=encoder)
    engine.predict(expected["frames"][0], task_prompt="pick up the can")
    engine.predict(expected["frames"][1], task_prompt="pick up the can")
    assert calls == ["pick up the can"]
    np.testing.assert_array_equal(engine.last_tokens[0], expected["tokens"][1])


def test_use_model_without_tensorflow_says_what_to_install(tmp_path):
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        with pytest.raises(TokenizerError, match="pip install tensorflow-cpu"):
            cf.create_rt1_inference(FIXTURE, device="cpu", model_config=CONFIG, use_model_path=tmp_path)
    else:
        with pytest.raises(TokenizerError, match="saved_model.pb"):
            cf.create_rt1_inference(FIXTURE, device="cpu", model_config=CONFIG, use_model_path=tmp_path)


def test_missing_variables_are_all_named():
    bundle = TensorBundle(FIXTURE)
    shapes = {name: entry.shape for name, entry in bundle.entries.items()}
    removed = ["agent/_actor_network/_transformer/_layers/1/ff/bias" + SUFFIX,
               "agent/_actor_network/_image_tokenizer/_tokenizer/net/layer_with_weights-8/moving_variance" + SUFFIX,
               "agent/_actor_network/_image_tokenizer/_token_learner/layernorm/gamma" + SUFFIX]
    for name in removed:
        del shapes[name]
    shapes["agent/_actor_network/_transformer/_extra/kernel" + SUFFIX] = (3,)
    model, _, _ = load_rt1_checkpoint(FIXTURE, CONFIG)
    _, report = match_tf_checkpoint(shapes, model, "agent/_actor_network/")
    assert sorted(report.missing) == sorted(removed)
    assert report.unexpected == ["agent/_actor_network/_transformer/_extra/kernel" + SUFFIX]
    with pytest.raises(CheckpointError) as err:
        report.raise_if_bad("ckpt")
    for name in removed:
        assert name in str(err.value)


def test_wrong_configuration_is_reported_as_mis_shaped():
    with pytest.raises(CheckpointError, match="mis-shaped"):
        load_rt1_checkpoint(FIXTURE, CONFIG.replace(width=0.4))


def test_broken_files(tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, copy)
    data = copy / "ckpt-1.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_rt1_checkpoint(copy, CONFIG)
    data.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_rt1_checkpoint(copy, CONFIG)
    index = copy / "ckpt-1.index"
    index.write_bytes(index.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(CheckpointError, match="magic"):
        TensorBundle(index)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_rt1_checkpoint(tmp_path / "nowhere", CONFIG)
    saved_model = tmp_path / "saved_model"
    (saved_model / "variables").mkdir(parents=True)
    (saved_model / "saved_model.pb").write_bytes(b"")
    with pytest.raises(CheckpointError, match="SavedModel"):
        load_rt1_checkpoint(saved_model, CONFIG)


def test_cli_convert_writes_safetensors_that_give_the_same_step(tmp_path, expected):
    from typer.testing import CliRunner

    from cortexflow.cli import app

    overrides = json.dumps({"image_size": 64, "input_size": [48, 64], "width": 0.2, "depth": 0.5})
    result = CliRunner().invoke(app, ["convert", str(FIXTURE / "ckpt-1"), str(tmp_path / "rt1"), "--model-config",
                                      overrides])
    assert result.exit_code == 0, result.output
    assert "skipped 1 variable" in result.output
    converted = cf.create_rt1_inference(tmp_path / "rt1", device="cpu")
    model, weights, _ = load_rt1_checkpoint(FIXTURE, CONFIG)
    assert converted.config == model.config
    converted.predict(expected["frames"][0], expected["context"])
    np.testing.assert_array_equal(converted.last_tokens[0], expected["tokens"][0])
    assert torch.equal(converted.weights["transformer.output.weight"], weights["transformer.output.weight"])
    bad = CliRunner().invoke(app, ["convert", str(FIXTURE), str(tmp_path / "x"), "--model", "pi0"])
    assert bad.exit_code == 2 and "TensorFlow checkpoint (RT-1)" in bad.output


def test_cli_info_describes_rt1_source_and_converted_checkpoints(tmp_path):
    from typer.testing import CliRunner

    from cortexflow.checkpoints.rt1_layout import is_converted_rt1, is_rt1_checkpoint
    from cortexflow.cli import app

    runner = CliRunner()
    overrides = json.dumps({"image_size": 64, "input_size": [48, 64], "width": 0.2, "depth": 0.5})
    source = runner.invoke(app, ["info", str(FIXTURE), "--model-config", overrides, "--json"])
    assert source.exit_code == 0, source.output
    report = json.loads(source.output)
    model, weights, _ = load_rt1_checkpoint(FIXTURE, CONFIG)
    assert report["model_type"] == "rt1" and report["layout"] == "tf2-checkpoint" and report["ok"]
    assert report["num_parameters"] == sum(t.numel() for t in weights.values())
    assert report["config"] == json.loads(json.dumps(model.config.to_dict()))
    assert runner.invoke(app, ["convert", str(FIXTURE), str(tmp_path / "rt1"), "--model-config", overrides]).exit_code == 0
    assert is_converted_rt1(tmp_path / "rt1") and is_converted_rt1(tmp_path / "rt1" / "model.safetensors")
    assert not is_rt1_checkpoint(tmp_path / "rt1") and not is_converted_rt1(FIXTURE)
    converted = runner.invoke(app, ["info", str(tmp_path / "rt1")])
    assert converted.exit_code == 0, converted.output
    assert "rt1" in converted.output and "safetensors" in converted.output
    assert "3 frames x (4 image + 11 action tokens) = 45 tokens" in converted.output
    with_config = runner.invoke(app, ["info", str(tmp_path / "rt1"), "--config", "pi0_droid"])
    assert with_config.exit_code == 2 and "RT-1 checkpoints have none" in with_config.output
    # a wrong configuration is a checkpoint error naming the mis-shaped variables, not a Pi0 message
    wrong = runner.invoke(app, ["info", str(FIXTURE), "--model-config", json.dumps({"image_size": 64, "input_size":
                                                                                     [48, 64], "width": 0.4})])
    assert wrong.exit_code != 0 and "mis-shaped" in wrong.output and "Pi0" not in wrong.output
