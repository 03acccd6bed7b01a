"""``cortexflow serve --model openvla|rt2``: the openpi-protocol server in front of the token-decoding engines.

Tiny random checkpoints in the real on-disk formats (``random_token_vla`` writers), CPU fp32, loopback,
ephemeral ports; the client is the real ``openpi_client.WebsocketClientPolicy`` (see ``test_serving.py``,
whose fixtures and helpers are reused here).
"""

import logging

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cortexflow.cli import app
from cortexflow.errors import ConfigError, NormStatsError
from cortexflow.random_token_vla import (
    example_norm_stats,
    tiny_openvla_config,
    tiny_rt2_config,
    write_openvla_checkpoint,
    write_rt2_checkpoint,
)
from cortexflow.serving.loadtest import run_loadtest
from cortexflow.serving.policy import PolicyOptions, build_policy
from cortexflow.serving.robots import LiberoMapping
from test_serving import TIMEOUT, openpi_client, within

pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager:DeprecationWarning")

OPENVLA = tiny_openvla_config()
DATASETS = ("bridge_orig", "fractal")  # two datasets: --unnorm-key must pick one
PROMPT_IDS = np.array([1, 40, 41, 42, 43], dtype=np.int64)
runner = CliRunner()


@pytest.fixture(scope="module")
def openvla_dir(tmp_path_factory):
    """A tiny OpenVLA folder (sharded) whose config.json has action statistics for two datasets."""
    return write_openvla_checkpoint(tmp_path_factory.mktemp("openvla_serve"), OPENVLA, seed=3, dtype=torch.float32,
                                    norm_stats=example_norm_stats(OPENVLA.action_dim, DATASETS))


@pytest.fixture(scope="module")
def rt2_dir(tmp_path_factory):
    return write_rt2_checkpoint(tmp_path_factory.mktemp("rt2_serve"), tiny_rt2_config(), seed=4)


def openvla_options(checkpoint, robot="raw", **overrides):
    options = dict(checkpoint=str(checkpoint), model="openvla", robot=robot, device="cpu", unnorm_key="fractal",
                   model_config={"space_token_id": OPENVLA.space_token_id})
    return PolicyOptions(**{**options, **overrides})


def image(seed, size=40):
    return np.random.default_rng(seed).integers(0, 256, (size, size + 8, 3), dtype=np.uint8)


class Records(logging.Handler):
    """Collects the ``cortexflow.serving`` log messages (that logger may not propagate to the root)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


# ---- OpenVLA ----------------------------------------------------------------------------------------
def test_openvla_raw_over_openpi_client(openpi, start_server, openvla_dir):
    policy = build_policy(openvla_options(openvla_dir, "raw"))
    server = start_server(policy)
    client = openpi_client(openpi, server)
    meta = client.get_server_metadata()
    assert (meta["model"], meta["action_dim"], meta["chunk_size"], meta["num_views"]) == ("openvla", 7, 1, 1)
    assert meta["robot"] == "raw" and meta["robot_config"]["required_keys"] == ["image"]
    assert meta["unnorm_key"] == "fractal" and meta["actions_unnormalized"] and meta["state_dim"] is None
    replies = [within(TIMEOUT, client.infer, {"image": image(i), "prompt_tokens": PROMPT_IDS}) for i in range(2)]
    for i, reply in enumerate(replies):
        expected = policy.engine.predict(image(i), prompt_tokens=PROMPT_IDS)
        assert reply["actions"].shape == (1, 7) and reply["actions"].dtype == np.float32
        np.testing.assert_array_equal(reply["actions"][0], expected)
        assert reply["server_timing"]["infer_ms"] > 0 and "model" in reply["policy_timing"]
    # the "fractal" statistics, not "bridge_orig"'s: the gripper dim (unmasked) lies in [0, 1], the rest in q01..q99
    stats = example_norm_stats(7, DATASETS)["fractal"]["action"]
    assert np.all(replies[0]["actions"][0, :6] >= np.array(stats["q01"][:6]) - 1e-6)
    assert np.all(replies[0]["actions"][0, :6] <= np.array(stats["q99"][:6]) + 1e-6)


def test_openvla_libero_uses_the_primary_camera_and_prompt(openpi, start_server, openvla_dir, tiny_tokenizer_path):
    records, logger = Records(), logging.getLogger("cortexflow.serving")
    level = logger.level
    logger.addHandler(records)
    logger.setLevel(logging.INFO)
    try:
        policy = build_policy(openvla_options(openvla_dir, "libero", tokenizer=str(tiny_tokenizer_path)))
        server = start_server(policy, warmup=False)
        client = openpi_client(openpi, server)
        meta = client.get_server_metadata()
        assert meta["robot"] == "libero" and (meta["action_dim"], meta["chunk_size"]) == (7, 1)
        assert meta["prompt"]["text"] and meta["robot_config"]["used_keys"] == ["observation/image", "prompt"]
        assert set(meta["robot_config"]["ignored_keys"]) == {"observation/wrist_image", "observation/state"}
        for seed in range(2):
            obs = LiberoMapping().example_observation(seed, 40, 48)  # an openpi LIBERO client's observation
            reply = within(TIMEOUT, client.infer, obs)
            expected = policy.engine.predict(obs["observation/image"], obs["prompt"])
            assert reply["actions"].shape == (1, 7)
            np.testing.assert_array_equal(reply["actions"][0], expected)
        # the wrist image and state do not change the actions; a primary-camera-only request is enough
        bare = {"observation/image": obs["observation/image"], "prompt": obs["prompt"]}
        np.testing.assert_array_equal(within(TIMEOUT, client.infer, bare)["actions"][0], expected)
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)
    notes = [m for m in records.messages if "ignoring" in m]
    assert len(notes) == 1 and "observation/state" in notes[0], records.messages


# ---- RT-2 -------------------------------------------------------------------------------------------
def test_rt2_over_openpi_client_and_loadtest(openpi, start_server, rt2_dir):
    policy = build_policy(PolicyOptions(checkpoint=str(rt2_dir), model="rt2", robot="raw", device="cpu", chunk=2,
                                        model_config={"action_dim": 3}))
    server = start_server(policy)
    client = openpi_client(openpi, server)
    meta = client.get_server_metadata()
    assert (meta["model"], meta["action_dim"], meta["chunk_size"], meta["action_horizon"]) == ("rt2", 3, 2, 2)
    reply = within(TIMEOUT, client.infer, {"image": image(5), "prompt_tokens": [2, 50, 51, 52]})
    expected = policy.engine.predict(image(5), prompt_tokens=[2, 50, 51, 52])
    assert reply["actions"].shape == (2, 3) and expected.shape == (2, 3)
    np.testing.assert_array_equal(reply["actions"], expected)
    report = run_loadtest(server.url, clients=2, requests=2, timeout=TIMEOUT, image_size=32)
    assert report.ok == 4 and report.errors == 0, report.error_messages


# ---- bad requests, refusals at start ----------------------------------------------------------------
@pytest.mark.parametrize("obs, message", [
    ({"prompt_tokens": PROMPT_IDS}, "missing key(s) ['image']"),
    ({"image": image(0), "prompt_tokens": PROMPT_IDS, "state": np.zeros(8)}, "unknown key(s) ['state']"),
    ({"image": np.zeros((3, 4), np.uint8), "prompt_tokens": PROMPT_IDS}, "image has shape"),
    ({"image": image(0), "prompt": "pick it up"}, "tokenizer"),
    ({"image": image(0), "prompt_tokens": [1, 10_000]}, "10000"),
])
def test_bad_request_gets_an_error_then_a_new_connection_works(openpi, start_server, openvla_dir, obs, message):
    server = start_server(build_policy(openvla_options(openvla_dir, "raw")))
    client = openpi_client(openpi, server)
    with pytest.raises(RuntimeError, match="bad request") as err:
        within(TIMEOUT, client.infer, obs)
    assert message in str(err.value)
    fresh = openpi_client(openpi, server)
    assert within(TIMEOUT, fresh.infer, {"image": image(1), "prompt_tokens": PROMPT_IDS})["actions"].shape == (1, 7)


def test_mismatched_robots_and_options_are_refused_at_start(openvla_dir, rt2_dir):
    with pytest.raises(ConfigError, match=r"--robot aloha needs 14-D actions .* openvla decodes 7-D"):
        build_policy(openvla_options(openvla_dir, "aloha"))
    with pytest.raises(ConfigError, match=r"--robot droid takes 8-D actions but openvla decodes 7-D"):
        build_policy(openvla_options(openvla_dir, "droid"))
    with pytest.raises(ConfigError, match=r"openvla decodes 7-D"):  # --model auto finds OpenVLA in the tensors
        build_policy(openvla_options(openvla_dir, "droid", model="auto"))
    with pytest.raises(ConfigError, match=r"--robot droid takes 8-D actions but rt2 decodes 3-D.*action_dim"):
        build_policy(PolicyOptions(checkpoint=str(rt2_dir), model="rt2", robot="droid", device="cpu",
                                   model_config={"action_dim": 3, "chunk_size": 2}))
    with pytest.raises(ConfigError, match="has no tokenizer.model"):
        build_policy(openvla_options(openvla_dir, "libero"))
    with pytest.raises(NormStatsError, match="fractal"):  # two datasets and no --unnorm-key
        build_policy(openvla_options(openvla_dir, "raw", unnorm_key=None))
    with pytest.raises(ConfigError, match=r"does not take: --seed .*; --norm-stats"):
        build_policy(openvla_options(openvla_dir, "raw", seed=1, norm_stats="stats.json"))
    with pytest.raises(ConfigError, match="--checkpoint demo is the tiny random pi0/pi05"):
        build_policy(PolicyOptions(checkpoint="demo", model="rt2", device="cpu"))
    result = runner.invoke(app, ["serve", "--checkpoint", str(openvla_dir), "--model", "openvla", "--robot", "aloha",
                                 "--unnorm-key", "fractal", "--model-config", '{"space_token_id": 259}',
                                 "--device", "cpu", "--port", "0"])
    assert result.exit_code == 2 and "aloha needs 14-D actions" in result.stderr, result.output


def test_cli_serve_openvla_passes_its_options_through(openpi, openvla_dir, monkeypatch):
    """``cortexflow serve --model openvla`` builds the token policy from its options (``run`` swapped for one
    request from the openpi client, so the command returns)."""
    from cortexflow.serving.server import PolicyServer

    seen = {}

    def run_once(self, on_ready=None):
        self.start(timeout=TIMEOUT)
        try:
            on_ready(self)
            client = openpi_client(openpi, self)
            seen["meta"] = client.get_server_metadata()
            seen["actions"] = within(TIMEOUT, client.infer, {"image": image(2), "prompt_tokens": PROMPT_IDS})["actions"]
            seen["expected"] = self.policy.engine.predict(image(2), prompt_tokens=PROMPT_IDS)
        finally:
            self.stop(timeout=TIMEOUT)

    monkeypatch.setattr(PolicyServer, "run", run_once)
    logger = logging.getLogger("cortexflow.serving")  # the command attaches a handler to the captured stderr
    for name in ("handlers", "propagate", "level"):
        monkeypatch.setattr(logger, name, list(logger.handlers) if name == "handlers" else getattr(logger, name))
    result = runner.invoke(app, ["serve", "--checkpoint", str(openvla_dir), "--model", "openvla", "--robot", "raw",
                                 "--unnorm-key", "bridge_orig", "--model-config", '{"space_token_id": 259}',
                                 "--device", "cpu", "--port", "0"])
    assert result.exit_code == 0, result.output
    assert "serving openvla" in result.stderr and "1 x 7 actions" in result.stderr
    assert seen["meta"]["unnorm_key"] == "bridge_orig" and seen["actions"].shape == (1, 7)
    np.testing.assert_array_equal(seen["actions"][0], seen["expected"])
