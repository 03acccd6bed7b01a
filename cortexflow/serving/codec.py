"""msgpack frames with numpy arrays, in the encoding openpi's ``openpi_client.msgpack_numpy`` reads and writes.

An array travels as a map ``{b"__ndarray__": True, b"data": <raw bytes>, b"dtype": <dtype.str>,
b"shape": [...]}`` and a numpy scalar as ``{b"__npgeneric__": True, b"data": <item>, b"dtype": <dtype.str>}``
(binary keys, so the client's ``object_hook`` recognises them). Object, void and complex arrays are never
encoded. Decoding first walks the frame's bytes without building anything (:func:`check_frame`): at most
``max_objects`` values in all, containers nested at most ``max_depth`` deep, strings of at most
``max_str_bytes`` bytes, no extension types, no container that claims more items than the frame has bytes
left. A frame of millions of tiny objects is thus refused after reading its first header, in time and
memory bounded by the limits, not by the frame. Then every array header (dtype, shape, byte count) is
checked before the array is built, so a malformed or hostile frame is an :class:`UndecodableFrame`
error, never a crash; decoded arrays are writable copies.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from cortexflow.errors import InputError
from cortexflow.serving import _deps
from cortexflow.serving.quoting import excerpt

NDARRAY_KEY = b"__ndarray__"
GENERIC_KEY = b"__npgeneric__"
_REFUSED_KINDS = ("O", "V", "c")  # object (pointers), void/structured, complex: as openpi
_MAX_NDIM = 32
MAX_OBJECTS = 16_384  # values in one frame; an observation of numpy arrays holds a few dozen
MAX_DEPTH = 32
MAX_STR_BYTES = 65_536  # keys, dtype strings, prompts


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
        raise UndecodableFrame(f"array header has dtype {excerpt(value)}; expected a numpy dtype string such as '<f4'")
    try:
        dtype = np.dtype(value)
    except (TypeError, ValueError):
        raise UndecodableFrame(f"array header has an unknown dtype {excerpt(value)}") from None
    if dtype.kind in _REFUSED_KINDS or dtype.hasobject:
        raise UndecodableFrame(f"array dtype {excerpt(value)} is refused (object, void and complex arrays are not accepted)")
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
            raise UndecodableFrame(f"array header has shape {excerpt(shape)}; expected at most {_MAX_NDIM} "
                                   "non-negative integers")
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
        except (TypeError, ValueError, OverflowError):
            raise UndecodableFrame(f"numpy scalar {excerpt(value)} does not fit dtype {dtype.str}") from None
    return obj


# msgpack first bytes -> bytes that follow before the next value (fixed-size scalars).
_FIXED = {0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8,
          0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}
# bin / str with a 1-, 2- or 4-byte length.
_SIZED = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}
_STRINGS = (0xD9, 0xDA, 0xDB)
# array / map with a 2- or 4-byte length -> (length bytes, values per item).
_CONTAINERS = {0xDC: (2, 1), 0xDD: (4, 1), 0xDE: (2, 2), 0xDF: (4, 2)}


def check_frame(frame: bytes, max_objects: int = MAX_OBJECTS, max_depth: int = MAX_DEPTH,
                max_str_bytes: int = MAX_STR_BYTES) -> int:
    """Walk the one msgpack value in ``frame`` header by header, building nothing; return how many values it holds.

    Raises :class:`UndecodableFrame` for truncated or trailing bytes, an unused type byte, extension types,
    more than ``max_objects`` values, nesting deeper than ``max_depth``, a string longer than
    ``max_str_bytes`` or a container that claims more items than bytes remain. A container's items are
    counted when its header is read, so the walk stops within ``max_objects`` steps."""
    size = len(frame)
    pos, objects = 0, 1
    pending = [1]  # values still to read at each open nesting level
    while pending:
        if pos >= size:
            raise UndecodableFrame(f"the frame ends after {size} bytes, inside a value (truncated frame)")
        first = frame[pos]
        pos += 1
        pending[-1] -= 1
        items = 0
        if first <= 0x7F or first >= 0xE0:
            pass
        elif first <= 0x8F:
            items = 2 * (first & 0x0F)
        elif first <= 0x9F:
            items = first & 0x0F
        elif first <= 0xBF:
            pos += first & 0x1F
        elif first in _FIXED:
            pos += _FIXED[first]
        elif first in _SIZED:
            width = _SIZED[first]
            length = int.from_bytes(frame[pos:pos + width], "big")
            if first in _STRINGS and length > max_str_bytes:
                raise UndecodableFrame(f"a string of {length} bytes; strings in a request hold at most {max_str_bytes}")
            pos += width + length
        elif first in _CONTAINERS:
            width, per_item = _CONTAINERS[first]
            items = per_item * int.from_bytes(frame[pos:pos + width], "big")
            pos += width
        elif 0xC7 <= first <= 0xC9 or 0xD4 <= first <= 0xD8:
            raise UndecodableFrame("msgpack extension types are not accepted (send numpy arrays as msgpack-numpy maps)")
        else:
            raise UndecodableFrame(f"byte {first:#04x} at offset {pos - 1} is not a msgpack type")
        if items:
            objects += items
            if objects > max_objects:
                raise UndecodableFrame(
                    f"the frame holds more than {max_objects} values; send images, states and token lists as "
                    "numpy arrays (msgpack-numpy), not as nested lists")
            if items > size - pos:
                raise UndecodableFrame(f"a container claims {items} values but only {max(size - pos, 0)} bytes follow")
            if len(pending) >= max_depth:
                raise UndecodableFrame(f"values nested more than {max_depth} deep")
            pending.append(items)
        while pending and pending[-1] == 0:
            pending.pop()
    if pos != size:
        raise UndecodableFrame("the frame ends inside a value (truncated frame)" if pos > size
                               else f"{size - pos} bytes follow the value")
    return objects


def unpack(frame: bytes, max_objects: int = MAX_OBJECTS) -> Any:
    """Decode one msgpack-numpy frame after :func:`check_frame`; anything malformed raises :class:`UndecodableFrame`."""
    msgpack = _deps.msgpack()
    check_frame(frame, max_objects)
    try:
        return msgpack.unpackb(frame, object_hook=_decode_hook, raw=False, max_str_len=MAX_STR_BYTES)
    except UndecodableFrame:
        raise
    except Exception as err:  # msgpack raises ExtraData, FormatError, StackError, ValueError, TypeError, ...
        raise UndecodableFrame(f"the frame is not valid msgpack: {type(err).__name__}: {excerpt(str(err), 200)}") from None
