"""The measurement commands over :mod:`cortexflow.tools`: ``verify``, ``bench``, ``profile`` (any model:
the family of ``--model`` supplies the work, see :mod:`cortexflow.families`) and ``compile-check``."""

import dataclasses
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.text import Text

from cortexflow.cli.common import (
    ALL_MODELS_HELP,
    BACKENDS_HELP,
    EXIT_PROBLEMS,
    MODELS_HELP,
    TOKEN_HELP,
    cli_errors,
    parse_number_list,
    parse_switches,
    progress_line,
    stderr_console,
    write_report,
)
from cortexflow.cli_options import check_common_options, parse_model_option
from cortexflow.backends.triton_options import TritonOptions
from cortexflow.config import is_auto
from cortexflow.errors import ConfigError
from cortexflow.families import models_for

JSON_PATH_HELP = "Also write the report as JSON to PATH ('-': print only the JSON, on stdout)."


TRITON_OPTIONS_HELP = ("triton backend: TritonOptions to change, e.g. persistent_expert=0,pdl=off (fields: "
                       f"{', '.join(f.name for f in dataclasses.fields(TritonOptions))}); recorded in the JSON.")
PRECISION_HELP = ("default (weights in --dtype) or fp8: the triton backend holds a token VLA's language model, or the "
                  "Pi0 family's action expert, in FP8 (E4M3 with per-channel scales, quantised at load; the same as "
                  "--triton-options fp8=decoder; fp8=all also quantises the Pi0 family's Gemma prefix). Needs a GPU of "
                  "compute capability 8.9+ (L4, RTX 4090, H100) and --dtype bfloat16.")


@cli_errors
def verify_command(
    model: Annotated[str, typer.Option("--model", "-m", metavar="NAME", help=f"One of {ALL_MODELS_HELP}.")] = "pi0",
    backend: Annotated[str, typer.Option("--backend", "-b", metavar="NAME", help=f"The backend to check: {BACKENDS_HELP}.")] = "pytorch",
    against: Annotated[str, typer.Option("--against", metavar="NAME", help="The reference backend; it runs in float32.")] = "pytorch",
    size: Annotated[str, typer.Option("--size", metavar="SIZE", help="tiny (test dimensions), real (published Pi0/Pi0.5, OpenVLA-7B, PaliGemma-3B sizes) or auto (real on a GPU, tiny on CPU).")] = "auto",
    device: Annotated[str, typer.Option("--device", metavar="DEVICE", help="auto (GPU if there is one), cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", metavar="DTYPE", help="The checked backend's dtype: auto (bfloat16 on GPU, float32 on CPU), bfloat16, float16 or float32.")] = "auto",
    seed: Annotated[int, typer.Option("--seed", metavar="N", help="Seed of the random weights (inputs use N+1).")] = 0,
    views: Annotated[int, typer.Option("--views", metavar="N", help="Camera views of the random inputs (ignored for openvla/rt2: one image).")] = 2,
    repeats: Annotated[Optional[int], typer.Option("--repeats", metavar="N", help="Timed runs per module and backend (the median is shown) [default: 3; 1 under TRITON_INTERPRET=1, whose times mean nothing].")] = None,
    triton_options: Annotated[Optional[str], typer.Option("--triton-options", metavar="NAME=VALUE,...", help=TRITON_OPTIONS_HELP)] = None,
    precision: Annotated[str, typer.Option("--precision", metavar="NAME", help=PRECISION_HELP + " verify then also compares each module with the same backend in bfloat16 (limit on the final actions: 5e-2 and cosine >= 0.998).")] = "default",
    json_path: Annotated[Optional[str], typer.Option("--json", metavar="PATH", help=JSON_PATH_HELP)] = None,
) -> None:
    """Compare a backend with the reference module by module on random weights and random inputs.

    Modules: patch embedding, SigLIP layer 0, the SigLIP tower, the projector, the vision stage, prefix
    layer 0, the prefix KV cache, one denoising step, and the whole action chunk. Each module gets the
    reference's output of the one before, so an error shows where it arises. Reported per module:
    max |Δ| and ‖Δ‖/‖ref‖ against the reference in float32, and each backend's time (median, GPU
    synchronised). Modules a backend does not implement are shown as n/a.

    --model openvla: the DINOv2 tower, the SigLIP tower, the projector, the vision stage, Llama layer 0,
    the prefill logits, the decode logits (prefill + cached steps fed the reference's tokens) and the
    whole greedy generation (7 tokens, constrained to the action ids) with its actions and token
    agreement. --model rt2: patch embedding, SigLIP layer 0, the tower, the projector, the vision stage,
    Gemma layer 0, then the same prefill / decode / actions modules. In bfloat16/float16 a token that
    flips at a near-tie of the reference's logits passes as "tie" when the decode logits are within the
    limit; in float32 every token must agree. --model rt1: the FiLM-EfficientNet map, TokenLearner,
    decoder layer 0, the logits over a full window, and an 8-frame episode (its continuous actions).

    Exit code 0: the final actions are within the limit (float32: ‖Δ‖/‖ref‖ <= 1e-4; bfloat16/float16:
    <= 2e-2); 1: they are not; 2: the check could not run.

    --backend onnx: the three stages exported to ONNX (cached; dynamic batch 1-16, opset 20, unrolled
    decoder) and run in ONNX Runtime on the CPU, each against the PyTorch fp32 stage (vision_encoder,
    prefix, decoder, and the whole chain as actions); every stage must reach ‖Δ‖/‖ref‖ <= 1e-5 in
    float32 (2e-2 in float16). Needs pip install "cortexflow[onnx]".
    """
    parse_model_option(model, command="verify")
    check_common_options(device=device, backend=backend, dtype=dtype)
    check_common_options(backend=against)
    if repeats is None:
        from cortexflow.kernels.runtime import interpreting

        repeats = 1 if interpreting() else 3
    if backend.strip().lower() == "onnx":
        from cortexflow.onnx.verify import print_onnx_verify, run_onnx_verify

        onnx_size = "tiny" if is_auto(size) else size.strip().lower()
        onnx_dtype = "float32" if is_auto(dtype) else dtype
        report = run_onnx_verify(model, size=onnx_size, dtype=onnx_dtype, seed=seed, views=views, repeats=repeats,
                                 log=progress_line)
        write_report(report, json_path, print_onnx_verify)
        if not report["passed"]:
            raise typer.Exit(EXIT_PROBLEMS)
        return
    from cortexflow.tools import backend_specs
    from cortexflow.tools.verify import print_verify, run_verify

    from cortexflow.tools import options_for_precision

    name = backend.strip().lower()
    if precision.strip().lower() != "default" and name != "triton":
        raise ConfigError(f"--precision {precision} runs on the triton backend; got --backend {backend}: use --backend triton")
    triton_options = options_for_precision(triton_options, precision, device, dtype)
    checked = backend_specs([name], triton_options, "--triton-options")[name]
    report = run_verify(model, checked, against, size=size, device=device, dtype=dtype, seed=seed, views=views,
                        repeats=repeats, log=progress_line)
    write_report(report, json_path, print_verify)
    if not report["passed"]:
        raise typer.Exit(EXIT_PROBLEMS)


@cli_errors
def bench_command(
    models: Annotated[str, typer.Option("--models", metavar="LIST", help=f"Comma-separated models: {ALL_MODELS_HELP} ({TOKEN_HELP} and rt1 ignore --views, --chunk and --steps: one image, their own action length, greedy decoding; rows record views=1 and steps -).")] = "pi0,pi05",
    backends: Annotated[str, typer.Option("--backends", metavar="LIST", help=f"Comma-separated backend names ({BACKENDS_HELP}); unavailable ones are reported as skipped.")] = "pytorch",
    views: Annotated[str, typer.Option("--views", metavar="LIST", help="Comma-separated camera-view counts.")] = "1,2,3",
    prompt_len: Annotated[str, typer.Option("--prompt-len", metavar="LIST", help="Comma-separated prompt lengths in tokens (pi0/pi05: padded to the smallest --prompt-buckets length that holds them; openvla/rt2: ids incl. BOS and closing id, padded to a multiple of 16).")] = "20",
    image_preprocessing: Annotated[str, typer.Option("--image-preprocessing", metavar="WHERE", help="pi0/pi05: where the 224x224 uint8 views are scaled: auto (the GPU on a GPU), device or host.")] = "auto",
    prompt_buckets: Annotated[str, typer.Option("--prompt-buckets", metavar="SPEC", help="pi0/pi05 padded prompt lengths: auto (32, 64, 128, ... and max_token_len), off (always max_token_len, as openpi pads) or a list like 32,64.")] = "auto",
    token_embedding: Annotated[str, typer.Option("--token-embedding", metavar="WHERE", help="pi0/pi05: where the prompt's rows of the 1 GB text embedding are looked up: auto (the host on a GPU, keeping the table off it), host or device.")] = "auto",
    chunk: Annotated[str, typer.Option("--chunk", metavar="LIST", help="Comma-separated action chunk lengths.")] = "50",
    steps: Annotated[str, typer.Option("--steps", metavar="LIST", help="Comma-separated denoising step counts.")] = "10",
    graphs: Annotated[str, typer.Option("--graphs", metavar="LIST", help="Whole-predict CUDA graph: on, off or on,off (GPU only; the CPU runs off).")] = "on,off",
    iters: Annotated[int, typer.Option("--iters", metavar="N", help="Timed calls per case.")] = 100,
    warmup: Annotated[int, typer.Option("--warmup", metavar="N", help="Untimed calls per case first.")] = 10,
    size: Annotated[str, typer.Option("--size", metavar="SIZE", help="real (published sizes), tiny, or auto (real on a GPU, tiny on CPU).")] = "auto",
    device: Annotated[str, typer.Option("--device", metavar="DEVICE", help="auto (GPU if there is one), cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", metavar="DTYPE", help="auto (bfloat16 on GPU, float32 on CPU), bfloat16, float16 or float32.")] = "auto",
    seed: Annotated[int, typer.Option("--seed", metavar="N", help="Seed of the random weights and inputs.")] = 0,
    triton_options: Annotated[Optional[str], typer.Option("--triton-options", metavar="NAME=VALUE,...", help=TRITON_OPTIONS_HELP)] = None,
    precision: Annotated[str, typer.Option("--precision", metavar="NAME", help=PRECISION_HELP + " Applies to the triton rows of the grid.")] = "default",
    json_path: Annotated[Optional[str], typer.Option("--json", metavar="PATH", help=JSON_PATH_HELP)] = None,
    batch_scaling: Annotated[bool, typer.Option("--batch-scaling", help="Instead of the predict grid: time one image encoder (--encoder) at each batch size (--batches) on each of --backends (pytorch, triton, onnx).")] = False,
    encoder: Annotated[str, typer.Option("--encoder", metavar="NAME", help="--batch-scaling: siglip (the policy's tower, real size), siglip_tiny, vit_small_patch16_224 or resnet18d (timm, random init).")] = "siglip_tiny",
    batches: Annotated[str, typer.Option("--batches", metavar="LIST", help="--batch-scaling: comma-separated batch sizes.")] = "1,2,3,4,5,6",
    max_seconds: Annotated[float, typer.Option("--max-seconds", metavar="S", help="--batch-scaling: stop timing a batch size after S seconds of runs (at least 3 runs).")] = 10.0,
    png: Annotated[Optional[Path], typer.Option("--png", metavar="PATH", help="--batch-scaling: also plot latency, images/s and scaling efficiency against the batch size to PATH.")] = None,
) -> None:
    """Time whole predict calls (input copies, forward, copy back) over the grid models x backends x views
    x prompt lengths x chunks x steps x CUDA graphs, on random non-zero weights.

    Per case: median, p90 and min latency after warm-up (CUDA events on a GPU, the host clock on CPU),
    peak GPU memory, and the stage split of the last call when no CUDA graph hides it. The JSON also
    records the device, the torch/triton/CUDA versions and the command line.

    openvla / rt2: one row per backend x prompt length x graphs of TokenVLAEngine.predict (one image,
    greedy tokens: OpenVLA 7 unconstrained, RT-2 chunk x action_dim constrained, as their factories
    default); --views, --chunk and --steps are ignored for them (noted in the output).

    With --batch-scaling: per backend and batch size B, latency per batch and per image, images/s, the
    scaling efficiency L(B)/(B·L(1)), the marginal ms per extra image and the achieved FLOP/s (and its
    share of a matmul measured on the device); --iters, --warmup, --device, --dtype, --seed and --json
    apply; the onnx backend exports the encoder with a dynamic batch into the export cache first.
    """
    check_common_options(device=device, dtype=dtype)
    for name in models.split(","):
        if name.strip():
            parse_model_option(name.strip(), option="--models", command="bench")
    if batch_scaling:
        from cortexflow.tools.batch_scaling import (
            plot_batch_scaling,
            print_batch_scaling,
            run_batch_scaling,
        )

        report = run_batch_scaling(
            encoder, [b.strip() for b in backends.split(",") if b.strip()], parse_number_list(batches, "--batches", int),
            device=device, dtype=dtype, iters=iters, warmup=warmup, max_seconds=max_seconds, seed=seed, log=progress_line,
        )
        write_report(report, json_path, print_batch_scaling)
        if png is not None:
            stderr_console().print(Text(f"wrote {plot_batch_scaling(report, png)}", style="dim"))
        return
    from cortexflow.tools import options_for_precision
    from cortexflow.tools.bench import print_bench, run_bench

    if token_embedding not in ("auto", "host", "device"):
        raise ConfigError(f"--token-embedding must be auto, host or device, got {token_embedding!r}")
    if precision.strip().lower() != "default" and "triton" not in [b.strip().lower() for b in backends.split(",")]:
        raise ConfigError(f"--precision {precision} applies to the triton backend, which is not among --backends {backends}")
    triton_options = options_for_precision(triton_options, precision, device, dtype)

    results = run_bench(
        models=[m.strip() for m in models.split(",") if m.strip()],
        backends=[b.strip() for b in backends.split(",") if b.strip()],
        views=parse_number_list(views, "--views", int),
        prompt_lens=parse_number_list(prompt_len, "--prompt-len", int),
        chunks=parse_number_list(chunk, "--chunk", int),
        steps=parse_number_list(steps, "--steps", int),
        graphs=parse_switches(graphs, "--graphs"),
        iters=iters,
        warmup=warmup,
        size=size,
        device=device,
        dtype=dtype,
        seed=seed,
        log=progress_line,
        prompt_buckets=prompt_buckets,
        image_preprocessing=image_preprocessing,
        token_embedding=token_embedding,
        triton_options=triton_options,
        options_source="--triton-options",
    )
    write_report(results, json_path, print_bench)


@cli_errors
def compile_check_command(
    models: Annotated[str, typer.Option("--models", metavar="LIST", help=f"Comma-separated: {MODELS_HELP}.")] = "pi0,pi05",
    views: Annotated[str, typer.Option("--views", metavar="LIST", help="Comma-separated camera view counts (Pi0 family; openvla/rt2 take one image).")] = "2",
    variants: Annotated[str, typer.Option("--variants", metavar="LIST", help="Comma-separated TritonOptions variants to compile: default, kernel-chain, expert-layer, op-by-op-encoder, token-unfused, fp8; or all.")] = "default",
    dtype: Annotated[str, typer.Option("--dtype", metavar="DTYPE", help="bfloat16, float16 or float32.")] = "bfloat16",
    arch: Annotated[int, typer.Option("--arch", metavar="N", help="Compute capability as major*10+minor: 90 (H100/H200), 80 (A100), 89 (L4/L40).")] = 90,
    sms: Annotated[int, typer.Option("--sms", metavar="N", help="SM count of the GPU (grids and tilings follow it): 132 for the H100 SXM.")] = 132,
    json_path: Annotated[Optional[str], typer.Option("--json", metavar="PATH", help=JSON_PATH_HELP)] = None,
) -> None:
    """Compile every Triton kernel that one real-size predict launches (Pi0 / Pi0.5; OpenVLA-7B / RT-2: prefill
    and every decode step), for a GPU, on a machine without one, and show what each compiled kernel needs of an SM.

    The forward runs on meta tensors (shapes only) with the Triton backend; each launch compiles its kernel
    for sm_ARCH with the grid and tiling it would get on a GPU of SMS SMs, and nothing runs. Per compiled
    specialisation: warps, pipeline stages, registers per thread, shared memory per program, local-memory
    instructions (register spills, or stack arrays such as precise sin/cos), programs per SM and the largest
    grid; per call, the Triton launches and the torch ops that launch kernels. Exits non-zero when a kernel
    does not compile, needs more shared memory than an SM gives one program, or a persistent kernel's grid
    (grid barriers) cannot be resident at once.
    Needs Triton and no TRITON_INTERPRET; says nothing about speed.
    """
    from cortexflow.tools.compile_check import print_compile_check, run_compile_check

    report = run_compile_check(
        models=[m.strip() for m in models.split(",") if m.strip()],
        views=parse_number_list(views, "--views", int),
        variants=[v.strip() for v in variants.split(",") if v.strip()],
        dtype=dtype, arch=arch, processors=sms, log=progress_line)
    write_report(report, json_path, print_compile_check)
    if not report["passed"]:
        raise typer.Exit(EXIT_PROBLEMS)


@cli_errors
def profile_command(
    model: Annotated[str, typer.Option("--model", "-m", metavar="NAME", help=f"One of {MODELS_HELP} ({TOKEN_HELP}: one image; --views, --chunk and --steps do not apply).")] = "pi0",
    backend: Annotated[str, typer.Option("--backend", "-b", metavar="NAME", help=f"Backend to profile: {BACKENDS_HELP}.")] = "pytorch",
    views: Annotated[int, typer.Option("--views", metavar="N", help="Camera views.")] = 2,
    prompt_len: Annotated[int, typer.Option("--prompt-len", metavar="N", help="Prompt tokens (padded to the model's maximum).")] = 20,
    chunk: Annotated[Optional[int], typer.Option("--chunk", metavar="N", help="Action chunk length [default: the model's].")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", metavar="N", help="Denoising steps [default: the model's].")] = None,
    size: Annotated[str, typer.Option("--size", metavar="SIZE", help="real (published sizes), tiny, or auto (real on a GPU, tiny on CPU).")] = "auto",
    device: Annotated[str, typer.Option("--device", metavar="DEVICE", help="auto (GPU if there is one), cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", metavar="DTYPE", help="auto (bfloat16 on GPU, float32 on CPU), bfloat16, float16 or float32.")] = "auto",
    top: Annotated[int, typer.Option("--top", metavar="N", help="Kernels (CPU: ops) listed, by total time.")] = 20,
    repeats: Annotated[int, typer.Option("--repeats", metavar="N", help="Un-profiled calls whose median stage times are shown.")] = 3,
    seed: Annotated[int, typer.Option("--seed", metavar="N", help="Seed of the random weights and inputs.")] = 0,
    peak_tflops: Annotated[Optional[float], typer.Option("--peak-tflops", metavar="X", help="Use this peak TFLOP/s instead of measuring it (with --peak-gbps).")] = None,
    peak_gbps: Annotated[Optional[float], typer.Option("--peak-gbps", metavar="X", help="Use this peak memory bandwidth in GB/s instead of measuring it.")] = None,
    triton_options: Annotated[Optional[str], typer.Option("--triton-options", metavar="NAME=VALUE,...", help=TRITON_OPTIONS_HELP)] = None,
    precision: Annotated[str, typer.Option("--precision", metavar="NAME", help=PRECISION_HELP)] = "default",
    json_path: Annotated[Optional[str], typer.Option("--json", metavar="PATH", help=JSON_PATH_HELP)] = None,
) -> None:
    """Run one predict without CUDA graphs under torch.profiler and show where the time goes.

    Per stage (vision, prefix, all denoising steps): time, FLOPs and minimum bytes (spec counts), the
    achieved TFLOP/s and GB/s, and on a GPU the floor max(FLOP/peak, bytes/bandwidth) against the peaks
    measured at the start (a bf16 8192^3 matmul, a 1 GiB device copy) and the gap to it. Then the top
    kernels by total GPU time (CPU: ops by self time) with call counts and shares.

    openvla / rt2: the whole call's time against two roofline rows, prefill (vision + LLM over image
    and prompt tokens) and decode (the single-token steps, memory-bound); the engine runs one fused
    call, so the rows are not timed separately.
    """
    from cortexflow.tools import backend_specs, options_for_precision
    from cortexflow.tools.profile import print_profile, run_profile

    parse_model_option(model, models_for("profile"), command="profile")
    check_common_options(device=device, backend=backend, dtype=dtype)
    name = backend.strip().lower()
    if precision.strip().lower() != "default" and name != "triton":
        raise ConfigError(f"--precision {precision} runs on the triton backend; got --backend {backend}: use --backend triton")
    triton_options = options_for_precision(triton_options, precision, device, dtype)
    report = run_profile(model, backend_specs([name], triton_options, "--triton-options")[name], views=views, size=size, device=device, dtype=dtype, prompt_len=prompt_len,
                         chunk=chunk, steps=steps, top=top, repeats=repeats, seed=seed, peak_tflops=peak_tflops,
                         peak_gbps=peak_gbps, log=progress_line)
    write_report(report, json_path, print_profile)
    _exit_after_cuda_profiling()


def _exit_after_cuda_profiling() -> None:
    """End the process now that the report is written, when the profiler traced CUDA.

    On the H100 machine the process did not exit after a complete report (four runs, each killed by its
    time limit 60-100 s later): the profiler's CUPTI session is torn down at interpreter exit, which is
    known not to go well with CUDA graphs in the same process (pytorch/pytorch#144455). Nothing is left
    to do here, so skip the interpreter's teardown."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
