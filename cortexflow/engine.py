"""``VLAInferenceEngine``: validate inputs, pre-process, run the model's stages on a backend, post-process.

The engine owns the static per-call buffers (one set per batch size) and, on a GPU, one CUDA graph
per batch size that captures the whole forward (vision, prefix, every denoising step). Prompts of
any length up to ``max_token_len`` share one graph: they are padded and masked, never re-captured.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from cortexflow.backends import create_backend
from cortexflow.checkpoints.files import CheckpointFiles
from cortexflow.checkpoints.loader import CheckpointReport, load_pi0_checkpoint
from cortexflow.config import InferenceConfig, ModelConfig, VLAModelType
from cortexflow.errors import BackendUnavailableError, CheckpointError, InputError
from cortexflow.models.base import VLAModel
from cortexflow.preprocessor import ActionPostprocessor, ObservationPreprocessor, split_norm_stats
from cortexflow.processing import PromptTokenizer, load_norm_stats


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> the first GPU if there is one, else CPU; a CUDA device without a GPU is an error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise BackendUnavailableError(f"unknown device {device!r}; expected 'cuda', 'cuda:N', 'cpu' or 'auto'") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError(
            f"device {str(device)!r} asked for but no CUDA GPU is available to this PyTorch "
            f"({torch.__version__}); pass device='cpu' (with dtype='float32' for speed on CPU) or device='auto'"
        )
    return resolved


class StageTimer:
    """Records wall time per named stage (synchronising the GPU around each stage when on CUDA)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times_ms: dict[str, float] = {}

    def __call__(self, stage: str):
        return _TimedStage(self, stage)


class _TimedStage:
    def __init__(self, timer: StageTimer, stage: str):
        self.timer, self.stage = timer, stage

    def __enter__(self):
        if self.timer.device.type == "cuda":
            torch.cuda.synchronize(self.timer.device)
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        if self.timer.device.type == "cuda":
            torch.cuda.synchronize(self.timer.device)
        self.timer.times_ms[self.stage] = (time.perf_counter() - self.start) * 1e3
        return False


class VLAInferenceEngine:
    """Runs one policy on one backend and device.

    ``checkpoint`` is a checkpoint path (openpi PyTorch / LeRobot safetensors) or, with ``model=`` (a
    custom :class:`VLAModel`), a path or an in-memory state dict that ``model.preprocess_checkpoint``
    understands. ``model_config`` is a full :class:`ModelConfig` or a dict of fields to override.
    """

    def __init__(
        self,
        checkpoint: "str | Path | Mapping[str, torch.Tensor]",
        model_config: "ModelConfig | Mapping[str, Any] | None" = None,
        inference_config: InferenceConfig | None = None,
        *,
        model_type: "VLAModelType | str | None" = None,
        model: VLAModel | None = None,
        progress: bool | None = None,
    ):
        self.inference_config = ic = inference_config or InferenceConfig()
        self.device = resolve_device(ic.device)
        self.dtype = ic.dtype
        self.backend = create_backend(ic.backend, self.device, self.dtype)
        self.checkpoint_report: CheckpointReport | None = None
        if model is None:
            expected = VLAModelType.parse(model_type) if model_type is not None else None
            loaded = load_pi0_checkpoint(
                checkpoint, expected, self.device, self.dtype, self._merged_config(model_config), progress
            )
            self.model, weights, self.checkpoint_report = loaded.model, loaded.weights, loaded.report
        else:
            self.model, weights = model, self._load_custom(model, checkpoint)
        self.config: ModelConfig = self.model.config
        self.weights = self.backend.prepare_weights(self.model, weights)
        self.num_views = ic.num_views
        self.chunk_size = self.config.chunk_size
        tokenizer = PromptTokenizer.from_path(ic.tokenizer_path) if ic.tokenizer_path else None
        stats = load_norm_stats(ic.norm_stats_path) if ic.norm_stats_path else None
        state_stats, action_stats = split_norm_stats(stats, ic.normalize)
        buffer_names = self.model.get_buffer_shapes(self.num_views, self.chunk_size)
        self.preprocessor = ObservationPreprocessor(
            config=self.config,
            num_views=self.num_views,
            tokenizer=tokenizer,
            state_stats=state_stats,
            discrete_state_input=self.config.discrete_state_input,
            uses_state_token="state" in buffer_names,
        )
        self.postprocessor = ActionPostprocessor(self.config.model_type, action_stats)
        self.use_cuda_graphs = bool(ic.use_cuda_graphs and self.device.type == "cuda" and self.backend.supports_cuda_graphs)
        self._buffers: dict[int, dict[str, torch.Tensor]] = {}
        self._staging: dict[int, dict[str, torch.Tensor]] = {}
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.last_timings: dict[str, float] = {}

    def _merged_config(self, model_config):
        """The user's model_config plus the run-time overrides of the inference config."""
        ic = self.inference_config
        overrides = {
            name: value
            for name, value in (
                ("chunk_size", ic.chunk_size),
                ("num_diffusion_steps", ic.num_steps),
                ("max_token_len", ic.max_tokenize_len),
                ("discrete_state_input", ic.discrete_state_input),
            )
            if value is not None
        }
        if isinstance(model_config, ModelConfig):
            return model_config.replace(**overrides)
        return {**dict(model_config or {}), **overrides}

    def _load_custom(self, model: VLAModel, checkpoint) -> dict[str, torch.Tensor]:
        """Weights for a user-supplied model: raw tensors -> ``preprocess_checkpoint`` -> shape check -> device."""
        if isinstance(checkpoint, Mapping):
            raw = dict(checkpoint)
        else:
            files = CheckpointFiles.open(checkpoint)
            raw = {name: files.read(name) for name in files.tensors}
        weights = model.preprocess_checkpoint(raw)
        expected = model.get_weight_shapes()
        missing = sorted(set(expected) - set(weights))
        unexpected = sorted(set(weights) - set(expected))
        wrong = [f"{n} {list(weights[n].shape)} (expected {list(expected[n])})"
                 for n in expected if n in weights and tuple(weights[n].shape) != tuple(expected[n])]
        if missing or unexpected or wrong:
            raise CheckpointError(
                f"weights do not match {type(model).__name__}: missing {missing}; unexpected {unexpected}; mis-shaped {wrong}"
            )
        return {n: t.to(device=self.device, dtype=model.weight_dtype(n, self.dtype)) for n, t in weights.items()}

    # ---- public API ---------------------------------------------------------------------------
    def predict(
        self,
        observation_images: Any,
        task_prompt: str | None = None,
        state: Any = None,
        *,
        noise: Any = None,
        prompt_tokens: Any = None,
        image_masks: Any = None,
    ) -> np.ndarray:
        """One observation -> action chunk ``(chunk_size, action_dim)`` fp32 numpy (un-normalised if stats given).

        ``observation_images``: ``num_views`` HWC images (uint8, or float in [-1, 1]) as an array
        ``(V, H, W, 3)`` or a list; ``image_masks``: which views are present; ``noise``: ``(chunk, action_dim)``
        to make the call reproducible; ``prompt_tokens``: token ids instead of ``task_prompt``."""
        start = time.perf_counter()
        sample = self.preprocessor(observation_images, task_prompt, state, prompt_tokens, image_masks,
                                   **self._images_out(1, 0))
        noise_batch = None if noise is None else self._check_noise(noise, batch=None)[None]
        return self._run([sample], noise_batch, start)[0]

    def predict_batch(
        self,
        batch_images: Sequence[Any],
        batch_prompts: Sequence[str | None] | None = None,
        batch_states: Sequence[Any] | None = None,
        *,
        noise: Any = None,
        batch_prompt_tokens: Sequence[Any] | None = None,
        batch_image_masks: Sequence[Any] | None = None,
    ) -> np.ndarray:
        """B observations in one batched forward -> ``(B, chunk_size, action_dim)``.

        Every ``batch_*`` argument is a sequence of length B (or None); ``noise`` is ``(B, chunk, action_dim)``."""
        start = time.perf_counter()
        batch = len(batch_images)
        if batch == 0:
            raise InputError("predict_batch got an empty batch")
        columns = {}
        for name, column in (
            ("batch_prompts", batch_prompts),
            ("batch_states", batch_states),
            ("batch_prompt_tokens", batch_prompt_tokens),
            ("batch_image_masks", batch_image_masks),
        ):
            if column is not None and len(column) != batch:
                raise InputError(f"{name} has {len(column)} entries but batch_images has {batch}")
            columns[name] = column if column is not None else [None] * batch
        samples = [
            self.preprocessor(
                batch_images[i],
                columns["batch_prompts"][i],
                columns["batch_states"][i],
                columns["batch_prompt_tokens"][i],
                columns["batch_image_masks"][i],
                **self._images_out(batch, i),
            )
            for i in range(batch)
        ]
        noise_batch = None if noise is None else self._check_noise(noise, batch=batch)
        return self._run(samples, noise_batch, start)

    # ---- internals ----------------------------------------------------------------------------
    def _check_noise(self, noise: Any, batch: int | None) -> torch.Tensor:
        expected = (self.chunk_size, self.config.action_dim) if batch is None else (batch, self.chunk_size, self.config.action_dim)
        tensor = torch.as_tensor(np.asarray(noise.detach().cpu() if isinstance(noise, torch.Tensor) else noise), dtype=torch.float32)
        if tuple(tensor.shape) != expected:
            raise InputError(f"noise has shape {tuple(tensor.shape)}; expected {expected} (chunk_size, action_dim)")
        if not torch.isfinite(tensor).all():
            raise InputError("noise contains NaN or inf")
        return tensor

    def buffers(self, batch: int) -> dict[str, torch.Tensor]:
        """The static buffers for batch size ``batch`` (allocated on first use, reused by every call)."""
        if batch not in self._buffers:
            shapes = self.model.get_buffer_shapes(self.num_views, self.chunk_size, batch)
            self._buffers[batch] = {
                name: torch.zeros(shape, dtype=self.model.buffer_dtype(name, self.dtype), device=self.device)
                for name, shape in shapes.items()
            }
        return self._buffers[batch]

    def staging(self, batch: int) -> dict[str, torch.Tensor]:
        """Host-side twins of the static buffers for batch size ``batch``: on a GPU, page-locked CPU tensors
        (the preprocessor writes the images straight into them, each call copies the inputs over
        asynchronously and the actions back), allocated on first use; on the CPU, the static buffers themselves."""
        buffers = self.buffers(batch)
        if self.device.type != "cuda":
            return buffers
        if batch not in self._staging:
            self._staging[batch] = {
                name: torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True) for name, tensor in buffers.items()
            }
        return self._staging[batch]

    def _images_out(self, batch: int, index: int) -> dict[str, np.ndarray]:
        """``images_out=`` for the built-in preprocessor: sample ``index``'s slot of the staged images, so that
        preparing the images allocates nothing (a replaced preprocessor is called without it)."""
        if not isinstance(self.preprocessor, ObservationPreprocessor):
            return {}
        images = self.staging(batch).get("images")
        if images is None or images.dtype != torch.float32:
            return {}
        return {"images_out": images[index].numpy()}

    def _run(self, samples: list[dict[str, torch.Tensor]], noise: torch.Tensor | None, start: float) -> np.ndarray:
        batch = len(samples)
        buffers = self.buffers(batch)
        staging = self.staging(batch)
        prepared = time.perf_counter()
        for name, tensor in buffers.items():
            if name not in samples[0]:
                continue
            host = staging[name]
            for index, sample in enumerate(samples):
                # the built-in preprocessor already wrote the images here; no CPU stack op (torch's CPU ops
                # can stall on a busy host, benchmarks/NOTES.md v9)
                if sample[name].data_ptr() != host[index].data_ptr():
                    host[index].copy_(sample[name])
            if host is not tensor:
                tensor.copy_(host, non_blocking=True)  # page-locked: asynchronous, ordered before the replay
        if noise is None:
            noise = torch.randn(buffers["noise"].shape, dtype=torch.float32)
        staging["noise"].copy_(noise)
        if staging is not buffers:
            buffers["noise"].copy_(staging["noise"], non_blocking=True)
        timer = StageTimer(self.device)
        with torch.inference_mode():
            if self.use_cuda_graphs:
                self._graph(batch).replay()
            else:
                self.model.forward(self.backend, self.weights, buffers, timer)
            if staging is not buffers:
                staging["actions"].copy_(buffers["actions"], non_blocking=True)
                torch.cuda.current_stream(self.device).synchronize()
            # A copy: the staged / static buffer is overwritten by the next call.
            actions = staging["actions"].numpy().copy()
        finished = time.perf_counter()
        result = self.postprocessor(actions)
        self.last_timings = {"preprocess": (prepared - start) * 1e3, **timer.times_ms}
        self.last_timings["total"] = (time.perf_counter() - start) * 1e3
        self.last_timings["model"] = (finished - prepared) * 1e3
        return result

    def _graph(self, batch: int) -> "torch.cuda.CUDAGraph":
        """Capture the whole forward for ``batch`` once (after two warm-up runs on a side stream)."""
        if batch not in self._graphs:
            buffers = self.buffers(batch)
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self.model.forward(self.backend, self.weights, buffers)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.model.forward(self.backend, self.weights, buffers)
            self._graphs[batch] = graph
        return self._graphs[batch]
