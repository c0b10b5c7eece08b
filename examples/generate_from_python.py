"""Use llmcli as a library: resolve a model, load it and stream a greedy reply.

    python examples/generate_from_python.py [MODEL] [PROMPT]

Without arguments it uses the built-in demo model (random weights, so the text is gibberish).
"""

import sys

from llmcli.generate import Generation, SamplingParams
from llmcli.hub import resolve
from llmcli.loader import load_model

name = sys.argv[1] if len(sys.argv) > 1 else None
prompt = sys.argv[2] if len(sys.argv) > 2 else "Explain rotary position embeddings in one sentence."

resolved = resolve(name)
loaded = load_model(resolved.name, resolved.path, device="auto", dtype="auto")
tok = loaded.tokenizer
text = tok.apply_chat_template([{"role": "user", "content": prompt}]) if tok.chat_template else prompt

generation = Generation(loaded.runner, tok, tok.encode(text), max_new_tokens=32,
                        sampling=SamplingParams(temperature=0.0), stop_ids=loaded.config.eos_token_ids)
for piece in generation:
    print(piece, end="", flush=True)
result = generation.result
print(f"\n[{len(result.token_ids)} tokens, {result.decode_tokens_per_s:.1f} tok/s, {result.finish_reason}]")
