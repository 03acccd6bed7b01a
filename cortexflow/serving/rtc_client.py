"""The robot side of real-time chunking over the openpi protocol.

:class:`ChunkedController` executes action chunks at a fixed control rate in a thread of its own while
the next chunk is requested, and asks the server to guide each new chunk towards the actions the robot
will still execute from the current one (the request keys of :mod:`cortexflow.serving.chunking`). It needs nothing beyond
an object with openpi-client's ``infer(observation) -> {"actions": (H, D)}`` (``WebsocketClientPolicy``).

Timeline of one chunk (control steps, counted from the first action of the chunk in execution):
after ``execution_horizon`` actions the controller reads an observation and sends it with
``rtc/executed_steps`` (actions of the server's last chunk executed when the observation was taken) and
``rtc/inference_delay`` (the steps it expects the reply to take, the largest delay measured over the last
``delay_window`` requests, rounded up); the robot keeps executing the current chunk meanwhile. When the
reply arrives ``d`` steps later, the new chunk starts at its action ``d``: its first ``d`` actions cover the
steps the robot already executed from the old chunk, which the guidance made them agree with.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from cortexflow.errors import InputError
from cortexflow.serving.chunking import RTC_EXECUTED_STEPS, RTC_INFERENCE_DELAY



@dataclass
class ControllerReport:
    """What a :meth:`ChunkedController.run` did: ``delays_steps`` measured per guided request (control steps
    between the observation and the reply), ``latencies_ms`` per request, ``starved_steps`` control ticks
    with no action left to execute (the robot paused), ``executed`` actions executed in all."""

    delays_steps: list[int] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    starved_steps: int = 0
    executed: int = 0
    chunks: int = 0


class ChunkedController:
    """Executes chunks from ``policy`` at ``control_hz`` with real-time chunking.

    ``get_observation()`` returns the robot's observation dict (openpi keys); ``execute_action(action)`` sends
    one action ``(D,)`` to the robot. ``execution_horizon``: actions executed from each chunk before the next
    request starts (the paper's ``s``; at most the chunk length minus the expected delay). ``rtc=False`` sends
    plain requests (same timing, no guidance keys) for comparison."""

    def __init__(
        self,
        policy: Any,
        get_observation: Callable[[], Mapping[str, Any]],
        execute_action: Callable[[np.ndarray], None],
        control_hz: float,
        execution_horizon: int,
        *,
        rtc: bool = True,
        initial_delay_steps: int = 0,
        delay_window: int = 5,
    ):
        if not control_hz > 0:
            raise InputError(f"control_hz must be > 0, got {control_hz!r}")
        if not isinstance(execution_horizon, int) or execution_horizon < 1:
            raise InputError(f"execution_horizon must be a positive integer, got {execution_horizon!r}")
        self.policy = policy
        self.get_observation = get_observation
        self.execute_action = execute_action
        self.period = 1.0 / control_hz
        self.execution_horizon = execution_horizon
        self.rtc = rtc
        self._recent_delays: deque[int] = deque([initial_delay_steps], maxlen=delay_window)
        self._lock = threading.Lock()
        self._chunk: np.ndarray | None = None
        self._index = 0  # next action of self._chunk to execute
        self._stop = threading.Event()

    # ---- one request ---------------------------------------------------------------------------
    def _request(self, observation: Mapping[str, Any], executed: int | None) -> np.ndarray:
        message = dict(observation)
        if self.rtc and executed is not None:
            message[RTC_EXECUTED_STEPS] = int(executed)
            message[RTC_INFERENCE_DELAY] = int(max(self._recent_delays))
        reply = self.policy.infer(message)
        actions = np.asarray(reply["actions"], dtype=np.float32)
        if actions.ndim != 2 or len(actions) == 0:
            raise InputError(f"the policy replied with actions of shape {actions.shape}; expected (chunk, action_dim)")
        return actions

    # ---- the control thread --------------------------------------------------------------------
    def _control_loop(self, report: ControllerReport, max_steps: int) -> None:
        next_tick = time.perf_counter()
        while not self._stop.is_set() and report.executed + report.starved_steps < max_steps:
            with self._lock:
                action = None
                if self._chunk is not None and self._index < len(self._chunk):
                    action = self._chunk[self._index]
                    self._index += 1
            if action is None:
                report.starved_steps += 1
            else:
                self.execute_action(action)
                report.executed += 1
            next_tick += self.period
            time.sleep(max(0.0, next_tick - time.perf_counter()))
        self._stop.set()

    def run(self, steps: int) -> ControllerReport:
        """Run ``steps`` control ticks (the first chunk is fetched before the clock starts); returns the report."""
        report = ControllerReport()
        start = time.perf_counter()
        self._chunk, self._index = self._request(self.get_observation(), None), 0
        report.latencies_ms.append((time.perf_counter() - start) * 1e3)
        report.chunks = 1
        self._stop.clear()
        control = threading.Thread(target=self._control_loop, args=(report, steps), daemon=True)
        control.start()
        try:
            while not self._stop.is_set():
                with self._lock:
                    due = self._index >= self.execution_horizon
                    executed = self._index
                if not due:
                    time.sleep(self.period / 4)
                    continue
                observation = self.get_observation()
                sent = time.perf_counter()
                chunk = self._request(observation, executed)
                with self._lock:
                    delay = self._index - executed
                    self._chunk, self._index = chunk, min(delay, len(chunk))
                report.latencies_ms.append((time.perf_counter() - sent) * 1e3)
                report.delays_steps.append(delay)
                report.chunks += 1
                self._recent_delays.append(delay)
        finally:
            self._stop.set()
            control.join()
        return report

