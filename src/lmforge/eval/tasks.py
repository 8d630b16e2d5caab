"""Task accuracy: ask a chat model each built-in task greedily and check its reply by exact match."""

from __future__ import annotations

from collections.abc import Sequence

from tqdm.auto import tqdm

from lmforge.data.tasks import Task, accuracy


def evaluate_tasks(lm, tasks: Sequence[Task], system: str | None = None, max_new_tokens: int = 24,
                   progress: bool = False, examples: int = 0) -> dict:
    """``{"accuracy": {kind: fraction, "all": fraction}, "examples": [...]}`` for ``lm`` (a LanguageModel).

    Replies are greedy and end at the end of the assistant's turn; ``examples`` keeps that
    many (prompt, expected, reply) triples for reports. A task whose prompt leaves no room
    for the reply in the context window counts as wrong (``too_long`` says how many).
    """
    outputs, too_long = [], 0
    for task in tqdm(tasks, desc="tasks", disable=not progress, leave=False):
        question = task.messages(system)[:-1]  # the conversation without the answer
        if len(lm.chat_prompt(question)) + max_new_tokens > lm.model.config.max_seq_len:
            outputs.append("")  # does not fit the context: counted as wrong
            too_long += 1
            continue
        outputs.append(lm.chat(question, temperature=0, max_new_tokens=max_new_tokens).strip())
    shown = [{"kind": t.kind, "prompt": t.prompt, "expected": t.answer, "reply": o}
             for t, o in list(zip(tasks, outputs))[:examples]]
    return {"accuracy": accuracy(tasks, outputs), "examples": shown, "too_long": too_long}
