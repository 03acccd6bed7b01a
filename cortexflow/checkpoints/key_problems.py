"""The key problems a checkpoint report carries (missing, unexpected, mis-shaped, wrongly typed tensors)
and the one message that names them; shared by the Pi0-family and OpenVLA reports."""

from __future__ import annotations

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
