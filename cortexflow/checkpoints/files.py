"""Read safetensors checkpoints lazily: names, shapes and dtypes first, tensors one at a time.

A checkpoint path is a ``.safetensors`` file, or a folder holding ``model.safetensors``, a
``model.safetensors.index.json`` with shards, or a single ``*.safetensors`` file; an optional
``config.json`` beside the weights is read too. A hub id (``lerobot/pi0``) that is no local path is read
from huggingface_hub's cache (:mod:`cortexflow.checkpoints.hub`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cortexflow.checkpoints.hub import resolve_checkpoint_path
from cortexflow.errors import CheckpointError

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what it is, read from the safetensors header (no data loaded)."""

    file: Path
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _DTYPE_BYTES.get(self.dtype, 4)


@dataclass
class CheckpointFiles:
    """The safetensors files of one checkpoint and the header of every tensor in them."""

    root: Path
    files: list[Path]
    tensors: dict[str, TensorInfo]
    config: dict = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | Path) -> "CheckpointFiles":
        """Find and read the headers of the checkpoint at ``path``; ``CheckpointError`` if unusable."""
        path = resolve_checkpoint_path(path)
        root = path if path.is_dir() else path.parent
        files = _find_weight_files(path)
        tensors: dict[str, TensorInfo] = {}
        for file in files:
            for name, info in _read_header(file).items():
                if name in tensors:
                    raise CheckpointError(f"tensor {name!r} appears in both {tensors[name].file.name} and {file.name}")
                tensors[name] = info
        if not tensors:
            raise CheckpointError(f"checkpoint {str(path)!r} contains no tensors")
        return cls(root=root, files=files, tensors=tensors, config=_read_config(root))

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    def read(self, name: str) -> torch.Tensor:
        """Load one tensor (CPU, stored dtype). Corrupt data raises ``CheckpointError``."""
        from safetensors import safe_open

        info = self.tensors[name]
        try:
            with safe_open(str(info.file), framework="pt") as handle:
                return handle.get_tensor(name)
        except Exception as err:  # safetensors raises its own error types for corrupt data
            raise CheckpointError(f"cannot read tensor {name!r} from {info.file}: {err}") from err


def _find_weight_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(
                f"{str(path)!r} is not a .safetensors file; CortexFlow reads safetensors checkpoints "
                "(openpi PyTorch model.safetensors, LeRobot model.safetensors, sharded HF folders)"
            )
        return [path]
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{index} is not a valid safetensors index (need a 'weight_map'): {err}") from err
        shards = sorted({path / shard for shard in weight_map.values()})
        missing = [s.name for s in shards if not s.exists()]
        if missing:
            raise CheckpointError(f"{index} names shard(s) that are missing from {path}: {missing}")
        return shards
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    candidates = sorted(path.glob("*.safetensors"))
    weights = [c for c in candidates if "normalizer" not in c.name and "processor" not in c.name]
    if len(weights) == 1:
        return weights
    if not weights and (path / "params" / "_METADATA").is_file():
        raise CheckpointError(
            f"{str(path)!r} is an openpi Orbax (JAX) checkpoint (params/_METADATA), not safetensors: convert it "
            "with `cortexflow convert SRC DST` (pip install 'cortexflow[jax]') and pass DST"
        )
    if not weights:
        raise CheckpointError(
            f"no model.safetensors (or model.safetensors.index.json) in {str(path)!r}; "
            "expected an openpi PyTorch or LeRobot checkpoint folder"
        )
    raise CheckpointError(f"several safetensors files in {str(path)!r} and no index: {[w.name for w in weights]}")


def _read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse the safetensors header and check that the file is long enough for every tensor."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            if header_len <= 0 or header_len + 8 > size:
                raise ValueError(f"header length {header_len} does not fit a file of {size} bytes")
            header = json.loads(handle.read(header_len))
        if not isinstance(header, dict):
            raise ValueError(f"the header is a JSON {type(header).__name__}, not an object")
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{file} is not a valid safetensors file (corrupt or truncated): {err}") from err
    data_len = size - 8 - header_len
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = entry["data_offsets"]
            info = TensorInfo(file=file, shape=tuple(int(d) for d in entry["shape"]), dtype=str(entry["dtype"]))
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{file}: malformed header entry for {name!r}: {err}") from err
        if end > data_len:
            raise CheckpointError(
                f"{file} is truncated: tensor {name!r} ends at byte {end} of the data section, "
                f"but the file holds only {data_len} data bytes"
            )
        tensors[name] = info
    return tensors


def _read_config(root: Path) -> dict:
    config = root / "config.json"
    if not config.exists():
        return {}
    try:
        data = json.loads(config.read_text())
    except ValueError as err:
        raise CheckpointError(f"{config} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{config} must hold a JSON object, found {type(data).__name__}")
    return data
