"""Built-in task accuracy of a chat model: per-task marks, and the paired gain between two runs."""

from __future__ import annotations

import pytest

from lmforge.data.tasks import generate_tasks
from lmforge.eval.tasks import accuracy_gain, evaluate_tasks


class Echo:
    """A stand-in LanguageModel that answers the first ``right`` tasks correctly and the rest wrongly."""

    def __init__(self, tasks, right):
        self.answers = [t.answer if i < right else "no idea" for i, t in enumerate(tasks)]
        self.model = type("M", (), {"config": type("C", (), {"max_seq_len": 512})})()

    def chat_prompt(self, messages):
        return [0] * 8

    def generate_batch(self, batch, **_):
        return [type("R", (), {"text": a}) for a in self.answers[:len(batch)]]


def test_marks_and_paired_gain_with_its_interval():
    tasks = generate_tasks(10, seed=0)
    before, after = evaluate_tasks(Echo(tasks, 2), tasks), evaluate_tasks(Echo(tasks, 7), tasks)
    assert before["correct"] == [True] * 2 + [False] * 8 and before["accuracy"]["all"] == pytest.approx(0.2)
    gain = accuracy_gain(before, after)
    diffs = [0.0] * 2 + [1.0] * 5 + [0.0] * 3  # five tasks went from wrong to right
    mean = sum(diffs) / 10
    half = 1.96 * (sum((d - mean) ** 2 for d in diffs) / 9) ** 0.5 / 10 ** 0.5
    assert gain["gain"] == pytest.approx(0.5) and gain["tasks"] == 10
    assert gain["ci95"] == pytest.approx([0.5 - half, 0.5 + half])
    assert accuracy_gain(after, after)["ci95"] == [0.0, 0.0]
