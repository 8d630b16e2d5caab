"""The architectures study: how each form is asked a question, the scorer against greedy decoding,
multitask tuning, compute counted by torch, and a small study end to end."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.cli import main
from lmforge.data.tasks import train_eval_tasks
from lmforge.model import build_model
from lmforge.model.flops import matmul_parameters
from lmforge.runtime import Runtime
from lmforge.study.architectures import (
    EOS,
    FORM_CLASSES,
    IGNORE,
    MASK_ID,
    AnswerStage,
    judge,
    make_question,
    pick_shots,
    step_flops,
)
from lmforge.tokenizer import train_tokenizer
from lmforge.train import PretrainStage, TrainConfig, fit

KINDS = ["max", "sort", "count"]
RUNTIME = Runtime.resolve("cpu", "fp32")


@pytest.fixture(scope="module")
def tasks():
    return train_eval_tasks(300, 24, seed=0, kinds=KINDS)


@pytest.fixture(scope="module")
def tokenizer(tasks):
    return train_tokenizer([f"Q: {t.prompt} A: {t.answer}\n" for t in tasks[0]], 320)


def test_each_form_scores_exactly_the_answer_and_sees_the_question(tokenizer, tasks):
    train, held = tasks
    shots = pick_shots(train, held, 2, seed=0)
    assert all(len(s) == 2 and {t.kind for t in s} == {task.kind} for s, task in zip(shots, held))
    assert shots == pick_shots(train, held, 2, seed=0) and shots != pick_shots(train, held, 2, seed=1)
    assert all(task not in solved for task, solved in zip(train, pick_shots(train, train, 3, seed=0)))
    for task, solved in zip(held, shots):
        question = make_question(tokenizer, task, solved)
        text = "".join(f"Q: {t.prompt} A: {t.answer}\n" for t in solved) + f"Q: {task.prompt} A:"
        assert tokenizer.decode(question.prefix) == text and tokenizer.decode(question.answer) == " " + task.answer
        rows = {name: cls(tokenizer.vocab_size).rows(question) for name, cls in FORM_CLASSES.items()}

        decoder = rows["decoder"]
        kept = [t for t in decoder["targets"] if t != IGNORE]
        assert tokenizer.decode(kept) == f" {task.answer}\n"  # the answer, and the line break that ends it
        assert tokenizer.decode(decoder["inputs"][1:]) == text + " " + task.answer  # it reads the gold before

        encoder = rows["encoder"]
        masked = [i for i, t in enumerate(encoder["inputs"]) if t == MASK_ID]
        assert masked == [i for i, t in enumerate(encoder["targets"]) if t != IGNORE]
        assert len(masked) == len(question.answer)  # one mask per answer token: the length is given
        assert tokenizer.decode([encoder["targets"][i] for i in masked]) == " " + task.answer
        assert encoder["inputs"][masked[0]:] == [MASK_ID] * len(masked) + question.newline + [EOS]  # nothing else

        seq2seq = rows["encoder-decoder"]
        sentinel = FORM_CLASSES["encoder-decoder"](tokenizer.vocab_size).sentinels[0]
        assert sentinel >= tokenizer.vocab_size and seq2seq["sources"].count(sentinel) == 1
        assert seq2seq["decoder_inputs"] == [0, sentinel, *question.answer]  # start token, sentinel (given), answer
        assert seq2seq["targets"] == [IGNORE, *question.answer, question.newline[0]]
        assert seq2seq["sources"][-2:] == [sentinel, EOS]  # the hidden run last, as span corruption hides it


class Echo(torch.nn.Module):
    """Writes the gold continuation (each position's likeliest token is the next input), then ``last``."""

    def __init__(self, vocab: int, last: int):
        super().__init__()
        self.vocab, self.last = vocab, last

    def forward(self, *args, **kwargs):
        inputs = args[1] if len(args) > 1 else args[0]  # the decoder's inputs, or the decoder-only model's
        logits = torch.zeros(*inputs.shape, self.vocab)
        logits[0, torch.arange(inputs.shape[1] - 1), inputs[0, 1:]] = 5.0
        logits[0, -1, self.last] = 5.0
        return logits


def test_an_answer_is_right_when_the_model_then_ends_it(tokenizer, tasks):
    """Greedy decoding stops at a line break or the end of the text, and an encoder-decoder's span also
    at the next sentinel: any of them after a right answer counts, anything else does not."""
    for name in ("decoder", "encoder-decoder"):
        form = FORM_CLASSES[name](tokenizer.vocab_size)
        question = make_question(tokenizer, tasks[1][0], [])
        vocab = form.model_config("d32l2", 64).vocab_size
        sentinels = getattr(form, "sentinels", [0, 0, 0])
        enders = [question.newline[0], EOS] + ([sentinels[1]] if name == "encoder-decoder" else [])
        for last in [*enders, sentinels[2], question.answer[0]]:
            verdict = judge(form, Echo(vocab, last), [question], RUNTIME, batch_size=1)
            assert bool(verdict["right"][0]) == (last in enders), (name, last)
            assert verdict["tokens_right"][0] == verdict["tokens"][0] == len(question.answer)


def greedy(form_name: str, form, model, question) -> list[int]:
    """What greedy decoding writes for ``question``, one token at a time (no teacher forcing), up to the line
    break or a few tokens past the answer's length."""
    limit = len(question.answer) + 4
    if form_name == "decoder":
        ids = form.rows(question)["inputs"][:1 + len(question.prefix)]
        out = []
        while len(out) < limit and (not out or out[-1] != question.newline[0]):
            out.append(int(model(torch.tensor([ids + out]))[0, -1].argmax()))
        return out
    rows = form.rows(question)
    source = torch.tensor([rows["sources"]])
    out = rows["decoder_inputs"][:2]  # the start token and the sentinel
    while len(out) < limit + 2 and out[-1] != question.newline[0]:
        out.append(int(model(source, torch.tensor([out]))[0, -1].argmax()))
    return out[2:]


@pytest.mark.parametrize("name", list(FORM_CLASSES))
def test_tuning_teaches_each_form_and_the_scorer_agrees_with_greedy_decoding(name, tokenizer, tasks, tmp_path):
    train, held = tasks
    form = FORM_CLASSES[name](tokenizer.vocab_size)
    questions = [make_question(tokenizer, task, []) for task in train[:12]]
    torch.manual_seed(0)
    model = build_model(form.model_config("d64l2", 64))
    before = judge(form, model, questions, RUNTIME)
    stage = AnswerStage(form, questions, seed=0)
    config = TrainConfig(out_dir=str(tmp_path / "run"), batch_size=8, seq_len=64, max_steps=200, lr=3e-3, warmup_steps=10,
                         eval_every=0, save_every=10**6, log_every=50, device="cpu", dtype="fp32", progress=False)
    fit(model, stage, config)
    after = judge(form, model.eval(), questions, RUNTIME)
    assert after["right"].mean() >= 0.9 > before["right"].mean()  # it learned to answer the tuning questions
    assert after["logprob"].sum() > before["logprob"].sum()
    assert (after["tokens"] == [len(q.answer) for q in questions]).all()
    if name == "encoder":
        return
    mixed = questions[:8] + [make_question(tokenizer, task, []) for task in held[:8]]  # seen, and held out
    verdict = judge(form, model, mixed, RUNTIME)
    with torch.no_grad():
        for question, right in zip(mixed, verdict["right"]):
            assert (greedy(name, form, model, question) == question.answer + question.newline[:1]) == right


def test_compute_is_counted_by_torch_with_attention(tokenizer, tasks):
    import numpy as np

    form = FORM_CLASSES["decoder"](tokenizer.vocab_size)
    config = form.model_config("d64l2", 64)
    model = build_model(config)
    tokens = np.random.default_rng(0).integers(10, tokenizer.vocab_size, 5000)
    stage = PretrainStage(tokens, 64, 0)
    counted = step_flops(model, stage, 4)
    per_token = 2 * matmul_parameters(config) + 2 * 2 * config.num_layers * config.dim * 64  # weights, q k^T, a v
    assert counted == pytest.approx(3 * per_token * 4 * 64, rel=1e-3)  # forward and backward (twice the forward)
    pair = FORM_CLASSES["encoder-decoder"](tokenizer.vocab_size)
    seq2seq = build_model(pair.model_config("d64l2", 64))
    assert step_flops(seq2seq, pair.pretrain_stage(tokens, None, 64, 0), 4) < 0.7 * counted  # one stack per token


def study_args(root, *extra):
    return ["study", "architectures", "--out", str(root / "a"), "--size", "d32l2", "--flops", "3e9",
            "--max-bytes", "100000", "--kinds", "max", "count", "--task-items", "400", "--eval-items", "20",
            "--shots", "1", "--tune-steps", "10", "--vocab-size", "320", "--seq-len", "128", "--batch-size", "8",
            "--minutes", "5", "--progress", "false", *extra]


def test_a_small_architectures_study_runs_and_resumes(tmp_path, capsys):
    assert main(study_args(tmp_path)) == 0
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    rows = {r["form"]: r for r in results["forms"]}
    assert list(rows) == ["decoder", "encoder", "encoder-decoder"]
    for r in rows.values():
        assert abs(r["flops"] - 3e9) <= r["step_flops"] / 2  # matched compute, to the nearest step
        assert set(r["scores"]) == {"zero-shot", "few-shot", "tuned zero-shot", "tuned few-shot"}
        for s in r["scores"].values():
            assert 0.0 <= s["exact"] <= s["token_accuracy"] <= 1.0 and s["answer_logprob"] < 0
            assert set(s["by_kind"]) == {"max", "count"} and s["questions"] == 20
    assert rows["encoder-decoder"]["text_tokens"] > 1.4 * rows["decoder"]["text_tokens"]
    assert rows["encoder-decoder"]["layers"] == [1, 1] and rows["decoder"]["layers"] == [2, 0]
    assert (tmp_path / "a" / "architectures.png").stat().st_size > 0
    assert "| encoder-decoder | span corruption (T5) | 1 + 1 |" in (tmp_path / "a" / "results.md").read_text()
    done = {p: p.stat().st_mtime for p in (tmp_path / "a" / "runs").rglob("result.json")}
    assert len(done) == 6
    capsys.readouterr()
    assert main(study_args(tmp_path)) == 0  # resumed: nothing trains again
    assert "0.0 min left" in capsys.readouterr().out
    assert {p: p.stat().st_mtime for p in done} == done
    assert main(study_args(tmp_path, "--shots", "2")) == 2  # another study in that folder
    assert "shots 1 -> 2" in capsys.readouterr().err
    other = ("--out", str(tmp_path / "b"))
    assert main(study_args(tmp_path, *other, "--shots", "6")) == 2
    assert "fewer --shots or a longer --seq-len" in capsys.readouterr().err
    assert main(study_args(tmp_path, *other, "--flops", "1e15")) == 2  # nothing trained: the folder stays open
    assert "raise --minutes" in capsys.readouterr().err
    assert main(study_args(tmp_path, *other, "--vocab-size", "300")) == 2  # but its data is made
    assert "vocab_size 320 -> 300" in capsys.readouterr().err
    assert main(study_args(tmp_path, *other, "--forms", "gpt")) == 2
    assert "choose from decoder" in capsys.readouterr().err
    assert main(study_args(tmp_path, *other, "--size", "d32l1")) == 2
    assert "two layers at least" in capsys.readouterr().err
