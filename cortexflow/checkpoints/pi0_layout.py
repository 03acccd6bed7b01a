"""Pi0 / Pi0.5 checkpoint key layouts under their earlier import path; :mod:`cortexflow.models.pi0_keys` holds
them (the model matches its keys with them, and ``models/`` never imports ``checkpoints/``)."""

from cortexflow.models.pi0_keys import (  # noqa: F401
    PALIGEMMA,
    PALIGEMMA_MODEL,
    VISION,
    LANGUAGE,
    EXPERT,
    EMBEDDING_KEYS,
    LOOKUP_TABLE_KEYS,
    UNUSED_KEYS,
    _LEGACY_PREFIXES,
    _LEGACY_MARKERS,
    _VISION_LAYER,
    _GEMMA_LINEARS,
    PI0_HEADS,
    PI05_HEADS,
    canonical_to_openpi,
    LayoutMatch,
    detect_layout,
    to_openpi_key,
    detect_model_type,
    match_keys,
    to_checkpoint_keys,
)
