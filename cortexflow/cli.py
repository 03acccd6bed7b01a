"""The ``cortexflow`` command line: ``demo``, ``run`` and ``info``.

Every :class:`~cortexflow.errors.CortexFlowError` becomes one red ``error: ...`` line on stderr and exit
code 2; ``info`` exits 1 when the checkpoint has key problems. ``run`` prints its result as JSON on
stdout and everything else (progress, warnings) on stderr, so its output can be piped.
"""

import functools
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any, Callable, List, Optional

import numpy as np
import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cortexflow.cli_options import backend_names, check_common_options, parse_model_option
from cortexflow.config import (FLOW_MATCHING_MODELS, IMAGE_PROMPT_MODELS, TOKEN_DECODING_MODELS, VLAModelType, dtype_name, model_names,
                               parse_dtype)
from cortexflow.errors import ConfigError, CortexFlowError, CortexFlowWarning, InputError

app = typer.Typer(
    name="cortexflow",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

MODELS_HELP = model_names(IMAGE_PROMPT_MODELS)
ALL_MODELS_HELP = model_names()
FLOW_HELP = model_names(FLOW_MATCHING_MODELS)
TOKEN_HELP = model_names(TOKEN_DECODING_MODELS)
BACKENDS_HELP = backend_names()
EXIT_PROBLEMS = 1
EXIT_ERROR = 2
IMAGE_SUFFIXES_PIL = (".png", ".jpg", ".jpeg")
STAGE_ROWS = (
    ("preprocess", "preprocess (validate, resize, tokenise)"),
    ("vision_encoder", "vision_encoder (SigLIP)"),
    ("transformer_encoder", "transformer_encoder (prefix LLM)"),
    ("transformer_decoder", "transformer_decoder (action expert, all steps)"),
)


# ---- output helpers -----------------------------------------------------------------------------
def _stdout() -> Console:
    console = Console(highlight=False, soft_wrap=False)
    if not console.is_terminal:  # pipes and test runners: do not squeeze tables into 80 columns
        console = Console(highlight=False, width=max(console.width, 120))
    return console


def _stderr() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def _error_line(message: str) -> None:
    """One red line on stderr (rich markup in the message is not interpreted)."""
    _stderr().print(Text("error: " + " ".join(message.split()), style="bold red"))


def _warning_line(message: str) -> None:
    _stderr().print(Text("warning: " + " ".join(message.split()), style="yellow"))


def _cli_errors(func: Callable) -> Callable:
    """Turn CortexFlowError into ``error: ...`` + exit 2, and CortexFlowWarning into ``warning: ...`` lines."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        caught: list = []
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", CortexFlowWarning)
                try:
                    return func(*args, **kwargs)
                except CortexFlowError as err:
                    _error_line(str(err) or type(err).__name__)
                    raise typer.Exit(EXIT_ERROR) from None
        finally:
            _replay_warnings(caught)

    return wrapper


def _replay_warnings(caught: list) -> None:
    """Show the warnings a command recorded, once each, after recording has stopped.

    Replaying inside ``catch_warnings(record=True)`` would append every replayed warning to the list
    being iterated, so the loop would never end."""
    for item in caught:
        if issubclass(item.category, CortexFlowWarning):
            _warning_line(str(item.message))
        else:
            warnings.showwarning(item.message, item.category, item.filename, item.lineno)


def _human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _human_count(n: int) -> str:
    for limit, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= limit:
            return f"{n:,} ({n / limit:.2f}{suffix})"
    return f"{n:,}"


# ---- argument parsing ---------------------------------------------------------------------------
def parse_model_config(value: Optional[str]) -> Optional[dict]:
    """``--model-config``: a JSON object, or the path of a JSON file holding one (ModelConfig field overrides)."""
    if value is None:
        return None
    text = value.strip()
    source = "--model-config"
    if not text.startswith("{"):
        path = Path(text).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"--model-config {value!r} is neither a JSON object nor an existing JSON file"
            )
        try:
            text = path.read_text()
        except OSError as err:
            raise ConfigError(f"cannot read --model-config file {path}: {err}") from err
        source = str(path)
    try:
        data = json.loads(text)
    except ValueError as err:
        raise ConfigError(f"{source} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a JSON object of ModelConfig fields, got {type(data).__name__}")
    return data


def _parse_number_list(value: str, option: str, kind: type) -> list:
    items = [item.strip() for item in value.replace(";", ",").split(",")]
    if value.strip().startswith("["):
        try:
            parsed = json.loads(value)
        except ValueError as err:
            raise InputError(f"{option} {value!r} is not a valid JSON list: {err}") from err
        if not isinstance(parsed, list):
            raise InputError(f"{option} must be a list of numbers, got {value!r}")
        items = [str(v) for v in parsed]
    if not items or any(item == "" for item in items):
        raise InputError(f"{option} {value!r} has an empty entry; expected comma-separated numbers like '1,2,3'")
    out = []
    for item in items:
        try:
            out.append(kind(item))
        except ValueError:
            what = "an integer token id" if kind is int else "a number"
            raise InputError(f"{option}: {item!r} is not {what}") from None
    return out


def parse_prompt_tokens(value: Optional[str]) -> Optional[np.ndarray]:
    """``--prompt-tokens "2,15,7"`` -> int64 ids."""
    if value is None:
        return None
    return np.asarray(_parse_number_list(value, "--prompt-tokens", int), dtype=np.int64)


def load_state(state: Optional[str], state_file: Optional[Path]) -> Optional[np.ndarray]:
    """``--state "0.1,0.2"`` or ``--state-file`` (.npy array, or .json list / {"state": [...]})."""
    if state is not None and state_file is not None:
        raise InputError("pass either --state or --state-file, not both")
    if state is not None:
        return np.asarray(_parse_number_list(state, "--state", float), dtype=np.float32)
    if state_file is None:
        return None
    path = Path(state_file).expanduser()
    if not path.is_file():
        raise InputError(f"state file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            data = np.load(path, allow_pickle=False)
        elif suffix == ".json":
            data = json.loads(path.read_text())
            if isinstance(data, dict):
                if "state" not in data:
                    raise InputError(f"state file {path} holds a JSON object without a 'state' entry")
                data = data["state"]
        else:
            raise InputError(f"state file {path} has suffix {suffix!r}; expected .npy or .json")
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read state file {path}: {err}") from err
    try:
        return np.asarray(data, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise InputError(f"state file {path} does not hold a list of numbers: {err}") from err


def load_image(path: Path) -> np.ndarray:
    """One HWC image from ``.npy`` (uint8 or float in [-1, 1]) or, with Pillow installed, PNG/JPEG (RGB uint8)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"image file {str(path)!r} does not exist")
    if not path.is_file():
        raise InputError(f"image path {str(path)!r} is not a file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise InputError(f"cannot read image {path} as a .npy array: {err}") from err
    if suffix in IMAGE_SUFFIXES_PIL:
        try:
            from PIL import Image
        except ImportError:
            raise InputError(
                f"reading {suffix} image {path} needs Pillow, which is not installed: pip install pillow, "
                "or save the image as an HWC uint8 .npy file (numpy.save)"
            ) from None
        try:
            with Image.open(path) as img:
                return np.asarray(img.convert("RGB"), dtype=np.uint8)
        except Exception as err:  # Pillow raises several types for unreadable files
            raise InputError(f"cannot read image {path}: {err}") from err
    raise InputError(f"image {path} has suffix {suffix!r}; expected .npy (HWC uint8 or float) or .png/.jpg/.jpeg")


def resolve_dtype(dtype: str, device: str) -> str:
    """``auto`` -> bfloat16 on a GPU, float32 on the CPU; else the name, validated."""
    from cortexflow.config import resolve_dtype as compute_dtype
    from cortexflow.engine import resolve_device

    return dtype_name(compute_dtype(dtype, resolve_device(device)))


def detect_model(checkpoint: Path, model: str, model_config: Optional[dict]) -> VLAModelType:
    """``--model auto`` -> the type found in the checkpoint's tensors; else the parsed name, which must
    agree with the tensors (rt2 reads the PaliGemma part of a pi0/pi05 checkpoint)."""
    from cortexflow.checkpoints.openvla_layout import inspect_any_checkpoint

    auto = model.strip().lower() == "auto"
    model_type = None if auto else parse_model_option(model, IMAGE_PROMPT_MODELS, command="run")
    if model_type == VLAModelType.RT2:
        return model_type
    found = inspect_any_checkpoint(checkpoint, None if model_type == VLAModelType.OPENVLA else model_config).model_type
    if model_type is not None and found != model_type:
        raise ConfigError(f"--model {model}: {checkpoint} holds a {found.value} model (detected from its tensors); "
                          f"pass --model {found.value} or --model auto")
    return found


# ---- commands -----------------------------------------------------------------------------------
def _version_callback(value: bool) -> None:
    if value:
        from cortexflow import __version__

        typer.echo(f"cortexflow {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """CortexFlow: fast, verifiable inference for robot vision-language-action policies (Pi0, Pi0.5).

    Start with `cortexflow demo` (no checkpoint needed), inspect a checkpoint with `cortexflow info`,
    and run one observation through a checkpoint with `cortexflow run`."""


@app.command("demo", short_help="Build and run a tiny random Pi0/Pi0.5 on a synthetic observation (no checkpoint needed).")
@_cli_errors
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
        _progress(f"saved the demo checkpoint in {save}: cortexflow info {save}; cortexflow run --checkpoint {save} "
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
    out = _stdout()
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
    out = _stdout()
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
    built.add_row("parameters", _human_count(demo.num_parameters))
    built.add_row(
        "checkpoint", f"{demo.checkpoint_dir / 'model.safetensors'} ({demo.layout} layout, "
        f"{_human_bytes(demo.checkpoint_bytes)}, {'temporary: removed on exit' if demo.temporary else 'kept, with config.json, tokenizer.model and norm stats'})"
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


@app.command("run", short_help="Run one observation through a checkpoint; print the actions as JSON.")
@_cli_errors
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
) -> None:
    """Run one observation through a checkpoint and print the action chunk as JSON on stdout.

    openvla / rt2 take one --image and a prompt, no state; rt2 is never detected (it reads the PaliGemma
    part of a pi0/pi05 checkpoint): pass --model rt2.

    Output: {"actions": [[...]], "shape": [chunk, action_dim], "model": "pi0", "latency_ms": ...,
    "timings_ms": {...}}. Progress and warnings go to stderr.
    """
    from cortexflow.tools.run import run_flow_policy

    check_common_options(device=device, backend=backend, dtype=dtype)
    _refuse_demo_name(checkpoint, "run --checkpoint")
    if model.strip().lower() != "auto":
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

    model_type = detect_model(checkpoint, model, overrides)
    if model_type in TOKEN_DECODING_MODELS:
        _run_token_model(model_type, checkpoint, images, prompt, tokens, robot_state is not None, backend, device,
                         dtype, tokenizer, norm_stats, unnorm_key, overrides, cuda_graphs,
                         {"--views": views, "--mask-view": mask_view, "--chunk": chunk, "--steps": steps,
                          "--seed": seed is not None})
        return
    result = run_flow_policy(
        model_type, checkpoint, images, prompt=prompt, prompt_tokens=tokens, state=robot_state, image_masks=masks,
        num_views=num_views, backend=backend, device=device, dtype=resolve_dtype(dtype, device),
        tokenizer=None if tokenizer is None else str(tokenizer),
        norm_stats=None if norm_stats is None else str(norm_stats), unnorm_key=unnorm_key, model_config=overrides,
        use_cuda_graphs=cuda_graphs, chunk=chunk, steps=steps, seed=seed, log=_progress, warn=_warning_line)
    engine, actions, report = result.engine, result.actions, result.engine.checkpoint_report
    _progress(f"{model_type.value} ({report.layout if report else 'custom'} layout, "
              f"{engine.config.num_diffusion_steps} steps) on {engine.device} {dtype_name(engine.dtype)}: "
              f"{result.latency_ms:.1f} ms")
    typer.echo(json.dumps({
        "actions": actions.tolist(),
        "shape": list(actions.shape),
        "model": model_type.value,
        "latency_ms": result.latency_ms,
        "timings_ms": {k: round(v, 4) for k, v in engine.last_timings.items()},
    }))


def _refuse_demo_name(checkpoint: Path, where: str) -> None:
    """``demo`` names no folder here (serve and export build it on the fly): say how to get one."""
    if str(checkpoint) == "demo" and not checkpoint.exists():
        raise ConfigError(f"{where} needs a checkpoint folder; 'demo' is not one here: `cortexflow demo --save DIR` "
                          "writes the demo model as a folder (weights, config, tokenizer, norm stats) to pass instead")


def _run_token_model(model_type: VLAModelType, checkpoint: Path, images: list, prompt: Optional[str],
                     tokens: Optional[np.ndarray], has_state: bool, backend: str, device: str, dtype: str,
                     tokenizer: Optional[Path], norm_stats: Optional[Path], unnorm_key: Optional[str],
                     overrides: Optional[dict], cuda_graphs: bool, flow_options: dict) -> None:
    """``run`` for openvla / rt2: print the actions and generated token ids as JSON."""
    from cortexflow.tools.run import run_token_policy

    compute_dtype = resolve_dtype(dtype, device)
    _progress(f"loading {model_type.value} checkpoint {checkpoint} ({device}, {compute_dtype}) ...")
    result = run_token_policy(
        model_type, checkpoint, images, prompt=prompt, prompt_tokens=tokens, has_state=has_state, backend=backend,
        device=device, dtype=compute_dtype, tokenizer=None if tokenizer is None else str(tokenizer),
        norm_stats=None if norm_stats is None else str(norm_stats), unnorm_key=unnorm_key, model_config=overrides,
        use_cuda_graphs=cuda_graphs, flow_options=flow_options)
    engine = result.engine
    _progress(f"{model_type.value} on {engine.device} {dtype_name(engine.dtype)}: {result.latency_ms:.1f} ms")
    typer.echo(json.dumps({
        "actions": result.actions.tolist(),
        "shape": list(result.actions.shape),
        "model": model_type.value,
        "tokens": result.tokens,
        "latency_ms": result.latency_ms,
        "timings_ms": {k: round(v, 4) for k, v in engine.last_timings.items()},
    }))


@app.command("info", short_help="Describe a checkpoint (type, dims, parameters, key problems) without loading it.")
@_cli_errors
def info_command(
    checkpoint: Annotated[
        Path, typer.Argument(metavar="CHECKPOINT", help="Checkpoint: a model.safetensors file or a folder (openpi PyTorch, LeRobot, sharded, openpi JAX params/, LoRA adapter).")
    ],
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
    model_config: Annotated[
        Optional[str],
        typer.Option("--model-config", metavar='JSON|FILE', help="ModelConfig field overrides (JSON object or path of a JSON file) to check the checkpoint against."),
    ] = None,
    config: Annotated[Optional[str], typer.Option("--config", metavar="NAME", help="openpi policy config whose transforms to list (cortexflow configs).")] = None,
) -> None:
    """Describe a checkpoint from its safetensors headers only (no tensor is loaded).

    With --config NAME, or for a LeRobot folder with processor files, also prints the transforms that will
    apply around the model, in order.

    Prints the model type (detected from the tensors), the key layout (openpi, lerobot, lerobot-legacy),
    every ModelConfig dimension, the parameter count, the dtypes, the total size, and every key problem:
    missing, unexpected, mis-shaped or wrongly typed tensors, and those skipped as unused.

    Exit code 0: the checkpoint matches its architecture; 1: it has missing, unexpected, mis-shaped or
    wrongly typed tensors (listed); 2: it cannot be read at all.
    """
    from cortexflow.checkpoints.openvla_layout import inspect_any_checkpoint

    _refuse_demo_name(checkpoint, "info CHECKPOINT")
    report = inspect_any_checkpoint(checkpoint, parse_model_config(model_config))
    from cortexflow.policies.describe import policy_transforms

    transforms = policy_transforms(checkpoint, config, report.model_type)
    if json_output:
        typer.echo(json.dumps({
            "path": report.path,
            "model_type": report.model_type.value,
            "layout": report.layout,
            "config": report.config.to_dict(),
            "num_parameters": report.num_parameters,
            "dtypes": report.dtypes,
            "total_bytes": report.total_bytes,
            "ok": report.ok,
            "missing": report.missing,
            "unexpected": report.unexpected,
            "mis_shaped": report.mis_shaped,
            "wrong_dtype": report.wrong_dtype,
            "skipped": report.skipped,
            **({"datasets": report.datasets} if hasattr(report, "datasets") else {}),
            **({"transforms": transforms} if transforms is not None else {}),
        }, indent=2))
    else:
        _print_info(report)
        if transforms is not None:
            _stdout().print(f"\n[bold]{transforms['source']}[/bold]: transforms in order")
            for index, line in enumerate(transforms["steps"], 1):
                _stdout().print(f"  {index:2d}. {line}", markup=False, highlight=False)
            for note in transforms["notes"]:
                _stdout().print(f"  note: {note}", markup=False, highlight=False)
    if not report.ok:
        raise typer.Exit(EXIT_PROBLEMS)


def _print_info(report) -> None:
    out = _stdout()
    summary = Table(show_header=False, box=None, pad_edge=False, padding=(0, 2, 0, 0))
    summary.add_column(style="cyan", no_wrap=True)
    summary.add_column()
    summary.add_row("checkpoint", report.path)
    summary.add_row("model type", report.model_type.value)
    summary.add_row("layout", report.layout)
    summary.add_row("parameters", _human_count(report.num_parameters) + " (in tensors the model uses)")
    summary.add_row("dtypes", ", ".join(f"{name}: {count} tensors" for name, count in sorted(report.dtypes.items())))
    summary.add_row("total size", f"{_human_bytes(report.total_bytes)} ({report.total_bytes:,} bytes)")
    if hasattr(report, "datasets"):
        summary.add_row("datasets (unnorm_key)", ", ".join(report.datasets) or "none")
    status = Text("ok", style="green") if report.ok else Text("PROBLEMS (see below)", style="bold red")
    summary.add_row("status", status)
    out.print(summary)
    out.print()

    dims = Table(title="Model configuration", box=box.SIMPLE_HEAD, title_justify="left")
    dims.add_column("field", style="cyan")
    dims.add_column("value", justify="right")
    for name, value in report.config.to_dict().items():
        dims.add_row(name, str(value))
    dims.add_row("num_patches (derived)", str(report.config.num_patches))
    out.print(dims)

    for label, items, style in (
        ("missing tensors", report.missing, "red"),
        ("unexpected tensors", report.unexpected, "red"),
        ("mis-shaped tensors", report.mis_shaped, "red"),
        ("wrongly typed tensors", report.wrong_dtype, "red"),
        ("skipped as unused", report.skipped, "dim"),
    ):
        if not items:
            continue
        out.print(Text(f"{label} ({len(items)}):", style=f"bold {style}"))
        for item in items:
            out.print(Text(f"  {item}", style=style if style != "red" else None))
    if not report.ok:
        out.print(Text(f"checkpoint does not match the {report.model_type.value} architecture", style="bold red"))


@app.command("convert", short_help="Write an openpi JAX (Orbax), LoRA-adapter or RT-1 TF2 checkpoint as a safetensors folder.")
@_cli_errors
def convert_command(
    source: Annotated[Path, typer.Argument(metavar="SRC", help="openpi JAX checkpoint (folder with params/ and assets/), a LoRA adapter folder, any safetensors checkpoint, or an RT-1 TF2 checkpoint (the ckpt-N prefix, its .index file or its folder).")],
    destination: Annotated[Path, typer.Argument(metavar="DST", help="Output folder (created; must not hold a model.safetensors yet).")],
    model: Annotated[str, typer.Option("--model", "-m", metavar="NAME", help="auto (RT-1 for a TF2 checkpoint, else the Pi0 family, detected from the tensors), pi0, pi05 or rt1.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", metavar="DTYPE", help="stored (keep each tensor's dtype), float32, or bfloat16 (patch/position embedding and norms stay float32, as in openpi). RT-1 is always written in float32.")] = "stored",
    base_checkpoint: Annotated[Optional[Path], typer.Option("--base-checkpoint", metavar="PATH", help="Base checkpoint of a LoRA adapter folder (default: its base_model_name_or_path).")] = None,
    model_config: Annotated[Optional[str], typer.Option("--model-config", metavar="JSON|FILE", help="RT-1 only: config fields the checkpoint cannot tell ('{\"input_size\": [256, 320]}').")] = None,
) -> None:
    """Write SRC as DST/model.safetensors + config.json (+ assets/), loadable without JAX or TensorFlow.

    An Orbax params/ tree is read with orbax-checkpoint (pip install 'cortexflow[jax]'), checked leaf by
    leaf, openpi's LoRA leaves are merged, and the tensors are written under openpi PyTorch names. A PEFT
    LoRA adapter is written merged into its base. SRC/assets (openpi norm stats) is copied to DST/assets.
    An RT-1 TF2 object checkpoint (tensor bundle) is read without TensorFlow, its variables mapped to
    CortexFlow's names and torch layouts; create_rt1_inference loads the folder.
    """
    from cortexflow.checkpoints.convert import DTYPES, convert_checkpoint
    from cortexflow.checkpoints.tf_bundle import is_tf_checkpoint

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    model_type = None if model.strip().lower() == "auto" else VLAModelType.parse(model)
    tf_source = is_tf_checkpoint(source)
    if model_type == VLAModelType.RT1 or (model_type is None and tf_source):
        _convert_rt1(source, destination, dtype, base_checkpoint, model_config)
        return
    if tf_source:
        raise ConfigError(f"{source} is a TensorFlow checkpoint (RT-1); --model {model} converts Pi0-family checkpoints: "
                          "use --model rt1 or --model auto")
    if model_config is not None:
        raise ConfigError("--model-config applies to RT-1 checkpoints only; Pi0-family sizes come from the tensors")
    _progress(f"converting {source} ...")
    result = convert_checkpoint(source, destination, dtype=dtype, base_checkpoint=base_checkpoint)
    out = _stdout()
    if model_type is not None and result.model_type != model_type.value:
        raise ConfigError(f"--model {model}: {source} holds a {result.model_type} checkpoint (written to {destination} anyway)")
    out.print(f"{result.model_type} ({result.layout} keys): {result.num_tensors} tensors, "
              f"{_human_bytes(result.total_bytes)} -> {result.destination / 'model.safetensors'}")
    out.print(f"config: {result.destination / 'config.json'}")
    for asset in result.assets:
        out.print(f"asset: {asset}")
    if not result.assets:
        out.print(Text("no assets/ folder in the source: pass norm stats with --norm-stats when serving", style="yellow"))


def _convert_rt1(source: Path, destination: Path, dtype: str, base_checkpoint: Optional[Path],
                 model_config: Optional[str]) -> None:
    """``convert`` for an RT-1 TF2 checkpoint: fp32 safetensors + config.json."""
    from cortexflow.checkpoints.rt1_layout import load_rt1_checkpoint, save_converted

    if dtype not in ("stored", "float32"):
        raise ConfigError(f"--dtype {dtype}: RT-1 checkpoints are written in float32 (use --dtype stored or float32)")
    if base_checkpoint is not None:
        raise ConfigError("--base-checkpoint applies to LoRA adapter folders, not to RT-1 checkpoints")
    if (Path(destination) / "model.safetensors").exists():
        raise InputError(f"{destination} already holds a model.safetensors; choose an empty DST folder")
    _progress(f"converting RT-1 checkpoint {source} ...")
    rt1, weights, report = load_rt1_checkpoint(source, parse_model_config(model_config))
    folder = save_converted(rt1, weights, destination)
    parameters = sum(w.numel() for w in weights.values())
    out = _stdout()
    out.print(f"rt1: {len(weights)} tensors, {parameters:,} parameters -> {folder / 'model.safetensors'}")
    out.print(f"config: {folder / 'config.json'}")
    if report.skipped:
        out.print(f"skipped {report.skipped} variable(s) that are not part of the network (optimizer state, counters)")


# ---- measurement tools: verify, bench, profile ---------------------------------------------------
JSON_PATH_HELP = "Also write the report as JSON to PATH ('-': print only the JSON, on stdout)."
TRITON_OPTIONS_HELP = ("triton backend: TritonOptions to change, e.g. persistent_expert=0,pdl=off (fields: "
                       "persistent_expert, fused_encoder, decode_gemv, decode_qkv_rope, decode_head, fold_token_norms, "
                       "fused_combine, concurrent_stages, pdl); recorded in the JSON.")


def _progress(message: str) -> None:
    _stderr().print(Text(message, style="dim"))


def _parse_switches(value: str, option: str) -> list:
    """``"on,off"`` -> ``[True, False]`` (also true/false, yes/no, 1/0)."""
    words = {"on": True, "true": True, "yes": True, "1": True, "off": False, "false": False, "no": False, "0": False}
    items = [item.strip().lower() for item in value.split(",")]
    bad = [item for item in items if item not in words]
    if bad or not items:
        raise InputError(f"{option} {value!r}: expected a comma-separated list of on/off")
    return [words[item] for item in items]


def _report(report: dict, json_path: Optional[str], print_tables: Callable) -> None:
    """Tables on stdout and the JSON file, or (``--json -``) only the JSON on stdout."""
    if json_path == "-":
        typer.echo(json.dumps(report, indent=2))
        return
    print_tables(report, _stdout())
    if json_path:
        path = Path(json_path).expanduser()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=2))
        except OSError as err:
            raise InputError(f"cannot write the JSON report to {path}: {err}") from err
        _stderr().print(Text(f"wrote {path}", style="dim"))


@app.command("verify", short_help="Check a backend against the fp32 reference module by module (error and time).")
@_cli_errors
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

        onnx_size = "tiny" if size.strip().lower() == "auto" else size.strip().lower()
        onnx_dtype = "float32" if dtype.strip().lower() == "auto" else dtype
        report = run_onnx_verify(model, size=onnx_size, dtype=onnx_dtype, seed=seed, views=views, repeats=repeats,
                                 log=_progress)
        _report(report, json_path, print_onnx_verify)
        if not report["passed"]:
            raise typer.Exit(EXIT_PROBLEMS)
        return
    from cortexflow.tools import backend_specs
    from cortexflow.tools.verify import print_verify, run_verify

    name = backend.strip().lower()
    checked = backend_specs([name], triton_options, "--triton-options")[name]
    report = run_verify(model, checked, against, size=size, device=device, dtype=dtype, seed=seed, views=views,
                        repeats=repeats, log=_progress)
    _report(report, json_path, print_verify)
    if not report["passed"]:
        raise typer.Exit(EXIT_PROBLEMS)


@app.command("bench", short_help="Time whole predict calls over models x backends x workloads (random weights).")
@_cli_errors
def bench_command(
    models: Annotated[str, typer.Option("--models", metavar="LIST", help=f"Comma-separated models: {ALL_MODELS_HELP} ({TOKEN_HELP} and rt1 ignore --views, --chunk and --steps: one image, their own action length, greedy decoding; rows record views=1 and steps -).")] = "pi0,pi05",
    backends: Annotated[str, typer.Option("--backends", metavar="LIST", help=f"Comma-separated backend names ({BACKENDS_HELP}); unavailable ones are reported as skipped.")] = "pytorch",
    views: Annotated[str, typer.Option("--views", metavar="LIST", help="Comma-separated camera-view counts.")] = "1,2,3",
    prompt_len: Annotated[str, typer.Option("--prompt-len", metavar="LIST", help="Comma-separated prompt lengths in tokens (pi0/pi05: padded to the smallest --prompt-buckets length that holds them; openvla/rt2: ids incl. BOS and closing id, padded to a multiple of 16).")] = "20",
    image_preprocessing: Annotated[str, typer.Option("--image-preprocessing", metavar="WHERE", help="pi0/pi05: where the 224x224 uint8 views are scaled: auto (the GPU on a GPU), device or host.")] = "auto",
    prompt_buckets: Annotated[str, typer.Option("--prompt-buckets", metavar="SPEC", help="pi0/pi05 padded prompt lengths: auto (32, 64, 128, ... and max_token_len), off (always max_token_len, as openpi pads) or a list like 32,64.")] = "auto",
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
            encoder, [b.strip() for b in backends.split(",") if b.strip()], _parse_number_list(batches, "--batches", int),
            device=device, dtype=dtype, iters=iters, warmup=warmup, max_seconds=max_seconds, seed=seed, log=_progress,
        )
        _report(report, json_path, print_batch_scaling)
        if png is not None:
            _stderr().print(Text(f"wrote {plot_batch_scaling(report, png)}", style="dim"))
        return
    from cortexflow.tools.bench import print_bench, run_bench

    results = run_bench(
        models=[m.strip() for m in models.split(",") if m.strip()],
        backends=[b.strip() for b in backends.split(",") if b.strip()],
        views=_parse_number_list(views, "--views", int),
        prompt_lens=_parse_number_list(prompt_len, "--prompt-len", int),
        chunks=_parse_number_list(chunk, "--chunk", int),
        steps=_parse_number_list(steps, "--steps", int),
        graphs=_parse_switches(graphs, "--graphs"),
        iters=iters,
        warmup=warmup,
        size=size,
        device=device,
        dtype=dtype,
        seed=seed,
        log=_progress,
        prompt_buckets=prompt_buckets,
        image_preprocessing=image_preprocessing,
        triton_options=triton_options,
        options_source="--triton-options",
    )
    _report(results, json_path, print_bench)


@app.command("compile-check", short_help="Compile every Triton kernel of a real-size predict for a GPU, without one.")
@_cli_errors
def compile_check_command(
    models: Annotated[str, typer.Option("--models", metavar="LIST", help=f"Comma-separated: {MODELS_HELP}.")] = "pi0,pi05",
    views: Annotated[str, typer.Option("--views", metavar="LIST", help="Comma-separated camera view counts (Pi0 family; openvla/rt2 take one image).")] = "2",
    variants: Annotated[str, typer.Option("--variants", metavar="LIST", help="Comma-separated TritonOptions variants to compile: default, kernel-chain, op-by-op-encoder, token-unfused; or all.")] = "default",
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
        views=_parse_number_list(views, "--views", int),
        variants=[v.strip() for v in variants.split(",") if v.strip()],
        dtype=dtype, arch=arch, processors=sms, log=_progress)
    _report(report, json_path, print_compile_check)
    if not report["passed"]:
        raise typer.Exit(EXIT_PROBLEMS)


@app.command("profile", short_help="Profile one predict: stage times, top kernels, FLOP/s and the gap to the floor.")
@_cli_errors
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
    from cortexflow.tools.profile import print_profile, run_profile

    parse_model_option(model, IMAGE_PROMPT_MODELS, command="profile")
    check_common_options(device=device, backend=backend, dtype=dtype)
    report = run_profile(model, backend, views=views, size=size, device=device, dtype=dtype, prompt_len=prompt_len,
                         chunk=chunk, steps=steps, top=top, repeats=repeats, seed=seed, peak_tflops=peak_tflops,
                         peak_gbps=peak_gbps, log=_progress)
    _report(report, json_path, print_profile)
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


# ---- ONNX export --------------------------------------------------------------------------------
@app.command("export", short_help="Export a policy's stages (or a perception encoder) to ONNX, checked in ONNX Runtime.")
@_cli_errors
def export_command(
    out: Annotated[Path, typer.Option("--out", "-o", metavar="DIR", help="Folder for the .onnx files (+ .onnx.data over 2 GB) and manifest.json.")],
    checkpoint: Annotated[Optional[str], typer.Option("--checkpoint", "-c", metavar="PATH|demo", help="Checkpoint folder or model.safetensors (openpi / LeRobot); 'demo': the tiny random model of cortexflow demo.")] = None,
    model: Annotated[str, typer.Option("--model", "-m", metavar="NAME", help=f"auto (detected from the tensors; pi0 for demo), or one of {FLOW_HELP} (export covers the flow-matching policies).")] = "auto",
    stages: Annotated[str, typer.Option("--stages", metavar="LIST", help="Comma-separated stages (vision, prefix, decoder) or all.")] = "all",
    batch: Annotated[str, typer.Option("--batch", metavar="SPEC", help="static (batch 1), static:N, or dynamic:A-B (a symbolic batch axis, checked at two sizes).")] = "dynamic:1-16",
    opset: Annotated[int, typer.Option("--opset", metavar="N", help="ONNX opset: 20, or 23 (native Attention and RMSNormalization).")] = 20,
    dtype: Annotated[str, typer.Option("--dtype", metavar="DTYPE", help="fp32 or fp16 (weights and activations; images, noise, state and actions stay fp32).")] = "fp32",
    decoder: Annotated[str, typer.Option("--decoder", metavar="FORM", help="unrolled (the whole denoising loop in one graph) or step (one velocity evaluation; the host runs the Euler loop).")] = "unrolled",
    simplify: Annotated[bool, typer.Option("--simplify", help="Simplify each graph with onnxslim (or onnxsim).")] = False,
    views: Annotated[int, typer.Option("--views", metavar="N", help="Camera views (fixed in the exported shapes).")] = 2,
    model_config: Annotated[Optional[str], typer.Option("--model-config", metavar="JSON|PATH", help="ModelConfig field overrides (a JSON object or a JSON file).")] = None,
    encoder: Annotated[Optional[str], typer.Option("--encoder", metavar="NAME", help="Export a perception encoder instead of a policy: siglip, siglip_tiny, vit_small_patch16_224 or resnet18d (random init; no --checkpoint).")] = None,
    seed: Annotated[int, typer.Option("--seed", metavar="N", help="Seed of the random weights (demo and --encoder).")] = 0,
    check: Annotated[bool, typer.Option("--check/--no-check", help="Load each file in ONNX Runtime and compare it with PyTorch (nothing is written when it fails).")] = True,
    json_path: Annotated[Optional[str], typer.Option("--json", metavar="PATH", help="Also write the manifest to PATH ('-': print only the manifest JSON, on stdout).")] = None,
) -> None:
    """Export a Pi0 / Pi0.5 checkpoint's stages to ONNX with torch.onnx (dynamo), one file per stage:
    vision (images -> image tokens), prefix (image tokens + prompt -> KV cache) and decoder (KV cache +
    noise [+ state] -> actions, or one denoising step).

    Each file is loaded in ONNX Runtime and compared with the PyTorch stage at two batch sizes (one that
    differs from the traced size, so a batch frozen by the exporter fails) before it is kept. The
    manifest records inputs and outputs (shapes with the symbolic 'batch' dim, dtypes), the settings,
    the checkpoint's hash, the exporter and the package versions. Needs pip install "cortexflow[onnx]".
    """
    if (checkpoint is None) == (encoder is None):
        raise ConfigError("pass either --checkpoint PATH|demo (a policy) or --encoder NAME (a perception encoder)")
    if model.strip().lower() != "auto":
        parse_model_option(model, FLOW_MATCHING_MODELS, command="export")
    if encoder is not None:
        from cortexflow.encoders import create_encoder, export_encoder

        _progress(f"exporting encoder {encoder} ({batch} batch, opset {opset}, {dtype}) ...")
        manifest = export_encoder(create_encoder(encoder, seed=seed), out, batch=batch, opset=opset, dtype=parse_dtype(dtype),
                                  simplify=simplify, check=check)
    else:
        from cortexflow.onnx import export_checkpoint

        manifest = export_checkpoint(
            checkpoint, out, model=model, stages=stages, batch=batch, opset=opset, dtype=dtype, simplify=simplify,
            decoder=decoder, num_views=views, check=check, model_config=parse_model_config(model_config), seed=seed,
            progress=_progress,
        )
    if json_path == "-":
        typer.echo(json.dumps(manifest, indent=2))
        return
    _print_export(manifest, out)
    if json_path:
        path = Path(json_path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(manifest, indent=2))


def _print_export(manifest: dict, out: Path) -> None:
    console = _stdout()
    settings = manifest["settings"]
    batch = settings["batch"]
    what = manifest.get("model") or manifest.get("encoder", {}).get("name")
    table = Table(title=f"{what} -> {out} (opset {settings['opset']}, {settings['dtype']}, "
                        f"{'dynamic batch %d..%d' % (batch['min'], batch['max']) if batch['mode'] == 'dynamic' else 'static batch %d' % batch['min']})",
                  box=box.SIMPLE_HEAD, title_justify="left")
    for header in ("stage", "file", "size", "inputs", "outputs", "‖Δ‖/‖ref‖ vs torch"):
        table.add_column(header)

    def shapes(items):
        return Text("\n".join(f"{i['name']} ({', '.join(map(str, i['shape']))}) {i['dtype']}" for i in items))

    for stage, entry in manifest["stages"].items():
        parity = entry.get("parity")
        checked = f"{parity['rel_l2']:.2e} (batch {', '.join(map(str, parity['batches']))})" if parity else "not checked"
        files = entry["file"] + (f" + {entry['external_data']}" if entry.get("external_data") else "")
        table.add_row(stage, files, _human_bytes(entry["bytes"]), shapes(entry["inputs"]), shapes(entry["outputs"]), checked)
    console.print(table)
    console.print(Text(f"manifest: {out / 'manifest.json'}", style="dim"))


@app.command("configs", short_help="List the openpi policy configs --config accepts.")
@_cli_errors
def configs_command(
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON list instead of a table.")] = False,
) -> None:
    """List the registered openpi policy configs: model, robot, horizon, prompt length, state in the prompt,
    delta-action mask, normalisation, norm-stats asset id and default prompt."""
    from cortexflow.policies.describe import config_rows

    rows = config_rows()
    if json_output:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(box=None, pad_edge=False)
    for column in rows[0]:
        table.add_column(column, no_wrap=column == "name")
    for row in rows:
        table.add_row(*("" if value is None else str(value) for value in row.values()))
    _stdout().print(table)


# ---- serving: serve, loadtest (bodies in cortexflow/serving/commands.py) -------------------------
@app.command("serve", short_help="Serve a policy over WebSocket with openpi's protocol (openpi_client connects unchanged).")
@_cli_errors
def serve_command(
    checkpoint: Annotated[str, typer.Option("--checkpoint", "-c", metavar="PATH|demo", help="Checkpoint folder or model.safetensors; 'demo': the tiny random model (no checkpoint, prompts as UTF-8 byte ids).")],
    model: Annotated[str, typer.Option("--model", "-m", metavar="NAME", help=f"auto (from the checkpoint: pi0, pi05, openvla from its tensors, rt1 for a TF2 checkpoint; pi0 for demo), or one of {ALL_MODELS_HELP} ({TOKEN_HELP}: one image + prompt, no state; rt1: one frame + instruction embedding, an episode per connection).")] = "auto",
    robot: Annotated[Optional[str], typer.Option("--robot", "-r", metavar="NAME", help="Observation/action mapping: droid (8-D), libero (7-D), aloha (14-D) or raw (the engine's own arguments) [default: the --config's robot, else droid].")] = None,
    config: Annotated[Optional[str], typer.Option("--config", metavar="NAME", help="openpi policy config (cortexflow configs lists them): robot, transforms, norm-stats asset, horizon, default prompt.")] = None,
    backend: Annotated[str, typer.Option("--backend", "-b", metavar="NAME", help=f"Compute backend: {BACKENDS_HELP}.")] = "pytorch",
    host: Annotated[str, typer.Option("--host", metavar="ADDR", help="Address to bind; loopback unless told otherwise (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", metavar="N", help="TCP port (0: any free port, printed at start).")] = 8000,
    api_key: Annotated[Optional[str], typer.Option("--api-key", metavar="KEY", envvar="CORTEXFLOW_API_KEY", help="Refuse connections without 'Authorization: Api-Key KEY'. Prefer env CORTEXFLOW_API_KEY or --api-key-file: a key on the command line is visible in ps.")] = None,
    api_key_file: Annotated[Optional[str], typer.Option("--api-key-file", metavar="PATH", help="Read the API key from this file (instead of --api-key).")] = None,
    tokenizer: Annotated[Optional[str], typer.Option("--tokenizer", metavar="PATH", help="PaliGemma tokenizer.model, tokenizer.json or a folder holding one (needed for text prompts except with demo).")] = None,
    norm_stats: Annotated[Optional[str], typer.Option("--norm-stats", metavar="PATH", help="openpi norm_stats.json, LeRobot stats, or a folder with assets/*/norm_stats.json.")] = None,
    device: Annotated[str, typer.Option("--device", metavar="DEVICE", help="auto (GPU if there is one), cpu, cuda or cuda:N; a list (cuda:0,cuda:1) runs one engine per GPU on one queue.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", metavar="DTYPE", help="auto (bfloat16 on GPU, float32 on CPU), bfloat16, float16 or float32.")] = "auto",
    chunk: Annotated[Optional[int], typer.Option("--chunk", metavar="N", help="Action chunk length [default: the checkpoint's].")] = None,
    unnorm_key: Annotated[Optional[str], typer.Option("--unnorm-key", metavar="DATASET", help="OpenVLA only: the dataset whose action statistics un-normalise the actions (needed when the checkpoint has several).")] = None,
    model_config: Annotated[Optional[str], typer.Option("--model-config", metavar="JSON|FILE", help="Model config overrides as a JSON object or file (rt2: '{\"action_dim\": 7, \"chunk_size\": 4}').")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", metavar="N", help="Denoising steps [default: the checkpoint's].")] = None,
    views: Annotated[Optional[int], typer.Option("--views", metavar="N", help="Camera views for --robot raw [default: 3].")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", metavar="N", help="Use the same seeded noise for every request (actions depend only on the observation).")] = None,
    default_prompt: Annotated[Optional[str], typer.Option("--default-prompt", metavar="TEXT", help="Prompt for requests that carry none.")] = None,
    adapt_to_pi: Annotated[bool, typer.Option("--adapt-to-pi/--no-adapt-to-pi", help="ALOHA only: convert joints/grippers between ALOHA and Pi0 conventions (openpi's default).")] = True,
    cuda_graphs: Annotated[bool, typer.Option("--cuda-graphs/--no-cuda-graphs", help="Capture the whole predict in a CUDA graph (GPU only).")] = True,
    queue_size: Annotated[int, typer.Option("--queue-size", metavar="N", help="Requests that may wait for the engine; beyond that clients get 'server busy'.")] = 32,
    max_message_mb: Annotated[float, typer.Option("--max-message-mb", metavar="MB", help="Largest request frame answered (bigger: error reply; over twice this: connection closed, 1009).")] = 32.0,
    shutdown_timeout: Annotated[float, typer.Option("--shutdown-timeout", metavar="S", help="On SIGINT/SIGTERM, how long to wait for the request in flight; past it the request is abandoned (its client sees close 1001, no reply) and the exit code is 2.")] = 30.0,
    max_connections: Annotated[int, typer.Option("--max-connections", metavar="N", help="WebSocket connections at once; more get HTTP 503.")] = 16,
    idle_timeout: Annotated[float, typer.Option("--idle-timeout", metavar="S", help="Close a connection that sends no request for this long (code 1000).")] = 300.0,
    warmup: Annotated[bool, typer.Option("--warmup/--no-warmup", help="Run one synthetic request before listening (captures the CUDA graph; with --max-batch, one per batch size).")] = True,
    max_batch: Annotated[int, typer.Option("--max-batch", metavar="N", help="Pi0/Pi0.5: run up to N queued requests as one batched forward (1: one at a time). Each keeps its own images, prompt, state and noise.")] = 1,
    batch_window_ms: Annotated[float, typer.Option("--batch-window-ms", metavar="MS", help="With --max-batch: wait up to MS for more requests after the first (0: batch only what queued while the engine was busy).")] = 0.0,
) -> None:
    """Serve a Pi0/Pi0.5, OpenVLA, RT-2 or RT-1 policy to robots: a WebSocket server speaking openpi's protocol.

    On connect the server sends msgpack metadata (model, action dims, chunk size, robot config); each
    msgpack-numpy observation is answered with {"actions", "server_timing"}, or an error text frame.
    GET /healthz answers 200, GET /metrics the Prometheus counters. SIGINT/SIGTERM stop the server after
    the request in flight.
    """
    from cortexflow.serving.commands import read_api_key_file, serve
    from cortexflow.serving.policy import PolicyOptions
    from cortexflow.serving.server import ShutdownDeadlineError

    for one_device in device.split(","):
        check_common_options(device=one_device.strip())
    check_common_options(backend=backend, dtype=dtype)
    options = PolicyOptions(checkpoint=checkpoint, model=model, robot=robot, config=config, backend=backend, device=device,
                            dtype=dtype, tokenizer=tokenizer, norm_stats=norm_stats, chunk=chunk, steps=steps,
                            views=views, seed=seed, default_prompt=default_prompt, cuda_graphs=cuda_graphs,
                            adapt_to_pi=adapt_to_pi, unnorm_key=unnorm_key,
                            model_config=parse_model_config(model_config))
    if api_key_file is not None:
        if api_key is not None:
            raise ConfigError("pass the API key once: --api-key-file, or --api-key / CORTEXFLOW_API_KEY, not both")
        api_key = read_api_key_file(api_key_file)
    try:
        serve(options, host=host, port=port, api_key=api_key, max_message_mb=max_message_mb, queue_size=queue_size,
              shutdown_timeout=shutdown_timeout, warmup=warmup, max_connections=max_connections,
              idle_timeout=idle_timeout, info=_progress, warn=_warning_line, max_batch=max_batch,
              batch_window_ms=batch_window_ms)
    except ShutdownDeadlineError as err:
        _error_line(str(err))
        sys.stdout.flush()
        sys.stderr.flush()
        # An engine thread is still inside the abandoned request; finalising the interpreter under it can abort.
        os._exit(EXIT_ERROR)


@app.command("loadtest", short_help="Load-test a policy server: N clients x M requests; p50/p90/p99, throughput, errors.")
@_cli_errors
def loadtest_command(
    url: Annotated[str, typer.Option("--url", metavar="URL", help="Server address, e.g. ws://127.0.0.1:8000.")] = "ws://127.0.0.1:8000",
    clients: Annotated[int, typer.Option("--clients", "-n", metavar="N", help="Concurrent connections (1..1024).")] = 4,
    requests: Annotated[int, typer.Option("--requests", metavar="M", help="Requests per connection, sent one after the other.")] = 50,
    api_key: Annotated[Optional[str], typer.Option("--api-key", metavar="KEY", envvar="CORTEXFLOW_API_KEY", help="Sent as 'Authorization: Api-Key KEY'.")] = None,
    robot: Annotated[Optional[str], typer.Option("--robot", metavar="NAME", help="Observation format [default: the robot in the server's metadata].")] = None,
    timeout: Annotated[float, typer.Option("--timeout", metavar="S", help="Limit on connecting and on each reply.")] = 30.0,
    image_size: Annotated[int, typer.Option("--image-size", metavar="PX", help="Side of the synthetic camera images.")] = 224,
    seed: Annotated[int, typer.Option("--seed", metavar="N", help="Seed of the synthetic observations.")] = 0,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Send synthetic observations from concurrent clients and report latency percentiles, throughput and
    errors. Exit code 0: every request answered with actions; 1: some errors; 2: the test could not run."""
    from cortexflow.serving.commands import format_report, loadtest

    report = loadtest(url, clients, requests, api_key=api_key, timeout=timeout, robot=robot, seed=seed,
                      image_size=image_size)
    typer.echo(format_report(report, json_output))
    if report.errors:
        raise typer.Exit(EXIT_PROBLEMS)


if __name__ == "__main__":  # pragma: no cover
    app()
