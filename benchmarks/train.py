"""Training throughput: lmforge vs transformers' LlamaForCausalLM, same shape, batch and weights.

    python benchmarks/train.py [--preset llama-42m] [--batch-size 8] [--seq-len 256] [--steps 10] [--compile]
                               [--device cuda]

Each side runs a full optimizer step (forward, backward, clipping, fused AdamW; lmforge's loss is
its pretraining stage's, transformers' cross entropy over its fp32 logits) in
each precision this machine runs natively (fp32 always; bf16 autocast over fp32
weights where the CPU has AVX-512 BF16 or AMX, or on a GPU: ``--device cuda``), with and
without torch.compile, the configurations' steps interleaved (each round times one step of
every configuration), medians. Prints tokens/s, MFU against the measured matmul peak of that
precision, and the ratio of the fastest configuration of each side.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import fast_dtypes, interleaved, llama_twin, logits_loss, machine, training_step  # noqa: E402

from lmforge.model import DecoderLM, preset, train_flops_per_token  # noqa: E402
from lmforge.runtime import Runtime, measure_matmul_peak  # noqa: E402
from lmforge.train.optim import build_optimizer  # noqa: E402
from lmforge.train.pretrain import PretrainStage  # noqa: E402


def make_step(model, optimizer, ids, hf: bool, runtime: Runtime):
    """transformers: its logits, then cross entropy over them in fp32 (as its own ``labels=`` loss does);
    lmforge: what ``lmforge pretrain`` runs, the pretraining stage's loss (the output layer folded in)."""
    inputs, targets = ids[:, :-1], ids[:, 1:]
    if hf:
        return training_step(model, optimizer, runtime, logits_loss(lambda: model(input_ids=inputs).logits, targets))
    batch = {"input_ids": inputs, "targets": targets}
    return training_step(model, optimizer, runtime, lambda: PretrainStage.loss(model, batch))


def synchronized(fn):
    def call():
        fn()
        torch.cuda.synchronize()
    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-42m")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration, interleaved")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile variants")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (fp32 there without TF32, and bf16)")
    args = parser.parse_args()

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    torch.manual_seed(0)
    config = preset(args.preset, max_seq_len=args.seq_len)
    ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len + 1)).to(device)
    tokens = args.batch_size * args.seq_len
    flops = train_flops_per_token(config, args.seq_len)
    print(f"machine: {machine()}")
    print(f"model: {args.preset}, {DecoderLM(config).num_parameters() / 1e6:.1f}M parameters, batch "
          f"{args.batch_size} x {args.seq_len}, {flops / 1e6:.0f} MFLOP per token trained")

    results = {}
    for dtype_name in ["fp32", "bf16"] if gpu else fast_dtypes():
        runtime = Runtime.resolve(args.device, dtype_name)
        peak = measure_matmul_peak(args.device, runtime.dtype, max_size=8192 if gpu else 2048)
        print(f"{dtype_name}: measured matmul peak {peak / 1e9:.0f} GFLOP/s")
        steps = {}
        for side, compiled in [("lmforge", False), ("transformers", False)] + \
                [("lmforge", True), ("transformers", True)] * args.compile:
            name = f"{side} {dtype_name}" + (" + compile" if compiled else "")
            torch.manual_seed(0)
            model = DecoderLM(config)
            hf = side == "transformers"
            if hf:
                model = llama_twin(model)
                model.config._attn_implementation = "sdpa"
            model.to(device).train()
            optimizer = build_optimizer(model, 1e-4, 0.1, (0.9, 0.95))  # same fused AdamW for both
            step = make_step(torch.compile(model) if compiled else model, optimizer, ids, hf, runtime)
            if gpu:  # a step's time is its kernels' time: wait for them
                step = synchronized(step)
            for _ in range(2):  # warmup (and compilation)
                step()
            steps[name] = step
        for name, (median, best) in interleaved(steps, args.steps).items():
            results[name] = tokens / median
            print(f"{name:>32}: {tokens / median:8,.0f} tokens/s (best {tokens / best:,.0f}), "
                  f"MFU {tokens / median * flops / peak:.1%}", flush=True)

    ours = max(v for k, v in results.items() if k.startswith("lmforge"))
    theirs = max(v for k, v in results.items() if k.startswith("transformers"))
    print(f"best lmforge / best transformers: {ours / theirs:.2f}x")


if __name__ == "__main__":
    main()
