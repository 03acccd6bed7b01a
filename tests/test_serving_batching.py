"""Cross-request batching in the policy server (``serve --max-batch N --batch-window-ms W``): concurrent
clients get the replies of unbatched calls with the same noise (none lost, none swapped), the metrics count
batched engine calls, and a batch holding one bad request answers it with an error and the others with
actions."""

from __future__ import annotations

import re
import threading

import numpy as np
import pytest

from cortexflow.errors import ConfigError
from cortexflow.serving.server import PolicyServer
from test_serving import (
    TIMEOUT, demo_policy, http_get, openpi_client, small_droid_obs)

pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager:DeprecationWarning")
CLIENTS = 16


@pytest.fixture(scope="module")
def policy():
    return demo_policy("droid", seed=0)


def batched_calls(metrics_page: str) -> tuple[int, int]:
    """(engine calls, calls that ran more than one request) from the batch-size histogram."""
    total = int(re.search(r"^cortexflow_batch_size_count (\d+)", metrics_page, re.M).group(1))
    single = int(re.search(r'^cortexflow_batch_size_bucket\{le="1(?:\.0)?"\} (\d+)', metrics_page, re.M).group(1))
    return total, total - single


def test_concurrent_clients_get_their_own_unbatched_replies(openpi, start_server, policy):
    server = start_server(policy, max_batch=8, batch_window_ms=50, queue_size=32, max_connections=CLIENTS + 2)
    clients = [openpi_client(openpi, server) for _ in range(CLIENTS)]
    observations = [small_droid_obs(10 + i, 0) for i in range(CLIENTS)]
    replies: dict[int, np.ndarray] = {}
    errors = []
    barrier = threading.Barrier(CLIENTS)

    def ask(i):
        try:
            barrier.wait(TIMEOUT)
            replies[i] = clients[i].infer(observations[i])["actions"]
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=ask, args=(i,), daemon=True) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors and len(replies) == CLIENTS
    expected = [policy.predict(obs) for obs in observations]
    for i in range(CLIENTS):
        scale = np.abs(expected[i]).max()
        assert np.abs(replies[i] - expected[i]).max() <= 1e-5 * scale, i
        others = [j for j in range(CLIENTS) if j != i]
        assert min(np.abs(replies[i] - expected[j]).max() for j in others) > 1e-3 * scale   # not someone else's
    _, _, page = http_get(server, "/metrics")
    calls, batched = batched_calls(page)
    assert batched >= 1 and calls < CLIENTS


def test_a_bad_request_in_a_batch_gets_its_error_and_the_others_their_actions(openpi, start_server):
    raw = demo_policy("raw", seed=0, views=2)
    server = start_server(raw, max_batch=4, batch_window_ms=200, max_connections=8)
    clients = [openpi_client(openpi, server) for _ in range(4)]
    rng = np.random.default_rng(3)
    size = raw.engine.config.image_size

    def obs(i, bad=False):
        noise_shape = (3, 3) if bad else (raw.engine.chunk_size, raw.engine.config.action_dim)
        return {"images": rng.integers(0, 256, (2, size, size, 3), dtype=np.uint8),
                "prompt_tokens": np.array([2, 5 + i, 9], dtype=np.int64),
                "state": rng.standard_normal(raw.engine.config.action_dim).astype(np.float32),
                "noise": rng.standard_normal(noise_shape).astype(np.float32)}

    observations = [obs(0), obs(1, bad=True), obs(2), obs(3)]
    results: dict[int, object] = {}
    barrier = threading.Barrier(4)

    def ask(i):
        barrier.wait(TIMEOUT)
        try:
            results[i] = clients[i].infer(observations[i])["actions"]
        except RuntimeError as err:
            results[i] = err

    threads = [threading.Thread(target=ask, args=(i,), daemon=True) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert isinstance(results[1], RuntimeError) and "noise has shape (3, 3)" in str(results[1])
    for i in (0, 2, 3):
        expected = raw.predict(observations[i])
        np.testing.assert_allclose(results[i], expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_bad_batch_settings_are_refused(policy):
    with pytest.raises(ConfigError, match="max_batch"):
        PolicyServer(policy, "127.0.0.1", 0, max_batch=0)
    with pytest.raises(ConfigError, match="max_batch"):
        PolicyServer(policy, "127.0.0.1", 0, max_batch=64, queue_size=32)
    with pytest.raises(ConfigError, match="batch_window_ms"):
        PolicyServer(policy, "127.0.0.1", 0, max_batch=2, batch_window_ms=-1)
