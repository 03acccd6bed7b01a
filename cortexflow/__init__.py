"""CortexFlow: fast, verifiable inference for robot vision-language-action policies.

Public API::

    import cortexflow as cf
    engine = cf.create_pi0_inference(checkpoint_path, num_views=2, backend="pytorch", device="cuda")
    actions = engine.predict(images, "pick up the cube", state)   # (chunk, action_dim) numpy
"""

from cortexflow.backends import ComputeBackend, PyTorchBackend, available_backends, register_backend
from cortexflow.config import BackendType, InferenceConfig, ModelConfig, VLAModelType
from cortexflow.engine import VLAInferenceEngine
from cortexflow.errors import (
    BackendUnavailableError,
    CheckpointError,
    ConfigError,
    CortexFlowError,
    CortexFlowWarning,
    InputError,
    NormStatsError,
    TokenizerError,
)
from cortexflow.factory import (
    create_openvla_inference,
    create_pi0_inference,
    create_pi05_inference,
    create_rt1_inference,
    create_rt2_inference,
)
from cortexflow.models.base import VLAModel
from cortexflow.models.pi0 import Pi0Model, Pi05Model
from cortexflow.models.openvla import OpenVLAConfig, OpenVLAModel
from cortexflow.models.rt1 import RT1Config, RT1Model
from cortexflow.models.rt2 import RT2Config, RT2Model
from cortexflow.models.rtc import RTCConfig
from cortexflow.preprocessor import ActionPostprocessor, ObservationPreprocessor
from cortexflow.history_engine import RT1Engine
from cortexflow.decoding_engine import TokenVLAEngine

__version__ = "0.1.0"

__all__ = [
    "ActionPostprocessor",
    "BackendType",
    "BackendUnavailableError",
    "CheckpointError",
    "ComputeBackend",
    "ConfigError",
    "CortexFlowError",
    "CortexFlowWarning",
    "InferenceConfig",
    "RTCConfig",
    "InputError",
    "ModelConfig",
    "NormStatsError",
    "ObservationPreprocessor",
    "OpenVLAConfig",
    "OpenVLAModel",
    "Pi05Model",
    "Pi0Model",
    "PyTorchBackend",
    "RT1Config",
    "RT1Engine",
    "RT1Model",
    "RT2Config",
    "RT2Model",
    "TokenVLAEngine",
    "TokenizerError",
    "VLAInferenceEngine",
    "VLAModel",
    "VLAModelType",
    "available_backends",
    "create_openvla_inference",
    "create_pi0_inference",
    "create_pi05_inference",
    "create_rt1_inference",
    "create_rt2_inference",
    "register_backend",
]
