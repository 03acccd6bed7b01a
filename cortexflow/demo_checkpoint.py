"""The demo's tiny random Pi0 / Pi0.5 saved as a complete checkpoint folder, to try ``info``, ``run``,
``serve`` and the Python API on without downloading anything.

The folder holds what a real one does: ``model.safetensors`` (openpi layout), ``config.json`` (with every
``ModelConfig`` field, so it loads as written), ``tokenizer.model`` (a tiny SentencePiece model over the
demo vocabulary) and ``assets/demo/norm_stats.json`` (openpi format, for state and actions). The weights are
random: the actions mean nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cortexflow.config import ModelConfig
from cortexflow.random_checkpoint import write_checkpoint
from cortexflow.tiny_tokenizer import write_tiny_tokenizer

DEMO_ASSET = "demo"
DEMO_LAYOUT = "openpi"


@dataclass(frozen=True)
class SavedDemo:
    """Where each file of a saved demo checkpoint is."""

    directory: Path
    weights: Path
    config: Path
    tokenizer: Path
    norm_stats: Path


def demo_norm_stats(config: ModelConfig, seed: int = 0) -> dict:
    """openpi-format statistics for state and actions of ``config.action_dim`` entries: mean, std, q01, q99
    drawn from ``seed`` (std and the quantile range strictly positive)."""
    rng = np.random.default_rng([seed, 7])

    def stats() -> dict:
        mean = rng.uniform(-0.2, 0.2, config.action_dim)
        std = rng.uniform(0.2, 0.6, config.action_dim)
        return {"mean": mean.round(4).tolist(), "std": std.round(4).tolist(),
                "q01": (mean - 2 * std).round(4).tolist(), "q99": (mean + 2 * std).round(4).tolist()}

    return {"norm_stats": {"state": stats(), "actions": stats()}}


def save_demo_checkpoint(directory: str | Path, config: ModelConfig, seed: int = 0) -> SavedDemo:
    """Write the random ``config`` model (weights from ``seed``), its config, the tiny tokenizer and norm
    stats into ``directory``; returns the paths."""
    directory = Path(directory)
    write_checkpoint(directory, config, seed=seed, layout=DEMO_LAYOUT)
    tokenizer = write_tiny_tokenizer(directory / "tokenizer.model", vocab_size=config.vocab_size)
    norm_stats = directory / "assets" / DEMO_ASSET / "norm_stats.json"
    norm_stats.parent.mkdir(parents=True, exist_ok=True)
    norm_stats.write_text(json.dumps(demo_norm_stats(config, seed), indent=2))
    return SavedDemo(directory=directory, weights=directory / "model.safetensors", config=directory / "config.json",
                     tokenizer=tokenizer, norm_stats=norm_stats)
