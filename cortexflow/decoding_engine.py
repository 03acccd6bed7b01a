"""``TokenVLAEngine``, the token-decoding family's engine: one image + a prompt -> greedy action tokens ->
un-normalised actions.

Used by OpenVLA and the RT-2-style PaliGemma policy; the shared engine machinery (device, backend, graph
capture) is :class:`~cortexflow.engine.PolicyEngine`. The prompt ids are right-padded to a bucket (a
multiple of ``bucket`` ids, at most the model's ``max_text_tokens``) so that prompts of similar length
share static buffers; padding sits after the real tokens, where causal (or prefix-valid) attention never
looks. On a GPU the whole call (vision, prefill, every single-token step with its argmax) is captured
once per bucket in one CUDA graph and replayed; the step's position is a tensor, so the replay needs no
Python per token. Tokens are mapped to actions by id.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch

from cortexflow.engine import PolicyEngine
from cortexflow.errors import InputError, TokenizerError

DEFAULT_BUCKET = 16


class TokenVLAEngine(PolicyEngine):
    """Runs a token-decoding policy (``OpenVLAModel``, ``RT2Model``) on one backend and device.

    ``weights`` are canonical-name tensors on ``device``, or on the host with ``precision="fp8"`` (the backend moves
    them, quantising the language model layer by layer); ``unnormalize`` maps normalised actions
    to robot actions (None: actions stay normalised); ``constrained`` restricts every argmax to the
    action ids (off by default, as in the OpenVLA reference)."""

    def __init__(
        self,
        model,
        weights: dict[str, torch.Tensor],
        *,
        backend: Any = "pytorch",
        device: str | torch.device = "cuda",
        dtype: torch.dtype = torch.bfloat16,
        tokenizer=None,
        unnormalize: Callable[[np.ndarray], np.ndarray] | None = None,
        unnorm_key: str | None = None,
        use_cuda_graphs: bool = True,
        constrained: bool = False,
        bucket: int = DEFAULT_BUCKET,
        report: Any = None,
        precision: str = "default",
    ):
        super().__init__(backend, device, dtype, use_cuda_graphs, report, precision)
        self.model = model
        self.config = model.config
        self.weights = self.backend.prepare_weights(model, model.prepare_weights(weights))
        self.tokenizer = tokenizer
        self.unnormalize = unnormalize
        self.unnorm_key = unnorm_key
        self.constrained = constrained
        self.bucket = bucket
        self._buffers: dict[int, dict[str, torch.Tensor]] = {}
        self._shared: dict[str, torch.Tensor] | None = None
        self.last_tokens: np.ndarray | None = None

    # ---- public API ---------------------------------------------------------------------------
    def predict(self, image: Any, task_prompt: str | None = None, *, prompt_tokens: Any = None) -> np.ndarray:
        """One RGB image (HWC uint8 / float in [0, 1] / PIL) and a task -> actions (float32 numpy).

        OpenVLA returns ``(action_dim,)``; RT-2 style returns ``(chunk_size, action_dim)``.
        ``prompt_tokens`` (ids, BOS included) replaces the tokenised ``task_prompt``."""
        start = time.perf_counter()
        ids = self.prompt_ids(task_prompt, prompt_tokens)
        pixels = self.model.prepare_image(image)
        prepared = time.perf_counter()
        tokens = self.generate(pixels, ids)
        finished = time.perf_counter()
        actions = self.model.tokens_to_actions(tokens)
        if self.unnormalize is not None:
            actions = self.unnormalize(actions)
        self.record_timings(start, prepared, finished)
        return np.asarray(actions, dtype=np.float32)

    def prompt_ids(self, task_prompt: str | None, prompt_tokens: Any = None) -> list[int]:
        """The prompt ids the model sees (checked, with the model's closing ids appended)."""
        from cortexflow.processing.vla_inputs import check_prompt_ids

        if prompt_tokens is not None:
            ids = check_prompt_ids(prompt_tokens, self.config.vocab_size, self.config.max_text_tokens)
        else:
            if self.tokenizer is None:
                raise TokenizerError("a text task_prompt needs a tokenizer (the checkpoint's tokenizer.model; "
                                     "pass tokenizer_path=), or pass prompt_tokens=")
            ids = self.model.prompt_ids(self.tokenizer, task_prompt)
        ids = self.model.finish_prompt_ids(ids)
        if len(ids) > self.config.max_text_tokens:
            raise InputError(f"the prompt is {len(ids)} tokens long; this engine takes at most "
                             f"{self.config.max_text_tokens} (raise max_text_tokens in model_config)")
        return ids

    def generate(self, pixels: torch.Tensor, ids: list[int]) -> np.ndarray:
        """Greedy action tokens for prepared pixel values and prompt ids (int64 numpy)."""
        length = self.bucket_length(len(ids))
        buffers = self.buffers(length)
        buffers["images"].copy_(pixels[None])
        padded = torch.zeros(1, length, dtype=torch.int64)
        padded[0, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        buffers["token_ids"].copy_(padded)
        real = self.model.prefill_length(len(ids))
        buffers["last_index"].fill_(real - 1)
        buffers["start"].fill_(real)
        with torch.inference_mode():
            self.run_forward(length, buffers, constrained=self.constrained)
            tokens = buffers["tokens"].to("cpu", copy=True).numpy()[0]
        self.last_tokens = tokens
        return tokens

    # ---- internals ----------------------------------------------------------------------------
    def bucket_length(self, num_ids: int) -> int:
        """Padded prompt length: ``num_ids`` rounded up to the bucket, capped at ``max_text_tokens``."""
        return min(-(-num_ids // self.bucket) * self.bucket, self.config.max_text_tokens)

    def buffers(self, length: int) -> dict[str, torch.Tensor]:
        """Static buffers for prompts padded to ``length`` (the cache and outputs are shared by all)."""
        if length not in self._buffers:
            shapes = self.model.get_buffer_shapes(prompt_len=length)
            if self._shared is None:
                self._shared = {name: self.zeros(name, shape) for name, shape in shapes.items() if name != "token_ids"}
            self._buffers[length] = dict(self._shared, token_ids=self.zeros("token_ids", shapes["token_ids"]))
        return self._buffers[length]

