"""Plain descriptions of policy configs and pipelines for the command line (``configs``, ``info``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cortexflow.errors import CortexFlowError
from cortexflow.policies.configs import POLICY_CONFIGS, get_policy_config
from cortexflow.policies.lerobot_processors import has_lerobot_processors, lerobot_pipeline
from cortexflow.policies.pipeline import openpi_pipeline
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


def policy_transforms(checkpoint: str | Path, config: str | None) -> dict[str, Any] | None:
    """``{"source", "steps", "notes"}`` for config ``config`` on ``checkpoint`` (or the checkpoint's LeRobot
    processors); None when neither applies. A config whose norm stats cannot be found is listed without them,
    with the problem as a note; an unknown config name is an error."""
    if config is not None:
        policy = get_policy_config(config)
        try:
            pipeline = openpi_pipeline(policy, checkpoint)
        except CortexFlowError as err:
            steps = [step.describe() for step in policy.input_steps()] + ["model"]
            steps += [step.describe() for step in policy.output_steps()]
            return {"source": f"config {policy.name!r}", "steps": steps, "notes": [f"norm stats: {err}"]}
    elif has_lerobot_processors(checkpoint):
        pipeline = lerobot_pipeline(checkpoint)
    else:
        return None
    return {"source": pipeline.source, "steps": pipeline.describe(), "notes": list(pipeline.notes)}
