"""``cortexflow demo``: the tiny random policy of any image + prompt family on a synthetic observation,
printed as tables or JSON (the work is in :mod:`cortexflow.demo`)."""

import json
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer
from rich import box
from rich.table import Table
from rich.text import Text

from cortexflow.cli.common import (
    FLOW_HELP,
    MODELS_HELP,
    TOKEN_HELP,
    cli_errors,
    human_bytes,
    human_count,
    progress_line,
    stdout_console,
)
from cortexflow.cli_options import parse_model_option
from cortexflow.config import (
    FLOW_MATCHING_MODELS,
    IMAGE_PROMPT_MODELS,
    TOKEN_DECODING_MODELS,
    VLAModelType,
    dtype_name,
)
from cortexflow.errors import ConfigError

STAGE_ROWS = (
    ("preprocess", "preprocess (validate, resize, tokenise)"),
    ("vision_encoder", "vision_encoder (SigLIP)"),
    ("transformer_encoder", "transformer_encoder (prefix LLM)"),
    ("transformer_decoder", "transformer_decoder (action expert, all steps)"),
)


@cli_errors
def demo_command(
    model: Annotated[
        str, typer.Option("--model", "-m", metavar='NAME', help=f"Which policy to build: {MODELS_HELP} (pi0: continuous state token, pi05: state in the prompt, {TOKEN_HELP}: action tokens).")
    ] = "pi0",
    views: Annotated[int, typer.Option("--views", metavar='N', help="Number of camera views (synthetic 480x640 images).")] = 2,
    steps: Annotated[
        Optional[int], typer.Option("--steps", metavar='N', help="Flow-matching denoising steps [default: 3, the demo model's].")
    ] = None,
    chunk: Annotated[
        Optional[int], typer.Option("--chunk", metavar='N', help="Action chunk length (rows of the output) [default: 5].")
    ] = None,
    seed: Annotated[
        int, typer.Option("--seed", metavar='N', help="Seed of the random weights, the synthetic observation and the noise.")
    ] = 0,
    repeat: Annotated[
        int, typer.Option("--repeat", metavar='N', help="How many times to call predict (first call + median of the rest).")
    ] = 3,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON object (config, actions, latencies, stage timings) instead of tables.")
    ] = False,
    save: Annotated[
        Optional[Path], typer.Option("--save", metavar="DIR", help=f"Keep the model as a checkpoint folder DIR ({FLOW_HELP}): model.safetensors, config.json, tokenizer.model, assets/demo/norm_stats.json; then try info, run and the Python API on it.")
    ] = None,
) -> None:
    """Build a small deterministic random Pi0/Pi0.5, run it on a synthetic observation, print actions and timings.

    The model is written as a real openpi-layout model.safetensors into a temporary folder (--save: a
    folder that is kept, with its config, a tiny tokenizer and norm stats) and loaded
    through create_pi0_inference / create_pi05_inference on CPU in float32, so this exercises the same
    path as a real checkpoint. The demo model has no tokenizer: the prompt "pick up the red cube" is fed
    as byte ids ([BOS=2] + its UTF-8 bytes mod the vocabulary size). Same seed -> identical actions.
    """
    from cortexflow.demo import build_demo_engine, demo_observation, run_demo

    model_type = parse_model_option(model, IMAGE_PROMPT_MODELS, command="demo")
    if repeat < 1:
        raise ConfigError(f"--repeat must be at least 1, got {repeat}")
    if save is not None:
        _check_save_folder(save, model_type)
    if model_type in TOKEN_DECODING_MODELS:
        _token_demo(model, seed, repeat, json_output)
        return
    with build_demo_engine(model, num_views=views, chunk_size=chunk, num_steps=steps, seed=seed,
                           directory=save) as demo:
        observation = demo_observation(demo.engine, seed=seed)
        result = run_demo(demo, observation, seed=seed, repeat=repeat)
        if json_output:
            typer.echo(json.dumps(_demo_json(demo, observation, result), indent=2))
        else:
            _print_demo(demo, observation, result)
    if save is not None:
        progress_line(f"saved the demo checkpoint in {save}: cortexflow info {save}; cortexflow run --checkpoint {save} "
                  f"--tokenizer {save / 'tokenizer.model'} --prompt \"pick up the red cube\" --image IMAGE.npy ...")


def _check_save_folder(save: Path, model_type: VLAModelType) -> None:
    """``demo --save DIR``: a pi0/pi05 model and a new or empty folder."""
    if model_type not in FLOW_MATCHING_MODELS:
        raise ConfigError(f"--save keeps {FLOW_HELP} demo models; --model {model_type.value} runs without it")
    if save.exists() and (not save.is_dir() or any(save.iterdir())):
        raise ConfigError(f"--save {save}: the path exists and is not an empty folder; pass a new folder")


def _token_demo(model: str, seed: int, repeat: int, json_output: bool) -> None:
    """``demo --model openvla|rt2``: the tiny random token-decoding policy (no tokenizer, CPU, fp32)."""
    from cortexflow.demo import run_token_demo

    result = run_token_demo(model, seed=seed, repeat=repeat)
    data = result.to_dict()
    if json_output:
        typer.echo(json.dumps(data, indent=2))
        return
    out = stdout_console()
    out.print(Text(f"CortexFlow demo: a tiny random {result.model} policy on CPU (float32)", style="bold"))
    out.print(f"prompt {data['prompt']!r} as {len(result.prompt_token_ids)} ids ([BOS] + UTF-8 bytes; no tokenizer)")
    out.print(f"generated token ids: {result.tokens}")
    out.print(f"actions {list(result.actions.shape)}: {np.array2string(result.actions, precision=4)}")
    rest = data["latency_ms"]["median_rest"]
    out.print(f"latency: first {data['latency_ms']['first']:.1f} ms" + (f", median of the rest {rest:.1f} ms" if rest else ""))
    out.print(f"deterministic: {result.deterministic}")


def _stage_rows(timings: dict) -> list[tuple[str, float, float]]:
    total = timings.get("total", 0.0)
    rows = []
    for key, _label in STAGE_ROWS:
        value = timings.get(key, 0.0)
        rows.append((key, value, 100.0 * value / total if total else 0.0))
    other = max(0.0, total - sum(v for _, v, _ in rows))
    rows.append(("other", other, 100.0 * other / total if total else 0.0))
    rows.append(("total", total, 100.0 if total else 0.0))
    return rows


def _demo_json(demo, observation, result) -> dict:
    return {
        "model": demo.model_type.value,
        "config": demo.config.to_dict(),
        "num_parameters": demo.num_parameters,
        "checkpoint": {"path": str(demo.checkpoint_dir / "model.safetensors"), "layout": demo.layout,
                       "bytes": demo.checkpoint_bytes, "temporary": demo.temporary},
        "device": str(demo.engine.device),
        "dtype": dtype_name(demo.engine.dtype),
        "seed": demo.seed,
        "tokenizer": None,
        "prompt": observation.prompt,
        "prompt_token_ids": observation.prompt_tokens.tolist(),
        "prompt_encoding": "no tokenizer: [BOS=2] + UTF-8 bytes mod vocab_size",
        "image_shape": list(observation.images.shape),
        "state": observation.state.tolist(),
        "actions": result.actions.tolist(),
        "shape": list(result.actions.shape),
        "deterministic": result.deterministic,
        "latency_ms": {"first": result.first_ms, "median_rest": result.median_rest_ms, "all": result.latencies_ms},
        "timings_ms": {name: value for name, value, _ in _stage_rows(result.timings_ms)},
    }


def _print_demo(demo, observation, result) -> None:
    out = stdout_console()
    cfg = demo.config
    out.print(Text(f"CortexFlow demo: a tiny random {cfg.model_type.value} policy on CPU (float32)", style="bold"))
    built = Table(show_header=False, box=None, pad_edge=False, padding=(0, 2, 0, 0))
    built.add_column(style="cyan", no_wrap=True)
    built.add_column()
    built.add_row("model", f"{cfg.model_type.value}, deterministic random weights (seed {demo.seed})")
    built.add_row(
        "vision", f"SigLIP-style, {cfg.image_size}px / {cfg.patch_size}px patches ({cfg.num_patches} tokens per view), "
        f"width {cfg.vision_encoder_dim}, {cfg.num_vision_layers} layers, {cfg.num_vision_heads} heads, mlp {cfg.vision_mlp_dim}"
    )
    built.add_row(
        "prefix LLM", f"Gemma-style, width {cfg.encoder_dim}, {cfg.num_encoder_layers} layers, mlp {cfg.encoder_mlp_dim}, "
        f"vocab {cfg.vocab_size}, prompt <= {cfg.max_token_len} tokens"
    )
    built.add_row(
        "action expert", f"width {cfg.decoder_dim}, {cfg.num_decoder_layers} layers, mlp {cfg.decoder_mlp_dim}, "
        f"{cfg.num_heads} heads / {cfg.num_kv_heads} kv head(s) x {cfg.head_dim}"
    )
    built.add_row(
        "actions", f"chunk {cfg.chunk_size} x action_dim {cfg.action_dim}, {cfg.num_diffusion_steps} flow-matching steps"
    )
    built.add_row("parameters", human_count(demo.num_parameters))
    built.add_row(
        "checkpoint", f"{demo.checkpoint_dir / 'model.safetensors'} ({demo.layout} layout, "
        f"{human_bytes(demo.checkpoint_bytes)}, {'temporary: removed on exit' if demo.temporary else 'kept, with config.json, tokenizer.model and norm stats'})"
    )
    v, h, w, c = observation.images.shape
    built.add_row("observation", f"{v} synthetic camera view{'s' if v != 1 else ''} {h}x{w}x{c} uint8 (gradients + a red square)")
    built.add_row("state", "[" + ", ".join(f"{s:.3f}" for s in observation.state) + "]")
    built.add_row(
        "prompt", f"{observation.prompt!r} -> {len(observation.prompt_tokens)} token ids. The demo model has no "
        f"tokenizer: ids are [BOS=2] + the UTF-8 bytes mod {cfg.vocab_size}"
        + (" of openpi's Pi0.5 text 'Task: ..., State: <bins>;\\nAction: '" if cfg.discrete_state_input else "")
    )
    out.print(built)
    out.print()

    actions = result.actions
    max_rows = 10
    table = Table(title=f"Action chunk {tuple(actions.shape)}", box=box.SIMPLE_HEAD, title_justify="left")
    table.add_column("step", justify="right", style="cyan")
    for j in range(actions.shape[1]):
        table.add_column(f"a{j}", justify="right")
    for i, row in enumerate(actions[:max_rows]):
        table.add_row(str(i), *(f"{x:+.4f}" for x in row))
    out.print(table)
    if actions.shape[0] > max_rows:
        out.print(f"  ... {actions.shape[0] - max_rows} more rows (use --json for all)")

    median = result.median_rest_ms
    latency = f"first call {result.first_ms:.1f} ms"
    if median is not None:
        latency += f", median of the other {len(result.latencies_ms) - 1}: {median:.1f} ms"
    out.print(Text("latency: ", style="bold") + Text(latency))
    same = "yes" if result.deterministic else "NO"
    out.print(Text("deterministic: ", style="bold") + Text(
        f"{same} (all {len(result.latencies_ms)} calls with seed {demo.seed} gave identical actions)"
        if result.deterministic else f"{same}: calls with the same noise differed"
    ))
    out.print()

    stages = Table(title="Stage timings of the last call", box=box.SIMPLE_HEAD, title_justify="left")
    stages.add_column("stage")
    stages.add_column("ms", justify="right")
    stages.add_column("%", justify="right")
    labels = dict(STAGE_ROWS)
    labels["other"] = "other (buffer copies, post-processing)"
    for name, value, percent in _stage_rows(result.timings_ms):
        style = "bold" if name == "total" else None
        stages.add_row(labels.get(name, name), f"{value:.2f}", f"{percent:.1f}", style=style)
    out.print(stages)
