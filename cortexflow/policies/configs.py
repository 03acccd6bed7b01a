"""openpi's inference configs as data: one :class:`PolicyConfig` record per named config users serve.

Each record says what openpi's ``TrainConfig`` decides around the model (``docs/reference_facts.md#S-OP``):
model type, action horizon, prompt length, whether Pi0.5 writes the state into the prompt, the robot adapter,
the delta-action mask (``make_bool_mask`` dims), the normalisation mode, the norm-stats asset id and the default
prompt. :meth:`PolicyConfig.input_steps` / :meth:`PolicyConfig.output_steps` list the transforms it implies, in
openpi's order (robot inputs; outputs: absolute actions before the robot's outputs).
"""

from __future__ import annotations

from dataclasses import dataclass

from cortexflow.config import VLAModelType
from cortexflow.errors import ConfigError
from cortexflow.policies.transforms import AbsoluteActions, InjectDefaultPrompt, make_bool_mask, robot_steps

ALOHA_DELTA = (6, -1, 6, -1)  # both arms' joints relative, grippers absolute
LIBERO_DELTA = (6, -1)
DROID_JOINT_DELTA = (7, -1)


@dataclass(frozen=True)
class PolicyConfig:
    """One openpi inference config. ``max_token_len`` / ``discrete_state_input`` None: the model type's default
    (48 and off for Pi0, 200 and on for Pi0.5); ``normalization`` None: MEAN_STD for Pi0, QUANTILES for Pi0.5."""

    name: str
    model_type: VLAModelType
    robot: str
    asset_id: str
    action_horizon: int = 50
    max_token_len: int | None = None
    discrete_state_input: bool | None = None
    delta_mask: tuple[int, ...] = ()
    default_prompt: str | None = None
    adapt_to_pi: bool = True
    action_dim: int = 32
    normalization: str | None = None
    note: str = ""

    @property
    def token_len(self) -> int:
        if self.max_token_len is not None:
            return self.max_token_len
        return 200 if self.model_type == VLAModelType.PI05 else 48

    @property
    def state_in_prompt(self) -> bool:
        if self.discrete_state_input is not None:
            return self.discrete_state_input
        return self.model_type == VLAModelType.PI05

    @property
    def norm_mode(self) -> str:
        if self.normalization is not None:
            return self.normalization
        return "MEAN_STD" if self.model_type == VLAModelType.PI0 else "QUANTILES"

    def model_overrides(self) -> dict:
        """The ModelConfig fields this config sets."""
        return {"chunk_size": self.action_horizon, "max_token_len": self.token_len,
                "discrete_state_input": self.state_in_prompt}

    def input_steps(self) -> tuple:
        robot_inputs, _ = robot_steps(self.robot, self.adapt_to_pi)
        prompt = (InjectDefaultPrompt(self.default_prompt),) if self.default_prompt is not None else ()
        return (*prompt, *robot_inputs)

    def output_steps(self) -> tuple:
        """Robot-side output steps (after un-normalising): absolute actions, then the robot's outputs."""
        _, robot_outputs = robot_steps(self.robot, self.adapt_to_pi)
        delta = (AbsoluteActions(make_bool_mask(*self.delta_mask)),) if self.delta_mask else ()
        return (*delta, *robot_outputs)


def _pi0(name: str, robot: str, asset_id: str, **fields) -> PolicyConfig:
    return PolicyConfig(name, VLAModelType.PI0, robot, asset_id, **fields)


def _pi05(name: str, robot: str, asset_id: str, **fields) -> PolicyConfig:
    return PolicyConfig(name, VLAModelType.PI05, robot, asset_id, **fields)


_TOWEL, _TUPPERWARE = "fold the towel", "open the tupperware and put the food on the plate"
_CONFIGS = (
    _pi0("pi0_aloha", "aloha", "trossen", delta_mask=ALOHA_DELTA, note="serves pi0_base"),
    _pi05("pi05_aloha", "aloha", "trossen", delta_mask=ALOHA_DELTA, note="serves pi05_base"),
    _pi0("pi0_aloha_towel", "aloha", "trossen", delta_mask=ALOHA_DELTA, default_prompt=_TOWEL),
    _pi0("pi0_aloha_tupperware", "aloha", "trossen", delta_mask=ALOHA_DELTA, default_prompt=_TUPPERWARE),
    _pi0("pi0_aloha_pen_uncap", "aloha", "trossen", delta_mask=ALOHA_DELTA, default_prompt="uncap the pen"),
    _pi05("pi05_aloha_pen_uncap", "aloha", "trossen", delta_mask=ALOHA_DELTA, default_prompt="uncap the pen"),
    _pi0("pi0_aloha_sim", "aloha", "lerobot/aloha_sim_transfer_cube_human", default_prompt="Transfer cube"),
    _pi0("pi0_droid", "droid", "droid", action_horizon=10),
    _pi05("pi05_droid", "droid", "droid", action_horizon=15),
    _pi05("pi05_droid_finetune", "droid", "droid", action_horizon=16),
    _pi05("pi05_full_droid_finetune", "droid", "droid", action_horizon=16, delta_mask=DROID_JOINT_DELTA,
          note="joint-position actions"),
    _pi05("pi05_droid_jointpos_polaris", "droid", "droid", action_horizon=15, delta_mask=DROID_JOINT_DELTA,
          note="joint-position actions"),
    _pi0("pi0_droid_jointpos_polaris", "droid", "droid", action_horizon=10, max_token_len=100,
         delta_mask=DROID_JOINT_DELTA, note="joint-position actions"),
    _pi0("pi0_droid_jointpos_100k_polaris", "droid", "droid", action_horizon=10, max_token_len=100,
         delta_mask=DROID_JOINT_DELTA, note="joint-position actions"),
    _pi0("pi0_libero", "libero", "physical-intelligence/libero", delta_mask=LIBERO_DELTA),
    _pi0("pi0_libero_low_mem_finetune", "libero", "physical-intelligence/libero", delta_mask=LIBERO_DELTA,
         note="LoRA fine-tune: the adapters must be merged into the weights"),
    _pi05("pi05_libero", "libero", "physical-intelligence/libero", action_horizon=10, discrete_state_input=False,
          note="Pi0.5 without the state in the prompt"),
)
POLICY_CONFIGS: dict[str, PolicyConfig] = {config.name: config for config in _CONFIGS}


def get_policy_config(name: str) -> PolicyConfig:
    """The registered config ``name``; an unknown name is an error listing the valid ones."""
    key = str(name).strip()
    if key not in POLICY_CONFIGS:
        raise ConfigError(f"unknown policy config {name!r}; expected one of: {', '.join(POLICY_CONFIGS)}")
    return POLICY_CONFIGS[key]
