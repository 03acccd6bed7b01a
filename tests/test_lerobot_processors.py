"""LeRobot processor files (``policy_preprocessor.json`` / ``policy_postprocessor.json`` + stats safetensors) read as
a pipeline: every normalisation mode against LeRobot's formulas (``docs/reference_facts.md#F-LR-4``), relative
actions and their excluded joints (3.7), camera slots and empty cameras (3.8), prompt formats (3.6), and whole
tiny Pi0 / Pi0.5 policies against a reference written here from those formulas."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import cortexflow as cf
from cortexflow.cli import app
from cortexflow.config import VLAModelType
from cortexflow.errors import ConfigError, InputError
from cortexflow.policies import FeatureNormalizer, lerobot_pipeline
from cortexflow.policies.lerobot_processors import relative_mask
from cortexflow.policies.transforms import CameraSlots, EngineRequest
from cortexflow.processing import NormStats, PromptTokenizer
from cortexflow.random_checkpoint import tiny_model_config, write_checkpoint
from cortexflow.serving.policy import PolicyOptions, build_policy

ENGINE = dict(device="cpu", dtype="float32", use_cuda_graphs=False)
STATE_DIM, ACTION_DIM = 7, 6
ACTION_NAMES = ["shoulder_pan", "shoulder_lift", "elbow", "wrist_flex", "wrist_roll", "Gripper_pos"]
CAMERAS = ["observation.images.top", "observation.images.wrist"]
EPS = 1e-8


def random_stats(rng, dim):
    low = rng.uniform(-2.0, -0.5, dim)
    return {"mean": rng.normal(0, 0.5, dim), "std": rng.uniform(0.3, 2.0, dim), "min": low - 0.5,
            "max": low + rng.uniform(2.0, 4.0, dim), "q01": low, "q99": low + rng.uniform(1.0, 3.0, dim),
            "q10": low + 0.2, "q90": low + rng.uniform(0.8, 2.0, dim), "count": np.array([1000.0])}


# ---- normalisation formulas -----------------------------------------------------------------------------------
def lerobot_formula(mode, x, s, inverse):
    """LeRobot ``normalize_processor`` on (x, stats s), written from the spec's table."""
    if mode == "MEAN_STD":
        return x * s["std"] + s["mean"] if inverse else (x - s["mean"]) / (s["std"] + EPS)
    low, high = {"MIN_MAX": ("min", "max"), "QUANTILES": ("q01", "q99"), "QUANTILE10": ("q10", "q90")}[mode]
    spread = s[high] - s[low]
    spread = np.where(spread == 0, EPS, spread)
    return (x + 1) / 2 * spread + s[low] if inverse else 2 * (x - s[low]) / spread - 1


@pytest.mark.parametrize("mode", ["MEAN_STD", "MIN_MAX", "QUANTILES", "QUANTILE10", "IDENTITY"])
def test_every_lerobot_mode_matches_the_formulas(mode):
    rng = np.random.default_rng(hash(mode) % 2**32)
    stats = random_stats(rng, 5)
    stats["max"][2] = stats["min"][2]  # zero ranges take eps, not +eps everywhere
    stats["q99"][2] = stats["q01"][2]
    stats["q90"][2] = stats["q10"][2]
    norm_stats = NormStats(**{k: v for k, v in stats.items() if k != "count"})
    normalizer = FeatureNormalizer("state", mode, norm_stats, convention="lerobot")
    x = rng.normal(size=(3, 5)).astype(np.float32)
    if mode == "IDENTITY":
        np.testing.assert_array_equal(normalizer.normalize(x), x)
        np.testing.assert_array_equal(normalizer.unnormalize(x), x)
        return
    s32 = {k: v.astype(np.float32) for k, v in stats.items()}
    np.testing.assert_allclose(normalizer.normalize(x), lerobot_formula(mode, x, s32, False), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(normalizer.unnormalize(x), lerobot_formula(mode, x, s32, True), rtol=1e-5, atol=1e-5)
    keep = [0, 1, 3, 4]  # round trip wherever the range is not zero
    np.testing.assert_allclose(normalizer.unnormalize(normalizer.normalize(x))[:, keep], x[:, keep], rtol=1e-4, atol=1e-4)


def test_openpi_and_lerobot_numerics_differ_as_documented():
    rng = np.random.default_rng(0)
    stats = NormStats(mean=rng.normal(size=4), std=np.array([1e-7, 1.0, 2.0, 0.5]), q01=-np.ones(4), q99=np.ones(4))
    x = rng.normal(size=(2, 4)).astype(np.float32)
    openpi = FeatureNormalizer("actions", "MEAN_STD", stats)
    lerobot = FeatureNormalizer("actions", "MEAN_STD", stats, convention="lerobot")
    np.testing.assert_allclose(openpi.unnormalize(x), x * (stats.std + 1e-6) + stats.mean, rtol=1e-6)
    np.testing.assert_allclose(lerobot.unnormalize(x), x * stats.std + stats.mean, rtol=1e-6)
    quantile = FeatureNormalizer("actions", "QUANTILES", stats)
    np.testing.assert_allclose(quantile.normalize(x), (x + 1) / (2 + 1e-6) * 2 - 1, rtol=1e-5)
    with pytest.raises(ConfigError, match="openpi normalises with MEAN_STD or QUANTILES, not MIN_MAX"):
        FeatureNormalizer("state", "MIN_MAX", stats)
    with pytest.raises(Exception, match="lack min, max, needed for MIN_MAX"):
        FeatureNormalizer("state", "MIN_MAX", stats, convention="lerobot")


def test_relative_mask_excludes_joints_by_substring():
    assert relative_mask(6, ["gripper"], ACTION_NAMES) == (True,) * 5 + (False,)
    assert relative_mask(8, ["WRIST"], ACTION_NAMES) == (True, True, True, False, False, True, True, True)
    assert relative_mask(4, ["gripper"], None) == (True,) * 4
    assert relative_mask(4, [], ACTION_NAMES) == (True,) * 4


def test_camera_slots_put_present_cameras_first():
    rng = np.random.default_rng(4)
    top, wrist = (rng.integers(0, 256, (20, 30, 3), dtype=np.uint8) for _ in range(2))
    slots = CameraSlots(tuple(CAMERAS), empty=1)
    out = slots(EngineRequest(images={CAMERAS[1]: wrist}))
    assert len(out.images) == 3 and out.image_masks == [True, False, False]
    np.testing.assert_array_equal(out.images[0], wrist)
    assert not out.images[1].any() and out.images[1].shape == wrist.shape
    full = slots(EngineRequest(images={CAMERAS[1]: wrist, CAMERAS[0]: top}))
    np.testing.assert_array_equal(full.images[0], top)
    assert full.image_masks == [True, True, False]
    with pytest.raises(InputError, match="unknown camera.*observation.images.side"):
        slots(EngineRequest(images={"observation.images.side": top}))


# ---- whole policies -------------------------------------------------------------------------------------------
def write_lerobot_policy(directory, model_type, rng, norm_map, relative=True, max_length=120, extra_pre_steps=()):
    """A tiny LeRobot folder as LeRobot >= 0.5.1 writes it: weights, config.json, both processor files and the
    normaliser / unnormaliser stats safetensors."""
    model = tiny_model_config(model_type, action_dim=32, chunk_size=8)
    write_checkpoint(directory, model, seed=int(rng.integers(1000)), layout="lerobot")
    config = json.loads((directory / "config.json").read_text())
    config.update({
        "input_features": {CAMERAS[0]: {"type": "VISUAL", "shape": [3, 224, 224]},
                           "observation.state": {"type": "STATE", "shape": [STATE_DIM]},
                           CAMERAS[1]: {"type": "VISUAL", "shape": [3, 224, 224]}},
        "output_features": {"action": {"type": "ACTION", "shape": [ACTION_DIM]}},
        "empty_cameras": 1, "use_relative_actions": relative, "relative_exclude_joints": ["gripper"],
        "normalization_mapping": norm_map,
    })
    (directory / "config.json").write_text(json.dumps(config))
    stats = {"observation.state": random_stats(rng, STATE_DIM), "action": random_stats(rng, ACTION_DIM),
             CAMERAS[0]: {"mean": rng.random((3, 1, 1)), "std": rng.random((3, 1, 1))}}
    flat = {f"{key}.{field}": torch.tensor(value, dtype=torch.float32)
            for key, fields in stats.items() for field, value in fields.items()}
    pre_name, post_name = "policy_preprocessor", "policy_postprocessor"
    features = {k: {"type": v["type"], "shape": v["shape"]} for k, v in config["input_features"].items()}
    normalizer = {"registry_name": "normalizer_processor",
                  "config": {"eps": EPS, "features": features, "norm_map": norm_map}}
    relative_step = {"registry_name": "relative_actions_processor",
                     "config": {"enabled": relative, "exclude_joints": ["gripper"], "action_names": ACTION_NAMES}}
    tokenizer = {"registry_name": "tokenizer_processor",
                 "config": {"max_length": max_length, "task_key": "task", "padding_side": "right",
                            "padding": "max_length", "truncation": True, "tokenizer_name": "google/paligemma-3b-pt-224"}}
    device = {"registry_name": "device_processor", "config": {"device": "cpu", "float_dtype": None}}
    head = [{"registry_name": "rename_observations_processor", "config": {"rename_map": {}}},
            {"registry_name": "to_batch_processor", "config": {}}]
    if model_type == VLAModelType.PI0:
        steps = [*head, {"registry_name": "pi0_new_line_processor", "config": {}}, tokenizer, device,
                 relative_step, normalizer]
    else:
        steps = [*head, relative_step, normalizer,
                 {"registry_name": "pi05_prepare_state_tokenizer_processor_step", "config": {}}, tokenizer, device]
    steps += list(extra_pre_steps)
    index = steps.index(normalizer)
    normalizer["state_file"] = f"{pre_name}_step_{index}_normalizer_processor.safetensors"
    save_file(flat, str(directory / normalizer["state_file"]))
    unnormalizer = {"registry_name": "unnormalizer_processor",
                    "state_file": f"{post_name}_step_0_unnormalizer_processor.safetensors",
                    "config": {"eps": EPS, "features": {"action": {"type": "ACTION", "shape": [ACTION_DIM]}},
                               "norm_map": norm_map}}
    save_file(flat, str(directory / unnormalizer["state_file"]))
    post = [unnormalizer, {"registry_name": "absolute_actions_processor", "config": {"enabled": relative}},
            {"registry_name": "device_processor", "config": {"device": "cpu", "float_dtype": None}}]
    (directory / f"{pre_name}.json").write_text(json.dumps({"name": pre_name, "steps": steps}))
    (directory / f"{post_name}.json").write_text(json.dumps({"name": post_name, "steps": post}))
    return model, {k: {f: np.asarray(v, np.float32) for f, v in fields.items()} for k, fields in stats.items()}


CASES = {
    "pi0_mean_std_relative": (VLAModelType.PI0, {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"}, True),
    "pi0_quantiles_absolute": (VLAModelType.PI0, {"VISUAL": "IDENTITY", "STATE": "QUANTILES", "ACTION": "QUANTILES"}, False),
    "pi05_min_max_quantile10": (VLAModelType.PI05, {"VISUAL": "IDENTITY", "STATE": "MIN_MAX", "ACTION": "QUANTILE10"}, True),
    "pi05_mean_std": (VLAModelType.PI05, {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"}, False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_lerobot_policy_equals_the_reference(case, tmp_path, tiny_tokenizer_path):
    model_type, norm_map, relative = CASES[case]
    rng = np.random.default_rng(abs(hash(case)) % 2**32)
    model, stats = write_lerobot_policy(tmp_path, model_type, rng, norm_map, relative)
    create = cf.create_pi05_inference if model_type == VLAModelType.PI05 else cf.create_pi0_inference
    engine = create(tmp_path, tokenizer_path=tiny_tokenizer_path, **ENGINE)
    assert engine.num_views == 3 and engine.config.max_token_len == 120 and engine.chunk_size == 8

    top, wrist = (rng.integers(0, 256, (60, 80, 3), dtype=np.uint8) for _ in range(2))
    state = rng.normal(0, 1, STATE_DIM).astype(np.float32)
    noise = rng.standard_normal((8, 32)).astype(np.float32)
    prompt = "pick_up the cup"
    actions = engine.predict({CAMERAS[0]: top, CAMERAS[1]: wrist}, prompt, state, noise=noise)

    # reference: slots -> normalise -> prompt -> model -> crop -> un-normalise -> absolute
    normalised = lerobot_formula(norm_map["STATE"], state, stats["observation.state"], False).astype(np.float32)
    weights_only = tmp_path / "weights_only"  # the same weights without processor files: the model alone
    weights_only.mkdir()
    for name in ("model.safetensors", "config.json"):
        shutil.copy(tmp_path / name, weights_only / name)
    plain = create(weights_only, tokenizer_path=tiny_tokenizer_path, num_views=3,
                   model_config={"chunk_size": 8, "max_token_len": 120}, **ENGINE)
    images, masks = [top, wrist, np.zeros_like(top)], [True, True, False]
    if model_type == VLAModelType.PI0:
        tokenizer = PromptTokenizer.from_path(tiny_tokenizer_path)
        ids = tokenizer.encode(prompt + "\n", add_bos=True)
        raw = plain.predict(images, None, normalised, noise=noise, prompt_tokens=np.array(ids), image_masks=masks)
    else:
        raw = plain.predict(images, prompt, normalised, noise=noise, image_masks=masks)
    expected = lerobot_formula(norm_map["ACTION"], raw[:, :ACTION_DIM], stats["action"], True)
    if relative:
        expected[:, :5] += state[:5]  # every joint but the gripper
    assert actions.shape == (8, ACTION_DIM)
    np.testing.assert_allclose(actions, expected, rtol=1e-4, atol=1e-4)


def test_pi05_state_padding_before_the_state_tokens(tmp_path, tiny_tokenizer_path):
    """LeRobot 0.4.x wrote the state zero-padded to 32 into the prompt: opt in with ``state_prompt_width``."""
    rng = np.random.default_rng(11)
    norm_map = {"VISUAL": "IDENTITY", "STATE": "QUANTILES", "ACTION": "QUANTILES"}
    write_lerobot_policy(tmp_path, VLAModelType.PI05, rng, norm_map, relative=False, max_length=200)
    padded = cf.create_pi05_inference(tmp_path, tokenizer_path=tiny_tokenizer_path, state_prompt_width=32, **ENGINE)
    unpadded = cf.create_pi05_inference(tmp_path, tokenizer_path=tiny_tokenizer_path, **ENGINE)
    state = rng.normal(size=STATE_DIM).astype(np.float32)
    images = {CAMERAS[0]: rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)}
    short = unpadded.preprocessor(images, "stack", state)["token_mask"].sum()
    long = padded.preprocessor(images, "stack", state)["token_mask"].sum()
    # 25 extra state numbers, each " 128" (normalised 0 -> bin 128): at least one token each
    assert int(long) >= int(short) + 25
    tokenizer = PromptTokenizer.from_path(tiny_tokenizer_path)
    ids = padded.preprocessor(images, "stack", state)["token_ids"]
    assert tokenizer.decode(ids.tolist()).rstrip().endswith("128 128;\nAction:")


def test_tokenizer_saved_beside_the_weights_is_used(tmp_path, tiny_tokenizer_path):
    rng = np.random.default_rng(12)
    norm_map = {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"}
    write_lerobot_policy(tmp_path, VLAModelType.PI0, rng, norm_map)
    preprocessor = json.loads((tmp_path / "policy_preprocessor.json").read_text())
    step = next(s for s in preprocessor["steps"] if s["registry_name"] == "tokenizer_processor")
    step["config"]["tokenizer_name"] = "tokenizer"
    (tmp_path / "policy_preprocessor.json").write_text(json.dumps(preprocessor))
    (tmp_path / "tokenizer").mkdir()
    shutil.copy(tiny_tokenizer_path, tmp_path / "tokenizer" / "tokenizer.model")
    saved = cf.create_pi0_inference(tmp_path, **ENGINE)
    given = cf.create_pi0_inference(tmp_path, tokenizer_path=tiny_tokenizer_path, **ENGINE)
    images = {CAMERAS[0]: rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)}
    state = rng.normal(size=STATE_DIM)
    for name in ("token_ids", "token_mask"):
        np.testing.assert_array_equal(saved.preprocessor(images, "open the drawer", state)[name],
                                      given.preprocessor(images, "open the drawer", state)[name])


def test_serve_a_lerobot_folder(tmp_path, tiny_tokenizer_path):
    """``cortexflow serve --checkpoint DIR`` on a LeRobot folder: raw observations, the processors applied."""
    rng = np.random.default_rng(13)
    norm_map = {"VISUAL": "IDENTITY", "STATE": "QUANTILES", "ACTION": "MEAN_STD"}
    write_lerobot_policy(tmp_path, VLAModelType.PI05, rng, norm_map)
    lines = []
    served = build_policy(PolicyOptions(checkpoint=str(tmp_path), device="cpu", seed=1, cuda_graphs=False,
                                        tokenizer=str(tiny_tokenizer_path)), log=lines.append)
    assert served.mapping.name == "raw" and served.engine.num_views == 3 and served.metadata["state_dim"] == STATE_DIM
    held = served.engine.weight_bytes()
    assert held["host"] == 0 and lines[-1] == f"weights: {held['device'] / 2**30:.2f} GiB on cpu"  # the table: on a GPU
    served.warmup()
    observation = served.example_observation(seed=2, height=40, width=56)
    actions = served.predict(observation)
    direct = served.engine.predict(list(observation["images"]), observation["prompt"], observation["state"],
                                   noise=served._noise)
    assert actions.shape == (8, ACTION_DIM)
    np.testing.assert_array_equal(actions, direct)


def test_unknown_processor_steps_are_named(tmp_path):
    rng = np.random.default_rng(2)
    norm_map = {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"}
    write_lerobot_policy(tmp_path, VLAModelType.PI0, rng, norm_map, extra_pre_steps=[
        {"registry_name": "image_crop_processor", "config": {}}, {"class": "my_pkg.MyStep", "config": {}}])
    with pytest.raises(ConfigError, match="step 7: image_crop_processor; step 8: class my_pkg.MyStep"):
        lerobot_pipeline(tmp_path)
    with pytest.raises(ConfigError, match="image_crop_processor"):
        cf.create_pi0_inference(tmp_path, **ENGINE)


def test_info_lists_the_lerobot_steps(tmp_path):
    rng = np.random.default_rng(3)
    norm_map = {"VISUAL": "IDENTITY", "STATE": "MIN_MAX", "ACTION": "QUANTILES"}
    write_lerobot_policy(tmp_path, VLAModelType.PI05, rng, norm_map)
    result = CliRunner().invoke(app, ["info", str(tmp_path), "--json"])
    transforms = json.loads(result.output)["transforms"]
    steps = transforms["steps"]
    assert transforms["source"].startswith("LeRobot processors")
    assert steps[0].startswith("camera slots ['observation.images.top', 'observation.images.wrist'] + 1 empty")
    assert steps[1].startswith("normalise state: MIN_MAX (min/max, lerobot eps 1e-08, 7 dims)")
    assert steps[-3:] == ["keep action dims 0..5", "un-normalise actions: QUANTILES (q01/q99, lerobot eps 1e-08, 6 dims)",
                          "absolute actions: add the state to dims 0-4 (of 6)"]
