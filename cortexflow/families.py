"""The policy families and where each one's parts live: the registry the generic front ends dispatch through.

A family is the set of model types that share an engine (buffers, decode loop, graph capture):

* flow matching (Pi0, Pi0.5): :class:`~cortexflow.engine.VLAInferenceEngine`;
* token decoding (OpenVLA, RT-2 style): :class:`~cortexflow.decoding_engine.TokenVLAEngine`;
* history (RT-1): :class:`~cortexflow.history_engine.RT1Engine`.

Every front end that takes any model (``serving.policy.build_policy``, ``tools.verify.run_verify``,
``tools.bench.run_bench``, ``tools.profile.run_profile``) looks the model type's family up here and calls the
part the family names for its role, imported on first use. A front end therefore never imports a family's
module, and a family's module may import the front end's shared pieces without an import circle.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from cortexflow.config import (
    FLOW_MATCHING_MODELS,
    HISTORY_MODELS,
    TOKEN_DECODING_MODELS,
    VLAModelType,
)
from cortexflow.errors import ConfigError

#: What a family part does, by role:
#: ``serve``: ``(options, model_type, log) -> served policy`` (``cortexflow serve``);
#: ``verify``: ``run_verify``'s keyword arguments -> the verify report;
#: ``bench``: ``(model, size, seed, dtype, device) -> workload`` (its ``cases``, ``run`` and ``note``);
#: ``profile``: ``run_profile``'s keyword arguments -> the profile report.
ROLES = ("serve", "verify", "bench", "profile")


@dataclass(frozen=True)
class PolicyFamily:
    """One family: its name, its model types and, per role, the ``"module:attribute"`` path of its part."""

    name: str
    models: tuple[VLAModelType, ...]
    parts: Mapping[str, str] = field(default_factory=dict)

    def part(self, role: str) -> Callable[..., Any]:
        """The family's part for ``role`` (imported now); ``ConfigError`` naming the role when it has none."""
        path = self.parts.get(role)
        if path is None:
            names = ", ".join(m.value for m in self.models)
            raise ConfigError(f"{role} does not cover {names} (the {self.name} policies)")
        module, _, attribute = path.partition(":")
        return getattr(importlib.import_module(module), attribute)


FLOW_MATCHING = PolicyFamily("flow-matching", FLOW_MATCHING_MODELS, {
    "serve": "cortexflow.serving.policy:build_flow_policy",
    "verify": "cortexflow.tools.verify:run_flow_verify",
    "bench": "cortexflow.tools.bench:FlowWorkload",
    "profile": "cortexflow.tools.profile:run_flow_profile",
})
TOKEN_DECODING = PolicyFamily("token-decoding", TOKEN_DECODING_MODELS, {
    "serve": "cortexflow.serving.decoding_policy:build_token_policy",
    "verify": "cortexflow.tools.decoding_verify:run_token_verify",
    "bench": "cortexflow.tools.bench_workloads:TokenWorkload",
    "profile": "cortexflow.tools.decoding_profile:run_token_profile",
})
HISTORY = PolicyFamily("history", HISTORY_MODELS, {
    "serve": "cortexflow.serving.history_policy:build_rt1_policy",
    "verify": "cortexflow.tools.history_verify:run_rt1_verify",
    "bench": "cortexflow.tools.bench_workloads:RT1Workload",
})

FAMILIES = (FLOW_MATCHING, TOKEN_DECODING, HISTORY)


def models_for(role: str) -> tuple[VLAModelType, ...]:
    """The model types whose family has a part for ``role`` (what a command for that role accepts)."""
    return tuple(model for family in FAMILIES if role in family.parts for model in family.models)


def family_of(model: "VLAModelType | str") -> PolicyFamily:
    """The family of ``model`` (a model type or its name, as :meth:`VLAModelType.parse` reads it)."""
    model_type = VLAModelType.parse(model)
    return next(family for family in FAMILIES if model_type in family.models)
