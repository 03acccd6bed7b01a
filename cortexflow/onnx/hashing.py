"""Fast fingerprints of a checkpoint on disk and of weights in memory (cache keys, manifests).

Neither reads every byte (a real Pi0 is 7-13 GB):

- :func:`checkpoint_hash` — sha256 over, per safetensors file in name order: the file name, its size,
  its whole JSON header (names, dtypes, shapes, offsets), and 16 blocks of 4 KiB sampled evenly
  across the data section (first and last included). Two checkpoints of one architecture with
  different values (a fine-tune) differ in the sampled bytes; a change confined to bytes between
  the samples is not seen.
- :func:`weights_fingerprint` — sha256 over, per canonical weight name in sorted order: the name,
  dtype, shape and the bytes of up to 4096 elements taken at even strides (every element of small
  tensors). Used by the ONNX backend, which gets weights rather than a path.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Mapping

import torch

SAMPLE_BLOCKS = 16
SAMPLE_BYTES = 4096
SAMPLE_ELEMENTS = 4096

CHECKPOINT_HASH_METHOD = (
    f"sha256(file name, size, safetensors header, {SAMPLE_BLOCKS} x {SAMPLE_BYTES} B samples of the data) per file"
)
WEIGHTS_FINGERPRINT_METHOD = (
    f"sha256(name, dtype, shape, {SAMPLE_ELEMENTS} elements at i * (n - 1) // {SAMPLE_ELEMENTS - 1}) per weight"
)


def checkpoint_hash(path: "str | Path") -> str:
    """Hex sha256 fingerprint of the safetensors checkpoint at ``path`` (a file or a folder); see module doc."""
    from cortexflow.checkpoints.files import CheckpointFiles

    files = CheckpointFiles.open(path)
    digest = hashlib.sha256()
    for file in sorted(files.files, key=lambda f: f.name):
        size = file.stat().st_size
        digest.update(f"{file.name}\0{size}\0".encode())
        with open(file, "rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            digest.update(handle.read(header_len))
            start = 8 + header_len
            data_len = max(size - start, 0)
            offsets = sorted({start + (data_len - SAMPLE_BYTES) * i // (SAMPLE_BLOCKS - 1) for i in range(SAMPLE_BLOCKS)}) \
                if data_len > SAMPLE_BYTES else [start]
            for offset in offsets:
                handle.seek(max(offset, start))
                digest.update(handle.read(SAMPLE_BYTES))
    return digest.hexdigest()


def weights_fingerprint(weights: Mapping[str, torch.Tensor]) -> str:
    """Hex sha256 fingerprint of canonical-name ``weights`` (any device and dtype); see module doc."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].detach()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        flat = tensor.reshape(-1)
        if flat.numel() > SAMPLE_ELEMENTS:
            flat = flat[sample_positions(flat.numel(), flat.device)]
        digest.update(flat.contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def sample_positions(numel: int, device: torch.device) -> torch.Tensor:
    """The :data:`SAMPLE_ELEMENTS` evenly spaced positions ``i * (numel - 1) // (SAMPLE_ELEMENTS - 1)`` that
    :func:`weights_fingerprint` reads of a tensor of ``numel`` elements, first and last included (int64
    arithmetic: a float32 ``linspace`` rounds its last position past the end above 2^24 elements)."""
    steps = torch.arange(SAMPLE_ELEMENTS, dtype=torch.int64, device=device)
    return steps * (numel - 1) // (SAMPLE_ELEMENTS - 1)


def cache_root(kind: str) -> Path:
    """The folder of CortexFlow's ``kind`` cache ("onnx", "fp8"): ``$CORTEXFLOW_CACHE/{kind}``, else
    ``$XDG_CACHE_HOME/cortexflow/{kind}``, else ``~/.cache/cortexflow/{kind}``."""
    if os.environ.get("CORTEXFLOW_CACHE"):
        return Path(os.environ["CORTEXFLOW_CACHE"]).expanduser() / kind
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return base / "cortexflow" / kind


def settings_key(*parts: object) -> str:
    """A short stable hex key (24 chars) of JSON-able parts: the cache folder name."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]
