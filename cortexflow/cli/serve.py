"""The serving commands: ``serve`` (the openpi-protocol WebSocket server) and ``loadtest`` (bodies in
:mod:`cortexflow.serving.commands`)."""

import collections.abc
import dataclasses
import inspect
import os
import sys
import types
import typing
from typing import Annotated, Any, Optional

import typer

from cortexflow.cli.common import (
    ALL_MODELS_HELP,
    BACKENDS_HELP,
    EXIT_ERROR,
    EXIT_PROBLEMS,
    TOKEN_HELP,
    cli_errors,
    error_line,
    parse_model_config,
    progress_line,
    warning_line,
)
from cortexflow.cli_options import check_common_options
from cortexflow.errors import ConfigError


def server_options(
    host: Annotated[str, typer.Option("--host", metavar="ADDR", help="Address to bind; loopback unless told otherwise (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", metavar="N", help="TCP port (0: any free port, printed at start).")] = 8000,
    api_key: Annotated[Optional[str], typer.Option("--api-key", metavar="KEY", envvar="CORTEXFLOW_API_KEY", help="Refuse connections without 'Authorization: Api-Key KEY'. Prefer env CORTEXFLOW_API_KEY or --api-key-file: a key on the command line is visible in ps.")] = None,
    api_key_file: Annotated[Optional[str], typer.Option("--api-key-file", metavar="PATH", help="Read the API key from this file (instead of --api-key).")] = None,
    queue_size: Annotated[int, typer.Option("--queue-size", metavar="N", help="Requests that may wait for the engine; beyond that clients get 'server busy'.")] = 32,
    max_message_mb: Annotated[float, typer.Option("--max-message-mb", metavar="MB", help="Largest request frame answered (bigger: error reply; over twice this: connection closed, 1009).")] = 32.0,
    shutdown_timeout: Annotated[float, typer.Option("--shutdown-timeout", metavar="S", help="On SIGINT/SIGTERM, how long to wait for the request in flight; past it the request is abandoned (its client sees close 1001, no reply) and the exit code is 2.")] = 30.0,
    max_connections: Annotated[int, typer.Option("--max-connections", metavar="N", help="WebSocket connections at once; more get HTTP 503.")] = 16,
    idle_timeout: Annotated[float, typer.Option("--idle-timeout", metavar="S", help="Close a connection that sends no request for this long (code 1000).")] = 300.0,
    warmup: Annotated[bool, typer.Option("--warmup/--no-warmup", help="Run one synthetic request before listening (captures the CUDA graph; with --max-batch, one per batch size).")] = True,
    max_batch: Annotated[int, typer.Option("--max-batch", metavar="N", help="Pi0/Pi0.5: run up to N queued requests as one batched forward (1: one at a time). Each keeps its own images, prompt, state and noise.")] = 1,
    batch_window_ms: Annotated[float, typer.Option("--batch-window-ms", metavar="MS", help="With --max-batch: wait up to MS for more requests after the first (0: batch only what queued while the engine was busy).")] = 0.0,
) -> dict:
    """The ``serve`` options that configure the server rather than the policy (their values, by name)."""
    return locals()


def policy_parameters() -> list[inspect.Parameter]:
    """One command-line parameter per :class:`~cortexflow.serving.policy.PolicyOptions` field, from the field's
    type, default and ``cli_option`` metadata; a mapping field (``model_config``) is read as JSON text or file."""
    from cortexflow.serving.policy import PolicyOptions

    names = {"{backends}": BACKENDS_HELP, "{all_models}": ALL_MODELS_HELP, "{token_models}": TOKEN_HELP}
    hints = typing.get_type_hints(PolicyOptions)
    parameters = []
    for option in dataclasses.fields(PolicyOptions):
        spec = option.metadata["cli"]
        help_text = spec["help"]
        for placeholder, value in names.items():
            help_text = help_text.replace(placeholder, value)
        kind = hints[option.name]
        if typing.get_origin(kind) in (typing.Union, types.UnionType) and any(
                typing.get_origin(arg) is collections.abc.Mapping for arg in typing.get_args(kind)):
            kind = Optional[str]
        default = inspect.Parameter.empty if option.default is dataclasses.MISSING else option.default
        annotation = Annotated[kind, typer.Option(*spec["flags"], metavar=spec["metavar"], help=help_text)]
        parameters.append(inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                            annotation=annotation))
    return parameters


def serve(**values: Any) -> None:
    """Serve a Pi0/Pi0.5, OpenVLA, RT-2 or RT-1 policy to robots: a WebSocket server speaking openpi's protocol.

    On connect the server sends msgpack metadata (model, action dims, chunk size, robot config); each
    msgpack-numpy observation is answered with {"actions", "server_timing"}, or an error text frame.
    GET /healthz answers 200, GET /metrics the Prometheus counters. SIGINT/SIGTERM stop the server after
    the request in flight.
    """
    from cortexflow.serving.commands import read_api_key_file
    from cortexflow.serving.commands import serve as run_server
    from cortexflow.serving.policy import PolicyOptions
    from cortexflow.serving.server import ShutdownDeadlineError

    policy = {option.name: values.pop(option.name) for option in dataclasses.fields(PolicyOptions)}
    for one_device in policy["device"].split(","):
        check_common_options(device=one_device.strip())
    check_common_options(backend=policy["backend"], dtype=policy["dtype"])
    options = PolicyOptions(**{**policy, "model_config": parse_model_config(policy["model_config"])})
    server = server_options(**values)
    api_key, api_key_file = server.pop("api_key"), server.pop("api_key_file")
    if api_key_file is not None:
        if api_key is not None:
            raise ConfigError("pass the API key once: --api-key-file, or --api-key / CORTEXFLOW_API_KEY, not both")
        api_key = read_api_key_file(api_key_file)
    try:
        run_server(options, api_key=api_key, info=progress_line, warn=warning_line, **server)
    except ShutdownDeadlineError as err:
        error_line(str(err))
        sys.stdout.flush()
        sys.stderr.flush()
        # An engine thread is still inside the abandoned request; finalising the interpreter under it can abort.
        os._exit(EXIT_ERROR)


serve_command = cli_errors(serve)
serve_command.__signature__ = inspect.Signature(
    [*policy_parameters(),
     *(p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in inspect.signature(server_options).parameters.values())],
    return_annotation=None,
)
serve_command.__annotations__ = {p.name: p.annotation for p in serve_command.__signature__.parameters.values()}


@cli_errors
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
