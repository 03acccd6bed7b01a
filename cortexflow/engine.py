"""The engine front: :class:`PolicyEngine`, what every family's engine shares (device, backend, the static
buffers' forward run eagerly or as a CUDA graph per buffer set, timings), and :class:`VLAInferenceEngine`, the
flow-matching family's engine: validate inputs, pre-process, run the model's stages on a backend, post-process.
The token-decoding and RT-1 engines are :mod:`cortexflow.decoding_engine` and :mod:`cortexflow.history_engine`.

The flow-matching engine owns the static per-call buffers (one set per batch size) and, on a GPU, one CUDA graph
per batch size and prompt bucket that captures the whole forward (vision, prefix, every denoising step).
A prompt is padded (and masked) to the smallest of the engine's ``prompt_buckets`` that holds it, so a
20-token prompt does not pay for the 48 or 200 positions openpi pads to; the graphs share one memory pool.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from cortexflow.backends import create_backend
from cortexflow.quantization.precision import backend_for_precision, parse_precision
from cortexflow.checkpoints.files import CheckpointFiles
from cortexflow.checkpoints.loader import load_pi0_checkpoint
from cortexflow.config import (
    InferenceConfig,
    ModelConfig,
    VLAModelType,
    prompt_bucket_lengths,
)
from cortexflow.cuda_graphs import capture_cuda_graph
from cortexflow.errors import (
    BackendUnavailableError,
    CheckpointError,
    ConfigError,
    InputError,
    NonFiniteActionsError,
)
from cortexflow.models.base import HostEmbedding, VLAModel
from cortexflow.models.pi0 import Pi0Model
from cortexflow.models.rtc import ChunkGuidance, RTCConfig, prefix_weights
from cortexflow.preprocessor import (
    ActionPostprocessor,
    ObservationPreprocessor,
    split_norm_stats,
)
from cortexflow.processing import PromptTokenizer, load_norm_stats

#: The static buffers ``(B, L)`` whose last dimension is the padded prompt length.
TOKEN_BUFFERS = ("token_ids", "token_mask")


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


def _robot_states(samples: Sequence[Mapping[str, torch.Tensor]]) -> np.ndarray | None:
    """The samples' ``robot_state`` stacked ``(B, D)`` (what the output steps add back), or None when a sample
    has none or their lengths differ."""
    states = [sample.get("robot_state") for sample in samples]
    if any(state is None for state in states) or len({tuple(state.shape) for state in states}) != 1:
        return None
    return np.stack([state.numpy() for state in states])


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


class PolicyEngine:
    """What every policy engine shares, whatever its family: the device, dtype and backend, the checkpoint
    report, the stage timings of the last call, and the static-buffer forward that runs eagerly or replays
    a CUDA graph captured once per buffer set.

    A family's engine (flow matching: :class:`VLAInferenceEngine`; token decoding:
    :class:`~cortexflow.decoding_engine.TokenVLAEngine`; RT-1's history:
    :class:`~cortexflow.history_engine.RT1Engine`) sets ``model``, ``config`` and ``weights``, allocates its
    buffers, prepares its inputs into them, calls :meth:`run_forward` and turns the output buffers into its
    result."""

    #: Whether every CUDA graph of the engine allocates from one memory pool (safe when the graphs only ever
    #: replay one at a time on one stream and none reads another's intermediates).
    shares_graph_pool = False

    def __init__(self, backend: Any, device: "str | torch.device", dtype: torch.dtype, use_cuda_graphs: bool,
                 report: Any = None, precision: str = "default"):
        self.device = resolve_device(device)
        self.dtype = dtype
        #: "default" or "fp8" (:mod:`cortexflow.quantization.precision`), checked before any weight is loaded.
        self.precision = parse_precision(precision)
        self.backend = create_backend(backend_for_precision(backend, precision, self.device, dtype), self.device, dtype)
        self.checkpoint_report = report
        self.use_cuda_graphs = bool(use_cuda_graphs and self.device.type == "cuda" and self.backend.supports_cuda_graphs)
        self._graphs: dict[Any, torch.cuda.CUDAGraph] = {}
        self._graph_pool = None
        self.last_timings: dict[str, float] = {}

    @property
    def model_type(self) -> VLAModelType:
        return self.config.model_type

    def zeros(self, name: str, shape: Sequence[int]) -> torch.Tensor:
        """A zero static buffer ``name`` of ``shape`` on the engine's device, in the dtype the model keeps it in."""
        return torch.zeros(shape, dtype=self.model.buffer_dtype(name, self.dtype), device=self.device)

    def record_timings(self, start: float, prepared: float, finished: float) -> None:
        """``last_timings`` of a call that started at ``start`` (``time.perf_counter()``), had its inputs in the
        buffers at ``prepared`` and its outputs back at ``finished``: preprocess, model and total ms."""
        self.last_timings = {
            "preprocess": (prepared - start) * 1e3,
            "model": (finished - prepared) * 1e3,
            "total": (time.perf_counter() - start) * 1e3,
        }

    def run_forward(self, key: Any, buffers: dict[str, torch.Tensor], **forward_options: Any) -> None:
        """The model's whole forward on the static ``buffers`` (``key`` names the buffer set): the CUDA graph of
        ``key`` replayed (captured on first use) when the engine uses graphs, else ``model.forward`` eagerly."""
        if self.use_cuda_graphs:
            self._graph(key, buffers, forward_options).replay()
        else:
            self.model.forward(self.backend, self.weights, buffers, **forward_options)

    def _graph(self, key: Any, buffers: dict[str, torch.Tensor], forward_options: dict) -> "torch.cuda.CUDAGraph":
        """Capture the forward on ``buffers`` once per ``key`` (after two warm-up runs on a side stream)."""
        if key not in self._graphs:
            graph = self._capture(buffers, lambda: self.model.forward(self.backend, self.weights, buffers,
                                                                       **forward_options))
            if self.shares_graph_pool and self._graph_pool is None:
                self._graph_pool = graph.pool()
            self._graphs[key] = graph
        return self._graphs[key]

    def _capture(self, buffers: dict[str, torch.Tensor], run) -> "torch.cuda.CUDAGraph":
        """One CUDA graph of ``run``; an engine whose buffers carry state between calls restores it here."""
        return capture_cuda_graph(run, self.device, pool=self._graph_pool)


class VLAInferenceEngine(PolicyEngine):
    """Runs one flow-matching policy (Pi0, Pi0.5, or a custom :class:`VLAModel`) on one backend and device.

    ``checkpoint`` is a checkpoint path (openpi PyTorch / LeRobot safetensors, openpi JAX Orbax, a LoRA
    adapter folder) or, with ``model=`` (a custom :class:`VLAModel`), a path or an in-memory state dict
    that ``model.preprocess_checkpoint`` understands. ``model_config`` is a full :class:`ModelConfig` or a dict of fields to override.
    """

    #: One graph per batch size and prompt bucket, all from one memory pool, so the pool holds the largest
    #: graph's intermediates, not the sum.
    shares_graph_pool = True

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
        super().__init__(ic.backend, ic.device, ic.dtype, ic.use_cuda_graphs, precision=ic.precision)
        if model is None:
            expected = VLAModelType.parse(model_type) if model_type is not None else None
            host = self._host_embedding(Pi0Model)  # the loader's models, Pi0 and Pi0.5, share Pi0's
            loaded = load_pi0_checkpoint(
                checkpoint, expected, self.device, self.dtype, self._merged_config(model_config), progress,
                ic.base_checkpoint_path, host_weights=() if host is None else (host.table,),
            )
            self.model, weights, self.checkpoint_report = loaded.model, loaded.weights, loaded.report
        else:
            host = self._host_embedding(model)
            self.model, weights = model, self._load_custom(model, checkpoint, host)
        self.config: ModelConfig = self.model.config
        #: The model's ``host_embedding`` when its table is kept in host memory (``token_embedding``), else None.
        self.host_embedding: HostEmbedding | None = host
        #: That table, made once by ``model.host_table`` (CPU); each call gathers the prompt's rows from it.
        self.host_table = None if host is None else self.model.host_table(weights.pop(host.table), self.dtype)
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
        variable = self.model.variable_prompt_length and self.backend.variable_prompt_length
        self.prompt_buckets = prompt_bucket_lengths(ic.prompt_buckets if variable else "off", self.config.max_token_len)
        self._buffers: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self._staging: dict[tuple[int, int], dict[str, torch.Tensor]] = {}

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

    def weight_bytes(self) -> dict[str, int]:
        """Bytes of weights the engine holds: ``"device"`` on its device (each storage once: fused weights' parts
        are views into them) and ``"host"`` in host memory (the :attr:`host_table`, else 0)."""
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in self.weights.values()
                    if isinstance(t, torch.Tensor)}
        host = 0 if self.host_table is None else self.host_table.numel() * self.host_table.element_size()
        return {"device": sum(storages.values()), "host": host}

    def _host_embedding(self, model: "VLAModel | type[VLAModel]") -> HostEmbedding | None:
        """``model.host_embedding`` when ``InferenceConfig.token_embedding`` puts its table in host memory:
        "host", or "auto" on a GPU where the model has one and the backend takes the rows as an input."""
        choice, spec = self.inference_config.token_embedding, model.host_embedding
        usable = spec is not None and self.backend.supports_host_embedding
        if choice == "device" or (choice == "auto" and (self.device.type != "cuda" or not usable)):
            return None
        if spec is None:
            raise ConfigError(f"token_embedding='host': {model.__name__ if isinstance(model, type) else type(model).__name__} "
                              "has no lookup table to keep in host memory (host_embedding is None); use 'auto' or 'device'")
        if not usable:
            raise ConfigError(f"token_embedding='host' needs a backend that runs the model's own stages; the "
                              f"{self.backend.name} backend looks the token ids up itself; use 'auto' or 'device'")
        return spec

    def _load_custom(self, model: VLAModel, checkpoint, host: HostEmbedding | None) -> dict[str, torch.Tensor]:
        """Weights for a user-supplied model: raw tensors -> ``preprocess_checkpoint`` -> shape check -> device
        (the table of ``host`` to host memory; the model's ``unread_weights`` left out)."""
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
        unread = set(model.unread_weights())
        return {n: t.to(device="cpu" if host is not None and n == host.table else self.device,
                        dtype=model.weight_dtype(n, self.dtype)) for n, t in weights.items() if n not in unread}

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
        prev_actions: Any = None,
        inference_delay: int = 0,
        execution_horizon: int | None = None,
        rtc: RTCConfig | None = None,
    ) -> np.ndarray:
        """One observation -> action chunk ``(chunk_size, action_dim)`` fp32 numpy (un-normalised if stats given).

        ``observation_images``: ``num_views`` HWC images (uint8, or float in [-1, 1]) as an array
        ``(V, H, W, 3)`` or a list; ``image_masks``: which views are present; ``noise``: ``(chunk, action_dim)``
        to make the call reproducible; ``prompt_tokens``: token ids instead of ``task_prompt``.

        Real-time chunking (:mod:`cortexflow.models.rtc`): ``prev_actions`` ``(R, D)`` are the actions of the
        previous chunk (as ``predict`` returned them, ``D <= action_dim`` leading dims) that the robot had not
        executed yet when this observation was taken; ``inference_delay`` of them will be executed while this
        call runs. The new chunk is guided so that its first actions continue them. ``execution_horizon``
        (the paper's ``s``) ends the guided overlap at ``chunk_size - s`` instead of ``R``; ``rtc`` sets the
        guidance clip and schedule. Without ``prev_actions`` the call is exactly the unguided one. A guided
        call runs eagerly (no CUDA graph); the paper's guidance (``jacobian="vjp"``) needs a backend with
        ``supports_guided_decoding`` (PyTorch), LeRobot's (``"identity"``) any backend that runs the model's loop
        (PyTorch, Triton)."""
        start = time.perf_counter()
        sample = self.preprocessor(observation_images, task_prompt, state, prompt_tokens, image_masks,
                                   **self._images_out(1, 0))
        guidance = None
        if prev_actions is not None:
            guidance = self._chunk_guidance([prev_actions], [inference_delay], execution_horizon, rtc, [sample])
        noise_batch = None if noise is None else self._check_noise(noise, batch=None)[None]
        return self._run([sample], noise_batch, start, guidance)[0]

    def predict_batch(
        self,
        batch_images: Sequence[Any],
        batch_prompts: Sequence[str | None] | None = None,
        batch_states: Sequence[Any] | None = None,
        *,
        noise: Any = None,
        batch_prompt_tokens: Sequence[Any] | None = None,
        batch_image_masks: Sequence[Any] | None = None,
        batch_prev_actions: Sequence[Any] | None = None,
        batch_inference_delays: Sequence[int] | None = None,
        execution_horizon: int | None = None,
        rtc: RTCConfig | None = None,
    ) -> np.ndarray:
        """B observations in one batched forward -> ``(B, chunk_size, action_dim)``.

        Every ``batch_*`` argument is a sequence of length B (or None); ``noise`` is ``(B, chunk, action_dim)``.
        ``batch_prev_actions`` / ``batch_inference_delays`` guide every sample as :meth:`predict`'s
        ``prev_actions`` / ``inference_delay`` do (all samples or none)."""
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
            ("batch_prev_actions", batch_prev_actions),
            ("batch_inference_delays", batch_inference_delays),
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
        guidance = None
        if batch_prev_actions is not None:
            delays = [0 if d is None else d for d in columns["batch_inference_delays"]]
            guidance = self._chunk_guidance(batch_prev_actions, delays, execution_horizon, rtc, samples)
        noise_batch = None if noise is None else self._check_noise(noise, batch=batch)
        return self._run(samples, noise_batch, start, guidance)

    # ---- internals ----------------------------------------------------------------------------
    def _chunk_guidance(self, prev_actions: Sequence[Any], delays: Sequence[Any], execution_horizon: Any,
                        rtc: Any, samples: Sequence[Mapping[str, torch.Tensor]]) -> ChunkGuidance:
        """Check the real-time-chunking arguments and build the guidance of a call (target and mask ``(B, H, A)``);
        the previous actions are mapped back through the output steps with each sample's robot state."""
        rtc = RTCConfig() if rtc is None else rtc
        if not isinstance(rtc, RTCConfig):
            raise InputError(f"rtc must be a cortexflow.RTCConfig or None, got {type(rtc).__name__}")
        runs_loop = getattr(self.backend, "runs_denoising_loop", False)
        if rtc.jacobian == "identity" and not runs_loop:
            raise ConfigError(
                f"real-time chunking (prev_actions=) needs a backend that runs the model's denoising loop, such as "
                f"backend='pytorch' or 'triton'; this engine runs the {self.backend.name!r} backend"
            )
        if rtc.jacobian == "vjp" and not getattr(self.backend, "supports_guided_decoding", False):
            hint = (" or rtc=RTCConfig(jacobian='identity') (LeRobot's guidance, no backward pass), which this backend "
                    "runs") if runs_loop else ""
            raise ConfigError(
                f"real-time chunking with the paper's guidance (RTCConfig(jacobian='vjp'), the default) differentiates "
                f"the denoising loop op by op: use backend='pytorch'{hint}; this engine runs the "
                f"{self.backend.name!r} backend"
            )
        to_model_space = getattr(self.postprocessor, "to_model_space", None)
        if to_model_space is None:
            raise ConfigError(
                "real-time chunking needs engine.postprocessor.to_model_space(actions, states) to map prev_actions back "
                "into the model's (normalised) action space; the replaced postprocessor has none"
            )
        chunk, dim = self.chunk_size, self.config.action_dim
        if execution_horizon is not None and (isinstance(execution_horizon, bool) or not isinstance(execution_horizon, int)
                                              or not 0 <= execution_horizon < chunk):
            raise InputError(f"execution_horizon must be an integer in [0, {chunk}) (chunk_size {chunk}) or None, "
                             f"got {execution_horizon!r}")
        targets = torch.zeros(len(prev_actions), chunk, dim)
        masks = torch.zeros(len(prev_actions), chunk, dim)
        for index, (prev, delay) in enumerate(zip(prev_actions, delays)):
            where = "prev_actions" if len(prev_actions) == 1 else f"batch_prev_actions[{index}]"
            try:
                prev = np.asarray(prev, dtype=np.float32)
            except (TypeError, ValueError) as exc:
                raise InputError(f"{where} must be a numeric array (R, D); could not convert it: {exc}") from None
            if prev.ndim != 2 or not 1 <= prev.shape[0] <= chunk or not 1 <= prev.shape[1] <= dim:
                raise InputError(f"{where} has shape {prev.shape}; expected (R, D) with 1 <= R <= {chunk} (chunk_size) "
                                 f"and 1 <= D <= {dim} (action_dim)")
            if not np.isfinite(prev).all():
                raise InputError(f"{where} contains NaN or inf")
            state = samples[index].get("robot_state")
            prev = to_model_space(prev, None if state is None else state.numpy())
            remaining, given = prev.shape
            if given > dim:
                raise InputError(f"{where} maps to {given} model action dims; the model has {dim}")
            end = remaining if execution_horizon is None else min(remaining, chunk - execution_horizon)
            if isinstance(delay, bool) or not isinstance(delay, (int, np.integer)) or not 0 <= delay <= end:
                name = "inference_delay" if len(prev_actions) == 1 else f"batch_inference_delays[{index}]"
                raise InputError(f"{name} must be an integer in [0, {end}] (the guided overlap of {where}), got {delay!r}")
            targets[index, :remaining, :given] = torch.from_numpy(prev)
            weights = prefix_weights(chunk, int(delay), end, rtc.schedule)
            masks[index, :, :given] = weights[:, None]
        return ChunkGuidance(targets.to(self.device), masks.to(self.device), float(rtc.max_guidance_weight), rtc.jacobian)

    def _check_noise(self, noise: Any, batch: int | None) -> torch.Tensor:
        expected = (self.chunk_size, self.config.action_dim) if batch is None else (batch, self.chunk_size, self.config.action_dim)
        try:
            array = np.asarray(noise.detach().cpu() if isinstance(noise, torch.Tensor) else noise, dtype=np.float32)
        except (TypeError, ValueError) as err:
            raise InputError(f"noise must be an array of numbers {expected} (chunk_size, action_dim), got "
                             f"{type(noise).__name__}: {str(err)[:120]}") from None
        tensor = torch.from_numpy(array)
        if tuple(tensor.shape) != expected:
            raise InputError(f"noise has shape {tuple(tensor.shape)}; expected {expected} (chunk_size, action_dim)")
        if not torch.isfinite(tensor).all():
            raise InputError("noise contains NaN or inf")
        return tensor

    def buffers(self, batch: int, prompt_len: int | None = None) -> dict[str, torch.Tensor]:
        """The static buffers for batch size ``batch`` and prompts padded to ``prompt_len`` tokens (default
        ``max_token_len``), allocated on first use and reused by every call. Only the token buffers differ
        between prompt lengths; the images, state, noise and actions buffers of a batch size are shared.
        With a host-side embedding (:attr:`host_embedding`) the token ids buffer is replaced by the looked-up
        rows ``(B, L, D)``."""
        return self._buffer_set(self._buffers, batch, prompt_len, self.device, pinned=False)

    def staging(self, batch: int, prompt_len: int | None = None) -> dict[str, torch.Tensor]:
        """Host-side twins of :meth:`buffers`: on a GPU, page-locked CPU tensors (the preprocessor writes the
        images straight into them, each call copies the inputs over asynchronously and the actions back),
        allocated on first use; on the CPU, the static buffers themselves."""
        if self.device.type != "cuda":
            return self.buffers(batch, prompt_len)
        return self._buffer_set(self._staging, batch, prompt_len, torch.device("cpu"), pinned=True)

    def _buffer_set(self, sets: dict, batch: int, prompt_len: int | None, device: torch.device, pinned: bool):
        full = self.config.max_token_len
        length = full if prompt_len is None else prompt_len
        if length not in self.prompt_buckets:
            raise ValueError(f"prompt length {length} is not one of this engine's buckets {self.prompt_buckets}")

        def zeros(name, shape):
            dtype = self.model.buffer_dtype(name, self.dtype)
            return torch.zeros(shape, dtype=dtype, pin_memory=True) if pinned else torch.zeros(shape, dtype=dtype, device=device)

        if (batch, full) not in sets:
            shapes = self.model.get_buffer_shapes(self.num_views, self.chunk_size, batch)
            if self.host_embedding is not None:
                ids, rows = self.host_embedding.ids, self.host_embedding.embeddings
                shapes[rows] = (*shapes.pop(ids), self.host_table.shape[1])
            sets[(batch, full)] = {name: zeros(name, shape) for name, shape in shapes.items()}
        if (batch, length) not in sets:
            prompt = TOKEN_BUFFERS if self.host_embedding is None else (*TOKEN_BUFFERS, self.host_embedding.embeddings)
            sets[(batch, length)] = {  # the prompt buffers' dimension 1 is the prompt length
                name: zeros(name, (tensor.shape[0], length, *tensor.shape[2:])) if name in prompt else tensor
                for name, tensor in sets[(batch, full)].items()
            }
        return sets[(batch, length)]

    def _look_up_prompts(self, samples: Sequence[Mapping[str, torch.Tensor]], length: int,
                         buffers: dict[str, torch.Tensor], staging: dict[str, torch.Tensor]) -> None:
        """Gather each sample's first ``length`` token ids' rows of :attr:`host_table` into the staged embeddings
        buffer (no allocation) and copy it to the device's."""
        spec = self.host_embedding
        host, tensor = staging[spec.embeddings], buffers[spec.embeddings]
        for index, sample in enumerate(samples):
            ids = torch.as_tensor(sample[spec.ids]).reshape(-1)[:length]
            torch.index_select(self.host_table, 0, ids, out=host[index])
        if host is not tensor:
            tensor.copy_(host, non_blocking=True)

    def prompt_bucket(self, samples: Sequence[Mapping[str, torch.Tensor]]) -> int:
        """The padded prompt length for a call: the smallest bucket that holds every sample's last valid token."""
        if len(self.prompt_buckets) == 1 or "token_mask" not in samples[0]:
            return self.config.max_token_len
        needed = 0
        for sample in samples:
            valid = torch.nonzero(torch.as_tensor(sample["token_mask"]).reshape(-1))
            if len(valid):
                needed = max(needed, int(valid[-1]) + 1)
        return next(length for length in self.prompt_buckets if length >= needed)

    def warmup(self, batch_sizes: Sequence[int] = (1,), seed: int = 0) -> list[tuple[int, int]]:
        """One synthetic call (random images, a prompt of ids filling the bucket) per batch size and prompt
        bucket, so that every CUDA graph is captured now rather than at a robot's first call with a longer
        prompt (a capture takes seconds). Returns the ``(batch, prompt length)`` pairs run."""
        rng = np.random.default_rng(seed)
        size = self.config.image_size
        state_dim = self.config.action_dim
        if isinstance(self.preprocessor, ObservationPreprocessor):
            stats = self.preprocessor.state_stats
            state_dim = self.preprocessor.state_dim or (stats.dim if stats is not None else state_dim)
        done = []
        for batch in batch_sizes:
            for length in self.prompt_buckets:
                images = [rng.integers(0, 256, (self.num_views, size, size, 3), dtype=np.uint8) for _ in range(batch)]
                tokens = [rng.integers(1, self.config.vocab_size, length).tolist() for _ in range(batch)]
                states = [rng.standard_normal(state_dim).astype(np.float32) for _ in range(batch)]
                noise = rng.standard_normal((batch, self.chunk_size, self.config.action_dim)).astype(np.float32)
                self.predict_batch(images, batch_states=states, batch_prompt_tokens=tokens, noise=noise)
                done.append((batch, length))
        return done

    def _images_out(self, batch: int, index: int) -> dict[str, Any]:
        """``images_out=`` for the built-in preprocessor: sample ``index``'s slot of the static images buffer on
        a GPU (the views are prepared there, see ``InferenceConfig.image_preprocessing``), else of the staged
        images, so that preparing the images allocates nothing (a replaced preprocessor is called without it)."""
        if not isinstance(self.preprocessor, ObservationPreprocessor):
            return {}
        on_device = self.device.type == "cuda" and self.inference_config.image_preprocessing != "host"
        images = (self.buffers(batch) if on_device else self.staging(batch)).get("images")
        if images is None or images.dtype != torch.float32:
            return {}
        return {"images_out": images[index] if on_device else images[index].numpy()}

    def _run(self, samples: list[dict[str, torch.Tensor]], noise: torch.Tensor | None, start: float,
             guidance: ChunkGuidance | None = None) -> np.ndarray:
        batch = len(samples)
        length = self.prompt_bucket(samples)
        buffers = self.buffers(batch, length)
        staging = self.staging(batch, length)
        prepared = time.perf_counter()
        for name, tensor in buffers.items():
            if name not in samples[0]:
                continue
            host, staged = staging[name], False
            for index, sample in enumerate(samples):
                value = sample[name][..., :length] if name in TOKEN_BUFFERS else sample[name]
                if value.device == tensor.device and value.data_ptr() == tensor[index].data_ptr():
                    continue  # prepared in place on the device (the built-in preprocessor's images on a GPU)
                staged = True
                # the built-in preprocessor may have written the images here already; no CPU stack op (torch's
                # CPU ops can stall on a busy host, benchmarks/NOTES.md v9)
                if value.data_ptr() != host[index].data_ptr():
                    host[index].copy_(value)
            if staged and host is not tensor:
                tensor.copy_(host, non_blocking=True)  # page-locked: asynchronous, ordered before the replay
        if self.host_embedding is not None:
            self._look_up_prompts(samples, length, buffers, staging)
        if noise is None:
            noise = torch.randn(buffers["noise"].shape, dtype=torch.float32)
        staging["noise"].copy_(noise)
        if staging is not buffers:
            buffers["noise"].copy_(staging["noise"], non_blocking=True)
        timer = StageTimer(self.device)
        # A guided call differentiates the denoising loop: no inference mode (its tensors refuse autograd).
        with torch.no_grad() if guidance is not None else torch.inference_mode():
            if guidance is not None:
                self.model.forward(self.backend, self.weights, buffers, timer, guidance=guidance)
            elif self.use_cuda_graphs:
                self.run_forward((batch, length), buffers)
            else:
                self.model.forward(self.backend, self.weights, buffers, timer)
            if staging is not buffers:
                staging["actions"].copy_(buffers["actions"], non_blocking=True)
                torch.cuda.current_stream(self.device).synchronize()
            # A copy: the staged / static buffer is overwritten by the next call.
            actions = staging["actions"].numpy().copy()
        finished = time.perf_counter()
        if isinstance(self.postprocessor, ActionPostprocessor):
            result = self.postprocessor(actions, _robot_states(samples))
        else:
            result = self.postprocessor(actions)
        if self.inference_config.check_finite_actions and not np.isfinite(result).all():
            raise NonFiniteActionsError(
                f"the model produced {int((~np.isfinite(result)).sum())} NaN or inf action values out of {result.size} "
                "(huge noise or state values, or broken weights); nothing usable to return"
            )
        self.last_timings = {"preprocess": (prepared - start) * 1e3, **timer.times_ms}
        self.last_timings["total"] = (time.perf_counter() - start) * 1e3
        self.last_timings["model"] = (finished - prepared) * 1e3
        return result
