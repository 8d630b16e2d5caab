"""Speculative and prompt-lookup decoding against plain decoding: ms per token and the same output.

One model (``--model``, SmolLM2-135M-Instruct by default), greedy, at batch 1, on chat
prompts built from paragraphs of the language reference that every Python has:

- ``summarize``: "Summarize the following text in two or three sentences." (a summary
  reuses phrases of its text, the case prompt lookup is for);
- ``repeat``: "Copy the following text exactly." (the output is the input: the best case).

Variants, each over the same prompts, run interleaved prompt by prompt:

- ``plain``: one forward pass per token (the Python API's one-sequence loop, or with
  ``--engine`` the batched engine's one-token steps);
- ``lookup``: prompt-lookup decoding (n-grams of 3, then fewer; ``--draft-tokens`` guesses);
- ``self-draft N``: the model's own first N layers guess (``--draft-layers``);
- ``draft``: a smaller model with the same tokenizer guesses (``--draft DIR``, e.g. one that
  ``lmforge distill`` trained for this model), alone and after prompt lookup (lookup's guesses
  where its 2- or 3-grams match, the draft's elsewhere).

The speculative variants run in the batched engine at batch 1 (the Python API's path for
them too): steps of 1 + k tokens that check the guesses, compiled with ``--compile``.

ms/token = wall time / new tokens over all prompts (the prompt's prefill included); decode
ms/token the same after each prompt's first token; "same output" counts the prompts whose
output equals the plain one token for token: all of them in fp32, and in bf16 with
``--engine`` (a check's rows then give the engine's one-token steps' logits to the bit,
eager or compiled); without it plain bf16 decoding runs the one-sequence loop, which
rounds otherwise than the engine's steps, and a near-tie between two tokens can go the
other way (docs/QUANTIZATION.md).

    python benchmarks/speculative.py
    python benchmarks/speculative.py --tasks repeat --prompts 4 --draft-tokens 4 8
    python benchmarks/speculative.py --engine --compile --dtype fp32 --weights fp16 --draft-layers
    python benchmarks/speculative.py --engine --compile --dtype bf16 --draft-layers --draft runs/draft/model
    python benchmarks/speculative.py --engine --compile --compile-prefill --dtype bf16 --draft-layers --draft-tokens 3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

from lmforge.api import load, load_draft
from lmforge.infer.engine import Engine
from lmforge.infer.request import Request
from lmforge.infer.speculative import DraftModel, FirstGuesses, PromptLookup, SpeculativeStats

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
    parser.add_argument("--weights", default="fp32", help="fp32, or fp16/bf16 weights with fp32 arithmetic")
    parser.add_argument("--engine", action="store_true", help="plain decoding through the batched engine too "
                        "(batch 1; default: the Python API's, one KV cache, the speculative variants in the engine)")
    parser.add_argument("--compile", action="store_true", help="the compiled decode step, for plain steps (B, 1) "
                        "and speculative ones (B, 1 + k) alike")
    parser.add_argument("--compile-prefill", action="store_true", help="with --compile, the engine's prompt passes "
                        "compiled too (as `lmforge serve --compile-prefill`): every variant prefills the same way")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--prompts", type=int, default=6, help="paragraphs per task")
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--draft-tokens", type=int, nargs="+", default=[4], help="guesses per pass to try")
    parser.add_argument("--draft-layers", type=int, nargs="*", default=[8], help="self-draft depths to try")
    parser.add_argument("--min-ngram", type=int, nargs="+", default=[1], help="prompt lookup's shortest n-grams to try")
    parser.add_argument("--draft", nargs="*", default=[], metavar="DIR", help="draft models to try (the same "
                        "tokenizer as --model: `lmforge distill` makes one)")
    args = parser.parse_args()
    lm = load(args.model, device="cpu", dtype=args.dtype, weights=args.weights, compile=args.compile, autotune=False,
              compile_prefill=args.compile_prefill)
    path = ("engine" if args.engine else "Python API") + (", compiled step" if args.compile else ", eager") + \
        (" and prefill" if args.compile_prefill else "")
    print(f"machine: {machine()}; {args.model} ({lm.model.num_parameters() / 1e6:.0f}M parameters, "
          f"{lm.model.config.num_layers} layers, {next(lm.model.parameters()).dtype}, weights {args.weights}), "
          f"greedy, at most {args.new_tokens} new tokens, batch 1, {path}")
    drafts = {path: load_draft(path, lm.tokenizer, args.model, device="cpu", dtype=args.dtype, weights=args.weights,
                               compile=args.compile, autotune=False) for path in args.draft}
    drafters = {"plain": None}
    for k in args.draft_tokens:
        for low in args.min_ngram:
            drafters[f"lookup {low}-3-grams, {k} guesses"] = (PromptLookup(ngram=3, min_ngram=low), k)
        for layers in args.draft_layers:
            drafters[f"self-draft {layers} layers, {k} guesses"] = (DraftModel.first_layers(lm.model, layers), k)
        for path, draft in drafts.items():
            drafters[f"draft {path} ({draft.model.num_parameters() / 1e6:.1f}M), {k} guesses"] = (draft, k)
            drafters[f"lookup 2-3-grams, else the draft, {k} guesses"] = \
                (FirstGuesses([PromptLookup(ngram=3, min_ngram=2), draft]), k)
    texts = paragraphs(args.prompts)
    # no prefix cache: every variant prefills its prompt, as plain decoding through the Python API does
    engine = lm.engine(1, prefix_caching=False)
    seconds = sum(engine.warm_up(draft_tokens=k) for k in sorted(set(args.draft_tokens)))
    if args.compile:
        seconds += lm.decode_step.warm_up() + sum(draft.decode_step.warm_up() for draft in drafts.values())
        print(f"warm-up (compiling) {seconds:.0f} s")
    lm.generate("warm-up", max_new_tokens=4, temperature=0)
    print("\n| task | variant | new tokens | ms/token | speed-up | decode ms/token | speed-up | guesses kept | "
          "tokens/pass | same output (prompts) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for task in args.tasks:
        seconds, prefill = dict.fromkeys(drafters, 0.0), dict.fromkeys(drafters, 0.0)
        outputs = {name: [] for name in drafters}
        stats = {name: SpeculativeStats() for name in drafters}
        for text in texts:
            messages = [{"role": "user", "content": TASKS[task].format(text=text)}]
            for name, drafter in drafters.items():
                start = time.perf_counter()
                if drafter is None and not args.engine:
                    reply, first = direct_reply(lm, messages, args.new_tokens)
                else:
                    reply, first = engine_reply(lm, engine, messages, args.new_tokens, drafter, stats[name])
                seconds[name] += time.perf_counter() - start
                prefill[name] += first
                outputs[name].append(reply)
        tokens = sum(map(len, outputs["plain"]))
        base = seconds["plain"] / tokens
        base_decode = (seconds["plain"] - prefill["plain"]) / (tokens - len(texts))
        for name in drafters:
            count = sum(map(len, outputs[name]))
            ms = seconds[name] / count * 1000
            decode = (seconds[name] - prefill[name]) / (count - len(texts)) * 1000  # after each first token
            s = stats[name]
            kept = f"{s.acceptance:.0%}" if s.drafted else ""
            per_pass = f"{s.tokens_per_pass:.2f}" if s.passes else "1.00"
            same = f"{sum(a == b for a, b in zip(outputs[name], outputs['plain']))} of {len(texts)}"
            print(f"| {task} | {name} | {count} | {ms:.1f} | {base * 1000 / ms:.2f}x | {decode:.1f} | "
                  f"{base_decode * 1000 / decode:.2f}x | {kept} | {per_pass} | {same} |", flush=True)


def engine_reply(lm, engine: Engine, messages: list[dict], new_tokens: int, drafter,
                 stats: SpeculativeStats) -> tuple[list[int], float]:
    """The reply's token ids from the engine at batch 1 (``lm.run_request``, the Python API's path for a
    drafter), and the seconds to its first token (the prefill); ``stats`` gains its passes and guesses."""
    config = lm.sampling_config(**lm.chat_sampling({"temperature": 0.0, "max_new_tokens": new_tokens}))
    guesser, k = drafter or (None, 4)
    lm.speculative_stats = stats
    start, tokens, first = time.perf_counter(), [], None
    request = Request(lm.chat_prompt(messages), config, drafter=guesser and guesser.fork(), draft_tokens=k,
                      decode=lm.reply_text)
    for token in lm.run_request(engine, request):
        tokens.append(token)
        first = first or time.perf_counter() - start
    return tokens, first or 0.0


def direct_reply(lm, messages: list[dict], new_tokens: int) -> tuple[list[int], float]:
    """The reply's token ids from ``lm.new_tokens`` (plain decoding: one KV cache, one token a pass), and the
    seconds to its first token."""
    config = lm.sampling_config(**lm.chat_sampling({"temperature": 0.0, "max_new_tokens": new_tokens}))
    start, tokens, first = time.perf_counter(), [], None
    for token in lm.new_tokens(lm.chat_prompt(messages), config):
        tokens.append(token)
        first = first or time.perf_counter() - start
    return tokens, first or 0.0


if __name__ == "__main__":
    main()
