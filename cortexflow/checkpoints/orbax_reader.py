"""Read the ``params/`` item of an openpi JAX checkpoint (an Orbax PyTree: OCDBT store of zarr arrays).

Needs ``orbax-checkpoint`` (``pip install 'cortexflow[jax]'``), imported on first use only. Leaves are
named by their tree path joined with ``/`` below the ``params`` root, e.g.
``PaliGemma/llm/layers/attn/q_einsum/w``; when every path ends in ``value`` (trees saved from an
``nnx.State``) that last level is dropped, as openpi does when it restores. Arrays come back as numpy
in their stored dtype (bfloat16 as ``ml_dtypes.bfloat16``), never as JAX device arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from cortexflow.errors import CheckpointError

INSTALL_HINT = "pip install 'cortexflow[jax]'"
_SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
                       "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


@dataclass(frozen=True)
class LeafInfo:
    """Shape and stored dtype of one leaf, read from the checkpoint's metadata (no data loaded).
    ``dtype`` uses the safetensors spelling (``F32``, ``BF16``, ...)."""

    shape: tuple[int, ...]
    dtype: str


def find_params_dir(path: str | Path) -> Path | None:
    """The Orbax ``params/`` item of ``path``: ``path/params`` when it holds ``_METADATA``, ``path`` itself
    when it does, else ``None`` (not an Orbax checkpoint)."""
    path = Path(path).expanduser()
    for candidate in (path / "params", path):
        if (candidate / "_METADATA").is_file():
            return candidate
    return None


def _orbax(params_dir: Path):
    try:
        import orbax.checkpoint as ocp
    except ImportError as err:
        raise CheckpointError(
            f"{params_dir} is an openpi JAX (Orbax) checkpoint; reading it needs orbax-checkpoint, "
            f"which is not installed ({err}): {INSTALL_HINT}, or convert it elsewhere with `cortexflow convert`"
        ) from None
    return ocp


def _flatten(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, prefix + (str(key),)))
        return out
    if isinstance(tree, (list, tuple)):
        out = {}
        for index, value in enumerate(tree):
            out.update(_flatten(value, prefix + (str(index),)))
        return out
    return {prefix: tree}


def _map_tree(tree: Any, fn: Callable[[Any], Any]) -> Any:
    if isinstance(tree, dict):
        return {key: _map_tree(value, fn) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map_tree(value, fn) for value in tree)
    return fn(tree)


def _leaf_names(flat: dict[tuple[str, ...], Any]) -> dict[tuple[str, ...], str]:
    """Key tuple -> ``/``-joined name below the ``params`` root, without a trailing ``value`` level."""
    keys = list(flat)
    strip_root = bool(keys) and all(k[:1] == ("params",) for k in keys)
    strip_value = bool(keys) and all(k[-1:] == ("value",) for k in keys)
    names = {}
    for key in keys:
        parts = key[1:] if strip_root else key
        parts = parts[:-1] if strip_value else parts
        names[key] = "/".join(parts)
    return names


def _metadata_tree(params_dir: Path) -> Any:
    ocp = _orbax(params_dir)
    try:
        metadata = ocp.PyTreeCheckpointer().metadata(params_dir)
    except Exception as err:  # orbax raises assorted error types for unreadable metadata
        raise CheckpointError(f"cannot read the Orbax metadata of {params_dir}: {err}") from err
    return getattr(metadata, "tree", metadata)


def read_leaf_infos(params_dir: str | Path) -> dict[str, LeafInfo]:
    """Name -> shape and dtype of every leaf of the ``params/`` item, from its metadata only."""
    params_dir = Path(params_dir)
    flat = _flatten(_metadata_tree(params_dir))
    infos = {}
    for key, name in _leaf_names(flat).items():
        leaf = flat[key]
        shape = getattr(leaf, "shape", None)
        if shape is None:
            raise CheckpointError(f"{params_dir}: leaf {name!r} is not an array ({type(leaf).__name__})")
        dtype = np.dtype(getattr(leaf, "dtype", None) or np.float32).name
        infos[name] = LeafInfo(shape=tuple(int(d) for d in shape), dtype=_SAFETENSORS_DTYPES.get(dtype, dtype))
    return infos


def restore_arrays(params_dir: str | Path) -> dict[str, np.ndarray]:
    """Name -> numpy array of every leaf of the ``params/`` item, in its stored dtype."""
    params_dir = Path(params_dir)
    ocp = _orbax(params_dir)
    tree = _metadata_tree(params_dir)
    restore_args = _map_tree(tree, lambda _leaf: ocp.RestoreArgs(restore_type=np.ndarray))
    try:
        restored = ocp.PyTreeCheckpointer().restore(params_dir, restore_args=restore_args)
    except Exception as err:  # orbax / tensorstore raise assorted error types for corrupt data
        raise CheckpointError(f"cannot restore the arrays of {params_dir}: {err}") from err
    flat = _flatten(restored)
    return {name: np.asarray(flat[key]) for key, name in _leaf_names(flat).items()}


def numpy_to_torch(array: np.ndarray) -> torch.Tensor:
    """A CPU tensor sharing nothing with ``array``; bfloat16 (``ml_dtypes``) arrays become ``torch.bfloat16``."""
    array = np.ascontiguousarray(array)
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(array.copy())
