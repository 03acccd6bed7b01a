"""Real-time chunking behind the openpi protocol (cortexflow.serving.chunking): a plain openpi client sees
no change; a request with ``rtc/executed_steps`` and ``rtc/inference_delay`` gets the engine's guided chunk
towards the connection's last chunk; bad keys are bad requests; the robot-side ChunkedController runs
against a real server."""

from __future__ import annotations

import numpy as np
import pytest

from cortexflow.serving.chunking import RTC_EXECUTED_STEPS, RTC_INFERENCE_DELAY, ChunkFollowUp, ChunkSession
from cortexflow.serving.rtc_client import ChunkedController
from test_serving import TIMEOUT, demo_policy, openpi_client, small_droid_obs, within

pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager:DeprecationWarning")


@pytest.fixture(scope="module")
def policy():
    return demo_policy("droid", seed=0)


def test_plain_client_gets_exactly_the_unguided_actions(openpi, start_server, policy):
    server = start_server(policy)
    client = openpi_client(openpi, server)
    for j in range(2):
        obs = small_droid_obs(1, j)
        reply = within(TIMEOUT, client.infer, obs)["actions"]
        assert np.array_equal(reply, policy.predict(obs))


def test_follow_up_request_gets_the_engines_guided_chunk(openpi, start_server, policy):
    server = start_server(policy)
    client = openpi_client(openpi, server)
    first = small_droid_obs(2, 0)
    within(TIMEOUT, client.infer, first)
    engine_chunk = policy.engine.predict(**engine_args(policy, first))      # what the server kept
    second = small_droid_obs(2, 1)
    guided = within(TIMEOUT, client.infer, {**second, RTC_EXECUTED_STEPS: 2, RTC_INFERENCE_DELAY: 1})["actions"]
    expected = policy.engine.predict(**engine_args(policy, second), prev_actions=engine_chunk[2:], inference_delay=1)
    np.testing.assert_allclose(guided, policy.mapping.to_robot(expected), rtol=0, atol=1e-6)
    assert not np.allclose(guided, policy.predict(second), atol=1e-4)          # the guidance changed something


def engine_args(policy, obs):
    request = policy.prepare(obs)
    return dict(observation_images=request.images, task_prompt=request.prompt, state=request.state,
                noise=policy._noise, prompt_tokens=request.prompt_tokens, image_masks=request.image_masks)


def test_bad_follow_up_keys_are_bad_requests_and_the_connection_goes_on(openpi, start_server, policy):
    server = start_server(policy)
    client = openpi_client(openpi, server)
    obs = small_droid_obs(3, 0)
    within(TIMEOUT, client.infer, obs)
    for extra, message in (({RTC_EXECUTED_STEPS: 1}, "needs both"),
                           ({RTC_EXECUTED_STEPS: -1, RTC_INFERENCE_DELAY: 0}, "non-negative integer"),
                           ({RTC_EXECUTED_STEPS: "x", RTC_INFERENCE_DELAY: 0}, "non-negative integer")):
        with pytest.raises(RuntimeError, match=message):
            within(TIMEOUT, client.infer, {**obs, **extra})
    assert np.array_equal(within(TIMEOUT, client.infer, obs)["actions"], policy.predict(obs))


def test_session_previous_actions():
    session = ChunkSession()
    assert session.previous_actions(ChunkFollowUp(1, 1)) == (None, 0)
    session.last_chunk = np.arange(10, dtype=np.float32).reshape(5, 2)
    prev, delay = session.previous_actions(ChunkFollowUp(2, 9))
    assert prev.tolist() == [[4, 5], [6, 7], [8, 9]] and delay == 3
    assert session.previous_actions(ChunkFollowUp(5, 1)) == (None, 0)
    assert session.previous_actions(None) == (None, 0)


def test_chunked_controller_against_a_real_server(openpi, start_server, policy):
    server = start_server(policy)
    client = openpi_client(openpi, server)
    executed = []
    controller = ChunkedController(client, lambda: small_droid_obs(4, len(executed)), executed.append,
                                   control_hz=20.0, execution_horizon=2, initial_delay_steps=1)
    report = within(60, controller.run, 12)
    assert report.executed + report.starved_steps == 12
    assert report.chunks >= 2 and all(d >= 0 for d in report.delays_steps)
    assert all(action.shape == (8,) for action in executed)


def test_rtc_jacobian_option_follows_the_backend(policy):
    from cortexflow.errors import ConfigError
    from cortexflow.serving.policy import PolicyOptions, build_policy

    assert policy.rtc.jacobian == "vjp"                                  # pytorch backend: the paper's guidance
    fused = build_policy(PolicyOptions(checkpoint="demo", robot="droid", device="cpu", backend="triton"))
    assert fused.rtc.jacobian == "identity"                              # the fused loop cannot be differentiated
    chosen = build_policy(PolicyOptions(checkpoint="demo", robot="droid", device="cpu", rtc_jacobian="identity"))
    assert chosen.rtc.jacobian == "identity"
    with pytest.raises(ConfigError, match="--backend pytorch"):
        build_policy(PolicyOptions(checkpoint="demo", robot="droid", device="cpu", backend="triton",
                                   rtc_jacobian="vjp"))
    with pytest.raises(ConfigError, match="--rtc-jacobian must be one of"):
        build_policy(PolicyOptions(checkpoint="demo", robot="droid", device="cpu", rtc_jacobian="exact"))


def test_identity_rtc_policy_answers_a_follow_up_with_the_engines_identity_chunk():
    from cortexflow import RTCConfig
    from cortexflow.serving.policy import PolicyOptions, build_policy

    served = build_policy(PolicyOptions(checkpoint="demo", robot="droid", device="cpu", seed=0,
                                        rtc_jacobian="identity"))
    first = served.engine.predict(**engine_args(served, small_droid_obs(3, 0)))
    args = engine_args(served, small_droid_obs(3, 1))
    request = served.prepare(small_droid_obs(3, 1))
    _, _, chunk = served.infer_chunk(request, first[2:], 1)
    expected = served.engine.predict(**args, prev_actions=first[2:], inference_delay=1, rtc=RTCConfig(jacobian="identity"))
    assert np.array_equal(chunk, expected)
    assert not np.array_equal(chunk, served.engine.predict(**args, prev_actions=first[2:], inference_delay=1))
