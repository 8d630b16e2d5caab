"""`lmforge dpo` end to end on a tiny checkpoint: outputs, figures, held-out accuracy, errors and exact resume."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.checkpoint import load_model, save_checkpoint
from lmforge.cli import main
from lmforge.data.preferences import builtin_preferences, write_preferences
from lmforge.model import DecoderLM, preset
from lmforge.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    pairs = builtin_preferences(200, seed=1)
    tokenizer = train_tokenizer([p.prompt[0]["content"] + " " + p.chosen + " " + p.rejected for p in pairs], 300,
                                progress=False)
    torch.manual_seed(0)
    save_checkpoint(root / "base", DecoderLM(preset("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=128)),
                    tokenizer)
    write_preferences(pairs[:40], root / "pairs.jsonl")
    return root


def args(base, out, *extra):
    return ["dpo", "--model", str(base / "base"), "--out-dir", str(out), "--batch-size", "4", "--seq-len", "64",
            "--eval-every", "0", "--device", "cpu", "--dtype", "fp32", "--progress", "false", "--log-every", "1",
            *extra]


def test_dpo_writes_the_aligned_model_figures_and_accuracy(base, capsys):
    out = base / "lora"
    assert main(args(base, out, "--pairs", "60", "--kinds", "max", "add", "--eval-tasks", "12", "--max-steps", "4",
                     "--lr", "1e-2")) == 0
    printed = capsys.readouterr().out
    assert "held-out task accuracy (12 tasks)" in printed and "chosen wins" in printed and "95% CI" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["train_pairs"] + summary["val_pairs"] == 60
    assert set(summary["task_accuracy_after"]["accuracy"]) == {"max", "add", "all"}
    assert summary["task_accuracy_gain"]["tasks"] == 12
    assert {"val_loss", "val_rewards/accuracies", "val_rewards/margins"} <= set(summary["final"])
    assert (out / "rewards.png").is_file() and (out / "adapter" / "adapter_config.json").is_file()
    aligned, start = load_model(out / "model"), load_model(base / "base")
    assert not hasattr(aligned.blocks[0].attn.q_proj, "lora_A")  # merged into plain weights
    assert not torch.equal(aligned.blocks[0].attn.q_proj.weight, start.blocks[0].attn.q_proj.weight)


def test_dpo_full_on_a_file_and_clear_errors(base, capsys):
    out = base / "full"
    assert main(args(base, out, "--data", str(base / "pairs.jsonl"), "--method", "full", "--loss", "ipo",
                     "--max-steps", "2")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task_accuracy_before"] is None and summary["read"][str(base / "pairs.jsonl")]["read"] == 40
    assert main(args(base, base / "bad", "--loss", "hinge")) == 2
    assert "choose one of sigmoid, ipo, simpo" in capsys.readouterr().err
    assert main(args(base, base / "bad", "--loss", "ipo", "--label-smoothing", "0.1")) == 2
    assert "label_smoothing" in capsys.readouterr().err


def test_a_resumed_dpo_run_continues_the_same_losses(base, interrupt):
    from lmforge.train.dpo import DPOStage

    def run(out, resume=False):
        return main(args(base, out, "--pairs", "60", "--eval-tasks", "0", "--max-steps", "6", "--save-every", "3",
                         "--lr", "1e-2") + (["--resume"] if resume else []))

    def logged(out):
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [x for r in rows if r.get("kind") == "train" for x in (r["loss"], r["rewards/margins"])]

    assert run(base / "straight") == 0
    interrupt(DPOStage, 3)  # the run stops right after its step-3 checkpoint
    assert run(base / "cut") == 130
    interrupt.release()
    assert run(base / "cut", resume=True) == 0
    assert len(logged(base / "cut")) == 12
    assert logged(base / "cut") == pytest.approx(logged(base / "straight"), rel=1e-6, abs=1e-6)


def test_dpo_on_the_models_own_sampled_answers(base):
    out = base / "sampled"
    assert main(args(base, out, "--data", "sampled-preferences", "--pairs", "12", "--kinds", "max", "--samples", "3",
                     "--eval-tasks", "4", "--val-fraction", "0", "--max-steps", "1", "--lr", "1e-3")) == 0
    summary = json.loads((out / "summary.json").read_text())
    read = summary["read"]["sampled-preferences"]
    assert read["read"] + read.get("skipped", {}).get("all_answers_correct", 0) == 12
    assert summary["train_pairs"] == read["read"] > 0 and summary["steps"] == 1
