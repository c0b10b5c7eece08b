"""Two or three examples at the end of every command's --help: what people copy first."""

from __future__ import annotations

EXAMPLES: dict[str, list[str]] = {
    "generate": ['llmcli generate "What is the capital of France?"',
                 'llmcli generate qwen2.5-0.5b-instruct "Write a haiku" -n 64 --json',
                 'cat notes.txt | llmcli generate qwen3-0.6b --raw -t 0.7 --seed 1',
                 'torchrun --nproc-per-node 2 -m llmcli generate qwen2.5-7b-instruct -p "Hello" --tp 2'],
    "chat": ["llmcli chat", "llmcli chat qwen3-0.6b --no-think",
             "printf 'Hi\\nWhat did I say?\\n' | llmcli chat qwen2.5-0.5b-instruct"],
    "run": ["llmcli run qwen2.5-0.5b-instruct", 'llmcli run qwen3-0.6b "Why is the sky blue?"'],
    "trace": ["llmcli trace --layer 3", 'llmcli trace qwen2.5-0.5b-instruct -p "The capital of France is" --tokens',
              "llmcli trace demo-deepseek --corpus prompts.jsonl --json stats.json --plan-memory 1MB"],
    "bench": ["llmcli bench", "llmcli bench qwen2.5-0.5b-instruct --dtype bfloat16 --quantize int8",
              "llmcli bench qwen2.5-0.5b-instruct --compare transformers --json bench.json"],
    "download": ["llmcli download qwen2.5-0.5b-instruct", "llmcli download deepseek-ai/DeepSeek-V3 --dry-run"],
    "pull": ["llmcli pull qwen3-0.6b", "llmcli pull Qwen/Qwen2.5-7B-Instruct --revision main"],
    "list": ["llmcli list", "llmcli list --json"],
    "show": ["llmcli show deepseek-v3", "llmcli show deepseek-r1 --tp 8 --ep 8 --memory 141GB",
             "llmcli show demo-deepseek --experts-from stats.json --plan-memory 1MB"],
    "serve": ["llmcli serve qwen2.5-0.5b-instruct",
              "llmcli serve demo-qwen --port 8080 --api-key secret --max-batch 8"],
    "doctor": ["llmcli doctor", "llmcli doctor --json", "llmcli doctor --remeasure"],
}


def epilog(command: str) -> str | None:
    """The examples as a --help epilog (one per line, kept as written)."""
    lines = EXAMPLES.get(command)
    if not lines:
        return None
    return "Examples:\n\n" + "\n\n".join(f"  {line}" for line in lines)


def add_examples(app) -> None:
    """Give every registered command without an epilog its examples."""
    for info in app.registered_commands:
        name = info.name or (info.callback.__name__.removesuffix("_command") if info.callback else None)
        if info.epilog is None and name:
            info.epilog = epilog(name)
