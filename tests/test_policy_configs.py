"""openpi policy configs as data: each registered config's actions against a reference pipeline written here from
the spec's formulas (``docs/reference_facts.md#F-OP-4`` to ``F-OP-6``): robot state -> (ALOHA conversion) -> normalise ->
model -> un-normalise -> delta -> absolute -> robot slice -> (ALOHA conversion).

The model step of the reference is a plain engine on the same tiny checkpoint with no statistics, fed the state
normalised by the formulas here; the configured engine must give the same actions from the raw observation."""

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

import cortexflow as cf
from cortexflow.cli import app
from cortexflow.config import VLAModelType
from cortexflow.errors import ConfigError, InputError, NormStatsError
from cortexflow.policies import POLICY_CONFIGS, get_policy_config
from cortexflow.policies.transforms import AlohaActionsFromPi, AlohaStateToPi, EngineRequest, make_bool_mask
from cortexflow.random_checkpoint import tiny_model_config, write_checkpoint
from cortexflow.serving.policy import PolicyOptions, build_policy
from cortexflow.serving.robots import make_mapping

ROBOT_STATE = {"droid": 8, "libero": 8, "aloha": 14}
ROBOT_ACTIONS = {"droid": 8, "libero": 7, "aloha": 14}
ASSET_IDS = sorted({config.asset_id for config in POLICY_CONFIGS.values()})
ENGINE = dict(device="cpu", dtype="float32", use_cuda_graphs=False)
FLIP = np.array([1, -1, -1, 1, 1, 1, 1] * 2, dtype=np.float64)


def random_stats(rng, dim):
    q01 = rng.uniform(-2.0, -0.5, dim)
    return {"mean": rng.normal(0, 0.5, dim).tolist(), "std": rng.uniform(0.3, 2.0, dim).tolist(),
            "q01": q01.tolist(), "q99": (q01 + rng.uniform(1.0, 3.0, dim)).tolist()}


def write_assets(directory, rng, state_width=None, action_width=None, asset_ids=ASSET_IDS):
    """Every asset id's ``norm_stats.json``: state/action stats of the robot's width, or of ``*_width``."""
    stats = {}
    for asset in asset_ids:
        robot = next(c.robot for c in POLICY_CONFIGS.values() if c.asset_id == asset)
        entry = {"state": random_stats(rng, state_width or ROBOT_STATE[robot]),
                 "actions": random_stats(rng, action_width or ROBOT_ACTIONS[robot])}
        path = directory / "assets" / asset / "norm_stats.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"norm_stats": entry}))
        stats[asset] = {k: {f: np.asarray(v, np.float32) for f, v in e.items()} for k, e in entry.items()}
    return stats


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One tiny openpi-layout checkpoint per model type (action width 32, as published) with every asset."""
    rng = np.random.default_rng(17)
    out = {}
    for model_type in (VLAModelType.PI0, VLAModelType.PI05):
        directory = tmp_path_factory.mktemp(f"ckpt_{model_type.value}")
        config = tiny_model_config(model_type, action_dim=32)
        write_checkpoint(directory, config, seed=int(rng.integers(1000)))
        out[model_type] = (directory, config, write_assets(directory, rng))
    return out


def create(model_type):
    return cf.create_pi05_inference if model_type == VLAModelType.PI05 else cf.create_pi0_inference


# ---- the reference, from the spec's formulas -------------------------------------------------------------------
def aloha_state_to_pi(state):
    s = FLIP * state.astype(np.float64)
    for i in (6, 13):
        linear = s[i] * (0.05800 - 0.01844) + 0.01844
        angle = np.arcsin(np.clip((0.022**2 + linear**2 - 0.036**2) / (2 * 0.022 * linear), -1, 1))
        s[i] = (angle - 0.5476) / (1.6296 - 0.5476)
    return s


def aloha_actions_from_pi(actions):
    a = FLIP * actions[:, :14].astype(np.float64)
    a[:, [6, 13]] = (a[:, [6, 13]] + 0.5476 + 0.6213) / (1.4910 + 0.6213)
    return a


def normalise(x, stats, quantile):
    d = x.shape[-1]
    if quantile:
        return (x - stats["q01"][:d]) / (stats["q99"][:d] - stats["q01"][:d] + 1e-6) * 2 - 1
    return (x - stats["mean"][:d]) / (stats["std"][:d] + 1e-6)


def unnormalise(x, stats, quantile):
    x = x.astype(np.float64).copy()
    n = len(stats["mean"])
    if quantile:
        x[:, :n] = (x[:, :n] + 1) / 2 * (stats["q99"] - stats["q01"] + 1e-6) + stats["q01"]
    else:
        x[:, :n] = x[:, :n] * (stats["std"] + 1e-6) + stats["mean"]
    return x


def reference_actions(policy, model, stats, request, noise):
    """The spec's pipeline around ``model`` (a statistics-free engine) for one mapped request."""
    state = np.asarray(request.state, np.float64)
    if policy.robot == "aloha":
        state = aloha_state_to_pi(state)
    quantile = policy.model_type == VLAModelType.PI05
    normalised = normalise(state, stats["state"], quantile).astype(np.float32)
    prompt = request.prompt if request.prompt is not None else policy.default_prompt
    raw = model.predict(request.images, prompt, normalised, noise=noise, image_masks=request.image_masks)
    actions = unnormalise(raw, stats["actions"], quantile)
    mask = make_bool_mask(*policy.delta_mask)
    if mask:
        actions[:, : len(mask)] += np.where(mask, state[: len(mask)], 0.0)
    actions = actions[:, : ROBOT_ACTIONS[policy.robot]]
    return aloha_actions_from_pi(actions) if policy.robot == "aloha" else actions


def plain_engine(directory, config, policy, tokenizer):
    model_config = config.replace(chunk_size=policy.action_horizon, max_token_len=policy.token_len,
                                  discrete_state_input=policy.state_in_prompt)
    return create(policy.model_type)(directory, num_views=3, tokenizer_path=tokenizer, model_config=model_config,
                                     **ENGINE)


@pytest.mark.parametrize("name", sorted(POLICY_CONFIGS))
def test_config_actions_equal_the_reference_pipeline(name, checkpoints, tiny_tokenizer_path):
    """``serve --config NAME`` on a robot observation, and the engine it builds (``create_*(config=NAME)``)."""
    policy = get_policy_config(name)
    directory, config, stats = checkpoints[policy.model_type]
    dims = {k: v for k, v in config.to_dict().items() if k not in ("chunk_size", "max_token_len", "discrete_state_input")}
    served = build_policy(PolicyOptions(checkpoint=str(directory), config=name, device="cpu", seed=len(name),
                                        tokenizer=str(tiny_tokenizer_path), cuda_graphs=False, model_config=dims))
    engine = served.engine
    assert engine.chunk_size == policy.action_horizon and engine.config.max_token_len == policy.token_len
    assert engine.config.discrete_state_input == policy.state_in_prompt and engine.num_views == 3
    assert served.mapping.name == policy.robot and served.metadata["policy_config"] == name
    assert served.metadata["action_dim"] == ROBOT_ACTIONS[policy.robot]
    reference = plain_engine(directory, config, policy, tiny_tokenizer_path)
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    observation = make_mapping(policy.robot).example_observation(int(rng.integers(1 << 30)), 96, 128)
    if policy.robot == "aloha":
        observation["state"] = rng.uniform(0.05, 0.95, 14)
    if policy.default_prompt is not None:
        del observation["prompt"]
    request = make_mapping(policy.robot).keys_only().to_engine(observation, policy.default_prompt)
    expected = reference_actions(policy, reference, stats[policy.asset_id], request, served._noise)

    actions = served.predict(observation)
    assert actions.shape == (policy.action_horizon, ROBOT_ACTIONS[policy.robot])
    np.testing.assert_allclose(actions, expected, rtol=1e-4, atol=1e-4)
    if policy.default_prompt is not None:  # the engine injects the config's prompt itself
        direct = engine.predict(request.images, None, request.state, noise=served._noise,
                                image_masks=request.image_masks)
        np.testing.assert_allclose(direct, expected, rtol=1e-4, atol=1e-4)


def test_batched_predict_adds_each_samples_state(checkpoints, tiny_tokenizer_path):
    directory, config, _ = checkpoints[VLAModelType.PI0]
    engine = cf.create_pi0_inference(directory, config="pi0_libero", tokenizer_path=tiny_tokenizer_path,
                                     model_config=config, **ENGINE)
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8) for _ in range(2)]
    states = [rng.normal(size=8).astype(np.float32) for _ in range(2)]
    noise = rng.standard_normal((2, 50, 32)).astype(np.float32)
    batch = engine.predict_batch(images, ["put the cup on the plate"] * 2, states, noise=noise)
    for i in range(2):
        single = engine.predict(images[i], "put the cup on the plate", states[i], noise=noise[i])
        np.testing.assert_allclose(batch[i], single, rtol=1e-4, atol=1e-4)


def test_32_long_stats_are_trimmed_to_the_state(tmp_path, tiny_tokenizer_path):
    """Stats written before 2025-06 cover the 32-padded state and actions; openpi trims them to the state."""
    rng = np.random.default_rng(5)
    config = tiny_model_config(VLAModelType.PI0, action_dim=32)
    write_checkpoint(tmp_path, config, seed=2)
    stats = write_assets(tmp_path, rng, state_width=32, action_width=32, asset_ids=["droid"])["droid"]
    policy = get_policy_config("pi0_droid")
    engine = cf.create_pi0_inference(tmp_path, config="pi0_droid", tokenizer_path=tiny_tokenizer_path,
                                     model_config=config, **ENGINE)
    request = make_mapping("droid").keys_only().to_engine(make_mapping("droid").example_observation(9, 64, 80))
    noise = rng.standard_normal((10, 32)).astype(np.float32)
    actions = engine.predict(request.images, request.prompt, request.state, noise=noise, image_masks=request.image_masks)
    reference = plain_engine(tmp_path, config, policy, tiny_tokenizer_path)
    np.testing.assert_allclose(actions, reference_actions(policy, reference, stats, request, noise), rtol=1e-4, atol=1e-4)


def test_aloha_conversion_uses_the_2025_07_constants():
    rng = np.random.default_rng(8)
    state = rng.uniform(0.05, 0.95, 14).astype(np.float32)
    converted = AlohaStateToPi()(EngineRequest(images=None, state=state)).state
    np.testing.assert_allclose(converted, aloha_state_to_pi(state), rtol=1e-5, atol=1e-6)
    actions = rng.normal(size=(4, 32)).astype(np.float32)
    np.testing.assert_allclose(AlohaActionsFromPi()(actions, None), aloha_actions_from_pi(actions), rtol=1e-5, atol=1e-6)
    # a closed Pi gripper angle (0 rad predicted) is (0.5476 + 0.6213) / 2.1123 of ALOHA's joint range
    zero = np.zeros((1, 14), np.float32)
    assert AlohaActionsFromPi()(zero, None)[0, 6] == pytest.approx(1.1689 / 2.1123, rel=1e-4)


def test_unknown_config_lists_the_valid_ones(checkpoints):
    directory, config, _ = checkpoints[VLAModelType.PI0]
    valid = "expected one of: pi0_aloha, .*pi05_droid, .*pi0_libero, "
    with pytest.raises(ConfigError, match=f"unknown policy config 'pi0_liberoo'; {valid}"):
        cf.create_pi0_inference(directory, config="pi0_liberoo", model_config=config, **ENGINE)


def test_config_model_type_must_match_factory_and_tensors(checkpoints):
    pi0_dir, pi0_config, _ = checkpoints[VLAModelType.PI0]
    pi05_dir, _, _ = checkpoints[VLAModelType.PI05]
    with pytest.raises(ConfigError, match="'pi05_libero' is a pi05 policy but create_pi0_inference is pi0"):
        cf.create_pi0_inference(pi0_dir, config="pi05_libero", model_config=pi0_config, **ENGINE)
    with pytest.raises(ConfigError, match="'pi0_libero' is a pi0 policy but the checkpoint .* is pi05"):
        cf.create_pi0_inference(pi05_dir, config="pi0_libero", model_config=pi0_config, **ENGINE)


def test_config_action_width_must_match_the_checkpoint(tmp_path):
    config = tiny_model_config(VLAModelType.PI0, action_dim=8)
    write_checkpoint(tmp_path, config)
    write_assets(tmp_path, np.random.default_rng(6), asset_ids=["droid"])
    with pytest.raises(ConfigError, match="'pi0_droid' runs a model with 32-D actions but the checkpoint's has 8-D"):
        cf.create_pi0_inference(tmp_path, config="pi0_droid", model_config=config, **ENGINE)


def test_norm_stats_missing_what_the_config_needs(tmp_path):
    config = tiny_model_config(VLAModelType.PI05, action_dim=32)
    write_checkpoint(tmp_path, config)
    with pytest.raises(NormStatsError, match="asset id 'droid'.*none"):
        cf.create_pi05_inference(tmp_path, config="pi05_droid", model_config=config, **ENGINE)
    rng = np.random.default_rng(1)
    write_assets(tmp_path, rng, asset_ids=["droid"])
    path = tmp_path / "assets" / "droid" / "norm_stats.json"
    data = json.loads(path.read_text())
    for group in data["norm_stats"].values():
        del group["q01"], group["q99"]
    path.write_text(json.dumps(data))
    with pytest.raises(NormStatsError, match="state statistics lack q01, q99, needed for QUANTILES"):
        cf.create_pi05_inference(tmp_path, config="pi05_droid", model_config=config, **ENGINE)
    write_assets(tmp_path, rng, state_width=6, asset_ids=["droid"])
    with pytest.raises(NormStatsError, match="cover 6 values but config 'pi05_droid' .* 8-value state"):
        cf.create_pi05_inference(tmp_path, config="pi05_droid", model_config=config, **ENGINE)


def test_delta_config_refuses_a_call_without_state(checkpoints, tiny_tokenizer_path):
    directory, config, _ = checkpoints[VLAModelType.PI05]
    engine = cf.create_pi05_inference(directory, config="pi05_aloha", tokenizer_path=tiny_tokenizer_path,
                                      model_config=config, **ENGINE)
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    with pytest.raises(InputError, match="state"):
        engine.predict(images, "fold the towel")


def test_serve_config_refuses_contradicting_options(checkpoints, tiny_tokenizer_path):
    directory, _, _ = checkpoints[VLAModelType.PI0]
    options = dict(checkpoint=str(directory), config="pi0_aloha_towel", device="cpu", tokenizer=str(tiny_tokenizer_path))
    with pytest.raises(ConfigError, match="--robot droid contradicts --config pi0_aloha_towel"):
        build_policy(PolicyOptions(robot="droid", **options))
    with pytest.raises(ConfigError, match="--model pi05 contradicts --config pi0_aloha_towel"):
        build_policy(PolicyOptions(model="pi05", **options))
    with pytest.raises(ConfigError, match="unknown policy config 'towel'"):
        build_policy(PolicyOptions(**{**options, "config": "towel"}))


def test_cli_configs_and_info_list_the_transforms(checkpoints, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["configs", "--json"])
    assert result.exit_code == 0, result.output
    assert [row["name"] for row in json.loads(result.output)] == list(POLICY_CONFIGS)
    directory, _, _ = checkpoints[VLAModelType.PI0]
    result = runner.invoke(app, ["info", str(directory), "--config", "pi0_aloha_towel", "--json"])
    steps = json.loads(result.output)["transforms"]["steps"]
    order = ["default prompt 'fold the towel'", "ALOHA state -> Pi", "normalise state: MEAN_STD", "tokenise prompt",
             "model: pi0", "un-normalise actions", "absolute actions: add the state to dims 0-5, 7-12",
             "keep action dims 0..13", "Pi actions -> ALOHA"]
    positions = [next(i for i, line in enumerate(steps) if line.startswith(prefix)) for prefix in order]
    assert positions == sorted(positions), steps
    result = runner.invoke(app, ["info", str(directory), "--config", "pi05_droid"])  # a pi0 checkpoint, droid stats
    assert "normalise state: QUANTILES" in result.output and "15 actions per chunk" in result.output
    listed = json.loads(runner.invoke(app, ["info", str(directory), "--config", "pi05_droid", "--json"]).output)
    assert "is a pi05 policy but the checkpoint holds a pi0 model" in listed["transforms"]["notes"][0]
    bare = tmp_path / "no_assets"
    bare.mkdir()
    shutil.copy(directory / "model.safetensors", bare / "model.safetensors")
    shutil.copy(directory / "config.json", bare / "config.json")
    result = runner.invoke(app, ["info", str(bare), "--config", "pi0_libero", "--json"])
    listed = json.loads(result.output)["transforms"]
    assert listed["steps"][0] == "normalise state: MEAN_STD, norm stats not found (see the note)"
    assert any(line.startswith("un-normalise actions: MEAN_STD, norm stats not found") for line in listed["steps"])
    assert "no norm stats for asset id 'physical-intelligence/libero'" in listed["notes"][0]
    result = runner.invoke(app, ["info", str(directory), "--config", "nope"])
    assert result.exit_code != 0 and "unknown policy config 'nope'" in result.output
