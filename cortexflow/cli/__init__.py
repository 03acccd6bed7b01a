"""The ``cortexflow`` command line (typer): one module per command group, each command a thin layer over
the library (:mod:`cortexflow.tools`, :mod:`cortexflow.serving`, :mod:`cortexflow.demo`).

Every :class:`~cortexflow.errors.CortexFlowError` becomes one red ``error: ...`` line on stderr and exit
code 2; ``info`` exits 1 when the checkpoint has key problems. ``run`` prints its result as JSON on
stdout and everything else (progress, warnings) on stderr, so its output can be piped. The commands are
registered below in the order ``--help`` lists them.
"""

from typing import Annotated

import typer

from cortexflow.cli import cache, checkpoints, demo, export, measure, run, serve
from cortexflow.cli.common import cli_errors

__all__ = ["app", "main", "cli_errors"]

app = typer.Typer(
    name="cortexflow",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

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


#: Every command: its name, its function and the one-line help ``cortexflow --help`` lists, in that order.
COMMANDS = (
    ("demo", demo.demo_command,
     "Build and run a tiny random Pi0/Pi0.5 on a synthetic observation (no checkpoint needed)."),
    ("run", run.run_command,
     "Run one observation through a checkpoint; print the actions as JSON."),
    ("info", checkpoints.info_command,
     "Describe a checkpoint (type, dims, parameters, key problems) without loading it."),
    ("convert", checkpoints.convert_command,
     "Write an openpi JAX (Orbax), LoRA-adapter or RT-1 TF2 checkpoint as a safetensors folder."),
    ("verify", measure.verify_command,
     "Check a backend against the fp32 reference module by module (error and time)."),
    ("bench", measure.bench_command,
     "Time whole predict calls over models x backends x workloads (random weights)."),
    ("compile-check", measure.compile_check_command,
     "Compile every Triton kernel of a real-size predict for a GPU, without one."),
    ("profile", measure.profile_command,
     "Profile one predict: stage times, top kernels, FLOP/s and the gap to the floor."),
    ("export", export.export_command,
     "Export a policy's stages (or a perception encoder) to ONNX, checked in ONNX Runtime."),
    ("configs", checkpoints.configs_command,
     "List the openpi policy configs --config accepts."),
    ("cache", cache.cache_command,
     "List or clear CortexFlow's disk caches (FP8 weights, ONNX exports)."),
    ("serve", serve.serve_command,
     "Serve a policy over WebSocket with openpi's protocol (openpi_client connects unchanged)."),
    ("loadtest", serve.loadtest_command,
     "Load-test a policy server: N clients x M requests; p50/p90/p99, throughput, errors."),
)
for name, command, short_help in COMMANDS:
    app.command(name, short_help=short_help)(command)
