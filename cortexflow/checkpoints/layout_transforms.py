"""Array transforms from Keras / Flax weight layouts to torch layouts, shared by the RT-1 TF2 and RT-1-X Flax readers.

Keras and Flax store a conv kernel as ``(kh, kw, in, out)`` (HWIO), a depthwise kernel as ``(kh, kw, C, 1)``,
a dense kernel as ``(in, ..., out)`` and attention projections as ``(D, heads, head_dim)`` (in) or
``(heads, head_dim, D)`` (out); torch wants ``(out, in, kh, kw)``, ``(C, 1, kh, kw)``, ``(out, in)``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

Transform = Callable[[np.ndarray], np.ndarray]


def same(a: np.ndarray) -> np.ndarray:
    """Unchanged (vectors, biases, norm statistics)."""
    return a


def conv(a: np.ndarray) -> np.ndarray:
    """HWIO conv kernel -> torch OIHW."""
    return a.transpose(3, 2, 0, 1)


def depthwise(a: np.ndarray) -> np.ndarray:
    """``(kh, kw, C, 1)`` depthwise kernel -> torch ``(C, 1, kh, kw)``."""
    return a.transpose(2, 3, 0, 1)


def dense(a: np.ndarray) -> np.ndarray:
    """``(in..., out)`` dense kernel (leading dims flattened, e.g. attention out ``(heads, head_dim, D)``) ->
    torch ``(out, in)``."""
    return a.reshape(-1, a.shape[-1]).T


def heads_in(a: np.ndarray) -> np.ndarray:
    """``(D, heads, head_dim)`` attention input kernel -> torch ``(heads * head_dim, D)``."""
    return a.reshape(a.shape[0], -1).T


def flat(a: np.ndarray) -> np.ndarray:
    """Any shape -> 1-D (per-head biases ``(heads, head_dim)``)."""
    return a.reshape(-1)


def match_variables(shapes, mapping, wanted, report) -> dict[str, tuple[str, Transform]]:
    """``{canonical name: (stored name, transform)}`` for every entry of ``mapping`` (canonical name ->
    ``(stored name, transform)``) whose stored variable exists in ``shapes`` and, transformed, has the shape
    ``wanted`` gives; the others go to ``report.missing`` / ``report.mis_shaped``."""
    sources = {}
    for name, (full, transform) in mapping.items():
        if full not in shapes:
            report.missing.append(full)
            continue
        stored = tuple(shapes[full])
        got = transform(np.empty(stored, dtype=np.uint8)).shape
        if tuple(got) != wanted[name]:
            report.mis_shaped.append(f"{full} {stored} (expected {name} {wanted[name]} in torch layout)")
            continue
        sources[name] = (full, transform)
    return sources
