"""`llmcli bench`: not built yet."""

from llmcli.cli import app
from llmcli.cli.common import not_built


@app.command("bench", help="(not built yet)")
def bench_command() -> None:
    not_built("bench")
