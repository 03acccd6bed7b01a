"""msgpack frames with numpy arrays, in the encoding openpi's ``openpi_client.msgpack_numpy`` reads and writes.

An array travels as a map ``{b"__ndarray__": True, b"data": <raw bytes>, b"dtype": <dtype.str>,
b"shape": [...]}`` and a numpy scalar as ``{b"__npgeneric__": True, b"data": <item>, b"dtype": <dtype.str>}``
(binary keys, so the client's ``object_hook`` recognises them). Object, void and complex arrays are never
encoded. Decoding checks every array header (dtype, shape, byte count) before building the array, so a
malformed or hostile frame is an :class:`UndecodableFrame` error, never a crash; decoded arrays are
writable copies.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from cortexflow.errors import InputError
from cortexflow.serving import _deps

NDARRAY_KEY = b"__ndarray__"
GENERIC_KEY = b"__npgeneric__"
_REFUSED_KINDS = ("O", "V", "c")  # object (pointers), void/structured, complex: as openpi
_MAX_NDIM = 32


class UndecodableFrame(InputError):
    """A request frame that is not a valid msgpack-numpy message."""


def _encode_default(obj: Any) -> Any:
    if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind in _REFUSED_KINDS:
        raise TypeError(f"cannot send a numpy value of dtype {obj.dtype} (object, void and complex are refused)")
    if isinstance(obj, np.ndarray):
        return {NDARRAY_KEY: True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return {GENERIC_KEY: True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot encode an object of type {type(obj).__name__} in a msgpack frame")


def pack(obj: Any) -> bytes:
    """``obj`` (dicts, lists, str, numbers, bytes, numpy arrays and scalars) as one msgpack frame."""
    return _deps.msgpack().packb(obj, default=_encode_default, use_bin_type=True)


def _dtype(value: Any) -> np.dtype:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str):
        raise UndecodableFrame(f"array header has dtype {value!r}; expected a numpy dtype string such as '<f4'")
    try:
        dtype = np.dtype(value)
    except (TypeError, ValueError) as err:
        raise UndecodableFrame(f"array header has an unknown dtype {value!r}: {err}") from None
    if dtype.kind in _REFUSED_KINDS or dtype.hasobject:
        raise UndecodableFrame(f"array dtype {value!r} is refused (object, void and complex arrays are not accepted)")
    return dtype


def _decode_hook(obj: dict) -> Any:
    if NDARRAY_KEY in obj:
        data, shape = obj.get(b"data"), obj.get(b"shape")
        dtype = _dtype(obj.get(b"dtype"))
        if not isinstance(data, (bytes, bytearray)):
            raise UndecodableFrame(f"array header has data of type {type(data).__name__}; expected bytes")
        if not isinstance(shape, (list, tuple)) or len(shape) > _MAX_NDIM or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
        ):
            raise UndecodableFrame(f"array header has shape {shape!r}; expected a list of non-negative integers")
        expected = math.prod(shape) * dtype.itemsize
        if expected != len(data):
            raise UndecodableFrame(
                f"array of shape {list(shape)} and dtype {dtype.str} needs {expected} bytes but the frame holds {len(data)}"
            )
        return np.frombuffer(data, dtype=dtype).reshape(shape).copy()
    if GENERIC_KEY in obj:
        dtype = _dtype(obj.get(b"dtype"))
        value = obj.get(b"data")
        if not isinstance(value, (bool, int, float, str, bytes)):
            raise UndecodableFrame(f"numpy scalar has data of type {type(value).__name__}")
        try:
            return dtype.type(value)
        except (TypeError, ValueError, OverflowError) as err:
            raise UndecodableFrame(f"numpy scalar {value!r} does not fit dtype {dtype.str}: {err}") from None
    return obj


def unpack(frame: bytes) -> Any:
    """Decode one msgpack-numpy frame; anything malformed raises :class:`UndecodableFrame`."""
    msgpack = _deps.msgpack()
    try:
        return msgpack.unpackb(frame, object_hook=_decode_hook, raw=False)
    except UndecodableFrame:
        raise
    except Exception as err:  # msgpack raises ExtraData, FormatError, StackError, ValueError, TypeError, ...
        raise UndecodableFrame(f"the frame is not valid msgpack: {type(err).__name__}: {err}") from None
