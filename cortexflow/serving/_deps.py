"""Lazy imports of the optional serving dependencies (``pip install 'cortexflow[serve]'``).

``cortexflow`` and ``cortexflow.serving`` import without ``websockets`` / ``msgpack``; only starting a
server, a load test or encoding a frame needs them, and then a missing package is one clear error.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from cortexflow.errors import CortexFlowError

INSTALL_HINT = "pip install 'cortexflow[serve]'"


class ServingDependencyError(CortexFlowError, ImportError):
    """A package needed for serving (websockets, msgpack) is not installed."""


def _require(module: str, package: str, minimum: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ServingDependencyError(
            f"the policy server needs the {package!r} package (>= {minimum}), which is not installed: "
            f"{INSTALL_HINT} (or pip install '{package}>={minimum}')"
        ) from err


def msgpack() -> ModuleType:
    """The ``msgpack`` module, or a :class:`ServingDependencyError` saying how to install it."""
    return _require("msgpack", "msgpack", "1.0.5")


def websockets_server() -> ModuleType:
    """``websockets.asyncio.server`` (websockets >= 14), or a :class:`ServingDependencyError`."""
    return _require_websockets("websockets.asyncio.server")


def websockets_client() -> ModuleType:
    """``websockets.asyncio.client`` (websockets >= 14), or a :class:`ServingDependencyError`."""
    return _require_websockets("websockets.asyncio.client")


def websockets_exceptions() -> ModuleType:
    return _require_websockets("websockets.exceptions")


def websockets_protocol() -> ModuleType:
    """``websockets.protocol`` (connection ``State``), or a :class:`ServingDependencyError`."""
    return _require_websockets("websockets.protocol")


def _require_websockets(module: str) -> ModuleType:
    base = _require("websockets", "websockets", "14.0")
    try:
        return importlib.import_module(module)
    except ImportError as err:
        version = getattr(base, "__version__", "?")
        raise ServingDependencyError(
            f"the installed websockets {version} is too old for the policy server (it needs >= 14.0 with the "
            f"websockets.asyncio implementation): {INSTALL_HINT} (or pip install -U 'websockets>=14')"
        ) from err
