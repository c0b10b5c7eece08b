"""llmcli: run and inspect Qwen and DeepSeek language models natively in PyTorch."""

__version__ = "0.1.0"
