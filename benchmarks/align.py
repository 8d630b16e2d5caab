"""Alignment speed: a DPO step (LoRA) against TRL's DPOTrainer, and GRPO rollouts against transformers' generate.

    python benchmarks/align.py [--model smollm2-135m-instruct] [--batch-size 8] [--steps 4] [--group-size 8]

Same weights (the packaged SmolLM2-135M-Instruct, exported once as a HF directory for the peers),
the same built-in preference pairs and task prompts, LoRA rank 8 / alpha 16 on every projection,
AdamW, bf16 autocast where the CPU runs bf16 natively (else fp32) on both sides. Each measurement
runs in a fresh process and reports the growth of peak resident memory (VmHWM) from before the
model is loaded.

* DPO: lmforge's ``DPOStage`` (reference = adapters off) one optimizer step at a time, against
  ``trl.DPOTrainer`` training on the same pairs (a PEFT model, reference = adapters off, as TRL does
  it); the median of ``--steps`` steps after one warm-up, timed by a trainer callback.
  Both sides run twice: with glibc's defaults, and with a fixed mmap threshold
  (``MALLOC_MMAP_THRESHOLD_``, what ``--release-memory`` sets in lmforge's process), which trades
  page faults for memory.
* GRPO rollouts: ``--batch-size`` / 2 prompts x ``--group-size`` sampled answers of up to
  ``--new-tokens`` tokens. lmforge: ``GRPOStage.sample`` (the batched engine); peer: what TRL's
  ``GRPOTrainer`` does without vLLM, ``generate`` of the PEFT model on the left-padded prompts,
  repeated ``group_size`` times, with sampling at temperature 1. Output tokens per second.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

CHILD = r"""
import json, statistics, sys, time
import torch
what, side, model_name, hf_path, batch, steps, group, new_tokens = sys.argv[1:9]
batch, steps, group, new_tokens = int(batch), int(steps), int(group), int(new_tokens)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

def rss(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

from lmforge.data.preferences import builtin_preferences
from lmforge.data.tasks import generate_tasks
from lmforge.runtime import Runtime
runtime = Runtime.resolve("cpu", "auto")
bf16 = runtime.dtype == torch.bfloat16
pairs = builtin_preferences(batch * (steps + 1), seed=0)
base = rss("VmRSS:")
torch.manual_seed(0)

if what == "dpo" and side == "lmforge":
    from lmforge.checkpoint import load_model, load_tokenizer
    from lmforge.peft import LoraConfig, apply_lora
    from lmforge.train.dpo import DPOStage, PreferenceRows
    model, tokenizer = load_model(hf_path), load_tokenizer(hf_path)
    apply_lora(model, LoraConfig(rank=8, alpha=16, targets=TARGETS))
    model.train()
    stage = DPOStage(PreferenceRows(tokenizer, pairs, 256), seed=0, beta=0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        with runtime.autocast():
            loss = stage.loss(model, stage.batch(step, 0, batch, batch, runtime.device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    print(json.dumps({"seconds": statistics.median(times[1:]), "peak": rss("VmHWM:") - base}))

elif what == "dpo":
    import datasets, peft, transformers, trl
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_path, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_path)
    rows = [{"prompt": p.prompt, "chosen": [{"role": "assistant", "content": p.chosen}],
             "rejected": [{"role": "assistant", "content": p.rejected}]} for p in pairs]
    times, marks = [], {}
    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            marks["start"] = time.perf_counter()
        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - marks["start"])
    import tempfile
    with tempfile.TemporaryDirectory() as out:
        config = trl.DPOConfig(output_dir=out, per_device_train_batch_size=batch, max_steps=steps + 1,
                               learning_rate=1e-5, beta=0.1, bf16=bf16, use_cpu=True, report_to=[],
                               logging_steps=1000, save_strategy="no", max_length=256, dataloader_num_workers=0)
        trainer = trl.DPOTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(rows),
                                 processing_class=tokenizer,
                                 peft_config=peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                             target_modules=TARGETS),
                                 callbacks=[Clock()])
        trainer.train()
    print(json.dumps({"seconds": statistics.median(times[1:]), "peak": rss("VmHWM:") - base}))

else:  # GRPO rollouts
    tasks = generate_tasks(max(1, batch // 2), seed=0)
    messages = [t.messages()[:-1] for t in tasks]
    if side == "lmforge":
        from lmforge.checkpoint import load_model, load_tokenizer
        from lmforge.peft import LoraConfig, apply_lora
        from lmforge.train.grpo import GRPOStage, RLPrompt
        model, tokenizer = load_model(hf_path), load_tokenizer(hf_path)
        apply_lora(model, LoraConfig(rank=8, alpha=16, targets=TARGETS))
        stage = GRPOStage([RLPrompt(m) for m in messages], lambda p, c, m: [0.0] * len(c), tokenizer, runtime, 0,
                          group_size=group, max_new_tokens=new_tokens)
        stage.sampler.stop_ids = []  # every answer runs to new_tokens, as on the peer's side
        def rollout(step):
            return sum(len(a) for a in stage.sample(model, list(range(len(messages))), step))
    else:
        import peft, transformers
        model = transformers.AutoModelForCausalLM.from_pretrained(hf_path, dtype=torch.bfloat16 if bf16 else torch.float32)
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
        tokenizer = transformers.AutoTokenizer.from_pretrained(hf_path, padding_side="left")
        texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]
        encoded = tokenizer([t for t in texts for _ in range(group)], return_tensors="pt", padding=True,
                            add_special_tokens=False)
        model.eval()
        def rollout(step):
            torch.manual_seed(step)
            with torch.no_grad():
                out = model.generate(**encoded, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                     max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                     pad_token_id=tokenizer.pad_token_id or 0)
            return (out.shape[1] - encoded["input_ids"].shape[1]) * out.shape[0]
    rollout(0)  # warm-up
    rates = []
    for step in range(1, steps + 1):
        start = time.perf_counter()
        tokens = rollout(step)
        rates.append(tokens / (time.perf_counter() - start))
    print(json.dumps({"tokens_per_second": statistics.median(rates), "peak": rss("VmHWM:") - base}))
"""


RELEASE = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}  # lmforge.runtime.return_freed_memory's setting


def run(what: str, side: str, args, hf_dir: Path, env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, what, side, args.model, str(hf_dir), str(args.batch_size),
                          str(args.steps), str(args.group_size), str(args.new_tokens)],
                         check=True, capture_output=True, text=True, env={**os.environ, **(env or {})}).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch-size", type=int, default=8, help="DPO pairs per step; GRPO prompts x 2")
    parser.add_argument("--steps", type=int, default=4, help="timed DPO steps / rollout rounds (after one warm-up)")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--only", choices=("dpo", "grpo"), help="run one of the two")
    args = parser.parse_args()

    from common import machine

    from lmforge.interop.convert import export_checkpoint

    print(f"machine: {machine()}")
    print(f"model: {args.model}; LoRA r=8 alpha=16 on all projections")
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = export_checkpoint(args.model, Path(tmp) / "hf")
        if args.only in (None, "dpo"):
            # glibc as it comes, then with a fixed mmap threshold (what `--release-memory` sets in lmforge's
            # process), given to both sides through glibc's environment variable
            for label, env in (("glibc defaults", None), ("MALLOC_MMAP_THRESHOLD_=1MiB", RELEASE)):
                ours, theirs = run("dpo", "lmforge", args, hf_dir, env), run("dpo", "trl", args, hf_dir, env)
                print(f"DPO step, {args.batch_size} pairs, {label}: lmforge {ours['seconds'] * 1000:.0f} ms (peak "
                      f"+{ours['peak'] / 1e6:.0f} MB), TRL DPOTrainer {theirs['seconds'] * 1000:.0f} ms (peak "
                      f"+{theirs['peak'] / 1e6:.0f} MB): {theirs['seconds'] / ours['seconds']:.2f}x faster, "
                      f"{ours['peak'] / theirs['peak']:.2f}x the memory", flush=True)
        if args.only in (None, "grpo"):
            ours, theirs = run("grpo", "lmforge", args, hf_dir), run("grpo", "transformers", args, hf_dir)
            answers = max(1, args.batch_size // 2) * args.group_size
            print(f"GRPO rollouts, {answers} answers x {args.new_tokens} tokens: lmforge engine "
                  f"{ours['tokens_per_second']:.0f} tok/s, transformers generate (TRL's path without vLLM) "
                  f"{theirs['tokens_per_second']:.0f} tok/s: {ours['tokens_per_second'] / theirs['tokens_per_second']:.2f}x")


if __name__ == "__main__":
    main()
