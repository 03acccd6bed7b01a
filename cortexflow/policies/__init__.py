"""Policy configs as data: openpi's named inference configs, LeRobot's processor files, and the composable
input / output steps they list (see ``configs``, ``lerobot_processors``, ``transforms``, ``pipeline``)."""

from cortexflow.policies.configs import POLICY_CONFIGS, PolicyConfig, get_policy_config
from cortexflow.policies.lerobot_processors import has_lerobot_processors, lerobot_pipeline
from cortexflow.policies.normalize import FeatureNormalizer
from cortexflow.policies.pipeline import PolicyPipeline, openpi_pipeline

__all__ = [
    "POLICY_CONFIGS",
    "FeatureNormalizer",
    "PolicyConfig",
    "PolicyPipeline",
    "get_policy_config",
    "has_lerobot_processors",
    "lerobot_pipeline",
    "openpi_pipeline",
]
