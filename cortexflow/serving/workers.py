"""Daemon worker threads that run blocking calls for the server's event loop.

The server runs each engine, and the frame decoder, on threads of its own so that the event loop only
moves bytes. The threads are daemons: a call still running when the server gives up on it (shutdown
deadline, decode deadline) does not keep the process alive, and the interpreter can exit at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
from typing import Any, Callable


class DaemonWorkers:
    """``threads`` daemon threads taking calls from one FIFO queue; :meth:`submit` returns an asyncio future."""

    def __init__(self, threads: int, name: str):
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._serve, name=f"{name}-{i}", daemon=True) for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def _serve(self) -> None:
        while True:
            item = self._calls.get()
            if item is None:
                return
            future, fn, args = item
            if not future.set_running_or_notify_cancel():  # cancelled while queued
                continue
            try:
                result = fn(*args)
            except BaseException as err:  # handed to the awaiting coroutine
                future.set_exception(err)
            else:
                future.set_result(result)

    def submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        """Run ``fn(*args)`` on a worker thread; await the returned future (in the running loop) for its result.
        Cancelling the future before a thread picks the call up means it never runs."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._calls.put((future, fn, args))
        return asyncio.wrap_future(future)

    def shutdown(self) -> None:
        """Let every thread exit once its current call (if any) returns; does not wait for them."""
        for _ in self._threads:
            self._calls.put(None)
