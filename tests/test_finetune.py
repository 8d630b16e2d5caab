"""`lmforge sft` end to end: full, LoRA and QLoRA on a tiny checkpoint, through the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.checkpoint import is_checkpoint, load_model, save_checkpoint
from lmforge.cli import main
from lmforge.model import DecoderLM, build_model, preset
from lmforge.tokenizer import train_tokenizer

FACTS = [("What is the capital of France?", "Paris"), ("What is the capital of Italy?", "Rome"),
         ("What is the capital of Spain?", "Madrid"), ("What is the capital of Japan?", "Tokyo")]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    text = " ".join(f"{q} {a}." for q, a in FACTS) * 30
    tokenizer = train_tokenizer([text], 320)
    torch.manual_seed(0)
    save_checkpoint(root / "base", DecoderLM(preset("tiny", vocab_size=tokenizer.vocab_size)), tokenizer)
    with open(root / "data.jsonl", "w", encoding="utf-8") as f:
        for q, a in FACTS * 3:
            f.write(json.dumps({"prompt": q, "completion": a}) + "\n")
    return root


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_sft_methods_write_a_loadable_model_and_learn(base, method, capsys):
    out = base / method
    args = ["sft", "--model", str(base / "base"), "--data", str(base / "data.jsonl"), "--method", method,
            "--out-dir", str(out), "--max-steps", "30", "--batch-size", "2", "--seq-len", "64",
            "--val-fraction", "0", "--eval-every", "0", "--progress", "false", "--log-every", "1",
            "--lr", "3e-3" if method == "full" else "3e-2"]  # a random tiny base needs big adapter steps
    assert main(args) == 0
    assert "model:" in capsys.readouterr().out
    summary = json.loads((out / "sft_summary.json").read_text())
    total = sum(p.numel() for p in load_model(base / "base").parameters())
    if method == "full":
        assert summary["trainable_parameters"] == total
    else:
        assert 0 < summary["trainable_parameters"] < total // 5  # adapters only
        assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert is_checkpoint(out / "model")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if m.get("kind") == "train"]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    # Full fine-tuning halves the loss; adapters on a random 2-layer base learn slowly but surely
    # (a frozen model would stay within batch-to-batch noise, about 0.1 here).
    assert last < (0.5 * first if method == "full" else first - 0.3), (first, last)
    tuned, original = load_model(out / "model"), load_model(base / "base")
    assert not torch.equal(tuned.blocks[0].attn.q_proj.weight, original.blocks[0].attn.q_proj.weight)


def test_sft_refuses_unknown_method_and_bad_data(base, capsys):
    assert main(["sft", "--model", str(base / "base"), "--method", "dora"]) == 2
    assert "method='dora'" in capsys.readouterr().err
    (base / "bad.jsonl").write_text('{"question": "?"}\n')
    assert main(["sft", "--model", str(base / "base"), "--data", str(base / "bad.jsonl")]) == 2
    assert "bad.jsonl:1: no known fields" in capsys.readouterr().err


def test_sft_with_qat_writes_the_quantized_model(base, capsys):
    out = base / "qat"
    args = ["sft", "--model", str(base / "base"), "--data", str(base / "data.jsonl"), "--method", "full",
            "--qat", "int8", "--out-dir", str(out), "--max-steps", "3", "--batch-size", "2", "--seq-len", "64",
            "--val-fraction", "0", "--eval-every", "0", "--progress", "false"]
    assert main(args) == 0
    assert "quantized (int8):" in capsys.readouterr().out
    assert json.loads((out / "quantized" / "quantization.json").read_text())["bits"] == 8
    assert is_checkpoint(out / "model")  # the float master weights too
    assert main([*args[:5], "--method", "lora", "--qat", "int8", *args[9:]]) == 2
    assert "method full" in capsys.readouterr().err


def test_builtin_tasks_report_held_out_accuracy_before_and_after(base, capsys):
    out = base / "tasks"
    assert main(["sft", "--model", str(base / "base"), "--data", "builtin-tasks", "--tasks", "40",
                 "--eval-tasks", "10", "--method", "full", "--out-dir", str(out), "--max-steps", "3",
                 "--batch-size", "2", "--seq-len", "64", "--eval-every", "0", "--progress", "false"]) == 0
    assert "held-out task accuracy, before -> after: add " in capsys.readouterr().out
    summary = json.loads((out / "sft_summary.json").read_text())
    for key in ("task_accuracy_before", "task_accuracy_after"):
        accuracy = summary[key]["accuracy"]
        assert 0.0 <= accuracy["all"] <= 1.0 and {"add", "docs", "identity"} <= set(accuracy)
    assert summary["task_accuracy_after"]["examples"][0]["expected"]
    assert summary["train_conversations"] + summary["val_conversations"] == 40


def test_an_encoder_decoder_fine_tunes_with_lora_and_answers_held_out_tasks(base, capsys):
    """The same command on an encoder-decoder: adapters on both stacks (cross-attention too), the held-out
    built-in tasks answered before and after (the encoder reads the question, the decoder answers)."""
    import lmforge

    tokenizer = lmforge.load(base / "base").tokenizer
    torch.manual_seed(0)
    save_checkpoint(base / "t5", build_model(preset("t5-tiny", vocab_size=tokenizer.vocab_size)), tokenizer)
    out = base / "t5-lora"
    assert main(["sft", "--model", str(base / "t5"), "--data", "builtin-tasks", "--tasks", "40", "--eval-tasks",
                 "6", "--method", "lora", "--lora-rank", "4", "--out-dir", str(out), "--max-steps", "3",
                 "--batch-size", "2", "--seq-len", "64", "--eval-every", "0", "--progress", "false"]) == 0
    assert "held-out task accuracy, before -> after" in capsys.readouterr().out
    summary = json.loads((out / "sft_summary.json").read_text())
    cross = [p for n, p in load_model(base / "t5").named_parameters() if ".cross_attn." in n and n.endswith("weight")]
    assert summary["trainable_parameters"] > 4 * sum(p.shape[0] + p.shape[1] for p in cross)  # adapters: A and B
    assert len(summary["task_accuracy_after"]["correct"]) == 6
    tuned, original = load_model(out / "model"), load_model(base / "t5")
    assert not torch.equal(tuned.decoder.blocks[0].cross_attn.q_proj.weight,
                           original.decoder.blocks[0].cross_attn.q_proj.weight)  # the merged adapter
    reply = lmforge.load(out / "model").chat([{"role": "user", "content": "What is 2 plus 3?"}],
                                             max_new_tokens=4, temperature=0)
    assert isinstance(reply, str)


def test_a_resumed_lora_run_continues_the_same_losses(base, interrupt):
    from lmforge.train.sft import SFTStage

    def run(out, resume=False):
        args = ["sft", "--model", str(base / "base"), "--data", str(base / "data.jsonl"), "--method", "lora",
                "--out-dir", str(out), "--max-steps", "6", "--batch-size", "2", "--seq-len", "64",
                "--val-fraction", "0", "--eval-every", "0", "--progress", "false", "--log-every", "1",
                "--save-every", "3", "--lr", "3e-2"]
        return main(args + (["--resume"] if resume else []))

    def losses(out):
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if r.get("kind") == "train"]

    assert run(base / "straight") == 0
    interrupt(SFTStage, 3)  # the run stops right after its step-3 checkpoint
    assert run(base / "cut") == 130
    interrupt.release()
    assert run(base / "cut", resume=True) == 0
    assert len(losses(base / "cut")) == 6
    assert losses(base / "cut") == pytest.approx(losses(base / "straight"), rel=1e-6, abs=1e-6)
