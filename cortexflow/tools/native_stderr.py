"""Hold back lines that native libraries write straight to the process's stderr (file descriptor 2).

``torch.profiler`` (kineto) logs ``USDT: ... profiler_start`` / ``profiler_stop`` lines from C++ at every
profiled call, which no Python setting silences. :func:`dropping_native_lines` sends descriptor 2 to a
temporary file for the duration of a block and afterwards writes back every line except the dropped ones,
so nothing else written meanwhile (Python warnings, progress) is lost, only delayed to the block's end.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import Callable, Iterator

STDERR_FD = 2


def is_profiler_log_line(line: str) -> bool:
    """Whether ``line`` is one of kineto's ``USDT:...`` start/stop log lines."""
    return line.startswith("USDT:") and ("profiler_start" in line or "profiler_stop" in line)


@contextlib.contextmanager
def dropping_native_lines(drop: Callable[[str], bool] = is_profiler_log_line) -> Iterator[None]:
    """Within the block, capture descriptor 2; at its end, write back the captured lines ``drop`` rejects."""
    sys.stderr.flush()
    saved = os.dup(STDERR_FD)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), STDERR_FD)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, STDERR_FD)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode("utf-8", "replace").splitlines(keepends=True)
                    if not drop(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()
