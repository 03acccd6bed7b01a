"""Real-time chunking (Black, Galliker, Levine 2025, "Real-Time Execution of Action Chunking Flow Policies").

While the robot still executes the previous chunk, the next one is sampled with guided inpainting: at
every Euler step the velocity is corrected so that the predicted clean chunk agrees with the actions of
the previous chunk that the robot will still execute. The paper writes its flow with ``tau`` running from
0 (noise) to 1 (data) and ``dA/dtau = v_pi``; openpi's Pi0 runs ``t = 1 - tau`` from 1 to 0 with
``v = dx/dt = -v_pi``. In that convention, at each step (Algorithm 1 of the paper):

* predicted clean chunk ``x0(x_t) = x_t - t * v(x_t, t)``;
* weighted error ``e = W * (Y - x0(x_t))`` (``W`` over the chunk's time axis, see :func:`prefix_weights`);
* guidance ``g = e^T d x0 / d x_t`` (a vector-Jacobian product through the action expert);
* guidance weight ``w = min(beta, (1 - tau) / (tau * r^2))`` with ``r^2 = (1 - tau)^2 / (tau^2 + (1 - tau)^2)``,
  i.e. ``w = min(beta, (t^2 + (1 - t)^2) / (t * (1 - t)))``;
* guided velocity ``v - w * g`` (the paper's ``v_pi + w * g`` with the sign of ``v`` flipped).

``jacobian="identity"`` takes ``d x0 / d x_t`` as the identity, so ``g = e``: no backward pass through the
expert, as LeRobot 0.6.1's ``RTCProcessor`` computes it (it evaluates ``v`` before ``x_t`` requires grad).

Everything here is fp32; the velocity may be computed in any dtype and is upcast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from cortexflow.errors import ConfigError
from cortexflow.models.flow_matching import euler_integrate

SCHEDULES = ("exp", "linear", "ones", "zeros")
JACOBIANS = ("vjp", "identity")


@dataclass(frozen=True)
class RTCConfig:
    """How a guided chunk follows the previous one.

    ``max_guidance_weight``: the clip ``beta`` of the guidance weight (the paper uses 5; 0 turns guidance
    off and gives plain sampling). ``schedule``: the soft mask over the overlap after the first
    ``inference_delay`` actions — ``"exp"`` (the paper's), ``"linear"``, ``"ones"`` (hard mask over the whole
    overlap) or ``"zeros"`` (only the first ``inference_delay`` actions are guided). ``jacobian``: ``"vjp"`` (the
    paper's guidance through the expert's vector-Jacobian product) or ``"identity"`` (``d x0 / d x_t`` taken
    as the identity, LeRobot's variant: no backward pass)."""

    max_guidance_weight: float = 5.0
    schedule: str = "exp"
    jacobian: str = "vjp"

    def __post_init__(self) -> None:
        beta = self.max_guidance_weight
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 0:
            raise ConfigError(f"RTCConfig.max_guidance_weight must be a finite number >= 0, got {beta!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"RTCConfig.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.jacobian not in JACOBIANS:
            raise ConfigError(f"RTCConfig.jacobian must be one of {', '.join(JACOBIANS)}, got {self.jacobian!r}")


def prefix_weights(chunk_size: int, inference_delay: int, overlap_end: int, schedule: str = "exp") -> torch.Tensor:
    """The guidance mask ``W`` ``(chunk_size,)`` fp32 over the new chunk's time axis.

    ``W_i = 1`` for ``i < inference_delay`` (actions the robot executes from the previous chunk while this one
    is computed), a soft weight for ``inference_delay <= i < overlap_end`` and 0 from ``overlap_end`` on
    (``overlap_end`` = the number of previous actions left, the paper's ``H - s``). With
    ``c_i = (overlap_end - i) / (overlap_end - inference_delay + 1)``: ``"exp"`` gives
    ``c_i * (e^{c_i} - 1) / (e - 1)``, ``"linear"`` ``c_i``, ``"ones"`` 1 and ``"zeros"`` 0."""
    if not 0 <= inference_delay <= overlap_end <= chunk_size:
        raise ValueError(f"need 0 <= inference_delay ({inference_delay}) <= overlap_end ({overlap_end}) <= chunk ({chunk_size})")
    i = torch.arange(chunk_size, dtype=torch.float64)
    c = (overlap_end - i) / (overlap_end - inference_delay + 1)
    soft = {
        "exp": c * torch.expm1(c) / math.expm1(1.0),
        "linear": c,
        "ones": torch.ones_like(c),
        "zeros": torch.zeros_like(c),
    }[schedule]
    weights = torch.where(i < inference_delay, torch.ones_like(c), torch.where(i < overlap_end, soft, torch.zeros_like(c)))
    return weights.to(torch.float32)


def guidance_weight(t: float, max_guidance_weight: float) -> float:
    """``min(beta, (t^2 + (1 - t)^2) / (t (1 - t)))`` at openpi time ``t`` (infinite at t = 0 and 1: ``beta``)."""
    if t <= 0.0 or t >= 1.0:
        return float(max_guidance_weight)
    return float(min(max_guidance_weight, (t * t + (1.0 - t) ** 2) / (t * (1.0 - t))))


@dataclass
class ChunkGuidance:
    """The previous chunk as a guidance target for one call.

    ``target``: ``(B, H, A)`` fp32 previous actions in model space (normalised, padded to the model's action
    dim); ``weights``: ``(B, H, A)`` fp32, :func:`prefix_weights` along the chunk for the guided action dims
    and 0 elsewhere (rows past the overlap, dims the previous chunk did not give). Both on the model's device.
    ``jacobian``: see :class:`RTCConfig`."""

    target: torch.Tensor
    weights: torch.Tensor
    max_guidance_weight: float
    jacobian: str = "vjp"

    def velocity(self, velocity: Callable[[torch.Tensor, float], torch.Tensor], x_t: torch.Tensor, t: float) -> torch.Tensor:
        """The guided velocity ``v - w * g`` at ``(x_t, t)`` (fp32, ``x_t``'s shape).

        ``v`` is evaluated once, with autograd on for ``x_t`` only; ``g`` is its vector-Jacobian product
        (``jacobian="vjp"``) or the weighted error itself (``"identity"``, ``v`` evaluated without autograd)."""
        if self.jacobian == "identity":
            return self.guide(velocity(x_t, t), x_t, t)
        weight = guidance_weight(t, self.max_guidance_weight)
        with torch.enable_grad():
            x = x_t.detach().float().requires_grad_(True)
            v = velocity(x, t).float()
            if weight == 0.0:
                return v.detach()
            clean = x - t * v
            error = (self.target - clean.detach()) * self.weights
            (grad,) = torch.autograd.grad(clean, x, error)
        return v.detach() - weight * grad


    def guide(self, v: torch.Tensor, x_t: torch.Tensor, t: float) -> torch.Tensor:
        """The identity-Jacobian guided velocity ``v - w * W * (Y - (x_t - t * v))`` (fp32) from an already
        evaluated ``v (B, H, A)``: no autograd, so any backend's fused denoising loop can apply it per step."""
        weight = guidance_weight(t, self.max_guidance_weight)
        v = v.float()
        if weight == 0.0:
            return v
        return v - weight * (self.target - (x_t.float() - t * v)) * self.weights


def guided_euler_integrate(
    velocity: Callable[[torch.Tensor, float], torch.Tensor],
    noise: torch.Tensor,
    num_steps: int,
    guidance: ChunkGuidance,
) -> torch.Tensor:
    """:func:`~cortexflow.models.flow_matching.euler_integrate` with each step's velocity guided towards
    ``guidance.target`` (same schedule, same fp32 accumulation); returns ``x(0)`` fp32."""
    return euler_integrate(lambda x, t: guidance.velocity(velocity, x, t), noise, num_steps)
