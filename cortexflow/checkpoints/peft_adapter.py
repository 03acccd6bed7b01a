"""A PEFT LoRA adapter (LeRobot fine-tune: ``adapter_config.json`` + ``adapter_model.safetensors``) merged
into its base checkpoint at load.

Adapter keys are ``base_model.model.<module>.lora_A.weight`` (r, in) and ``.lora_B.weight`` (out, r),
where ``<module>`` is the policy's module path (LeRobot: ``model.paligemma_with_expert...q_proj``). Each
pair updates the base tensor ``<module>.weight`` (out, in), found in the base checkpoint in whatever
layout it has (openpi, LeRobot, LeRobot-legacy): W' = W + s * (B @ A), computed in fp32, with
s = lora_alpha / r (``use_rslora``: lora_alpha / sqrt(r)); r and alpha come from ``rank_pattern`` /
``alpha_pattern`` when a pattern matches the module (PEFT's rule: the pattern full-matches the module
path or a dotted suffix of it), else from ``r`` / ``lora_alpha`` (PEFT default alpha 8).
``fan_in_fan_out`` transposes the update. Other adapter entries (trained biases with ``bias`` not
``"none"``, ``modules_to_save`` copies, which PEFT saves under the plain ``<module>.weight`` / ``.bias``)
replace the base tensor of the same name.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cortexflow.checkpoints.files import CheckpointFiles
from cortexflow.models.pi0_keys import detect_layout, to_openpi_key
from cortexflow.errors import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
PEFT_DEFAULT_ALPHA = 8
_LORA_KEY = re.compile(r"^(.*)\.lora_([AB])(?:\.[^.]+)?\.weight$")


def is_adapter_folder(path: Path) -> bool:
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file()


@dataclass(frozen=True)
class LoraUpdate:
    """One module's low-rank update: W' = W + scale * (B @ A) (transposed when ``fan_in_fan_out``)."""

    module: str
    a: torch.Tensor
    b: torch.Tensor
    scale: float
    fan_in_fan_out: bool

    def merged(self, weight: torch.Tensor) -> torch.Tensor:
        delta = self.b.float() @ self.a.float()
        if self.fan_in_fan_out:
            delta = delta.T
        return weight.float() + self.scale * delta


def _pattern_value(patterns: Any, module: str, default: Any) -> Any:
    if isinstance(patterns, dict):
        for pattern, value in patterns.items():
            if re.fullmatch(rf"(.*\.)?(?:{pattern})", module):
                return value
    return default


def read_adapter_config(folder: Path) -> dict:
    path = folder / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
    except ValueError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object, found {type(config).__name__}")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise CheckpointError(f"{path}: peft_type {peft_type!r} is not supported; CortexFlow merges LoRA adapters only")
    if config.get("use_dora"):
        raise CheckpointError(
            f"{path}: use_dora is set; DoRA adds a magnitude vector and is not a plain weight merge. Merge the "
            "adapter with PEFT (merge_and_unload) and save the merged policy instead"
        )
    return config


def resolve_base_path(folder: Path, config: dict, base: "str | Path | None") -> Path:
    """The base checkpoint: ``base`` when given, else ``base_model_name_or_path`` (absolute, or relative to
    the adapter folder, or to the working directory). Nothing is downloaded."""
    if base is not None:
        path = Path(base).expanduser()
        if not path.exists():
            raise CheckpointError(f"base checkpoint {str(path)!r} (for the adapter in {folder}) does not exist")
        return path
    named = config.get("base_model_name_or_path")
    if not named:
        raise CheckpointError(
            f"{folder / ADAPTER_CONFIG} names no base_model_name_or_path; pass the base checkpoint folder "
            "(base_checkpoint_path=... in Python, --base-checkpoint on the command line)"
        )
    for candidate in (Path(named).expanduser(), folder / named):
        if candidate.exists():
            return candidate
    raise CheckpointError(
        f"the adapter in {folder} is for base {named!r}, which is not a local path (CortexFlow downloads "
        "nothing); pass the base checkpoint folder (base_checkpoint_path=... in Python, --base-checkpoint "
        "on the command line)"
    )


@dataclass
class AdapterCheckpoint(CheckpointFiles):
    """A base checkpoint with a PEFT LoRA adapter merged into the tensors it targets (see module doc).

    ``tensors`` are the base's; ``read`` returns a targeted tensor merged in fp32, any other unchanged."""

    base: CheckpointFiles | None = None
    adapter_dir: Path = Path()
    updates: dict[str, LoraUpdate] = field(default_factory=dict)
    replacements: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def merge(cls, adapter_dir: Path, base: CheckpointFiles) -> "AdapterCheckpoint":
        """Check the adapter against ``base``; one ``CheckpointError`` names every module it cannot place,
        every rank that does not match the config and every update whose shape does not fit its weight."""
        from safetensors.torch import load_file

        config = read_adapter_config(adapter_dir)
        weights_path = adapter_dir / ADAPTER_WEIGHTS
        if not weights_path.is_file():
            raise CheckpointError(f"{adapter_dir} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")
        try:
            adapter = load_file(str(weights_path))
        except Exception as err:  # safetensors raises its own error types for corrupt data
            raise CheckpointError(f"{weights_path} is not a valid safetensors file: {err}") from err
        layout = detect_layout(base.tensors)
        by_openpi = {to_openpi_key(key, layout): key for key in base.tensors}

        def base_key(module_key: str) -> str | None:
            if module_key in base.tensors:
                return module_key
            return by_openpi.get(to_openpi_key(module_key, detect_layout([module_key])))

        pairs: dict[str, dict[str, torch.Tensor]] = {}
        replacements: dict[str, torch.Tensor] = {}
        unplaced, problems = [], []
        for key, tensor in adapter.items():
            name = key.removeprefix(PEFT_PREFIX)
            if m := _LORA_KEY.match(name):
                pairs.setdefault(m.group(1), {})[m.group(2)] = tensor
                continue
            target = base_key(name)
            if target is None:
                unplaced.append(name)
            elif tuple(tensor.shape) != base.tensors[target].shape:
                problems.append(f"{name} {list(tensor.shape)} replaces {target} {list(base.tensors[target].shape)}")
            else:
                replacements[target] = tensor
        updates = {}
        r_default, alpha_default = config.get("r", 8), config.get("lora_alpha")
        for module, pair in sorted(pairs.items()):
            target = base_key(module + ".weight")
            if target is None:
                unplaced.append(module)
                continue
            if set(pair) != {"A", "B"}:
                problems.append(f"{module}: lora_{'B' if 'A' in pair else 'A'} is missing")
                continue
            a, b = pair["A"], pair["B"]
            r = _pattern_value(config.get("rank_pattern"), module, r_default)
            alpha = _pattern_value(config.get("alpha_pattern"), module, alpha_default)
            alpha = PEFT_DEFAULT_ALPHA if alpha is None else alpha
            out_in = base.tensors[target].shape
            fan_in_fan_out = bool(config.get("fan_in_fan_out"))
            if fan_in_fan_out:
                out_in = tuple(reversed(out_in))
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != r or b.shape[1] != r:
                problems.append(
                    f"{module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not have rank r={r} "
                    f"that {ADAPTER_CONFIG} gives this module (expected [r, in] and [out, r])"
                )
            elif (b.shape[0], a.shape[1]) != tuple(out_in):
                problems.append(
                    f"{module}: B @ A is {[b.shape[0], a.shape[1]]} but {target} is {list(base.tensors[target].shape)}"
                )
            else:
                scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
                updates[target] = LoraUpdate(module, a, b, float(scale), fan_in_fan_out)
        if unplaced:
            problems.insert(0, "modules not found in the base checkpoint: " + ", ".join(unplaced))
        if problems:
            raise CheckpointError(f"cannot merge the adapter in {adapter_dir} into {base.root}: " + "; ".join(problems))
        return cls(root=base.root, files=base.files + [weights_path], tensors=base.tensors, config=base.config,
                   base=base, adapter_dir=adapter_dir, updates=updates, replacements=replacements)

    def read(self, name: str) -> torch.Tensor:
        """The base tensor ``name`` with the adapter applied (fp32 where merged)."""
        if name in self.replacements:
            return self.replacements[name]
        tensor = self.base.read(name)
        update = self.updates.get(name)
        return tensor if update is None else update.merged(tensor)
