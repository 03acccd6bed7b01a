"""Pre- and post-processing for Pi0 / Pi0.5: images, state/action normalisation, prompt tokenisation."""

from cortexflow.processing.images import prepare_image_masks, prepare_images, prepare_images_on_device, resize_with_pad
from cortexflow.processing.normalization import (
    NormStats,
    load_norm_stats,
    normalize,
    pad_to_dim,
    unnormalize,
)
from cortexflow.processing.tokenizer import (
    PromptTokenizer,
    clean_prompt,
    discretize_state,
    tokenize_ids,
    tokenize_pi0_prompt,
    tokenize_pi05_prompt,
)

__all__ = [
    "NormStats",
    "PromptTokenizer",
    "clean_prompt",
    "discretize_state",
    "load_norm_stats",
    "normalize",
    "pad_to_dim",
    "prepare_image_masks",
    "prepare_images",
    "prepare_images_on_device",
    "resize_with_pad",
    "tokenize_ids",
    "tokenize_pi0_prompt",
    "tokenize_pi05_prompt",
    "unnormalize",
]
