"""Shared helpers for the Triton kernels: interpreter detection and launch checks."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

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


@dataclass(frozen=True)
class CompileTarget:
    """A GPU to compile the kernels for without having one (``cortexflow compile-check``): its compute
    capability as ``major * 10 + minor`` (90: Hopper) and its SM count. While one is set, launch wrappers
    given ``meta`` tensors choose their grids and options for it."""

    arch: int = 90
    processors: int = 132


_compile_target: CompileTarget | None = None


def set_compile_target(target: CompileTarget | None) -> CompileTarget | None:
    """Make ``target`` the GPU that ``meta`` tensors stand for (None: none); returns the previous one."""
    global _compile_target
    previous, _compile_target = _compile_target, target
    return previous


def compile_target(device: torch.device) -> CompileTarget | None:
    """The :class:`CompileTarget` that ``device`` stands for: set, and ``device`` is ``meta``; else None."""
    return _compile_target if device.type == "meta" else None


def compute_capability(device: torch.device) -> int | None:
    """``major * 10 + minor`` of a CUDA ``device`` (90: Hopper), or of the compile target a ``meta`` device
    stands for; None elsewhere (CPU, interpreter)."""
    target = compile_target(device)
    if target is not None:
        return target.arch
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(_cuda_index(device))
    return 10 * major + minor


def processor_count(device: torch.device) -> int:
    """SMs of a CUDA ``device`` (asked of the driver once per device) or of the compile target a ``meta``
    device stands for; 1 elsewhere."""
    target = compile_target(device)
    if target is not None:
        return target.processors
    if device.type == "cuda":
        return _cuda_processor_count(_cuda_index(device))
    return 1


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def _cuda_processor_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


_ARRIVAL_COUNTERS: dict[torch.device, torch.Tensor] = {}
_MIN_COUNTERS = 4096


def arrival_counters(device: torch.device, count: int) -> torch.Tensor:
    """Zeroed int32 arrival counters for kernels whose last-arriving program finishes a tile (the fused
    attention combine, split-K GEMMs), kept per device and reused by every launch: the finishing
    program resets its counter, so all are zero again when a launch ends. Grows, never shrinks; first
    allocated outside a CUDA graph capture by the engine's warm-up call. One set per device: two such
    launches running at the same time on different streams of one GPU would share counters (CortexFlow
    runs one engine per GPU, one call at a time)."""
    counters = _ARRIVAL_COUNTERS.get(device)
    if counters is None or counters.numel() < count:
        counters = torch.zeros(max(count, _MIN_COUNTERS), dtype=torch.int32, device=device)
        _ARRIVAL_COUNTERS[device] = counters
    return counters
