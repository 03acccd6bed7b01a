"""The key problems a checkpoint report carries (missing, unexpected, mis-shaped, wrongly typed tensors)
and the one message that names them; shared by the Pi0-family, OpenVLA and RT-1 reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cortexflow.errors import CheckpointError

MAX_NAMES_PER_KIND = 20


class KeyProblems:
    """Mixin for a report dataclass with the list fields ``missing``, ``unexpected``, ``mis_shaped`` and
    ``wrong_dtype`` (checkpoint key names)."""

    missing: list[str]
    unexpected: list[str]
    mis_shaped: list[str]
    wrong_dtype: list[str]

    @property
    def ok(self) -> bool:
        """No tensor is missing, unexpected, mis-shaped or wrongly typed."""
        return not (self.missing or self.unexpected or self.mis_shaped or self.wrong_dtype)

    def problems(self) -> str:
        """One message naming every bad tensor (at most 20 per kind, with the count)."""
        parts = []
        for label, items in (("missing", self.missing), ("unexpected", self.unexpected),
                             ("mis-shaped", self.mis_shaped), ("wrongly typed", self.wrong_dtype)):
            if items:
                shown = ", ".join(items[:MAX_NAMES_PER_KIND])
                if len(items) > MAX_NAMES_PER_KIND:
                    shown += f", ... ({len(items)} in all)"
                parts.append(f"{label} tensors: {shown}")
        return "; ".join(parts)


@dataclass
class RT1CheckpointReport(KeyProblems):
    """How a checkpoint's variables mapped onto the RT-1 model."""

    format: str
    prefix: str = ""
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mis_shaped: list[str] = field(default_factory=list)
    wrong_dtype: list[str] = field(default_factory=list)
    skipped: int = 0

    def raise_if_bad(self, path: Any) -> None:
        if not self.ok:
            raise CheckpointError(f"{path} is not an RT-1 checkpoint of this configuration: {self.problems()}")
