"""prompts/s of `measure` (one forward pass, logits for the last position only) against a
generate()-based measurement like the reference tool's (generate(max_new_tokens=1,
output_hidden_states=True)), same model, same prompts, same batch size, in one run.

    python benchmarks/measure_bench.py [--model qwen2.5-coder-0.5b-instruct] [--prompts 64] [--batch-size 16]
"""
from __future__ import annotations

import argparse
import time

import torch

from rewriter.lab.measure import last_token_states
from rewriter.lab.models import batches, format_prompts, load_model
from rewriter.lab.prompts import default_prompts


def with_generate(lm, enc) -> torch.Tensor:
    with torch.inference_mode():
        out = lm.model.generate(**enc, max_new_tokens=1, do_sample=False, return_dict_in_generate=True,
                                output_hidden_states=True, pad_token_id=lm.tokenizer.pad_token_id)
    return torch.stack([h[:, -1, :] for h in out.hidden_states[0][: lm.num_layers]], dim=1).float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    lm = load_model(args.model, progress=False)
    prompts = (default_prompts("harmful-measure") + default_prompts("harmless-measure"))[: args.prompts]
    texts = format_prompts(lm.tokenizer, prompts, True, None)
    results = {}
    for name, fn in (("measure (forward)", last_token_states), ("generate(max_new_tokens=1)", with_generate)):
        fn(lm, next(batches(lm, texts[:2], 2, True))[1])  # warm-up
        start = time.monotonic()
        states = [fn(lm, enc) for _, enc in batches(lm, texts, args.batch_size, True)]
        seconds = time.monotonic() - start
        results[name] = (len(texts) / seconds, torch.cat(states))
        print(f"{name:<28} {len(texts)} prompts in {seconds:6.1f} s = {len(texts) / seconds:6.2f} prompts/s", flush=True)
    (fast, a), (slow, b) = results.values()
    print(f"ratio: measure is {fast / slow:.2f}x the generate()-based rate; "
          f"max |difference| of the residuals: {float((a - b).abs().max()):.2e} (relative {float((a - b).norm() / b.norm()):.1e})")


if __name__ == "__main__":
    main()
