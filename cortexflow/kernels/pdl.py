"""Programmatic dependent launch (PDL) for chains of small kernels on Hopper and later.

A decode step is a chain of short kernels (GEMV, QKV/RoPE, attention, GEMV, ...), each waiting for the
one before: between two of them the GPU drains the first kernel's last programs, then launches the
next one, whose programs then wait for their first loads. With PDL (a kernel launched with
``launch_pdl=True``) the next kernel's programs may become resident while the previous kernel still
runs, do the work that does not depend on it (a GEMV loads its first weight chunk), and block in
``griddepcontrol.wait`` until the previous kernel has finished and its writes are visible.

Rules every kernel with ``PDL`` set follows (they keep the chain exactly as ordered as without PDL):
- :func:`pdl_release` first: the next kernel in the stream may be launched once every program of this
  one has started (it still waits for this one to finish before it touches its results);
- before :func:`pdl_wait`: only loads of data no kernel of the chain writes (weights), or data written before
  the last kernel launched without PDL (whose dependants start only after it has finished: a decode step's
  attention with ``fresh_row`` loads its KV cache so, :func:`cortexflow.kernels.attention.attention`); no stores.
After the wait everything the previous kernels wrote is visible, and since each of them also waited for
its predecessor, so is everything before it.

A kernel with ``PDL`` off compiles neither instruction (the interpreter has no inline assembly).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from cortexflow.kernels.runtime import compute_capability, interpreting


def pdl_supported(device: torch.device) -> bool:
    """Whether kernels on ``device`` can be launched with PDL: a CUDA GPU of compute capability 9.0 or
    later (or a ``meta`` device standing for such a compile target), not under the Triton interpreter."""
    if interpreting():
        return False
    capability = compute_capability(device)
    return capability is not None and capability >= 90


def launch_options(pdl: bool) -> dict:
    """Extra keyword arguments of a Triton launch: ``launch_pdl=True`` when ``pdl`` (nothing otherwise,
    so the interpreter, which has no PDL, never sees the option)."""
    return {"launch_pdl": True} if pdl else {}


@triton.jit
def pdl_release(PDL: tl.constexpr):
    """Let the next kernel of the stream launch (``griddepcontrol.launch_dependents``) when ``PDL``."""
    if PDL:
        gdc_launch_dependents()


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Block until the previous kernel of the stream has finished and its writes are visible
    (``griddepcontrol.wait``) when ``PDL``."""
    if PDL:
        gdc_wait()
