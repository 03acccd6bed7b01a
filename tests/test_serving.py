"""The openpi-protocol policy server (``cortexflow serve``), on loopback with the tiny random Pi0.

The real ``openpi-client`` package (``WebsocketClientPolicy``) is the client: CI installs it with
``pip install --no-deps openpi-client==0.1.2`` (its numpy<2 pin would otherwise downgrade numpy).
Every network wait has a timeout, and servers run in background threads on ephemeral ports.
"""

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect as ws_connect
from typer.testing import CliRunner

from cortexflow.cli import app
from cortexflow.errors import ConfigError, InputError
from cortexflow.serving import codec
from cortexflow.serving.loadtest import run_loadtest
from cortexflow.serving.policy import PolicyOptions, build_policy
from cortexflow.policies.transforms import aloha_gripper_from_angular
from cortexflow.serving.robots import AlohaMapping, DroidMapping, LiberoMapping, make_mapping
from cortexflow.serving.server import PolicyServer
from serving_support import TIMEOUT, demo_policy, within  # noqa: F401 (imported from here by other test modules)

# openpi-client 0.1.2 calls websockets' sync connect() without a context manager (deprecated in websockets 17).
pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager:DeprecationWarning")

CHUNK = 5  # the tiny model's action chunk
runner = CliRunner()


# ---- helpers (the openpi and start_server fixtures are in conftest.py) ------------------------------
def openpi_client(openpi, server, **kwargs):
    return within(TIMEOUT, openpi.WebsocketClientPolicy, "127.0.0.1", server.port, **kwargs)


def raw_connect(server, headers=None):
    """A plain websockets client; returns (connection, metadata)."""
    conn = ws_connect(server.url, open_timeout=TIMEOUT, max_size=None, compression=None, additional_headers=headers)
    return conn, codec.unpack(conn.recv(timeout=TIMEOUT))


def http_get(server, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=TIMEOUT) as response:
            return response.status, response.headers.get("Content-Type"), response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Content-Type"), err.read().decode()


def small_droid_obs(i=0, j=0, size=32):
    rng = np.random.default_rng([i, j])
    return {
        "observation/exterior_image_1_left": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
        "observation/wrist_image_left": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
        "observation/joint_position": rng.uniform(-1, 1, 7),
        "observation/gripper_position": np.array([0.1 * j]),
        "prompt": f"task {i}",
    }


def wait_until(predicate, seconds=TIMEOUT, message="condition"):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.005)
    pytest.fail(f"timed out waiting for {message}")


# ---- the real openpi client, every robot mapping ------------------------------------------------
ROBOT_OBSERVATIONS = {
    "droid": lambda rng: {
        "observation/exterior_image_1_left": rng.integers(0, 256, (180, 320, 3), dtype=np.uint8),
        "observation/wrist_image_left": rng.integers(0, 256, (180, 320, 3), dtype=np.uint8),
        "observation/joint_position": rng.uniform(-1, 1, 7),
        "observation/gripper_position": rng.uniform(0, 1, 1),
        "prompt": "pick up the red cube",
    },
    "libero": lambda rng: {
        "observation/image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        "observation/wrist_image": rng.random((224, 224, 3)).astype(np.float32),  # float in [0, 1], as openpi allows
        "observation/state": rng.uniform(-1, 1, 8),
        "prompt": "put the bowl on the plate",
    },
    "aloha": lambda rng: {  # CHW, as the ALOHA runtime sends; no right wrist camera -> masked
        "images": {
            "cam_high": rng.integers(0, 256, (3, 240, 320), dtype=np.uint8),
            "cam_left_wrist": rng.integers(0, 256, (3, 240, 320), dtype=np.uint8),
        },
        "state": rng.uniform(0, 1, 14),
        "prompt": "fold the towel",
    },
    "raw": lambda rng: {
        "images": rng.integers(0, 256, (3, 224, 224, 3), dtype=np.uint8),
        "image_masks": [True, True, False],
        "state": rng.uniform(-1, 1, 8).astype(np.float32),
        "prompt": "stack the blocks",
    },
}
ROBOT_ACTION_DIMS = {"droid": 8, "libero": 7, "aloha": 14, "raw": 32}


@pytest.mark.parametrize("model, robot", [("pi0", "droid"), ("pi0", "libero"), ("pi0", "aloha"), ("pi0", "raw"),
                                          ("pi05", "droid")])
def test_openpi_client_gets_metadata_and_actions(openpi, start_server, model, robot):
    policy = demo_policy(robot, model=model)
    obs = ROBOT_OBSERVATIONS[robot](np.random.default_rng(0))
    expected = policy.predict(obs)  # seeded noise: the server must send exactly these
    server = start_server(policy)
    client = openpi_client(openpi, server)
    meta = client.get_server_metadata()
    assert meta["server"] == "cortexflow" and meta["model"] == model and meta["robot"] == robot
    assert meta["action_dim"] == ROBOT_ACTION_DIMS[robot] and meta["chunk_size"] == CHUNK
    assert meta["num_views"] == 3 and meta["robot_config"]["name"] == robot
    assert meta["server_config"]["api_key_required"] is False
    reply = within(TIMEOUT, client.infer, obs)
    actions = reply["actions"]
    assert isinstance(actions, np.ndarray) and actions.dtype == np.float32
    assert actions.shape == (CHUNK, ROBOT_ACTION_DIMS[robot])
    assert np.isfinite(actions).all()
    np.testing.assert_allclose(actions, expected, rtol=1e-5, atol=1e-6)
    assert reply["server_timing"]["infer_ms"] > 0 and "queue_ms" in reply["server_timing"]
    second = within(TIMEOUT, client.infer, obs)
    assert "prev_total_ms" in second["server_timing"]


def test_droid_and_libero_mappings_follow_openpi():
    rng = np.random.default_rng(1)
    obs = ROBOT_OBSERVATIONS["droid"](rng)
    request = DroidMapping().to_engine(obs)
    assert request.image_masks == [True, True, False]
    np.testing.assert_array_equal(request.images[0], obs["observation/exterior_image_1_left"])
    np.testing.assert_array_equal(request.images[1], obs["observation/wrist_image_left"])
    assert request.images[2].shape == (180, 320, 3) and not request.images[2].any()
    np.testing.assert_allclose(request.state, np.concatenate([obs["observation/joint_position"],
                                                              obs["observation/gripper_position"]]), rtol=1e-6)
    assert request.prompt == "pick up the red cube"
    scalar_gripper = dict(obs, **{"observation/gripper_position": np.float64(0.5)})
    assert DroidMapping().to_engine(scalar_gripper).state.shape == (8,)
    assert DroidMapping().to_robot(np.ones((CHUNK, 32))).shape == (CHUNK, 8)

    libero = ROBOT_OBSERVATIONS["libero"](rng)
    request = LiberoMapping().to_engine(libero)
    assert request.image_masks == [True, True, False]
    wrist = request.images[1]
    assert wrist.dtype == np.uint8
    np.testing.assert_array_equal(wrist, (255 * libero["observation/wrist_image"]).astype(np.uint8))
    assert LiberoMapping().to_robot(np.ones((CHUNK, 32))).shape == (CHUNK, 7)
    chw = dict(libero, **{"observation/image": np.zeros((3, 64, 48), np.uint8)})
    assert LiberoMapping().to_engine(chw).images[0].shape == (64, 48, 3)
    with pytest.raises(InputError, match="missing key 'prompt'"):
        LiberoMapping().to_engine({k: v for k, v in libero.items() if k != "prompt"})
    assert LiberoMapping().to_engine({k: v for k, v in libero.items() if k != "prompt"}, "default task").prompt == "default task"


def test_aloha_mapping_masks_missing_wrists_and_adapts_to_pi():
    rng = np.random.default_rng(2)
    obs = ROBOT_OBSERVATIONS["aloha"](rng)
    request = AlohaMapping().to_engine(obs)
    assert request.image_masks == [True, True, False]
    np.testing.assert_array_equal(request.images[0], obs["images"]["cam_high"].transpose(1, 2, 0))
    assert not request.images[2].any() and request.images[2].shape == (240, 320, 3)
    only_high = dict(obs, images={"cam_high": obs["images"]["cam_high"], "cam_low": obs["images"]["cam_high"]})
    assert AlohaMapping().to_engine(only_high).image_masks == [True, False, False]

    state = np.linspace(0.1, 1.4, 14)
    plain = AlohaMapping(adapt_to_pi=False).to_engine(dict(obs, state=state)).state
    np.testing.assert_allclose(plain, state, rtol=1e-6)
    adapted = AlohaMapping(adapt_to_pi=True).to_engine(dict(obs, state=state)).state
    flip = np.array([1, -1, -1, 1, 1, 1, 1, 1, -1, -1, 1, 1, 1, 1])
    joints = [i for i in range(14) if i not in (6, 13)]
    np.testing.assert_allclose(adapted[joints], (flip * state)[joints], rtol=1e-6)
    assert not np.allclose(adapted[[6, 13]], state[[6, 13]])

    actions = np.tile(np.arange(32, dtype=np.float32) / 32, (CHUNK, 1))
    out = AlohaMapping(adapt_to_pi=True).to_robot(actions)
    assert out.shape == (CHUNK, 14)
    np.testing.assert_allclose(out[:, joints], (flip * actions[:, :14])[:, joints], rtol=1e-6)
    np.testing.assert_allclose(out[:, 6], aloha_gripper_from_angular(actions[:, 6].astype(np.float64)), rtol=1e-6)
    np.testing.assert_allclose(AlohaMapping(adapt_to_pi=False).to_robot(actions), actions[:, :14])
    with pytest.raises(InputError, match="cam_high"):
        AlohaMapping().to_engine(dict(obs, images={"cam_left_wrist": obs["images"]["cam_left_wrist"]}))
    with pytest.raises(InputError, match="unknown camera"):
        AlohaMapping().to_engine(dict(obs, images={**obs["images"], "cam_top": obs["images"]["cam_high"]}))


def test_codec_matches_openpi_msgpack_numpy(openpi):
    from openpi_client import msgpack_numpy

    value = {
        "a": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b": np.array([[1, 2]], dtype=np.int64),
        "c": np.zeros((2, 2, 3), np.uint8),
        "d": np.float32(1.5),
        "e": np.bool_(True),
        "nested": {"list": [1, "x", np.array([True, False])], "text": "héllo"},
    }
    for decoded in (msgpack_numpy.unpackb(codec.pack(value)), codec.unpack(msgpack_numpy.packb(value))):
        for key in ("a", "b", "c"):
            np.testing.assert_array_equal(decoded[key], value[key])
            assert decoded[key].dtype == value[key].dtype
        assert decoded["d"] == 1.5 and decoded["d"].dtype == np.float32 and bool(decoded["e"])
        assert decoded["nested"]["text"] == "héllo" and decoded["nested"]["list"][:2] == [1, "x"]
    assert codec.unpack(msgpack_numpy.packb(value))["a"].flags.writeable


# ---- several clients at once --------------------------------------------------------------------
def test_concurrent_clients_every_request_answered_and_matched(openpi, start_server):
    """Six robots at once on two engines (as with --device cuda:0,cuda:1): every reply is its request's."""
    clients, requests = 6, 5
    policy = demo_policy("droid", seed=0)
    observations = [[small_droid_obs(i, j) for j in range(requests)] for i in range(clients)]
    expected = [[policy.predict(obs) for obs in row] for row in observations]
    flat = np.stack([a for row in expected for a in row]).reshape(clients * requests, -1)
    distances = np.abs(flat[:, None] - flat[None]).max(-1) + np.eye(len(flat))
    assert distances.min() > 1e-3  # every request has its own answer, so a mix-up would show
    server = start_server([policy, demo_policy("droid", seed=0)])
    assert server.metadata["server_config"]["engines"] == 2
    results, errors = {}, []

    def run_client(i):
        try:
            client = openpi.WebsocketClientPolicy("127.0.0.1", server.port)
            for j, obs in enumerate(observations[i]):
                results[i, j] = client.infer(obs)["actions"]
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=run_client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert not errors, errors
    assert len(results) == clients * requests
    for (i, j), actions in results.items():
        np.testing.assert_allclose(actions, expected[i][j], rtol=1e-5, atol=1e-6)
    metrics = server.metrics
    wait_until(lambda: metrics.replies == clients * requests, message="the last reply to be counted (after its send)")
    assert metrics.requests == clients * requests and metrics.error_count == 0


# ---- bad requests -------------------------------------------------------------------------------
LIMIT = 1024 * 1024


def _bad_frames():
    good = small_droid_obs()
    return {
        "unknown key": (codec.pack({**good, "observation/extra": 1}), "unknown key(s) ['observation/extra']"),
        "missing key": (codec.pack({k: v for k, v in good.items() if k != "observation/wrist_image_left"}),
                        "missing key(s) ['observation/wrist_image_left']"),
        "wrong state shape": (codec.pack({**good, "observation/joint_position": np.zeros(6)}),
                              "observation/joint_position has shape (6,); expected (7,)"),
        "wrong image shape": (codec.pack({**good, "observation/wrist_image_left": np.zeros((32, 32), np.uint8)}),
                              "expected an image"),
        "wrong prompt type": (codec.pack({**good, "prompt": 5}), "prompt must be a string"),
        "nan state": (codec.pack({**good, "observation/joint_position": np.full(7, np.nan)}), "NaN"),
        "not a map": (codec.pack([1, 2, 3]), "must be a map"),
        "garbage bytes": (b"\xc1\xff\x00 not msgpack", "undecodable request"),
        "truncated frame": (codec.pack(good)[:-7], "undecodable request"),
        "text frame": ("hello", "text frame"),
        "lying array header": (codec.pack({**good, "observation/joint_position": {
            b"__ndarray__": True, b"data": b"\0" * 10, b"dtype": "<f4", b"shape": [7]}}), "needs 28 bytes"),
        "object dtype": (codec.pack({**good, "observation/joint_position": {
            b"__ndarray__": True, b"data": b"\0" * 56, b"dtype": "|O", b"shape": [7]}}), "refused"),
        "oversized frame": (codec.pack({**good, "observation/wrist_image_left": np.zeros((700, 700, 3), np.uint8)}),
                            "request too large"),
    }


BAD_FRAMES = _bad_frames()


@pytest.fixture(scope="module")
def bad_request_server():
    # max_connections: each case leaves its openpi client connected
    server = PolicyServer(demo_policy("droid"), "127.0.0.1", 0, max_message_bytes=LIMIT,
                          max_connections=64).start(timeout=TIMEOUT)
    yield server
    server.stop(timeout=TIMEOUT)


@pytest.fixture(scope="module")
def bystander(openpi, bad_request_server):
    """Another robot, connected the whole time: it must keep getting actions."""
    return openpi_client(openpi, bad_request_server)


@pytest.mark.parametrize("case", sorted(BAD_FRAMES))
def test_bad_request_gets_an_error_and_nothing_else_breaks(openpi, bad_request_server, bystander, case):
    frame, fragment = BAD_FRAMES[case]
    good = small_droid_obs(1, 1)
    conn, _ = within(TIMEOUT, raw_connect, bad_request_server)
    with conn:
        conn.send(frame)
        reply = conn.recv(timeout=TIMEOUT)
        assert isinstance(reply, str), "an error must come back as a text frame"
        assert fragment in reply, reply
        conn.send(codec.pack(good))  # the same connection keeps working
        assert codec.unpack(conn.recv(timeout=TIMEOUT))["actions"].shape == (CHUNK, 8)
    fresh = openpi_client(openpi, bad_request_server)  # and so does a new one
    assert within(TIMEOUT, fresh.infer, good)["actions"].shape == (CHUNK, 8)
    assert within(TIMEOUT, bystander.infer, good)["actions"].shape == (CHUNK, 8)


def test_openpi_client_sees_bad_request_as_runtime_error(openpi, bad_request_server):
    client = openpi_client(openpi, bad_request_server)
    with pytest.raises(RuntimeError, match="unknown key"):
        within(TIMEOUT, client.infer, {**small_droid_obs(), "observation/oops": np.zeros(3)})
    assert within(TIMEOUT, client.infer, small_droid_obs())["actions"].shape == (CHUNK, 8)


def test_frame_past_twice_the_limit_closes_only_that_connection(openpi, bad_request_server, bystander):
    conn, _ = within(TIMEOUT, raw_connect, bad_request_server)
    with conn:
        conn.send(b"\0" * (2 * LIMIT + 70_000))
        with pytest.raises(ConnectionClosed) as closed:
            conn.recv(timeout=TIMEOUT)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    wait_until(lambda: bad_request_server.metrics.errors["too_large"] >= 1, message="the 1009 close to be counted")
    fresh = openpi_client(openpi, bad_request_server)
    assert within(TIMEOUT, fresh.infer, small_droid_obs())["actions"].shape == (CHUNK, 8)
    assert within(TIMEOUT, bystander.infer, small_droid_obs())["actions"].shape == (CHUNK, 8)


def test_engine_input_error_is_a_bad_request(start_server):
    server = start_server("raw")
    conn, meta = within(TIMEOUT, raw_connect, server)
    with conn:
        assert meta["robot"] == "raw" and meta["action_dim"] == 32
        two_views = {"images": np.zeros((2, 32, 32, 3), np.uint8), "state": np.zeros(8, np.float32), "prompt": "x"}
        conn.send(codec.pack(two_views))
        reply = conn.recv(timeout=TIMEOUT)
        assert isinstance(reply, str) and reply.startswith("bad request:") and "3" in reply
        good = {"images": np.zeros((3, 32, 32, 3), np.uint8), "state": np.zeros(8, np.float32),
                "prompt_tokens": np.array([2, 7, 9]), "noise": np.zeros((CHUNK, 32), np.float32)}
        conn.send(codec.pack(good))
        assert codec.unpack(conn.recv(timeout=TIMEOUT))["actions"].shape == (CHUNK, 32)
    assert server.metrics.errors["bad_request"] == 1


# ---- API key --------------------------------------------------------------------------------------
def test_api_key_refuses_missing_or_wrong_keys(openpi, start_server):
    server = start_server("droid", api_key="s3cret-key")
    for kwargs in ({}, {"api_key": "wrong"}):
        with pytest.raises(InvalidStatus) as refused:
            within(TIMEOUT, openpi.WebsocketClientPolicy, "127.0.0.1", server.port, **kwargs)
        assert refused.value.response.status_code == 401
    with pytest.raises(InvalidStatus):
        within(TIMEOUT, raw_connect, server, {"Authorization": "Bearer s3cret-key"})
    client = openpi_client(openpi, server, api_key="s3cret-key")
    assert client.get_server_metadata()["server_config"]["api_key_required"] is True
    assert within(TIMEOUT, client.infer, small_droid_obs())["actions"].shape == (CHUNK, 8)
    assert http_get(server, "/healthz")[0] == 200  # health and metrics need no key
    status, _, text = http_get(server, "/metrics")
    assert status == 200 and "cortexflow_connections_refused_total 3" in text
    report = run_loadtest(server.url, 2, 2, timeout=TIMEOUT)
    assert report.ok == 0 and report.errors == 4 and "HTTP 401" in next(iter(report.error_messages))


# ---- queueing, busy, shutdown, metrics --------------------------------------------------------------
class GatedPolicy:
    """Answers ``{"i": n}`` with actions full of n, but only once ``gate`` is set."""

    metadata = {"model": "stub", "robot": "raw"}

    def __init__(self):
        self.gate = threading.Event()
        self.calls = []

    def prepare(self, observation):
        if not isinstance(observation, dict) or "i" not in observation:
            raise InputError("expected {'i': n}")
        return observation["i"]

    def infer(self, i):
        self.calls.append(i)
        assert self.gate.wait(TIMEOUT), "the test never opened the gate"
        return np.full((2, 3), i, np.float32), {}


def _send(server, i):
    conn, _ = within(TIMEOUT, raw_connect, server)
    conn.send(codec.pack({"i": i}))
    return conn


def test_full_queue_answers_busy_and_requests_run_in_order(start_server):
    policy = GatedPolicy()
    server = start_server(policy, queue_size=1)
    first = _send(server, 0)
    wait_until(lambda: policy.calls == [0], message="request 0 to be in flight")
    second = _send(server, 1)
    wait_until(lambda: server.metrics.gauges["queue_depth"]() == 1, message="request 1 to be queued")
    third = _send(server, 2)
    busy = third.recv(timeout=TIMEOUT)
    assert isinstance(busy, str) and busy.startswith("server busy")
    policy.gate.set()
    assert codec.unpack(first.recv(timeout=TIMEOUT))["actions"][0, 0] == 0
    assert codec.unpack(second.recv(timeout=TIMEOUT))["actions"][0, 0] == 1
    third.send(codec.pack({"i": 3}))  # busy was only for that request
    assert codec.unpack(third.recv(timeout=TIMEOUT))["actions"][0, 0] == 3
    assert policy.calls == [0, 1, 3]
    assert server.metrics.errors["busy"] == 1
    for conn in (first, second, third):
        conn.close()


def test_graceful_shutdown_finishes_the_request_in_flight(start_server):
    policy = GatedPolicy()
    server = start_server(policy)
    in_flight = _send(server, 0)
    wait_until(lambda: policy.calls == [0], message="request 0 to be in flight")
    queued = _send(server, 1)
    wait_until(lambda: server.metrics.gauges["queue_depth"]() == 1, message="request 1 to be queued")
    stopper = threading.Thread(target=server.stop, kwargs={"timeout": TIMEOUT}, daemon=True)
    stopper.start()
    refused = queued.recv(timeout=TIMEOUT)
    assert isinstance(refused, str) and "shutting down" in refused
    assert http_get(server, "/healthz")[0] == 503
    with pytest.raises(InvalidStatus) as late:
        raw_connect(server)
    assert late.value.response.status_code == 503
    policy.gate.set()
    reply = codec.unpack(in_flight.recv(timeout=TIMEOUT))
    assert reply["actions"].shape == (2, 3)  # the request in flight was finished and answered
    with pytest.raises(ConnectionClosed) as closed:
        in_flight.recv(timeout=TIMEOUT)
    assert closed.value.rcvd.code == 1001
    stopper.join(TIMEOUT)
    assert not stopper.is_alive()
    assert policy.calls == [0]
    queued.close()


def test_metrics_and_health_endpoints(openpi, start_server):
    server = start_server("libero")
    assert http_get(server, "/healthz")[:1] == (200,)
    client = openpi_client(openpi, server)
    obs = ROBOT_OBSERVATIONS["libero"](np.random.default_rng(3))
    for _ in range(3):
        within(TIMEOUT, client.infer, obs)
    with pytest.raises(RuntimeError):
        within(TIMEOUT, client.infer, {"nope": 1})
    status, content_type, text = http_get(server, "/metrics")
    assert status == 200 and content_type.startswith("text/plain") and "version=0.0.4" in content_type
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values["cortexflow_requests_total"] == 4 and values["cortexflow_replies_total"] == 3
    assert values['cortexflow_request_errors_total{reason="bad_request"}'] == 1
    assert values["cortexflow_request_latency_seconds_count"] == 3
    buckets = [v for k, v in values.items() if k.startswith("cortexflow_request_latency_seconds_bucket")]
    assert buckets == sorted(buckets) and buckets[-1] == 3
    assert values["cortexflow_connections_active"] == 1
    assert 'robot="libero"' in text


def test_loadtest_reports_percentiles_throughput_and_errors(start_server):
    server = start_server("droid")
    report = run_loadtest(server.url, clients=3, requests=4, timeout=TIMEOUT, image_size=32)
    data = report.to_dict()
    assert report.ok == 12 and report.errors == 0 and data["robot"] == "droid"
    lat = data["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] and data["throughput_rps"] > 0
    with pytest.raises(ConfigError, match="--clients"):
        run_loadtest(server.url, clients=0, requests=1)


# ---- configuration errors, optional dependencies, the command line ----------------------------------
def test_models_without_a_demo_and_bad_options_are_refused():
    with pytest.raises(ConfigError, match="--checkpoint demo is the tiny random pi0/pi05; serve rt1"):
        demo_policy("droid", model="rt1")
    with pytest.raises(ConfigError, match="--checkpoint demo is the tiny random pi0/pi05"):
        demo_policy("droid", model="openvla")
    with pytest.raises(ConfigError, match="unknown robot"):
        demo_policy("franka")
    with pytest.raises(ConfigError, match="--tokenizer"):
        build_policy(PolicyOptions(checkpoint="/nonexistent", model="pi0", robot="droid", device="cpu"))
    result = runner.invoke(app, ["serve", "--checkpoint", "demo", "--model", "rt1", "--device", "cpu"])
    assert result.exit_code == 2 and "serve rt1 from a TF2 checkpoint" in result.stderr
    assert make_mapping("raw", num_views=2).describe()["num_views"] == 2


def test_missing_serving_dependencies_give_a_clear_error(monkeypatch):
    from cortexflow.serving import _deps

    monkeypatch.setitem(sys.modules, "websockets", None)
    monkeypatch.setitem(sys.modules, "websockets.asyncio.server", None)
    monkeypatch.setitem(sys.modules, "msgpack", None)
    with pytest.raises(_deps.ServingDependencyError, match=r"pip install 'cortexflow\[serve\]'"):
        _deps.msgpack()
    with pytest.raises(_deps.ServingDependencyError, match="websockets"):
        PolicyServer(GatedPolicy(), port=0).start(timeout=TIMEOUT)
    result = runner.invoke(app, ["serve", "--checkpoint", "demo", "--device", "cpu"])
    assert result.exit_code == 2 and "cortexflow[serve]" in result.stderr
    code = ("import sys; sys.modules['websockets'] = None; sys.modules['msgpack'] = None\n"
            "import cortexflow, cortexflow.cli, cortexflow.serving.server, cortexflow.serving.loadtest\n"
            "from cortexflow.serving import PolicyServer, build_policy, make_mapping\nprint('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_cli_serve_loadtest_and_sigterm(openpi):
    """``cortexflow serve --checkpoint demo --port 0`` in a subprocess: a client, ``loadtest``, then SIGTERM."""
    process, port, lines, seen = start_cli_server("--robot", "libero", "--seed", "3",
                                                  env={"CORTEXFLOW_API_KEY": "cli-key"})
    try:
        client = within(TIMEOUT, openpi.WebsocketClientPolicy, "127.0.0.1", port, api_key="cli-key")
        assert client.get_server_metadata()["robot"] == "libero"
        obs = ROBOT_OBSERVATIONS["libero"](np.random.default_rng(4))
        assert within(TIMEOUT, client.infer, obs)["actions"].shape == (CHUNK, 7)
        result = runner.invoke(app, ["loadtest", "--url", f"ws://127.0.0.1:{port}", "--clients", "2", "--requests", "3",
                                     "--image-size", "32", "--json"], env={"CORTEXFLOW_API_KEY": "cli-key"})
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        assert data["ok"] == 6 and data["errors"] == 0 and data["latency_ms"]["p99"] > 0
        process.send_signal(signal.SIGTERM)
    except BaseException:
        process.kill()
        raise
    code, _, log = log_after_exit(process, lines, seen, TIMEOUT)
    assert code == 0, log
    assert "server stopped" in log and "Traceback" not in log, log


def start_cli_server(*args, env=None):
    """``cortexflow serve --checkpoint demo --port 0 --device cpu ARGS`` in a subprocess; returns (process, port,
    stderr line queue, lines seen so far) once it listens (fails the test if it does not within 120 s)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "cortexflow.cli", "serve", "--checkpoint", "demo", "--port", "0", "--device", "cpu",
         *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True).start()
    seen, deadline = [], time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            assert process.poll() is None, "".join(seen)
            continue
        seen.append(line)
        match = re.search(r"listening on ws://127\.0\.0\.1:(\d+)", line)
        if match:
            return process, int(match.group(1)), lines, seen
    process.kill()
    pytest.fail("the server did not start: " + "".join(seen))


def log_after_exit(process, lines, seen, seconds):
    """Wait up to ``seconds`` for ``process`` to exit; returns (exit code, seconds taken, its whole stderr)."""
    start = time.perf_counter()
    try:
        code = process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=TIMEOUT)
        pytest.fail(f"the server did not exit within {seconds} s of SIGTERM")
    took = time.perf_counter() - start
    time.sleep(0.2)
    while not lines.empty():
        seen.append(lines.get_nowait())
    return code, took, "".join(seen)
