"""The speedrun's report.md: corpus, tokenizer, model, training figures, samples, plots."""

from __future__ import annotations

from pathlib import Path

from lmforge.files import write_text_atomic
from lmforge.runtime import describe_machine
from lmforge.train.metrics import read_metrics


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def _plot_throughput(metrics_path: Path, png: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(metrics_path) if r.get("kind") == "train"]
    if len(rows) < 2:
        return None
    fig, ax = plt.subplots(figsize=(7, 3), dpi=110)
    ax.plot([r["tokens"] for r in rows], [r["tokens_per_second"] for r in rows])
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("tokens / s")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png


def write_report(run: Path, s: dict) -> Path:
    """Write ``run/report.md`` from the speedrun summary ``s``; returns its path."""
    m, tr, mod = s["manifest"], s["training"], s["model"]
    kept = m.get("splits", {})
    dropped = {**m.get("dropped", {}), **m.get("errors", {})}
    shards = s["shards"]["splits"]
    throughput = _plot_throughput(run / "train" / "metrics.jsonl", run / "throughput.png")
    lines = [
        f"# lmforge speedrun: {s['config']['name']}",
        "",
        f"Machine: {describe_machine()}; runtime {s['runtime']}.",
        f"Total wall time: **{s['total_seconds'] / 60:.1f} min** "
        f"({', '.join(f'{k} {v:.0f}s' for k, v in s['timings'].items())}).",
        "",
        "## Corpus",
        "",
        f"{m.get('documents_read', '?')} documents read, {m.get('documents_kept', '?')} kept "
        f"({m.get('documents_chunked', 0)} long ones split into chunks).",
        "",
        "| split | records | bytes |",
        "|---|---|---|",
    ]
    for split in ("train", "val"):
        info = kept.get(split, {})
        lines.append(f"| {split} | {info.get('records', '?')} | {_mb(info.get('bytes', 0))} |")
    lines += ["", "Dropped: " + (", ".join(f"{k} {v}" for k, v in sorted(dropped.items()) if v) or "none")]
    lines += [
        "",
        "## Tokenizer",
        "",
        f"Byte-level BPE, vocabulary {s['tokenizer']['vocab_size']}, "
        f"**{s['tokenizer']['bytes_per_token_val']:.2f} bytes per token** on the validation text. "
        f"Train shard: {shards['train']['num_tokens']:,} tokens; validation: {shards['val']['num_tokens']:,} tokens.",
        "",
        "## Model",
        "",
        f"{mod['parameters'] / 1e6:.2f}M parameters ({mod['non_embedding_parameters'] / 1e6:.2f}M without embeddings).",
        "",
        "| field | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in mod["config"].items()]
    lines += [
        "",
        "## Training",
        "",
        f"- steps: {tr['steps']}, tokens seen: **{tr['tokens']:,}**",
        f"- training time: {tr['seconds'] / 60:.1f} min, **{tr['tokens_per_second']:,.0f} tokens/s** on average "
        f"({tr['last_window_tokens_per_second']:,.0f} in the last logging window)",
        f"- MFU: **{tr['mfu']:.1%}** of the measured matmul peak of {tr['peak_flops'] / 1e9:.0f} GFLOP/s",
        "",
        "![loss](train/loss.png)",
        "",
    ]
    if throughput:
        lines += ["![throughput](throughput.png)", ""]
    fe = s["final_eval"]
    if fe:
        lines += ["## Evaluation", "",
                  f"Over the first {s.get('final_eval_tokens', 0):,} of the {shards['val']['num_tokens']:,} "
                  "validation tokens; the validation points of the loss curve use fewer, so they differ.", "",
                  f"- validation loss: **{fe['val_loss']:.4f}** nats/token",
                  f"- bits per byte: **{fe.get('val_bpb', float('nan')):.4f}**", ""]
    if s.get("sft"):
        lines += _sft_section(s["sft"], fe)
    if s.get("align"):
        lines += _align_section(s["align"])
    if s.get("leaderboard"):
        lines += _leaderboard_section(s["leaderboard"], s["config"])
    lines += ["## Samples", "", "Sampled at temperature 0.8, top-k 50, seed 0.", ""]
    for sample in s["samples"]:
        lines += [f"**Prompt** `{sample['prompt']!r}`", "", "```", sample["prompt"] + sample["completion"], "```", ""]
    path = run / "report.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def _leaderboard_section(board: dict, config: dict) -> list[str]:
    """The base and chat models' `lmforge eval` scores (zero-shot), as they joined the leaderboard."""
    lines = ["## On the leaderboard", "",
             f"`lmforge eval`, zero-shot, {config['leaderboard_items']} items per task; full results in "
             f"eval/base and eval/chat, all runs in `lmforge leaderboard --db {config['runs_dir']}/leaderboard.sqlite`.",
             "", "| model | task | metric | value |", "|---|---|---|---:|"]
    main = ("acc", "exact_match_flexible", "bits_per_byte")
    for role, tasks in board.items():
        for task, strategies in tasks.items():
            for metric, value in strategies.get("zero", {}).items():
                if metric in main:
                    lines.append(f"| {role} | {task} | {metric} | {value:.4f} |")
    return lines + [""]


def _align_section(align: dict) -> list[str]:
    """Chat vs aligned accuracy on the held-out tasks, with the paired gain, and the training curves."""
    method, config = align["method"], align["config"]
    before, after, gain = align["task_accuracy_before"], align["task_accuracy_after"], align["task_accuracy_gain"]
    if method == "grpo":
        what = (f"GRPO ({align['prompts']:,} task prompts, {config['group_size']} sampled answers each, reward 1 "
                f"when the tasks' checker accepts the answer, KL penalty {config['beta']} to the chat model)")
        curves = "Mean reward, KL to the chat model, entropy and the share of groups whose answers all got " \
                 "one reward, per step:"
    else:
        what = f"DPO on {align['train_pairs']:,} built-in preference pairs (beta {config['beta']})"
        curves = "Implicit rewards of the chosen and rejected answers, and their margin, per step:"
    lines = ["## From assistant to aligned model", "",
             f"{what}; full fine-tuning, {align['steps']} steps in {align['seconds'] / 60:.1f} min. Exact match "
             f"on {align['held_out_tasks']} held-out tasks, greedy replies:", "",
             "| task | chat model | aligned model |", "|---|---:|---:|"]
    for kind in after["accuracy"]:
        lines.append(f"| {kind} | {before['accuracy'][kind]:.0%} | {after['accuracy'][kind]:.0%} |")
    low, high = gain["ci95"]
    lines += ["", f"Gain over all held-out tasks: **{gain['gain']:+.1%}** (95% interval {low:+.1%} to {high:+.1%}, "
                  "paired over the same tasks).", "", curves, "", "![alignment curves](align/rewards.png)", ""]
    return lines


def _sft_section(sft: dict, base_eval: dict) -> list[str]:
    """Base vs chat accuracy on held-out tasks, what tuning cost the base skill, sample conversations."""
    before, after = sft["task_accuracy_before"], sft["task_accuracy_after"]
    lines = ["## From base model to assistant (instruction fine-tuning)", "",
             f"Full fine-tuning on {sft['train_conversations']:,} built-in task conversations "
             f"({sft['steps']} steps, {sft['seconds'] / 60:.1f} min), loss on the answers only. "
             f"Accuracy by exact match on {sft['config']['eval_tasks']} held-out tasks (no prompt shared "
             "with training), greedy replies:", "",
             "| task | base model | chat model |", "|---|---:|---:|"]
    for kind in after["accuracy"]:
        lines.append(f"| {kind} | {before['accuracy'][kind]:.0%} | {after['accuracy'][kind]:.0%} |")
    forgetting = sft.get("pretrain_val_after_sft") or {}
    if forgetting and base_eval:
        lines += ["", f"Pretraining validation loss before tuning {base_eval['val_loss']:.4f}, after "
                      f"{forgetting['val_loss']:.4f} nats/token (bits per byte {base_eval.get('val_bpb', float('nan')):.4f}"
                      f" -> {forgetting.get('val_bpb', float('nan')):.4f}): what tuning cost the base skill "
                      "(catastrophic forgetting)."]
    lines += ["", "![sft loss](sft/loss.png)", "", "Sample conversations (held-out tasks):", ""]
    for base_example, chat_example in zip(before["examples"], after["examples"]):
        lines += [f"- **user**: {chat_example['prompt']}  ",
                  f"  expected `{chat_example['expected']}`; base model `{base_example['reply'][:80]!r}`; "
                  f"chat model `{chat_example['reply'][:80]!r}`"]
    return lines + [""]
