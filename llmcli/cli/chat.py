"""`llmcli chat`: not built yet."""

from llmcli.cli import app
from llmcli.cli.common import not_built


@app.command("chat", help="(not built yet)")
def chat_command() -> None:
    not_built("chat")
