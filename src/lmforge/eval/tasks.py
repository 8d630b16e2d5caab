"""Task accuracy: ask a chat model every built-in task greedily (all through the batched engine) and
check each reply by exact match."""

from __future__ import annotations

from collections.abc import Sequence

from lmforge.data.tasks import Task, accuracy


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
    return {"accuracy": accuracy(tasks, outputs), "examples": shown, "too_long": too_long}


def model_task_accuracy(model, tokenizer, runtime, tasks: Sequence[Task], system: str | None = None,
                        examples: int = 5) -> dict:
    """:func:`evaluate_tasks` for a bare model and tokenizer (a training command's before and after)."""
    from lmforge.api import LanguageModel

    return evaluate_tasks(LanguageModel(model.to(runtime.device), tokenizer, runtime), tasks, system, examples=examples)
