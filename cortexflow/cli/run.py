"""``cortexflow run``: one observation through a checkpoint; the actions as JSON on stdout, progress and
warnings on stderr (the work is in :mod:`cortexflow.tools.run`)."""

import json
from pathlib import Path
from typing import Annotated, List, Optional

import numpy as np
import typer

from cortexflow.cli.common import (
    BACKENDS_HELP,
    MODELS_HELP,
    cli_errors,
    detect_model,
    load_image,
    load_state,
    parse_model_config,
    parse_prompt_tokens,
    progress_line,
    refuse_demo_name,
    resolve_dtype,
    warning_line,
)
from cortexflow.cli_options import FP8_CACHE_HELP, check_common_options, parse_model_option
from cortexflow.config import (
    IMAGE_PROMPT_MODELS,
    TOKEN_DECODING_MODELS,
    VLAModelType,
    dtype_name,
    is_auto,
)
from cortexflow.errors import InputError


@cli_errors
def run_command(
    checkpoint: Annotated[
        Path,
        typer.Option("--checkpoint", "-c", metavar='PATH', help="Checkpoint: a model.safetensors file, or a folder (openpi PyTorch, LeRobot, an OpenVLA Hugging Face folder, sharded with an index)."),
    ],
    image: Annotated[
        List[Path],
        typer.Option("--image", "-i", metavar='FILE', help="One camera view per --image, in the model's view order: .npy (HWC uint8, or float in [-1,1]) or PNG/JPEG (needs Pillow). Any size; resized-with-pad to 224."),
    ],
    prompt: Annotated[
        Optional[str], typer.Option("--prompt", "-p", metavar='TEXT', help="Task instruction text (needs --tokenizer).")
    ] = None,
    prompt_tokens: Annotated[
        Optional[str],
        typer.Option("--prompt-tokens", metavar='IDS', help="Token ids instead of --prompt, comma-separated ('2,15,7') or a JSON list; no BOS is added."),
    ] = None,
    state: Annotated[
        Optional[str], typer.Option("--state", metavar='NUMBERS', help="Robot state, comma-separated numbers ('0.1,0.2,...') or a JSON list.")
    ] = None,
    state_file: Annotated[
        Optional[Path], typer.Option("--state-file", metavar='FILE', help="Robot state from a .npy array or a .json list (or {\"state\": [...]}).")
    ] = None,
    model: Annotated[
        str, typer.Option("--model", "-m", metavar='NAME', help=f"auto (detect from the checkpoint's tensors), or one of {MODELS_HELP}.")
    ] = "auto",
    views: Annotated[
        Optional[int], typer.Option("--views", metavar='N', help="Number of camera views the engine expects [default: the number of --image].")
    ] = None,
    tokenizer: Annotated[
        Optional[Path], typer.Option("--tokenizer", metavar='PATH', help="PaliGemma tokenizer.model (SentencePiece), tokenizer.json, or a folder holding one.")
    ] = None,
    norm_stats: Annotated[
        Optional[Path],
        typer.Option("--norm-stats", metavar='PATH', help="Normalisation stats: openpi norm_stats.json, LeRobot stats .json/.safetensors, or a folder with assets/*/norm_stats.json. When given, state is normalised and actions un-normalised."),
    ] = None,
    device: Annotated[
        str, typer.Option("--device", metavar='DEVICE', help="auto (GPU if there is one), cpu, cuda or cuda:N.")
    ] = "auto",
    dtype: Annotated[
        str, typer.Option("--dtype", metavar='DTYPE', help="auto (bfloat16 on GPU, float32 on CPU), bfloat16, float16 or float32.")
    ] = "auto",
    backend: Annotated[
        str, typer.Option("--backend", metavar='NAME', help=f"Compute backend: {BACKENDS_HELP}.")
    ] = "pytorch",
    chunk: Annotated[
        Optional[int], typer.Option("--chunk", metavar='N', help="Action chunk length [default: from the checkpoint's config, else 50].")
    ] = None,
    steps: Annotated[
        Optional[int], typer.Option("--steps", metavar='N', help="Flow-matching denoising steps [default: from the checkpoint's config, else 10].")
    ] = None,
    seed: Annotated[
        Optional[int], typer.Option("--seed", metavar='N', help="Seed the starting noise for reproducible actions [default: fresh random noise].")
    ] = None,
    mask_view: Annotated[
        Optional[List[int]], typer.Option("--mask-view", metavar='I', help="Index (0-based) of a view to mark absent; repeat for several.")
    ] = None,
    model_config: Annotated[
        Optional[str],
        typer.Option("--model-config", metavar='JSON|FILE', help="ModelConfig field overrides as a JSON object ('{\"max_token_len\": 64}') or the path of a JSON file."),
    ] = None,
    cuda_graphs: Annotated[
        bool, typer.Option("--cuda-graphs/--no-cuda-graphs", help="Capture a CUDA graph (pays off only over many calls).")
    ] = False,
    unnorm_key: Annotated[
        Optional[str], typer.Option("--unnorm-key", metavar="DATASET", help="openvla only: the dataset whose action statistics un-normalise the actions (needed when the checkpoint has several).")
    ] = None,
    precision: Annotated[
        str, typer.Option("--precision", metavar="NAME", help="default (weights in --dtype) or fp8: with --backend triton on a GPU of compute capability 8.9+, the language model (openvla/rt2) or the action expert (pi0/pi05) hold FP8 weights, quantised at load (fast on the token VLAs; slower than bfloat16 on pi0/pi05 on an H100).")
    ] = "default",
    fp8_cache: Annotated[
        Optional[str], typer.Option("--fp8-cache", metavar="DIR|default", help=FP8_CACHE_HELP)
    ] = None,
) -> None:
    """Run one observation through a checkpoint and print the action chunk as JSON on stdout.

    openvla / rt2 take one --image and a prompt, no state; rt2 is never detected (it reads the PaliGemma
    part of a pi0/pi05 checkpoint): pass --model rt2.

    Output: {"actions": [[...]], "shape": [chunk, action_dim], "model": "pi0", "latency_ms": ...,
    "timings_ms": {...}}. Progress and warnings go to stderr.
    """
    from cortexflow.tools.run import run_flow_policy

    check_common_options(device=device, backend=backend, dtype=dtype)
    refuse_demo_name(checkpoint, "run --checkpoint")
    if not is_auto(model):
        parse_model_option(model, IMAGE_PROMPT_MODELS, command="run")
    if not image:
        raise InputError("pass at least one --image")
    overrides = parse_model_config(model_config)
    tokens = parse_prompt_tokens(prompt_tokens)
    if prompt is not None and tokens is not None:
        raise InputError("pass either --prompt or --prompt-tokens, not both")
    if prompt is None and tokens is None:
        raise InputError("no prompt: pass --prompt TEXT (with --tokenizer) or --prompt-tokens IDS")
    robot_state = load_state(state, state_file)
    images = [load_image(path) for path in image]
    num_views = len(images) if views is None else views
    if num_views < 1:
        raise InputError(f"--views must be at least 1, got {num_views}")
    masks = None
    if mask_view:
        bad = [i for i in mask_view if not 0 <= i < num_views]
        if bad:
            raise InputError(f"--mask-view {bad} out of range: there are {num_views} views (indices 0..{num_views - 1})")
        masks = [i not in set(mask_view) for i in range(num_views)]

    check_precision(precision, backend, device, dtype)
    from cortexflow.quantization.precision import fp8_cache_setting

    cache = fp8_cache_setting(fp8_cache, precision)
    model_type = detect_model(checkpoint, model, overrides)
    if cache is not False and model_type not in TOKEN_DECODING_MODELS:
        raise InputError(f"--fp8-cache keeps the FP8 language-model layers of openvla/rt2; {model_type.value} "
                         "quantises only its action expert at load: drop --fp8-cache")
    if model_type in TOKEN_DECODING_MODELS:
        _run_token_model(model_type, checkpoint, images, prompt, tokens, robot_state is not None, backend, device,
                         dtype, tokenizer, norm_stats, unnorm_key, overrides, cuda_graphs,
                         {"--views": views, "--mask-view": mask_view, "--chunk": chunk, "--steps": steps,
                          "--seed": seed is not None}, precision, cache)
        return
    result = run_flow_policy(
        model_type, checkpoint, images, prompt=prompt, prompt_tokens=tokens, state=robot_state, image_masks=masks,
        num_views=num_views, backend=backend, device=device, dtype=resolve_dtype(dtype, device),
        tokenizer=None if tokenizer is None else str(tokenizer),
        norm_stats=None if norm_stats is None else str(norm_stats), unnorm_key=unnorm_key, model_config=overrides,
        use_cuda_graphs=cuda_graphs, chunk=chunk, steps=steps, seed=seed, log=progress_line, warn=warning_line,
        precision=precision)
    engine, actions, report = result.engine, result.actions, result.engine.checkpoint_report
    progress_line(f"{model_type.value} ({report.layout if report else 'custom'} layout, "
              f"{engine.config.num_diffusion_steps} steps) on {engine.device} {dtype_name(engine.dtype)}: "
              f"{result.latency_ms:.1f} ms")
    typer.echo(json.dumps({
        "actions": actions.tolist(),
        "shape": list(actions.shape),
        "model": model_type.value,
        "latency_ms": result.latency_ms,
        "timings_ms": {k: round(v, 4) for k, v in engine.last_timings.items()},
    }))


def check_precision(precision: str, backend: str, device: str, dtype: str) -> None:
    """Refuse ``--precision fp8`` where it cannot run, in the CLI's words, before the checkpoint loads."""
    from cortexflow.config import resolve_dtype as compute_dtype
    from cortexflow.engine import resolve_device
    from cortexflow.quantization.precision import backend_for_precision

    resolved = resolve_device(device)
    backend_for_precision(backend, precision, resolved, compute_dtype(dtype, resolved), "--precision")


def _run_token_model(model_type: VLAModelType, checkpoint: Path, images: list, prompt: Optional[str],
                     tokens: Optional[np.ndarray], has_state: bool, backend: str, device: str, dtype: str,
                     tokenizer: Optional[Path], norm_stats: Optional[Path], unnorm_key: Optional[str],
                     overrides: Optional[dict], cuda_graphs: bool, flow_options: dict, precision: str,
                     fp8_cache) -> None:
    """``run`` for openvla / rt2: print the actions and generated token ids as JSON."""
    from cortexflow.tools.run import run_token_policy

    compute_dtype = resolve_dtype(dtype, device)
    progress_line(f"loading {model_type.value} checkpoint {checkpoint} ({device}, {compute_dtype}) ...")
    result = run_token_policy(
        model_type, checkpoint, images, prompt=prompt, prompt_tokens=tokens, has_state=has_state, backend=backend,
        device=device, dtype=compute_dtype, tokenizer=None if tokenizer is None else str(tokenizer),
        norm_stats=None if norm_stats is None else str(norm_stats), unnorm_key=unnorm_key, model_config=overrides,
        use_cuda_graphs=cuda_graphs, flow_options=flow_options, precision=precision, fp8_cache=fp8_cache)
    engine = result.engine
    progress_line(f"{model_type.value} on {engine.device} {dtype_name(engine.dtype)}: {result.latency_ms:.1f} ms")
    typer.echo(json.dumps({
        "actions": result.actions.tolist(),
        "shape": list(result.actions.shape),
        "model": model_type.value,
        "tokens": result.tokens,
        "latency_ms": result.latency_ms,
        "timings_ms": {k: round(v, 4) for k, v in engine.last_timings.items()},
    }))
