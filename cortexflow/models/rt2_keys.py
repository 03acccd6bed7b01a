"""RT-2 checkpoint keys: the PaliGemma part of an openpi / LeRobot checkpoint mapped onto the RT-2 policy's
canonical weight names (the model matches a checkpoint with these; ``checkpoints/rt2_layout.py`` reads files).
``config`` is an ``RT2Config``; ``wanted`` the model's canonical weight names."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from cortexflow.errors import CheckpointError
from cortexflow.models.pi0_keys import (
    EMBEDDING_KEYS,
    EXPERT,
    LANGUAGE,
    PI0_HEADS,
    PI05_HEADS,
    canonical_to_openpi,
    detect_layout,
    to_openpi_key,
)

FINAL_NORM = LANGUAGE + "norm.weight"
_SKIPPED_PREFIXES = (EXPERT, "paligemma_with_expert.gemma_expert.", "time_mlp_")
_SKIPPED_HEADS = tuple(f"{h}." for h in (*PI0_HEADS, *PI05_HEADS))


@dataclass
class RT2Match:
    """How a checkpoint's keys map onto the RT-2 model's canonical names."""

    layout: str
    sources: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def raise_if_bad(self, what: str) -> None:
        if self.missing or self.unexpected:
            raise CheckpointError(
                f"{what} does not hold a PaliGemma backbone for the RT-2-style policy: "
                f"missing {self.missing[:20]}{' ...' if len(self.missing) > 20 else ''}; "
                f"unexpected {self.unexpected[:20]}{' ...' if len(self.unexpected) > 20 else ''}"
            )


def canonical_to_paligemma(config, wanted: Iterable[str]) -> dict[str, str]:
    """Canonical RT-2 weight name (of ``wanted``) -> openpi key (vision, projector, language model and its final norm)."""
    wanted = set(wanted)
    names = {k: v for k, v in canonical_to_openpi(config.paligemma).items() if k in wanted}
    names["llm.norm"] = FINAL_NORM
    return names


def match_rt2_keys(raw_keys: Iterable[str], config, wanted: Iterable[str]) -> RT2Match:
    """Map raw keys (openpi, LeRobot or legacy LeRobot spelling) onto the canonical names."""
    raw_keys = list(raw_keys)
    layout = detect_layout(raw_keys)
    by_openpi = {to_openpi_key(k, layout): k for k in raw_keys}
    match = RT2Match(layout=layout)
    used: set[str] = set()
    for canonical, key in canonical_to_paligemma(config, wanted).items():
        candidates = EMBEDDING_KEYS if canonical == "llm.embed" else (key,)
        found = [by_openpi[c] for c in candidates if c in by_openpi]
        if found:
            match.sources[canonical] = found[0]
            used.update(found)
        else:
            match.missing.append(f"{key} ({canonical})")
    for key, raw in by_openpi.items():
        if raw in used:
            continue
        if key.startswith(_SKIPPED_PREFIXES) or key.startswith(_SKIPPED_HEADS):
            match.skipped.append(raw)
        else:
            match.unexpected.append(raw)
    return match
