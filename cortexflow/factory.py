"""One-call constructors for the supported policies, one per model type: the flow-matching policies (Pi0,
Pi0.5) on :class:`~cortexflow.engine.VLAInferenceEngine`, the token-decoding ones (OpenVLA, RT-2 style) on
:class:`~cortexflow.decoding_engine.TokenVLAEngine`, RT-1 on :class:`~cortexflow.history_engine.RT1Engine`."""

from __future__ import annotations

import dataclasses
import difflib
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from cortexflow.config import (
    BackendType,
    InferenceConfig,
    ModelConfig,
    VLAModelType,
    parse_dtype,
)
from cortexflow.decoding_engine import DEFAULT_BUCKET, TokenVLAEngine
from cortexflow.engine import VLAInferenceEngine, resolve_device
from cortexflow.errors import ConfigError, CortexFlowWarning, NormStatsError
from cortexflow.history_engine import RT1Engine, TextEncoder, universal_sentence_encoder
from cortexflow.preprocessor import install_pipeline
from cortexflow.quantization.precision import backend_for_precision, parse_precision

__all__ = ["create_openvla_inference", "create_pi0_inference", "create_pi05_inference", "create_rt1_inference",
           "create_rt2_inference"]


def _create(
    model_type: VLAModelType,
    checkpoint_path: str | Path,
    num_views: int,
    chunk_size: int | None,
    backend: Any,
    device: str,
    dtype: "torch.dtype | str",
    tokenizer_path: str | None,
    norm_stats_path: str | None,
    use_cuda_graphs: bool,
    model_config: "ModelConfig | Mapping[str, Any] | None",
    **options: Any,
) -> VLAInferenceEngine:
    progress = options.pop("progress", None)
    pipeline = _policy_pipeline(model_type, checkpoint_path, options.pop("config", None), norm_stats_path,
                                options.pop("state_prompt_width", None))
    _check_option_names(model_type, options)
    if pipeline is not None:
        if options.get("normalize") is False:
            raise ConfigError(f"normalize=False contradicts {pipeline.source}, which normalises as its checkpoint "
                              "was trained; drop one of them")
        num_views, norm_stats_path = pipeline.num_views, None
        tokenizer_path = tokenizer_path if tokenizer_path is not None else pipeline.tokenizer_path
        model_config = _with_overrides(model_config, pipeline.model_overrides)
    config = InferenceConfig(
        num_views=num_views,
        chunk_size=chunk_size,
        backend=backend,
        device=device,
        dtype=dtype,
        use_cuda_graphs=use_cuda_graphs,
        tokenizer_path=None if tokenizer_path is None else str(tokenizer_path),
        norm_stats_path=None if norm_stats_path is None else str(norm_stats_path),
        **options,
    )
    engine = VLAInferenceEngine(checkpoint_path, model_config, config, model_type=model_type, progress=progress)
    if pipeline is not None:
        install_pipeline(pipeline, engine)
    return engine


def _policy_pipeline(model_type: VLAModelType, checkpoint_path: Any, config: Any, norm_stats_path: Any,
                     state_prompt_width: int | None):
    """The policy pipeline to install: openpi config ``config`` (a name or a PolicyConfig), else the LeRobot
    processor files of the checkpoint folder, else None (the engine's own normalisation)."""
    from cortexflow.policies import (
        PolicyConfig,
        has_lerobot_processors,
        lerobot_pipeline,
        openpi_pipeline,
    )
    from cortexflow.policies.pipeline import check_checkpoint_type

    if config is not None:
        if not isinstance(config, (str, PolicyConfig)):
            raise ConfigError(f"config must be a policy config name or a PolicyConfig, got {type(config).__name__}")
        folder = checkpoint_path if isinstance(checkpoint_path, (str, Path)) else None
        pipeline = openpi_pipeline(config, folder, norm_stats_path)
    elif isinstance(checkpoint_path, (str, Path)) and has_lerobot_processors(checkpoint_path):
        if norm_stats_path is not None:
            raise ConfigError(f"{checkpoint_path} has LeRobot processor files, which name their own stats; "
                              "leave norm_stats_path unset")
        pipeline = lerobot_pipeline(checkpoint_path, state_prompt_width)
    else:
        return None
    pipeline.check_model_type(model_type, f"create_{model_type.value}_inference")
    if isinstance(checkpoint_path, (str, Path)):
        check_checkpoint_type(pipeline, checkpoint_path)
    return pipeline


def _with_overrides(model_config: "ModelConfig | Mapping[str, Any] | None", overrides: dict):
    """The policy's ModelConfig fields under the user's: a dict's keys win; a full ModelConfig takes them."""
    if isinstance(model_config, ModelConfig):
        return model_config.replace(**overrides)
    return {**overrides, **dict(model_config or {})}


def _check_option_names(model_type: VLAModelType, options: Mapping[str, Any]) -> None:
    """Raise ``ConfigError`` naming each keyword argument that is neither a factory argument nor an
    :class:`InferenceConfig` field (a typo such as ``num_view=3``)."""
    fields = {f.name for f in dataclasses.fields(InferenceConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        factory = f"create_{model_type.value}_inference"
        accepted = sorted(fields | {"checkpoint_path", "model_config", "progress", "config", "state_prompt_width"})
        named = []
        for name in unknown:
            close = difflib.get_close_matches(name, accepted, n=1)
            named.append(f"{name} (did you mean {close[0]}?)" if close else name)
        raise ConfigError(f"{factory}() got unknown argument(s) {', '.join(named)}; accepted: {', '.join(accepted)}")


def create_pi0_inference(
    checkpoint_path: str | Path,
    num_views: int = 2,
    chunk_size: int | None = None,
    backend: Any = BackendType.PYTORCH,
    device: str = "cuda",
    dtype: "torch.dtype | str" = "bfloat16",
    tokenizer_path: str | None = None,
    norm_stats_path: str | None = None,
    use_cuda_graphs: bool = True,
    model_config: "ModelConfig | Mapping[str, Any] | None" = None,
    config: "str | None" = None,
    **options: Any,
) -> VLAInferenceEngine:
    """A Pi0 engine for the checkpoint at ``checkpoint_path``: openpi PyTorch or LeRobot safetensors, an
    openpi JAX checkpoint (Orbax ``params/``; needs ``pip install 'cortexflow[jax]'``), or a PEFT LoRA
    adapter folder (merged into its base at load).

    ``chunk_size=None`` takes the chunk from the checkpoint's config (50 by default). ``options`` are
    further :class:`InferenceConfig` fields (``normalize``, ``num_steps``, ``max_tokenize_len``,
    ``discrete_state_input``, ``base_checkpoint_path``, ``precision``: "fp8" holds the Gemma prefix's and the
    action expert's projections in FP8 on the triton backend, GPUs of compute capability 8.9+) and ``progress``
    (show the loading bar).

    ``config="pi0_libero"`` (an openpi config name, ``cortexflow configs`` lists them) applies that config's
    transforms: its horizon and prompt length, the norm stats of its asset id under the checkpoint's ``assets/``
    (or ``norm_stats_path``), its default prompt, its robot inputs and outputs (ALOHA conversion, absolute actions,
    the robot's action width); ``num_views`` becomes 3 (openpi's slots). ``predict`` then takes the robot's raw
    state and returns the robot's actions. A LeRobot folder with ``policy_preprocessor.json`` applies its processor
    steps the same way (``state_prompt_width=32`` for Pi0.5 fine-tunes trained with LeRobot 0.4.x)."""
    return _create(
        VLAModelType.PI0, checkpoint_path, num_views, chunk_size, backend, device, dtype,
        tokenizer_path, norm_stats_path, use_cuda_graphs, model_config, config=config, **options,
    )


def create_pi05_inference(
    checkpoint_path: str | Path,
    num_views: int = 2,
    chunk_size: int | None = None,
    backend: Any = BackendType.PYTORCH,
    device: str = "cuda",
    dtype: "torch.dtype | str" = "bfloat16",
    tokenizer_path: str | None = None,
    norm_stats_path: str | None = None,
    use_cuda_graphs: bool = True,
    model_config: "ModelConfig | Mapping[str, Any] | None" = None,
    config: "str | None" = None,
    **options: Any,
) -> VLAInferenceEngine:
    """A Pi0.5 engine; same arguments as :func:`create_pi0_inference`. The state goes into the prompt
    as 256-bin tokens (``discrete_state_input``), so a string prompt needs a tokenizer."""
    return _create(
        VLAModelType.PI05, checkpoint_path, num_views, chunk_size, backend, device, dtype,
        tokenizer_path, norm_stats_path, use_cuda_graphs, model_config, config=config, **options,
    )


def load_device(precision: str, device: torch.device) -> torch.device:
    """Where a token VLA's checkpoint is read to: the host for ``precision="fp8"`` (the triton backend then moves the
    weights to ``device`` one language-model layer at a time, quantising each before the next, so the GPU never
    holds the bfloat16 model), else ``device``."""
    return torch.device("cpu") if parse_precision(precision) == "fp8" else device


def _check_fp8_cache(fp8_cache: Any, precision: Any) -> None:
    """Refuse an ``fp8_cache`` that is not True, False or a folder, or one given without ``precision="fp8"``."""
    if fp8_cache is False or fp8_cache is None:
        return
    if not isinstance(fp8_cache, (bool, str, Path)) or (isinstance(fp8_cache, str) and not fp8_cache.strip()):
        raise ConfigError(f"fp8_cache must be True (the default folder), False or a folder; got {fp8_cache!r}")
    if parse_precision(precision) != "fp8":
        raise ConfigError(f"fp8_cache needs precision='fp8' (it holds the FP8 layers); got precision={precision!r}")


def _fp8_layer_cache(fp8_cache: Any, backend: Any, checkpoint_path: Path, dtype: torch.dtype,
                     header_model: Callable[[], Any]):
    """The FP8 cache entry of a token VLA engine (``header_model()``: its model, from the checkpoint's headers) on
    ``backend`` (what :func:`backend_for_precision` gave for ``precision="fp8"``), or None without ``fp8_cache``."""
    if fp8_cache is False or fp8_cache is None:
        return None
    from cortexflow.backends.triton_backend import TritonBackend
    from cortexflow.quantization.fp8_cache import fp8_layer_cache

    options = backend.options if isinstance(backend, TritonBackend) else backend.default_options()
    return fp8_layer_cache(fp8_cache, checkpoint_path, header_model(), options, dtype)


def _write_fp8_cache(cache, engine: TokenVLAEngine, checkpoint_path: Path) -> None:
    """Write ``engine``'s prepared FP8 layers into ``cache`` (after a miss); a folder that cannot be written is a
    warning, the engine runs without the entry."""
    try:
        cache.save(engine.weights, str(checkpoint_path))
    except OSError as err:
        warnings.warn(f"could not write the FP8 cache entry {cache.folder}: {err}; the engine runs without it",
                      CortexFlowWarning, stacklevel=3)


def create_openvla_inference(
    checkpoint_path: str | Path,
    backend: Any = BackendType.PYTORCH,
    unnorm_key: str | None = None,
    device: str = "cuda",
    dtype: "torch.dtype | str" = "bfloat16",
    tokenizer_path: str | Path | None = None,
    use_cuda_graphs: bool = True,
    model_config: "Mapping[str, Any] | Any" = None,
    constrained_decoding: bool = False,
    bucket: int = DEFAULT_BUCKET,
    precision: str = "default",
    fp8_cache: "bool | str | Path" = False,
) -> TokenVLAEngine:
    """Load OpenVLA from a local Hugging Face folder; ``engine.predict(image, task)`` -> 7-D action.

    The folder holds ``model.safetensors.index.json`` + shards (or ``model.safetensors``), ``config.json``
    (``norm_stats``, ``text_config``), optionally ``dataset_statistics.json``, and ``tokenizer.model``
    (or pass ``tokenizer_path``). ``unnorm_key`` picks the dataset whose q01/q99 un-normalise the
    actions; it is required when the checkpoint has statistics for several datasets. Without any
    statistics the actions stay normalised in [-1, 1]. ``constrained_decoding`` restricts the argmax to
    the 256 action ids (the reference does not). ``precision="fp8"``: the language model's projections in FP8
    on the triton backend (GPUs of compute capability 8.9+; :mod:`cortexflow.quantization.precision`).
    ``fp8_cache`` (with ``precision="fp8"``): True or a folder keeps the quantised language-model layers on disk
    (:mod:`cortexflow.quantization.fp8_cache`; True: ``$CORTEXFLOW_CACHE/fp8`` or ``~/.cache/cortexflow/fp8``), so
    that the next start reads them instead of their bfloat16 projections."""
    from cortexflow.checkpoints.openvla_layout import inspect_openvla_checkpoint, load_openvla_checkpoint
    from cortexflow.models.openvla import OpenVLAModel
    from cortexflow.processing.action_tokens import (
        read_dataset_statistics,
        select_action_stats,
    )
    from cortexflow.processing.vla_inputs import SPACE_PIECE, SentencePieceTokenizer

    _check_fp8_cache(fp8_cache, precision)
    device_ = resolve_device(device)
    dtype_ = parse_dtype(dtype)
    backend = backend_for_precision(backend, precision, device_, dtype_)  # refused before the weights load
    path = Path(checkpoint_path).expanduser()
    cache = _fp8_layer_cache(fp8_cache, backend, path, dtype_,
                             lambda: OpenVLAModel(inspect_openvla_checkpoint(path, model_config).config))
    cached = cache.load() if cache is not None else None
    model, weights, report, files = load_openvla_checkpoint(path, load_device(precision, device_), dtype_, model_config,
                                                            skip=cache.checkpoint_names if cached is not None else ())
    weights.update(cached or {})
    key, stats = select_action_stats(read_dataset_statistics(files.root, files.config), unnorm_key)
    if stats is not None and stats.dim != model.config.action_dim:
        model.config.action_dim = stats.dim
    tokenizer = None
    tokenizer_file = Path(tokenizer_path) if tokenizer_path is not None else files.root / "tokenizer.model"
    if tokenizer_path is not None or tokenizer_file.is_file():
        tokenizer = SentencePieceTokenizer(tokenizer_file)
        space = tokenizer.piece_id(SPACE_PIECE)
        overridden = isinstance(model_config, Mapping) and "space_token_id" in model_config
        if space is not None and not overridden:
            model.config.space_token_id = space
    for name in ("bos_id", "space_token_id"):
        if not 0 <= getattr(model.config, name) < model.config.vocab_size:
            raise ConfigError(f"{name} {getattr(model.config, name)} is outside the vocabulary "
                              f"[0, {model.config.vocab_size}); give the checkpoint's tokenizer.model or set it in model_config")
    engine = TokenVLAEngine(
        model, weights, backend=backend, device=device_, dtype=dtype_, tokenizer=tokenizer,
        unnormalize=None if stats is None else stats.unnormalize, unnorm_key=key,
        use_cuda_graphs=use_cuda_graphs, constrained=constrained_decoding, bucket=bucket, report=report,
        precision=precision,
    )
    if cache is not None and cached is None:
        _write_fp8_cache(cache, engine, path)
    return engine


def create_rt2_inference(
    checkpoint_path: str | Path,
    backend: Any = BackendType.PYTORCH,
    device: str = "cuda",
    dtype: "torch.dtype | str" = "bfloat16",
    tokenizer_path: str | Path | None = None,
    norm_stats_path: str | Path | None = None,
    use_cuda_graphs: bool = True,
    model_config: "Mapping[str, Any] | Any" = None,
    constrained_decoding: bool = True,
    bucket: int = DEFAULT_BUCKET,
    precision: str = "default",
    fp8_cache: "bool | str | Path" = False,
) -> TokenVLAEngine:
    """An RT-2-style policy over the PaliGemma weights of an openpi PyTorch / LeRobot checkpoint.

    ``engine.predict(image, task)`` -> ``(chunk_size, action_dim)`` actions decoded from
    ``chunk_size * action_dim`` greedy tokens (256 bins at the tail of the vocabulary, see
    ``processing/action_tokens.py``). ``tokenizer_path``: the PaliGemma ``tokenizer.model``;
    ``norm_stats_path``: openpi / LeRobot statistics whose action q01/q99 un-normalise (quantile) the
    output; without them actions stay in [-1, 1]. ``model_config`` sets ``action_dim``, ``chunk_size``,
    ``max_text_tokens``, ``prompt_template`` or backbone fields. ``precision="fp8"``: the language model's
    projections in FP8 on the triton backend (GPUs of compute capability 8.9+); ``fp8_cache`` as for
    :func:`create_openvla_inference`."""
    from cortexflow.checkpoints.rt2_layout import load_rt2_checkpoint, open_rt2_checkpoint
    from cortexflow.processing import load_norm_stats, unnormalize
    from cortexflow.processing.vla_inputs import SentencePieceTokenizer

    _check_fp8_cache(fp8_cache, precision)
    device_ = resolve_device(device)
    dtype_ = parse_dtype(dtype)
    backend = backend_for_precision(backend, precision, device_, dtype_)  # refused before the weights load
    path = Path(checkpoint_path).expanduser()
    cache = _fp8_layer_cache(fp8_cache, backend, path, dtype_, lambda: open_rt2_checkpoint(path, model_config)[0])
    cached = cache.load() if cache is not None else None
    model, weights, match = load_rt2_checkpoint(path, load_device(precision, device_), dtype_, model_config,
                                                skip=cache.checkpoint_names if cached is not None else ())
    weights.update(cached or {})
    tokenizer = SentencePieceTokenizer(tokenizer_path) if tokenizer_path is not None else None
    unnorm = None
    if norm_stats_path is not None:
        stats = load_norm_stats(norm_stats_path)["actions"]
        if stats.q01 is None or stats.q99 is None:
            raise NormStatsError(f"{norm_stats_path}: the action statistics lack q01/q99 (needed to un-normalise "
                                 "binned actions)")
        if stats.dim > model.config.action_dim:
            raise NormStatsError(f"{norm_stats_path}: {stats.dim}-D action statistics but the policy decodes "
                                 f"{model.config.action_dim}-D actions")
        unnorm = lambda actions: unnormalize(actions, stats, "quantile")  # noqa: E731
    engine = TokenVLAEngine(
        model, weights, backend=backend, device=device_, dtype=dtype_, tokenizer=tokenizer, unnormalize=unnorm,
        use_cuda_graphs=use_cuda_graphs, constrained=constrained_decoding, bucket=bucket, report=match,
        precision=precision,
    )
    if cache is not None and cached is None:
        _write_fp8_cache(cache, engine, path)
    return engine


def create_rt1_inference(
    checkpoint_path: str | Path,
    backend: Any = BackendType.PYTORCH,
    device: str = "cuda",
    dtype: "torch.dtype | str" = "float32",
    use_cuda_graphs: bool = True,
    model_config: Any = None,
    use_model_path: str | Path | None = None,
    text_encoder: TextEncoder | None = None,
) -> RT1Engine:
    """An RT-1 engine for a TF2 checkpoint (``ckpt-N`` prefix, its ``.index`` or its folder) or a
    safetensors file written by ``cortexflow convert``; ``engine.predict(frame, instruction_embedding)``
    -> action dict. ``model_config``: an ``RT1Config`` or field overrides (``input_size``, ...);
    ``use_model_path``: a local Universal Sentence Encoder SavedModel, so that ``task_prompt`` strings
    work (needs TensorFlow); ``text_encoder``: any other ``str -> (512,)`` function."""
    from cortexflow.checkpoints.rt1_layout import load_rt1_checkpoint

    model, weights, report = load_rt1_checkpoint(checkpoint_path, model_config)
    if text_encoder is None and use_model_path is not None:
        text_encoder = universal_sentence_encoder(use_model_path)
    return RT1Engine(model, weights, backend=backend, device=device, dtype=parse_dtype(dtype),
                     use_cuda_graphs=use_cuda_graphs, text_encoder=text_encoder, report=report)


#: Each model type's constructor; :func:`create_inference` picks from it.
CREATORS = {
    VLAModelType.PI0: create_pi0_inference,
    VLAModelType.PI05: create_pi05_inference,
    VLAModelType.OPENVLA: create_openvla_inference,
    VLAModelType.RT2: create_rt2_inference,
    VLAModelType.RT1: create_rt1_inference,
}


def create_inference(model: "VLAModelType | str", checkpoint_path: Any, **options: Any) -> Any:
    """The engine for ``checkpoint_path`` built by ``model``'s constructor (``create_pi0_inference`` for pi0,
    ..., ``create_rt1_inference`` for rt1) with ``options``, the keyword arguments that constructor takes."""
    return CREATORS[VLAModelType.parse(model)](checkpoint_path, **options)
