"""``RT1Engine``, the history family's engine: RT-1's history-keeping policy loop
(``docs/reference_facts.md#F-RT1-4``), on the shared :class:`~cortexflow.engine.PolicyEngine` machinery.

Each episode keeps the image tokens of its last ``T`` frames (6 for RT-1) and a frame count in static
device buffers; a step tokenizes only the new frame (the reference's token reuse), writes it into the
history, runs the action transformer once and returns the de-tokenised action dict. ``reset()`` starts
a new episode. ``predict`` runs one episode; ``predict_batch`` runs ``B`` episodes side by side (each
with its own history, optionally reset per call). On a GPU the whole step (resize, tokenizer,
history update, transformer, argmax) is one CUDA graph per batch size.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from cortexflow.cuda_graphs import capture_cuda_graph
from cortexflow.engine import PolicyEngine
from cortexflow.errors import InputError, TokenizerError

TextEncoder = Callable[[str], Any]
#: The buffers that hold an episode's state between steps.
EPISODE_STATE = ("history", "step")


class RT1Engine(PolicyEngine):
    """Runs an ``RT1Model`` step by step, keeping each episode's frame-token history on the device.

    ``weights``: canonical-name tensors; ``text_encoder``: maps an instruction string to its 512-D
    Universal Sentence Encoder embedding (None: pass ``instruction_embedding`` to ``predict``)."""

    def __init__(self, model, weights: Mapping[str, torch.Tensor], *, backend: Any = "pytorch",
                 device: str | torch.device = "cuda", dtype: torch.dtype = torch.float32,
                 use_cuda_graphs: bool = True, text_encoder: TextEncoder | None = None, report: Any = None):
        super().__init__(backend, device, dtype, use_cuda_graphs, report)
        self.model = model
        self.config = model.config
        placed = {k: v.to(self.device, model.weight_dtype(k, dtype)) for k, v in weights.items()}
        self.weights = self.backend.prepare_weights(model, placed)
        self.text_encoder = text_encoder
        self._buffers: dict[int, dict[str, torch.Tensor]] = {}
        self._embeddings: dict[str, np.ndarray] = {}
        self.last_tokens: np.ndarray | None = None

    # ---- public API ---------------------------------------------------------------------------
    def predict(self, image: Any, instruction_embedding: Any = None,
                task_prompt: str | None = None) -> dict[str, np.ndarray]:
        """One frame of the current episode -> the action dict (``world_vector (3,)``, ``rotation_delta
        (3,)``, ``gripper_closedness_action (1,)``, ..., ``terminate_episode (3,)`` one-hot int32).

        ``image``: ``(H, W, 3)`` uint8, or float in [0, 1], at the configured ``input_size``;
        ``instruction_embedding``: the 512-D USE embedding of the instruction (or ``task_prompt``, a
        string, with a text encoder configured)."""
        context = self._context(instruction_embedding, task_prompt, "instruction_embedding")
        actions = self._step(self._image(image, "image")[None], context[None], None)
        return {name: value[0] for name, value in actions.items()}

    def predict_batch(self, images: Any, instruction_embeddings: Any = None, task_prompts: Sequence[str] | None = None,
                      reset: Sequence[bool] | None = None) -> dict[str, np.ndarray]:
        """One frame for each of ``B`` episodes -> action dict of ``(B, ...)`` arrays.

        Episode ``b`` is row ``b`` of every call with this batch size; ``reset[b]`` True starts that
        episode afresh before this frame (the first call of a batch size starts all of them)."""
        if isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)
        if not isinstance(images, (list, tuple)) or not images:
            raise InputError("images must be a non-empty list of (H, W, 3) frames or a (B, H, W, 3) array")
        batch = len(images)
        pixels = np.stack([self._image(img, f"images[{i}]") for i, img in enumerate(images)])
        contexts = []
        for i in range(batch):
            emb = None if instruction_embeddings is None else instruction_embeddings[i]
            text = None if task_prompts is None else task_prompts[i]
            contexts.append(self._context(emb, text, f"instruction_embeddings[{i}]"))
        if reset is not None and len(reset) != batch:
            raise InputError(f"reset has {len(reset)} flags for {batch} episodes")
        return self._step(pixels, np.stack(contexts), reset)

    def new_episode(self) -> dict[str, torch.Tensor]:
        """A fresh episode state (frame-token history and frame count) for ``predict_episode``: one per robot
        when several robots share this engine one frame at a time (the server keeps one per connection)."""
        buffers = self.buffers(1)
        return {name: torch.zeros_like(buffers[name]) for name in EPISODE_STATE}

    def predict_episode(self, episode: dict[str, torch.Tensor], image: Any, instruction_embedding: Any = None,
                        task_prompt: str | None = None, reset: bool = False) -> dict[str, np.ndarray]:
        """:meth:`predict` on ``episode`` (from :meth:`new_episode`) instead of the engine's own batch-1 episode:
        its state is copied into the static buffers, stepped, and copied back (``reset``: start it afresh)."""
        context = self._context(instruction_embedding, task_prompt, "instruction_embedding")
        pixels = self._image(image, "image")[None]
        buffers = self.buffers(1)
        own = {name: buffers[name].clone() for name in EPISODE_STATE}
        for name in EPISODE_STATE:
            buffers[name].copy_(episode[name])
        try:
            actions = self._step(pixels, context[None], [reset])
            for name in EPISODE_STATE:
                episode[name].copy_(buffers[name])
        finally:
            for name in EPISODE_STATE:
                buffers[name].copy_(own[name])
        return {name: value[0] for name, value in actions.items()}

    def reset(self) -> None:
        """Start new episodes: forget every frame of every batch size."""
        for buffers in self._buffers.values():
            buffers["history"].zero_()
            buffers["step"].zero_()

    def frames_seen(self, batch_size: int = 1) -> np.ndarray:
        """Frames each episode of ``batch_size`` has seen since its reset."""
        if batch_size not in self._buffers:
            return np.zeros(batch_size, dtype=np.int64)
        return self._buffers[batch_size]["step"].cpu().numpy()

    def encode_instruction(self, text: str) -> np.ndarray:
        """The instruction's 512-D embedding from the configured text encoder (cached per string)."""
        if self.text_encoder is None:
            raise TokenizerError("a text task_prompt needs a sentence encoder: pass use_model_path= (a local "
                                 "Universal Sentence Encoder SavedModel, needs `pip install tensorflow-cpu`) or "
                                 "text_encoder= to create_rt1_inference, or pass instruction_embedding=")
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"task_prompt must be a non-empty string, got {text!r}")
        if text not in self._embeddings:
            self._embeddings[text] = self._check_embedding(self.text_encoder(text), "the text encoder's output")
        return self._embeddings[text]

    # ---- internals ----------------------------------------------------------------------------
    def _step(self, pixels: np.ndarray, contexts: np.ndarray, reset: Sequence[bool] | None) -> dict[str, np.ndarray]:
        from cortexflow.models.rt1 import detokenize_actions

        start = time.perf_counter()
        buffers = self.buffers(len(pixels))
        if reset is not None:
            flags = torch.tensor([bool(r) for r in reset], device=self.device)
            buffers["history"].masked_fill_(flags[:, None, None, None], 0)
            buffers["step"].masked_fill_(flags, 0)
        buffers["images"].copy_(torch.from_numpy(pixels).permute(0, 3, 1, 2))
        buffers["context"].copy_(torch.from_numpy(contexts))
        prepared = time.perf_counter()
        with torch.inference_mode():
            self.run_forward(len(pixels), buffers)
            tokens = buffers["tokens"].to("cpu", copy=True).numpy()
        finished = time.perf_counter()
        self.last_tokens = tokens
        actions = detokenize_actions(tokens, self.config.actions, self.config.vocab_size)
        self.record_timings(start, prepared, finished)
        return actions

    def _image(self, image: Any, name: str) -> np.ndarray:
        """A frame as float32 ``(H, W, 3)`` in [0, 1] (``uint8`` is divided by 255)."""
        h, w = self.config.input_size
        if isinstance(image, torch.Tensor):
            image = image.detach().cpu().numpy()
        array = np.asarray(image)
        if array.shape != (h, w, 3):
            raise InputError(f"{name} has shape {array.shape}; RT-1 takes ({h}, {w}, 3) RGB frames (resize with "
                             "padding to that size first, as SimplerEnv does, or set input_size in model_config)")
        if array.dtype == np.uint8:
            return array.astype(np.float32) / np.float32(255.0)
        if array.dtype not in (np.float32, np.float64):
            raise InputError(f"{name} has dtype {array.dtype}; pass uint8 in [0, 255] or float in [0, 1]")
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise InputError(f"{name} is float but not within [0, 1] (min {np.nanmin(array):.3g}, max "
                             f"{np.nanmax(array):.3g}); pass uint8 frames or floats in [0, 1]")
        return array.astype(np.float32)

    def _context(self, embedding: Any, text: str | None, name: str) -> np.ndarray:
        if embedding is not None:
            return self._check_embedding(embedding, name)
        if text is None:
            raise InputError(f"pass {name} (the {self.config.context_dim}-D Universal Sentence Encoder embedding "
                             "of the instruction) or a task_prompt with a text encoder configured")
        return self.encode_instruction(text)

    def _check_embedding(self, embedding: Any, name: str) -> np.ndarray:
        if isinstance(embedding, torch.Tensor):
            embedding = embedding.detach().cpu().numpy()
        array = np.asarray(embedding)
        dim = self.config.context_dim
        if array.shape not in ((dim,), (1, dim)):
            raise InputError(f"{name} has shape {array.shape}; expected a {dim}-D instruction embedding (Universal "
                             "Sentence Encoder output)")
        if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
            raise InputError(f"{name} must be finite floats, got dtype {array.dtype}")
        return array.reshape(dim).astype(np.float32)

    def buffers(self, batch_size: int) -> dict[str, torch.Tensor]:
        """The static buffers (and episode state) of ``batch_size`` episodes."""
        if batch_size not in self._buffers:
            shapes = self.model.get_buffer_shapes(batch_size=batch_size)
            self._buffers[batch_size] = {name: self.zeros(name, shape) for name, shape in shapes.items()}
        return self._buffers[batch_size]

    def _capture(self, buffers: dict[str, torch.Tensor], run) -> "torch.cuda.CUDAGraph":
        """Capture one step of a batch of episodes (two warm-up steps on a side stream first, then the
        episode state they touched is restored)."""
        saved = {name: buffers[name].clone() for name in EPISODE_STATE}
        graph = capture_cuda_graph(run, self.device)
        for name, value in saved.items():
            buffers[name].copy_(value)
        return graph


def universal_sentence_encoder(path: str | Path) -> TextEncoder:
    """A text -> 512-D embedding function from a local Universal Sentence Encoder SavedModel (e.g. an
    unpacked ``universal-sentence-encoder-large/5``); runs it with TensorFlow (an optional dependency)."""
    try:
        import tensorflow as tf
    except ImportError as err:
        raise TokenizerError("computing RT-1 instruction embeddings from text needs TensorFlow to run the "
                             "Universal Sentence Encoder: `pip install tensorflow-cpu`, or pass "
                             "instruction_embedding= (a 512-D array) instead") from err
    path = Path(path).expanduser()
    if not (path / "saved_model.pb").is_file():
        raise TokenizerError(f"{path} is not a Universal Sentence Encoder SavedModel folder (no saved_model.pb)")
    module = tf.saved_model.load(str(path))
    return lambda text: module([text]).numpy()[0]
