"""The op interface under its earlier import path: :mod:`cortexflow.ops` holds it."""

from cortexflow.ops import ComputeBackend, Weights

__all__ = ["ComputeBackend", "Weights"]
