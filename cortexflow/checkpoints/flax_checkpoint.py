"""Read a checkpoint written by ``flax.training.checkpoints.save_checkpoint`` as flat numpy arrays, without flax.

Three on-disk forms reach ``checkpoints.restore_checkpoint(path, None)``:

- **legacy Flax**: one file (``checkpoint_<step>``) holding the msgpack of the state dict. Arrays are
  msgpack extension objects: code 1 an ndarray, code 3 a numpy scalar, both as the nested msgpack
  ``(shape, dtype name, C-order bytes)``; code 2 a Python complex ``(real, imag)``. Arrays above 2**30
  bytes are split into ``{"__msgpack_chunked_array__": True, "shape": {...}, "chunks": {...}}``
  (index-keyed dicts of flat pieces).
- **Orbax, aggregated** (Flax's ``save_checkpoint`` with Orbax, 2023): a folder with a ``checkpoint``
  file in the same msgpack encoding; a leaf saved outside the file is the string ``PLACEHOLDER://<name>``
  and needs orbax-checkpoint to read.
- **Orbax PyTree** (current Orbax): a folder with ``_METADATA`` (OCDBT / zarr), read through
  orbax-checkpoint (``pip install 'cortexflow[jax]'``).

A folder of ``checkpoint_<step>`` entries resolves to the highest step, as ``restore_checkpoint`` does; a
folder holding exactly one checkpoint folder (the published RT-1-X ``rt_1_x_jax/`` holds one run folder)
resolves to it. Leaves are named by their tree path joined with ``/``, the collection first
(``params/Transformer_0/Dense_0/kernel``, ``batch_stats/...``); ``step`` and other scalars come back
as 0-d arrays.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from cortexflow.errors import CheckpointError

#: msgpack extension type codes of ``flax.serialization``.
EXT_NDARRAY = 1
EXT_NATIVE_COMPLEX = 2
EXT_NPSCALAR = 3
CHUNKED_MARK = "__msgpack_chunked_array__"
ORBAX_FILE = "checkpoint"
ORBAX_PLACEHOLDER = "PLACEHOLDER://"
STEP_PREFIX = "checkpoint_"
_NUMBER = re.compile(r"([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)")


def _msgpack():
    try:
        import msgpack
    except ImportError as err:
        raise CheckpointError(f"reading a Flax checkpoint needs msgpack ({err}): pip install 'cortexflow[jax]'") from None
    return msgpack


def _bfloat16_to_float32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


def decode_ndarray(data: bytes) -> np.ndarray:
    """One extension payload ``msgpack((shape, dtype name, bytes))`` -> a writable numpy array
    (``bfloat16`` widened to float32, exactly)."""
    msgpack = _msgpack()
    shape, dtype_name, buffer = msgpack.unpackb(data, raw=True)
    name = dtype_name.decode() if isinstance(dtype_name, bytes) else str(dtype_name)
    if name == "bfloat16":
        array = _bfloat16_to_float32(np.frombuffer(buffer, dtype=np.uint16))
    else:
        try:
            dtype = np.dtype(name)
        except TypeError as err:
            raise CheckpointError(f"array of unsupported dtype {name!r} in the Flax checkpoint") from err
        array = np.frombuffer(buffer, dtype=dtype).copy()
    count = int(np.prod(shape, dtype=np.int64))
    if array.size != count:
        raise CheckpointError(f"array of shape {tuple(shape)} holds {array.size} values in the Flax checkpoint")
    return array.reshape(tuple(shape))


def _ext_hook(code: int, data: bytes) -> Any:
    if code == EXT_NDARRAY:
        return decode_ndarray(data)
    if code == EXT_NPSCALAR:
        return decode_ndarray(data)[()]
    if code == EXT_NATIVE_COMPLEX:
        real, imag = _msgpack().unpackb(data)
        return complex(real, imag)
    raise CheckpointError(f"unknown msgpack extension type {code} in the Flax checkpoint")


def _unchunk(tree: Any) -> Any:
    if not isinstance(tree, dict):
        return tree
    if tree.get(CHUNKED_MARK) is True:
        shape = tuple(int(tree["shape"][str(i)]) for i in range(len(tree["shape"])))
        chunks = [np.asarray(tree["chunks"][str(i)]).reshape(-1) for i in range(len(tree["chunks"]))]
        return np.concatenate(chunks).reshape(shape)
    return {key: _unchunk(value) for key, value in tree.items()}


def decode_state_dict(data: bytes) -> Any:
    """The state dict (nested dicts of numpy arrays and Python scalars) of msgpack bytes written by
    ``flax.serialization.msgpack_serialize``."""
    msgpack = _msgpack()
    try:
        tree = msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except CheckpointError:
        raise
    except Exception as err:  # msgpack raises several exception types for corrupt data
        raise CheckpointError(f"the Flax checkpoint is not valid msgpack: {err}") from err
    return _unchunk(tree)


def looks_like_msgpack_map(path: Path) -> bool:
    """Whether the file starts like a msgpack map (the state dict), cheap: one byte. A TF2 ``checkpoint``
    state file (text) does not."""
    try:
        with open(path, "rb") as f:
            first = f.read(1)
    except OSError:
        return False
    return len(first) == 1 and (0x80 <= first[0] <= 0x8F or first[0] in (0xDE, 0xDF))


def _natural_key(name: str) -> list:
    return [float(part) if _NUMBER.fullmatch(part) else part for part in _NUMBER.split(name)]


def resolve_flax_checkpoint(path: str | Path) -> tuple[str, Path]:
    """``(kind, location)`` of the checkpoint at ``path``: ``("msgpack", file)`` or ``("orbax", folder)``
    (see the module doc for the forms and how a folder resolves); ``CheckpointError`` otherwise."""
    path = Path(path).expanduser()
    if path.is_file():
        if looks_like_msgpack_map(path):
            return "msgpack", path
        raise CheckpointError(f"{path} is not a Flax checkpoint (not a msgpack state dict)")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint path {str(path)!r} does not exist")
    if (path / "_METADATA").is_file():
        return "orbax", path
    if (path / ORBAX_FILE).is_file() and looks_like_msgpack_map(path / ORBAX_FILE):
        return "msgpack", path / ORBAX_FILE
    steps = sorted((p for p in path.iterdir() if p.name.startswith(STEP_PREFIX) and "tmp" not in p.name),
                   key=lambda p: _natural_key(p.name))
    if steps:
        return resolve_flax_checkpoint(steps[-1])
    children = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if len(children) == 1:
        return resolve_flax_checkpoint(children[0])
    raise CheckpointError(f"no Flax checkpoint in {path} (expected a msgpack file, a folder with a '{ORBAX_FILE}' "
                          f"msgpack file or _METADATA, or {STEP_PREFIX}<step> entries)")


def is_flax_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` resolves to a Flax / Orbax checkpoint (file names and first bytes only)."""
    try:
        resolve_flax_checkpoint(path)
    except (CheckpointError, OSError):
        return False
    return True


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``{"a/b/c": leaf}``."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}/"))
        return out
    return {prefix[:-1]: tree}


def read_flax_arrays(path: str | Path) -> tuple[str, dict[str, np.ndarray]]:
    """``(format, {name: array})`` of every leaf of the checkpoint at ``path``; ``format`` is
    ``"flax-msgpack"`` or ``"flax-orbax"``."""
    kind, location = resolve_flax_checkpoint(path)
    if kind == "msgpack":
        flat = flatten(decode_state_dict(location.read_bytes()))
        if not any(isinstance(v, str) and v.startswith(ORBAX_PLACEHOLDER) for v in flat.values()):
            return "flax-msgpack", {name: np.asarray(value) for name, value in flat.items()}
        location = location.parent
    from cortexflow.checkpoints.orbax_reader import restore_arrays

    return "flax-orbax", restore_arrays(location)
