"""Turn one robot observation into model inputs, and model outputs back into robot actions.

``ObservationPreprocessor`` runs a policy's input steps (:mod:`cortexflow.policies.transforms`), then validates
and converts images (resize-with-pad, [-1, 1], NCHW), view masks, the prompt (tokenised in the Pi0 or Pi0.5
format, or given as ids) and the state (normalised, zero-padded); ``ActionPostprocessor`` runs the output steps
(by default: un-normalise the action chunk). Both are plain callables so an engine's ``preprocessor`` /
``postprocessor`` can be replaced; :mod:`cortexflow.policies.pipeline` configures them from a policy config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cortexflow.config import ModelConfig, VLAModelType
from cortexflow.errors import ConfigError, InputError, NormStatsError, TokenizerError
from cortexflow.policies.normalize import FeatureNormalizer
from cortexflow.policies.transforms import EngineRequest, Unnormalize, apply_inputs, apply_outputs, invert_outputs
from cortexflow.processing import (
    NormStats,
    PromptTokenizer,
    normalize,
    pad_to_dim,
    prepare_image_masks,
    prepare_images,
    prepare_images_on_device,
    tokenize_ids,
    tokenize_pi0_prompt,
    tokenize_pi05_prompt,
)
from cortexflow.processing.tokenizer import tokenize_joined_newline_prompt

if TYPE_CHECKING:
    from cortexflow.policies.pipeline import PolicyPipeline

PROMPT_FORMATS = ("openpi", "lerobot")


def normalization_mode(model_type: VLAModelType) -> str:
    """Pi0 uses z-score statistics, Pi0.5 quantiles (openpi ``use_quantile_norm``)."""
    return "zscore" if model_type == VLAModelType.PI0 else "quantile"


@dataclass
class ObservationPreprocessor:
    """Callable: one observation -> dict of CPU tensors named like the model's static buffers.

    Output layout: ``images (V, 3, S, S)`` fp32, ``image_masks (V,)`` bool, ``token_ids (L,)`` int64,
    ``token_mask (L,)`` bool, when the model takes it ``state (A,)`` fp32 (normalised, padded), and when a state
    was used ``robot_state (D,)`` fp32 (after the input steps, before normalisation; the output steps' state).

    ``input_steps`` run first on the call's arguments. ``state_normalizer`` replaces the model type's default
    normalisation with ``state_stats`` (z-score for Pi0, quantile for Pi0.5). ``prompt_format``: ``"openpi"``
    (cleaned prompt, ``"\n"`` tokenised separately) or ``"lerobot"`` (LeRobot's Pi0: the prompt as given plus
    ``"\n"``, one string; Pi0.5 prompts are the same in both). ``state_prompt_width``: zero-pad the normalised
    state to this width before it is written into a Pi0.5 prompt (LeRobot 0.4.x). ``state_required``: a state
    must be given even when the model does not read it (output steps that add it back). ``state_dim``: the robot
    state's length when the policy defines it (used for synthetic warm-up calls)."""

    config: ModelConfig
    num_views: int
    tokenizer: PromptTokenizer | None = None
    state_stats: NormStats | None = None
    discrete_state_input: bool = False
    uses_state_token: bool = True
    input_steps: tuple = ()
    state_normalizer: FeatureNormalizer | None = None
    prompt_format: str = "openpi"
    state_prompt_width: int | None = None
    state_required: bool = False
    state_dim: int | None = None

    def __post_init__(self) -> None:
        if self.prompt_format not in PROMPT_FORMATS:
            raise ConfigError(f"prompt_format must be one of {PROMPT_FORMATS}, got {self.prompt_format!r}")

    def __call__(
        self,
        images: Any,
        prompt: str | None = None,
        state: Any = None,
        prompt_tokens: Any = None,
        image_masks: Any = None,
        images_out: np.ndarray | torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``images_out``: where to write the float32 ``(V, 3, S, S)`` images: a host array (the engine's staging
        buffer; :func:`~cortexflow.processing.images.prepare_images`) or a tensor on a GPU (the engine's static
        buffer; :func:`~cortexflow.processing.images.prepare_images_on_device`); the returned ``images`` is it."""
        if self.input_steps:
            request = apply_inputs(self.input_steps, EngineRequest(images, image_masks, state, prompt, prompt_tokens))
            images, image_masks, state = request.images, request.image_masks, request.state
            prompt, prompt_tokens = request.prompt, request.prompt_tokens
        if isinstance(images_out, torch.Tensor) and images_out.device.type != "cpu":
            prepared = prepare_images_on_device(images, self.num_views, images_out)
        else:
            prepared = prepare_images(images, self.num_views, self.config.image_size, out=images_out)
        out = {
            "images": prepared,
            "image_masks": prepare_image_masks(image_masks, self.num_views),
        }
        needs_state = self.uses_state_token or self.state_required or (self.discrete_state_input and prompt_tokens is None)
        normalized = None
        if needs_state:
            raw = self.checked_state(state)
            normalized = self.normalize_state(raw)
            out["robot_state"] = torch.from_numpy(raw)
        ids, mask = self.tokens(prompt, prompt_tokens, normalized)
        out["token_ids"] = torch.from_numpy(ids)
        out["token_mask"] = torch.from_numpy(mask)
        if self.uses_state_token:
            out["state"] = torch.from_numpy(pad_to_dim(normalized, self.config.action_dim).astype(np.float32))
        return out

    def normalized_state(self, state: Any) -> np.ndarray:
        """The robot state as a finite 1-D fp32 array, normalised when statistics are loaded."""
        return self.normalize_state(self.checked_state(state))

    def checked_state(self, state: Any) -> np.ndarray:
        """The robot state as a finite, non-empty 1-D fp32 array."""
        if state is None:
            raise InputError(
                f"this {self.config.model_type.value} policy needs the robot state: pass state= as a 1-D array "
                f"of length {self.state_stats.dim if self.state_stats else f'<= {self.config.action_dim}'}"
            )
        if isinstance(state, torch.Tensor):
            state = state.detach().float().cpu().numpy()
        try:
            array = np.asarray(state, dtype=np.float32)
        except (TypeError, ValueError) as err:
            raise InputError(f"state must be a 1-D array of numbers, got {type(state).__name__}: {err}") from err
        if array.ndim != 1 or array.size == 0:
            raise InputError(f"state must be a non-empty 1-D array, got shape {array.shape}")
        if not np.isfinite(array).all():
            raise InputError(f"state contains NaN or inf at indices {np.flatnonzero(~np.isfinite(array)).tolist()}")
        return array

    def normalize_state(self, array: np.ndarray) -> np.ndarray:
        """A checked state normalised with the state normaliser, or the stats in the model type's mode."""
        if self.state_normalizer is not None:
            if array.size > self.config.action_dim:
                raise InputError(f"state has length {array.size}; the model takes at most {self.config.action_dim} values")
            return self.state_normalizer.normalize(array)
        if self.state_stats is not None:
            if array.size != self.state_stats.dim:
                raise InputError(
                    f"state has length {array.size} but the norm stats describe a state of length {self.state_stats.dim}"
                )
            return normalize(array, self.state_stats, normalization_mode(self.config.model_type))
        if array.size > self.config.action_dim:
            raise InputError(f"state has length {array.size}; the model takes at most {self.config.action_dim} values")
        return array

    def tokens(self, prompt: str | None, prompt_tokens: Any, normalized_state: np.ndarray | None):
        """Token ids and mask ``(max_token_len,)`` from a string prompt or from given ids."""
        max_len = self.config.max_token_len
        if prompt is not None and prompt_tokens is not None:
            raise InputError("pass either task_prompt or prompt_tokens, not both")
        if prompt_tokens is not None:
            return tokenize_ids(prompt_tokens, max_len, self.config.vocab_size)
        if prompt is None:
            raise InputError("no prompt: pass task_prompt (with a tokenizer) or prompt_tokens (token ids)")
        if not isinstance(prompt, str):
            raise InputError(f"task_prompt must be a string, got {type(prompt).__name__}")
        if self.tokenizer is None:
            raise TokenizerError(
                "a string prompt needs a tokenizer: pass tokenizer_path= (a PaliGemma tokenizer.model or a "
                "Hugging Face tokenizer folder), or pass prompt_tokens= with token ids"
            )
        if self.discrete_state_input:
            if self.state_prompt_width is not None:
                normalized_state = pad_to_dim(normalized_state, self.state_prompt_width)
            return tokenize_pi05_prompt(self.tokenizer, prompt, normalized_state, max_len)
        if self.prompt_format == "lerobot":
            return tokenize_joined_newline_prompt(self.tokenizer, prompt, max_len)
        return tokenize_pi0_prompt(self.tokenizer, prompt, max_len)


@dataclass
class ActionPostprocessor:
    """Callable: normalised action chunk ``(..., H, A)`` and the robot states ``(..., D)`` of the call (or None)
    -> robot actions, through ``steps`` (output steps). ``steps=None``: un-normalise with ``action_stats`` in the
    model type's mode when they exist, else nothing."""

    model_type: VLAModelType
    action_stats: NormStats | None = None
    steps: tuple | None = None

    def __post_init__(self) -> None:
        if self.steps is None:
            mode = "MEAN_STD" if normalization_mode(self.model_type) == "zscore" else "QUANTILES"
            self.steps = () if self.action_stats is None else (
                Unnormalize(FeatureNormalizer("actions", mode, self.action_stats)),)

    def __call__(self, actions: np.ndarray, states: np.ndarray | None = None) -> np.ndarray:
        if not self.steps:
            return actions
        return apply_outputs(self.steps, actions, states)

    def to_model_space(self, actions: np.ndarray, states: np.ndarray | None = None) -> np.ndarray:
        """The inverse of ``__call__``: robot actions ``(..., W)`` back through every output step (normalised,
        deltas against ``states`` where the policy predicts deltas), fp32. Real-time chunking guides a new
        chunk towards the previous one in this space."""
        return invert_outputs(self.steps, actions, states)


def split_norm_stats(stats: dict[str, NormStats] | None, normalize_requested: bool | None):
    """(state stats, action stats) to use, checking that normalisation asked for has its statistics."""
    if normalize_requested is False:
        return None, None
    if stats is None:
        if normalize_requested:
            raise NormStatsError(
                "normalize=True but no norm stats were given: pass norm_stats_path= (an openpi norm_stats.json, "
                "a checkpoint folder with assets/*/norm_stats.json, or LeRobot stats)"
            )
        return None, None
    return stats.get("state"), stats.get("actions")


def install_pipeline(pipeline: "PolicyPipeline", engine: Any) -> None:
    """Replace ``engine.preprocessor`` / ``engine.postprocessor`` by ``pipeline``'s (keeping the tokenizer)."""
    pipeline.check_model_type(engine.config.model_type, "the loaded model")
    if pipeline.action_dim is not None and engine.config.action_dim != pipeline.action_dim:
        raise ConfigError(f"{pipeline.source} runs a model with {pipeline.action_dim}-D actions but the checkpoint's "
                          f"has {engine.config.action_dim}-D actions")
    previous = engine.preprocessor
    engine.preprocessor = ObservationPreprocessor(
        config=engine.config,
        num_views=engine.num_views,
        tokenizer=getattr(previous, "tokenizer", None),
        state_stats=None if pipeline.state_normalizer is None else pipeline.state_normalizer.stats,
        discrete_state_input=engine.config.discrete_state_input,
        uses_state_token=getattr(previous, "uses_state_token", True),
        input_steps=pipeline.input_steps,
        state_normalizer=pipeline.state_normalizer,
        prompt_format=pipeline.prompt_format,
        state_prompt_width=pipeline.state_prompt_width,
        state_required=pipeline.needs_state,
        state_dim=pipeline.state_dim,
    )
    action_stats = next((step.normalizer.stats for step in pipeline.output_steps if isinstance(step, Unnormalize)), None)
    engine.postprocessor = ActionPostprocessor(engine.config.model_type, action_stats, steps=pipeline.output_steps)
    engine.policy = pipeline
