"""`llmcli download`: not built yet."""

from llmcli.cli import app
from llmcli.cli.common import not_built


@app.command("download", help="(not built yet)")
def download_command() -> None:
    not_built("download")
