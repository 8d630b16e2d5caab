"""Distillation of a draft model: the sparse KL, the packing of the teacher's top tokens, and `lmforge distill`
end to end on a tiny teacher (its draft trains, loads as --draft and keeps the output exact)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmforge.api import load
from lmforge.checkpoint import is_checkpoint, save_checkpoint
from lmforge.cli import main
from lmforge.model import DecoderLM, preset
from lmforge.tokenizer import train_tokenizer
from lmforge.tokenizer.chat import ChatTokens
from lmforge.train import PretrainStage, TrainConfig, fit
from lmforge.train.distill import DistillStage, distill_loss, pack_teacher_rows
from lmforge.train.sft import IGNORE, pack_examples


def coarse_kl_reference(p: np.ndarray, q: np.ndarray, top: np.ndarray) -> float:
    """KL between p and q (full distributions) coarsened to the outcomes ``top`` and "any other token"."""
    p_out = np.append(p[top], 1 - p[top].sum())
    q_out = np.append(q[top], 1 - q[top].sum())
    return float((p_out * np.log(p_out / q_out)).sum())


def test_distill_loss_is_the_coarsened_kl_and_vanishes_when_the_student_is_the_teacher():
    torch.manual_seed(0)
    vocab, k, n = 50, 5, 7
    teacher = torch.randn(n, vocab) * 2
    student = torch.randn(n, vocab, requires_grad=True)
    t_logp = torch.log_softmax(teacher, -1)
    top_lp, top_ids = t_logp.topk(k)
    loss, parts = distill_loss(student, top_ids[:, 0], top_ids, top_lp, kl_weight=1.0)
    p, q = t_logp.exp().numpy(), torch.softmax(student, -1).detach().numpy()
    expected = np.mean([coarse_kl_reference(p[i], q[i], top_ids[i].numpy()) for i in range(n)])
    assert float(parts["kl"]) == pytest.approx(expected, rel=1e-4)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-4)  # kl_weight 1: the KL alone
    ce = torch.nn.functional.cross_entropy(student, top_ids[:, 0])
    assert float(parts["ce"]) == pytest.approx(float(ce.detach()), rel=1e-5)
    loss.backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    # the student that is the teacher: no divergence, every likeliest token agreed
    _, same = distill_loss(teacher, top_ids[:, 0], top_ids, top_lp, kl_weight=0.5)
    assert float(same["kl"]) == pytest.approx(0.0, abs=1e-5) and float(same["agreement"]) == 1.0
    mixed, _ = distill_loss(student, top_ids[:, 0], top_ids, top_lp, kl_weight=0.25)
    assert float(mixed.detach()) == pytest.approx(0.75 * float(ce.detach()) + 0.25 * expected, rel=1e-4)


def test_distill_loss_takes_fewer_than_k_teacher_tokens():
    logits = torch.randn(2, 10, requires_grad=True)
    top_ids = torch.tensor([[3, 4, 0], [1, 0, 0]])
    top_lp = torch.tensor([[-0.1, -3.0, -float("inf")], [-0.01, -float("inf"), -float("inf")]])
    loss, parts = distill_loss(logits, top_ids[:, 0], top_ids, top_lp, kl_weight=1.0)
    loss.backward()
    assert torch.isfinite(loss.detach()) and torch.isfinite(logits.grad).all()
    q = torch.softmax(logits, -1).detach().numpy()
    p0 = np.zeros(10)
    p0[[3, 4]] = np.exp([-0.1, -3.0])
    p0[5] = 1 - p0.sum()  # "any other" mass: put on a token outside the reported ones
    p1 = np.zeros(10)
    p1[1] = np.exp(-0.01)
    p1[2] = 1 - p1.sum()
    expected = (coarse_kl_reference(p0, q[0], np.array([3, 4])) + coarse_kl_reference(p1, q[1], np.array([1]))) / 2
    assert float(parts["kl"]) == pytest.approx(expected, rel=1e-4)


def test_teacher_tops_land_on_their_answer_positions_in_packed_rows():
    examples, tops = [], []
    for e, (prompt, answer) in enumerate([([1, 2, 3], [10, 11]), ([4, 5], [12, 13, 14]), ([6], [15])]):
        examples.append(ChatTokens(prompt + answer, [False] * len(prompt) + [True] * len(answer)))
        tops.append([[(token, -0.5), (99, -1.5 - e)] for token in answer])  # top-1 is the answer token itself
    rows = pack_teacher_rows(pack_examples(examples, 6, 0), tops, 2)
    answers = rows.targets != IGNORE
    assert len(rows) == 2 and answers.sum() == 6  # the second row holds two examples
    assert (rows.top_ids[..., 0][answers] == rows.targets[answers]).all()
    assert (rows.top_ids[..., 1][answers] == 99).all()
    assert sorted(set(rows.top_logprobs[..., 1][answers].tolist())) == [-3.5, -2.5, -1.5]
    assert (rows.top_ids[~answers] == 0).all()
    with pytest.raises(ValueError, match="answer positions"):
        pack_teacher_rows(pack_examples(examples, 6, 0), tops[:2], 2)


def test_the_prompt_term_is_next_token_loss_on_the_prompts_text_only():
    examples = [ChatTokens([1, 2, 3, 4, 10, 11], [False] * 4 + [True] * 2), ChatTokens([5, 6, 12], [False] * 2 + [True])]
    tops = [[[(10, -0.1)], [(11, -0.2)]], [[(12, -0.3)]]]
    rows = pack_teacher_rows(pack_examples(examples, 10, 0), tops, 1)
    batch = {name: torch.from_numpy(getattr(rows, name)) for name in DistillStage.fields}
    torch.manual_seed(0)
    model = DecoderLM(preset("tiny", vocab_size=16))
    plain = DistillStage(rows, 0).loss(model, batch)
    stage = DistillStage(rows, 0, prompt_weight=0.5)
    with_prompt = stage.loss(model, batch)
    logits = torch.log_softmax(model(batch["inputs"], segments=batch["segments"]).float(), -1)[0]
    # the prompt's own next tokens: 1->2, 2->3, 3->4 in the first example, 5->6 in the second (not 4->10, 6->12)
    places, targets = [0, 1, 2, 5], [2, 3, 4, 6]
    expected = -logits[places, targets].mean()
    assert float((with_prompt - plain).detach()) == pytest.approx(0.5 * float(expected.detach()), rel=1e-5)
    assert stage.pop_metrics()["prompt_ce"] == pytest.approx(float(expected.detach()), rel=1e-5)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny teacher that has learned a little text (its greedy answers depend on the prompt), and 40 prompts."""
    root = tmp_path_factory.mktemp("distill")
    words = "the cat sat on the mat and the dog ran to the park while a bird sang in the old tree".split()
    text = " ".join(words * 30)
    tokenizer = train_tokenizer([text + " " + " ".join(map(str, range(40)))], 290, progress=False)
    torch.manual_seed(0)
    model = DecoderLM(preset("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=256))
    tokens = np.array(tokenizer.encode(text), dtype=np.uint16)
    fit(model, PretrainStage(tokens, 32, 0), TrainConfig(out_dir=str(root / "pretrain"), max_steps=60, batch_size=8,
                                                         seq_len=32, lr=1e-2, warmup_steps=5, eval_every=0,
                                                         save_every=1000, progress=False, dtype="fp32"))
    save_checkpoint(root / "teacher", model, tokenizer)
    with open(root / "prompts.jsonl", "w", encoding="utf-8") as f:
        for i in range(40):
            prompt = f"{i} " + " ".join(words[i % 13:i % 13 + 4])
            f.write(json.dumps({"prompt": prompt, "completion": "(the teacher answers)"}) + "\n")
    return root


def test_distill_trains_a_draft_that_agrees_more_and_keeps_the_output_exact(teacher, capsys):
    out = teacher / "draft"
    args = ["distill", "--teacher", str(teacher / "teacher"), "--data", str(teacher / "prompts.jsonl"),
            "--student", "tiny", "--max-new-tokens", "24", "--top-k", "4", "--out-dir", str(out),
            "--max-steps", "60", "--batch-size", "4", "--seq-len", "64", "--lr", "1e-2", "--warmup-steps", "5",
            "--eval-every", "60", "--log-every", "5", "--val-fraction", "0.2", "--check-prompts", "3",
            "--progress", "false", "--dtype", "fp32"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "use it with --draft" in printed and "outputs the plain ones" in printed
    assert is_checkpoint(out / "model")
    summary = json.loads((out / "distill_summary.json").read_text())
    assert summary["prompts"] == 40 and summary["train_prompts"] + summary["val_prompts"] == 40
    before, after = summary["before"]["val_agreement"], summary["final"]["val_agreement"]
    assert after > before + 0.2, (before, after)  # the teacher's likeliest tokens are learned
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["agreement"] for m in metrics if m.get("kind") == "train"]  # logged beside the loss
    check = summary["check"]
    assert check["prompts"] == 3 and check["same_output"] == 3 and check["acceptance"] > 0.3
    # OUT/model is a draft for the teacher: the same greedy tokens as the teacher alone
    plain = load(teacher / "teacher", device="cpu", dtype="fp32")
    drafted = load(teacher / "teacher", device="cpu", dtype="fp32", draft=out / "model", draft_tokens=3)
    for prompt in ["the cat sat", "dog ran to the"]:
        assert drafted.generate(prompt, max_new_tokens=20, temperature=0) == \
            plain.generate(prompt, max_new_tokens=20, temperature=0)
    # the teacher's answers are kept and reused by a second run with the same prompts and settings
    lines = (out / "teacher_answers.jsonl").read_text().splitlines()
    assert len(lines) == 41 and "key" in json.loads(lines[0])
    record = json.loads(lines[1])
    assert len(record["top"]) == len(record["answer_ids"]) + (record["stop_id"] is not None)
    assert all(entry[0][0] == token for entry, token in zip(record["top"], record["answer_ids"]))


def test_distill_refuses_bad_input_with_exit_2(teacher, tmp_path, capsys):
    base = ["distill", "--teacher", str(teacher / "teacher"), "--out-dir", str(tmp_path / "out"),
            "--progress", "false", "--dtype", "fp32"]
    assert main([*base, "--kl-weight", "2"]) == 2
    assert "kl_weight" in capsys.readouterr().err
    assert main([*base, "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "not found" in capsys.readouterr().err
    other = train_tokenizer(["abc bcd cde def efg " * 50], 276, progress=False)
    save_checkpoint(tmp_path / "other", DecoderLM(preset("tiny", vocab_size=other.vocab_size)), other)
    assert main([*base, "--data", str(teacher / "prompts.jsonl"), "--student", str(tmp_path / "other"),
                 "--max-new-tokens", "4"]) == 2
    assert "vocab_size" in capsys.readouterr().err
