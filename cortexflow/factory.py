"""One-call constructors for the supported policies."""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any, Mapping

import torch

from cortexflow.config import BackendType, InferenceConfig, ModelConfig, VLAModelType
from cortexflow.engine import VLAInferenceEngine
from cortexflow.errors import ConfigError
from cortexflow.token_factory import create_openvla_inference, create_rt2_inference

__all__ = ["create_openvla_inference", "create_pi0_inference", "create_pi05_inference", "create_rt2_inference"]


def _create(
    model_type: VLAModelType,
    checkpoint_path: str | Path,
    num_views: int,
    chunk_size: int | None,
    backend: Any,
    device: str,
    dtype: "torch.dtype | str",
    tokenizer_path: str | None,
    norm_stats_path: str | None,
    use_cuda_graphs: bool,
    model_config: "ModelConfig | Mapping[str, Any] | None",
    **options: Any,
) -> VLAInferenceEngine:
    progress = options.pop("progress", None)
    _check_option_names(model_type, options)
    config = InferenceConfig(
        num_views=num_views,
        chunk_size=chunk_size,
        backend=backend,
        device=device,
        dtype=dtype,
        use_cuda_graphs=use_cuda_graphs,
        tokenizer_path=None if tokenizer_path is None else str(tokenizer_path),
        norm_stats_path=None if norm_stats_path is None else str(norm_stats_path),
        **options,
    )
    return VLAInferenceEngine(checkpoint_path, model_config, config, model_type=model_type, progress=progress)


def _check_option_names(model_type: VLAModelType, options: Mapping[str, Any]) -> None:
    """Raise ``ConfigError`` naming each keyword argument that is neither a factory argument nor an
    :class:`InferenceConfig` field (a typo such as ``num_view=3``)."""
    fields = {f.name for f in dataclasses.fields(InferenceConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        factory = "create_pi05_inference" if model_type == VLAModelType.PI05 else "create_pi0_inference"
        accepted = sorted(fields | {"checkpoint_path", "model_config", "progress"})
        named = []
        for name in unknown:
            close = difflib.get_close_matches(name, accepted, n=1)
            named.append(f"{name} (did you mean {close[0]}?)" if close else name)
        raise ConfigError(f"{factory}() got unknown argument(s) {', '.join(named)}; accepted: {', '.join(accepted)}")


def create_pi0_inference(
    checkpoint_path: str | Path,
    num_views: int = 2,
    chunk_size: int | None = None,
    backend: Any = BackendType.PYTORCH,
    device: str = "cuda",
    dtype: "torch.dtype | str" = "bfloat16",
    tokenizer_path: str | None = None,
    norm_stats_path: str | None = None,
    use_cuda_graphs: bool = True,
    model_config: "ModelConfig | Mapping[str, Any] | None" = None,
    **options: Any,
) -> VLAInferenceEngine:
    """A Pi0 engine for the checkpoint at ``checkpoint_path`` (openpi PyTorch or LeRobot safetensors).

    ``chunk_size=None`` takes the chunk from the checkpoint's config (50 by default). ``options`` are
    further :class:`InferenceConfig` fields (``normalize``, ``num_steps``, ``max_tokenize_len``,
    ``discrete_state_input``) and ``progress`` (show the loading bar)."""
    return _create(
        VLAModelType.PI0, checkpoint_path, num_views, chunk_size, backend, device, dtype,
        tokenizer_path, norm_stats_path, use_cuda_graphs, model_config, **options,
    )


def create_pi05_inference(
    checkpoint_path: str | Path,
    num_views: int = 2,
    chunk_size: int | None = None,
    backend: Any = BackendType.PYTORCH,
    device: str = "cuda",
    dtype: "torch.dtype | str" = "bfloat16",
    tokenizer_path: str | None = None,
    norm_stats_path: str | None = None,
    use_cuda_graphs: bool = True,
    model_config: "ModelConfig | Mapping[str, Any] | None" = None,
    **options: Any,
) -> VLAInferenceEngine:
    """A Pi0.5 engine; same arguments as :func:`create_pi0_inference`. The state goes into the prompt
    as 256-bin tokens (``discrete_state_input``), so a string prompt needs a tokenizer."""
    return _create(
        VLAModelType.PI05, checkpoint_path, num_views, chunk_size, backend, device, dtype,
        tokenizer_path, norm_stats_path, use_cuda_graphs, model_config, **options,
    )
