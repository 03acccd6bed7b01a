"""A bounded load generator for an openpi-protocol policy server (``cortexflow loadtest``).

``clients`` concurrent connections each send ``requests`` observations one after the other (as a robot
does: the next request after the previous reply), every wait bounded by ``timeout``. The observation is
a synthetic one in the format of the robot the server names in its metadata (or ``robot=``).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cortexflow.errors import ConfigError
from cortexflow.serving import _deps, codec
from cortexflow.serving.robots import ROBOT_NAMES, make_mapping

MAX_CLIENTS = 1024
MAX_REQUESTS_PER_CLIENT = 100_000


@dataclass
class LoadTestReport:
    """What a load test measured; latencies are per successful request, client-side, in ms."""

    url: str
    clients: int
    requests_per_client: int
    robot: str | None
    ok: int = 0
    errors: int = 0
    wall_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    error_messages: Counter = field(default_factory=Counter)
    server_infer_ms: list[float] = field(default_factory=list)

    @property
    def sent(self) -> int:
        return self.ok + self.errors

    def percentile(self, q: float) -> float | None:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else None

    @property
    def throughput(self) -> float:
        """Successful requests per second of wall time."""
        return self.ok / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        lat = self.latencies_ms
        return {
            "url": self.url,
            "robot": self.robot,
            "clients": self.clients,
            "requests_per_client": self.requests_per_client,
            "requests": self.clients * self.requests_per_client,
            "ok": self.ok,
            "errors": self.errors,
            "error_messages": dict(self.error_messages.most_common(10)),
            "wall_s": self.wall_s,
            "throughput_rps": self.throughput,
            "latency_ms": {
                "p50": self.percentile(50),
                "p90": self.percentile(90),
                "p99": self.percentile(99),
                "mean": float(np.mean(lat)) if lat else None,
                "min": float(np.min(lat)) if lat else None,
                "max": float(np.max(lat)) if lat else None,
            },
            "server_infer_ms_p50": float(np.percentile(self.server_infer_ms, 50)) if self.server_infer_ms else None,
        }


def observation_for(metadata: dict, robot: str | None = None, seed: int = 0, image_size: int = 224) -> dict:
    """A synthetic observation in the format the server's metadata (or ``robot``) describes."""
    name = robot or metadata.get("robot")
    if name not in ROBOT_NAMES:
        raise ConfigError(
            f"the server's metadata names no known robot ({metadata.get('robot')!r}); pass --robot "
            f"({', '.join(ROBOT_NAMES)})"
        )
    if metadata.get("action_decoding") == "tokens":  # OpenVLA / RT-2: one image and a prompt
        from cortexflow.serving.decoding_policy import TokenRobotMapping

        mapping: Any = TokenRobotMapping(name)
    else:
        mapping = make_mapping(name, num_views=int(metadata.get("num_views") or 3), state_dim=metadata.get("state_dim"))
    text = bool((metadata.get("prompt") or {}).get("text", True))
    return mapping.example_observation(seed, image_size, image_size, text_prompt=text)


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "(empty)"
    return line[:200]


async def _client(index: int, url: str, requests: int, api_key: str | None, timeout: float, robot: str | None,
                  seed: int, image_size: int, report: LoadTestReport) -> None:
    client_module = _deps.websockets_client()
    exceptions = _deps.websockets_exceptions()
    headers = {"Authorization": f"Api-Key {api_key}"} if api_key else None
    done = 0

    def fail(message: str, count: int = 1) -> None:
        report.errors += count
        report.error_messages[message] += count

    try:
        async with client_module.connect(
            url, additional_headers=headers, compression=None, max_size=None, open_timeout=timeout,
            close_timeout=min(timeout, 5.0),
        ) as websocket:
            metadata = codec.unpack(await asyncio.wait_for(websocket.recv(), timeout))
            if not isinstance(metadata, dict):
                raise ConfigError("the server's first frame is not a metadata map: is this an openpi policy server?")
            if report.robot is None:
                report.robot = robot or metadata.get("robot")
            frame = codec.pack(observation_for(metadata, robot, seed + index, image_size))
            for _ in range(requests):
                start = time.perf_counter()
                await websocket.send(frame)
                reply = await asyncio.wait_for(websocket.recv(), timeout)
                elapsed_ms = (time.perf_counter() - start) * 1e3
                done += 1
                if isinstance(reply, str):
                    fail(_first_line(reply))
                    continue
                decoded = codec.unpack(reply)
                if not isinstance(decoded, dict) or "actions" not in decoded:
                    fail("reply without 'actions'")
                    continue
                report.ok += 1
                report.latencies_ms.append(elapsed_ms)
                timing = decoded.get("server_timing") or {}
                if isinstance(timing, dict) and "infer_ms" in timing:
                    report.server_infer_ms.append(float(timing["infer_ms"]))
    except asyncio.TimeoutError:
        fail(f"no reply within {timeout} s", max(1, requests - done))
    except exceptions.InvalidStatus as err:
        fail(f"connection refused: HTTP {err.response.status_code}", requests - done)
    except exceptions.ConnectionClosed as err:
        fail(f"connection closed: {err}", requests - done)
    except (OSError, exceptions.InvalidHandshake, exceptions.InvalidURI) as err:
        fail(f"cannot connect: {err}", requests - done)
    except ConfigError:
        raise
    except Exception as err:  # a malformed reply must not hide the other clients' results
        fail(f"{type(err).__name__}: {err}", max(1, requests - done))


async def run_loadtest_async(url: str, clients: int, requests: int, *, api_key: str | None = None,
                             timeout: float = 30.0, robot: str | None = None, seed: int = 0,
                             image_size: int = 224) -> LoadTestReport:
    """See :func:`run_loadtest`."""
    if not isinstance(clients, int) or not 1 <= clients <= MAX_CLIENTS:
        raise ConfigError(f"--clients must be between 1 and {MAX_CLIENTS}, got {clients!r}")
    if not isinstance(requests, int) or not 1 <= requests <= MAX_REQUESTS_PER_CLIENT:
        raise ConfigError(f"--requests must be between 1 and {MAX_REQUESTS_PER_CLIENT}, got {requests!r}")
    if timeout <= 0:
        raise ConfigError(f"--timeout must be positive, got {timeout!r}")
    if robot is not None and robot not in ROBOT_NAMES:
        raise ConfigError(f"unknown robot {robot!r}; expected one of: {', '.join(ROBOT_NAMES)}")
    if not url.startswith(("ws://", "wss://")):
        url = "ws://" + url
    report = LoadTestReport(url=url, clients=clients, requests_per_client=requests, robot=robot)
    start = time.perf_counter()
    await asyncio.gather(*(
        _client(i, url, requests, api_key, timeout, robot, seed, image_size, report) for i in range(clients)
    ))
    report.wall_s = time.perf_counter() - start
    return report


def run_loadtest(url: str, clients: int, requests: int, *, api_key: str | None = None, timeout: float = 30.0,
                 robot: str | None = None, seed: int = 0, image_size: int = 224) -> LoadTestReport:
    """Run ``clients`` x ``requests`` requests against ``url`` and report latency percentiles, throughput and
    errors. Every connect and reply wait is bounded by ``timeout`` seconds."""
    _deps.websockets_client()
    _deps.msgpack()
    return asyncio.run(run_loadtest_async(url, clients, requests, api_key=api_key, timeout=timeout,
                                          robot=robot, seed=seed, image_size=image_size))
