"""A served policy: one engine, one robot mapping, the prompt encoding and the noise policy.

:func:`build_policy` makes the engine from a checkpoint (or the built-in tiny random model for
``checkpoint="demo"``) and wraps it in a :class:`ServedPolicy`, whose ``prepare`` (validate and map an
observation; cheap, runs on the server's event loop) and ``infer`` (run the engine; runs on the server's
single engine thread) are what :class:`~cortexflow.serving.server.PolicyServer` calls. The other families
supply their own served policy on the same :class:`MappedPolicy` base: token decoding (OpenVLA, RT-2)
:class:`~cortexflow.serving.decoding_policy.TokenServedPolicy`, RT-1
:class:`~cortexflow.serving.history_policy.RT1ServedPolicy`.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import numpy as np

from cortexflow.cli_options import FP8_CACHE_HELP, cli_option
from cortexflow.config import VLAModelType, dtype_name
from cortexflow.engine import VLAInferenceEngine
from cortexflow.errors import ConfigError, CortexFlowError, InputError
from cortexflow.families import FLOW_MATCHING, family_of
from cortexflow.models.rtc import JACOBIANS, RTCConfig
from cortexflow.serving.robots import EngineRequest, RobotMapping, make_mapping

DEMO_CHECKPOINT = "demo"
DEMO_WEIGHTS_SEED = 0
DEMO_ACTION_DIM = 32  # the real models' padded action width, so every robot mapping fits the demo model
ROBOT_VIEWS = 3  # Pi0 / Pi0.5 image slots: base, left wrist, right wrist


def byte_tokenizer(vocab_size: int):
    """A tokenizer for the demo model (which has none): ``[BOS=2] + UTF-8 bytes``, each id mod ``vocab_size``,
    the encoding ``cortexflow demo`` uses. Pi0 / Pi0.5 prompt formats are applied around it as usual."""
    from cortexflow.demo import DEMO_BOS_ID
    from cortexflow.processing import PromptTokenizer

    def encode(text: str) -> list[int]:
        return [b % vocab_size for b in text.encode("utf-8")]

    def decode(ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", "replace")

    return PromptTokenizer(encode, decode, DEMO_BOS_ID % vocab_size, vocab_size, "utf-8 bytes (demo model, no tokenizer)")


@dataclass
class PolicyOptions:
    """What to serve. ``checkpoint="demo"`` is the tiny random model. Every field is also a ``cortexflow serve``
    option (its flags and help in the field's metadata, see :func:`~cortexflow.cli_options.cli_option`);
    ``model_config`` is given there as JSON text or a JSON file."""

    checkpoint: str = field(metadata=cli_option(
        "--checkpoint", "-c", metavar="PATH|demo",
        help="Checkpoint folder or model.safetensors; 'demo': the tiny random model (no checkpoint, prompts as UTF-8 "
             "byte ids)."))
    model: str = field(default="auto", metadata=cli_option(
        "--model", "-m", metavar="NAME",
        help="auto (from the checkpoint: pi0, pi05, openvla from its tensors, rt1 for a TF2 checkpoint; pi0 for demo), "
             "or one of {all_models} ({token_models}: one image + prompt, no state; rt1: one frame + instruction "
             "embedding, an episode per connection)."))
    robot: str | None = field(default=None, metadata=cli_option(
        "--robot", "-r", metavar="NAME",
        help="Observation/action mapping: droid (8-D), libero (7-D), aloha (14-D) or raw (the engine's own arguments) "
             "[default: the --config's robot, else droid]."))
    config: str | None = field(default=None, metadata=cli_option(
        "--config", metavar="NAME",
        help="openpi policy config (cortexflow configs lists them): robot, transforms, norm-stats asset, horizon, "
             "default prompt."))
    backend: str = field(default="pytorch", metadata=cli_option(
        "--backend", "-b", metavar="NAME", help="Compute backend: {backends}."))
    device: str = field(default="auto", metadata=cli_option(
        "--device", metavar="DEVICE",
        help="auto (GPU if there is one), cpu, cuda or cuda:N; a list (cuda:0,cuda:1) runs one engine per GPU on one "
             "queue."))
    dtype: str = field(default="auto", metadata=cli_option(
        "--dtype", metavar="DTYPE", help="auto (bfloat16 on GPU, float32 on CPU), bfloat16, float16 or float32."))
    tokenizer: str | None = field(default=None, metadata=cli_option(
        "--tokenizer", metavar="PATH",
        help="PaliGemma tokenizer.model, tokenizer.json or a folder holding one (needed for text prompts except with "
             "demo)."))
    norm_stats: str | None = field(default=None, metadata=cli_option(
        "--norm-stats", metavar="PATH",
        help="openpi norm_stats.json, LeRobot stats, or a folder with assets/*/norm_stats.json."))
    chunk: int | None = field(default=None, metadata=cli_option(
        "--chunk", metavar="N", help="Action chunk length [default: the checkpoint's]."))
    steps: int | None = field(default=None, metadata=cli_option(
        "--steps", metavar="N", help="Denoising steps [default: the checkpoint's]."))
    views: int | None = field(default=None, metadata=cli_option(
        "--views", metavar="N", help="Camera views for --robot raw [default: 3]."))
    seed: int | None = field(default=None, metadata=cli_option(
        "--seed", metavar="N",
        help="Use the same seeded noise for every request (actions depend only on the observation)."))
    default_prompt: str | None = field(default=None, metadata=cli_option(
        "--default-prompt", metavar="TEXT", help="Prompt for requests that carry none."))
    cuda_graphs: bool = field(default=True, metadata=cli_option(
        "--cuda-graphs/--no-cuda-graphs", help="Capture the whole predict in a CUDA graph (GPU only)."))
    adapt_to_pi: bool = field(default=True, metadata=cli_option(
        "--adapt-to-pi/--no-adapt-to-pi",
        help="ALOHA only: convert joints/grippers between ALOHA and Pi0 conventions (openpi's default)."))
    model_config: Mapping[str, Any] | None = field(default=None, metadata=cli_option(
        "--model-config", metavar="JSON|FILE",
        help="Model config overrides as a JSON object or file (rt2: '{\"action_dim\": 7, \"chunk_size\": 4}')."))
    rtc_jacobian: str | None = field(default=None, metadata=cli_option(
        "--rtc-jacobian", metavar="vjp|identity",
        help="Real-time chunking guidance for clients that send the rtc/ keys: vjp (the paper's, through the "
             "expert's backward pass; pytorch backend) or identity (LeRobot's, no backward pass; pytorch and triton) "
             "[default: vjp on the pytorch backend, identity on the others]."))
    precision: str = field(default="default", metadata=cli_option(
        "--precision", metavar="NAME",
        help="default (weights in --dtype) or fp8: with --backend triton on a GPU of compute capability 8.9+ (L4, RTX "
             "4090, H100), the language model (openvla/rt2) or the action expert (pi0/pi05) hold FP8 "
             "weights (quantised at load; check the accuracy first with cortexflow verify --precision fp8)."))
    fp8_cache: str | None = field(default=None, metadata=cli_option(
        "--fp8-cache", metavar="DIR|default", help=FP8_CACHE_HELP))
    unnorm_key: str | None = field(default=None, metadata=cli_option(
        "--unnorm-key", metavar="DATASET",
        help="OpenVLA only: the dataset whose action statistics un-normalise the actions (needed when the checkpoint "
             "has several)."))


def check_precision_option(options: PolicyOptions, dtype: str) -> None:
    """Refuse ``--precision fp8`` where it cannot run (CPU, interpreter, GPU before 8.9, not bfloat16, not
    triton) in the CLI's words, before any checkpoint loads."""
    from cortexflow.config import parse_dtype
    from cortexflow.engine import resolve_device
    from cortexflow.quantization.precision import backend_for_precision

    for device in str(options.device).split(","):
        backend_for_precision(options.backend, options.precision, resolve_device(device.strip()), parse_dtype(dtype),
                              "--precision")


def checkpoint_name(path: str) -> str:
    """What clients are told about a checkpoint: its folder's name (with the file's, for a file), never the
    server's absolute path."""
    location = Path(str(path))
    return f"{location.parent.name}/{location.name}" if location.suffix and location.parent.name else location.name


def common_metadata(engine: Any, mapping: RobotMapping, checkpoint: str, prompt: dict[str, Any]) -> dict[str, Any]:
    """The metadata fields every served engine shares (server, model, checkpoint, device, robot, prompt)."""
    from cortexflow import __version__

    return {
        "server": "cortexflow",
        "version": __version__,
        "model": engine.config.model_type.value,
        "checkpoint": checkpoint,
        "backend": getattr(engine.backend, "name", type(engine.backend).__name__),
        "device": str(engine.device),
        "dtype": dtype_name(engine.dtype),
        "precision": getattr(engine, "precision", "default"),
        "robot": mapping.name,
        "robot_config": mapping.describe(),
        "prompt": prompt,
    }


def engine_timings(engine: Any, start: float) -> dict[str, float]:
    """The engine's stage timings of its last call (ms) plus ``infer_ms`` since ``start``."""
    timings = {k: float(v) for k, v in engine.last_timings.items()}
    timings["infer_ms"] = (time.perf_counter() - start) * 1e3
    return timings


class MappedPolicy:
    """What every served policy shares: ``prepare`` through ``self.mapping``, ``predict``, ``warmup``.
    Subclasses define ``metadata`` and ``infer(request) -> (actions, timings)``, and declare what else the server
    may ask of them:

    - ``batches``: ``infer_batch(requests, prev_actions, inference_delays)`` and ``warmup_batches(sizes)``
      (cross-request batching);
    - ``guides_chunks``: ``infer_chunk(request, prev_actions, inference_delay) -> (actions, timings, chunk)``
      (real-time chunking; the server keeps each connection's last chunk);
    - ``keeps_episodes``: ``new_episode()`` and ``infer_episode(request, episode)`` (a history per connection)."""

    batches: ClassVar[bool] = False
    guides_chunks: ClassVar[bool] = False
    keeps_episodes: ClassVar[bool] = False

    mapping: RobotMapping
    default_prompt: str | None
    prompt_encoding: str | None

    def prepare(self, observation: Any) -> EngineRequest:
        """Validate and map one observation (raises :class:`~cortexflow.errors.InputError`)."""
        return self.mapping.to_engine(observation, self.default_prompt)

    def example_observation(self, seed: int = 0, height: int = 224, width: int = 224) -> dict[str, Any]:
        """A synthetic observation in this robot's format (warm-up, load tests, examples)."""
        return self.mapping.example_observation(seed, height, width, text_prompt=self.prompt_encoding is not None)

    def predict(self, observation: Any) -> np.ndarray:
        """``prepare`` + ``infer`` in the caller's thread: the actions the server would send for ``observation``."""
        return self.infer(self.prepare(observation))[0]

    def warmup(self) -> None:
        """One call on a synthetic observation (captures the CUDA graph before the first client)."""
        try:
            self.predict(self.example_observation())
        except CortexFlowError as err:
            raise ConfigError(f"the warm-up request on a synthetic {self.mapping.name} observation failed: {err}") from err


@dataclass
class ServedPolicy(MappedPolicy):
    """An engine behind a robot mapping. ``infer`` must only ever be called from one thread at a time."""

    batches: ClassVar[bool] = True
    guides_chunks: ClassVar[bool] = True

    engine: VLAInferenceEngine
    mapping: RobotMapping
    checkpoint: str = "?"
    seed: int | None = None
    default_prompt: str | None = None
    prompt_encoding: str | None = None
    #: The guidance of real-time-chunking requests (default: the paper's where the backend can differentiate the
    #: denoising loop, else the identity Jacobian).
    rtc: RTCConfig | None = None
    _noise: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        config = self.engine.config
        if self.mapping.action_dim is not None and self.mapping.action_dim > config.action_dim:
            raise ConfigError(
                f"robot {self.mapping.name!r} needs {self.mapping.action_dim}-D actions but the model has "
                f"action_dim {config.action_dim}"
            )
        if self.mapping.state_dim is not None and self.mapping.state_dim > config.action_dim:
            raise ConfigError(
                f"robot {self.mapping.name!r} sends a {self.mapping.state_dim}-D state but the model takes at most "
                f"{config.action_dim} values"
            )
        if self.seed is not None:
            rng = np.random.default_rng(self.seed)
            self._noise = rng.standard_normal((self.engine.chunk_size, config.action_dim)).astype(np.float32)
        if self.rtc is None:
            vjp = getattr(self.engine.backend, "supports_guided_decoding", False)
            self.rtc = RTCConfig(jacobian="vjp" if vjp else "identity")

    def warmup(self) -> None:
        """The synthetic robot observation end to end, then (with CUDA graphs) one call per prompt bucket, so
        that no client's first prompt of a new length waits seconds for a graph capture."""
        super().warmup()
        if self.engine.use_cuda_graphs:
            self.engine.warmup()

    # ---- what the server calls -----------------------------------------------------------------
    @property
    def metadata(self) -> dict[str, Any]:
        """Sent to every client on connect (openpi: ``WebsocketClientPolicy.get_server_metadata()``)."""
        engine, config, mapping = self.engine, self.engine.config, self.mapping
        stats = engine.preprocessor.state_stats
        prompt = {
            "text": self.prompt_encoding is not None,
            "encoding": self.prompt_encoding,
            "max_tokens": config.max_token_len,
            "default": self.default_prompt,
        }
        return {
            **common_metadata(engine, mapping, self.checkpoint, prompt),
            "action_dim": mapping.action_dim if mapping.action_dim is not None else config.action_dim,
            "model_action_dim": config.action_dim,
            "chunk_size": engine.chunk_size,
            "action_horizon": engine.chunk_size,
            "num_steps": config.num_diffusion_steps,
            "num_views": engine.num_views,
            "state_dim": mapping.state_dim if mapping.state_dim is not None else (stats.dim if stats else None),
            "actions_unnormalized": engine.postprocessor.action_stats is not None,
            "noise_seed": self.seed,
            "policy_config": getattr(getattr(engine, "policy", None), "name", None),
        }

    def infer(self, request: EngineRequest) -> tuple[np.ndarray, dict[str, float]]:
        """Run the engine: robot actions ``(chunk, robot action_dim)`` fp32 and the engine's stage timings (ms)."""
        return self.infer_chunk(request)[:2]

    def infer_batch(self, requests: list[EngineRequest], prev_actions: list[np.ndarray] | None = None,
                    inference_delays: list[int] | None = None) -> list[tuple[np.ndarray, dict[str, float], np.ndarray]]:
        """Several requests as one ``engine.predict_batch`` (each with its own images, prompt, state, masks and
        noise; guided all or none): ``[(robot actions, timings, engine chunk)]`` in request order."""
        start = time.perf_counter()
        shape = (self.engine.chunk_size, self.engine.config.action_dim)
        rng = np.random.default_rng()
        noises = []
        for request in requests:
            noise = request.noise if request.noise is not None else self._noise
            noise = rng.standard_normal(shape) if noise is None else np.asarray(noise, dtype=np.float32)
            if noise.shape != shape:
                raise InputError(f"noise has shape {noise.shape}; expected {shape} (chunk_size, action_dim)")
            noises.append(noise)
        guidance = {} if prev_actions is None else {"batch_prev_actions": prev_actions,
                                                    "batch_inference_delays": inference_delays, "rtc": self.rtc}
        actions = self.engine.predict_batch(
            [r.images for r in requests], [r.prompt for r in requests], [r.state for r in requests],
            noise=np.stack(noises).astype(np.float32),
            batch_prompt_tokens=[r.prompt_tokens for r in requests],
            batch_image_masks=[r.image_masks for r in requests],
            **guidance,
        )
        timings = {**engine_timings(self.engine, start), "batch_size": float(len(requests))}
        return [(np.ascontiguousarray(self.mapping.to_robot(a), dtype=np.float32), timings, a) for a in actions]

    def warmup_batches(self, batch_sizes) -> None:
        """Capture the CUDA graphs of ``batch_sizes`` (every prompt bucket) now, not at a client's first batch."""
        if self.engine.use_cuda_graphs:
            self.engine.warmup(batch_sizes=tuple(batch_sizes))

    def infer_chunk(self, request: EngineRequest, prev_actions: np.ndarray | None = None,
                    inference_delay: int = 0) -> tuple[np.ndarray, dict[str, float], np.ndarray]:
        """:meth:`infer`, guided towards ``prev_actions`` (the remaining actions of this connection's last chunk,
        as the engine returned them; real-time chunking) when given; also returns the engine's chunk."""
        start = time.perf_counter()
        noise = request.noise if request.noise is not None else self._noise
        guidance = {} if prev_actions is None else {"prev_actions": prev_actions, "inference_delay": inference_delay,
                                                    "rtc": self.rtc}
        actions = self.engine.predict(
            request.images,
            request.prompt,
            request.state,
            noise=noise,
            prompt_tokens=request.prompt_tokens,
            image_masks=request.image_masks,
            **guidance,
        )
        robot_actions = np.ascontiguousarray(self.mapping.to_robot(actions), dtype=np.float32)
        return robot_actions, engine_timings(self.engine, start), actions


def _model_type(options: PolicyOptions, demo: bool) -> VLAModelType | None:
    name = (options.model or "auto").strip().lower()
    if name == "auto":
        return VLAModelType.PI0 if demo else None
    return VLAModelType.parse(name)


def _policy_config(options: PolicyOptions, demo: bool):
    """The openpi config ``--config`` names (None without it), checked against the other options."""
    if options.config is None:
        return None
    from cortexflow.policies import get_policy_config

    config = get_policy_config(options.config)
    if demo:
        raise ConfigError("--config needs a checkpoint folder holding the config's norm stats (assets/); "
                          "--checkpoint demo has none")
    model = (options.model or "auto").strip().lower()
    if model != "auto" and VLAModelType.parse(model) != config.model_type:
        raise ConfigError(f"--model {options.model} contradicts --config {config.name} (a {config.model_type.value} policy)")
    robot = (options.robot or config.robot).strip().lower()
    if robot not in (config.robot, "raw"):
        raise ConfigError(f"--robot {options.robot} contradicts --config {config.name}, which serves {config.robot} "
                          f"observations; leave --robot out (or use raw: images in slot order)")
    if not options.adapt_to_pi:
        raise ConfigError(f"--no-adapt-to-pi is for hand-made --robot aloha serving; --config {config.name} "
                          "applies openpi's ALOHA conversion as trained")
    return config


def _default_robot(checkpoint: str, policy_config) -> str:
    """The config's robot; ``raw`` (images in camera order) for a LeRobot folder with processor files; else droid."""
    from cortexflow.policies import has_lerobot_processors

    if policy_config is not None:
        return policy_config.robot
    return "raw" if has_lerobot_processors(checkpoint) else "droid"


def _resolve_dtype(dtype: str, device: str) -> str:
    from cortexflow.config import resolve_dtype
    from cortexflow.engine import resolve_device

    return dtype_name(resolve_dtype(dtype, resolve_device(device)))


def build_policy(options: PolicyOptions, log: Callable[[str], None] | None = None) -> MappedPolicy:
    """Load the engine ``options`` describe and wrap it: the model type (from ``--model``, ``--config`` or the
    checkpoint) picks the family (:mod:`cortexflow.families`), whose ``serve`` part builds the policy
    (flow matching: :func:`build_flow_policy`)."""
    from cortexflow.checkpoints.openvla_layout import inspect_any_checkpoint

    log = log or (lambda message: None)
    demo = str(options.checkpoint).strip().lower() == DEMO_CHECKPOINT
    policy_config = _policy_config(options, demo)
    model_type = policy_config.model_type if policy_config is not None else _model_type(options, demo)
    if model_type is None and not demo:
        # RT-1 (TF2, RT-1-X Flax, or converted) by its files, OpenVLA folders by their tensors; an RT-2 policy
        # reads a Pi0-family checkpoint, so it is never auto-detected (--model rt2).
        from cortexflow.checkpoints.rt1_layout import is_converted_rt1, is_rt1_checkpoint

        if is_rt1_checkpoint(options.checkpoint) or is_converted_rt1(options.checkpoint):
            model_type = VLAModelType.RT1
        else:
            model_type = inspect_any_checkpoint(options.checkpoint, dict(options.model_config or {}) or None).model_type
    family = family_of(model_type)
    if family is not FLOW_MATCHING:
        return family.part("serve")(options, model_type, log)
    return build_flow_policy(options, model_type, log, policy_config)


def build_flow_policy(options: PolicyOptions, model_type: VLAModelType, log: Callable[[str], None],
                      policy_config: Any = None) -> ServedPolicy:
    """A flow-matching policy (Pi0, Pi0.5; ``checkpoint="demo"`` the tiny random one) behind its robot mapping;
    ``policy_config``: the openpi config ``options.config`` names, already checked."""
    from cortexflow.factory import create_inference
    from cortexflow.random_checkpoint import tiny_model_config, write_checkpoint

    demo = str(options.checkpoint).strip().lower() == DEMO_CHECKPOINT
    if options.unnorm_key is not None:
        raise ConfigError("--unnorm-key picks an OpenVLA dataset's action statistics; pi0/pi05 use --norm-stats")
    if options.fp8_cache is not None:
        raise ConfigError("--fp8-cache keeps the FP8 language-model layers of openvla/rt2; pi0/pi05 quantise only "
                          "their action expert at load: drop --fp8-cache")
    robot = str(options.robot or _default_robot(options.checkpoint, policy_config)).strip().lower()
    mapping_probe = make_mapping(robot)  # validates the robot name before any loading
    if robot != "raw" and options.views not in (None, ROBOT_VIEWS):
        raise ConfigError(f"--views is for --robot raw; {robot} uses the model's {ROBOT_VIEWS} image slots")
    num_views = ROBOT_VIEWS if robot != "raw" else (options.views or ROBOT_VIEWS)
    if not demo and options.tokenizer is None and robot != "raw":
        raise ConfigError(
            f"--robot {robot} clients send the task as text: pass --tokenizer PATH (the PaliGemma tokenizer.model, "
            "a tokenizer.json, or a folder holding one); only --checkpoint demo runs without one"
        )
    dtype = _resolve_dtype(options.dtype, options.device)
    check_precision_option(options, dtype)
    overrides = dict(options.model_config or {})
    common = dict(
        precision=options.precision,
        num_views=num_views,
        chunk_size=options.chunk,
        backend=options.backend,
        device=options.device,
        dtype=dtype,
        tokenizer_path=options.tokenizer,
        norm_stats_path=options.norm_stats,
        use_cuda_graphs=options.cuda_graphs,
        num_steps=options.steps,
        progress=False,
        config=options.config,
        check_finite_actions=True,
    )
    if demo:
        config = tiny_model_config(model_type, **{"action_dim": DEMO_ACTION_DIM, **overrides})
        with tempfile.TemporaryDirectory(prefix=f"cortexflow-serve-{config.model_type.value}-") as directory:
            write_checkpoint(directory, config, seed=DEMO_WEIGHTS_SEED)
            # the weights are in memory once the engine is built, so the folder may go
            engine = create_inference(config.model_type, directory, model_config=config, **common)
        label = f"demo (tiny random {config.model_type.value}, weights seed {DEMO_WEIGHTS_SEED})"
    else:
        log(f"loading {model_type.value} checkpoint {options.checkpoint} ({options.device}, {dtype}) ...")
        engine = create_inference(model_type, options.checkpoint, model_config=overrides or None, **common)
        label = checkpoint_name(options.checkpoint)
        held = engine.weight_bytes()
        log(f"weights: {held['device'] / 2**30:.2f} GiB on {engine.device}"
            + (f", the text embedding {held['host'] / 2**30:.2f} GiB in host memory" if held["host"] else ""))
    if options.tokenizer is not None:
        encoding = f"tokenizer {options.tokenizer}"
    elif demo:
        engine.preprocessor.tokenizer = byte_tokenizer(engine.config.vocab_size)
        encoding = "utf-8 bytes: [BOS=2] + bytes mod vocab_size (demo model, no tokenizer)"
    else:
        encoding = None
    stats = engine.preprocessor.state_stats
    state_dim = getattr(engine.preprocessor, "state_dim", None) or (stats.dim if stats else None)
    mapping = make_mapping(robot, adapt_to_pi=options.adapt_to_pi, num_views=engine.num_views, state_dim=state_dim)
    del mapping_probe
    if policy_config is not None:
        mapping = mapping.keys_only()  # the engine runs the config's steps
    return ServedPolicy(
        engine=engine,
        mapping=mapping,
        checkpoint=label,
        seed=options.seed,
        default_prompt=options.default_prompt or (policy_config.default_prompt if policy_config else None),
        prompt_encoding=encoding,
        rtc=_rtc_config(options, engine),
    )


def _rtc_config(options: PolicyOptions, engine) -> RTCConfig | None:
    """``--rtc-jacobian`` checked against the engine's backend (None: the policy's default for the backend)."""
    if options.rtc_jacobian is None:
        return None
    jacobian = str(options.rtc_jacobian).strip().lower()
    if jacobian not in JACOBIANS:
        raise ConfigError(f"--rtc-jacobian must be one of {', '.join(JACOBIANS)}, got {options.rtc_jacobian!r}")
    if jacobian == "vjp" and not getattr(engine.backend, "supports_guided_decoding", False):
        raise ConfigError(f"--rtc-jacobian vjp differentiates the denoising loop op by op: use --backend pytorch, or "
                          f"--rtc-jacobian identity with --backend {engine.backend.name}")
    return RTCConfig(jacobian=jacobian)
