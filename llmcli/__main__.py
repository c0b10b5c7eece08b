from llmcli.cli import launch

launch()
