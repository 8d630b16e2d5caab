"""`lmforge grpo` end to end on a tiny checkpoint: built-in tasks, a user's reward function, errors, exact resume."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.checkpoint import save_checkpoint
from lmforge.cli import main
from lmforge.data.tasks import generate_tasks
from lmforge.model import DecoderLM, preset
from lmforge.tokenizer import train_tokenizer

REWARD = '''
def short(prompts, completions, metas):
    """1 for an answer under 12 characters; the records' extra keys arrive in metas."""
    assert all("level" in m for m in metas)
    return [float(len(c) < 12) for c in completions]
'''


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    tasks = generate_tasks(200, seed=1)
    tokenizer = train_tokenizer([t.prompt + " " + t.answer for t in tasks], 300, progress=False)
    torch.manual_seed(0)
    save_checkpoint(root / "base", DecoderLM(preset("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=128)),
                    tokenizer)
    (root / "reward.py").write_text(REWARD)
    with open(root / "prompts.jsonl", "w") as f:
        for i in range(6):
            f.write(json.dumps({"prompt": f"Say a word about {i}.", "level": i}) + "\n")
    return root


def args(base, out, *extra):
    return ["grpo", "--model", str(base / "base"), "--out-dir", str(out), "--batch-size", "2", "--group-size", "4",
            "--max-new-tokens", "8", "--device", "cpu", "--dtype", "fp32", "--progress", "false", *extra]


def test_grpo_on_builtin_tasks_reports_accuracy_and_curves(base, capsys):
    out = base / "builtin"
    assert main(args(base, out, "--tasks", "20", "--kinds", "add", "subtract", "--eval-tasks", "6",
                     "--max-steps", "2")) == 0
    printed = capsys.readouterr().out
    assert "held-out task accuracy (6 tasks)" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["prompts"] == 20
    assert set(summary["task_accuracy_after"]["accuracy"]) == {"add", "subtract", "all"}
    assert (out / "rewards.png").is_file() and (out / "model" / "config.json").is_file()


def test_grpo_errors_are_clear(base, capsys):
    assert main(args(base, base / "x", "--prompts", str(base / "prompts.jsonl"))) == 2
    assert "checks built-in tasks only" in capsys.readouterr().err
    assert main(args(base, base / "x", "--reward", "nothing.py:f")) == 2
    assert "no file nothing.py" in capsys.readouterr().err
    assert main(args(base, base / "x", "--kinds", "poetry")) == 2
    assert "unknown task kind" in capsys.readouterr().err
    (base / "bad.jsonl").write_text('{"prompt": "a"}\n{"text": "b"}\n')
    assert main(args(base, base / "x", "--prompts", str(base / "bad.jsonl"), "--reward",
                     f"{base / 'reward.py'}:short")) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err


def test_a_resumed_grpo_run_samples_and_learns_the_same(base, interrupt):
    from lmforge.train.grpo import GRPOStage

    def run(out, resume=False):
        return main(args(base, out, "--prompts", str(base / "prompts.jsonl"), "--reward",
                         f"{base / 'reward.py'}:short", "--max-steps", "4", "--save-every", "2", "--log-every", "1",
                         "--lr", "1e-2") + (["--resume"] if resume else []))

    def logged(out):
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [r[k] for r in rows if r.get("kind") == "train" for k in ("loss", "reward", "entropy")]

    assert run(base / "straight") == 0
    interrupt(GRPOStage, 2)
    assert run(base / "cut") == 130
    interrupt.release()
    assert run(base / "cut", resume=True) == 0
    assert len(logged(base / "cut")) == 12
    assert logged(base / "cut") == pytest.approx(logged(base / "straight"), rel=1e-5, abs=1e-6)
