"""``cortexflow bench``: latency and memory of whole ``predict`` calls over a grid of workloads.

The grid is models x backends x views x prompt lengths x chunk sizes x denoising steps x CUDA graphs
(on/off). Each model's family supplies its workload (:mod:`cortexflow.families`): the flow-matching one here
(:class:`FlowWorkload`); the token-decoding OpenVLA and RT-2 contribute one row per backend x prompt length x
CUDA graphs and RT-1 one per backend x CUDA graphs (views, chunk and steps do not apply; see
:mod:`cortexflow.tools.bench_workloads`). Each model's random non-zero weights (:func:`~cortexflow.random_checkpoint.random_weights`,
drawn on the device, same seed for every case) are drawn again for each case and handed to its engine,
which then holds the only reference, as it does after loading a checkpoint file: a backend that
re-lays weights out at load (the Triton backend's fused projections) frees the originals, as it would for a
user. A case is timed as whole ``predict`` calls (input copies, forward, copy back) after warm-up: CUDA
events on a GPU, the host clock on the CPU; median, p90 and min, the peak GPU memory of the calls (weights,
buffers, CUDA graph pool and activations, counted after the engine is built, so the load's transient
working memory is not in it), and the per-stage split of the last call when no CUDA graph hides it. A backend that cannot run here (``triton`` on a CPU, a name this version lacks, a stage
it does not implement, too little GPU memory) is reported as skipped with the reason; a case that
raises anything else is reported as failed with the error, and the grid goes on.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from cortexflow.backends import available_backends, create_backend
from cortexflow.checkpoints.pi0_layout import to_checkpoint_keys
from cortexflow.config import (
    BackendType,
    InferenceConfig,
    ModelConfig,
    VLAModelType,
    dtype_name,
    parse_prompt_buckets,
)
from cortexflow.engine import VLAInferenceEngine
from cortexflow.errors import BackendUnavailableError, ConfigError
from cortexflow.families import family_of
from cortexflow.models.pi0 import model_class
from cortexflow.random_checkpoint import random_weights
from cortexflow.tools import (
    backend_options,
    backend_specs,
    environment_info,
    model_config,
    resolve_device_dtype,
    resolve_size,
    triton_options_dict,
)

#: Failures that make a case "skipped" (cannot run here); any other exception makes it "failed".
SKIP_ERRORS = (BackendUnavailableError, NotImplementedError, torch.cuda.OutOfMemoryError)


@dataclass(frozen=True)
class Case:
    """One point of the grid (``steps`` is None for the token-decoding policies, which have no denoising)."""

    model: str
    backend: str
    views: int
    prompt_len: int
    chunk: int
    steps: int | None
    cuda_graphs: bool


@dataclass
class Observation:
    """One synthetic call: HWC uint8 images, prompt token ids (BOS first), state and noise."""

    images: np.ndarray
    tokens: list[int]
    state: np.ndarray
    noise: np.ndarray


def random_observation(config: ModelConfig, views: int, prompt_len: int, rng: np.random.Generator) -> Observation:
    """Random non-zero inputs for one call of a model with ``config`` (224x224 images, so no resize)."""
    tokens = rng.integers(3, config.vocab_size, size=prompt_len).tolist()
    tokens[0] = 2
    return Observation(
        images=rng.integers(0, 256, size=(views, config.image_size, config.image_size, 3), dtype=np.uint8),
        tokens=tokens,
        state=rng.standard_normal(config.action_dim).astype(np.float32),
        noise=rng.standard_normal((config.chunk_size, config.action_dim)).astype(np.float32),
    )


def make_engine(state_dict, config: ModelConfig, views: int, graphs: bool, dtype: torch.dtype,
                device: torch.device, backend: str = "pytorch", prompt_buckets="auto",
                image_preprocessing: str = "auto", token_embedding: str = "auto") -> VLAInferenceEngine:
    """An engine over an in-memory openpi-layout state dict (its tensors are reused, not copied)."""
    model = model_class(config.model_type)(config)
    inference = InferenceConfig(num_views=views, device=str(device), dtype=dtype, use_cuda_graphs=graphs, backend=backend,
                                prompt_buckets=prompt_buckets, image_preprocessing=image_preprocessing,
                                token_embedding=token_embedding)
    return VLAInferenceEngine(state_dict, inference_config=inference, model=model)


def predict_call(engine: VLAInferenceEngine, observation: Observation) -> Callable[[], np.ndarray]:
    """The timed call: ``predict`` with token ids and fixed noise (state only where the model has a state token)."""
    state = observation.state if "state" in engine.buffers(1) else None
    return lambda: engine.predict(observation.images, state=state, prompt_tokens=observation.tokens,
                                  noise=observation.noise)


def time_calls(call: Callable[[], object], device: torch.device, iters: int, warmup: int,
               preprocess_ms: Callable[[], float] | None = None) -> dict:
    """Median / p90 / min ms of ``iters`` calls after ``warmup``: CUDA events on a GPU, else the host clock.
    ``preprocess_ms``: read after each call (the engine's host preprocessing), reported as median / max."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        call()
    event_ms, host_ms, pre_ms = [], [], []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
        t0 = time.perf_counter()
        call()
        host_ms.append((time.perf_counter() - t0) * 1e3)
        if preprocess_ms is not None:
            pre_ms.append(preprocess_ms())
        if cuda:
            end.record()
            end.synchronize()
            event_ms.append(start.elapsed_time(end))
    times = sorted(event_ms or host_ms)
    return {
        "median_ms": statistics.median(times),
        "p90_ms": times[math.ceil(0.9 * len(times)) - 1],  # nearest rank
        "min_ms": times[0],
        "mean_ms": statistics.fmean(times),
        "host_median_ms": statistics.median(host_ms),
        **({"preprocess_median_ms": statistics.median(pre_ms), "preprocess_max_ms": max(pre_ms)} if pre_ms else {}),
        "iters": iters,
        "warmup": warmup,
        "timing": "cuda_events" if cuda else "host_clock",
    }


class GpuMemory:
    """Peak / current allocated GPU bytes (zeros on CPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.reset()

    def reset(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.cuda else 0

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else 0

    def peak_gib(self) -> float | None:
        """Peak allocated GPU memory in GiB since the last reset; None on CPU (nothing measured)."""
        return self.peak() / 2**30 if self.cuda else None


def check_backend_names(backends: Sequence[str]) -> list[str]:
    """Lower-cased names; a name that is neither registered nor a known backend type is an error."""
    known = set(available_backends()) | {b.value for b in BackendType}
    names = [b.strip().lower() for b in backends]
    unknown = [b for b in names if b not in known]
    if unknown:
        raise ConfigError(f"unknown backend(s) {unknown}; available: {', '.join(available_backends())}")
    return names


def run_bench(
    models: Sequence[str] = ("pi0", "pi05"),
    backends: Sequence[str] = ("pytorch",),
    views: Sequence[int] = (1, 2, 3),
    prompt_lens: Sequence[int] = (20,),
    chunks: Sequence[int] = (50,),
    steps: Sequence[int] = (10,),
    graphs: Sequence[bool] = (True, False),
    iters: int = 100,
    warmup: int = 10,
    size: str = "auto",
    device: str = "auto",
    dtype: "str | torch.dtype" = "auto",
    seed: int = 0,
    iters_without_graphs: int | None = None,
    log: Callable[[str], None] | None = None,
    prompt_buckets="auto",
    image_preprocessing: str = "auto",
    token_embedding: str = "auto",
    triton_options=None,
    options_source: str = "triton_options",
) -> dict:
    """Time every case of the grid; returns ``{"environment", "workload", "runs", "skipped", "failed"}``.

    On a CPU CUDA graphs do not exist, so only the ``graphs=off`` cases run. ``iters_without_graphs``
    (default ``iters``) sets the call count of the slower un-graphed cases. ``prompt_buckets``: the Pi0
    family engines' :class:`~cortexflow.config.InferenceConfig` ``prompt_buckets`` (``"off"``: openpi's padding
    to ``max_token_len``); ``image_preprocessing``: theirs too (``"host"``: the images prepared on the CPU);
    ``token_embedding``: theirs too (``"device"``: the text embedding table on the GPU).
    The inputs are 224x224 uint8 views (no resize). ``triton_options``: the ``triton`` backend's
    :class:`~cortexflow.backends.triton_options.TritonOptions` (or their ``"name=value,..."`` text; default:
    its defaults; ``options_source`` names it in errors); every row records its backend's options."""
    prompt_buckets = parse_prompt_buckets(prompt_buckets)
    if image_preprocessing not in ("auto", "device", "host"):
        raise ConfigError(f"image_preprocessing must be 'auto', 'device' or 'host', got {image_preprocessing!r}")
    if token_embedding not in ("auto", "device", "host"):
        raise ConfigError(f"token_embedding must be 'auto', 'device' or 'host', got {token_embedding!r}")
    resolved_device, compute_dtype = resolve_device_dtype(device, dtype)
    size = resolve_size(size, resolved_device)
    backends = check_backend_names(backends)
    specs = backend_specs(backends, triton_options, options_source)
    model_types = [VLAModelType.parse(m).value for m in models]
    if iters < 1 or warmup < 0:
        raise ConfigError(f"iters must be >= 1 and warmup >= 0, got {iters} and {warmup}")
    for option, values in (("views", views), ("prompt length", prompt_lens), ("chunk", chunks), ("steps", steps)):
        if not values or any(int(v) < 1 for v in values):
            raise ConfigError(f"every {option} must be a positive integer, got {list(values)}")
    cuda = resolved_device.type == "cuda"
    graph_modes = list(dict.fromkeys(bool(g) for g in graphs)) if cuda else [False]
    log = log or (lambda _message: None)
    rng = np.random.default_rng(seed)
    results = {
        "tool": "cortexflow bench",
        "environment": environment_info(resolved_device),
        "workload": {"size": size, "dtype": dtype_name(compute_dtype), "iters": iters, "warmup": warmup,
                     "iters_without_graphs": iters_without_graphs or iters, "seed": seed,
                     "prompt_buckets": prompt_buckets if isinstance(prompt_buckets, str) else list(prompt_buckets),
                     "image_preprocessing": image_preprocessing, "token_embedding": token_embedding,
                     "triton_options": triton_options_dict(specs.get("triton")),
                     "weights": "random non-zero (cortexflow.random_checkpoint.random_weights)"},
        "runs": [],
        "skipped": [],
        "failed": [],
    }
    memory = GpuMemory(resolved_device)
    grid = BenchGrid(views, prompt_lens, chunks, steps, graph_modes, prompt_buckets, image_preprocessing,
                     token_embedding)
    for model_name in model_types:
        log(f"drawing {size} {model_name} weights on {resolved_device} ...")
        workload = family_of(model_name).part("bench")(model_name, size, seed, compute_dtype, resolved_device, grid)
        if workload.note() is not None:
            results.setdefault("notes", []).append(workload.note())
        weight_bytes = workload.weight_bytes(memory)
        for backend in backends:
            try:
                create_backend(specs[backend], resolved_device, compute_dtype)
            except Exception as err:  # noqa: BLE001 - one backend's failure must not stop the grid
                kind = "skipped" if isinstance(err, SKIP_ERRORS) else "failed"
                results[kind].append({"model": model_name, "backend": backend, "reason": f"{type(err).__name__}: {err}"})
                log(f"{model_name} {backend}: {kind} ({type(err).__name__}: {err})")
                continue
            for case in workload.cases(backend):
                n = iters if case.cuda_graphs or iters_without_graphs is None else iters_without_graphs
                entry = workload.run(case, memory, rng, n, warmup, specs[backend])
                if "reason" in entry:
                    kind = entry.pop("outcome")
                    results[kind].append(entry)
                    log(f"{_label(case)}: {kind} ({entry['reason']})")
                    continue
                entry["weights_gib"] = weight_bytes / 2**30
                results["runs"].append(entry)
                peak = f", peak {entry['peak_gpu_gib']:.2f} GiB" if resolved_device.type == "cuda" else ""
                log(f"{_label(case)}: median {entry['median_ms']:.2f} ms{peak}")
        workload = None
        memory.reset()
    return results


@dataclass(frozen=True)
class BenchGrid:
    """The grid axes and engine settings of a bench run that a family's workload turns into its cases."""

    views: Sequence[int]
    prompt_lens: Sequence[int]
    chunks: Sequence[int]
    steps: Sequence[int]
    graph_modes: Sequence[bool]
    prompt_buckets: object = "auto"
    image_preprocessing: str = "auto"
    token_embedding: str = "auto"


class FlowWorkload:
    """A flow-matching policy (Pi0, Pi0.5) in the bench grid: every views x prompt x chunk x steps x graphs
    case, each on freshly drawn random weights (see the module docstring). The other families' workloads
    (:mod:`cortexflow.tools.bench_workloads`) have the same methods."""

    def __init__(self, model: str, size: str, seed: int, dtype: torch.dtype, device: torch.device, grid: BenchGrid):
        self.name, self.seed, self.dtype, self.device, self.grid = model, seed, dtype, device, grid
        self.base = model_config(model, size)

    def draw_state_dict(self) -> dict:
        """The random weights in the openpi layout, drawn again for every case."""
        weights = random_weights(self.base, self.seed, self.dtype, self.device)
        return to_checkpoint_keys(weights, self.base, "openpi")

    def note(self) -> None:
        return None

    def weight_bytes(self, memory: GpuMemory) -> int:
        return sum(t.numel() * t.element_size() for t in self.draw_state_dict().values())

    def cases(self, backend: str):
        g = self.grid
        for v in g.views:
            for p in g.prompt_lens:
                for c in g.chunks:
                    for s in g.steps:
                        for graphs in g.graph_modes:
                            yield Case(self.name, backend, int(v), int(p), int(c), int(s), graphs)

    def run(self, case: Case, memory: GpuMemory, rng: np.random.Generator, iters: int, warmup: int,
            backend=None) -> dict:
        return _run_case(case, self.base, self.draw_state_dict, self.dtype, self.device, memory, rng, iters, warmup,
                         self.grid.prompt_buckets, self.grid.image_preprocessing, backend, self.grid.token_embedding)


def _label(case: Case) -> str:
    return (f"{case.model} {case.backend} views={case.views} prompt={case.prompt_len} chunk={case.chunk} "
            f"steps={'-' if case.steps is None else case.steps} graphs={'on' if case.cuda_graphs else 'off'}")


def timed_entry(case: Case, make_engine: Callable[[], object], call: Callable[[object], Callable[[], object]],
                memory: GpuMemory, device: torch.device, iters: int, warmup: int, dtype: torch.dtype,
                describe: Callable[[object], dict], preprocess_ms: bool = False,
                peak_of_calls_only: bool = False) -> dict:
    """The bench row of ``case``: the engine ``make_engine()`` builds, ``call(engine)`` timed (``preprocess_ms``:
    with the engine's host preprocessing time per call), the fields every family records (graphs, dtype, stage
    split, peak GPU memory: from the engine's build on, or with ``peak_of_calls_only`` from its first call; the
    load's and the calls' peaks also apart, ``load_peak_gpu_gib`` / ``calls_peak_gpu_gib``) and
    ``describe(engine)``'s; a failed row when anything raises."""
    entry = asdict(case)
    memory.reset()
    engine = None
    try:
        engine = make_engine()
        load_peak = memory.peak_gib()
        memory.reset()  # the peak of the calls apart from the load's (the weights stay allocated and are counted)
        pre = (lambda: engine.last_timings["preprocess"]) if preprocess_ms else None
        entry.update(time_calls(call(engine), device, iters, warmup, pre))
        calls_peak = memory.peak_gib()
        peak = calls_peak if peak_of_calls_only or calls_peak is None else max(load_peak, calls_peak)
        entry.update(cuda_graphs=engine.use_cuda_graphs, dtype=dtype_name(dtype),
                     stages_ms=None if engine.use_cuda_graphs else dict(engine.last_timings),
                     peak_gpu_gib=peak, load_peak_gpu_gib=load_peak, calls_peak_gpu_gib=calls_peak, **describe(engine))
        return entry
    except Exception as err:  # noqa: BLE001 - reported, and the grid goes on
        return failed_case(entry, err)
    finally:
        engine = None  # the engine's GPU memory is released before the next case's
        memory.reset()


def _run_case(case: Case, base: ModelConfig, draw_state_dict: Callable[[], dict], dtype, device, memory: GpuMemory,
              rng: np.random.Generator, iters: int, warmup: int, prompt_buckets="auto",
              image_preprocessing: str = "auto", backend=None, token_embedding: str = "auto") -> dict:
    """Time one case; when it cannot run, a dict with ``reason`` and ``outcome`` (skipped / failed).
    ``draw_state_dict()`` gives the weights, which the case's engine then owns alone. ``backend``: what the
    engine's backend is created from (default: ``case.backend``, the name)."""
    config = base.replace(chunk_size=case.chunk, num_diffusion_steps=case.steps)
    if case.prompt_len > config.max_token_len:
        return {**asdict(case), "outcome": "skipped",
                "reason": f"prompt length {case.prompt_len} > the model's max_token_len {config.max_token_len}"}
    def describe(engine: VLAInferenceEngine) -> dict:
        bucket = next(n for n in engine.prompt_buckets if n >= case.prompt_len)
        held = engine.weight_bytes()
        return dict(backend_options=backend_options(engine.backend), prompt_bucket=bucket,
                    device_weights_gib=held["device"] / 2**30, host_weights_gib=held["host"] / 2**30,
                    prefix_tokens=case.views * config.num_patches + bucket,
                    valid_prefix_tokens=case.views * config.num_patches + case.prompt_len)

    return timed_entry(
        case,
        lambda: make_engine(draw_state_dict(), config, case.views, case.cuda_graphs, dtype, device,
                            backend or case.backend, prompt_buckets, image_preprocessing, token_embedding),
        lambda engine: predict_call(engine, random_observation(config, case.views, case.prompt_len, rng)),
        memory, device, iters, warmup, dtype, describe, preprocess_ms=True, peak_of_calls_only=True)


def failed_case(entry: dict, err: Exception) -> dict:
    """A grid row for a case that raised: ``skipped`` (backend missing, not implemented, out of GPU
    memory) or ``failed``, with the error as the reason."""
    outcome = "skipped" if isinstance(err, SKIP_ERRORS) else "failed"
    return {**entry, "outcome": outcome, "reason": f"{type(err).__name__}: {err}"}


def print_bench(results: dict, console) -> None:
    """The runs as a rich table (ms and GiB), then the skipped and failed cases with their reasons."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    env, work = results["environment"], results["workload"]
    title = (f"{env['device']}  torch {env['torch']}  ({work['size']} size, {work['dtype']}, "
             f"{'CUDA events' if env['device_type'] == 'cuda' else 'host clock'})")
    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
    for header in ("model", "backend", "views", "prompt", "chunk", "steps", "graphs", "median ms", "p90 ms",
                   "min ms", "peak GiB", "iters"):
        table.add_column(header, justify="left" if header in ("model", "backend") else "right")
    for r in results["runs"]:
        table.add_row(r["model"], r["backend"], str(r["views"]), str(r["prompt_len"]), str(r["chunk"]),
                      "-" if r["steps"] is None else str(r["steps"]),
                      "on" if r["cuda_graphs"] else "off", f"{r['median_ms']:.2f}", f"{r['p90_ms']:.2f}",
                      f"{r['min_ms']:.2f}", "-" if r["peak_gpu_gib"] is None else f"{r['peak_gpu_gib']:.2f}",
                      str(r["iters"]))
    console.print(table)
    for note in results.get("notes", ()):
        console.print(Text(note, style="dim"))
    for kind, style in (("skipped", "yellow"), ("failed", "red")):
        for r in results[kind]:
            what = [r["model"], r["backend"]] + [f"{k}={r[k]}" for k in ("views", "prompt_len", "chunk", "steps",
                                                                         "cuda_graphs") if k in r]
            reason = " ".join(r["reason"].split())
            console.print(Text(f"{kind} {' '.join(what)}: {reason[:500]}", style=style))
