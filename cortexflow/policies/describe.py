"""Plain descriptions of policy configs and pipelines for the command line (``configs``, ``info``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cortexflow.config import VLAModelType
from cortexflow.errors import CortexFlowError
from cortexflow.policies.configs import POLICY_CONFIGS, get_policy_config
from cortexflow.policies.lerobot_processors import has_lerobot_processors, lerobot_pipeline
from cortexflow.policies.pipeline import openpi_pipeline, unnormalized_openpi_pipeline
from cortexflow.policies.transforms import make_bool_mask


def config_rows() -> list[dict[str, Any]]:
    """One row per registered openpi config."""
    rows = []
    for config in POLICY_CONFIGS.values():
        mask = make_bool_mask(*config.delta_mask)
        rows.append({
            "name": config.name,
            "model": config.model_type.value,
            "robot": config.robot,
            "horizon": config.action_horizon,
            "tokens": config.token_len,
            "state in prompt": "yes" if config.state_in_prompt else "no",
            "delta dims": f"{sum(mask)} of {len(mask)}" if mask else "none",
            "norm": config.norm_mode,
            "asset id": config.asset_id,
            "default prompt": config.default_prompt,
        })
    return rows


def policy_transforms(checkpoint: str | Path, config: str | None, model_type: VLAModelType | None = None
                      ) -> dict[str, Any] | None:
    """``{"source", "steps", "notes"}`` for config ``config`` on ``checkpoint`` (or the checkpoint's LeRobot
    processors); None when neither applies. A config whose norm stats cannot be found is listed without them,
    and one of another model type than ``model_type`` (the checkpoint's), with the problem as a note; an
    unknown config name is an error."""
    listed = _transforms(checkpoint, config)
    if listed is not None and model_type is not None and listed["model_type"] != model_type:
        listed["notes"].insert(0, f"{listed['source']} is a {listed['model_type'].value} policy but the checkpoint "
                                  f"holds a {model_type.value} model: loading it with this config fails")
    if listed is not None:
        listed["model_type"] = listed["model_type"].value
    return listed


def _transforms(checkpoint: str | Path, config: str | None) -> dict[str, Any] | None:
    if config is not None:
        policy = get_policy_config(config)
        try:
            pipeline = openpi_pipeline(policy, checkpoint)
        except CortexFlowError as err:
            pipeline = unnormalized_openpi_pipeline(policy)
            steps = pipeline.describe()
            missing = f"{policy.norm_mode}, norm stats not found (see the note)"
            steps.insert(len(pipeline.input_steps), f"normalise state: {missing}")
            steps.insert(next(i for i, line in enumerate(steps) if line.startswith("model:")) + 1,
                         f"un-normalise actions: {missing}")
            return {"source": pipeline.source, "model_type": pipeline.model_type, "steps": steps,
                    "notes": [f"norm stats: {err}", *pipeline.notes]}
    elif has_lerobot_processors(checkpoint):
        pipeline = lerobot_pipeline(checkpoint)
    else:
        return None
    return {"source": pipeline.source, "model_type": pipeline.model_type, "steps": pipeline.describe(),
            "notes": list(pipeline.notes)}
