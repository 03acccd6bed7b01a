"""WebSocket policy server speaking openpi's protocol, so ``openpi_client.WebsocketClientPolicy`` works unchanged.

Protocol (openpi ``WebsocketPolicyServer``): on connect the server sends one binary msgpack frame with the
metadata; then each binary frame from the client is a msgpack-numpy observation and is answered by one
binary frame ``{"actions": (chunk, action_dim) float32, "server_timing": {"infer_ms", "queue_ms",
"total_ms", "prev_total_ms"}, "policy_timing": {...}}``, or by a *text* frame holding an error message
(the openpi client raises it as ``RuntimeError``). A bad request never closes the connection or stops the
server; the client may send the next request on the same connection.

Serving: one engine per GPU, each on its own engine thread (the CUDA engine is not thread-safe).
Requests from all connections go through one bounded FIFO queue; a full queue is answered at once with
``server busy``. Frames are decoded (:func:`~cortexflow.serving.codec.unpack`, bounded in values, depth and
string lengths) and mapped to engine inputs on decoder threads, never on the event loop, within
``DECODE_DEADLINE_S``. ``GET /healthz`` answers 200 and ``GET /metrics`` the Prometheus counters (neither
needs the API key). With an API key, a WebSocket handshake without exactly one ``Authorization: Api-Key
<key>`` header (as the openpi client sends it) is refused with HTTP 401 (400 for several such headers or a
malformed handshake). Frames larger than ``max_message_bytes`` are answered with an error; frames larger
than twice that are not read at all: the connection is closed with code 1009 (message too big). Every
reply's actions are checked: NaN or inf actions are answered with an error, never sent.

Limits: at most ``max_connections`` WebSocket connections at once (more: HTTP 503); a
connection answers one request at a time and buffers at most one more frame (reading pauses until that
frame is taken), so a connection holds at most two frames, plus the decoded arrays of the one being
answered (:attr:`PolicyServer.memory_bound_bytes`); a connection that sends no request for
``idle_timeout`` seconds is closed with code 1000; a client that leaves while its request waits in the
queue has that request dropped (it never runs).

Shutdown (SIGINT/SIGTERM under :meth:`PolicyServer.run`, or :meth:`PolicyServer.stop`) refuses new
connections and requests, answers queued requests with ``server is shutting down``, waits for the request
in flight (at most ``shutdown_timeout`` seconds in all), sends its reply, then closes every connection with
code 1001. A request still running at the deadline is abandoned: its client sees the connection close
(1001) without a reply, and :attr:`PolicyServer.requests_abandoned` counts it. A second SIGINT/SIGTERM
abandons it at once.

In-process use (tests, notebooks)::

    server = PolicyServer(policy, port=0).start()     # background thread, ephemeral port
    client = WebsocketClientPolicy("127.0.0.1", server.port)
    ...
    server.stop()
"""

from __future__ import annotations

import asyncio
import hmac
import http
import ipaddress
import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from cortexflow.errors import ConfigError, CortexFlowError, InputError, NonFiniteActionsError
from cortexflow.serving import _deps, codec
from cortexflow.serving.chunking import RTC_KEYS, ChunkFollowUp, ChunkSession, split_follow_up
from cortexflow.serving.metrics import PROMETHEUS_CONTENT_TYPE, ServerMetrics
from cortexflow.serving.quoting import clip
from cortexflow.serving.workers import DaemonWorkers

logger = logging.getLogger("cortexflow.serving")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_MESSAGE_BYTES = 32 * 1024 * 1024
DEFAULT_QUEUE_SIZE = 32
DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0
DEFAULT_MAX_CONNECTIONS = 16
DEFAULT_IDLE_TIMEOUT_S = 300.0
DECODE_DEADLINE_S = 5.0
DECODER_THREADS = 2
CLOSE_TIMEOUT_S = 5.0  # waiting for a client's answer to our close frame
READ_BUFFER_BYTES = 1024 * 1024  # what a connection may hold beyond its frames (socket reads, a partial frame)
CLOSE_NORMAL = 1000
CLOSE_MESSAGE_TOO_BIG = 1009
HEALTH_PATH = "/healthz"
METRICS_PATH = "/metrics"


class ShuttingDown(Exception):
    """A queued request that the server will not run because it is stopping."""


class ShutdownDeadlineError(CortexFlowError, TimeoutError):
    """The server stopped with a request still running: its client got no reply."""


@dataclass
class _Reply:
    """One reply frame: packed actions (bytes) or an error message (str); ``timing`` is set for actions."""

    frame: bytes | str
    timing: tuple[float, float, float] | None = None  # latency, inference, queue wait (s)


@dataclass
class _Job:
    request: Any
    future: asyncio.Future
    follow_up: ChunkFollowUp | None = None
    session: ChunkSession = field(default_factory=ChunkSession)
    enqueued: float = field(default_factory=time.perf_counter)


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class PolicyServer:
    """Serve ``policy`` (a :class:`~cortexflow.serving.policy.ServedPolicy`, or any object with ``metadata``,
    ``prepare(observation)`` and ``infer(prepared) -> (actions, timings)``) over WebSocket.

    ``policy`` may also be a list of equivalent policies, one engine per GPU: each gets its own engine
    thread, all take requests from the one FIFO queue (the next request goes to the next free engine).
    ``port=0`` binds an ephemeral port (read it from :attr:`port` once started). ``api_key=None`` accepts
    every connection. ``warmup`` runs ``policy.warmup()`` on the engine thread before listening."""

    def __init__(
        self,
        policy: Any,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        *,
        api_key: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT_S,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT_S,
        warmup: bool = True,
        max_batch: int = 1,
        batch_window_ms: float = 0.0,
    ):
        if not isinstance(host, str) or not host.strip():
            raise ConfigError(f"host must be an address to bind (127.0.0.1: this machine only, 0.0.0.0: every "
                              f"interface), got {host!r}")
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ConfigError(f"port must be an integer in 0..65535 (0: any free port), got {port!r}")
        if not isinstance(queue_size, int) or queue_size < 1:
            raise ConfigError(f"queue size must be a positive integer, got {queue_size!r}")
        if not isinstance(max_message_bytes, int) or max_message_bytes < 1024:
            raise ConfigError(f"max message size must be at least 1024 bytes, got {max_message_bytes!r}")
        if api_key is not None and (not api_key.strip() or any(c.isspace() for c in api_key)):
            raise ConfigError("the API key must be a non-empty string without spaces")
        if shutdown_timeout <= 0:
            raise ConfigError(f"shutdown timeout must be positive, got {shutdown_timeout!r}")
        if not isinstance(max_connections, int) or max_connections < 1:
            raise ConfigError(f"max_connections must be a positive integer, got {max_connections!r}")
        if idle_timeout <= 0:
            raise ConfigError(f"idle_timeout must be positive (seconds), got {idle_timeout!r}")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or not 1 <= max_batch <= queue_size:
            raise ConfigError(f"max_batch must be an integer in 1..queue_size ({queue_size}), got {max_batch!r}")
        if not 0 <= batch_window_ms <= 1000:
            raise ConfigError(f"batch_window_ms must be in 0..1000 ms, got {batch_window_ms!r}")
        self.max_batch = max_batch
        self.batch_window_s = float(batch_window_ms) / 1e3
        self.policies = list(policy) if isinstance(policy, (list, tuple)) else [policy]
        if not self.policies:
            raise ConfigError("PolicyServer needs at least one policy")
        self.policy = self.policies[0]
        self.host = host
        self.requested_port = port
        self.api_key = api_key
        self.max_message_bytes = max_message_bytes
        self.queue_size = queue_size
        self.shutdown_timeout = float(shutdown_timeout)
        self.max_connections = max_connections
        self.idle_timeout = float(idle_timeout)
        self.warmup = warmup
        metadata = dict(self.policy.metadata)
        if len(self.policies) > 1:
            metadata["device"] = ",".join(str(p.metadata.get("device", "?")) for p in self.policies)
        self.metadata = {
            **metadata,
            "server_config": {
                "max_message_bytes": max_message_bytes,
                "queue_size": queue_size,
                "api_key_required": api_key is not None,
                "engines": len(self.policies),
                "max_connections": max_connections,
                "idle_timeout_s": self.idle_timeout,
            },
        }
        info = {k: str(metadata[k]) for k in ("model", "robot", "backend", "device") if k in metadata}
        self.metrics = ServerMetrics(
            info=info,
            gauges={
                "queue_depth": lambda: self._queue.qsize() if self._queue is not None else 0,
                "queue_capacity": lambda: self.queue_size,
                "requests_in_flight": lambda: self._in_flight,
                "connections_capacity": lambda: self.max_connections,
                "engines": lambda: len(self.policies),
            },
        )
        self._queue: asyncio.Queue | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._stopping = False
        self._in_flight = 0
        self._active_requests = 0
        self._admitted: set = set()  # connections past the HTTP checks whose handler has not returned
        self.requests_abandoned = 0
        self._port: int | None = None
        self._thread: threading.Thread | None = None
        self._decoder: DaemonWorkers | None = None
        self._ready = threading.Event()
        self._thread_error: BaseException | None = None
        self._stopped = threading.Event()

    # ---- addresses --------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        """The bound port (the ephemeral one for ``port=0``); the requested port before start."""
        return self._port if self._port is not None else self.requested_port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}"

    @property
    def hard_max_message_bytes(self) -> int:
        """Frames above this are not read: the connection is closed with 1009 (message too big)."""
        return max(2 * self.max_message_bytes, self.max_message_bytes + 65536)

    @property
    def memory_bound_bytes(self) -> int:
        """What the open connections may hold at once, in bytes: per connection two frames (the one being
        answered and one buffered) of at most :attr:`hard_max_message_bytes`, the answered frame's decoded
        values (at most ``max_message_bytes`` of data plus ``codec.MAX_OBJECTS`` Python objects, 128 bytes
        each at most) and ``READ_BUFFER_BYTES`` of socket reads; times ``max_connections``."""
        decoded = self.max_message_bytes + codec.MAX_OBJECTS * 128
        return self.max_connections * (2 * self.hard_max_message_bytes + decoded + READ_BUFFER_BYTES)

    @property
    def stopping(self) -> bool:
        return self._stopping

    # ---- lifecycle --------------------------------------------------------------------------------
    async def serve(self, on_ready: Callable[["PolicyServer"], None] | None = None) -> None:
        """Run until :meth:`request_stop`; then shut down within ``shutdown_timeout``. The coroutine behind
        :meth:`run`/:meth:`start`."""
        server_module = _deps.websockets_server()
        _deps.msgpack()
        self._loop = loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        self._queue = asyncio.Queue(self.queue_size)
        if self._stopping:  # stop asked for before the loop existed
            self._stop_event.set()
        engines = [DaemonWorkers(1, f"cortexflow-engine-{i}") for i in range(len(self.policies))]
        self._decoder = DaemonWorkers(DECODER_THREADS, "cortexflow-decoder")
        workers: list[asyncio.Task] = []
        try:
            warmups = [getattr(p, "warmup", None) for p in self.policies]
            if self.warmup and all(callable(w) for w in warmups):
                start = time.perf_counter()
                for engine, warmup, policy in zip(engines, warmups, self.policies):  # one at a time: CUDA graph
                    await engine.submit(warmup)                                          # captures must not overlap
                    if self.max_batch > 1 and getattr(policy, "batches", False):
                        await engine.submit(policy.warmup_batches, range(2, self.max_batch + 1))
                logger.info("warm-up request done in %.1f ms", (time.perf_counter() - start) * 1e3)
            async with server_module.serve(
                self._handle,
                self.host,
                self.requested_port,
                process_request=self._process_request,
                compression=None,
                max_size=self.hard_max_message_bytes,
                max_queue=(0, 0),  # one frame buffered at most: reading pauses until the handler takes it
                close_timeout=min(CLOSE_TIMEOUT_S, self.shutdown_timeout),
                server_header="cortexflow",
            ) as server:
                self._port = server.sockets[0].getsockname()[1]
                workers = [asyncio.create_task(self._worker(p, e)) for p, e in zip(self.policies, engines)]
                self._ready.set()
                logger.debug("serving on %s", self.url)
                if on_ready is not None:
                    on_ready(self)
                await self._stop_event.wait()
                deadline = loop.time() + self.shutdown_timeout
                await self._drain(deadline)
                server.close()  # closes open connections with 1001 (going away)
                try:
                    await asyncio.wait_for(server.wait_closed(), max(deadline - loop.time(), 0.1))
                except TimeoutError:
                    logger.warning("shutdown timeout (%.1f s): connections still closing were dropped",
                                   self.shutdown_timeout)
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            for engine in engines:
                engine.shutdown()
            self._decoder.shutdown()
            self._stopped.set()

    def run(self, on_ready: Callable[["PolicyServer"], None] | None = None) -> None:
        """Serve in this (main) thread until SIGINT or SIGTERM, then shut down (a second signal: at once).
        Afterwards :attr:`requests_abandoned` says how many requests were still running and got no reply."""

        async def main() -> None:
            loop = asyncio.get_running_loop()
            task = asyncio.current_task()
            signals = (signal.SIGINT, signal.SIGTERM)

            def on_signal(signum: int) -> None:
                if not self._stopping:
                    logger.info("%s: finishing the request in flight (at most %.1f s), then stopping (again to abort)",
                                signal.Signals(signum).name, self.shutdown_timeout)
                    self.request_stop()
                elif task is not None:
                    self.requests_abandoned = max(self.requests_abandoned, self._active_requests)
                    task.cancel()

            for sig in signals:
                try:
                    loop.add_signal_handler(sig, on_signal, sig)
                except (NotImplementedError, RuntimeError):  # not the main thread, or no signal support
                    pass
            try:
                await self.serve(on_ready)
            finally:
                for sig in signals:
                    try:
                        loop.remove_signal_handler(sig)
                    except (NotImplementedError, RuntimeError):
                        pass

        try:
            asyncio.run(main())
        except asyncio.CancelledError:
            logger.warning("aborted with %d request(s) running", self.requests_abandoned)

    def start(self, timeout: float = 60.0) -> "PolicyServer":
        """Serve from a background thread; return once listening (``port`` is then the bound port)."""
        if self._thread is not None:
            raise RuntimeError("this PolicyServer was already started")

        def target() -> None:
            try:
                asyncio.run(self.serve())
            except BaseException as err:  # reported by start() or stop()
                self._thread_error = err
                if not self._ready.is_set():
                    self._ready.set()
                else:
                    logger.exception("policy server stopped with an error")

        self._thread = threading.Thread(target=target, name="cortexflow-policy-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop(timeout=5.0)
            raise TimeoutError(f"the policy server did not start within {timeout} s")
        if self._thread_error is not None:
            self._thread.join(5.0)
            raise self._thread_error
        return self

    def request_stop(self) -> None:
        """Begin the graceful shutdown (thread-safe, idempotent)."""
        self._stopping = True
        loop, event = self._loop, self._stop_event
        if loop is not None and event is not None:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # loop already closed
                pass

    def stop(self, timeout: float = 60.0) -> None:
        """Shut down gracefully and wait for the background thread (see :meth:`start`)."""
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"the policy server did not stop within {timeout} s")

    def __enter__(self) -> "PolicyServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    async def _drain(self, deadline: float) -> None:
        """Refuse what is queued, then wait until ``deadline`` (loop time) for the replies in flight to be sent;
        what is still running then is counted in :attr:`requests_abandoned`."""
        self._stopping = True
        assert self._queue is not None and self._loop is not None
        while True:
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            if job is not None and not job.future.done():
                job.future.set_exception(ShuttingDown())
        while (self._active_requests > 0 or self._in_flight) and self._loop.time() < deadline:
            await asyncio.sleep(0.01)
        if self._active_requests > 0 or self._in_flight:
            self.requests_abandoned = max(self._active_requests, self._in_flight)
            logger.warning("shutdown timeout (%.1f s): closing with %d request(s) still running; their clients get "
                           "no reply", self.shutdown_timeout, self.requests_abandoned)

    # ---- engine worker ----------------------------------------------------------------------------
    async def _worker(self, policy: Any, engine: DaemonWorkers) -> None:
        """Runs queued jobs in arrival order on ``policy``'s engine thread; a job whose client left (its future
        cancelled) is skipped. With ``max_batch > 1`` (and a policy that ``batches``) the jobs queued behind
        the first, and those arriving within ``batch_window_s``, run with it as one batched forward."""
        assert self._queue is not None
        batching = self.max_batch > 1 and getattr(policy, "batches", False)
        while True:
            job = await self._queue.get()
            if job is None:
                return
            jobs = [job] + (await self._more_jobs(self.max_batch - 1) if batching else [])
            jobs = [j for j in jobs if not j.future.done()]
            if not jobs:
                continue
            self._in_flight += len(jobs)
            try:
                is_guided = [j.session.previous_actions(j.follow_up)[0] is not None for j in jobs]
                guided = [j for j, g in zip(jobs, is_guided) if g]
                plain = [j for j, g in zip(jobs, is_guided) if not g]
                for group in (plain, guided):
                    if len(group) == 1 or (group and not batching):
                        for single in group:
                            await self._run_one(policy, engine, single)
                    elif group:
                        await self._run_batch(policy, engine, group)
            finally:
                self._in_flight -= len(jobs)

    async def _more_jobs(self, limit: int) -> list[_Job]:
        """Up to ``limit`` more jobs: those already queued, then those arriving within the batch window."""
        assert self._queue is not None and self._loop is not None
        jobs: list[_Job] = []
        deadline = self._loop.time() + self.batch_window_s
        while len(jobs) < limit:
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - self._loop.time()
                if remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            if job is None:  # stop: leave it for the next get
                self._queue.put_nowait(None)
                break
            jobs.append(job)
        return jobs

    async def _run_one(self, policy: Any, engine: DaemonWorkers, job: _Job) -> None:
        """One request on the engine thread; its result or error goes to the waiting connection handler."""
        started = time.perf_counter()
        try:
            if getattr(policy, "keeps_episodes", False):
                if job.session.episode is None:
                    job.session.episode = await engine.submit(policy.new_episode)
                actions, timings = await engine.submit(policy.infer_episode, job.request, job.session.episode)
            elif not getattr(policy, "guides_chunks", False):
                actions, timings = await engine.submit(policy.infer, job.request)
            else:
                prev_actions, delay = job.session.previous_actions(job.follow_up)
                actions, timings, chunk = await engine.submit(policy.infer_chunk, job.request, prev_actions, delay)
                job.session.last_chunk = chunk
        except Exception as err:
            if not job.future.done():
                job.future.set_exception(err)
        else:
            self.metrics.batch(1)
            if not job.future.done():
                job.future.set_result((actions, timings, started, time.perf_counter()))

    async def _run_batch(self, policy: Any, engine: DaemonWorkers, jobs: list[_Job]) -> None:
        """Several requests as one ``policy.infer_batch``; if the batch fails on a client's input, each request
        runs alone so that only the bad one gets the error."""
        started = time.perf_counter()
        follow_ups = [j.session.previous_actions(j.follow_up) for j in jobs]
        prev = None if follow_ups[0][0] is None else [p for p, _ in follow_ups]
        delays = None if prev is None else [d for _, d in follow_ups]
        try:
            results = await engine.submit(policy.infer_batch, [j.request for j in jobs], prev, delays)
        except CortexFlowError:
            for job in jobs:
                await self._run_one(policy, engine, job)
            return
        except Exception as err:
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(err)
            return
        self.metrics.batch(len(jobs))
        finished = time.perf_counter()
        for job, (actions, timings, chunk) in zip(jobs, results):
            job.session.last_chunk = chunk
            if not job.future.done():
                job.future.set_result((actions, timings, started, finished))

    # ---- HTTP side: health, metrics, connection cap, authentication -------------------------------
    def _process_request(self, connection: Any, request: Any) -> Any:
        """The HTTP answer to a request before the WebSocket upgrade, or None to accept it. Any failure is
        a 400 with one log line (websockets would answer 500 and log a traceback)."""
        try:
            return self._admit(connection, request)
        except Exception as err:
            self.metrics.connection_refused()
            logger.warning("handshake from %s refused: %s", getattr(connection, "remote_address", None),
                           clip(f"{type(err).__name__}: {err}"))
            return connection.respond(http.HTTPStatus.BAD_REQUEST, "malformed handshake request\n")

    def _refuse(self, connection: Any, status: http.HTTPStatus, text: str) -> Any:
        self.metrics.connection_refused()
        logger.info("handshake from %s refused: %d %s", getattr(connection, "remote_address", None), status,
                    text.strip())
        return connection.respond(status, text)

    def _admit(self, connection: Any, request: Any) -> Any:
        path = request.path.split("?", 1)[0]
        if path == HEALTH_PATH:
            if self._stopping:
                return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "shutting down\n")
            return connection.respond(http.HTTPStatus.OK, "ok\n")
        if path == METRICS_PATH:
            response = connection.respond(http.HTTPStatus.OK, self.metrics.render())
            del response.headers["Content-Type"]
            response.headers["Content-Type"] = PROMETHEUS_CONTENT_TYPE
            return response
        if self._stopping:
            return self._refuse(connection, http.HTTPStatus.SERVICE_UNAVAILABLE, "server is shutting down\n")
        if self.api_key is not None:
            headers = request.headers.get_all("Authorization")
            if not headers:
                return self._refuse(
                    connection, http.HTTPStatus.UNAUTHORIZED,
                    "missing API key: send the header 'Authorization: Api-Key <key>' "
                    "(openpi_client: WebsocketClientPolicy(host, port, api_key=KEY))\n",
                )
            if len(headers) > 1:
                return self._refuse(connection, http.HTTPStatus.BAD_REQUEST,
                                    f"{len(headers)} Authorization headers; send exactly one\n")
            scheme, _, key = headers[0].strip().partition(" ")
            if scheme.lower() != "api-key" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
                return self._refuse(connection, http.HTTPStatus.UNAUTHORIZED, "invalid API key\n")
        closed = _deps.websockets_protocol().State.CLOSED
        self._admitted = {c for c in self._admitted if c.state is not closed}  # handshakes that failed later
        if len(self._admitted) >= self.max_connections:
            return self._refuse(
                connection, http.HTTPStatus.SERVICE_UNAVAILABLE,
                f"too many connections: this server accepts {self.max_connections} at once (--max-connections); "
                "retry when a client has left\n",
            )
        self._admitted.add(connection)
        return None

    # ---- WebSocket side ---------------------------------------------------------------------------
    async def _handle(self, websocket: Any) -> None:
        closed_errors = _deps.websockets_exceptions().ConnectionClosed
        self.metrics.connection_opened()
        peer = getattr(websocket, "remote_address", None)
        logger.info("connection from %s opened", peer)
        gone = asyncio.ensure_future(websocket.wait_closed())
        session = ChunkSession()
        try:
            await websocket.send(codec.pack(self.metadata))
            prev_total_ms = None
            while True:
                try:
                    message = await asyncio.wait_for(websocket.recv(), self.idle_timeout)
                except TimeoutError:
                    logger.info("connection from %s idle for %.0f s: closing it", peer, self.idle_timeout)
                    await websocket.close(CLOSE_NORMAL, f"idle for {self.idle_timeout:g} s")
                    break
                except closed_errors as closed:
                    if closed.sent is not None and closed.sent.code == CLOSE_MESSAGE_TOO_BIG:
                        self.metrics.request()
                        self.metrics.error("too_large")
                        logger.warning("connection from %s closed: frame above %d bytes", peer, self.hard_max_message_bytes)
                    break
                start = time.perf_counter()
                self._active_requests += 1
                try:
                    answer = asyncio.ensure_future(self._answer(message, start, prev_total_ms, session))
                    del message  # the answer holds the frame only as long as it needs it
                    await asyncio.wait((answer, gone), return_when=asyncio.FIRST_COMPLETED)
                    if not answer.done():
                        answer.cancel()  # a queued request is dropped; one already running is not sent
                        self.metrics.error("shutting_down" if self._stopping else "client_gone")
                        logger.info("connection from %s closed before its reply", peer)
                        break
                    reply = answer.result()
                    await websocket.send(reply.frame)
                    if reply.timing is not None:
                        self.metrics.reply(*reply.timing)
                finally:
                    self._active_requests -= 1
                prev_total_ms = (time.perf_counter() - start) * 1e3
        except closed_errors:
            pass
        except Exception:  # never let one connection take the server down
            logger.exception("connection from %s failed", peer)
        finally:
            gone.cancel()
            self._admitted.discard(websocket)
            self.metrics.connection_closed()
            logger.info("connection from %s closed", peer)

    def _error(self, reason: str, message: str) -> _Reply:
        message = clip(message)
        self.metrics.error(reason)
        logger.info("request error (%s): %s", reason, message)
        return _Reply(message)

    def _decode(self, frame: bytes) -> tuple[Any, ChunkFollowUp | None]:
        """Decoder thread: the frame -> the policy's prepared request and its real-time-chunking keys (raises
        UndecodableFrame / InputError)."""
        observation, follow_up = split_follow_up(codec.unpack(frame))
        if follow_up is not None and not getattr(self.policy, "guides_chunks", False):
            raise InputError(f"this server's {self.metadata.get('model', 'policy')} policy does not take the "
                             f"real-time-chunking keys {list(RTC_KEYS)}; send the observation without them")
        return self.policy.prepare(observation), follow_up

    async def _answer(self, message: Any, start: float, prev_total_ms: float | None,
                      session: ChunkSession | None = None) -> _Reply:
        """The reply to one request: packed actions or an error message."""
        self.metrics.request()
        if self._stopping:
            return self._error("shutting_down", "server is shutting down; reconnect when it is back")
        if isinstance(message, str):
            return self._error(
                "undecodable", "undecodable request: expected a binary msgpack-numpy frame (as openpi_client sends), "
                "got a text frame"
            )
        if len(message) > self.max_message_bytes:
            return self._error(
                "too_large", f"request too large: {len(message)} bytes; the server accepts at most "
                f"{self.max_message_bytes} bytes per frame (--max-message-mb)"
            )
        assert self._decoder is not None
        decoding = self._decoder.submit(self._decode, message)
        del message
        try:
            request, follow_up = await asyncio.wait_for(decoding, DECODE_DEADLINE_S)
        except TimeoutError:
            return self._error("undecodable", f"undecodable request: decoding took longer than {DECODE_DEADLINE_S} s")
        except codec.UndecodableFrame as err:
            return self._error("undecodable", f"undecodable request: {err}")
        except CortexFlowError as err:
            return self._error("bad_request", f"bad request: {err}")
        except Exception as err:
            logger.error("preparing a request failed: %s", clip(f"{type(err).__name__}: {err}"), exc_info=err)
            return self._error("internal", f"internal server error: {type(err).__name__}: {err}")
        if self._stopping:  # stop began while the frame was decoded
            return self._error("shutting_down", "server is shutting down; this request was not run")
        assert self._queue is not None and self._loop is not None
        job = _Job(request, self._loop.create_future(), follow_up, session if session is not None else ChunkSession())
        try:  # no await between the shutdown check above and this put: the drain cannot miss the job
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            return self._error(
                "busy", f"server busy: {self.queue_size} requests are already waiting for the engine "
                "(--queue-size); retry shortly"
            )
        try:
            actions, policy_timing, started, finished = await job.future
        except ShuttingDown:
            return self._error("shutting_down", "server is shutting down; this request was not run")
        except NonFiniteActionsError as err:
            return self._error("non_finite", f"no actions: {err}")
        except CortexFlowError as err:
            return self._error("bad_request", f"bad request: {err}")
        except Exception as err:
            logger.error("inference failed: %s", clip(f"{type(err).__name__}: {err}"), exc_info=err)
            return self._error("internal", f"internal server error: {type(err).__name__}: {err}")
        actions = np.asarray(actions)
        if not np.isfinite(actions).all():
            bad = int((~np.isfinite(actions)).sum())
            return self._error("non_finite", f"no actions: the model produced {bad} NaN or inf action values out of "
                               f"{actions.size} (huge noise or state values, or broken weights)")
        server_timing = {
            "infer_ms": (finished - started) * 1e3,
            "queue_ms": (started - job.enqueued) * 1e3,
            "total_ms": (time.perf_counter() - start) * 1e3,
        }
        if prev_total_ms is not None:
            server_timing["prev_total_ms"] = prev_total_ms
        try:
            reply = codec.pack({"actions": actions, "server_timing": server_timing, "policy_timing": policy_timing})
        except Exception as err:
            logger.exception("encoding a reply failed")
            return self._error("internal", f"internal server error: cannot encode the reply: {err}")
        return _Reply(reply, (time.perf_counter() - start, finished - started, started - job.enqueued))
