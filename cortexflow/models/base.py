"""The model interface: what a policy computes, independent of how (the backend) it is computed."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from cortexflow.config import ModelConfig, VLAModelType
from cortexflow.ops import ComputeBackend, FusableWeights, Weights


@dataclass(frozen=True)
class HostEmbedding:
    """A lookup table that the engine may keep in host memory instead of on the GPU.

    Each call, the engine gathers the rows of the ids in buffer ``ids`` ``(B, L)`` from the table that
    :meth:`VLAModel.host_table` makes once from ``weights[table]``. It passes them to the forward pass in
    buffer ``embeddings`` ``(B, L, D)``, in the compute dtype. The forward pass reads that buffer when it is
    there and otherwise looks ``ids`` up on the device."""

    table: str
    ids: str
    embeddings: str


class VLAModel(ABC):
    """A vision-language-action policy: dimensions, weights, and its forward pass over backend ops.

    Subclasses declare their weights (``get_weight_shapes``), the static per-call buffers
    (``get_buffer_shapes``), how a raw checkpoint maps onto their weight names
    (``preprocess_checkpoint``), and the three stages, each written once against the op interface of
    :class:`~cortexflow.ops.ComputeBackend`.
    """

    model_type: VLAModelType
    #: The forward pass takes ``token_ids`` / ``token_mask`` buffers of any length up to ``max_token_len``
    #: (the engine may then pad a prompt to a shorter bucket); False: always ``max_token_len``.
    variable_prompt_length: bool = False
    #: The lookup table the engine may keep off the GPU (:class:`HostEmbedding`); None: every weight is on the device.
    host_embedding: HostEmbedding | None = None

    def __init__(self, config: ModelConfig):
        config.validate()
        self.config = config

    @abstractmethod
    def get_weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Canonical weight name -> shape, for every weight the forward pass reads."""

    @abstractmethod
    def get_buffer_shapes(self, num_views: int, chunk_size: int, batch_size: int = 1) -> dict[str, tuple[int, ...]]:
        """Static input/output buffer name -> shape for one call (the CUDA-graph inputs and outputs)."""

    @abstractmethod
    def buffer_dtype(self, name: str, compute_dtype: torch.dtype) -> torch.dtype:
        """The dtype of the static buffer ``name`` when the model computes in ``compute_dtype``."""

    @abstractmethod
    def preprocess_checkpoint(self, checkpoint: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename a raw state dict (any supported layout) to canonical names; raise on bad keys."""

    def weight_dtype(self, name: str, compute_dtype: torch.dtype) -> torch.dtype:
        """The dtype weight ``name`` is stored in at run time (default: the compute dtype)."""
        return compute_dtype

    def unread_weights(self) -> tuple[str, ...]:
        """Declared weights (:meth:`get_weight_shapes`) that the forward pass never reads, which the engine neither
        loads nor keeps (default: none)."""
        return ()

    def host_table(self, table: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
        """The host-side table of :attr:`host_embedding`, made once from the weight ``table`` (CPU): its rows are
        what the forward pass would compute from the looked-up rows, in ``compute_dtype`` (default: the rows)."""
        return table.to(compute_dtype)

    def fusable_weights(self) -> FusableWeights:
        """The weight-name groups a backend may re-lay out once after loading (default: none)."""
        return FusableWeights()

    @abstractmethod
    def vision_encoder(self, ops: "ComputeBackend", weights: Weights, inputs: Mapping[str, Any]) -> Any:
        """Stage 1: images -> image tokens."""

    @abstractmethod
    def transformer_encoder(self, ops: "ComputeBackend", weights: Weights, inputs: Mapping[str, Any]) -> Any:
        """Stage 2: the prefix pass (prefill), producing what the decoder attends to."""

    @abstractmethod
    def transformer_decoder(self, ops: "ComputeBackend", weights: Weights, inputs: Mapping[str, Any]) -> Any:
        """Stage 3: the action decoder (flow-matching steps, token decode, ...)."""

    @abstractmethod
    def forward(
        self, backend: "ComputeBackend", weights: Weights, buffers: Mapping[str, torch.Tensor], timer: Any = None
    ) -> torch.Tensor:
        """One whole call over the static ``buffers``: runs the three stages through ``backend``."""
