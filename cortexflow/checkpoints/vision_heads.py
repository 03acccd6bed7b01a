"""The SigLIP head count of a safetensors checkpoint, which its tensor shapes do not determine.

The PyTorch layouts store each attention projection as a (width, width) matrix, so the number of heads
comes from the checkpoint's config: Hugging Face PaliGemma's ``vision_config.num_attention_heads``
when present, else the head count of the published SigLIP / ViT variant of that width (big_vision's
variant names: Ti 192/3, S 384/6, M 512/8, B 768/12, L 1024/16, So400m 1152/16, H 1280/16, g 1408/16,
g-opt 1536/16, G 1664/16, e 1792/16). openpi's and LeRobot's configs name only Gemma variants
(``paligemma_variant``, ``action_expert_variant``); both pair every one of them with So400m/14, the
1152 entry. An unpublished width falls back to 16 heads with a warning.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

from cortexflow.errors import CortexFlowWarning

PUBLISHED_WIDTH_HEADS = {192: 3, 384: 6, 512: 8, 768: 12, 1024: 16, 1152: 16, 1280: 16, 1408: 16, 1536: 16,
                         1664: 16, 1792: 16}
DEFAULT_HEADS = 16


def siglip_head_count(checkpoint_config: Mapping[str, Any], width: int) -> int:
    """Number of SigLIP attention heads for a vision tower of ``width`` (see module doc for the order)."""
    vision = checkpoint_config.get("vision_config")
    if isinstance(vision, Mapping) and isinstance(vision.get("num_attention_heads"), int):
        return vision["num_attention_heads"]
    if width in PUBLISHED_WIDTH_HEADS:
        return PUBLISHED_WIDTH_HEADS[width]
    warnings.warn(
        f"the checkpoint does not say how many heads its SigLIP tower of width {width} has (no "
        f"vision_config.num_attention_heads in config.json, and {width} is not a published SigLIP width); "
        f"using {DEFAULT_HEADS}. Pass model_config={{'num_vision_heads': N}} if it was trained with another count",
        CortexFlowWarning,
        stacklevel=3,
    )
    return DEFAULT_HEADS
