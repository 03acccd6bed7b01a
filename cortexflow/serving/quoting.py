"""Short, escaped quotes of request content for error replies and log lines.

A request may carry megabytes in a key name, a dtype string or a prompt; an error about it quotes at
most an excerpt, so that neither the reply nor the log grows with what the client sent.
"""

from __future__ import annotations

import reprlib
from typing import Any

EXCERPT_CHARS = 40
MESSAGE_CHARS = 600

_REPR = reprlib.Repr()
_REPR.maxstring = EXCERPT_CHARS
_REPR.maxother = EXCERPT_CHARS
_REPR.maxlist = _REPR.maxtuple = _REPR.maxset = 6
_REPR.maxdict = 4
_REPR.maxlevel = 3
_REPR.maxlong = EXCERPT_CHARS


def excerpt(value: Any, limit: int = EXCERPT_CHARS) -> str:
    """``repr(value)`` cut to about ``limit`` characters (strings and bytes are cut before they are quoted,
    containers show their first few items), with the full length of a cut string or bytes."""
    if isinstance(value, (str, bytes, bytearray)):
        text = repr(value[:limit])
        return text if len(value) <= limit else f"{text}... ({len(value)} in all)"
    return _REPR.repr(value)


def clip(message: str, limit: int = MESSAGE_CHARS) -> str:
    """``message`` with control characters escaped and cut to ``limit`` characters (the length cut is said)."""
    head = message[:limit]
    if not head.isprintable():
        head = "".join(c if c.isprintable() else repr(c)[1:-1] for c in head)[:limit]
    if len(message) > limit:
        head += f"... ({len(message) - limit} more characters)"
    return head
