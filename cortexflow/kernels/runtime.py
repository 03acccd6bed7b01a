"""Shared helpers for the Triton kernels: interpreter detection and launch checks."""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def upcast_dots(dtype: torch.dtype) -> bool:
    """Whether ``tl.dot`` inputs must be cast to fp32 first: the interpreter gets bf16 arithmetic wrong."""
    return interpreting() and dtype == torch.bfloat16


def next_power_of_two(n: int) -> int:
    """Smallest power of two >= n (Triton block sizes must be powers of two)."""
    return 1 << (max(1, n) - 1).bit_length()
