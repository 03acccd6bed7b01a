"""``cortexflow export``: a policy's stages (or a perception encoder) as ONNX, checked in ONNX Runtime."""

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich import box
from rich.table import Table
from rich.text import Text

from cortexflow.cli.common import (
    FLOW_HELP,
    cli_errors,
    human_bytes,
    parse_model_config,
    progress_line,
    stdout_console,
)
from cortexflow.cli_options import parse_model_option
from cortexflow.config import FLOW_MATCHING_MODELS, is_auto, parse_dtype
from cortexflow.errors import ConfigError


@cli_errors
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
    if not is_auto(model):
        parse_model_option(model, FLOW_MATCHING_MODELS, command="export")
    if encoder is not None:
        from cortexflow.encoders import create_encoder, export_encoder

        progress_line(f"exporting encoder {encoder} ({batch} batch, opset {opset}, {dtype}) ...")
        manifest = export_encoder(create_encoder(encoder, seed=seed), out, batch=batch, opset=opset, dtype=parse_dtype(dtype),
                                  simplify=simplify, check=check)
    else:
        from cortexflow.onnx import export_checkpoint

        manifest = export_checkpoint(
            checkpoint, out, model=model, stages=stages, batch=batch, opset=opset, dtype=dtype, simplify=simplify,
            decoder=decoder, num_views=views, check=check, model_config=parse_model_config(model_config), seed=seed,
            progress=progress_line,
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
    console = stdout_console()
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
        table.add_row(stage, files, human_bytes(entry["bytes"]), shapes(entry["inputs"]), shapes(entry["outputs"]), checked)
    console.print(table)
    console.print(Text(f"manifest: {out / 'manifest.json'}", style="dim"))
