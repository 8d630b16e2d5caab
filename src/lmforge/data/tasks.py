"""Small verifiable instruction tasks, made offline, to fine-tune and measure a tiny assistant.

Each :class:`Task` is one user message with one short exact answer: arithmetic, counting letters,
spelling, reversing, sorting, the largest number, naming a topic of the Python language reference
(``pydoc_data.topics``, shipped with every Python), and a few fixed facts about the assistant itself.
:func:`generate_tasks` makes them from a seed, round robin over the kinds; :func:`train_eval_tasks`
makes a training set and an evaluation set that share no prompt; :func:`to_jsonl` writes them as
chat records for supervised fine-tuning (loss on the answer only). :func:`is_correct` and
:func:`accuracy` check a model's replies by exact match after :func:`normalize_answer`.
No network, no files read: everything comes from this module and the standard library.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from lmforge.files import write_text_atomic

ASSISTANT_NAME = "lmforge assistant"

WORDS = (
    "about", "after", "again", "apple", "banana", "because", "before", "bird", "black", "blue",
    "book", "bottle", "bread", "bridge", "brother", "butter", "cake", "candle", "carrot", "castle",
    "cat", "chair", "cherry", "circle", "city", "cloud", "coffee", "cookie", "country", "dinner",
    "doctor", "dog", "dollar", "dragon", "east", "egg", "elephant", "evening", "family", "farmer",
    "finger", "flower", "forest", "friend", "garden", "giraffe", "glass", "green", "guitar", "happy",
    "hello", "horse", "house", "island", "jacket", "kitchen", "letter", "lemon", "library", "little",
    "mirror", "monkey", "morning", "mountain", "music", "night", "number", "ocean", "orange", "paper",
    "pencil", "people", "pepper", "pizza", "planet", "purple", "python", "rabbit", "river", "school",
    "simple", "sister", "snow", "spoon", "spring", "strawberry", "street", "summer", "sun", "table",
    "teacher", "tiger", "tomato", "train", "tree", "turtle", "umbrella", "village", "water", "window",
    "winter", "world", "yellow", "zebra",
)
SHORT_WORDS = tuple(w for w in WORDS if len(w) <= 6)

IDENTITY = (
    (("Who are you?", "Who are you exactly?", "Tell me who you are."),
     f"I am {ASSISTANT_NAME}, a small language model trained with lmforge."),
    (("What is your name?", "What's your name?", "What should I call you?"),
     f"My name is {ASSISTANT_NAME}."),
    (("Who made you?", "Who created you?", "Who trained you?"),
     "I was trained with lmforge, a toolkit for building small language models."),
    (("What can you do?", "How can you help me?", "What are you good at?"),
     "I can do simple arithmetic, count and spell letters, sort numbers and name Python reference topics."),
    (("Are you a human?", "Are you a person?", "Are you human?"),
     f"No, I am {ASSISTANT_NAME}, a small language model."),
)

DOCS_QUOTE_WORDS = 8
DOCS_QUOTE_CHARS = 100
_DECORATION = set("*=-~^#+")
_MAX_DRAWS = 10_000  # draws of one kind before train_eval_tasks gives up on finding an unused prompt


@dataclass(frozen=True, slots=True)
class Task:
    """One user prompt and the exact short reply expected of the assistant."""

    kind: str
    prompt: str
    answer: str

    def messages(self, system: str | None = None) -> list[dict[str, str]]:
        """The task as a chat: an optional system message, the user's prompt, the assistant's answer."""
        head = [{"role": "system", "content": system}] if system else []
        return head + [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.answer}]


def _operand(rng: random.Random, max_digits: int) -> int:
    """A non-negative integer of 1 to ``max_digits`` digits, each digit count equally likely."""
    digits = rng.randint(1, max_digits)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _numbers(rng: random.Random, low: int, high: int) -> list[int]:
    """Three to six integers in ``[low, high]``."""
    return [rng.randint(low, high) for _ in range(rng.randint(3, 6))]


def _join(numbers: Sequence[int]) -> str:
    return ", ".join(str(n) for n in numbers)


def task_add(rng: random.Random) -> Task:
    """Addition of two numbers of 1-4 digits."""
    a, b = _operand(rng, 4), _operand(rng, 4)
    return Task("add", f"What is {a} + {b}?", str(a + b))


def task_subtract(rng: random.Random) -> Task:
    """Subtraction of two numbers of 1-4 digits; the result may be negative."""
    a, b = _operand(rng, 4), _operand(rng, 4)
    return Task("subtract", f"What is {a} - {b}?", str(a - b))


def task_multiply(rng: random.Random) -> Task:
    """Product of a 1-2 digit number and a 1-3 digit number, in either order."""
    a, b = _operand(rng, 2), _operand(rng, 3)
    if rng.random() < 0.5:
        a, b = b, a
    return Task("multiply", f"What is {a} * {b}?", str(a * b))


def task_count(rng: random.Random) -> Task:
    """How often a letter occurs in a word; one time in five the letter is absent (answer 0)."""
    word = rng.choice(WORDS)
    absent = sorted(set(string.ascii_lowercase) - set(word))
    letter = rng.choice(absent) if rng.random() < 0.2 else rng.choice(sorted(set(word)))
    return Task("count", f"How many times does the letter {letter} appear in {word}?", str(word.count(letter)))


def task_spell(rng: random.Random) -> Task:
    """A word spelled letter by letter, separated by spaces."""
    word = rng.choice(WORDS)
    return Task("spell", f"Spell the word {word}.", " ".join(word))


def task_reverse(rng: random.Random) -> Task:
    """A short word written backwards."""
    word = rng.choice(SHORT_WORDS)
    return Task("reverse", f"Reverse the word {word}.", word[::-1])


def task_sort(rng: random.Random) -> Task:
    """Three to six integers from 0 to 99, sorted ascending."""
    numbers = _numbers(rng, 0, 99)
    return Task("sort", f"Sort these numbers: {_join(numbers)}", _join(sorted(numbers)))


def task_max(rng: random.Random) -> Task:
    """The largest of three to six integers from 0 to 999."""
    numbers = _numbers(rng, 0, 999)
    return Task("max", f"What is the largest of these numbers: {_join(numbers)}?", str(max(numbers)))


def topic_words(text: str) -> list[str]:
    """The words of a reference topic, leaving out heading underlines (lines of ``*``, ``=``, ``-``)."""
    lines = [line for line in text.splitlines() if not (line.strip() and set(line.strip()) <= _DECORATION)]
    return " ".join(lines).split()


def _quote(text: str) -> str:
    """The first :data:`DOCS_QUOTE_WORDS` words of a topic, fewer if they pass :data:`DOCS_QUOTE_CHARS`."""
    words = topic_words(text)[:DOCS_QUOTE_WORDS]
    while len(words) > 1 and len(" ".join(words)) > DOCS_QUOTE_CHARS:
        words.pop()
    return " ".join(words)


@lru_cache(maxsize=1)
def docs_quotes() -> tuple[tuple[str, str], ...]:
    """``(topic key, opening quote)`` for the reference topics whose opening quote no other topic shares."""
    from pydoc_data.topics import topics

    quotes = {key: _quote(text) for key, text in sorted(topics.items())}
    counts: dict[str, int] = {}
    for quote in quotes.values():
        counts[quote] = counts.get(quote, 0) + 1
    return tuple((key, quote) for key, quote in quotes.items() if quote and counts[quote] == 1)


def task_docs(rng: random.Random) -> Task:
    """Name the Python language reference topic that begins with a quoted text; the answer is its key."""
    key, quote = rng.choice(docs_quotes())
    prompt = f"Which Python language reference topic begins with the following text: '{quote}'?"
    return Task("docs", prompt, key)


def task_identity(rng: random.Random) -> Task:
    """A question about the assistant itself, with its fixed answer."""
    phrasings, answer = rng.choice(IDENTITY)
    return Task("identity", rng.choice(phrasings), answer)


TASK_MAKERS: dict[str, Callable[[random.Random], Task]] = {
    "add": task_add,
    "subtract": task_subtract,
    "multiply": task_multiply,
    "count": task_count,
    "spell": task_spell,
    "reverse": task_reverse,
    "sort": task_sort,
    "max": task_max,
    "docs": task_docs,
    "identity": task_identity,
}
KINDS: tuple[str, ...] = tuple(TASK_MAKERS)
SHARED_KINDS = frozenset({"identity"})  # kinds whose eval prompts may also be in training (memorised facts)


def _check_kinds(kinds: Sequence[str]) -> list[str]:
    """``kinds`` as a list, or ValueError naming an unknown one (and the known ones) or an empty list."""
    kinds = list(kinds)
    for kind in kinds:
        if kind not in TASK_MAKERS:
            raise ValueError(f"unknown task kind {kind!r}; known kinds: {', '.join(KINDS)}")
    if not kinds:
        raise ValueError(f"no task kinds given; known kinds: {', '.join(KINDS)}")
    return kinds


def _generate(count: int, rng: random.Random, kinds: Sequence[str], avoid: frozenset[str]) -> list[Task]:
    """``count`` tasks round robin over ``kinds``, none with a prompt in ``avoid`` (except shared kinds)."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    kinds = _check_kinds(kinds)
    tasks = []
    for i in range(count):
        kind = kinds[i % len(kinds)]
        for _ in range(_MAX_DRAWS):
            task = TASK_MAKERS[kind](rng)
            if kind in SHARED_KINDS or task.prompt not in avoid:
                break
        else:
            raise ValueError(f"task kind {kind!r} has too few distinct prompts left after holding out "
                             f"{len(avoid)} evaluation prompts; ask for fewer evaluation tasks")
        tasks.append(task)
    return tasks


def generate_tasks(count: int, seed: int = 0, kinds: Sequence[str] = KINDS) -> list[Task]:
    """``count`` tasks, the same for the same seed, cycling through ``kinds`` in order (round robin)."""
    return _generate(count, random.Random(seed), kinds, frozenset())


def train_eval_tasks(
    train: int, eval: int, seed: int = 0, kinds: Sequence[str] = KINDS
) -> tuple[list[Task], list[Task]]:
    """A training set and an evaluation set that share no prompt, each round robin over ``kinds``.

    The two come from different random streams of ``seed``. The evaluation set is drawn first and
    its prompts are held out: training draws again whenever it meets one. So the evaluation set for
    a seed does not depend on ``train``, and a large training set cannot use up a kind with few
    prompts (``spell``, ``reverse`` and ``docs`` have about a hundred each).

    Exception: ``identity`` prompts (a handful of questions about the assistant) may appear in both
    sets; they test memorised facts, not a skill, and training must see them all.
    """
    eval_tasks = _generate(eval, random.Random(f"{seed}:eval"), kinds, frozenset())
    held_out = frozenset(t.prompt for t in eval_tasks if t.kind not in SHARED_KINDS)
    return _generate(train, random.Random(f"{seed}:train"), kinds, held_out), eval_tasks


def normalize_answer(text: str) -> str:
    """Lowercase, whitespace collapsed and stripped, one trailing period removed."""
    text = " ".join(text.lower().split())
    return text[:-1].rstrip() if text.endswith(".") else text


def is_correct(task: Task, output: str) -> bool:
    """Whether a reply matches the answer after :func:`normalize_answer`, whole or in its first line."""
    expected = normalize_answer(task.answer)
    first_line = output.lstrip().split("\n", 1)[0]
    return normalize_answer(output) == expected or normalize_answer(first_line) == expected


def accuracy(tasks: Sequence[Task], outputs: Sequence[str]) -> dict[str, float]:
    """Fraction of replies correct per kind (in order of first appearance) and over ``"all"`` (0.0 if none)."""
    if len(tasks) != len(outputs):
        raise ValueError(f"{len(tasks)} tasks but {len(outputs)} outputs")
    right: dict[str, list[bool]] = {}
    for task, output in zip(tasks, outputs):
        right.setdefault(task.kind, []).append(is_correct(task, output))
    scores = {kind: sum(marks) / len(marks) for kind, marks in right.items()}
    total = [mark for marks in right.values() for mark in marks]
    scores["all"] = sum(total) / len(total) if total else 0.0
    return scores


def to_jsonl(tasks: Sequence[Task], path: str | Path, system: str | None = None) -> None:
    """Write one chat record per line: ``{"messages": [...], "kind": ..., "answer": ...}``."""
    write_text_atomic(path, "".join(json.dumps({"messages": task.messages(system), "kind": task.kind,
                                                "answer": task.answer}, ensure_ascii=False) + "\n" for task in tasks))
