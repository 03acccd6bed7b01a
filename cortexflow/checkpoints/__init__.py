"""Checkpoint readers, key maps and validation."""

from cortexflow.checkpoints.files import CheckpointFiles
from cortexflow.checkpoints.loader import CheckpointReport, inspect_checkpoint, load_pi0_checkpoint

__all__ = ["CheckpointFiles", "CheckpointReport", "inspect_checkpoint", "load_pi0_checkpoint"]
