"""Deterministic random Pi0 / Pi0.5 checkpoints in the real on-disk formats (demo, tests, benchmarks).

Weights are drawn non-zero with a seeded generator: matrices ~ N(0, 1/fan_in), biases and norm
scales ~ N(0, 0.02^2) plus a small offset, so every tensor is exercised and nothing is zero.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from cortexflow.checkpoints.loader import MODEL_CONFIG_KEY
from cortexflow.checkpoints.pi0_layout import to_checkpoint_keys
from cortexflow.config import ModelConfig, VLAModelType
from cortexflow.models.pi0 import model_class


def tiny_model_config(model_type: "VLAModelType | str" = VLAModelType.PI0, **overrides) -> ModelConfig:
    """A small Pi0 / Pi0.5 with the real structure (224 px, 14 px patches, MQA, 256-token views) that
    runs on a CPU in milliseconds."""
    small = dict(
        vision_encoder_dim=48,
        num_vision_layers=2,
        num_vision_heads=4,
        vision_mlp_dim=96,
        encoder_dim=64,
        num_encoder_layers=2,
        encoder_mlp_dim=128,
        decoder_dim=32,
        num_decoder_layers=2,
        decoder_mlp_dim=64,
        num_heads=4,
        num_kv_heads=1,
        head_dim=16,
        vocab_size=320,
        action_dim=8,
        chunk_size=5,
        num_diffusion_steps=3,
    )
    small.update(overrides)
    return ModelConfig.for_model(model_type, **small)


def random_weights(
    config: ModelConfig,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: "torch.device | str | None" = None,
) -> dict[str, torch.Tensor]:
    """Canonical-name weights of ``config``'s model, drawn in fp32 with a generator seeded with ``seed``.

    ``device=None`` (or a CPU device) draws on the CPU with ``torch.Generator().manual_seed(seed)``;
    another device draws there with that device's generator (needed for the 3B real-size weights,
    which take minutes on a CPU). The same seed gives different values on different device types."""
    device = torch.device("cpu") if device is None else torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    weights = {}
    for name, shape in model_class(config.model_type)(config).get_weight_shapes().items():
        tensor = torch.randn(shape, generator=generator, device=device)
        if len(shape) >= 2 and name != "vision.pos" and name != "llm.embed":
            tensor /= math.sqrt(math.prod(shape[1:]))
        elif name in ("vision.pos", "llm.embed"):
            tensor *= 0.02
        else:
            tensor = tensor * 0.02 + 0.01
        weights[name] = tensor.to(dtype)
    return weights


def write_checkpoint(
    directory: str | Path,
    config: ModelConfig,
    seed: int = 0,
    layout: str = "openpi",
    dtype: torch.dtype = torch.float32,
    weights: dict[str, torch.Tensor] | None = None,
    write_config: bool = True,
) -> Path:
    """Write a random (or the given canonical) checkpoint as ``directory/model.safetensors``.

    ``layout="openpi"`` writes the openpi PyTorch keys plus the unused expert LM head; ``"lerobot"``
    writes ``model.``-prefixed keys and a LeRobot-style ``config.json``. Either ``config.json`` records the
    SigLIP head count as ``vision_config.num_attention_heads`` (the tensor shapes do not show it).
    ``write_config`` adds every ``ModelConfig`` field (its ``cortexflow_model_config`` entry), so the
    checkpoint loads with the written head counts, chunk and steps and no ``model_config``. Returns the
    directory."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = weights if weights is not None else random_weights(config, seed, dtype)
    state = to_checkpoint_keys(weights, config, layout)
    prefix = "model." if layout == "lerobot" else ""
    generator = torch.Generator().manual_seed(seed + 1)
    state[prefix + "paligemma_with_expert.gemma_expert.lm_head.weight"] = torch.randn(
        config.vocab_size, config.decoder_dim, generator=generator
    ).to(dtype)
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    checkpoint_config: dict = {"vision_config": {"num_attention_heads": config.num_vision_heads}}
    if layout == "lerobot":
        checkpoint_config.update({
            "type": config.model_type.value,
            "chunk_size": config.chunk_size,
            "n_action_steps": config.chunk_size,
            "num_inference_steps": config.num_diffusion_steps,
            "tokenizer_max_length": config.max_token_len,
            "max_action_dim": config.action_dim,
            "max_state_dim": config.action_dim,
        })
    elif write_config:  # what openpi's converter writes (informational there)
        checkpoint_config.update({"action_dim": config.action_dim, "action_horizon": config.chunk_size})
    if write_config:
        checkpoint_config[MODEL_CONFIG_KEY] = config.to_dict()
    (directory / "config.json").write_text(json.dumps(checkpoint_config, indent=2))
    return directory
