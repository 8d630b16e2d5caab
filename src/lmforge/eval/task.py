"""What an evaluation task is: items, a prompt template, a request type and metrics.

A :class:`Task` holds its items (:class:`Item`: a question, optional choices, the gold
answer, an optional group for fairness metrics) in a test split and a train split (the
source of few-shot examples), and says how each item becomes a prompt and which of the
three request types scores it, the ones lm-evaluation-harness uses:

* ``multiple_choice``: the log-likelihood of each choice as a continuation of the prompt;
  the prediction is the likeliest choice (``acc``) or the likeliest per character (``acc_norm``,
  as lm-evaluation-harness).
* ``generate``: greedy generation until a stop string; the answer is extracted from the
  reply (strict: the whole reply, normalized; flexible: a pattern search) and compared
  with the gold answer (exact match, token F1, ROUGE...).
* ``perplexity``: the rolling log-likelihood of a whole text (perplexity, bits per byte).
* ``agent``: the agent loop with the task's ``tools``, beside the model asked once without
  them (:mod:`lmforge.agent.tasks`): success rate, parse rate, turns and tokens.

A prompt is ``description`` + the few-shot examples (each ``template`` filled and followed
by ``target_delimiter`` + its answer, separated by ``fewshot_delimiter``) + the item's
``template`` filled. Templates are ``str.format`` strings over the item's fields
(``{question}``, ``{choices}`` as lettered lines, ``{letters}``, and any key of ``meta``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["multiple_choice", "generate", "perplexity", "agent"]
KINDS: tuple[str, ...] = ("multiple_choice", "generate", "perplexity", "agent")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


# Metrics a task may name (``metrics``). A task always reports its kind's defaults (multiple
# choice: acc, acc_norm, ece, brier, selective_auc; generation: exact_match_strict/flexible,
# f1); naming one of those changes nothing. The others add: rouge (ROUGE-1/L per reply),
# bleu and chrf (corpus BLEU and chrF of the flexible replies, sacrebleu), aurc (the area
# under the risk-coverage curve, multiple choice).
DEFAULT_METRICS = frozenset({"acc", "acc_norm", "ece", "brier", "selective_auc", "exact_match", "f1"})
EXTRA_METRICS = {"rouge": "generate", "bleu": "generate", "chrf": "generate", "aurc": "multiple_choice"}
METRICS = DEFAULT_METRICS | set(EXTRA_METRICS)


# How an agent's answer comes back: "tool" (final_answer's argument, a JSON string: a number, a name) or
# "words" (a turn of its own, asked the question again: an answer that is code). lmforge.agent.loop's
# AgentConfig.answer takes the same.
AGENT_ANSWERS = ("tool", "words")


@dataclass(frozen=True)
class Item:
    """One thing to ask. ``answer``: the index of the right choice (multiple choice), the
    expected text (generation; ``aliases`` are other accepted texts), or nothing (perplexity,
    where ``question`` is the text scored)."""

    id: str
    question: str
    choices: tuple[str, ...] = ()
    answer: int | str | None = None
    aliases: tuple[str, ...] = ()
    group: str | None = None  # a demographic or other group, for fairness metrics
    meta: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def gold_text(self) -> str:
        """The right answer as text: the right choice, or the expected reply."""
        if self.choices:
            return self.choices[int(self.answer)]
        return "" if self.answer is None else str(self.answer)

    def fields(self) -> dict:
        """What a template may name."""
        lettered = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(self.choices))
        return {**self.meta, "question": self.question, "choices": lettered,
                "letters": ", ".join(LETTERS[: len(self.choices)])}


@dataclass
class Task:
    """A named set of items with how to prompt and score them (see the module docstring)."""

    name: str
    kind: Kind
    test: list[Item]
    train: list[Item] = field(default_factory=list)
    template: str = "Question: {question}\nAnswer:"
    target_delimiter: str = " "  # between the prompt and the answer (choice or reply)
    fewshot_delimiter: str = "\n\n"
    description: str = ""  # put before everything, once
    num_fewshot: int = 0
    stop: tuple[str, ...] = ("\n\n", "Question:")  # generation ends at the first of these
    max_new_tokens: int = 32
    answer_pattern: str | None = None  # flexible extraction: the first group of the last match
    metrics: tuple[str, ...] = ()  # reported beside the kind's defaults: names from METRICS
    language: str = "en"
    chat: bool = False  # a chat task: asked in the model's chat format unless told otherwise
    source: str = "builtin"  # where the items came from: builtin, a file path, an HF dataset name
    tools: tuple[str, ...] = ()  # agent tasks: the built-in tools the agent gets (lmforge.agent.tasks)
    # agent tasks: how the answer comes back unless `--agent-answer` says otherwise (AGENT_ANSWERS)
    agent_answer: str = "tool"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name!r}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.agent_answer not in AGENT_ANSWERS:
            raise ValueError(f"task {self.name!r}: agent_answer must be tool or words, got {self.agent_answer!r}")

    def render(self, item: Item) -> str:
        """The item's own prompt: the template filled in."""
        try:
            return self.template.format(**item.fields())
        except (KeyError, IndexError) as error:
            raise ValueError(f"task {self.name!r}: template field {error} is missing from item {item.id!r}") from None

    def target(self, item: Item) -> str:
        """What follows the prompt in a few-shot example (and what a choice is scored as)."""
        return self.target_delimiter + item.gold_text

    def fewshot_examples(self, item: Item, k: int, seed: int = 1234) -> list[Item]:
        """``k`` solved train items to show before ``item``: one seeded draw per task, the same for
        every item (never the item itself), so that all prompts share the examples as a prefix
        and a prefix cache computes them once. MMLU's fixed dev examples work the same way."""
        if k <= 0:
            return []
        if len(self.train) < k:
            raise ValueError(f"task {self.name!r} has {len(self.train)} train items; {k}-shot needs {k}")
        drawn = random.Random(f"{seed}:{self.name}").sample(self.train, min(k + 1, len(self.train)))
        return [t for t in drawn if t.id != item.id][:k]

    def context(self, item: Item, k: int | None = None, seed: int = 1234) -> str:
        """The full prompt for ``item``: description, ``k`` solved examples, the item's prompt."""
        k = self.num_fewshot if k is None else k
        shots = [self.render(t) + self.target(t) for t in self.fewshot_examples(item, k, seed)]
        return self.description + self.fewshot_delimiter.join([*shots, self.render(item)])
