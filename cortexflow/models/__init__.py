"""Policy architectures, each written once against the backend op interface."""

from cortexflow.models.base import VLAModel
from cortexflow.models.pi0 import Pi0Model, Pi05Model, model_class

__all__ = ["Pi05Model", "Pi0Model", "VLAModel", "model_class"]
