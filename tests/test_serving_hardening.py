"""The policy server against hostile or careless clients (issue 16), on loopback with the tiny random Pi0.

Every bad frame is followed by a good request on the same connection and on a new one, while another
client stays connected; frame bombs, pipelining, idle and surplus connections, malformed handshakes,
mistyped engine inputs, non-finite actions and the shutdown deadline each have a case. Servers run on
ephemeral ports, every wait has a timeout; the memory case runs the server in a subprocess and reads its
peak RSS from ``/proc`` (Linux).
"""

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import msgpack
import numpy as np
import pytest
from test_serving import (
    log_after_exit,
    start_cli_server,
    BAD_FRAMES,
    CHUNK,
    LIMIT,
    TIMEOUT,
    GatedPolicy,
    demo_policy,
    http_get,
    raw_connect,
    small_droid_obs,
    wait_until,
    within,
)
from typer.testing import CliRunner
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect as ws_connect

from cortexflow.cli import app
from cortexflow.errors import ConfigError, NonFiniteActionsError
from cortexflow.serving import codec
from cortexflow.serving.policy import checkpoint_name
from cortexflow.serving.server import PolicyServer

pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager:DeprecationWarning")
runner = CliRunner()
MAX_REPLY_CHARS = 1000  # an error reply quotes at most an excerpt of the request


def _ndarray(data, dtype, shape):
    return {b"__ndarray__": True, b"data": data, b"dtype": dtype, b"shape": shape}


def _hostile_frames():
    good = small_droid_obs()
    n = 1_000_000  # fits the 1 MiB limit: one array of a million empty arrays
    return {
        "array of a million empty arrays": (b"\xdd" + n.to_bytes(4, "big") + b"\x90" * n, "more than 16384 values"),
        "map of half a million empty maps": (b"\xdf" + (n // 2).to_bytes(4, "big") + b"\x80" * n, "more than 16384"),
        "array claiming 2**32-1 items": (b"\xdd\xff\xff\xff\xff\x90\x90", "more than 16384 values"),
        "array claiming 4096 items in 2 bytes": (b"\xdc\x10\x00\x90\x90", "claims 4096 values"),
        "nesting 200 deep": (b"\x91" * 200 + b"\x90", "nested more than"),
        "extension type": (msgpack.packb({"x": msgpack.ExtType(5, b"abc")}), "extension types"),
        "trailing bytes": (codec.pack(good) + b"\x00", "follow the value"),
        "200 KB dtype string": (codec.pack({**good, "observation/joint_position": _ndarray(b"", "x" * 200_000, [0])}),
                                "a string of 200000 bytes"),
        "60 KB unknown dtype": (codec.pack({**good, "observation/joint_position": _ndarray(b"", "q" * 60_000, [0])}),
                                "unknown dtype 'qqqq"),
        "60 KB key name": (codec.pack({**good, "k" * 60_000: 1}), "unknown key(s)"),
        "control characters in a key": (codec.pack({**good, "\x1b[2J\x00evil": 1}), "\\x1b[2J\\x00evil"),
        "2**31-element header": (codec.pack({**good, "observation/joint_position": _ndarray(b"", "<f4", [2**31])}),
                                 "needs 8589934592 bytes"),
        "33 dimensions": (codec.pack({**good, "observation/joint_position": _ndarray(b"", "<f4", [1] * 33)}),
                          "at most 32"),
        "negative dimension": (codec.pack({**good, "observation/joint_position": _ndarray(b"", "<f4", [-7])}),
                               "non-negative"),
        "huge shape list": (codec.pack({**good, "observation/joint_position": _ndarray(b"", "<f4", [0] * 10_000)}),
                            "at most 32"),
        "inf state": (codec.pack({**good, "observation/joint_position": np.full(7, np.inf)}), "NaN or inf"),
        "1e308 state (past float32)": (codec.pack({**good, "observation/joint_position": np.full(7, 1e308)}),
                                       "NaN or inf"),
        "numpy scalar of a mistyped value": (codec.pack({**good, "prompt": {b"__npgeneric__": True, b"data": "x" * 5000,
                                                                            b"dtype": "<f4"}}), "does not fit"),
    }


CATALOGUE = {**BAD_FRAMES, **_hostile_frames()}


@pytest.fixture(scope="module")
def hostile_server():
    server = PolicyServer(demo_policy("droid"), "127.0.0.1", 0, max_message_bytes=LIMIT, warmup=False)
    server.start(timeout=TIMEOUT)
    yield server
    server.stop(timeout=TIMEOUT)


@pytest.fixture(scope="module")
def onlooker(hostile_server):
    """Another robot, connected the whole time: it must keep getting actions."""
    conn, _ = within(TIMEOUT, raw_connect, hostile_server)
    yield conn
    conn.close()


def _good_reply(conn, obs=None):
    conn.send(codec.pack(obs if obs is not None else small_droid_obs(1, 1)))
    reply = conn.recv(timeout=TIMEOUT)
    assert not isinstance(reply, str), reply
    return codec.unpack(reply)["actions"]


@pytest.mark.parametrize("case", sorted(CATALOGUE))
def test_hostile_frame_is_refused_briefly_and_the_server_keeps_serving(hostile_server, onlooker, case, caplog):
    frame, fragment = CATALOGUE[case]
    caplog.set_level(logging.INFO, logger="cortexflow.serving")
    conn, _ = within(TIMEOUT, raw_connect, hostile_server)
    with conn:
        conn.send(frame)
        reply = conn.recv(timeout=TIMEOUT)
        assert isinstance(reply, str), "an error must come back as a text frame"
        assert fragment in reply, reply
        assert len(reply) <= MAX_REPLY_CHARS and reply.isprintable(), reply[:200]
        assert not reply.startswith("internal server error"), reply
        assert _good_reply(conn).shape == (CHUNK, 8)  # the same connection keeps working
    fresh, _ = within(TIMEOUT, raw_connect, hostile_server)
    with fresh:
        assert _good_reply(fresh).shape == (CHUNK, 8)  # and so does a new one
    assert _good_reply(onlooker).shape == (CHUNK, 8)
    assert all(len(r.getMessage()) <= 2 * MAX_REPLY_CHARS and not r.exc_info for r in caplog.records)
    assert hostile_server.metrics.errors["internal"] == 0


def test_frame_bomb_is_answered_within_a_second_while_others_keep_their_latency(start_server):
    """A 32 MB frame of 32 million empty arrays (the default frame limit): refused at its first header,
    off the event loop, while another robot's requests keep being answered with no added wait. What the
    server adds to that robot's inference (``total_ms - infer_ms``: queueing, decoding, the event loop) is
    what a frozen loop stretches; inference itself shares this small machine's cores with the attacker's
    32 MB transfers, so its own time is not compared."""
    server = start_server("droid", warmup=False)
    n = 32_000_000
    bomb = b"\xdd" + n.to_bytes(4, "big") + b"\x90" * n
    assert len(bomb) <= server.max_message_bytes
    robot, _ = within(TIMEOUT, raw_connect, server)
    obs = small_droid_obs(2, 2)

    def server_overhead():
        robot.send(codec.pack(obs))
        timing = codec.unpack(robot.recv(timeout=TIMEOUT))["server_timing"]
        return (timing["total_ms"] - timing["infer_ms"]) / 1e3

    baseline = [server_overhead() for _ in range(4)]
    overheads, stop = [], threading.Event()

    def keep_asking():
        while not stop.is_set():
            overheads.append(server_overhead())

    asker = threading.Thread(target=keep_asking, daemon=True)
    asker.start()
    attacker, _ = within(TIMEOUT, raw_connect, server)
    answer_times = []
    with attacker:
        for _ in range(3):
            start = time.perf_counter()
            attacker.send(bomb)
            reply = attacker.recv(timeout=TIMEOUT)
            answer_times.append(time.perf_counter() - start)
            assert isinstance(reply, str) and "more than 16384 values" in reply
            assert http_get(server, "/healthz")[0] == 200
    stop.set()
    asker.join(TIMEOUT)
    robot.close()
    assert max(answer_times) < 1.0, answer_times
    assert overheads, "the other robot got no reply while the bombs were answered"
    assert max(overheads) < max(baseline) + 0.25, (baseline, overheads)


# ---- limits on connections ---------------------------------------------------------------------------
def test_connection_cap_refuses_with_503_and_frees_slots(start_server):
    server = start_server("droid", warmup=False, max_connections=2)
    first, _ = within(TIMEOUT, raw_connect, server)
    second, _ = within(TIMEOUT, raw_connect, server)
    with pytest.raises(InvalidStatus) as refused:
        within(TIMEOUT, raw_connect, server)
    assert refused.value.response.status_code == 503 and b"too many connections" in refused.value.response.body
    assert http_get(server, "/healthz")[0] == 200  # health and metrics do not count
    assert server.metrics.connections_refused == 1
    first.close()
    wait_until(lambda: server.metrics.connections_active == 1, message="the closed connection to be released")
    third, _ = within(TIMEOUT, raw_connect, server)
    assert _good_reply(third).shape == (CHUNK, 8)
    for conn in (second, third):
        conn.close()


def test_idle_connection_is_closed_and_a_busy_one_is_not(start_server):
    server = start_server("droid", warmup=False, idle_timeout=0.6)
    idle, _ = within(TIMEOUT, raw_connect, server)
    busy, _ = within(TIMEOUT, raw_connect, server)
    start = time.monotonic()
    while time.monotonic() - start < 1.5:  # longer than the idle timeout, one request every 0.2 s
        assert _good_reply(busy).shape == (CHUNK, 8)
        time.sleep(0.2)
    with pytest.raises(ConnectionClosed) as closed:
        idle.recv(timeout=TIMEOUT)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000 and "idle" in closed.value.rcvd.reason
    assert _good_reply(busy).shape == (CHUNK, 8)
    busy.close()


SLOW_SERVER = """
import sys, time
import numpy as np
from cortexflow.serving.server import PolicyServer

class SlowPolicy:
    metadata = {"model": "stub", "robot": "raw"}
    def prepare(self, observation):
        return observation["pad"].nbytes
    def infer(self, nbytes):
        time.sleep(0.05)
        return np.full((2, 3), nbytes, np.float32), {}

server = PolicyServer(SlowPolicy(), "127.0.0.1", 0, max_message_bytes=1 << 20, max_connections=4, warmup=False)
server.run(on_ready=lambda s: print(s.port, s.memory_bound_bytes, flush=True))
"""


def _proc_status(pid):
    with open(f"/proc/{pid}/status") as status:
        return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in status) if k in ("VmRSS", "VmHWM")}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS is read from /proc (Linux)")
def test_pipelining_clients_stay_within_the_stated_memory_bound():
    """Six clients (four admitted) each push 12 frames of 0.9 MiB (decoded) and 1.9 MiB (refused unread) as fast
    as the server takes them: the server's peak RSS grows by less than ``memory_bound_bytes``."""
    process = subprocess.Popen([sys.executable, "-c", SLOW_SERVER], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        line = within(60, process.stdout.readline)
        assert line, process.stderr.read()
        port, bound = map(int, line.split())
        assert bound < 64 * 2**20
        with ws_connect(f"ws://127.0.0.1:{port}", open_timeout=TIMEOUT, max_size=None) as warm:
            warm.recv(timeout=TIMEOUT)
            warm.send(codec.pack({"pad": np.ones(10, np.uint8)}))
            warm.recv(timeout=TIMEOUT)
        with open(f"/proc/{process.pid}/clear_refs", "w") as refs:
            refs.write("5")  # reset the peak (VmHWM) to the current RSS
        before = _proc_status(process.pid)["VmRSS"]
        rng = np.random.default_rng(0)
        frames = [codec.pack({"pad": rng.integers(0, 256, size, dtype=np.uint8)})
                  for size in (900_000, 1_900_000) * 6]
        results, errors = [], []

        def pipeline():
            try:
                with ws_connect(f"ws://127.0.0.1:{port}", open_timeout=TIMEOUT, max_size=None) as conn:
                    conn.recv(timeout=TIMEOUT)
                    sender = threading.Thread(target=lambda: [conn.send(f) for f in frames], daemon=True)
                    sender.start()
                    replies = [conn.recv(timeout=60) for _ in frames]
                    sender.join(TIMEOUT)
                    results.append(replies)
            except InvalidStatus as err:
                errors.append(err.response.status_code)

        clients = [threading.Thread(target=pipeline, daemon=True) for _ in range(6)]
        for client in clients:
            client.start()
        for client in clients:
            client.join(120)
        peak = _proc_status(process.pid)["VmHWM"]
        assert len(results) + len(errors) == 6 and len(results) >= 4 and set(errors) <= {503}
        for replies in results:
            assert [isinstance(r, str) for r in replies] == [False, True] * 6  # actions, too large, ...
            assert all("request too large" in r for r in replies[1::2])
        assert peak - before < bound, f"peak RSS grew by {(peak - before) / 2**20:.1f} MiB; bound {bound / 2**20:.1f} MiB"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=TIMEOUT) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=TIMEOUT)


# ---- handshakes ---------------------------------------------------------------------------------------
def test_malformed_handshakes_are_400_or_401_with_one_log_line(start_server, caplog):
    caplog.set_level(logging.INFO)
    server = start_server("droid", warmup=False, api_key="k3y")
    two = [("Authorization", "Api-Key k3y"), ("Authorization", "Api-Key k3y")]
    with pytest.raises(InvalidStatus) as refused:
        within(TIMEOUT, raw_connect, server, two)
    assert refused.value.response.status_code == 400 and b"exactly one" in refused.value.response.body
    with pytest.raises(InvalidStatus) as refused:
        within(TIMEOUT, raw_connect, server, {"Authorization": "Api-Key " + "x" * 5000})
    assert refused.value.response.status_code == 401
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:  # no Upgrade headers
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Api-Key k3y\r\n\r\n")
        status = sock.recv(4096).split(b"\r\n", 1)[0]
    assert re.match(rb"HTTP/1.1 4\d\d", status), status
    assert not [r for r in caplog.records if r.exc_info], "a malformed handshake logged a traceback"
    assert server.metrics.connections_refused >= 2
    conn, _ = within(TIMEOUT, raw_connect, server, {"Authorization": "Api-Key k3y"})
    with conn:
        assert _good_reply(conn).shape == (CHUNK, 8)


# ---- engine inputs, actions ----------------------------------------------------------------------------
RAW_MISTAKES = {
    "noise as text": {"noise": "x"},
    "ragged noise": {"noise": [[1.0, 2.0], [3.0]]},
    "noise of text": {"noise": [["a"] * 32] * CHUNK},
    "noise as a map": {"noise": {"a": 1}},
    "ragged image masks": {"image_masks": [[True], [True, False], True]},
    "ragged prompt tokens": {"prompt_tokens": [[1], [2, 3]], "prompt": None},
    "state as text": {"state": "x"},
    "ragged state": {"state": [[1.0], [1.0, 2.0]]},
    "view as text": {"images": ["a", "b", "c"]},
}


def test_mistyped_engine_inputs_are_bad_requests_not_internal_errors(start_server, caplog):
    caplog.set_level(logging.INFO, logger="cortexflow.serving")
    server = start_server("raw", warmup=False)
    rng = np.random.default_rng(5)
    good = {"images": rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8),
            "state": rng.uniform(-1, 1, 8).astype(np.float32), "prompt": "stack"}
    conn, _ = within(TIMEOUT, raw_connect, server)
    with conn:
        for name, patch in RAW_MISTAKES.items():
            obs = {k: v for k, v in {**good, **patch}.items() if v is not None}
            conn.send(codec.pack(obs))
            reply = conn.recv(timeout=TIMEOUT)
            assert isinstance(reply, str) and reply.startswith("bad request:"), (name, reply)
            assert _good_reply(conn, good).shape == (CHUNK, 32)
    fresh, _ = within(TIMEOUT, raw_connect, server)
    with fresh:
        assert _good_reply(fresh, good).shape == (CHUNK, 32)
    assert server.metrics.errors["internal"] == 0
    assert server.metrics.errors["bad_request"] == len(RAW_MISTAKES)
    assert not [r for r in caplog.records if r.exc_info]


def test_non_finite_actions_are_never_sent(start_server):
    """Finite but huge noise (3e38) overflows to NaN actions: an error reply and a metric, not NaNs."""
    policy = demo_policy("raw")
    rng = np.random.default_rng(6)
    obs = {"images": rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8),
           "state": rng.uniform(-1, 1, 8).astype(np.float32), "prompt": "stack"}
    huge = np.full((CHUNK, 32), 3e38, np.float32)
    engine = policy.engine
    assert engine.inference_config.check_finite_actions  # the served engine checks
    with pytest.raises(NonFiniteActionsError, match="NaN or inf"):
        engine.predict(obs["images"], state=obs["state"], prompt_tokens=[2, 5, 7], noise=huge)
    engine.inference_config.check_finite_actions = False  # the option off: predict returns what it computed
    assert not np.isfinite(engine.predict(obs["images"], state=obs["state"], prompt_tokens=[2, 5, 7], noise=huge)).all()
    server = start_server(policy, warmup=False)  # the server checks every reply itself, whatever the engine does
    conn, _ = within(TIMEOUT, raw_connect, server)
    with conn:
        conn.send(codec.pack({**obs, "noise": huge}))
        reply = conn.recv(timeout=TIMEOUT)
        assert isinstance(reply, str) and reply.startswith("no actions:") and "NaN or inf" in reply
        assert np.isfinite(_good_reply(conn, {**obs, "noise": rng.standard_normal((CHUNK, 32))})).all()
    fresh, _ = within(TIMEOUT, raw_connect, server)
    with fresh:
        assert np.isfinite(_good_reply(fresh, obs)).all()
    wait_until(lambda: server.metrics.replies == 2, message="the replies to be counted")
    assert server.metrics.errors["non_finite"] == 1
    status, _, text = http_get(server, "/metrics")
    assert 'cortexflow_request_errors_total{reason="non_finite"} 1' in text


# ---- abandoned requests, shutdown -------------------------------------------------------------------------
def test_queued_request_of_a_client_that_left_never_runs_nor_counts_as_a_reply(start_server):
    policy = GatedPolicy()
    server = start_server(policy, warmup=False)
    first, _ = within(TIMEOUT, raw_connect, server)
    first.send(codec.pack({"i": 0}))
    wait_until(lambda: policy.calls == [0], message="request 0 to be in flight")
    leaver, _ = within(TIMEOUT, raw_connect, server)
    leaver.send(codec.pack({"i": 1}))
    wait_until(lambda: server.metrics.gauges["queue_depth"]() == 1, message="request 1 to be queued")
    leaver.close()
    wait_until(lambda: server.metrics.errors["client_gone"] == 1, message="the departure to be noticed")
    policy.gate.set()
    assert codec.unpack(first.recv(timeout=TIMEOUT))["actions"][0, 0] == 0
    first.send(codec.pack({"i": 2}))
    assert codec.unpack(first.recv(timeout=TIMEOUT))["actions"][0, 0] == 2
    wait_until(lambda: server.metrics.replies == 2, message="the replies to be counted")
    assert policy.calls == [0, 2]  # request 1 was dropped from the queue
    first.close()


def test_shutdown_timeout_bounds_the_shutdown_and_counts_the_abandoned_request(start_server):
    policy = GatedPolicy()
    server = start_server(policy, shutdown_timeout=0.5, warmup=False)
    conn, _ = within(TIMEOUT, raw_connect, server)
    conn.send(codec.pack({"i": 0}))
    wait_until(lambda: policy.calls == [0], message="request 0 to be in flight")
    start = time.perf_counter()
    within(TIMEOUT, server.stop, timeout=TIMEOUT)
    took = time.perf_counter() - start
    assert took < 1.5, f"asked 0.5 s, took {took:.2f} s"
    assert server.requests_abandoned == 1
    with pytest.raises(ConnectionClosed) as closed:  # the client sees a close, not a reply
        conn.recv(timeout=TIMEOUT)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    policy.gate.set()


def test_cli_after_a_1e308_state_stops_promptly_and_an_abandoned_request_exits_non_zero(tmp_path):
    """``cortexflow serve``: a request whose state overflows float32 (a RuntimeWarning inside the server) must not
    make the next shutdown hang; a request still running at ``--shutdown-timeout`` makes the exit code 2."""
    key_file = tmp_path / "key"
    key_file.write_text("file-key\n")
    headers = {"Authorization": "Api-Key file-key"}
    overflow = {"images": np.random.default_rng(7).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8),
                "state": np.full(8, 1e308), "prompt_tokens": np.array([2, 5, 7])}
    process, port, lines, seen = start_cli_server("--no-warmup", "--robot", "raw", "--api-key-file", str(key_file))
    try:
        with ws_connect(f"ws://127.0.0.1:{port}", open_timeout=TIMEOUT, additional_headers=headers) as conn:
            meta = codec.unpack(conn.recv(timeout=TIMEOUT))
            assert meta["checkpoint"].startswith("demo") and meta["server_config"]["api_key_required"]
            conn.send(codec.pack(overflow))
            reply = conn.recv(timeout=TIMEOUT)
            assert isinstance(reply, str) and "NaN or inf" in reply
        process.send_signal(signal.SIGTERM)
        code, took, log = log_after_exit(process, lines, seen, 15)
        assert code == 0 and "server stopped" in log and "Traceback" not in log, log
    finally:
        if process.poll() is None:
            process.kill()
    # 3000 denoising steps keep the request in flight for seconds; the deadline is 0.3 s.
    process, port, lines, seen = start_cli_server("--no-warmup", "--robot", "raw", "--steps", "3000", "--shutdown-timeout", "0.3")
    try:
        with ws_connect(f"ws://127.0.0.1:{port}", open_timeout=TIMEOUT) as conn:
            conn.recv(timeout=TIMEOUT)
            conn.send(codec.pack(overflow))
            assert "NaN or inf" in conn.recv(timeout=TIMEOUT)
            conn.send(codec.pack({**overflow, "state": np.zeros(8, np.float32)}))
            time.sleep(0.5)  # the request is running
            process.send_signal(signal.SIGTERM)
            code, took, log = log_after_exit(process, lines, seen, 15)
            with pytest.raises(ConnectionClosed):
                conn.recv(timeout=TIMEOUT)
        assert code == 2 and took < 3.0, (code, took, log)
        assert "still running" in log and "Traceback" not in log, log
    finally:
        if process.poll() is None:
            process.kill()


# ---- small things: metadata, options -----------------------------------------------------------------------
def test_metadata_names_the_checkpoint_without_the_servers_path():
    assert checkpoint_name("/home/someone/models/pi05_droid") == "pi05_droid"
    assert checkpoint_name("/home/someone/models/pi05_droid/") == "pi05_droid"
    assert checkpoint_name("/srv/ckpt/pi0_libero/model.safetensors") == "pi0_libero/model.safetensors"
    assert checkpoint_name("relative/folder") == "folder"


def test_bad_host_and_api_key_options_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="host must be an address"):
        PolicyServer(GatedPolicy(), "", 0)
    with pytest.raises(ConfigError, match="max_connections"):
        PolicyServer(GatedPolicy(), "127.0.0.1", 0, max_connections=0)
    result = runner.invoke(app, ["serve", "--checkpoint", "demo", "--device", "cpu", "--host", ""])
    assert result.exit_code == 2 and "--host is empty" in result.stderr
    result = runner.invoke(app, ["serve", "--checkpoint", "demo", "--api-key-file", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "--api-key-file" in result.stderr and "cannot read" in result.stderr
    (tmp_path / "key").write_text("k")
    result = runner.invoke(app, ["serve", "--checkpoint", "demo", "--api-key", "k", "--api-key-file",
                                 str(tmp_path / "key")])
    assert result.exit_code == 2 and "not both" in result.stderr
    result = runner.invoke(app, ["serve", "--checkpoint", "demo", "--max-connections", "0"])
    assert result.exit_code == 2 and "--max-connections" in result.stderr
