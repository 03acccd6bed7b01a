"""The robot-side real-time-chunking loop (cortexflow.serving.rtc_client) against a fake openpi policy:
chunks execute at the control rate while the next request is in flight, the request carries the executed
steps and the delay estimate, the new chunk starts at the measured delay, and a plain controller sends
no RTC keys."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from cortexflow.errors import InputError
from cortexflow.serving.chunking import RTC_EXECUTED_STEPS, RTC_INFERENCE_DELAY
from cortexflow.serving.rtc_client import ChunkedController

CHUNK = 20


class FakePolicy:
    """openpi-client's ``infer``: sleeps ``latency`` s and returns chunk ``k`` with ``actions[i] = (k, i)``."""

    def __init__(self, latency: float):
        self.latency = latency
        self.messages = []

    def infer(self, observation):
        self.messages.append(dict(observation))
        time.sleep(self.latency)
        k = len(self.messages) - 1
        return {"actions": np.stack([np.full(CHUNK, k), np.arange(CHUNK)], axis=1).astype(np.float32)}


def run(rtc: bool, latency=0.06, hz=50.0, horizon=8, steps=60):
    policy, executed = FakePolicy(latency), []
    lock = threading.Lock()

    def execute(action):
        with lock:
            executed.append(tuple(int(v) for v in action))

    controller = ChunkedController(policy, lambda: {"observation/state": np.zeros(8)}, execute, hz, horizon, rtc=rtc,
                                   initial_delay_steps=2)
    return controller.run(steps), policy, executed


def test_chunks_switch_at_the_measured_delay_and_requests_carry_it():
    report, policy, executed = run(rtc=True)
    assert report.starved_steps == 0                        # the next chunk always came in time
    assert report.executed == 60 and len(executed) == 60
    assert report.chunks >= 3 and len(report.delays_steps) == report.chunks - 1
    assert all(1 <= d <= 10 for d in report.delays_steps)   # 60 ms at 50 Hz is 3 steps; a busy host adds some
    assert RTC_EXECUTED_STEPS not in policy.messages[0]     # the first chunk has nothing to follow
    for i, message in enumerate(policy.messages[1:]):
        assert message[RTC_EXECUTED_STEPS] >= 8             # asked once the execution horizon was executed
        expected_delay = max(([2] + report.delays_steps[:i])[-5:])   # the last 5 delays known when it was sent
        assert message[RTC_INFERENCE_DELAY] == expected_delay
    # within each chunk the actions run in order; a new chunk k starts at its action `delay of request k`
    for (k0, i0), (k1, i1) in zip(executed, executed[1:]):
        if k1 == k0:
            assert i1 == i0 + 1
        else:
            assert k1 == k0 + 1 and i1 == report.delays_steps[k1 - 1]


def test_plain_controller_sends_no_rtc_keys():
    report, policy, _ = run(rtc=False, steps=30)
    assert report.chunks >= 2
    assert all(RTC_EXECUTED_STEPS not in m and RTC_INFERENCE_DELAY not in m for m in policy.messages)


def test_a_slow_policy_starves_the_robot_and_the_report_says_so():
    report, _, _ = run(rtc=True, latency=0.5, hz=50.0, horizon=15, steps=40)
    assert report.starved_steps > 0


def test_bad_controller_arguments():
    with pytest.raises(InputError, match="control_hz"):
        ChunkedController(FakePolicy(0), dict, print, 0, 5)
    with pytest.raises(InputError, match="execution_horizon"):
        ChunkedController(FakePolicy(0), dict, print, 10, 0)
