"""The emergence study: composite items, their answer spans, the two ways of scoring, and a small study."""

from __future__ import annotations

import json
import random

import pytest
import torch
from torch import nn

from lmforge.cli import main
from lmforge.errors import InputError
from lmforge.model import preset
from lmforge.runtime import Runtime
from lmforge.study.emergence import encode_item, item_text, make_items, score
from lmforge.tokenizer import train_tokenizer

KINDS = ["sort", "max", "count"]


@pytest.fixture(scope="module")
def tokenizer():
    items = make_items(400, 3, KINDS, random.Random(0))
    return train_tokenizer([item_text(item) for item in items], 320)


def test_items_hold_k_tasks_of_the_kinds_and_spans_hold_exactly_the_answers(tokenizer):
    held = make_items(20, 4, KINDS, random.Random(1))
    prompts = {task.prompt for item in held for task in item}
    train = make_items(200, 4, KINDS, random.Random(2), frozenset(prompts))
    assert all(len(item) == 4 and {t.kind for t in item} <= set(KINDS) for item in train + held)
    assert not prompts & {task.prompt for item in train for task in item}
    kinds = [t.kind for item in train for t in item]
    assert all(abs(kinds.count(kind) / len(kinds) - 1 / 3) < 0.05 for kind in KINDS)  # held-out questions skew none
    reverse_all = make_items(200, 5, ["reverse"], random.Random(4))  # about a hundred words: all held out
    with pytest.raises(InputError, match="reverse task has too few distinct questions"):
        make_items(5, 2, ["reverse", "max"], random.Random(5), frozenset(t.prompt for i in reverse_all for t in i))
    for item in held:
        ids, spans = encode_item(tokenizer, item)
        assert tokenizer.decode(ids[1:]) == item_text(item)
        for task, (start, end) in zip(item, spans):
            assert tokenizer.decode(ids[start:end - 1]) == " " + task.answer  # then the line break's first token
            assert tokenizer.decode(ids[end - 1:end]).startswith("\n")


class Oracle(nn.Module):
    """Puts all its probability on the gold next token, except inside the answers of ``wrong`` tasks."""

    def __init__(self, tokenizer, items, wrong: str, vocab: int):
        super().__init__()
        self.config = preset("tiny", vocab_size=vocab, max_seq_len=512)
        self.rows = [encode_item(tokenizer, item) for item in items]
        self.items, self.wrong, self.vocab = items, wrong, vocab

    def forward(self, ids):
        logits = torch.full((*ids.shape, self.vocab), -30.0)
        for row, inputs in enumerate(ids.tolist()):
            index = next(i for i, (tokens, _) in enumerate(self.rows) if tokens[:len(inputs)] == inputs[:len(tokens)])
            tokens, spans = self.rows[index]
            for position in range(min(len(inputs), len(tokens) - 1)):
                logits[row, position, tokens[position + 1]] = 0.0
            for task, (start, _) in zip(self.items[index], spans):
                if task.kind == self.wrong:  # likeliest: a wrong token, the gold one at probability about 1/2
                    logits[row, start - 1, (tokens[start] + 1) % self.vocab] = 0.1
        return logits


def test_scoring_counts_sub_tasks_and_whole_items_and_the_answers_likelihood(tokenizer):
    items = make_items(40, 3, KINDS, random.Random(3))
    runtime = Runtime.resolve("cpu", "fp32")
    perfect = score(Oracle(tokenizer, items, wrong="none", vocab=tokenizer.vocab_size), tokenizer, items, runtime, 8)
    assert (perfect["sub_accuracy"], perfect["whole_exact"], perfect["p_to_the_k"]) == (1.0, 1.0, 1.0)
    assert perfect["answer_logprob"] == pytest.approx(0.0, abs=1e-9)
    flawed = score(Oracle(tokenizer, items, wrong="max", vocab=tokenizer.vocab_size), tokenizer, items, runtime, 8)
    kinds = [[t.kind for t in item] for item in items]
    assert flawed["sub_accuracy"] == pytest.approx(sum(k != "max" for row in kinds for k in row) / (3 * len(items)))
    assert flawed["whole_exact"] == pytest.approx(sum("max" not in row for row in kinds) / len(items))
    assert flawed["p_to_the_k"] == pytest.approx(flawed["sub_accuracy"] ** 3)
    assert -1.0 < flawed["answer_logprob"] < perfect["answer_logprob"]


def study_args(root, *extra):
    return ["study", "emergence", "--out", str(root / "e"), "--sizes", "d32l1", "d64l1", "--budgets", "1e10",
            "3e10", "--vocab-size", "320", "--seq-len", "256", "--batch-size", "8", "--min-steps", "5", "--k", "3",
            "--train-items", "2000", "--eval-items", "30", "--eval-tokens", "4096", "--minutes", "5",
            "--progress", "false", *extra]


def test_a_small_emergence_study_runs_and_resumes(tmp_path, capsys):
    assert main(study_args(tmp_path)) == 0
    results = json.loads((tmp_path / "e" / "results.json").read_text())
    assert len(results["runs"]) == 4
    for row in results["runs"]:
        assert 0.0 <= row["whole_exact"] <= row["sub_accuracy"] <= 1.0 and row["answer_logprob"] < 0
        assert row["p_to_the_k"] == pytest.approx(row["sub_accuracy"] ** 3)
    assert (tmp_path / "e" / "emergence.png").stat().st_size > 0
    assert "whole task exact" in (tmp_path / "e" / "results.md").read_text()
    capsys.readouterr()
    assert main(study_args(tmp_path)) == 0
    assert "4 runs (4 finished)" in capsys.readouterr().out
    assert main(study_args(tmp_path, "--kinds", "docs")) == 2
    assert "choose from" in capsys.readouterr().err
    assert main(study_args(tmp_path, "--k", "4")) == 2  # another study in that folder
    assert "k 3 -> 4" in capsys.readouterr().err
    assert main(study_args(tmp_path, "--out", str(tmp_path / "long"), "--k", "12", "--seq-len", "64")) == 2
    assert "raise --seq-len" in capsys.readouterr().err
