"""QAT against PTQ: continue training a model in float and with QAT int4, then compare their int4 checkpoints.

SmolLM2-135M-Instruct (by default) trains ``--steps`` more steps on the speedrun's corpus
(``runs/speedrun/data``: run ``lmforge speedrun`` first), once in float and once with
quantization-aware training (int4, zero point, groups of 32: ``--qat int4``). Each run is
then quantized the same way, and bits per byte on the first 20,000 characters of the
language reference is printed for its float and its int4 weights.

    python benchmarks/qat.py --steps 60 --runs float qat

The base model's own PTQ for the first row of the table: ``lmforge quantize
smollm2-135m-instruct --out DIR --bits 4 --scheme asymmetric --granularity group --group-size 32``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

from lmforge.checkpoint import load_model, load_tokenizer
from lmforge.quant.ptq import quantize_checkpoint
from lmforge.quant.qat import prepare_qat, qat_spec
from lmforge.train import PretrainStage, TrainConfig, fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", default="runs/speedrun/data/train.jsonl")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--runs", nargs="+", default=["float", "qat"], choices=["float", "qat"])
    parser.add_argument("--out", default="runs/qat-bench")
    args = parser.parse_args()
    print(f"machine: {machine()}; {args.model}, {args.steps} steps of batch 4 x 256 tokens, lr 2e-5")
    tokenizer = load_tokenizer(args.model)
    ids: list[int] = []
    with open(args.data, encoding="utf-8") as f:
        for line in list(f)[:3000]:
            ids += tokenizer.encode(json.loads(line)["text"]) + [tokenizer.eos_id]
    tokens = np.array(ids, dtype=np.int64)
    spec = qat_spec("int4")
    for run in args.runs:
        torch.manual_seed(0)
        model = load_model(args.model)
        if run == "qat":
            prepare_qat(model, spec)
        config = TrainConfig(out_dir=f"{args.out}/{run}", batch_size=4, seq_len=256, max_steps=args.steps, lr=2e-5,
                             warmup_steps=5, eval_every=10**6, save_every=10**6, log_every=5, progress=False, seed=3,
                             weight_decay=0.0)
        start = time.perf_counter()
        result = fit(model, PretrainStage(tokens, 256, 3), config, tokenizer=tokenizer)
        report = quantize_checkpoint(result.checkpoint, f"{args.out}/{run}-int4", spec)
        print(f"{run}: {result.steps} steps in {time.perf_counter() - start:.0f} s; bits per byte: float weights "
              f"{report.bpb_before:.4f}, int4 {report.bpb_after:.4f}", flush=True)


if __name__ == "__main__":
    main()
