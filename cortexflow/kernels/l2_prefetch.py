"""Bulk prefetches into L2 (Hopper), for kernels that leave HBM idle before a kernel that streams weights.

A token VLA's decode layer is a chain of weight streams (the GEMVs) with one latency-bound kernel in between:
the attention reads a few MB of K/V in several microseconds while HBM could deliver ~3 MB a microsecond. The
attention's programs can ask L2 to pull in the next GEMV's weight meanwhile (``cp.async.bulk.prefetch.L2``:
fire and forget, no registers, no shared memory; the requests finish after the kernel ends if they must),
so that the GEMV reads those bytes at L2's rate. Weights are never written by the chain, so the prefetch may
be issued before the kernel's programmatic-dependent-launch wait (:mod:`cortexflow.kernels.pdl`).

:func:`prefetch_l2` is the device side (a program's share); :class:`L2Prefetch` the host side (the tensor cut
into equal, 16-byte aligned shares, one per program). Compute capability 9.0 or later only, never under the
interpreter (inline PTX): :func:`l2_prefetch_supported`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from cortexflow.kernels.runtime import compute_capability, interpreting

#: Bulk prefetches a program issues (one per thread of a 4-warp program).
CHUNKS = 128
_CHUNKS = tl.constexpr(CHUNKS)
#: The bulk prefetch's alignment of addresses and sizes, in bytes.
ALIGNMENT = 16


def l2_prefetch_supported(device: torch.device) -> bool:
    """Whether kernels on ``device`` can issue bulk L2 prefetches: compute capability 9.0 or later (or a
    ``meta`` device standing for such a compile target), not under the Triton interpreter."""
    if interpreting():
        return False
    capability = compute_capability(device)
    return capability is not None and capability >= 90


class L2Prefetch(NamedTuple):
    """What a launch of ``programs`` programs prefetches: program ``p`` asks for bytes
    ``[p * share, (p + 1) * share)`` of the tensor at ``base`` (``share`` a multiple of ``CHUNKS * 16``; the
    tail past ``programs * share`` is left out)."""

    base: torch.Tensor
    share: int

    @classmethod
    def of(cls, tensor: torch.Tensor | None, programs: int, fraction: float = 1.0) -> "L2Prefetch | None":
        """The first ``fraction`` of the contiguous ``tensor``'s bytes in equal shares over ``programs``; None when
        there is nothing to prefetch (no tensor, a device without bulk prefetches, an address not 16-byte aligned,
        or less than one ``CHUNKS * 16``-byte share a program)."""
        if tensor is None or fraction <= 0 or not tensor.is_contiguous() or not l2_prefetch_supported(tensor.device):
            return None
        if tensor.device.type != "meta" and tensor.data_ptr() % ALIGNMENT:
            return None
        step = CHUNKS * ALIGNMENT
        share = int(tensor.numel() * tensor.element_size() * min(fraction, 1.0)) // max(1, programs) // step * step
        return cls(tensor, share) if share > 0 else None


@triton.jit
def prefetch_l2(base_ptr, program, share):
    """Ask L2 for bytes ``[program * share, (program + 1) * share)`` after ``base_ptr`` (any pointer type,
    16-byte aligned; ``share`` a multiple of ``CHUNKS * 16``), as ``CHUNKS`` bulk prefetches. Nothing waits for
    them."""
    chunk = share // _CHUNKS
    addrs = base_ptr.to(tl.pointer_type(tl.int8)) + program.to(tl.int64) * share + tl.arange(0, _CHUNKS) * chunk
    sizes = tl.full([_CHUNKS], 0, tl.int32) + chunk.to(tl.int32)
    tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2;\n mov.u32 $0, 0;", "=r,l,r",
                              [addrs, sizes], dtype=tl.int32, is_pure=False, pack=1)


__all__ = ["ALIGNMENT", "CHUNKS", "L2Prefetch", "l2_prefetch_supported", "prefetch_l2"]
