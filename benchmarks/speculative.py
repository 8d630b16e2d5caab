"""Speculative and prompt-lookup decoding against plain decoding: ms per token and the same output.

One model (``--model``, SmolLM2-135M-Instruct by default), greedy, at batch 1, on chat
prompts built from paragraphs of the language reference that every Python has:

- ``summarize``: "Summarize the following text in two or three sentences." (a summary
  reuses phrases of its text, the case prompt lookup is for);
- ``repeat``: "Copy the following text exactly." (the output is the input: the best case).

Variants, each over the same prompts, run interleaved prompt by prompt:

- ``plain``: one forward pass per token (eager, as the speculative ones);
- ``lookup``: prompt-lookup decoding (n-grams of 3, then fewer; ``--draft-tokens`` guesses);
- ``self-draft N``: the model's own first N layers guess (``--draft-layers``).

ms/token = wall time / new tokens over all prompts; "same output" counts the prompts whose
output equals the plain one token for token: all of them in fp32; in bf16 the verifying
pass over several tokens rounds differently from a one-token step, and a near-tie
between two tokens can go the other way (docs/QUANTIZATION.md).

    python benchmarks/speculative.py
    python benchmarks/speculative.py --tasks repeat --prompts 4 --draft-tokens 4 8
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

from lmforge.api import load
from lmforge.infer.speculative import DraftModel, PromptLookup, SpeculativeStats

TASKS = {"summarize": "Summarize the following text in two or three sentences.\n\n{text}",
         "repeat": "Copy the following text exactly.\n\n{text}"}


def paragraphs(count: int, low: int = 300, high: int = 700) -> list[str]:
    from pydoc_data.topics import topics

    found = [p.strip() for name in sorted(topics) for p in topics[name].split("\n\n")
             if low <= len(p.strip()) <= high and "::=" not in p and not p.startswith(" ")]
    step = max(1, len(found) // count)
    return found[::step][:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--prompts", type=int, default=6, help="paragraphs per task")
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--draft-tokens", type=int, nargs="+", default=[4], help="guesses per pass to try")
    parser.add_argument("--draft-layers", type=int, nargs="*", default=[8], help="self-draft depths to try")
    parser.add_argument("--min-ngram", type=int, nargs="+", default=[1], help="prompt lookup's shortest n-grams to try")
    args = parser.parse_args()
    lm = load(args.model, device="cpu", dtype=args.dtype)
    print(f"machine: {machine()}; {args.model} ({lm.model.num_parameters() / 1e6:.0f}M parameters, "
          f"{lm.model.config.num_layers} layers, {next(lm.model.parameters()).dtype}), greedy, "
          f"at most {args.new_tokens} new tokens, batch 1")
    drafters = {"plain": None}
    for k in args.draft_tokens:
        for low in args.min_ngram:
            drafters[f"lookup {low}-3-grams, {k} guesses"] = (PromptLookup(ngram=3, min_ngram=low), k)
        for layers in args.draft_layers:
            drafters[f"self-draft {layers} layers, {k} guesses"] = (DraftModel.first_layers(lm.model, layers), k)
    texts = paragraphs(args.prompts)
    lm.generate("warm-up", max_new_tokens=4, temperature=0)
    print("\n| task | variant | new tokens | ms/token | speed-up | guesses kept | tokens/pass | same output (prompts) |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for task in args.tasks:
        seconds = dict.fromkeys(drafters, 0.0)
        outputs = {name: [] for name in drafters}
        stats = {name: SpeculativeStats() for name in drafters}
        for text in texts:
            messages = [{"role": "user", "content": TASKS[task].format(text=text)}]
            for name, drafter in drafters.items():
                lm.drafter, lm.draft_tokens = (drafter or (None, 4))
                lm.speculative_stats = stats[name]
                start = time.perf_counter()
                reply = lm.chat(messages, temperature=0.0, max_new_tokens=args.new_tokens)
                seconds[name] += time.perf_counter() - start
                outputs[name].append(lm.tokenizer.encode(reply))
        lm.drafter = None
        tokens = sum(map(len, outputs["plain"]))
        base = seconds["plain"] / tokens
        for name in drafters:
            count = sum(map(len, outputs[name]))
            ms = seconds[name] / count * 1000
            s = stats[name]
            kept = f"{s.acceptance:.0%}" if s.drafted else ""
            per_pass = f"{s.tokens_per_pass:.2f}" if s.passes else "1.00"
            same = f"{sum(a == b for a, b in zip(outputs[name], outputs['plain']))} of {len(texts)}"
            print(f"| {task} | {name} | {count} | {ms:.1f} | {base * 1000 / ms:.2f}x | {kept} | {per_pass} | {same} |",
                  flush=True)


if __name__ == "__main__":
    main()
