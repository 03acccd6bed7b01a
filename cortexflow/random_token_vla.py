"""Deterministic random OpenVLA and RT-2-style checkpoints in the real on-disk formats (demo, tests, benchmarks).

OpenVLA: a Hugging Face folder with ``model.safetensors.index.json`` + shards, ``config.json`` (with
``norm_stats`` and ``text_config``) and, optionally, ``dataset_statistics.json``, including the tensors
real checkpoints carry but never use (the last block of each tower, the towers' final norms, SigLIP's
attention-pool head). RT-2 style: an openpi PyTorch / LeRobot Pi0 ``model.safetensors`` plus the
language model's final norm, of which the policy reads the PaliGemma part.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import torch

from cortexflow.config import ModelConfig
from cortexflow.models.openvla import OpenVLAConfig, OpenVLAModel
from cortexflow.models.rt2 import RT2Config

TINY_OPENVLA = dict(
    dino_dim=128, dino_heads=2, dino_mlp_dim=256, dino_layers=3, dino_registers=4,
    siglip_dim=144, siglip_heads=2, siglip_mlp_dim=288, siglip_layers=3,
    projector_dim=256, llm_dim=64, llm_layers=2, num_heads=4, num_kv_heads=4, head_dim=16, llm_mlp_dim=128,
    vocab_size=384, pad_to_multiple_of=64, max_text_tokens=64, space_token_id=259,
)


def tiny_openvla_config(**overrides: Any) -> OpenVLAConfig:
    """A small OpenVLA with the real structure (224 px, 14 px patches, 256 image tokens, DINOv2 and SigLIP
    head widths 64 / 72, a 320-id text vocabulary padded by 64) that runs on a CPU in milliseconds."""
    return OpenVLAConfig(**{**TINY_OPENVLA, **overrides})


def tiny_rt2_config(**overrides: Any) -> RT2Config:
    """A small RT-2-style policy over the tiny Pi0 backbone (vocabulary 640, room for 256 bins + 128 specials)."""
    from cortexflow.random_checkpoint import tiny_model_config

    own = {k: overrides.pop(k) for k in ("action_dim", "chunk_size", "n_action_bins", "max_text_tokens",
                                         "prompt_template") if k in overrides}
    backbone = tiny_model_config("pi0", **{"vocab_size": 640, **overrides})
    return RT2Config(paligemma=backbone, **{"action_dim": 3, "chunk_size": 2, "max_text_tokens": 64, **own})


def _draw(name: str, shape: tuple[int, ...], generator: torch.Generator, device, dtype) -> torch.Tensor:
    """Non-zero random values by role: norm scales near 1, LayerScale near 0.5, embeddings small,
    matrices ~ N(0, 1/fan_in), biases ~ N(0.01, 0.02^2)."""
    t = torch.randn(shape, generator=generator, device=device)
    if (name.endswith(("norm1.weight", "norm2.weight", "ln1.weight", "ln2.weight", "post_ln.weight"))
            or name == "llm.norm" or name.endswith(("attn_norm", "mlp_norm"))):
        t = 1.0 + 0.1 * t
    elif name.endswith((".ls1", ".ls2")):
        t = 0.5 + 0.1 * t
    elif name.endswith((".pos", ".cls", ".reg")):
        t = 0.02 * t
    elif name == "llm.embed":
        t = 0.5 * t
    elif len(shape) >= 2:
        t = t / math.sqrt(math.prod(shape[1:]))
    else:
        t = 0.02 * t + 0.01
    return t.to(dtype)


def random_openvla_weights(config: OpenVLAConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
                           device: "torch.device | str | None" = None) -> dict[str, torch.Tensor]:
    """Canonical-name OpenVLA weights drawn with a generator seeded with ``seed`` on ``device`` (default CPU)."""
    device = torch.device("cpu") if device is None else torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    return {name: _draw(name, shape, generator, device, dtype)
            for name, shape in OpenVLAModel(config).get_weight_shapes().items()}


def random_rt2_weights(config: RT2Config, seed: int = 0, dtype: torch.dtype = torch.float32,
                       device: "torch.device | str | None" = None) -> dict[str, torch.Tensor]:
    """Canonical-name RT-2-style weights (SigLIP, projector, Gemma with its final norm), drawn like
    :func:`random_openvla_weights` with a generator seeded with ``seed`` on ``device`` (default CPU)."""
    from cortexflow.models.rt2 import RT2Model

    device = torch.device("cpu") if device is None else torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    return {name: _draw(name, shape, generator, device, dtype)
            for name, shape in RT2Model(config).get_weight_shapes().items()}


def example_norm_stats(action_dim: int = 7, datasets: tuple[str, ...] = ("bridge_orig",)) -> dict[str, Any]:
    """OpenVLA-style ``norm_stats``: per dataset q01/q99 and a mask with the last (gripper) dim false."""
    out = {}
    for k, name in enumerate(datasets):
        q01 = [-0.02 * (i + 1) - 0.01 * k for i in range(action_dim)]
        q99 = [0.03 * (i + 1) + 0.01 * k for i in range(action_dim)]
        mask = [True] * (action_dim - 1) + [False]
        out[name] = {"action": {"q01": q01, "q99": q99, "mask": mask, "mean": [0.0] * action_dim,
                                "std": [1.0] * action_dim, "min": q01, "max": q99},
                     "num_transitions": 1000 + k, "num_trajectories": 10 + k}
    return out


def write_openvla_checkpoint(
    directory: str | Path,
    config: OpenVLAConfig,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    num_shards: int = 2,
    norm_stats: Mapping[str, Any] | None = None,
    dataset_statistics: Mapping[str, Any] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a random (or the given canonical) OpenVLA as a sharded Hugging Face folder; returns it.

    ``norm_stats`` goes into ``config.json`` (default: one ``bridge_orig`` entry); ``dataset_statistics``,
    when given, is written to ``dataset_statistics.json``."""
    from safetensors.torch import save_file

    from cortexflow.checkpoints.openvla_layout import FEATURIZER, FUSED, to_hf_keys

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = weights if weights is not None else random_openvla_weights(config, seed)
    state = to_hf_keys(weights, config)
    generator = torch.Generator().manual_seed(seed + 1)
    extra = lambda *shape: torch.randn(*shape, generator=generator) * 0.02  # noqa: E731
    for root, dim, mlp, last in ((FEATURIZER, config.dino_dim, config.dino_mlp_dim, config.dino_layers - 1),
                                 (FUSED, config.siglip_dim, config.siglip_mlp_dim, config.siglip_layers - 1)):
        state[f"{root}norm.weight"], state[f"{root}norm.bias"] = extra(dim), extra(dim)
        for name, shape in (("norm1", (dim,)), ("attn.qkv", (3 * dim, dim)), ("attn.proj", (dim, dim)),
                            ("norm2", (dim,)), ("mlp.fc1", (mlp, dim)), ("mlp.fc2", (dim, mlp))):
            state[f"{root}blocks.{last}.{name}.weight"] = extra(*shape)
            state[f"{root}blocks.{last}.{name}.bias"] = extra(shape[0])
        if root == FEATURIZER:
            state[f"{root}blocks.{last}.ls1.scale_factor"] = extra(dim)
            state[f"{root}blocks.{last}.ls2.scale_factor"] = extra(dim)
        else:
            state[f"{root}attn_pool.latent"] = extra(1, 1, dim)
            state[f"{root}attn_pool.kv.weight"] = extra(2 * dim, dim)
    names = sorted(state)
    per_shard = -(-len(names) // num_shards)
    weight_map = {}
    for s in range(num_shards):
        shard = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
        chunk = {n: state[n].to(dtype).contiguous() for n in names[s * per_shard:(s + 1) * per_shard]}
        save_file(chunk, str(directory / shard), metadata={"format": "pt"})
        weight_map.update({n: shard for n in chunk})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    hf_config = {
        "architectures": ["OpenVLAForActionPrediction"],
        "model_type": "openvla",
        "vision_backbone_id": "dinosiglip-vit-so-224px",
        "llm_backbone_id": "llama2-7b-pure",
        "arch_specifier": "no-align+fused-gelu-mlp",
        "image_sizes": [config.image_size, config.image_size],
        "pad_token_id": config.text_vocab_size,
        "pad_to_multiple_of": config.pad_to_multiple_of,
        "n_action_bins": config.n_action_bins,
        "norm_stats": dict(norm_stats) if norm_stats is not None else example_norm_stats(config.action_dim),
        "text_config": {
            "model_type": "llama",
            "vocab_size": config.vocab_size,
            "hidden_size": config.llm_dim,
            "intermediate_size": config.llm_mlp_dim,
            "num_hidden_layers": config.llm_layers,
            "num_attention_heads": config.num_heads,
            "num_key_value_heads": config.num_kv_heads,
            "rms_norm_eps": config.rms_norm_eps,
            "rope_theta": config.rope_base,
        },
    }
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2))
    if dataset_statistics is not None:
        (directory / "dataset_statistics.json").write_text(json.dumps(dict(dataset_statistics), indent=2))
    return directory


def write_rt2_checkpoint(directory: str | Path, config: RT2Config, seed: int = 0, layout: str = "openpi",
                         dtype: torch.dtype = torch.float32) -> Path:
    """A random Pi0 checkpoint (openpi or LeRobot layout) of ``config.paligemma`` plus the language model's
    final norm: the RT-2-style policy reads its PaliGemma part."""
    from safetensors.torch import load_file, save_file

    from cortexflow.models.rt2_keys import FINAL_NORM
    from cortexflow.random_checkpoint import write_checkpoint

    backbone: ModelConfig = config.paligemma.replace(num_decoder_layers=config.paligemma.num_encoder_layers)
    directory = write_checkpoint(directory, backbone, seed=seed, layout=layout, dtype=dtype)
    file = Path(directory) / "model.safetensors"
    state = load_file(str(file))
    generator = torch.Generator().manual_seed(seed + 2)
    norm = (0.1 * torch.randn(backbone.encoder_dim, generator=generator)).to(dtype)
    state[("model." if layout == "lerobot" else "") + FINAL_NORM] = norm
    save_file(state, str(file))
    return Path(directory)
