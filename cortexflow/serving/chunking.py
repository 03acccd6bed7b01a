"""Real-time chunking over the openpi protocol: the optional request keys and the per-connection state.

A client that executes chunks while it asks for the next one (``cortexflow.serving.rtc_client``) adds two
keys to its observation: ``rtc/executed_steps`` (how many actions of the last chunk this connection received
had been executed when the observation was taken) and ``rtc/inference_delay`` (how many more it expects to
execute before the reply arrives). The server keeps the last chunk it sent on each connection (as the engine
returned it, before the robot mapping) and guides the new chunk towards that chunk's remaining actions
(``engine.predict(prev_actions=, inference_delay=)``). A request without the keys is answered exactly as
before, so a plain openpi client sees no change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from cortexflow.errors import InputError

RTC_EXECUTED_STEPS = "rtc/executed_steps"
RTC_INFERENCE_DELAY = "rtc/inference_delay"
RTC_KEYS = (RTC_EXECUTED_STEPS, RTC_INFERENCE_DELAY)


@dataclass(frozen=True)
class ChunkFollowUp:
    """The real-time-chunking part of one request."""

    executed_steps: int
    inference_delay: int


@dataclass
class ChunkSession:
    """What the server keeps per connection: the last chunk the engine returned for it (``(H, A)`` fp32, or
    None) and the policy's episode state for policies with a history (RT-1's frames; None until first used)."""

    last_chunk: np.ndarray | None = None
    episode: Any = None

    def previous_actions(self, follow_up: ChunkFollowUp | None) -> tuple[np.ndarray | None, int]:
        """``(prev_actions, inference_delay)`` for ``engine.predict``: the last chunk's actions from
        ``executed_steps`` on, the delay clipped to them; ``(None, 0)`` without a follow-up, without a last
        chunk or with nothing of it left."""
        if follow_up is None or self.last_chunk is None:
            return None, 0
        remaining = self.last_chunk[follow_up.executed_steps:]
        if len(remaining) == 0:
            return None, 0
        return remaining, min(follow_up.inference_delay, len(remaining))


def _count(observation: Mapping[str, Any], key: str) -> int:
    value = observation[key]
    if isinstance(value, np.ndarray) and value.shape == () and value.dtype.kind in "iu":
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0 or value > 1_000_000:
        raise InputError(f"{key} must be a non-negative integer (control steps), got {str(value)[:40]!r}")
    return int(value)


def split_follow_up(observation: Any) -> tuple[Any, ChunkFollowUp | None]:
    """``(observation without the RTC keys, ChunkFollowUp or None)``; both keys or neither (InputError)."""
    if not isinstance(observation, Mapping) or not any(key in observation for key in RTC_KEYS):
        return observation, None
    missing = [key for key in RTC_KEYS if key not in observation]
    if missing:
        raise InputError(f"a real-time-chunking request needs both {RTC_KEYS[0]} and {RTC_KEYS[1]}; missing {missing}")
    follow_up = ChunkFollowUp(_count(observation, RTC_EXECUTED_STEPS), _count(observation, RTC_INFERENCE_DELAY))
    return {k: v for k, v in observation.items() if k not in RTC_KEYS}, follow_up
