"""Normalisation of one feature (the state or the actions) in a named mode, with openpi's or LeRobot's numerics.

Modes are LeRobot's names; openpi uses ``MEAN_STD`` for Pi0 and ``QUANTILES`` for Pi0.5. Values are ``(..., D)``
float arrays, statistics 1-D. The two conventions differ (``docs/reference_facts.md#F-OP-6`` and ``F-LR-4``):

============ ======================================================= ====================================================
mode         openpi (eps 1e-6, always added)                         LeRobot (eps 1e-8 by default)
============ ======================================================= ====================================================
MEAN_STD     (x - mean) / (std + eps); back: x (std + eps) + mean    (x - mean) / (std + eps); back: x std + mean
QUANTILES    2 (x - q01) / (q99 - q01 + eps) - 1; back inverts it     2 (x - q01) / R - 1, R = q99 - q01, R = eps where 0
MIN_MAX      -                                                       as QUANTILES with min / max
QUANTILE10   -                                                       as QUANTILES with q10 / q90
IDENTITY     x                                                       x
============ ======================================================= ====================================================

openpi normalises with the statistics truncated to the value's width (older 32-long stats work with an 8-long
state) and un-normalises the first ``len(stats)`` dimensions, passing the rest (the zero-padding) through.
LeRobot's value and statistics have one width.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cortexflow.errors import ConfigError, InputError, NormStatsError
from cortexflow.processing.normalization import NormStats, normalize, unnormalize

NORM_MODES = ("IDENTITY", "MEAN_STD", "MIN_MAX", "QUANTILES", "QUANTILE10")
CONVENTIONS = {"openpi": 1e-6, "lerobot": 1e-8}
MODE_FIELDS = {"MEAN_STD": ("mean", "std"), "MIN_MAX": ("min", "max"), "QUANTILES": ("q01", "q99"),
               "QUANTILE10": ("q10", "q90"), "IDENTITY": ()}
_OPENPI_MODES = {"MEAN_STD": "zscore", "QUANTILES": "quantile", "IDENTITY": None}


@dataclass(frozen=True)
class FeatureNormalizer:
    """(Un-)normalises one feature (``feature`` names it in messages: ``"state"``, ``"actions"``)."""

    feature: str
    mode: str
    stats: NormStats | None
    convention: str = "openpi"
    eps: float | None = None

    def __post_init__(self) -> None:
        mode = str(self.mode).upper()
        object.__setattr__(self, "mode", mode)
        if mode not in NORM_MODES:
            raise ConfigError(f"unknown normalisation mode {self.mode!r} for {self.feature}; expected one of {NORM_MODES}")
        if self.convention not in CONVENTIONS:
            raise ConfigError(f"unknown normalisation convention {self.convention!r}; expected one of {list(CONVENTIONS)}")
        if self.convention == "openpi" and mode not in _OPENPI_MODES:
            raise ConfigError(f"openpi normalises with MEAN_STD or QUANTILES, not {mode}")
        if self.eps is None:
            object.__setattr__(self, "eps", CONVENTIONS[self.convention])
        if mode != "IDENTITY":
            if self.stats is None:
                raise NormStatsError(f"{mode} normalisation of the {self.feature} needs statistics but none were found")
            missing = [name for name in MODE_FIELDS[mode] if getattr(self.stats, name) is None]
            if missing:
                raise NormStatsError(
                    f"the {self.feature} statistics lack {', '.join(missing)}, needed for {mode} normalisation; "
                    f"the stats file must hold {' and '.join(MODE_FIELDS[mode])} for the {self.feature}"
                )

    @property
    def dim(self) -> int | None:
        """Width the statistics cover (None for IDENTITY without statistics)."""
        return None if self.stats is None else self.stats.dim

    def describe(self) -> str:
        if self.mode == "IDENTITY":
            return "identity"
        fields = "/".join(MODE_FIELDS[self.mode])
        return f"{self.mode} ({fields}, {self.convention} eps {self.eps:g}, {self.dim} dims)"

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """Normalised ``(..., D)`` float32 values."""
        x = np.asarray(x, dtype=np.float32)
        if self.mode == "IDENTITY":
            return x
        width = x.shape[-1]
        if self.convention == "openpi":
            if width > self.dim:
                raise InputError(
                    f"the {self.feature} has {width} values but its norm stats cover {self.dim}; "
                    f"pass a {self.feature} of at most {self.dim} values"
                )
            return normalize(x, self._truncated(width), _OPENPI_MODES[self.mode]).astype(np.float32)
        self._check_width(width)
        low, high = self._pair()
        if self.mode == "MEAN_STD":
            return ((x - low) / (high + self.eps)).astype(np.float32)
        return (2.0 * (x - low) / self._range() - 1.0).astype(np.float32)

    def unnormalize(self, x: np.ndarray) -> np.ndarray:
        """Values in the feature's units from normalised ``(..., W)`` float32 values."""
        x = np.asarray(x, dtype=np.float32)
        if self.mode == "IDENTITY":
            return x
        width = x.shape[-1]
        if self.convention == "openpi":
            stats = self._truncated(min(width, self.dim))
            return unnormalize(x, stats, _OPENPI_MODES[self.mode]).astype(np.float32)
        self._check_width(width)
        low, high = self._pair()
        if self.mode == "MEAN_STD":
            return (x * high + low).astype(np.float32)
        return ((x + 1.0) / 2.0 * self._range() + low).astype(np.float32)

    def _check_width(self, width: int) -> None:
        if width != self.dim:
            raise InputError(
                f"the {self.feature} has {width} values but its norm stats cover {self.dim}; expected {self.dim}"
            )

    def _pair(self) -> tuple[np.ndarray, np.ndarray]:
        first, second = MODE_FIELDS[self.mode]
        return getattr(self.stats, first), getattr(self.stats, second)

    def _range(self) -> np.ndarray:
        low, high = self._pair()
        spread = high - low
        return np.where(spread == 0, np.float32(self.eps), spread).astype(np.float32)

    def _truncated(self, width: int) -> NormStats:
        fields = {name: getattr(self.stats, name) for name in MODE_FIELDS[self.mode]}
        return NormStats(**{name: value[:width] for name, value in fields.items()})
