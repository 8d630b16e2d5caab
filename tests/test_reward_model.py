"""`lmforge rm` and `lmforge rm score` end to end on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.checkpoint import save_checkpoint
from lmforge.cli import main
from lmforge.data.preferences import builtin_preferences, write_preferences
from lmforge.model import DecoderLM, preset
from lmforge.tokenizer import train_tokenizer


def test_rm_trains_writes_a_reward_model_and_scores_pairs(tmp_path, capsys):
    pairs = builtin_preferences(120, seed=1)
    tokenizer = train_tokenizer([p.prompt[0]["content"] + " " + p.chosen + " " + p.rejected for p in pairs], 300,
                                progress=False)
    torch.manual_seed(0)
    lm = save_checkpoint(tmp_path / "lm", DecoderLM(preset("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=64)),
                         tokenizer)
    out = tmp_path / "rm"
    assert main(["rm", "--model", str(lm), "--pairs", "120", "--out-dir", str(out), "--max-steps", "15",
                 "--batch-size", "8", "--seq-len", "64", "--lr", "3e-3", "--eval-every", "0", "--device", "cpu",
                 "--dtype", "fp32", "--progress", "false"]) == 0
    printed = capsys.readouterr().out
    assert "held-out pair accuracy" in printed and (out / "model" / "config.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 15 and summary["train_pairs"] + summary["val_pairs"] == 120
    assert json.loads((out / "model" / "config.json").read_text())["head"] == "score"
    data = tmp_path / "pairs.jsonl"
    write_preferences(pairs[:5], data)
    assert main(["rm", "score", str(out / "model"), "--input", str(data), "--output", str(tmp_path / "s.jsonl")]) == 0
    lines = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(lines) == 5 and all(x["chosen_wins"] == (x["chosen_score"] > x["rejected_score"]) for x in lines)
    assert main(["rm", "score", str(lm), "--input", str(data)]) == 2  # a language model is not a reward model
    assert "not a reward model" in capsys.readouterr().err


def test_a_resumed_rm_run_continues_the_same_losses(tmp_path, interrupt):
    from lmforge.train.reward import RewardStage

    pairs = builtin_preferences(40, seed=2)
    tokenizer = train_tokenizer([p.prompt[0]["content"] + " " + p.chosen + " " + p.rejected for p in pairs], 300,
                                progress=False)
    torch.manual_seed(0)
    lm = save_checkpoint(tmp_path / "lm", DecoderLM(preset("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=64)),
                         tokenizer)

    def run(out, resume=False):
        return main(["rm", "--model", str(lm), "--pairs", "40", "--out-dir", str(out), "--max-steps", "6",
                     "--save-every", "3", "--log-every", "1", "--batch-size", "4", "--seq-len", "64", "--lr", "3e-3",
                     "--eval-every", "0", "--device", "cpu", "--dtype", "fp32", "--progress", "false"]
                    + (["--resume"] if resume else []))

    def losses(out):
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if r.get("kind") == "train"]

    assert run(tmp_path / "straight") == 0
    interrupt(RewardStage, 3)
    assert run(tmp_path / "cut") == 130
    interrupt.release()
    assert run(tmp_path / "cut", resume=True) == 0
    assert len(losses(tmp_path / "cut")) == 6
    assert losses(tmp_path / "cut") == pytest.approx(losses(tmp_path / "straight"), rel=1e-6, abs=1e-6)
