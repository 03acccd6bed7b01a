"""Running a compile-only script (``cortexflow.tools.compile_check.compile_only`` launches on ``meta`` tensors) in a
subprocess without Triton's interpreter, for the tests that check what a kernel compiles to for a GPU."""

import json
import os
import subprocess
import sys


def run_compile_script(script: str, tmp_path) -> dict:
    """Run ``script`` (Python that prints one JSON document) in a fresh interpreter with ``TRITON_INTERPRET`` unset
    and an empty Triton cache under ``tmp_path`` (every kernel compiled for real); returns the parsed JSON."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)
