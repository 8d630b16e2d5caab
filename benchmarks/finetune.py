"""Fine-tuning step time and peak memory: full vs LoRA vs QLoRA in lmforge, and LoRA in Hugging Face PEFT.

    python benchmarks/finetune.py [--model smollm2-135m-instruct] [--batch-size 4] [--seq-len 256] [--steps 4]

The same weights (the packaged SmolLM2-135M-Instruct, exported once as a HF directory
for the peer), the same batch of token ids, LoRA rank 8 / alpha 16 on every attention
and MLP projection, AdamW. Each configuration runs in a fresh process: one warm-up
step, then the median of ``--steps`` timed steps (forward, backward, optimizer), and
the bytes of the prepared model's tensors (its weights at rest, 4-bit where quantized),
and the growth of peak resident memory (VmHWM) from just before the model is loaded
(weights, activations, gradients, optimizer state).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

CHILD = r"""
import json, statistics, sys, time
import torch
import torch.nn.functional as F
side, method, model_path, hf_path, batch, seq_len, steps = sys.argv[1:8]
batch, seq_len, steps = int(batch), int(seq_len), int(steps)
torch.manual_seed(0)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

def rss(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

if side == "transformers":
    import transformers, peft
else:
    from lmforge.checkpoint import load_model
    from lmforge.peft import LoraConfig, apply_lora
    from lmforge.quant import quantize_model_nf4
base = rss("VmRSS:")
if side == "transformers":
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_path, dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    forward = lambda ids: model(input_ids=ids).logits
else:
    model = load_model(hf_path)  # the same safetensors files the peer reads
    if method == "qlora":
        quantize_model_nf4(model)
    if method in ("lora", "qlora"):
        apply_lora(model, LoraConfig(rank=8, alpha=16, targets=TARGETS))
    forward = lambda ids: model(ids)
model.train()
tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}.values()
at_rest = sum(t.numel() * t.element_size() for t in tensors)  # what the weights take, quantized or not
vocab = model.config.vocab_size
ids = torch.randint(0, vocab, (batch, seq_len + 1))
params = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(params, lr=1e-4)
def step():
    logits = forward(ids[:, :-1])
    loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
step()
times = []
for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
print(json.dumps({"seconds": statistics.median(times), "peak": rss("VmHWM:") - base, "at_rest": at_rest,
                  "trainable": sum(p.numel() for p in params)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()

    from common import machine

    from lmforge.interop.convert import export_checkpoint

    print(f"machine: {machine()}")
    print(f"model: {args.model}, batch {args.batch_size} x {args.seq_len}, LoRA r=8 alpha=16 on all projections")
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = export_checkpoint(args.model, Path(tmp) / "hf")  # the same weights for the peer
        rows = []
        for side, method in (("lmforge", "full"), ("lmforge", "lora"), ("lmforge", "qlora"),
                             ("transformers", "lora")):
            out = subprocess.run([sys.executable, "-c", CHILD, side, method, args.model, str(hf_dir),
                                  str(args.batch_size), str(args.seq_len), str(args.steps)],
                                 check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            tokens = args.batch_size * args.seq_len
            rows.append((f"{side} {method}" + (" (PEFT)" if side == "transformers" else ""), r))
            print(f"{rows[-1][0]:>26}: {r['seconds'] * 1000:7.0f} ms/step ({tokens / r['seconds']:6.0f} tokens/s), "
                  f"weights {r['at_rest'] / 1e6:4.0f} MB, peak +{r['peak'] / 1e6:5.0f} MB, "
                  f"{r['trainable'] / 1e6:.2f}M trainable", flush=True)
    ours = dict(rows)["lmforge lora"]["seconds"]
    theirs = dict(rows)["transformers lora (PEFT)"]["seconds"]
    print(f"LoRA step: lmforge {ours * 1000:.0f} ms vs transformers + PEFT {theirs * 1000:.0f} ms: {theirs / ours:.2f}x")


if __name__ == "__main__":
    main()
