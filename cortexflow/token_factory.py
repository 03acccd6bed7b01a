"""Constructors of the token-decoding policies: OpenVLA (Hugging Face folder) and RT-2 style (PaliGemma)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from cortexflow.config import BackendType, parse_dtype
from cortexflow.engine import resolve_device
from cortexflow.errors import ConfigError, NormStatsError
from cortexflow.token_engine import DEFAULT_BUCKET, TokenVLAEngine


def create_openvla_inference(
    checkpoint_path: str | Path,
    backend: Any = BackendType.PYTORCH,
    unnorm_key: str | None = None,
    device: str = "cuda",
    dtype: "torch.dtype | str" = "bfloat16",
    tokenizer_path: str | Path | None = None,
    use_cuda_graphs: bool = True,
    model_config: "Mapping[str, Any] | Any" = None,
    constrained_decoding: bool = False,
    bucket: int = DEFAULT_BUCKET,
) -> TokenVLAEngine:
    """Load OpenVLA from a local Hugging Face folder; ``engine.predict(image, task)`` -> 7-D action.

    The folder holds ``model.safetensors.index.json`` + shards (or ``model.safetensors``), ``config.json``
    (``norm_stats``, ``text_config``), optionally ``dataset_statistics.json``, and ``tokenizer.model``
    (or pass ``tokenizer_path``). ``unnorm_key`` picks the dataset whose q01/q99 un-normalise the
    actions; it is required when the checkpoint has statistics for several datasets. Without any
    statistics the actions stay normalised in [-1, 1]. ``constrained_decoding`` restricts the argmax to
    the 256 action ids (the reference does not)."""
    from cortexflow.checkpoints.openvla_layout import load_openvla_checkpoint
    from cortexflow.processing.action_tokens import read_dataset_statistics, select_action_stats
    from cortexflow.processing.vla_inputs import SPACE_PIECE, SentencePieceTokenizer

    device_ = resolve_device(device)
    dtype_ = parse_dtype(dtype)
    path = Path(checkpoint_path).expanduser()
    model, weights, report, files = load_openvla_checkpoint(path, device_, dtype_, model_config)
    key, stats = select_action_stats(read_dataset_statistics(files.root, files.config), unnorm_key)
    if stats is not None and stats.dim != model.config.action_dim:
        model.config.action_dim = stats.dim
    tokenizer = None
    tokenizer_file = Path(tokenizer_path) if tokenizer_path is not None else files.root / "tokenizer.model"
    if tokenizer_path is not None or tokenizer_file.is_file():
        tokenizer = SentencePieceTokenizer(tokenizer_file)
        space = tokenizer.piece_id(SPACE_PIECE)
        overridden = isinstance(model_config, Mapping) and "space_token_id" in model_config
        if space is not None and not overridden:
            model.config.space_token_id = space
    for name in ("bos_id", "space_token_id"):
        if not 0 <= getattr(model.config, name) < model.config.vocab_size:
            raise ConfigError(f"{name} {getattr(model.config, name)} is outside the vocabulary "
                              f"[0, {model.config.vocab_size}); give the checkpoint's tokenizer.model or set it in model_config")
    return TokenVLAEngine(
        model, weights, backend=backend, device=device_, dtype=dtype_, tokenizer=tokenizer,
        unnormalize=None if stats is None else stats.unnormalize, unnorm_key=key,
        use_cuda_graphs=use_cuda_graphs, constrained=constrained_decoding, bucket=bucket, report=report,
    )


def create_rt2_inference(
    checkpoint_path: str | Path,
    backend: Any = BackendType.PYTORCH,
    device: str = "cuda",
    dtype: "torch.dtype | str" = "bfloat16",
    tokenizer_path: str | Path | None = None,
    norm_stats_path: str | Path | None = None,
    use_cuda_graphs: bool = True,
    model_config: "Mapping[str, Any] | Any" = None,
    constrained_decoding: bool = True,
    bucket: int = DEFAULT_BUCKET,
) -> TokenVLAEngine:
    """An RT-2-style policy over the PaliGemma weights of an openpi PyTorch / LeRobot checkpoint.

    ``engine.predict(image, task)`` -> ``(chunk_size, action_dim)`` actions decoded from
    ``chunk_size * action_dim`` greedy tokens (256 bins at the tail of the vocabulary, see
    ``processing/action_tokens.py``). ``tokenizer_path``: the PaliGemma ``tokenizer.model``;
    ``norm_stats_path``: openpi / LeRobot statistics whose action q01/q99 un-normalise (quantile) the
    output; without them actions stay in [-1, 1]. ``model_config`` sets ``action_dim``, ``chunk_size``,
    ``max_text_tokens``, ``prompt_template`` or backbone fields."""
    from cortexflow.checkpoints.rt2_layout import load_rt2_checkpoint
    from cortexflow.processing import load_norm_stats, unnormalize
    from cortexflow.processing.vla_inputs import SentencePieceTokenizer

    device_ = resolve_device(device)
    dtype_ = parse_dtype(dtype)
    model, weights, match = load_rt2_checkpoint(Path(checkpoint_path).expanduser(), device_, dtype_, model_config)
    tokenizer = SentencePieceTokenizer(tokenizer_path) if tokenizer_path is not None else None
    unnorm = None
    if norm_stats_path is not None:
        stats = load_norm_stats(norm_stats_path)["actions"]
        if stats.q01 is None or stats.q99 is None:
            raise NormStatsError(f"{norm_stats_path}: the action statistics lack q01/q99 (needed to un-normalise "
                                 "binned actions)")
        if stats.dim > model.config.action_dim:
            raise NormStatsError(f"{norm_stats_path}: {stats.dim}-D action statistics but the policy decodes "
                                 f"{model.config.action_dim}-D actions")
        unnorm = lambda actions: unnormalize(actions, stats, "quantile")  # noqa: E731
    return TokenVLAEngine(
        model, weights, backend=backend, device=device_, dtype=dtype_, tokenizer=tokenizer, unnormalize=unnorm,
        use_cuda_graphs=use_cuda_graphs, constrained=constrained_decoding, bucket=bucket, report=match,
    )
