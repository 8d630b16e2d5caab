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


def tiny_lm(tmp_path, pairs, max_seq_len=64):
    """A tiny language model (saved under tmp_path/lm) and a tokenizer trained on the pairs' text."""
    tokenizer = train_tokenizer([p.prompt[0]["content"] + " " + p.chosen + " " + p.rejected for p in pairs], 300,
                                progress=False)
    torch.manual_seed(0)
    model = DecoderLM(preset("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=max_seq_len))
    return save_checkpoint(tmp_path / "lm", model, tokenizer), tokenizer


def test_rm_trains_writes_a_reward_model_and_scores_pairs(tmp_path, capsys):
    pairs = builtin_preferences(120, seed=1)
    lm, tokenizer = tiny_lm(tmp_path, pairs)
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


def test_rm_with_lora_trains_adapters_and_the_score_head_and_peft_reads_them(tmp_path):
    lm, tokenizer = tiny_lm(tmp_path, builtin_preferences(60, seed=1))
    out = tmp_path / "rm"
    assert main(["rm", "--model", str(lm), "--pairs", "60", "--out-dir", str(out), "--max-steps", "4",
                 "--method", "lora", "--lora-rank", "4", "--batch-size", "8", "--seq-len", "64", "--eval-every", "0",
                 "--device", "cpu", "--dtype", "fp32", "--progress", "false"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    from lmforge.checkpoint import load_model, read_checkpoint
    from lmforge.model.heads import with_head
    from lmforge.peft import LoraConfig, apply_lora, lora_layers

    adapted = apply_lora(with_head(load_model(lm), "score"), LoraConfig(rank=4))
    adapters = sum(layer.lora_A.numel() + layer.lora_B.numel() for layer in lora_layers(adapted).values())
    assert summary["trainable_parameters"] == adapters + adapted.config.dim  # the adapters and the score head
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and adapter["modules_to_save"] == ["score"]
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from lmforge.interop.hf import save_hf

    torch.manual_seed(0)  # the starting point: the language model's backbone with a score head
    start = with_head(load_model(lm), "score")
    save_hf(tmp_path / "hf", start.config, dict(start.state_dict()))
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf", num_labels=1).eval()
    hf = peft.PeftModel.from_pretrained(hf, out / "adapter").eval()
    trained = load_model(out / "model")  # the adapters merged
    assert read_checkpoint(out / "model")[0].head == "score"
    ids = torch.randint(0, tokenizer.vocab_size, (1, 20))
    with torch.inference_mode():
        assert hf(ids).logits[0, 0].item() == pytest.approx(trained(ids)[0, -1].item(), abs=1e-4)


def test_a_resumed_rm_run_continues_the_same_losses(tmp_path, interrupt):
    from lmforge.train.reward import RewardStage

    lm, _ = tiny_lm(tmp_path, builtin_preferences(40, seed=2))

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


def test_rm_ranks_answers_sampled_from_its_starting_model(tmp_path):
    lm, _ = tiny_lm(tmp_path, builtin_preferences(60, seed=1), max_seq_len=256)  # room for a prompt and answers
    out = tmp_path / "rm"
    assert main(["rm", "--model", str(lm), "--data", "sampled-preferences", "--pairs", "10", "--samples", "2",
                 "--val-fraction", "0", "--out-dir", str(out), "--max-steps", "1", "--batch-size", "4",
                 "--seq-len", "64", "--eval-every", "0", "--device", "cpu", "--dtype", "fp32",
                 "--progress", "false"]) == 0
    read = json.loads((out / "summary.json").read_text())["read"]["sampled-preferences"]
    assert read["read"] + read.get("skipped", {}).get("all_answers_correct", 0) == 10 and read["read"] > 0
