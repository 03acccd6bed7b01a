"""``serve --model rt1``: RT-1 behind the openpi protocol with one episode per connection. Two robots whose
requests interleave each get their own episode's actions (equal to a direct engine run of that episode
alone); ``reset`` starts a new episode; bad observations are bad requests and the connection goes on."""

from __future__ import annotations

import numpy as np
import pytest

import cortexflow as cf
from cortexflow.errors import ConfigError
from cortexflow.serving.policy import PolicyOptions, build_policy
from cortexflow.serving.history_policy import action_vector
from test_rt1_checkpoint import CONFIG, FIXTURE
from test_serving import TIMEOUT, openpi_client, within

# what the fixture's checkpoint cannot tell, as `serve --model-config` passes it
OVERRIDES = {"image_size": 64, "input_size": [48, 64], "width": 0.2, "depth": 0.5}
pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager:DeprecationWarning")


@pytest.fixture(scope="module")
def policy():
    return build_policy(PolicyOptions(checkpoint=str(FIXTURE), model="auto", robot=None, device="cpu",
                                      model_config=OVERRIDES))


def frames(seed, n, context_dim=16):
    """``n`` observations of one episode (the fixture's instruction embedding is 16-D)."""
    rng = np.random.default_rng(seed)
    h, w = CONFIG.input_size
    embedding = rng.standard_normal(context_dim).astype(np.float32)
    return [{"image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "instruction_embedding": embedding}
            for _ in range(n)]


def direct_episode(observations):
    engine = cf.create_rt1_inference(FIXTURE, device="cpu", model_config=CONFIG)
    layout = [(f.name, f.size) for f in engine.config.actions]
    out = []
    for obs in observations:
        if obs.get("reset"):
            engine.reset()
        out.append(action_vector(engine.predict(obs["image"], obs["instruction_embedding"]), layout))
    return out


def test_auto_detects_rt1_and_describes_the_action_layout(policy):
    meta = policy.metadata
    assert meta["model"] == "rt1" and meta["chunk_size"] == 1
    assert [name for name, _ in meta["action_layout"]][:2] == ["terminate_episode", "world_vector"]
    assert meta["action_dim"] == sum(size for _, size in meta["action_layout"])


def test_auto_detects_a_converted_rt1_folder(tmp_path):
    from cortexflow.checkpoints.rt1_layout import load_rt1_checkpoint, save_converted

    model, weights, _ = load_rt1_checkpoint(FIXTURE, OVERRIDES)
    save_converted(model, weights, tmp_path / "rt1")
    served = build_policy(PolicyOptions(checkpoint=str(tmp_path / "rt1"), model="auto", robot=None, device="cpu"))
    assert served.metadata["model"] == "rt1" and served.engine.config == model.config


def test_interleaved_robots_keep_their_own_episodes(openpi, start_server, policy):
    server = start_server(policy)
    robot_a, robot_b = openpi_client(openpi, server), openpi_client(openpi, server)
    episode_a, episode_b = frames(1, 5), frames(2, 5)
    episode_b[3]["reset"] = True
    replies_a, replies_b = [], []
    for obs_a, obs_b in zip(episode_a, episode_b):
        replies_a.append(within(TIMEOUT, robot_a.infer, obs_a)["actions"])
        replies_b.append(within(TIMEOUT, robot_b.infer, obs_b)["actions"])
    for got, want in zip(replies_a, direct_episode(episode_a)):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(replies_b, direct_episode(episode_b)):
        np.testing.assert_array_equal(got, want)
    # one shared episode would have given robot A other actions: the history matters for this model
    interleaved = [obs for pair in zip(episode_a, episode_b) for obs in pair]
    shared = direct_episode([{k: v for k, v in obs.items() if k != "reset"} for obs in interleaved])[0::2]
    assert any(not np.array_equal(got, mixed) for got, mixed in zip(replies_a, shared))


def test_bad_rt1_observations_are_bad_requests(openpi, start_server, policy):
    server = start_server(policy)
    robot = openpi_client(openpi, server)
    good = frames(3, 1)[0]
    for bad, message in (({**good, "instruction_embedding": np.zeros(7, np.float32)}, "16-D instruction embedding"),
                         ({**good, "image": np.zeros((10, 10, 3), np.uint8)}, "RT-1 takes"),
                         ({**good, "reset": "yes"}, "reset must be"),
                         ({"image": good["image"]}, "instruction_embedding")):
        with pytest.raises(RuntimeError, match=message):
            within(TIMEOUT, robot.infer, bad)
    assert within(TIMEOUT, robot.infer, good)["actions"].shape == (1, policy.metadata["action_dim"])


def test_serve_options_rt1_does_not_take():
    with pytest.raises(ConfigError, match="--model rt1 does not take: --steps"):
        build_policy(PolicyOptions(checkpoint=str(FIXTURE), model="rt1", robot=None, device="cpu", steps=3,
                                   model_config=OVERRIDES))
