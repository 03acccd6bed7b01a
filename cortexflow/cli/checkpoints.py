"""The checkpoint commands: ``info`` (describe without loading; exit 1 on key problems), ``convert``
(openpi JAX, LoRA adapter or RT-1 TF2 -> safetensors folder) and ``configs`` (the openpi policy configs)."""

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich import box
from rich.table import Table
from rich.text import Text

from cortexflow.cli.common import (
    EXIT_PROBLEMS,
    cli_errors,
    human_bytes,
    human_count,
    parse_model_config,
    progress_line,
    refuse_demo_name,
    stdout_console,
)
from cortexflow.config import VLAModelType, is_auto
from cortexflow.errors import ConfigError, InputError


@cli_errors
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

    refuse_demo_name(checkpoint, "info CHECKPOINT")
    from cortexflow.checkpoints.rt1_layout import is_converted_rt1, is_rt1_checkpoint

    if is_rt1_checkpoint(checkpoint) or is_converted_rt1(checkpoint):
        if config is not None:
            raise ConfigError("--config names an openpi policy; RT-1 checkpoints have none")
        _print_rt1_info(checkpoint, parse_model_config(model_config), json_output)
        return
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
            stdout_console().print(f"\n[bold]{transforms['source']}[/bold]: transforms in order")
            for index, line in enumerate(transforms["steps"], 1):
                stdout_console().print(f"  {index:2d}. {line}", markup=False, highlight=False)
            for note in transforms["notes"]:
                stdout_console().print(f"  note: {note}", markup=False, highlight=False)
    if not report.ok:
        raise typer.Exit(EXIT_PROBLEMS)


def _print_rt1_info(checkpoint: Path, model_config, json_output: bool) -> None:
    """``info`` for an RT-1 checkpoint (TF2, RT-1-X Flax or converted): its variables are read and mapped (RT-1 has
    ~35M parameters); a checkpoint with key problems is a CheckpointError naming all of them."""
    from cortexflow.checkpoints.rt1_layout import load_rt1_checkpoint

    model, weights, report = load_rt1_checkpoint(checkpoint, model_config)
    dtypes: dict[str, int] = {}
    for tensor in weights.values():
        dtypes[str(tensor.dtype).removeprefix("torch.")] = dtypes.get(str(tensor.dtype).removeprefix("torch."), 0) + 1
    count = sum(t.numel() for t in weights.values())
    c = model.config
    if json_output:
        typer.echo(json.dumps({"path": str(checkpoint), "model_type": "rt1", "layout": report.format,
                               "config": c.to_dict(), "num_parameters": count, "dtypes": dtypes, "ok": True,
                               "missing": [], "unexpected": [], "mis_shaped": [], "wrong_dtype": [],
                               "skipped": report.skipped}, indent=2))
        return
    out = stdout_console()
    summary = Table(show_header=False, box=None, pad_edge=False, padding=(0, 2, 0, 0))
    summary.add_column(style="cyan", no_wrap=True)
    summary.add_column()
    summary.add_row("checkpoint", str(checkpoint))
    summary.add_row("model type", "rt1")
    summary.add_row("format", report.format)
    summary.add_row("parameters", human_count(count))
    summary.add_row("dtypes", ", ".join(f"{name}: {n} tensors" for name, n in sorted(dtypes.items())))
    summary.add_row("history", f"{c.time_steps} frames x ({c.num_tokens} image + {c.num_action_tokens} action "
                               f"tokens) = {c.sequence_length} tokens")
    summary.add_row("vocabulary", f"{c.vocab_size} bins per action token")
    summary.add_row("input", f"{tuple(c.input_size)} frames, resized to {c.image_size}x{c.image_size}")
    out.print(summary)
    out.print("[green]every variable mapped[/green] (missing, unexpected or mis-shaped ones would be a "
              "checkpoint error listing them)")


def _print_info(report) -> None:
    out = stdout_console()
    summary = Table(show_header=False, box=None, pad_edge=False, padding=(0, 2, 0, 0))
    summary.add_column(style="cyan", no_wrap=True)
    summary.add_column()
    summary.add_row("checkpoint", report.path)
    summary.add_row("model type", report.model_type.value)
    summary.add_row("layout", report.layout)
    summary.add_row("parameters", human_count(report.num_parameters) + " (in tensors the model uses)")
    summary.add_row("dtypes", ", ".join(f"{name}: {count} tensors" for name, count in sorted(report.dtypes.items())))
    summary.add_row("total size", f"{human_bytes(report.total_bytes)} ({report.total_bytes:,} bytes)")
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


@cli_errors
def convert_command(
    source: Annotated[Path, typer.Argument(metavar="SRC", help="openpi JAX checkpoint (folder with params/ and assets/), a LoRA adapter folder, any safetensors checkpoint, an RT-1 TF2 checkpoint (the ckpt-N prefix, its .index file or its folder), or an RT-1-X Flax checkpoint (msgpack file or its folder).")],
    destination: Annotated[Path, typer.Argument(metavar="DST", help="Output folder (created; must not hold a model.safetensors yet).")],
    model: Annotated[str, typer.Option("--model", "-m", metavar="NAME", help="auto (RT-1 for a TF2 or Flax RT-1-X checkpoint, else the Pi0 family, detected from the tensors), pi0, pi05 or rt1.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", metavar="DTYPE", help="stored (keep each tensor's dtype), float32, or bfloat16 (patch/position embedding and norms stay float32, as in openpi). RT-1 is always written in float32.")] = "stored",
    base_checkpoint: Annotated[Optional[Path], typer.Option("--base-checkpoint", metavar="PATH", help="Base checkpoint of a LoRA adapter folder (default: its base_model_name_or_path).")] = None,
    model_config: Annotated[Optional[str], typer.Option("--model-config", metavar="JSON|FILE", help="RT-1 only: config fields the checkpoint cannot tell ('{\"input_size\": [256, 320]}').")] = None,
) -> None:
    """Write SRC as DST/model.safetensors + config.json (+ assets/), loadable without JAX or TensorFlow.

    An Orbax params/ tree is read with orbax-checkpoint (pip install 'cortexflow[jax]'), checked leaf by
    leaf, openpi's LoRA leaves are merged, and the tensors are written under openpi PyTorch names. A PEFT
    LoRA adapter is written merged into its base. SRC/assets (openpi norm stats) is copied to DST/assets.
    An RT-1 TF2 object checkpoint (tensor bundle) is read without TensorFlow, its variables mapped to
    CortexFlow's names and torch layouts; create_rt1_inference loads the folder. An RT-1-X Flax checkpoint
    (open_x_embodiment rt_1_x_jax: msgpack, or Orbax with orbax-checkpoint) is read without flax the same way.
    """
    from cortexflow.checkpoints.convert import DTYPES, convert_checkpoint
    from cortexflow.checkpoints.rt1_layout import is_rt1_checkpoint

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    model_type = None if is_auto(model) else VLAModelType.parse(model)
    rt1_source = is_rt1_checkpoint(source)
    if model_type == VLAModelType.RT1 or (model_type is None and rt1_source):
        _convert_rt1(source, destination, dtype, base_checkpoint, model_config)
        return
    if rt1_source:
        raise ConfigError(f"{source} is a TensorFlow checkpoint (RT-1) or a Flax checkpoint (RT-1-X); --model {model} converts Pi0-family checkpoints: "
                          "use --model rt1 or --model auto")
    if model_config is not None:
        raise ConfigError("--model-config applies to RT-1 checkpoints only; Pi0-family sizes come from the tensors")
    progress_line(f"converting {source} ...")
    result = convert_checkpoint(source, destination, dtype=dtype, base_checkpoint=base_checkpoint)
    out = stdout_console()
    if model_type is not None and result.model_type != model_type.value:
        raise ConfigError(f"--model {model}: {source} holds a {result.model_type} checkpoint (written to {destination} anyway)")
    out.print(f"{result.model_type} ({result.layout} keys): {result.num_tensors} tensors, "
              f"{human_bytes(result.total_bytes)} -> {result.destination / 'model.safetensors'}")
    out.print(f"config: {result.destination / 'config.json'}")
    for asset in result.assets:
        out.print(f"asset: {asset}")
    if not result.assets:
        out.print(Text("no assets/ folder in the source: pass norm stats with --norm-stats when serving", style="yellow"))


def _convert_rt1(source: Path, destination: Path, dtype: str, base_checkpoint: Optional[Path],
                 model_config: Optional[str]) -> None:
    """``convert`` for an RT-1 TF2 or RT-1-X Flax checkpoint: fp32 safetensors + config.json."""
    from cortexflow.checkpoints.rt1_layout import load_rt1_checkpoint, save_converted

    if dtype not in ("stored", "float32"):
        raise ConfigError(f"--dtype {dtype}: RT-1 checkpoints are written in float32 (use --dtype stored or float32)")
    if base_checkpoint is not None:
        raise ConfigError("--base-checkpoint applies to LoRA adapter folders, not to RT-1 checkpoints")
    if (Path(destination) / "model.safetensors").exists():
        raise InputError(f"{destination} already holds a model.safetensors; choose an empty DST folder")
    progress_line(f"converting RT-1 checkpoint {source} ...")
    rt1, weights, report = load_rt1_checkpoint(source, parse_model_config(model_config))
    folder = save_converted(rt1, weights, destination)
    parameters = sum(w.numel() for w in weights.values())
    out = stdout_console()
    out.print(f"rt1: {len(weights)} tensors, {parameters:,} parameters -> {folder / 'model.safetensors'}")
    out.print(f"config: {folder / 'config.json'}")
    if report.skipped:
        out.print(f"skipped {report.skipped} variable(s) that are not part of the network (optimizer state, counters)")


@cli_errors
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
    stdout_console().print(table)
