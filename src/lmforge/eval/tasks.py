"""Task accuracy: ask a chat model every built-in task greedily (all through the batched engine) and
check each reply by exact match."""

from __future__ import annotations

from collections.abc import Sequence

from lmforge.data.tasks import Task, accuracy, is_correct


def evaluate_tasks(lm, tasks: Sequence[Task], system: str | None = None, max_new_tokens: int = 24,
                   examples: int = 0) -> dict:
    """``{"accuracy": {kind: fraction, "all": fraction}, "examples": [...]}`` for ``lm`` (a LanguageModel).

    Replies are greedy and end at the end of the assistant's turn; ``examples`` keeps that
    many (prompt, expected, reply) triples for reports. A task whose prompt leaves no room
    for the reply in the context window counts as wrong (``too_long`` says how many).
    """
    questions = [task.messages(system)[:-1] for task in tasks]  # the conversations without the answers
    fits = [len(lm.chat_prompt(q)) + max_new_tokens <= lm.model.config.max_seq_len for q in questions]
    batch = [{"messages": q} for q, fit in zip(questions, fits) if fit]  # decoded together by the engine
    replies = iter(lm.generate_batch(batch, temperature=0, max_new_tokens=max_new_tokens))
    outputs = [next(replies).text.strip() if fit else "" for fit in fits]  # too long for the context: wrong
    too_long = fits.count(False)
    shown = [{"kind": t.kind, "prompt": t.prompt, "expected": t.answer, "reply": o}
             for t, o in list(zip(tasks, outputs))[:examples]]
    correct = [is_correct(task, output) for task, output in zip(tasks, outputs)]
    return {"accuracy": accuracy(tasks, outputs), "correct": correct, "examples": shown, "too_long": too_long}


def accuracy_gain(before: dict, after: dict) -> dict:
    """The change in accuracy between two :func:`evaluate_tasks` results on the same tasks, with a 95%
    confidence interval for the paired difference: ``d_i = after_i − before_i`` per task, mean ± 1.96·s/√n."""
    pairs = list(zip(before["correct"], after["correct"]))
    if not pairs:
        return {"gain": 0.0, "ci95": [0.0, 0.0], "tasks": 0}
    diffs = [float(a) - float(b) for b, a in pairs]
    n = len(diffs)
    mean = sum(diffs) / n
    spread = (sum((d - mean) ** 2 for d in diffs) / (n - 1)) ** 0.5 if n > 1 else 0.0
    half = 1.96 * spread / n ** 0.5
    return {"gain": mean, "ci95": [mean - half, mean + half], "tasks": n}


def model_task_accuracy(model, tokenizer, runtime, tasks: Sequence[Task], system: str | None = None,
                        examples: int = 5) -> dict:
    """:func:`evaluate_tasks` for a bare model and tokenizer (a training command's before and after)."""
    from lmforge.api import LanguageModel

    return evaluate_tasks(LanguageModel(model.to(runtime.device), tokenizer, runtime), tasks, system, examples=examples)
