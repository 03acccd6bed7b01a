"""Server counters and latency histograms, rendered in the Prometheus text exposition format (0.0.4)."""

from __future__ import annotations

import threading
from typing import Callable

# Seconds; robot control loops care about 10 ms .. 1 s.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# non_finite: the model produced NaN/inf actions (not sent); client_gone: the client left before its reply.
ERROR_REASONS = ("bad_request", "undecodable", "too_large", "busy", "shutting_down", "internal", "non_finite",
                 "client_gone")
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Histogram:
    """A cumulative Prometheus histogram (``_bucket{le=...}``, ``_sum``, ``_count``)."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * len(self.buckets)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.total += value
        self.count += 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def render(self, name: str, help_text: str) -> list[str]:
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        for bound, count in zip(self.buckets, self.counts):
            lines.append(f'{name}_bucket{{le="{_number(bound)}"}} {count}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        lines.append(f"{name}_sum {_number(self.total)}")
        lines.append(f"{name}_count {self.count}")
        return lines


def _number(value: float) -> str:
    return repr(float(value))


def _label(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class ServerMetrics:
    """Counters of one server. Thread-safe; ``render()`` gives the ``/metrics`` page."""

    def __init__(self, info: dict[str, str] | None = None, gauges: dict[str, Callable[[], float]] | None = None):
        self._lock = threading.Lock()
        self.info = dict(info or {})
        self.gauges = dict(gauges or {})
        self.requests = 0
        self.replies = 0
        self.errors = {reason: 0 for reason in ERROR_REASONS}
        self.connections_opened = 0
        self.connections_active = 0
        self.connections_refused = 0
        self.latency = Histogram()
        self.inference = Histogram()
        self.queue_wait = Histogram()
        self.batch_size = Histogram(BATCH_SIZE_BUCKETS)

    def request(self) -> None:
        with self._lock:
            self.requests += 1

    def error(self, reason: str) -> None:
        with self._lock:
            self.errors[reason] = self.errors.get(reason, 0) + 1

    def reply(self, latency_s: float, inference_s: float, queue_s: float) -> None:
        with self._lock:
            self.replies += 1
            self.latency.observe(latency_s)
            self.inference.observe(inference_s)
            self.queue_wait.observe(queue_s)

    def batch(self, size: int) -> None:
        """One engine call that ran ``size`` requests (1 without cross-request batching)."""
        with self._lock:
            self.batch_size.observe(size)

    def connection_opened(self) -> None:
        with self._lock:
            self.connections_opened += 1
            self.connections_active += 1

    def connection_closed(self) -> None:
        with self._lock:
            self.connections_active -= 1

    def connection_refused(self) -> None:
        with self._lock:
            self.connections_refused += 1

    @property
    def error_count(self) -> int:
        with self._lock:
            return sum(self.errors.values())

    def render(self) -> str:
        with self._lock:
            lines: list[str] = []
            if self.info:
                labels = ",".join(f'{k}="{_label(v)}"' for k, v in sorted(self.info.items()))
                lines += ["# HELP cortexflow_server_info What this server runs.",
                          "# TYPE cortexflow_server_info gauge", f"cortexflow_server_info{{{labels}}} 1"]
            lines += ["# HELP cortexflow_requests_total Inference requests received (every frame after the metadata).",
                      "# TYPE cortexflow_requests_total counter", f"cortexflow_requests_total {self.requests}"]
            lines += ["# HELP cortexflow_replies_total Requests answered with actions (replies handed to the connection).",
                      "# TYPE cortexflow_replies_total counter", f"cortexflow_replies_total {self.replies}"]
            lines += ["# HELP cortexflow_request_errors_total Requests answered with an error, by reason.",
                      "# TYPE cortexflow_request_errors_total counter"]
            lines += [f'cortexflow_request_errors_total{{reason="{_label(r)}"}} {n}' for r, n in sorted(self.errors.items())]
            lines += ["# HELP cortexflow_connections_total WebSocket connections opened.",
                      "# TYPE cortexflow_connections_total counter", f"cortexflow_connections_total {self.connections_opened}"]
            lines += ["# HELP cortexflow_connections_active WebSocket connections open now.",
                      "# TYPE cortexflow_connections_active gauge", f"cortexflow_connections_active {self.connections_active}"]
            lines += ["# HELP cortexflow_connections_refused_total Handshakes refused (API key, too many connections, "
                      "malformed, shutting down).",
                      "# TYPE cortexflow_connections_refused_total counter",
                      f"cortexflow_connections_refused_total {self.connections_refused}"]
            for name, read in sorted(self.gauges.items()):
                lines += [f"# HELP cortexflow_{name} {name.replace('_', ' ')}.", f"# TYPE cortexflow_{name} gauge",
                          f"cortexflow_{name} {_number(read())}"]
            lines += self.latency.render(
                "cortexflow_request_latency_seconds", "Time from receiving a request to sending its actions.")
            lines += self.inference.render("cortexflow_inference_latency_seconds", "Time the engine spent on a request.")
            lines += self.queue_wait.render("cortexflow_queue_wait_seconds", "Time a request waited for the engine.")
            lines += self.batch_size.render("cortexflow_batch_size", "Requests per engine call (--max-batch).")
        return "\n".join(lines) + "\n"
