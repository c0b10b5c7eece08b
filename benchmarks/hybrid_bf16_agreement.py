"""bfloat16 top-1 agreement of the hybrid Qwens (Qwen3.5, Qwen3-Next, Qwen3.5-MoE): llmcli in bfloat16 against
transformers in float32 and in bfloat16, over every position of a few random prompts, on the tiny random
checkpoints the parity tests build (tests/test_qwen_hybrid.py). Random weights give small logit margins, so
this is a floor: a trained model's top-1 is far better separated.

    python benchmarks/hybrid_bf16_agreement.py [--prompts 4] [--length 96]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from llmcli.loader import load_model
from tests.test_qwen_hybrid import BUILDERS, TEXT, build_reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--length", type=int, default=96)
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, TEXT["vocab_size"], (args.prompts, args.length), generator=gen)
    print(f"{'model':12} {'vs fp32 ref':>12} {'vs bf16 ref':>12} {'fp32 vs fp32':>13}  ({ids.numel()} positions)")
    for kind in sorted(BUILDERS):
        with tempfile.TemporaryDirectory() as tmp:
            reference = build_reference(kind, Path(tmp))
            with torch.inference_mode():
                ref32 = reference(input_ids=ids).logits.argmax(-1)
                ref16 = reference.to(torch.bfloat16)(input_ids=ids).logits.argmax(-1)
            ours = {}
            for dtype in ("bfloat16", "float32"):
                runner = load_model(kind, tmp, device="cpu", dtype=dtype).runner
                with torch.inference_mode():
                    ours[dtype] = runner(ids, runner.make_cache(args.prompts, args.length)).argmax(-1)
        agree = [(ours["bfloat16"] == ref32).float().mean(), (ours["bfloat16"] == ref16).float().mean(),
                 (ours["float32"] == ref32).float().mean()]
        print(f"{kind:12} {agree[0]:12.1%} {agree[1]:12.1%} {agree[2]:13.1%}")


if __name__ == "__main__":
    main()
