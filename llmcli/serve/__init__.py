"""`llmcli serve`: an OpenAI-compatible HTTP server (`app`) over a continuous-batching engine (`batcher`).

protocol.py validates requests and shapes OpenAI response and error objects; text.py turns sampled tokens
into text (stop strings, held-back partial characters); nothing here prints except the CLI front end.
"""
