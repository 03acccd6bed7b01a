"""The bodies of ``cortexflow serve`` and ``cortexflow loadtest`` (the typer options live in ``cortexflow.cli``)."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from typing import Callable

from cortexflow.errors import ConfigError
from cortexflow.serving import _deps
from cortexflow.serving.loadtest import LoadTestReport, run_loadtest
from cortexflow.serving.policy import PolicyOptions, build_policy
from cortexflow.serving.server import PolicyServer, ShutdownDeadlineError, is_loopback

MIB = 1024 * 1024


def _configure_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    server_logger = logging.getLogger("cortexflow.serving")
    if not server_logger.handlers:
        server_logger.addHandler(handler)
    server_logger.setLevel(logging.INFO)
    server_logger.propagate = False
    logging.getLogger("websockets").setLevel(logging.WARNING)


def serve(
    options: PolicyOptions,
    *,
    host: str,
    port: int,
    api_key: str | None,
    max_message_mb: float,
    queue_size: int,
    shutdown_timeout: float,
    warmup: bool,
    max_connections: int,
    idle_timeout: float,
    info: Callable[[str], None],
    warn: Callable[[str], None],
    max_batch: int = 1,
    batch_window_ms: float = 0.0,
) -> None:
    """Load the policy, serve it until SIGINT/SIGTERM, shut down gracefully; raise
    :class:`ShutdownDeadlineError` when a request was still running at the ``--shutdown-timeout`` deadline."""
    _deps.websockets_server()  # a missing dependency is reported before a model is loaded
    _deps.msgpack()
    if not host.strip():
        raise ConfigError("--host is empty; pass the address to bind: 127.0.0.1 (this machine only) or 0.0.0.0 "
                          "(every interface)")
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be in 0..65535 (0: any free port), got {port}")
    if max_message_mb <= 0:
        raise ConfigError(f"--max-message-mb must be positive, got {max_message_mb}")
    if max_connections < 1:
        raise ConfigError(f"--max-connections must be at least 1, got {max_connections}")
    if idle_timeout <= 0 or shutdown_timeout <= 0:
        raise ConfigError(f"--idle-timeout and --shutdown-timeout must be positive seconds, got {idle_timeout:g} "
                          f"and {shutdown_timeout:g}")
    if not 1 <= max_batch <= queue_size:
        raise ConfigError(f"--max-batch must be in 1..--queue-size ({queue_size}), got {max_batch}")
    if not 0 <= batch_window_ms <= 1000:
        raise ConfigError(f"--batch-window-ms must be in 0..1000, got {batch_window_ms:g}")
    if api_key is not None and not api_key.strip():
        api_key = None
    if not is_loopback(host) and api_key is None:
        warn(f"serving on {host} without --api-key: anyone who can reach this port can query the policy")
    devices = [d.strip() for d in str(options.device).split(",") if d.strip()] or ["auto"]
    policies = [build_policy(dataclasses.replace(options, device=device), log=info) for device in devices]
    server = PolicyServer(
        policies,
        host,
        port,
        api_key=api_key,
        max_message_bytes=max(1024, int(max_message_mb * MIB)),
        queue_size=queue_size,
        shutdown_timeout=shutdown_timeout,
        max_connections=max_connections,
        idle_timeout=idle_timeout,
        warmup=warmup,
        max_batch=max_batch,
        batch_window_ms=batch_window_ms,
    )
    meta = server.metadata
    if meta.get("action_decoding") == "tokens":
        if not meta.get("actions_unnormalized"):
            warn("no action statistics (openvla: none in the checkpoint; rt2: no --norm-stats): actions are "
                 "returned normalised in [-1, 1]")
    elif not meta.get("actions_unnormalized") and options.checkpoint != "demo":
        warn("no --norm-stats: state is used as given and actions are returned normalised")
    _configure_logging()

    def ready(running: PolicyServer) -> None:
        http = f"http://{running.url.removeprefix('ws://')}"
        engines = f"{len(policies)} engines" if len(policies) > 1 else "one engine"
        if max_batch > 1:
            engines += f", batches of up to {max_batch} requests ({batch_window_ms:g} ms window)"
        info(
            f"serving {meta['model']} ({meta['checkpoint']}) for robot {meta['robot']}: {meta['chunk_size']} x "
            f"{meta['action_dim']} actions, {engines} on {meta['device']} {meta['dtype']}"
        )
        info(f"listening on {running.url}  (health: {http}/healthz, metrics: {http}/metrics); Ctrl-C or SIGTERM stops")

    server.run(on_ready=ready)
    if server.requests_abandoned:
        raise ShutdownDeadlineError(
            f"stopped with {server.requests_abandoned} request(s) still running at the --shutdown-timeout deadline "
            f"({shutdown_timeout:g} s) or a second signal: their clients' connections were closed (1001) without a reply"
        )
    info("server stopped")


def read_api_key_file(path: str) -> str:
    """``--api-key-file``: the key is the file's text without surrounding whitespace."""
    try:
        with open(path, encoding="utf-8") as file:
            key = file.read().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--api-key-file {path}: cannot read it ({err})") from None
    if not key or any(c.isspace() for c in key):
        raise ConfigError(f"--api-key-file {path}: expected one key without spaces, found "
                          f"{'nothing' if not key else 'whitespace inside'}")
    return key


def loadtest(url: str, clients: int, requests: int, *, api_key: str | None, timeout: float, robot: str | None,
             seed: int, image_size: int) -> LoadTestReport:
    return run_loadtest(url, clients, requests, api_key=api_key, timeout=timeout, robot=robot, seed=seed,
                        image_size=image_size)


def format_report(report: LoadTestReport, as_json: bool) -> str:
    """The text ``cortexflow loadtest`` prints."""
    data = report.to_dict()
    if as_json:
        return json.dumps(data, indent=2)
    lat = data["latency_ms"]

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f} ms"

    lines = [
        f"load test of {report.url} (robot {report.robot or '?'}): {report.clients} client(s) x "
        f"{report.requests_per_client} request(s)",
        f"  ok          {report.ok} / {report.clients * report.requests_per_client}",
        f"  errors      {report.errors}",
        f"  latency     p50 {ms(lat['p50'])}   p90 {ms(lat['p90'])}   p99 {ms(lat['p99'])}   "
        f"(min {ms(lat['min'])}, max {ms(lat['max'])})",
        f"  throughput  {report.throughput:.1f} requests/s over {report.wall_s:.2f} s",
    ]
    if data["server_infer_ms_p50"] is not None:
        lines.append(f"  server      infer p50 {ms(data['server_infer_ms_p50'])}")
    for message, count in report.error_messages.most_common(5):
        lines.append(f"  error x{count}: {message}")
    return "\n".join(lines)
