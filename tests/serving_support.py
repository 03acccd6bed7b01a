"""Helpers shared by the server tests (the fixtures built on them are in ``conftest.py``)."""

import threading

import pytest

from cortexflow.serving.policy import PolicyOptions, build_policy

#: Seconds any network wait in the server tests may take before the test fails instead of hanging.
TIMEOUT = 20.0


def within(seconds, fn, *args, **kwargs):
    """Run ``fn`` in a daemon thread; fail the test (instead of hanging) if it takes longer than ``seconds``."""
    result = {}

    def target():
        try:
            result["value"] = fn(*args, **kwargs)
        except BaseException as err:  # re-raised in the test thread
            result["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"{getattr(fn, '__name__', fn)} did not finish within {seconds} s")
    if "error" in result:
        raise result["error"]
    return result["value"]


def demo_policy(robot="droid", model="pi0", seed=0, **options):
    """The tiny random Pi0 (or ``model``) served for ``robot`` on CPU."""
    return build_policy(PolicyOptions(checkpoint="demo", model=model, robot=robot, device="cpu", seed=seed, **options))
