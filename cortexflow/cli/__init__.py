"""The ``cortexflow`` command line (typer): one module per command group, each command a thin layer over
the library (:mod:`cortexflow.tools`, :mod:`cortexflow.serving`, :mod:`cortexflow.demo`).

Every :class:`~cortexflow.errors.CortexFlowError` becomes one red ``error: ...`` line on stderr and exit
code 2; ``info`` exits 1 when the checkpoint has key problems. ``run`` prints its result as JSON on
stdout and everything else (progress, warnings) on stderr, so its output can be piped. The commands are
registered below in the order ``--help`` lists them.
"""

from typing import Annotated

import typer

from cortexflow.cli import checkpoints, demo, export, measure, run, serve
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


app.command("demo", short_help="Build and run a tiny random Pi0/Pi0.5 on a synthetic observation (no checkpoint needed).")(demo.demo_command)
app.command("run", short_help="Run one observation through a checkpoint; print the actions as JSON.")(run.run_command)
app.command("info", short_help="Describe a checkpoint (type, dims, parameters, key problems) without loading it.")(checkpoints.info_command)
app.command("convert", short_help="Write an openpi JAX (Orbax), LoRA-adapter or RT-1 TF2 checkpoint as a safetensors folder.")(checkpoints.convert_command)
app.command("verify", short_help="Check a backend against the fp32 reference module by module (error and time).")(measure.verify_command)
app.command("bench", short_help="Time whole predict calls over models x backends x workloads (random weights).")(measure.bench_command)
app.command("compile-check", short_help="Compile every Triton kernel of a real-size predict for a GPU, without one.")(measure.compile_check_command)
app.command("profile", short_help="Profile one predict: stage times, top kernels, FLOP/s and the gap to the floor.")(measure.profile_command)
app.command("export", short_help="Export a policy's stages (or a perception encoder) to ONNX, checked in ONNX Runtime.")(export.export_command)
app.command("configs", short_help="List the openpi policy configs --config accepts.")(checkpoints.configs_command)
app.command("serve", short_help="Serve a policy over WebSocket with openpi's protocol (openpi_client connects unchanged).")(serve.serve_command)
app.command("loadtest", short_help="Load-test a policy server: N clients x M requests; p50/p90/p99, throughput, errors.")(serve.loadtest_command)
