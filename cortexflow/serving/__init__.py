"""Serve a policy to robots over the network: a WebSocket server speaking openpi's protocol.

``openpi_client.WebsocketClientPolicy`` (robot code that talks to openpi's own server) connects
unchanged. ``cortexflow serve`` / ``cortexflow loadtest`` are the command-line front ends::

    from cortexflow.serving import PolicyOptions, PolicyServer, build_policy
    policy = build_policy(PolicyOptions(checkpoint="demo", robot="droid", device="cpu"))
    server = PolicyServer(policy, port=0).start()      # background thread; server.port is the bound port
    ...
    server.stop()

This package imports without the optional dependencies; starting a server or a load test needs
``pip install 'cortexflow[serve]'`` (websockets, msgpack).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ServingDependencyError": "cortexflow.serving._deps",
    "PolicyOptions": "cortexflow.serving.policy",
    "ServedPolicy": "cortexflow.serving.policy",
    "build_policy": "cortexflow.serving.policy",
    "DEMO_CHECKPOINT": "cortexflow.serving.policy",
    "TokenServedPolicy": "cortexflow.serving.decoding_policy",
    "PolicyServer": "cortexflow.serving.server",
    "ServerMetrics": "cortexflow.serving.metrics",
    "LoadTestReport": "cortexflow.serving.loadtest",
    "run_loadtest": "cortexflow.serving.loadtest",
    "ROBOT_NAMES": "cortexflow.serving.robots",
    "RobotMapping": "cortexflow.serving.robots",
    "make_mapping": "cortexflow.serving.robots",
    "pack": "cortexflow.serving.codec",
    "unpack": "cortexflow.serving.codec",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cortexflow.serving' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
