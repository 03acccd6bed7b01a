"""The command line as a new user meets it: warnings, one list of names, error order and wording."""

import subprocess
import sys
import textwrap

WARNING_COMMAND = textwrap.dedent("""
    import warnings
    import typer
    from cortexflow.cli import _cli_errors
    from cortexflow.errors import CortexFlowWarning

    app = typer.Typer()

    @app.command()
    @_cli_errors
    def noisy() -> None:
        warnings.warn("third-party warning text", UserWarning)
        warnings.warn("cortexflow warning text", CortexFlowWarning)
        print("command done")

    app()
""")


def test_command_that_warns_exits_promptly_with_each_warning_once():
    done = subprocess.run([sys.executable, "-c", WARNING_COMMAND], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "command done"
    assert done.stderr.count("third-party warning text") == 1, done.stderr
    assert done.stderr.count("warning: cortexflow warning text") == 1, done.stderr
