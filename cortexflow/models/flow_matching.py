"""Flow-matching sampling as openpi does it: t runs from 1 (noise) to 0 (data) in Euler steps."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch


def euler_times(num_steps: int) -> list[float]:
    """The times at which the velocity is evaluated: 1.0, 1-1/N, ... accumulated in fp32 as openpi does.

    openpi loops ``while t >= -dt/2: ...; t = t + dt`` with fp32 ``t``; that is exactly ``num_steps`` steps."""
    dt = np.float32(-1.0 / num_steps)
    t = np.float32(1.0)
    times = []
    while t >= -dt / 2:
        times.append(float(t))
        t = np.float32(t + dt)
    return times


def euler_integrate(
    velocity: Callable[[torch.Tensor, float], torch.Tensor], noise: torch.Tensor, num_steps: int
) -> torch.Tensor:
    """Integrate ``dx/dt = velocity(x, t)`` from ``x(1) = noise`` to ``t = 0`` with ``num_steps`` Euler steps.

    ``x`` is kept in fp32 whatever the velocity's dtype; returns ``x(0)`` in fp32."""
    dt = float(np.float32(-1.0 / num_steps))
    x = noise.float()
    for t in euler_times(num_steps):
        x = x + dt * velocity(x, t).float()
    return x


def sinusoidal_time_embedding(
    t: float, dim: int, batch: int, device: torch.device, min_period: float = 4e-3, max_period: float = 4.0
) -> torch.Tensor:
    """Sin/cos embedding of time ``t``: ``(batch, dim)`` fp32, sine half first.

    ``period_i = min_period * (max_period/min_period) ** (i / (dim/2 - 1))``; computed in fp64."""
    half = dim // 2
    fraction = torch.linspace(0.0, 1.0, half, dtype=torch.float64, device=device)
    period = min_period * (max_period / min_period) ** fraction
    angle = (2.0 * math.pi / period) * t
    emb = torch.cat([torch.sin(angle), torch.cos(angle)]).to(torch.float32)
    return emb[None, :].expand(batch, dim)
