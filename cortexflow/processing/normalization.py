"""State / action normalisation statistics: loading (openpi and LeRobot formats) and (un)normalising.

Pi0 uses z-score normalisation, Pi0.5 quantile normalisation (openpi ``use_quantile_norm``). Arrays are
``(..., D)``; statistics are 1-D of length D (the robot's raw dimension, before zero-padding to the
model's action dimension).
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cortexflow.errors import ConfigError, InputError, NormStatsError

EPSILON = 1e-6
NORM_MODES = ("zscore", "quantile")
_MODE_FIELDS = {"zscore": ("mean", "std"), "quantile": ("q01", "q99")}
_STAT_FIELDS = ("mean", "std", "q01", "q99", "min", "max", "q10", "q90")
# Accepted top-level keys for each statistics group: openpi names first, then LeRobot names.
_GROUP_KEYS = {"state": ("state", "observation.state"), "actions": ("actions", "action")}


@dataclass
class NormStats:
    """Per-dimension statistics of one quantity (state or actions), each a float32 1-D array or None.

    openpi files carry mean/std/q01/q99; LeRobot files may add min/max and the 10 % / 90 % quantiles."""

    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    q01: np.ndarray | None = None
    q99: np.ndarray | None = None
    min: np.ndarray | None = None
    max: np.ndarray | None = None
    q10: np.ndarray | None = None
    q90: np.ndarray | None = None

    def __post_init__(self) -> None:
        """Convert the given fields to float32 1-D arrays and check they are finite and of one length."""
        lengths = {}
        for name in _STAT_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            array = _as_stat_array(value, name)
            setattr(self, name, array)
            lengths[name] = array.shape[0]
        if not lengths:
            raise NormStatsError(f"norm stats have none of {', '.join(_STAT_FIELDS)}; expected mean/std or q01/q99")
        if len(set(lengths.values())) > 1:
            raise NormStatsError(
                f"norm stats fields have different lengths {lengths}; expected all fields of one length"
            )

    @property
    def dim(self) -> int:
        """Number of dimensions these statistics cover."""
        return next(getattr(self, name).shape[0] for name in _STAT_FIELDS if getattr(self, name) is not None)


def _as_stat_array(value, name: str) -> np.ndarray:
    """Convert one statistics field to a finite float32 1-D array."""
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise NormStatsError(
            f"norm stats field {name!r} is not a list of numbers ({exc}); expected a 1-D list of numbers"
        ) from exc
    if array.ndim != 1:
        raise NormStatsError(f"norm stats field {name!r} has shape {array.shape}; expected a 1-D list")
    if not np.isfinite(array).all():
        raise NormStatsError(f"norm stats field {name!r} contains NaN or inf; expected finite numbers")
    return array


def load_norm_stats(path) -> dict[str, NormStats]:
    """Load state and action statistics, returned as ``{"state": NormStats, "actions": NormStats}``.

    ``path`` is an openpi ``norm_stats.json`` (with or without the outer ``"norm_stats"`` level), a LeRobot
    stats JSON (``"observation.state"`` / ``"action"`` groups), a LeRobot ``.safetensors`` file with flat
    keys such as ``observation.state.mean``, or a directory holding exactly one ``norm_stats.json`` either
    directly or under ``assets/<asset_id>/``.
    """
    path = Path(path)
    if not path.exists():
        raise NormStatsError(
            f"norm stats path {path} does not exist; "
            "expected a norm_stats.json or .safetensors file, or a directory holding norm_stats.json"
        )
    if path.is_dir():
        path = _find_norm_stats_file(path)
    groups = _read_safetensors(path) if path.suffix == ".safetensors" else _read_json(path)
    return {name: _group_stats(groups, name, path) for name in _GROUP_KEYS}


def _find_norm_stats_file(directory: Path) -> Path:
    """Return the single ``norm_stats.json`` in ``directory`` or ``directory/assets/*/``."""
    candidates = [directory / "norm_stats.json"] if (directory / "norm_stats.json").is_file() else []
    candidates += sorted(directory.glob("assets/*/norm_stats.json"))
    if not candidates:
        raise NormStatsError(
            f"no norm stats found in {directory}; expected {directory}/norm_stats.json or "
            f"{directory}/assets/<asset_id>/norm_stats.json"
        )
    if len(candidates) > 1:
        listing = ", ".join(str(c) for c in candidates)
        raise NormStatsError(
            f"several norm stats files found in {directory}: {listing}; "
            "expected exactly one, pass the path of the one to use"
        )
    return candidates[0]


def asset_norm_stats_path(checkpoint_dir, asset_id: str) -> Path:
    """``<checkpoint_dir>/assets/<asset_id>/norm_stats.json``, where ``asset_id`` may span several folders
    (``physical-intelligence/libero``); a missing file is an error listing the asset ids the folder has."""
    directory = Path(checkpoint_dir)
    path = directory / "assets" / Path(*str(asset_id).split("/")) / "norm_stats.json"
    if path.is_file():
        return path
    found = sorted(str(p.parent.relative_to(directory / "assets")) for p in directory.glob("assets/**/norm_stats.json"))
    raise NormStatsError(
        f"no norm stats for asset id {asset_id!r}: {path} does not exist (asset ids in {directory}/assets: "
        f"{', '.join(found) or 'none'}); pass the stats file explicitly (norm_stats_path= / --norm-stats)"
    )


def _read_json(path: Path) -> dict:
    """Read a stats JSON file into ``{group: {field: values}}``, dropping an outer ``"norm_stats"`` level."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NormStatsError(
            f"cannot read norm stats JSON {path}: {exc}; expected a valid JSON file"
        ) from exc
    if isinstance(data, dict) and "norm_stats" in data:
        data = data["norm_stats"]
    if not isinstance(data, dict):
        raise NormStatsError(f"norm stats JSON {path} holds a {type(data).__name__}; expected an object")
    return data


def _read_safetensors(path: Path) -> dict:
    """Read flat LeRobot stats keys (``<group>.<field>``) into ``{group: {field: values}}``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise NormStatsError(
            f"cannot read norm stats safetensors {path}: {exc}; expected a valid safetensors file"
        ) from exc
    groups: dict[str, dict] = {}
    for key, tensor in tensors.items():
        group, _, field = key.rpartition(".")
        groups.setdefault(group, {})[field] = tensor.float().numpy()
    return groups


def _group_stats(groups: dict, name: str, path: Path) -> NormStats:
    """Build the NormStats of group ``name`` ("state" or "actions") from parsed ``groups``."""
    key = next((k for k in _GROUP_KEYS[name] if k in groups), None)
    if key is None:
        raise NormStatsError(
            f"norm stats {path} have no {name!r} entry (found keys {sorted(groups)}); "
            f"expected one of {list(_GROUP_KEYS[name])}"
        )
    entry = groups[key]
    if not isinstance(entry, dict):
        raise NormStatsError(
            f"norm stats entry {key!r} in {path} is a {type(entry).__name__}; expected an object of fields"
        )
    values = {field: entry.get(field) for field in _STAT_FIELDS}
    try:
        return NormStats(**values)
    except NormStatsError as exc:
        raise NormStatsError(f"norm stats entry {key!r} in {path}: {exc}") from exc


def normalize(x: np.ndarray, stats: NormStats, mode: str) -> np.ndarray:
    """Normalise ``(..., D)`` values in float32: z-score ``(x - mean) / (std + 1e-6)`` or quantile
    ``(x - q01) / (q99 - q01 + 1e-6) * 2 - 1``. D must equal the statistics' length."""
    first, second = _mode_fields(stats, mode)
    x = _as_float_array(x, "value to normalize")
    if x.shape[-1] != stats.dim:
        raise InputError(
            f"value to normalize has last dimension {x.shape[-1]} (shape {x.shape}); "
            f"expected {stats.dim} to match the norm stats"
        )
    if mode == "zscore":
        return (x - first) / (second + EPSILON)
    return (x - first) / (second - first + EPSILON) * 2.0 - 1.0


def unnormalize(x: np.ndarray, stats: NormStats, mode: str) -> np.ndarray:
    """Invert :func:`normalize` on the first ``len(stats)`` entries of the last axis of ``(..., D_model)``
    values (float32 result); the remaining (padded) dimensions are passed through unchanged."""
    first, second = _mode_fields(stats, mode)
    out = _as_float_array(x, "value to unnormalize").copy()
    if out.shape[-1] < stats.dim:
        raise InputError(
            f"value to unnormalize has last dimension {out.shape[-1]} (shape {out.shape}); "
            f"expected at least {stats.dim}, the norm stats length"
        )
    head = out[..., : stats.dim]
    if mode == "zscore":
        out[..., : stats.dim] = head * (second + EPSILON) + first
    else:
        out[..., : stats.dim] = (head + 1.0) / 2.0 * (second - first + EPSILON) + first
    return out


def _mode_fields(stats: NormStats, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Return the two statistics ``mode`` needs: (mean, std) for zscore, (q01, q99) for quantile."""
    if mode not in _MODE_FIELDS:
        raise ConfigError(f"unknown normalization mode {mode!r}; expected one of {NORM_MODES}")
    names = _MODE_FIELDS[mode]
    missing = [name for name in names if getattr(stats, name) is None]
    if missing:
        raise NormStatsError(
            f"norm stats lack {', '.join(missing)}, needed for {mode} normalization; "
            f"expected {' and '.join(names)} in the stats file"
        )
    return getattr(stats, names[0]), getattr(stats, names[1])


def _as_float_array(x, what: str) -> np.ndarray:
    """Return ``x`` as a finite float32 array of rank >= 1."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 0:
        raise InputError(f"{what} is a scalar; expected an array of shape (..., D)")
    if not np.isfinite(x).all():
        raise InputError(f"{what} contains NaN or inf; expected finite numbers")
    return x


def pad_to_dim(x: np.ndarray, dim: int) -> np.ndarray:
    """Zero-pad the last axis of ``(..., D)`` values to ``(..., dim)``, keeping their dtype."""
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[-1] > dim:
        raise InputError(
            f"value of shape {x.shape} cannot be zero-padded to last dimension {dim}; "
            f"expected shape (..., D) with D <= {dim}"
        )
    padding = [(0, 0)] * (x.ndim - 1) + [(0, dim - x.shape[-1])]
    return np.pad(x, padding)
