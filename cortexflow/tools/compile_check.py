"""``cortexflow compile-check``: compile every Triton kernel that a real-size call launches for a GPU
architecture (Hopper by default), without a GPU, and report what each compiled kernel needs of an SM.

The forward (a Pi0 / Pi0.5 ``predict``; OpenVLA-7B / RT-2 prefill and every decode step) runs on ``meta``
tensors (shapes only, no memory, no arithmetic) with the Triton backend, while every Triton launch is turned
into a compile-only call for the chosen target: the kernels go through Triton's whole pipeline down to a
cubin (``ptxas`` ships with Triton), with the same specialisations (block sizes, tilings, flags, dtypes,
16-byte alignment) as on the GPU, because the launch wrappers choose them from the shapes and from
:class:`~cortexflow.kernels.runtime.CompileTarget`'s SM count and compute capability. Nothing is launched.
What this catches that the CPU interpreter cannot: code that does not compile for the GPU (``tl.dot``
shapes, inline PTX such as programmatic dependent launch, instructions an older
architecture lacks), kernels that need more shared memory than an SM gives a program, and persistent kernels
whose grid cannot be resident at once (their grid barriers would wait forever).

Per compiled kernel the report gives registers per thread, shared memory per program, local-memory
instructions (register spills or stack arrays) and how many programs fit on one SM, from ``cuobjdump`` on the
cubin and the compiler's metadata; per call, the Triton launches and the torch operators that launch kernels
(:class:`TorchOpCensus`). It does not say how fast anything runs."""

from __future__ import annotations

import collections
import contextlib
import math
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from cortexflow.config import TOKEN_DECODING_MODELS, ModelConfig, VLAModelType, dtype_name, parse_dtype
from cortexflow.errors import BackendUnavailableError, ConfigError
from cortexflow.kernels import runtime
from cortexflow.kernels.runtime import CompileTarget, interpreting
from cortexflow.backends.triton_options import TritonOptions

#: The Triton backend's paths other than the default, each a set of :class:`TritonOptions` fields (the A/B runs
#: of benchmarks/NOTES.md switch these); compiling them keeps those runs from failing on the GPU for a reason
#: the CPU could have shown. Each changes what a call compiles or launches (a test checks every pair).
VARIANTS: dict[str, dict[str, object]] = {
    "default": {},
    # The Pi0 family's expert layers as a chain of ~10 kernels instead of one persistent kernel each.
    "kernel-chain": {"persistent_expert": False},
    # The Pi0 family's expert layers as one launch each (the default launches a whole Euler step).
    "expert-layer": {"expert_launch": "layer"},
    # The Pi0 family's vision tower and prefix op by op.
    "op-by-op-encoder": {"fused_encoder": False},
    # The token VLAs' (OpenVLA, RT-2) decode steps without their fused paths, and no programmatic dependent launch.
    "token-unfused": {"decode_gemv": "off", "decode_qkv_rope": False, "decode_head": False,
                      "fold_token_norms": False, "fused_combine": "off", "pdl": "off"},
    # FP8 weights in every stage that has an FP8 path (refused below compute capability 8.9).
    "fp8": {"fp8": "all"},
}

#: The models compile-check runs.
MODELS = (VLAModelType.PI0, VLAModelType.PI05, VLAModelType.OPENVLA, VLAModelType.RT2)

#: Kernels that synchronise their whole grid (grid barriers): every program must be resident at once.
PERSISTENT_KERNELS = frozenset({"_expert_layer_kernel", "_expert_step_kernel"})


@dataclass(frozen=True)
class SMLimits:
    """What one SM of an architecture holds at once (CUDA programming guide, compute capabilities table):
    registers, shared memory (of which one program may take ``program_shared``; the driver reserves 1 KiB per
    program on top), resident warps and resident programs."""

    registers: int
    shared: int
    program_shared: int
    warps: int
    programs: int


#: Per compute capability (major * 10 + minor) that compile-check targets.
SM_LIMITS = {
    80: SMLimits(65536, 164 * 1024, 163 * 1024, 64, 32),   # A100
    86: SMLimits(65536, 100 * 1024, 99 * 1024, 48, 16),    # RTX 30xx, A10, A40
    87: SMLimits(65536, 164 * 1024, 163 * 1024, 48, 16),   # Jetson AGX Orin
    89: SMLimits(65536, 100 * 1024, 99 * 1024, 48, 24),    # L4, L40, RTX 40xx
    90: SMLimits(65536, 228 * 1024, 227 * 1024, 64, 32),   # H100, H200
}
RESERVED_SHARED_PER_PROGRAM = 1024


@dataclass
class CompiledLaunch:
    """One compile-only launch: the kernel's name, its grid (None when given as a function), the launch's
    constexpr keyword arguments and the compiled kernel."""

    name: str
    grid: tuple[int, ...] | None
    constexprs: dict[str, Any]
    kernel: Any
    seconds: float


@dataclass
class KernelUsage:
    """What one compiled specialisation of a kernel needs of an SM."""

    name: str
    key: str
    num_warps: int
    num_stages: int
    registers: int
    shared_bytes: int
    local_bytes: int
    stack_bytes: int
    local_instructions: int
    programs_per_sm: int
    max_grid: int = 0
    compile_seconds: float = 0.0
    constexprs: dict[str, Any] = field(default_factory=dict)
    launches_by_variant: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def launches(self) -> int:
        return sum(self.launches_by_variant.values())

    @property
    def variants(self) -> list[str]:
        return sorted(self.launches_by_variant)


def programs_per_sm(registers: int, num_warps: int, shared_bytes: int, limits: SMLimits = SM_LIMITS[90]) -> int:
    """How many programs of a kernel fit on one SM (Hopper's by default) at once: the least of what its
    registers (allocated per warp in units of 256), its shared memory (plus the 1 KiB the driver reserves
    per program), its warps and the resident-program limit allow."""
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_registers = limits.registers // (per_warp * num_warps)
    by_shared = limits.shared // (shared_bytes + RESERVED_SHARED_PER_PROGRAM)
    return max(0, min(by_registers, by_shared, limits.warps // num_warps, limits.programs))


_RESOURCE_LINE = re.compile(r"Function\s+(\S+):\s*\n\s*REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def cubin_resources(cubin: bytes) -> dict[str, int]:
    """Registers per thread, stack frame, static shared and local memory (bytes per thread) of the one
    function in ``cubin``, and how many local-memory instructions (``STL``/``LDL``) its SASS has: register
    spills, or a dynamically indexed stack array such as the slow path of the precise ``sin``/``cos``
    range reduction (the RoPE kernels' only ones); read with the ``cuobjdump`` that ships with Triton."""
    from triton import knobs

    tool = knobs.nvidia.cuobjdump.path
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        listing = subprocess.run([tool, "--dump-resource-usage", handle.name], capture_output=True, text=True,
                                 check=True).stdout
        sass = subprocess.run([tool, "--dump-sass", handle.name], capture_output=True, text=True, check=True).stdout
    match = _RESOURCE_LINE.search(listing)
    if match is None:
        raise RuntimeError(f"cannot read the resource usage from cuobjdump's output:\n{listing}")
    return {"registers": int(match.group(2)), "stack": int(match.group(3)), "static_shared": int(match.group(4)),
            "local": int(match.group(5)), "local_instructions": len(_LOCAL_INSTRUCTION.findall(sass))}


_LOCAL_INSTRUCTION = re.compile(r"\b(?:STL|LDL)(?:\.[A-Z0-9]+)*\s")


def _refuse_interpreter() -> None:
    if interpreting():
        raise ConfigError("compile-check compiles the kernels for a GPU: unset TRITON_INTERPRET (the interpreter "
                          "replaces Triton's compiler)")


@contextlib.contextmanager
def compile_only(target: CompileTarget) -> Iterator[list[CompiledLaunch]]:
    """Within the block, every Triton launch compiles its kernel for ``target`` and returns without running
    it; the yielded list collects the launches. Work on ``meta`` tensors: the launch wrappers then take the
    target's SM count (:func:`~cortexflow.kernels.runtime.processor_count`) and its PDL support."""
    _refuse_interpreter()
    try:
        from triton.backends.compiler import GPUTarget
        from triton.runtime.driver import driver
        from triton.runtime.jit import JITFunction
    except ImportError as err:
        from cortexflow.kernels import TRITON_INSTALL_HINT

        raise ConfigError(f"compile-check needs Triton ({err}): {TRITON_INSTALL_HINT}") from err

    class _TargetDriver:
        """Just enough of a Triton driver for compile-only launches: one device, one stream, ``target``."""

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", target.arch, 32)

    launches: list[CompiledLaunch] = []
    original_run = JITFunction.run
    # A JIT function keeps its compile target per device index in ``device_caches``, made at its first launch:
    # without a fresh one in this block, a function first compiled for another target (an earlier block, a real
    # GPU) would be compiled for that target again. The originals come back when the block ends.
    saved_caches: dict = {}

    def compile_instead(self, *args, grid, warmup, **kwargs):
        if self not in saved_caches:
            saved_caches[self] = self.device_caches
            self.device_caches = collections.defaultdict(self.create_binder)
        start = time.perf_counter()
        kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        constexprs = {k: v for k, v in kwargs.items() if k.isupper() or k in ("num_warps", "num_stages")}
        launches.append(CompiledLaunch(self.fn.__name__, tuple(grid) if isinstance(grid, (tuple, list)) else None,
                                       constexprs, kernel, time.perf_counter() - start))
        return kernel

    previous_target = runtime.set_compile_target(target)
    previous_driver = getattr(driver, "_active", None)  # None: Triton makes its default driver when next asked
    driver.set_active(_TargetDriver())
    JITFunction.run = compile_instead
    try:
        yield launches
    finally:
        JITFunction.run = original_run
        for function, caches in saved_caches.items():
            function.device_caches = caches
        driver.set_active(previous_driver)
        runtime.set_compile_target(previous_target)


class TorchOpCensus:
    """Counts the torch (aten) operators a block runs that would launch at least one GPU kernel each (everything
    but views, ``empty*`` allocations and size queries): with the Triton launches, how many kernels one call
    launches outside Triton (cuBLAS GEMMs, copies, elementwise ops), which a CUDA graph replays with a gap each.
    A cuBLAS split-K GEMM launches two kernels and is counted once, so the count is a lower bound."""

    def __init__(self):
        import collections

        self.counts: collections.Counter = collections.Counter()

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        from torch.utils._python_dispatch import TorchDispatchMode

        counts = self.counts

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if not func.is_view and not func.__name__.startswith(("empty", "sym_", "_local_scalar")):
                    counts[func.__name__.split(".")[0]] += 1
                return func(*args, **(kwargs or {}))

        with _Mode():
            yield


def compile_predict(model_name: str, views: int, dtype: torch.dtype, target: CompileTarget,
                    options: TritonOptions | None = None,
                    census: TorchOpCensus | None = None) -> list[CompiledLaunch]:
    """Run one real-size forward of ``model_name`` with the Triton backend on meta tensors, every launch
    compiled for ``target`` instead of run; returns the launches. ``pi0`` / ``pi05``: one ``predict`` with
    ``views`` cameras and the model's chunk, steps and full prompt length; ``openvla`` / ``rt2``: prefill of
    the longest prompt and every greedy decode step (one image; ``views`` does not apply), decoding constrained
    as their factories default; the Pi0 family's text embedding is looked up on the host, as the engine does on a
    GPU (``InferenceConfig.token_embedding``). ``options``: the backend's (default: its defaults). ``census``:
    counts the torch operators of a second forward (as every call after the first runs: without the weight
    preparation and the backend's one-time tables); its launches compile nothing new and are not returned."""
    from cortexflow.backends.triton_backend import TritonBackend

    model_type = VLAModelType.parse(model_name)
    meta = torch.device("meta")
    token_vla = model_type in TOKEN_DECODING_MODELS
    if token_vla:
        from cortexflow.tools import token_model
        from cortexflow.tools.bench_workloads import CONSTRAINED

        model = token_model(model_name, "real")
        buffer_shapes = model.get_buffer_shapes()
    else:
        from cortexflow.models.pi0 import Pi0Model, Pi05Model

        config = ModelConfig.for_model(model_type)
        model = (Pi0Model if model_type == VLAModelType.PI0 else Pi05Model)(config)
        buffer_shapes = model.get_buffer_shapes(views, config.chunk_size)
    with compile_only(target) as launches:
        backend = TritonBackend(meta, dtype, options)
        shapes = model.get_weight_shapes()
        host = None if token_vla else model.host_embedding
        if host is not None:  # the engine's default on a GPU: the table in host memory, its rows a buffer
            buffer_shapes[host.embeddings] = (*buffer_shapes.pop(host.ids), shapes.pop(host.table)[1])
        weights = {name: torch.empty(shape, dtype=model.weight_dtype(name, dtype), device=meta)
                   for name, shape in shapes.items()}
        if token_vla:
            weights = model.prepare_weights(weights)
        weights = backend.prepare_weights(model, weights)
        buffers = {name: torch.zeros(shape, dtype=model.buffer_dtype(name, dtype), device=meta)
                   for name, shape in buffer_shapes.items()}

        def forward():
            if token_vla:
                model.forward(backend, weights, buffers, constrained=CONSTRAINED[model_type])
            else:
                model.forward(backend, weights, buffers)

        with torch.inference_mode():
            forward()
            first_call = len(launches)
            if census is not None:  # a second call, as every call after the first (one-time tables are cached)
                with census.counting():
                    forward()
    return launches[:first_call]


def summarize(launches_by_variant: dict[str, list[CompiledLaunch]], target: CompileTarget) -> list[KernelUsage]:
    """One :class:`KernelUsage` per compiled specialisation (by the kernel's hash), with the checks: shared
    memory within one program's limit, at least one program per SM, and for :data:`PERSISTENT_KERNELS` a
    grid that is resident at once on ``target.processors`` SMs."""
    limits = SM_LIMITS[target.arch]
    usages: dict[str, KernelUsage] = {}
    for variant, launches in launches_by_variant.items():
        for launch in launches:
            metadata = launch.kernel.metadata
            key = metadata.hash
            usage = usages.get(key)
            if usage is None:
                resources = cubin_resources(launch.kernel.asm["cubin"])
                shared = metadata.shared + resources["static_shared"]
                usage = usages[key] = KernelUsage(
                    name=launch.name, key=key[:8], num_warps=metadata.num_warps, num_stages=metadata.num_stages,
                    registers=resources["registers"], shared_bytes=shared, local_bytes=resources["local"],
                    stack_bytes=resources["stack"], local_instructions=resources["local_instructions"],
                    programs_per_sm=programs_per_sm(resources["registers"], metadata.num_warps, shared, limits),
                    constexprs=launch.constexprs)
            usage.compile_seconds += launch.seconds
            usage.launches_by_variant[variant] = usage.launches_by_variant.get(variant, 0) + 1
            if launch.grid is not None:
                usage.max_grid = max(usage.max_grid, math.prod(int(size) for size in launch.grid))
    for usage in usages.values():
        if usage.shared_bytes > limits.program_shared:
            usage.problems.append(f"needs {usage.shared_bytes / 1024:.0f} KiB of shared memory per program, over "
                                  f"the {limits.program_shared // 1024} KiB limit: the launch would fail")
        elif usage.programs_per_sm < 1:
            usage.problems.append("not one program fits on an SM")
        if usage.name in PERSISTENT_KERNELS and usage.max_grid > usage.programs_per_sm * target.processors:
            usage.problems.append(
                f"grid of {usage.max_grid} programs with grid barriers, but only {usage.programs_per_sm} per SM x "
                f"{target.processors} SMs can be resident: the barriers would wait forever")
    return sorted(usages.values(), key=lambda u: (u.name, u.key))


def run_compile_check(models: Sequence[str] = ("pi0", "pi05"), views: Sequence[int] = (2,),
                      variants: Sequence[str] = ("default",), dtype: str | torch.dtype = "bfloat16",
                      arch: int = 90, processors: int = 132,
                      log: Callable[[str], None] | None = None) -> dict:
    """Compile every kernel of ``models`` (pi0, pi05, openvla, rt2) x ``views`` (Pi0 family only) x
    ``variants`` (names of :data:`VARIANTS`, or ``all``) for ``sm_<arch>`` with ``processors`` SMs; returns
    the report (kernels, problems, each variant's options)."""
    for model_name in models:  # an unknown or unsupported name fails here, before anything compiles
        if VLAModelType.parse(model_name) not in MODELS:
            raise ConfigError(f"compile-check runs {', '.join(m.value for m in MODELS)}; got {model_name!r}")
    names = list(VARIANTS) if list(variants) == ["all"] else list(variants)
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        raise ConfigError(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)} or all")
    if arch not in SM_LIMITS:
        raise ConfigError(f"compile-check targets compute capability {', '.join(map(str, SM_LIMITS))} (the kernels "
                          f"use bf16 tensor cores; the SM limits are known for these), got {arch}")
    if processors < 1:
        raise ConfigError(f"--sms must be at least 1, got {processors}")
    _refuse_interpreter()
    torch_dtype = parse_dtype(dtype)
    target = CompileTarget(arch=arch, processors=processors)
    launches: dict[str, list[CompiledLaunch]] = {}
    cases: list[dict] = []
    failures: list[str] = []
    start = time.perf_counter()
    for variant in names:
        for model_name in models:
            token_vla = VLAModelType.parse(model_name) in TOKEN_DECODING_MODELS
            for view_count in views[:1] if token_vla else views:
                case_start = time.perf_counter()
                case = {"variant": variant, "model": model_name, "views": None if token_vla else view_count}
                inputs = "one image" if token_vla else f"{view_count} views"
                census = TorchOpCensus()
                try:
                    compiled = compile_predict(model_name, view_count, torch_dtype, target,
                                               TritonOptions(**VARIANTS[variant]), census)
                except BackendUnavailableError as err:  # an option the backend refuses on this GPU, by design
                    cases.append(dict(case, refused=str(err)))
                    if log:
                        log(f"refused {variant} / {model_name} / {inputs}: {err}")
                    continue
                except ConfigError:  # a wrong argument or option: nothing else would compile either
                    raise
                except Exception as err:  # a kernel that does not compile: reported, the other cases go on
                    message = f"{type(err).__name__}: {err}"
                    cases.append(dict(case, error=message[:4000]))
                    failures.append(f"{variant} / {model_name} / {inputs}: {message[:4000]}")
                    if log:
                        log(f"FAILED {variant} / {model_name} / {inputs}: {message.splitlines()[0][:300]}")
                    continue
                launches.setdefault(variant, []).extend(compiled)
                seconds = time.perf_counter() - case_start
                cases.append(dict(case, launches=len(compiled), torch_kernels=sum(census.counts.values()),
                                  torch_ops=dict(census.counts.most_common()), seconds=round(seconds, 2)))
                if log:
                    log(f"compiled {variant} / {model_name} / {inputs}: {len(compiled)} Triton launches, "
                        f"{sum(census.counts.values())} torch kernels, {seconds:.1f} s")
    usages = summarize(launches, target)
    import triton

    return {
        "tool": "cortexflow compile-check",
        "target": {"arch": f"sm_{arch}", "processors": processors},
        "dtype": dtype_name(torch_dtype),
        "models": list(models),
        "views": list(views),
        "variants": {name: VARIANTS[name] for name in names},
        "triton_options": {name: TritonOptions(**VARIANTS[name]).as_dict() for name in names},
        "versions": {"triton": triton.__version__, "torch": torch.__version__},
        "cases": cases,
        "seconds": round(time.perf_counter() - start, 2),
        "kernels": [
            {"name": u.name, "hash": u.key, "num_warps": u.num_warps, "num_stages": u.num_stages,
             "registers": u.registers, "shared_bytes": u.shared_bytes, "local_bytes": u.local_bytes,
             "stack_bytes": u.stack_bytes, "local_instructions": u.local_instructions,
             "programs_per_sm": u.programs_per_sm, "launches": u.launches, "max_grid": u.max_grid,
             "compile_seconds": round(u.compile_seconds, 2), "variants": u.variants,
             "launches_by_variant": u.launches_by_variant,
             "constexprs": {k: _jsonable(v) for k, v in u.constexprs.items()}, "problems": u.problems}
            for u in usages
        ],
        "problems": failures + [f"{u.name} ({u.key}): {p}" for u in usages for p in u.problems],
        "passed": not failures and not any(u.problems for u in usages),
    }


def _jsonable(value: Any) -> Any:
    return value if isinstance(value, (bool, int, float, str, type(None))) else str(value)


def print_compile_check(report: dict, console) -> None:
    """The kernels table (one row per compiled specialisation: warps, pipeline stages, registers a thread,
    shared memory a program, local-memory instructions, programs per SM, largest grid, launches, variants),
    then the problems or a pass line."""
    from rich.table import Table

    target = report["target"]
    table = Table(title=f"Triton kernels compiled for {target['arch']} ({target['processors']} SMs), "
                        f"{report['dtype']}, Triton {report['versions']['triton']}")
    for column in ("kernel", "hash", "warps", "stages", "regs", "smem KiB", "local", "per SM", "grid", "launches",
                   "variants"):
        table.add_column(column, justify="left" if column in ("kernel", "hash", "variants") else "right",
                         overflow="fold", no_wrap=column in ("kernel", "hash"))
    for k in report["kernels"]:
        table.add_row(k["name"], k["hash"], str(k["num_warps"]), str(k["num_stages"]), str(k["registers"]),
                      f"{k['shared_bytes'] / 1024:.1f}", str(k["local_instructions"]), str(k["programs_per_sm"]),
                      str(k["max_grid"]), str(k["launches"]),
                      "all" if len(k["variants"]) == len(report["variants"]) > 1 else ",".join(k["variants"]))
    console.print(table)
    calls = Table(title="Kernels one call launches (every call after the first; torch ops: at least one kernel each)")
    for column in ("variant", "model", "views", "Triton launches", "torch kernels", "most frequent torch ops"):
        calls.add_column(column, justify="right" if column in ("views", "Triton launches", "torch kernels") else "left")
    for case in report["cases"]:
        if "launches" in case:
            top = ", ".join(f"{name} {count}" for name, count in list(case["torch_ops"].items())[:4])
            calls.add_row(case["variant"], case["model"], "-" if case["views"] is None else str(case["views"]),
                          str(case["launches"]), str(case["torch_kernels"]), top)
    console.print(calls)
    for case in report["cases"]:
        if "refused" in case:
            console.print(f"refused on {target['arch']}: {case['variant']} / {case['model']}: {case['refused']}")
    if report["problems"]:
        for problem in report["problems"]:
            console.print(f"[red]problem[/red]: {problem}")
    else:
        compiled = sum(1 for case in report["cases"] if "launches" in case)
        console.print(f"all {len(report['kernels'])} kernel specialisations compile for {target['arch']} and fit "
                      f"({compiled} forward passes, {report['seconds']:.0f} s)")
