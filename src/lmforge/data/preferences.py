"""Preference pairs (a prompt, a chosen answer, a rejected answer) for reward models and DPO.

Read from JSONL (:func:`read_preferences`), one record a line, or from a Hugging Face dataset
(:func:`read_hf_preferences`, ``hf:NAME[:CONFIG]:SPLIT``), one record a row, in any of these shapes:

- ``{"prompt": "text", "chosen": "text", "rejected": "text"}`` (a text prompt is one user message);
- ``{"prompt": [messages], "chosen": "text", "rejected": "text"}``;
- TRL's conversational format: ``chosen`` and ``rejected`` are lists of ``{"role", "content"}``
  messages whose last message is the assistant's answer. With ``prompt`` (text or messages) the
  lists' leading messages, if any, are appended to it (unless they already start with it); without it the leading messages, which
  must be the same in both lists, are the prompt;
- the lines of :func:`lmforge.eval.human.export_preferences` (prompt/chosen/rejected plus extra
  keys such as ``chosen_model``, ``rater``, ``criteria``: extra keys are ignored everywhere).

A bad line raises :class:`InputError` naming the file, the line and the field, or with
``skip_bad=True`` is skipped and counted by reason (``invalid_utf8``, ``invalid_json``,
``invalid_record``, ``missing_field``, ``wrong_type``, ``empty_text``, ``same_answer``,
``prompt_mismatch``).

:func:`builtin_preferences` makes pairs offline from the verifiable tasks of
:mod:`lmforge.data.tasks`; :func:`split_preferences` splits pairs into train and validation sets
that share no prompt; :func:`write_preferences` writes what :func:`read_preferences` reads.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lmforge.data.chat_records import _jsonl_rows
from lmforge.data.sources import ReadErrors, iter_hf_records
from lmforge.data.tasks import (
    IDENTITY,
    KINDS,
    Task,
    docs_quotes,
    generate_tasks,
    is_correct,
    train_eval_tasks,
)
from lmforge.errors import InputError
from lmforge.files import write_text_atomic
from lmforge.tokenizer.chat import check_messages

BUILTIN_PREFERENCES = "builtin-preferences"  # the data name of :func:`builtin_preferences` on the command line
SAMPLED_PREFERENCES = "sampled-preferences"  # the data name of :func:`preferences_from_samples`
PAIR_WRONG = "correct-vs-wrong"  # (a) the correct answer over a plausible wrong one
PAIR_MALFORMED = "clean-vs-malformed"  # (b) the correct answer over the same answer with noise
PAIR_KINDS = (PAIR_WRONG, PAIR_MALFORMED)
PAIR_SAMPLED = "sample-vs-sample"  # (c) a sampled answer the checker accepts over one it rejects
PAIR_ANSWER_SAMPLED = "answer-vs-sample"  # (c') no sample was right: the task's answer over a sampled one

# Noise for (b); each keeps the correct answer in it but is not a clean reply (fails ``is_correct``).
_CHATTER = (
    "The answer is probably {a} I think!!",
    "hmm ok so... {a}?? not 100% sure lol",
    "Well, let me think. It might be {a}, or maybe not.",
    "{a} {a} {a}",
    "Answer: {a}\n\nAnswer: {a}\n\nAnswer:",
    "As an AI I cannot be certain, but {a}.",
)
_MAX_TRIES = 100


@dataclass(frozen=True, slots=True)
class Preference:
    """A prompt (chat messages before the answer), the preferred answer, the worse one, and where it came from."""

    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    source: str


class _Bad(InputError):
    """A bad record, with the reason it is counted under when skipping."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# reading and writing


def _messages(value: object, where: str, field: str) -> list[dict[str, str]]:
    try:
        messages = check_messages(value, f"{where}: field '{field}'")
    except InputError as err:
        raise _Bad("wrong_type", str(err)) from None
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _answer(value: object, where: str, field: str) -> tuple[list[dict[str, str]] | None, str]:
    """(leading messages or None for a text answer, the answer text) of ``chosen`` / ``rejected``."""
    if isinstance(value, str):
        text = value
        head = None
    elif isinstance(value, list):
        messages = _messages(value, where, field)
        if messages[-1]["role"] != "assistant":
            raise _Bad("invalid_record", f"{where}: field '{field}': the last message must be the "
                                         f"assistant's answer, got role {messages[-1]['role']!r}")
        head, text = messages[:-1], messages[-1]["content"]
    else:
        raise _Bad("wrong_type", f"{where}: field '{field}' must be text or a list of messages, "
                                 f"got {type(value).__name__}")
    if not text.strip():
        raise _Bad("empty_text", f"{where}: field '{field}' is empty")
    return head, text


def record_to_preference(record: object, where: str) -> Preference:
    """The preference of one JSON record, or InputError naming ``where`` and the field at fault."""
    if not isinstance(record, dict):
        raise _Bad("invalid_record", f"{where}: expected a JSON object, got {type(record).__name__}")
    for field in ("chosen", "rejected"):
        if field not in record:
            raise _Bad("missing_field", f"{where}: missing field '{field}'")
    chosen_head, chosen = _answer(record["chosen"], where, "chosen")
    rejected_head, rejected = _answer(record["rejected"], where, "rejected")
    if (chosen_head or []) != (rejected_head or []):
        raise _Bad("prompt_mismatch", f"{where}: fields 'chosen' and 'rejected': the messages before "
                                      f"the answers differ (they must share the prompt)")
    head = chosen_head or []
    if "prompt" in record:
        value = record["prompt"]
        if isinstance(value, str):
            prompt = [{"role": "user", "content": value}]
        elif isinstance(value, list):
            prompt = _messages(value, where, "prompt")
        else:
            raise _Bad("wrong_type", f"{where}: field 'prompt' must be text or a list of messages, "
                                     f"got {type(value).__name__}")
        prompt = head if head[: len(prompt)] == prompt else prompt + head
    elif head:
        prompt = head
    else:
        raise _Bad("missing_field", f"{where}: missing field 'prompt' (needed unless 'chosen' and "
                                    f"'rejected' are conversations that include it)")
    if not any(m["content"].strip() for m in prompt):
        raise _Bad("empty_text", f"{where}: field 'prompt' is empty")
    if prompt[-1]["role"] == "assistant":
        raise _Bad("invalid_record", f"{where}: field 'prompt' must not end with an assistant message")
    if chosen.strip() == rejected.strip():
        raise _Bad("same_answer", f"{where}: fields 'chosen' and 'rejected' are the same answer")
    return Preference(prompt, chosen, rejected, where)


def read_preferences(path: str | Path, skip_bad: bool = False) -> tuple[list[Preference], dict]:
    """The preferences of a JSONL file (shapes in the module docstring) and
    ``{"read": n, "skipped": {reason: count}}``. A bad line raises InputError naming file, line and
    field, or with ``skip_bad`` is skipped and counted. Blank lines are ignored."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"preference data not found: {path}")
    errors = ReadErrors(skip=skip_bad)
    return _preferences_of(_jsonl_rows(path, errors), errors)


def read_hf_preferences(spec: str, skip_bad: bool = False) -> tuple[list[Preference], dict]:
    """The preferences of a Hugging Face dataset named ``hf:NAME[:CONFIG]:SPLIT`` (needs ``datasets`` and a
    network), whose rows have the shapes a JSONL line may have (TRL's preference sets do); bad rows raise or
    are skipped and counted as in :func:`read_preferences`."""
    errors = ReadErrors(skip=skip_bad)
    return _preferences_of(iter_hf_records(spec), errors)


def _preferences_of(records: Iterable[tuple[str, object]], errors: ReadErrors) -> tuple[list[Preference], dict]:
    """The preferences of (where, record) pairs, bad ones reported to ``errors``, and what was read/skipped."""
    prefs = []
    for where, record in records:
        try:
            prefs.append(record_to_preference(record, where))
        except _Bad as err:
            errors.report(err.reason, str(err))
    return prefs, {"read": len(prefs), "skipped": dict(errors.counts)}


def write_preferences(prefs: Sequence[Preference], path: str | Path) -> int:
    """Write one ``{"prompt": [messages], "chosen", "rejected", "source"}`` line per preference
    (``source`` is an extra key that :func:`read_preferences` ignores); returns the lines written."""
    write_text_atomic(path, "".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected,
                                                "source": p.source}, ensure_ascii=False) + "\n" for p in prefs))
    return len(prefs)


# ---------------------------------------------------------------------------------------------
# built-in pairs from the verifiable tasks


def _misspell(word: str, rng: random.Random) -> str:
    """``word`` with one letter dropped, doubled, or swapped with a different neighbour."""
    i = rng.randrange(len(word))
    op = rng.choice(("drop", "double", "swap")) if len(word) > 2 else "double"
    if op == "drop":
        return word[:i] + word[i + 1:]
    if op == "double":
        return word[:i] + word[i] + word[i:]
    swaps = [j for j in range(len(word) - 1) if word[j] != word[j + 1]]
    if not swaps:
        return word + word[-1]
    j = rng.choice(swaps)
    return word[:j] + word[j + 1] + word[j] + word[j + 2:]


def _off_by(number: int, rng: random.Random, low: int | None = None) -> int:
    wrong = number + rng.choice((-2, -1, 1, 2))
    return number + 1 if low is not None and wrong < low else wrong


def _wrong_once(task: Task, rng: random.Random) -> str:
    answer = task.answer
    if task.kind in ("add", "subtract", "multiply"):
        return str(_off_by(int(answer), rng))
    if task.kind == "count":
        return str(_off_by(int(answer), rng, low=0))
    if task.kind == "max":
        listed = [int(n) for n in re.findall(r"-?\d+", task.prompt.split(":", 1)[-1])]
        others = sorted({n for n in listed if n != int(answer)})
        return str(rng.choice(others)) if others else str(_off_by(int(answer), rng, low=0))
    if task.kind == "sort":
        numbers = [int(n) for n in answer.split(", ")]
        swaps = [i for i in range(len(numbers) - 1) if numbers[i] != numbers[i + 1]]
        if swaps:
            i = rng.choice(swaps)
            numbers[i], numbers[i + 1] = numbers[i + 1], numbers[i]
        else:
            numbers[rng.randrange(len(numbers))] += 1
        return ", ".join(str(n) for n in numbers)
    if task.kind == "spell":
        return " ".join(_misspell(answer.replace(" ", ""), rng))
    if task.kind == "reverse":
        return _misspell(answer, rng)
    if task.kind == "docs":
        return rng.choice(docs_quotes())[0]
    if task.kind == "identity":
        return rng.choice(IDENTITY)[1]
    if re.fullmatch(r"-?\d+", answer):
        return str(_off_by(int(answer), rng))
    words = answer.split()
    i = rng.randrange(len(words))
    words[i] = _misspell(words[i], rng)
    return " ".join(words)


def wrong_answer(task: Task, rng: random.Random) -> str:
    """A plausible wrong answer to ``task``: a number off by one or two (the largest-number task:
    another number of the list; sorting: two neighbours swapped), a misspelled word (spelling,
    reversing), another topic key (docs), another fixed reply (identity). Never passes ``is_correct``."""
    for _ in range(_MAX_TRIES):
        wrong = _wrong_once(task, rng)
        if wrong.strip() and not is_correct(task, wrong):
            return wrong
    return f"{task.answer} {task.answer}"  # never reached for the built-in kinds


def malformed_answer(task: Task, rng: random.Random) -> str:
    """The correct answer with chatter or format noise around it (hedging, repetition, a dangling
    "Answer:"), or, for answers of 12 characters or more, cut off half way with no end. Fails ``is_correct``."""
    answer = task.answer
    for _ in range(_MAX_TRIES):
        if len(answer) >= 12 and rng.random() < 0.25:
            bad = answer[: len(answer) // 2].rstrip()
        else:
            bad = rng.choice(_CHATTER).format(a=answer)
        if not is_correct(task, bad):
            return bad
    return f"The answer is probably {answer} I think!!"


def builtin_preferences(count: int, seed: int = 0) -> list[Preference]:
    """``count`` preference pairs from ``generate_tasks(count, seed)`` (same seed, same pairs).

    Pair ``i`` is (a) :data:`PAIR_WRONG` -- the correct answer over :func:`wrong_answer` -- or
    (b) :data:`PAIR_MALFORMED` -- the correct answer over :func:`malformed_answer` (the same
    answer with chatter or cut short); the two alternate in equal shares (at most one apart), the
    order flipping every round of task kinds so that each kind gets both. The prompt is the task's
    user message; ``source`` is ``builtin:<seed>:<i>:<task kind>:<pair kind>``.
    """
    return preferences_from_tasks(generate_tasks(count, seed), seed)


def preferences_from_tasks(tasks: Sequence[Task], seed: int = 0) -> list[Preference]:
    """One pair per task, made as :func:`builtin_preferences` makes them (for tasks drawn elsewhere, such as
    the training half of :func:`lmforge.data.tasks.train_eval_tasks`)."""
    rng = random.Random(f"{seed}:preferences")
    prefs = []
    for i, task in enumerate(tasks):
        pair = PAIR_KINDS[(i + i // len(KINDS)) % 2]
        rejected = wrong_answer(task, rng) if pair == PAIR_WRONG else malformed_answer(task, rng)
        prefs.append(Preference([{"role": "user", "content": task.prompt}], task.answer, rejected,
                                f"builtin:{seed}:{i}:{task.kind}:{pair}"))
    return prefs


def preferences_from_samples(tasks: Sequence[Task], samples: Sequence[Sequence[str]],
                             seed: int = 0) -> tuple[list[Preference], int]:
    """Pairs from a model's own answers, ranked by the tasks' checker (``samples[i]``: answers to ``tasks[i]``).

    For each task, an answer that :func:`~lmforge.data.tasks.is_correct` accepts (:data:`PAIR_SAMPLED`) or,
    when none is, the task's own answer (:data:`PAIR_ANSWER_SAMPLED`) is chosen over one it rejects, each
    drawn at random among its kind. A task whose answers are all accepted gives no pair: returns the pairs
    and the number of such tasks. ``source`` is ``sampled:<seed>:<i>:<task kind>:<pair kind>``.
    """
    if len(samples) != len(tasks):
        raise ValueError(f"{len(samples)} lists of answers for {len(tasks)} tasks")
    rng = random.Random(f"{seed}:sampled-preferences")
    prefs, all_correct = [], 0
    for i, (task, answers) in enumerate(zip(tasks, samples)):
        right = [a for a in answers if is_correct(task, a)]
        wrong = [a for a in answers if a.strip() and not is_correct(task, a)]
        if not wrong:
            all_correct += 1
            continue
        pair = PAIR_SAMPLED if right else PAIR_ANSWER_SAMPLED
        chosen = rng.choice(right) if right else task.answer
        prefs.append(Preference([{"role": "user", "content": task.prompt}], chosen, rng.choice(wrong),
                                f"sampled:{seed}:{i}:{task.kind}:{pair}"))
    return prefs, all_correct


def split_preferences(prefs: Sequence[Preference], val_fraction: float,
                      seed: int = 0) -> tuple[list[Preference], list[Preference]]:
    """(train, val): about ``val_fraction`` of the distinct prompts (at least one when the fraction
    is above 0 and there are two or more prompts) go to val with all their pairs; no prompt is in
    both. The choice depends on ``seed``; each part keeps the input order."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    keys = list(dict.fromkeys(json.dumps(p.prompt, sort_keys=True) for p in prefs))
    n_val = round(len(keys) * val_fraction)
    if val_fraction > 0 and len(keys) >= 2:
        n_val = min(max(n_val, 1), len(keys) - 1)
    random.Random(seed).shuffle(keys)
    held = set(keys[:n_val])
    train, val = [], []
    for p in prefs:
        (val if json.dumps(p.prompt, sort_keys=True) in held else train).append(p)
    return train, val


def load_pairs(specs: Sequence[str], count: int, seed: int, skip_bad: bool = False, eval_tasks: int = 0,
               kinds: Sequence[str] = KINDS,
               sample_answers: Callable[[Sequence[Task]], list[list[str]]] | None = None,
               ) -> tuple[list[Preference], dict, list[Task]]:
    """The pairs of every spec (a ``.jsonl`` file, a Hugging Face dataset ``hf:NAME[:CONFIG]:SPLIT``, or
    :data:`BUILTIN_PREFERENCES`, ``count`` pairs of the
    task ``kinds``), a summary of what was read and skipped per spec, and ``eval_tasks`` built-in tasks
    held out from the built-in pairs (no shared prompt), to measure what training on them changed.

    :data:`SAMPLED_PREFERENCES` makes pairs of the same ``count`` tasks from the answers that
    ``sample_answers`` (a model's sampler, given by the command that trains) gives to them
    (:func:`preferences_from_samples`); tasks whose answers were all right are counted as skipped."""
    pairs: list[Preference] = []
    read: dict[str, dict] = {}
    held_out: list[Task] = []
    for spec in specs:
        if spec == BUILTIN_PREFERENCES:
            train, held_out = train_eval_tasks(count, eval_tasks, seed, kinds)
            made = preferences_from_tasks(train, seed)
            pairs += made
            read[spec] = {"read": len(made), "skipped": {}}
        elif spec == SAMPLED_PREFERENCES:
            if sample_answers is None:
                raise InputError(f"{SAMPLED_PREFERENCES} needs a model to sample answers from; this command has none")
            train, held_out = train_eval_tasks(count, eval_tasks, seed, kinds)
            made, all_right = preferences_from_samples(train, sample_answers(train), seed)
            pairs += made
            read[spec] = {"read": len(made), "skipped": {"all_answers_correct": all_right} if all_right else {}}
        else:
            read_spec = read_hf_preferences if spec.startswith("hf:") else read_preferences
            found, summary = read_spec(spec, skip_bad=skip_bad)
            pairs += found
            read[spec] = summary
    if not pairs:
        raise InputError("no preference pairs to train on (--data)")
    return pairs, read, held_out
