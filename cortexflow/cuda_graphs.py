"""Whole-call CUDA graph capture, shared by the engines (flow matching, token decoding, RT-1)."""

from __future__ import annotations

from typing import Any, Callable

import torch


def capture_cuda_graph(run: Callable[[], Any], device: torch.device, pool: Any = None,
                       warmup_runs: int = 2) -> "torch.cuda.CUDAGraph":
    """Capture ``run`` (which reads and writes only static buffers) as one CUDA graph on ``device``.

    ``run`` is called ``warmup_runs`` times on a side stream first (allocator and library warm-up, as
    capture requires), then once under capture; ``pool`` shares a memory pool between graphs that never
    replay at the same time. The caller restores any state the extra runs changed."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(warmup_runs):
            run()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        run()
    return graph
