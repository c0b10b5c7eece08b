"""`llmcli trace`: not built yet."""

from llmcli.cli import app
from llmcli.cli.common import not_built


@app.command("trace", help="(not built yet)")
def trace_command() -> None:
    not_built("trace")
