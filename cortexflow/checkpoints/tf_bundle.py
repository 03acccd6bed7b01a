"""Read a TensorFlow 2 checkpoint (tensor bundle) without TensorFlow.

A checkpoint ``<prefix>`` is ``<prefix>.index`` plus ``<prefix>.data-SSSSS-of-NNNNN`` shards. The index is
a LevelDB-format table (SSTable): a 48-byte footer (metaindex and index block handles, magic
``0xdb4775248b80fb57``) points at an index block whose entries point at data blocks; each block holds
prefix-compressed ``key -> value`` entries followed by its restart array, and is followed by a 1-byte
compression type and a 4-byte CRC. The entry with the empty key is a ``BundleHeaderProto`` (shard count,
endianness); every other key is a tensor name whose value is a ``BundleEntryProto`` (dtype, shape,
shard, byte offset, byte size). Tensor bytes are raw little-endian arrays in the shard. String tensors
(the object graph) are listed but not decoded.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cortexflow.errors import CheckpointError

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_BYTES = 48
#: ``tensorflow.DataType`` enum values -> numpy dtypes (DT_STRING = 7 has no fixed layout).
TF_DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 4: np.uint8, 5: np.int16, 6: np.int8, 9: np.int64,
             10: np.bool_, 17: np.uint16, 19: np.float16, 22: np.uint32, 23: np.uint64}
DT_STRING = 7
DT_BFLOAT16 = 14


@dataclass(frozen=True)
class BundleEntry:
    """Where one tensor's bytes are: its TF dtype enum, shape, shard number, byte offset and size."""

    dtype: int
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int

    @property
    def numeric(self) -> bool:
        return self.dtype in TF_DTYPES or self.dtype == DT_BFLOAT16


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise CheckpointError("truncated varint in the checkpoint index")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _proto_fields(buf: bytes):
    """Yield ``(field number, wire type, value)`` of a serialized protobuf message (varint values as ints,
    length-delimited as bytes)."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = struct.unpack_from("<Q", buf, pos)[0], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = struct.unpack_from("<I", buf, pos)[0], pos + 4
        else:
            raise CheckpointError(f"unsupported protobuf wire type {wire} in the checkpoint index")
        yield number, wire, value


def _shape(buf: bytes) -> tuple[int, ...]:
    dims = []
    for number, _, value in _proto_fields(buf):
        if number == 2:
            size = next((v for n, _, v in _proto_fields(value) if n == 1), 0)
            dims.append(size - (1 << 64) if size >= 1 << 63 else size)
    return tuple(dims)


def parse_bundle_entry(buf: bytes) -> BundleEntry:
    """Decode a serialized ``BundleEntryProto``; sliced (partitioned) tensors are refused."""
    fields = {"dtype": 0, "shape": (), "shard": 0, "offset": 0, "size": 0}
    for number, _, value in _proto_fields(buf):
        if number == 1:
            fields["dtype"] = value
        elif number == 2:
            fields["shape"] = _shape(value)
        elif number == 3:
            fields["shard"] = value
        elif number == 4:
            fields["offset"] = value
        elif number == 5:
            fields["size"] = value
        elif number == 7:
            raise CheckpointError("partitioned (sliced) variables are not supported; re-save the checkpoint "
                                  "unpartitioned")
    return BundleEntry(**fields)


def _block(data: bytes, offset: int, size: int) -> bytes:
    """The contents of the table block at ``offset`` (uncompressed blocks only)."""
    if offset + size + 5 > len(data):
        raise CheckpointError("the checkpoint index is truncated (a block runs past the end of the file)")
    if data[offset + size] != 0:
        raise CheckpointError(f"the checkpoint index uses block compression type {data[offset + size]}; only "
                              "uncompressed tables (what TensorFlow writes) are supported")
    return data[offset:offset + size]


def _block_entries(block: bytes):
    """Yield ``(key, value)`` of a table block (keys are prefix-compressed against the previous key)."""
    if len(block) < 4:
        raise CheckpointError("corrupt checkpoint index block")
    num_restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    end = len(block) - 4 - 4 * num_restarts
    if end < 0:
        raise CheckpointError("corrupt checkpoint index block (restart array)")
    pos, key = 0, b""
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        length, pos = _varint(block, pos)
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        yield key, block[pos:pos + length]
        pos += length


def read_index(index_path: Path) -> tuple[int, dict[str, BundleEntry]]:
    """``(number of shards, tensor name -> entry)`` from a ``.index`` file."""
    data = Path(index_path).read_bytes()
    if len(data) < FOOTER_BYTES:
        raise CheckpointError(f"{index_path} is too short to be a TensorFlow checkpoint index")
    footer = data[-FOOTER_BYTES:]
    lo, hi = struct.unpack_from("<II", footer, 40)
    if (hi << 32) | lo != TABLE_MAGIC:
        raise CheckpointError(f"{index_path} is not a TensorFlow checkpoint index (bad table magic number)")
    _, pos = _varint(footer, 0)
    _, pos = _varint(footer, pos)
    index_offset, pos = _varint(footer, pos)
    index_size, _ = _varint(footer, pos)
    num_shards, entries = 1, {}
    for _, handle in _block_entries(_block(data, index_offset, index_size)):
        offset, pos = _varint(handle, 0)
        size, _ = _varint(handle, pos)
        for key, value in _block_entries(_block(data, offset, size)):
            if key == b"":
                for number, _, field_value in _proto_fields(value):
                    if number == 1:
                        num_shards = field_value
                    elif number == 2 and field_value != 0:
                        raise CheckpointError(f"{index_path} was written big-endian; only little-endian is supported")
            else:
                entries[key.decode("utf-8")] = parse_bundle_entry(value)
    return num_shards, entries


def resolve_prefix(path: str | Path) -> Path:
    """The checkpoint prefix for ``path``: a prefix (``.../ckpt-424760``), its ``.index`` file, or a folder
    holding a ``checkpoint`` state file or exactly one ``*.index``."""
    path = Path(path).expanduser()
    if path.is_dir():
        state = path / "checkpoint"
        if state.is_file():
            match = re.search(r'model_checkpoint_path:\s*"([^"]+)"', state.read_text())
            if match:
                return path / match.group(1)
        indexes = sorted(path.glob("*.index"))
        if len(indexes) == 1:
            return indexes[0].with_suffix("")
        if not indexes and (path / "saved_model.pb").is_file():
            raise CheckpointError(f"{path} is a TF SavedModel: its variables/ index names variables by number, not by "
                                  "object path; pass the training checkpoint (ckpt-N.index + .data-*) instead")
        raise CheckpointError(f"{path} holds {len(indexes)} TensorFlow checkpoint indexes and no 'checkpoint' file "
                              "naming one; pass the prefix, e.g. .../ckpt-424760")
    if path.suffix == ".index":
        path = path.with_suffix("")
    if not Path(f"{path}.index").is_file():
        raise CheckpointError(f"no TensorFlow checkpoint at {path} (expected {path}.index and its .data-* shards)")
    return path


def is_tf_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` names a TF2 checkpoint: a prefix with a ``.index`` beside it, the ``.index`` file, or
    a folder with a ``checkpoint`` state file or ``*.index`` files (cheap: file names only)."""
    path = Path(path).expanduser()
    if path.is_dir():
        return (path / "checkpoint").is_file() or any(path.glob("*.index"))
    return path.suffix == ".index" and path.is_file() or Path(f"{path}.index").is_file()


class TensorBundle:
    """The tensors of one TF2 checkpoint: names, dtypes and shapes from the index, values read on demand."""

    def __init__(self, path: str | Path):
        self.prefix = resolve_prefix(path)
        self.num_shards, self.entries = read_index(Path(f"{self.prefix}.index"))
        self._data: dict[int, np.memmap] = {}

    def shard_path(self, shard: int) -> Path:
        return Path(f"{self.prefix}.data-{shard:05d}-of-{self.num_shards:05d}")

    def _shard(self, shard: int) -> np.memmap:
        if shard not in self._data:
            path = self.shard_path(shard)
            if not path.is_file():
                raise CheckpointError(f"the checkpoint data shard {path} is missing")
            self._data[shard] = np.memmap(path, dtype=np.uint8, mode="r")
        return self._data[shard]

    def read(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a numpy array (bfloat16 is returned widened to float32)."""
        entry = self.entries[name]
        if not entry.numeric:
            raise CheckpointError(f"tensor {name!r} has non-numeric TensorFlow dtype {entry.dtype}")
        dtype = np.uint16 if entry.dtype == DT_BFLOAT16 else TF_DTYPES[entry.dtype]
        count = int(np.prod(entry.shape, dtype=np.int64))
        if count * np.dtype(dtype).itemsize != entry.size:
            raise CheckpointError(f"tensor {name!r}: {entry.size} bytes recorded for shape {entry.shape}")
        shard = self._shard(entry.shard)
        if entry.offset + entry.size > shard.size:
            raise CheckpointError(f"tensor {name!r} runs past the end of {self.shard_path(entry.shard)} "
                                  "(truncated checkpoint)")
        raw = np.array(shard[entry.offset:entry.offset + entry.size]).view(dtype).reshape(entry.shape)
        if entry.dtype == DT_BFLOAT16:
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return raw
