"""A policy's whole pipeline around the model, built from an openpi config or LeRobot processor files, and
installed into an engine's ``preprocessor`` / ``postprocessor``.

Order at inference (openpi ``policy_config.create_trained_policy``): input steps (default prompt, robot inputs)
-> normalise the state -> tokenise the prompt (Pi0.5: with the state's bins) -> pad the state to the model's
action width, resize-with-pad the images -> model -> output steps (un-normalise, absolute actions, robot outputs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cortexflow.config import VLAModelType
from cortexflow.errors import ConfigError, NormStatsError
from cortexflow.policies.configs import PolicyConfig, get_policy_config
from cortexflow.policies.normalize import FeatureNormalizer
from cortexflow.policies.transforms import AbsoluteActions, Unnormalize
from cortexflow.processing.normalization import asset_norm_stats_path, load_norm_stats

#: The robot state's length for each openpi robot adapter.
ROBOT_STATE_DIMS = {"droid": 8, "libero": 8, "aloha": 14}
ROBOT_VIEWS = 3  # base, left wrist, right wrist


@dataclass
class PolicyPipeline:
    """Everything a checkpoint decides around the model. ``model_overrides`` are ModelConfig fields (horizon,
    prompt length, state in the prompt); ``robot`` is the openpi robot whose observation keys a server maps
    (None for LeRobot policies, which take images in camera order); ``tokenizer_path`` the tokenizer saved beside
    the weights, used when the caller names none; ``action_dim`` the model's action width the policy was trained
    with (None: any)."""

    name: str
    source: str
    model_type: VLAModelType
    model_overrides: dict
    input_steps: tuple
    state_normalizer: FeatureNormalizer | None
    output_steps: tuple
    num_views: int = ROBOT_VIEWS
    robot: str | None = None
    state_dim: int | None = None
    default_prompt: str | None = None
    prompt_format: str = "openpi"
    state_prompt_width: int | None = None
    tokenizer_path: str | None = None
    action_dim: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def needs_state(self) -> bool:
        return any(isinstance(step, AbsoluteActions) for step in self.output_steps)

    def check_model_type(self, model_type: VLAModelType, where: str) -> None:
        """``where`` (a factory or checkpoint) must be of this pipeline's model type."""
        if model_type != self.model_type:
            raise ConfigError(f"{self.source} is a {self.model_type.value} policy but {where} is {model_type.value}")

    def describe(self) -> list[str]:
        """The transforms that apply, in order, one line each."""
        overrides = self.model_overrides
        lines = [step.describe() for step in self.input_steps]
        if self.state_normalizer is not None:
            lines.append(f"normalise state: {self.state_normalizer.describe()}")
        length = overrides.get("max_token_len", "the model's")
        if overrides.get("discrete_state_input", self.model_type == VLAModelType.PI05):
            padded = f", state zero-padded to {self.state_prompt_width} first" if self.state_prompt_width else ""
            lines.append(f"tokenise prompt: 'Task: <prompt>, State: <256-bin state>;\\nAction: '{padded} "
                         f"(max {length} tokens)")
        elif self.prompt_format == "lerobot":
            lines.append(f"tokenise prompt: <prompt> + '\\n' as one string, no cleaning (max {length} tokens)")
        else:
            lines.append(f"tokenise prompt: clean(<prompt>) then '\\n' (max {length} tokens)")
        lines.append(f"images: {self.num_views} slots, resize-with-pad to the model's size, scaled to [-1, 1]")
        if self.model_type == VLAModelType.PI0:
            lines.append("state: zero-padded to the model's action width (state token)")
        horizon = overrides.get("chunk_size", "the checkpoint's")
        lines.append(f"model: {self.model_type.value}, {horizon} actions per chunk")
        lines += [step.describe() for step in self.output_steps]
        return lines


def openpi_pipeline(config: PolicyConfig | str, checkpoint: str | Path | None,
                    norm_stats_path: str | Path | None = None) -> PolicyPipeline:
    """The pipeline of openpi config ``config`` with the norm stats of its asset id in ``checkpoint``'s ``assets/``
    (or the file ``norm_stats_path``)."""
    config = get_policy_config(config) if isinstance(config, str) else config
    folder = None if checkpoint is None else (Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent)
    if norm_stats_path is not None:
        path = Path(norm_stats_path)
    elif folder is not None and folder.is_dir():
        path = asset_norm_stats_path(folder, config.asset_id)
    else:
        raise NormStatsError(f"config {config.name!r} needs the norm stats of asset {config.asset_id!r}: pass the "
                             "checkpoint folder (with assets/) or the stats file")
    stats = load_norm_stats(path)
    state_dim = ROBOT_STATE_DIMS[config.robot]
    state_norm = FeatureNormalizer("state", config.norm_mode, stats["state"])
    action_norm = FeatureNormalizer("actions", config.norm_mode, stats["actions"])
    if state_norm.dim < state_dim:
        raise NormStatsError(f"{path}: the state stats cover {state_norm.dim} values but config {config.name!r} "
                             f"({config.robot}) sends a {state_dim}-value state")
    pipeline = unnormalized_openpi_pipeline(config)
    pipeline.state_normalizer = state_norm
    pipeline.output_steps = (Unnormalize(action_norm), *pipeline.output_steps)
    pipeline.notes.insert(0, f"norm stats: {path}")
    return pipeline


def unnormalized_openpi_pipeline(config: PolicyConfig) -> PolicyPipeline:
    """Config ``config``'s pipeline without its normalisation steps (which need the checkpoint's stats)."""
    return PolicyPipeline(
        name=config.name,
        source=f"config {config.name!r}",
        model_type=config.model_type,
        model_overrides=config.model_overrides(),
        input_steps=config.input_steps(),
        state_normalizer=None,
        output_steps=config.output_steps(),
        robot=config.robot,
        state_dim=ROBOT_STATE_DIMS[config.robot],
        default_prompt=config.default_prompt,
        action_dim=config.action_dim,
        notes=[config.note] if config.note else [],
    )


def check_checkpoint_type(pipeline: PolicyPipeline, checkpoint: str | Path) -> None:
    """The tensors in ``checkpoint`` (any format the loader reads: safetensors, Orbax ``params/``, an adapter
    folder) must be of the pipeline's model type (read from the headers / metadata only)."""
    from cortexflow.checkpoints.pi0_layout import detect_model_type
    from cortexflow.checkpoints.sources import open_checkpoint

    detected = detect_model_type(open_checkpoint(checkpoint).tensors)
    if detected is not None:
        pipeline.check_model_type(detected, f"the checkpoint {checkpoint} (detected from its tensors)")
