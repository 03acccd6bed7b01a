"""An on-disk cache of a token VLA's FP8 language-model layers, as the triton backend prepares them.

With ``precision="fp8"`` the triton backend fuses Q/K/V and gate/up of every language-model layer, folds the
layer's RMSNorm scales into them (``TritonOptions.fold_token_norms``) and quantises its projections to E4M3 with
per-output-channel fp32 scales (:mod:`cortexflow.backends.triton_fp8`). An entry holds that result, so that the
next engine start reads the E4M3 layers instead of their bfloat16 projections (OpenVLA-7B: about 6.5 GB instead
of 13 GB); the engine's preparation leaves such layers as they are (every step of it is idempotent).

An entry is one folder ``{root}/{key}`` with two files:

- ``layers.safetensors``, on the host, for every quantised layer ``{p}`` (``llm.layers.{i}``; ``D`` the model
  width, ``M`` the MLP width, ``Hq`` / ``Hkv`` query / KV heads of ``Dh``):

  - ``{p}.qkv (Hq*Dh + 2*Hkv*Dh, D)``, ``{p}.o (D, Hq*Dh)``, ``{p}.gate_up (2*M, D)``, ``{p}.down (D, M)``: E4M3
    (``torch.float8_e4m3fn``), the fused rows in the order q | k | v and gate | up, norm scales folded in;
  - ``{name}.fp8_scale`` of each (:func:`~cortexflow.quantization.fp8.fp8_scale_key`): fp32 ``(rows,)``, one per
    output channel, ``value ≈ data * scale[:, None]``;
  - the layer's two RMSNorm scales under the names the backend reads (``GatedLayer.attn_norm`` / ``mlp_norm``: a
    Gemma norm's own weight, a Llama norm's ``.minus_one``), zeros where folded, in their prepared dtype;
  - ``{p}.norms_folded`` (a scalar) where the norms were folded
    (:func:`~cortexflow.backends.triton_token_decoder.folded_key`).

  The separate q/k/v and gate/up (views into the fused tensors after a preparation) are neither stored nor
  restored: the fused layer runs the fused tensors, and views moved to the GPU one by one would become copies.
- ``manifest.json``: what the entry holds, the checkpoint it came from and its hash, the key's parts, the number
  of tensors and their bytes, and the creation time.

The key (:func:`~cortexflow.onnx.hashing.settings_key`) covers :data:`FORMAT_VERSION`, the checkpoint's
:func:`~cortexflow.onnx.hashing.checkpoint_hash` (sampled: a change confined to bytes between the samples is not
seen), the model class, the stored tensors' names, shapes and dtypes (the model configuration only as far as it shapes
the quantised layers: a change to the prompt template, the action bins or the vision tower keeps the entry), the
compute dtype, the backend's FP8 stages and ``fold_token_norms``
(the options that change the stored values), and the torch version. An entry is written into a temporary folder
beside the final one and renamed into place only when complete, so an interrupted write is never found. A damaged
entry is removed and counts as a miss.

Location: the folder given, else ``$CORTEXFLOW_CACHE/fp8``, else ``$XDG_CACHE_HOME/cortexflow/fp8``, else
``~/.cache/cortexflow/fp8``. Hits, misses and writes are logged at INFO to this module's logger.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from cortexflow.backends.triton_fp8 import FP8_PROJECTIONS, fp8_layers
from cortexflow.backends.triton_options import TritonOptions
from cortexflow.backends.triton_token_decoder import folded_key
from cortexflow.config import dtype_name
from cortexflow.onnx.hashing import CHECKPOINT_HASH_METHOD, cache_root, checkpoint_hash, settings_key
from cortexflow.ops import GatedLayer
from cortexflow.quantization.fp8 import E4M3, fp8_scale_key

#: Bumped whenever what an entry stores, or how, changes (older entries are then never found).
FORMAT_VERSION = 1
TENSORS = "layers.safetensors"
MANIFEST = "manifest.json"

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """The cache root when no folder is given (see module doc)."""
    return cache_root("fp8")


@dataclass(frozen=True)
class Fp8LayerCache:
    """The cache entry of one engine's FP8 layers: ``folder`` (named by the key of ``key_parts``), the
    ``layers`` it holds, the ``stored`` tensors' shapes and dtypes (None: the norm scales, in their prepared
    dtype), and ``checkpoint_names``, the checkpoint's canonical weight names the entry replaces (every tensor of
    its layers: none of them is read on a hit)."""

    folder: Path
    key_parts: Mapping[str, object]
    layers: tuple[GatedLayer, ...]
    stored: Mapping[str, tuple[tuple[int, ...], torch.dtype | None]]
    checkpoint_names: frozenset[str]

    def load(self) -> dict[str, torch.Tensor] | None:
        """The entry's tensors on the host; None on a miss (no entry, or a damaged one, which is removed)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if not (self.folder / MANIFEST).is_file():
            log.info("FP8 cache miss: no entry %s", self.folder)
            return None
        try:
            tensors = load_file(str(self.folder / TENSORS), device="cpu")
            problem = self._problem(tensors)
        except (OSError, SafetensorError) as err:
            problem = str(err)
        if problem is not None:
            log.warning("FP8 cache entry %s is damaged (%s); removed, the layers are quantised again", self.folder,
                        problem)
            shutil.rmtree(self.folder, ignore_errors=True)
            return None
        log.info("FP8 cache hit: %d layers (%s) read from %s", len(self.layers), _size(_nbytes(tensors)), self.folder)
        return tensors

    def save(self, weights: Mapping[str, torch.Tensor], checkpoint: str) -> Path:
        """Write the entry from ``weights`` as the engine prepared them and return its folder; ``checkpoint`` is
        recorded in the manifest. Each tensor is copied to the host, on the host too (the layers' fold markers are
        one shared tensor, which safetensors refuses to write twice). An entry another process wrote meanwhile is
        kept."""
        from safetensors.torch import save_file

        names = [*self.stored, *(folded_key(layer) for layer in self.layers if folded_key(layer) in weights)]
        tensors = {name: weights[name].detach().to("cpu", copy=True) for name in names}
        nbytes = _nbytes(tensors)
        root = self.folder.parent
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{self.folder.name}-", dir=root))
        try:
            save_file(tensors, str(staging / TENSORS), metadata={"format": "pt"})
            manifest = {
                "what": "FP8 (E4M3) language-model layers of a token VLA as the triton backend prepares them: fused "
                        "qkv / o / gate_up / down with per-output-channel fp32 scales, RMSNorm scales, fold markers",
                "format": FORMAT_VERSION,
                "checkpoint": checkpoint,
                "checkpoint_hash": self.key_parts["checkpoint_hash"],
                "checkpoint_hash_method": CHECKPOINT_HASH_METHOD,
                "key": self.folder.name,
                "key_parts": dict(self.key_parts),
                "layers": [layer.prefix for layer in self.layers],
                "tensors": len(tensors),
                "bytes": nbytes,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
            try:
                os.replace(staging, self.folder)
            except OSError:
                if not (self.folder / MANIFEST).exists():  # not a concurrent writer that won the race
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("FP8 cache: wrote %d layers (%s) to %s", len(self.layers), _size(nbytes), self.folder)
        return self.folder

    def _problem(self, tensors: Mapping[str, torch.Tensor]) -> str | None:
        """What makes ``tensors`` unusable as this entry (a missing, mis-shaped or wrongly typed tensor), or None."""
        for name, (shape, dtype) in self.stored.items():
            if name not in tensors:
                return f"no tensor {name!r}"
            tensor = tensors[name]
            if tuple(tensor.shape) != shape or (dtype is not None and tensor.dtype != dtype):
                return f"{name!r} is {tensor.dtype} {list(tensor.shape)}, expected {dtype} {list(shape)}"
        return None


def fp8_layer_cache(location: "bool | str | Path", checkpoint_path: "str | Path", model, options: TritonOptions,
                    dtype: torch.dtype) -> Fp8LayerCache:
    """The entry for ``model`` (built from the checkpoint at ``checkpoint_path``, no weights read yet) on a triton
    backend with ``options`` (its ``fp8_stages`` say which layers are quantised) in compute ``dtype``, under
    ``location`` (True: :func:`default_cache_dir`, else that folder)."""
    root = default_cache_dir() if location is True else Path(location).expanduser()
    layers = tuple(fp8_layers(model.fusable_weights(), options.fp8_stages))
    shapes = model.get_weight_shapes()
    stored: dict[str, tuple[tuple[int, ...], torch.dtype | None]] = {}
    for layer in layers:
        for fused, parts in FP8_PROJECTIONS:
            name = layer.name(fused)
            sources = [layer.name(p) for p in parts] or [name]
            rows, width = sum(shapes[s][0] for s in sources), shapes[sources[0]][1]
            stored[name], stored[fp8_scale_key(name)] = ((rows, width), E4M3), ((rows,), torch.float32)
        width = stored[layer.name("qkv")][0][1]
        for norm in (layer.attn_norm, layer.mlp_norm):
            if norm is not None:
                stored[norm] = ((width,), None)
    key_parts = {
        "format": FORMAT_VERSION,
        "checkpoint_hash": checkpoint_hash(checkpoint_path),
        "model": f"{type(model).__module__}.{type(model).__qualname__}",
        "stored": [f"{name} {list(shape)} {'prepared' if kind is None else dtype_name(kind)}"
                   for name, (shape, kind) in sorted(stored.items())],
        "dtype": dtype_name(dtype),
        "fp8_stages": sorted(options.fp8_stages),
        "fold_token_norms": options.fold_token_norms,
        "torch": torch.__version__,
    }
    under = tuple(layer.prefix + "." for layer in layers)
    return Fp8LayerCache(
        folder=root / settings_key(key_parts), key_parts=key_parts, layers=layers, stored=stored,
        checkpoint_names=frozenset(name for name in shapes if name.startswith(under)),
    )


def _nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"
