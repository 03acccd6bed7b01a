"""Open a Pi0-family checkpoint in any format it comes in, as one :class:`CheckpointFiles` interface.

- a folder with ``adapter_config.json``: a PEFT LoRA adapter, merged into its base checkpoint
  (``base`` argument or the adapter's ``base_model_name_or_path``; the base may be any of these formats);
- a folder holding ``params/_METADATA`` (or that ``params/`` folder itself): an openpi JAX checkpoint
  (Orbax), read through orbax-checkpoint and presented with openpi PyTorch key names;
- anything else: safetensors (openpi PyTorch, LeRobot, sharded), as :meth:`CheckpointFiles.open` reads it.
"""

from __future__ import annotations

from pathlib import Path

from cortexflow.checkpoints.files import CheckpointFiles
from cortexflow.checkpoints.orbax_checkpoint import OrbaxCheckpoint
from cortexflow.checkpoints.orbax_reader import find_params_dir
from cortexflow.checkpoints.peft_adapter import AdapterCheckpoint, is_adapter_folder, read_adapter_config, resolve_base_path
from cortexflow.errors import CheckpointError


def open_checkpoint(path: "str | Path", base: "str | Path | None" = None) -> CheckpointFiles:
    """The tensors of the checkpoint at ``path`` (see module doc); ``base`` is the base checkpoint of an
    adapter folder and is refused for any other kind of checkpoint."""
    path = Path(path).expanduser()
    if is_adapter_folder(path):
        base_path = resolve_base_path(path, read_adapter_config(path), base)
        if is_adapter_folder(base_path):
            raise CheckpointError(f"the base of the adapter in {path} is itself an adapter folder ({base_path})")
        return AdapterCheckpoint.merge(path, open_checkpoint(base_path))
    if base is not None:
        raise CheckpointError(
            f"a base checkpoint was given, but {path} is not a LoRA adapter folder (no adapter_config.json)"
        )
    params_dir = find_params_dir(path) if path.is_dir() else None
    if params_dir is not None:
        return OrbaxCheckpoint.open_params(params_dir)
    return CheckpointFiles.open(path)
