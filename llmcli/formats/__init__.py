"""Readers of on-disk checkpoint formats that need no torch, so `llmcli show` and `llmcli list` stay light."""
