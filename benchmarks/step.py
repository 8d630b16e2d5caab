"""The cost of one batched-engine decode step, by width: 1 token a row (plain decoding) or 1 + k
(a speculative step checking k guesses), for each weight storage, eager or compiled.

A speculative step pays off when checking k guesses costs little more than making one token:
this prints both, side by side, for the same model and cache length. No peer: the question
is lmforge's own ratio (llama.cpp's speed is in benchmarks/decode.py).

    python benchmarks/step.py                                   # SmolLM2-135M, fp32 and fp16 weights, eager
    python benchmarks/step.py --weights fp16 --compile --widths 1 4 5
    python benchmarks/step.py --dtype bf16 --weights fp32 --batch 16 --compile   # AMX / AVX-512 BF16 CPUs
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

from lmforge.api import load  # noqa: E402
from lmforge.infer.engine import Engine  # noqa: E402
from lmforge.infer.slot_cache import attention_mask  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--weights", nargs="+", default=["fp32", "fp16"],
                        help="weight storages to compare (16-bit storage needs --dtype fp32; with --dtype bf16 "
                             "give fp32: the weights are then bf16)")
    parser.add_argument("--dtype", default="fp32", help="compute dtype (fp32, bf16, auto)")
    parser.add_argument("--compile", action="store_true", help="the compiled decode step")
    parser.add_argument("--widths", type=int, nargs="+", default=[1, 5], help="tokens per row in a step")
    parser.add_argument("--batch", type=int, default=1, help="rows per step")
    parser.add_argument("--positions", type=int, default=200, help="cache length the step attends over")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per width (median reported)")
    args = parser.parse_args()
    print(f"machine: {machine()}; {args.model}, batch {args.batch}, {args.positions} cached positions, "
          f"{args.dtype} arithmetic, {'compiled' if args.compile else 'eager'}")
    print("\n| weights | " + " | ".join(f"width {w} (ms)" for w in args.widths) + " | "
          + " | ".join(f"width {w} / width {args.widths[0]}" for w in args.widths[1:]) + " |")
    print("|---|" + "---:|" * (2 * len(args.widths) - 1))
    for weights in args.weights:
        lm = load(args.model, device="cpu", dtype=args.dtype, weights=weights, compile=args.compile, autotune=False)
        engine = Engine(lm.model, lm.runtime, max_batch_size=args.batch, decode_step=lm.decode_step,
                        context=args.positions + max(args.widths) + 1)
        for width in args.widths:
            engine.warm_up(draft_tokens=width - 1)
        step = engine.decode_step or engine.model
        times = {}
        with torch.inference_mode():
            for width in args.widths:
                ids = torch.randint(0, 1000, (args.batch, width))
                positions = torch.arange(args.positions, args.positions + width).repeat(args.batch, 1)
                mask = attention_mask(positions, args.positions + width)
                engine.cache.bind(positions.clone(), args.positions + width)
                samples = []
                for i in range(args.repeats + 2):  # two untimed
                    start = time.perf_counter()
                    step(ids, engine.cache, positions=positions, mask=mask)
                    if i >= 2:
                        samples.append(time.perf_counter() - start)
                times[width] = statistics.median(samples) * 1000
        base = times[args.widths[0]]
        print(f"| {weights} | " + " | ".join(f"{times[w]:.1f}" for w in args.widths) + " | "
              + " | ".join(f"{times[w] / base:.2f}x" for w in args.widths[1:]) + " |", flush=True)


if __name__ == "__main__":
    main()
