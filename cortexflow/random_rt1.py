"""Random RT-1 weights for tests, benchmarks and demos (no checkpoint files).

Weights are drawn with 1/sqrt(fan-in) scaling (FiLM projections smaller), then every batch norm's
running mean and variance are set to the statistics of a batch of random frames at that point of the
network, so activations keep unit scale through the tokenizer and the image reaches the action tokens.
"""

from __future__ import annotations

import math

import torch

from cortexflow.backends.pytorch import PyTorchBackend
from cortexflow.models.rt1 import RT1Config, RT1Model


class _CalibratingBackend(PyTorchBackend):
    """Sets each batch norm's running statistics (in place) to those of the batch it normalises."""

    def batch_norm(self, x, mean, var, gamma, beta, eps):
        mean.copy_(x.float().mean(dim=(0, 2, 3)))
        var.copy_(x.float().var(dim=(0, 2, 3), unbiased=False))
        return super().batch_norm(x, mean, var, gamma, beta, eps)


def tiny_rt1_config(**overrides) -> RT1Config:
    """A small RT-1 of the same structure (10 MBConv blocks, 2 layers, 3 frames) that runs on CPU in
    well under a second per step."""
    base = dict(image_size=48, input_size=(40, 56), width=0.1, depth=0.3, embedding_dim=16, context_dim=12,
                num_tokens=3, token_learner_dim=6, num_layers=2, d_model=16, num_heads=2, head_dim=4, time_steps=3)
    base.update(overrides)
    return RT1Config(**base)


def random_rt1_weights(model: RT1Model, seed: int = 0, device: str | torch.device = "cpu",
                       calibration_frames: int = 8) -> dict[str, torch.Tensor]:
    """fp32 canonical weights for ``model`` on ``device`` (see the module docstring)."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    weights = {}
    for name, shape in model.get_weight_shapes().items():
        w = torch.randn(shape, generator=g, device=device)
        if len(shape) >= 2:
            w = w / math.sqrt(math.prod(shape[1:])) * (0.2 if ".film." in name else 1.0)
        elif name.endswith((".var", ".variance")):
            w = 0.5 + torch.rand(shape, generator=g, device=device)
        elif name.endswith((".gamma", "norm.weight")):
            w = 1.0 + 0.2 * w
        else:
            w = 0.1 * w
        weights[name] = w
    c = model.config
    frames = {"images": torch.rand(calibration_frames, 3, *c.input_size, generator=g, device=device),
              "context": torch.randn(calibration_frames, c.context_dim, generator=g, device=device)}
    with torch.no_grad():
        model.vision_encoder(_CalibratingBackend(device, torch.float32), weights, frames)
    return weights
