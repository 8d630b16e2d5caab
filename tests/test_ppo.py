"""`lmforge ppo` end to end on a tiny checkpoint: built-in tasks, a reward model as the reward, what it writes,
errors, and an exact resume at a rollout cycle's start."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.checkpoint import load_model, load_tokenizer, read_checkpoint, save_checkpoint
from lmforge.cli import main
from lmforge.data.tasks import generate_tasks
from lmforge.model import DecoderLM, preset
from lmforge.model.heads import last_token_scores, with_head
from lmforge.rl import RewardModelScorer
from lmforge.runtime import Runtime
from lmforge.tokenizer import train_tokenizer
from lmforge.tokenizer.chat import render_chat


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo")
    tasks = generate_tasks(200, seed=1)
    tokenizer = train_tokenizer([t.prompt + " " + t.answer for t in tasks], 300, progress=False)
    torch.manual_seed(0)
    model = DecoderLM(preset("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=128))
    save_checkpoint(root / "base", model, tokenizer)
    torch.manual_seed(1)
    save_checkpoint(root / "rm", with_head(model, "score"), tokenizer)  # an (untrained) reward model
    with open(root / "prompts.jsonl", "w") as f:
        for i in range(6):
            f.write(json.dumps({"prompt": f"Say a word about {i}."}) + "\n")
    return root


def args(base, out, *extra):
    return ["ppo", "--model", str(base / "base"), "--out-dir", str(out), "--batch-size", "2", "--max-new-tokens", "8",
            "--device", "cpu", "--dtype", "fp32", "--progress", "false", *extra]


def test_ppo_on_builtin_tasks_writes_a_plain_policy_and_reports_accuracy(base, capsys):
    out = base / "builtin"
    assert main(args(base, out, "--tasks", "20", "--kinds", "add", "--eval-tasks", "4", "--max-steps", "4",
                     "--ppo-epochs", "2")) == 0
    printed = capsys.readouterr().out
    assert "held-out task accuracy (4 tasks)" in printed and "2 per batch of rollouts" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["prompts"] == 20
    config, state = read_checkpoint(out / "model")
    assert config.head == "lm" and "score.weight" not in state  # the value head stays behind
    assert read_checkpoint(out / "checkpoint")[0].head == "lm+value"  # ... with the run, for --resume
    assert (out / "rewards.png").is_file() and (out / "adapter" / "adapter_config.json").is_file()
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("objective/kl" in r and "loss/value_avg" in r for r in train)
    assert main(["export", str(out / "checkpoint"), str(base / "hf")]) == 2
    assert "PPO training checkpoint" in capsys.readouterr().err


def test_a_reward_model_scores_the_conversation_with_its_answer(base):
    scorer = RewardModelScorer(base / "rm", Runtime.resolve("cpu", "fp32"), batch_size=2)
    prompts = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "a longer question here"}]] * 2
    answers = ["hello", "an answer", "x", "another answer that runs on"]
    scores = scorer(prompts, answers, [None] * 4)
    model, tokenizer = load_model(base / "rm"), load_tokenizer(base / "rm")
    for messages, answer, score in zip(prompts, answers, scores):
        ids = render_chat(tokenizer, [*messages, {"role": "assistant", "content": answer}]).ids
        alone = last_token_scores(model, torch.tensor([ids]), torch.tensor([len(ids)])).item()
        assert score == pytest.approx(alone, abs=1e-5)  # padded in a batch or alone, the same score
    assert len(set(scores)) == 4


def test_ppo_with_a_reward_model_and_clear_errors(base, capsys):
    out = base / "rm-reward"
    assert main(args(base, out, "--prompts", str(base / "prompts.jsonl"), "--reward", str(base / "rm"),
                     "--max-steps", "2", "--ppo-epochs", "1", "--method", "full", "--kl-coef", "0.1", "--log-every", "1")) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert len(train) == 2 and all(r["objective/scores"] != 0 for r in train)  # the reward model's scores, not a 0/1 checker
    assert main(args(base, base / "x", "--prompts", str(base / "prompts.jsonl"), "--reward", str(base / "base"))) == 2
    assert "not a reward model" in capsys.readouterr().err
    assert main(args(base, base / "x", "--prompts", str(base / "prompts.jsonl"))) == 2
    assert "checks built-in tasks only" in capsys.readouterr().err
    assert main(args(base, base / "x", "--ppo-epochs", "0")) == 2
    assert "ppo_epochs" in capsys.readouterr().err


def test_a_resumed_ppo_run_continues_the_same_losses(base, interrupt):
    from lmforge.train.ppo import PPOStage

    def run(out, resume=False):  # cycles of 2 steps: --save-every 3 becomes 4
        return main(args(base, out, "--tasks", "20", "--kinds", "add", "--eval-tasks", "0", "--max-steps", "8",
                         "--ppo-epochs", "2", "--save-every", "3", "--log-every", "1", "--lr", "1e-2")
                    + (["--resume"] if resume else []))

    def logged(out):
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [r[k] for r in rows if r.get("kind") == "train" for k in ("loss", "loss/value_avg", "val/ratio")]

    assert run(base / "straight") == 0
    interrupt(PPOStage, 5)
    assert run(base / "cut") == 130
    interrupt.release()
    assert json.loads((base / "cut" / "checkpoint" / "trainer_state.json").read_text())["step"] == 4
    assert run(base / "cut", resume=True) == 0
    assert len(logged(base / "cut")) == 24
    assert logged(base / "cut") == pytest.approx(logged(base / "straight"), rel=1e-5, abs=1e-6)
