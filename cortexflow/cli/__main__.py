"""``python -m cortexflow.cli``."""

from cortexflow.cli import app

app()
