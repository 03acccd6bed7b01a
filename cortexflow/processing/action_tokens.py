"""Action tokens <-> bins <-> values, and the per-dataset statistics that turn values into robot actions.

OpenVLA (``prismatic/vla/action_tokenizer.py``): the last ``n_bins`` ids of the unpadded text vocabulary
``V`` are actions. Decoding maps id ``t`` to bin ``clip(V - t - 1, 0, n_bins - 2)`` and the bin to its
centre ``c[i] = -1 + (2i + 1) / (n_bins - 1)`` (255 centres for 256 bins), so ``31872 -> 0.0`` and
``31999 -> -0.996`` for Llama's ``V = 32000``. Un-normalisation (BOUNDS_Q99):
``a = 0.5 (a_norm + 1)(q99 - q01) + q01`` where ``mask`` is true, ``a_norm`` elsewhere.

RT-2 style over PaliGemma (openpi's ``BinningTokenizer``): bin ``b`` in ``[0, n_bins)`` is id
``V - 1 - 128 - b`` (skipping the 128 special ids at the end of the vocabulary) and decodes to
``b / n_bins * 2 - 1``.

Everything here works on ids, never on text (id 31881 decodes to U+202D and does not round-trip).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from cortexflow.errors import NormStatsError

PALIGEMMA_SPECIAL_TAIL = 128


def openvla_action_id_range(text_vocab_size: int, n_bins: int = 256) -> tuple[int, int]:
    """``(lo, hi)``: the ids ``lo..hi-1`` that OpenVLA's action tokenizer emits (31744..31999 for Llama)."""
    return text_vocab_size - n_bins, text_vocab_size


def openvla_tokens_to_bins(tokens: Any, text_vocab_size: int, n_bins: int = 256) -> np.ndarray:
    """Bin-centre indices ``clip(V - t - 1, 0, n_bins - 2)`` (int64) of token ids ``t``."""
    tokens = np.asarray(tokens, dtype=np.int64)
    return np.clip(text_vocab_size - tokens - 1, 0, n_bins - 2)


def openvla_bin_centers(n_bins: int = 256) -> np.ndarray:
    """The ``n_bins - 1`` bin centres of ``linspace(-1, 1, n_bins)`` (float64)."""
    edges = np.linspace(-1.0, 1.0, n_bins)
    return (edges[:-1] + edges[1:]) / 2.0


def openvla_tokens_to_values(tokens: Any, text_vocab_size: int, n_bins: int = 256) -> np.ndarray:
    """Normalised actions in [-1, 1] (float32) of OpenVLA action token ids."""
    return openvla_bin_centers(n_bins)[openvla_tokens_to_bins(tokens, text_vocab_size, n_bins)].astype(np.float32)


def binning_bins_to_tokens(bins: Any, vocab_size: int, n_bins: int = 256) -> np.ndarray:
    """openpi binning: bin ``b`` -> id ``V - 1 - 128 - b``."""
    bins = np.asarray(bins, dtype=np.int64)
    if bins.size and (bins.min() < 0 or bins.max() >= n_bins):
        raise ValueError(f"bins must lie in [0, {n_bins}), got {bins.min()}..{bins.max()}")
    return vocab_size - 1 - PALIGEMMA_SPECIAL_TAIL - bins


def binning_action_id_range(vocab_size: int, n_bins: int = 256) -> tuple[int, int]:
    """``(lo, hi)``: the ids ``lo..hi-1`` of the ``n_bins`` action bins in openpi's binning scheme."""
    hi = vocab_size - PALIGEMMA_SPECIAL_TAIL
    return hi - n_bins, hi


def binning_tokens_to_values(tokens: Any, vocab_size: int, n_bins: int = 256) -> np.ndarray:
    """openpi binning: id -> bin ``V - 1 - 128 - t`` (clipped into range) -> ``b / n_bins * 2 - 1`` (float32)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    bins = np.clip(vocab_size - 1 - PALIGEMMA_SPECIAL_TAIL - tokens, 0, n_bins - 1)
    return (bins / n_bins * 2.0 - 1.0).astype(np.float32)


@dataclass
class ActionStats:
    """One dataset's action statistics: ``q01``, ``q99`` and the ``mask`` of dims to un-normalise."""

    q01: np.ndarray
    q99: np.ndarray
    mask: np.ndarray

    @classmethod
    def from_entry(cls, key: str, entry: Any) -> "ActionStats":
        """Parse ``{"action": {"q01": [...], "q99": [...], "mask": [...]}}`` (mask optional: all true)."""
        action = entry.get("action") if isinstance(entry, Mapping) else None
        if not isinstance(action, Mapping):
            raise NormStatsError(f"norm stats for {key!r} have no 'action' entry; expected {{'action': {{'q01', 'q99', ...}}}}")
        try:
            q01 = np.asarray(action["q01"], dtype=np.float64)
            q99 = np.asarray(action["q99"], dtype=np.float64)
        except KeyError as err:
            raise NormStatsError(f"action norm stats for {key!r} lack {err.args[0]!r}; expected q01 and q99") from err
        except (TypeError, ValueError) as err:
            raise NormStatsError(f"action norm stats for {key!r} are not lists of numbers: {err}") from err
        mask = np.asarray(action.get("mask", np.ones_like(q01, dtype=bool)), dtype=bool)
        if q01.ndim != 1 or q01.shape != q99.shape or mask.shape != q01.shape:
            raise NormStatsError(
                f"action norm stats for {key!r} have shapes q01 {q01.shape}, q99 {q99.shape}, mask {mask.shape}; "
                "expected three 1-D lists of one length"
            )
        if not (np.isfinite(q01).all() and np.isfinite(q99).all()):
            raise NormStatsError(f"action norm stats for {key!r} contain NaN or inf")
        return cls(q01=q01, q99=q99, mask=mask)

    @property
    def dim(self) -> int:
        return int(self.q01.shape[0])

    def unnormalize(self, normalized: Any) -> np.ndarray:
        """``0.5 (a + 1)(q99 - q01) + q01`` on masked dims, ``a`` elsewhere; ``(..., D)`` -> float32."""
        a = np.asarray(normalized, dtype=np.float64)
        if a.shape[-1] != self.dim:
            raise NormStatsError(f"actions have {a.shape[-1]} dims but the norm stats have {self.dim}")
        values = 0.5 * (a + 1.0) * (self.q99 - self.q01) + self.q01
        return np.where(self.mask, values, a).astype(np.float32)


def read_dataset_statistics(folder: str | Path, config: Mapping[str, Any]) -> dict[str, Any]:
    """Per-dataset statistics of an OpenVLA checkpoint: ``config.json``'s ``norm_stats``, updated by
    ``dataset_statistics.json`` beside the weights when present (fine-tuned checkpoints ship it)."""
    stats: dict[str, Any] = {}
    if isinstance(config.get("norm_stats"), Mapping):
        stats.update(config["norm_stats"])
    path = Path(folder) / "dataset_statistics.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except ValueError as err:
            raise NormStatsError(f"{path} is not valid JSON: {err}") from err
        if not isinstance(data, Mapping):
            raise NormStatsError(f"{path} holds a JSON {type(data).__name__}; expected an object of datasets")
        stats.update(data)
    return stats


def select_action_stats(stats: Mapping[str, Any], unnorm_key: str | None) -> tuple[str | None, ActionStats | None]:
    """The statistics to un-normalise with: ``unnorm_key``'s, or the only dataset's when there is one.

    No statistics at all gives ``(None, None)`` (actions stay normalised). Several datasets and no key,
    or a key that is not there, raise ``NormStatsError`` listing the known keys."""
    keys = sorted(stats)
    if unnorm_key is None:
        if not keys:
            return None, None
        if len(keys) > 1:
            raise NormStatsError(
                f"this checkpoint has action statistics for {len(keys)} datasets; pass unnorm_key= one of: {', '.join(keys)}"
            )
        unnorm_key = keys[0]
    if unnorm_key not in stats:
        known = ", ".join(keys) if keys else "none (the checkpoint has no norm_stats / dataset_statistics.json)"
        raise NormStatsError(f"unnorm_key {unnorm_key!r} is not in the checkpoint's statistics; known keys: {known}")
    return unnorm_key, ActionStats.from_entry(unnorm_key, stats[unnorm_key])
