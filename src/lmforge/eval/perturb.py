"""Built-in prompt perturbations for robustness evaluation.

Each perturbation is a pure function of the text and a seed: it draws all its choices
from ``random.Random(seed)``, so the same (text, seed) always gives the same output and a
robustness report can be reproduced exactly. The character-level ones (:func:`typos`,
:func:`swap_chars`) never touch digits, so numbers in a question (and numeric answers)
keep their meaning; they perturb the wording, not the problem.

:data:`PERTURBATIONS` maps names to ``callable(text, seed)`` with default strengths, and
:func:`perturb` applies one by name. Compare scores on clean and perturbed prompts with
``lmforge.eval.metrics.attack_success_rate`` and ``performance_drop_rate``.

Left out on purpose: model-guided adversarial attacks (TextFooler, BERT-Attack, the
PromptBench search attacks), which need a second model and many queries per item.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

DEFAULT_RATE = 0.05
"""Share of eligible characters (or adjacent letter pairs) changed by the built-in
character-level perturbations."""

_KEYBOARD_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")


def _keyboard_neighbours() -> dict[str, str]:
    """Letters next to each letter on a QWERTY keyboard: the keys left and right in the
    same row, and the two touching keys in the row above (same index and one right) and
    below (one left and same index), as the rows are staggered."""
    neighbours: dict[str, str] = {}
    for r, row in enumerate(_KEYBOARD_ROWS):
        for i, key in enumerate(row):
            near = [row[j] for j in (i - 1, i + 1) if 0 <= j < len(row)]
            if r > 0:
                above = _KEYBOARD_ROWS[r - 1]
                near += [above[j] for j in (i, i + 1) if 0 <= j < len(above)]
            if r + 1 < len(_KEYBOARD_ROWS):
                below = _KEYBOARD_ROWS[r + 1]
                near += [below[j] for j in (i - 1, i) if 0 <= j < len(below)]
            neighbours[key] = "".join(near)
    return neighbours


KEYBOARD_NEIGHBOURS: dict[str, str] = _keyboard_neighbours()
"""For each lowercase ASCII letter, the letters on the QWERTY keys touching it."""


def _check_rate(rate: float) -> None:
    """Raise unless 0 <= rate <= 1."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")


def typos(text: str, rate: float = DEFAULT_RATE, seed: int = 0) -> str:
    """Keyboard typos: each ASCII letter, with probability ``rate``, is replaced by a
    QWERTY neighbour (case kept), deleted, or typed twice (one of the three, equally
    likely). Digits, spaces, punctuation and non-ASCII characters are never changed (the
    keyboard model is QWERTY); ``rate=0`` returns ``text`` unchanged.
    """
    _check_rate(rate)
    rng = random.Random(seed)
    out: list[str] = []
    for char in text:
        lower = char.lower()
        if lower not in KEYBOARD_NEIGHBOURS or rng.random() >= rate:
            out.append(char)
            continue
        edit = rng.choice(("substitute", "delete", "duplicate"))
        if edit == "substitute":
            typed = rng.choice(KEYBOARD_NEIGHBOURS[lower])
            out.append(typed.upper() if char.isupper() else typed)
        elif edit == "duplicate":
            out.append(char * 2)
    return "".join(out)


def swap_chars(text: str, rate: float = DEFAULT_RATE, seed: int = 0) -> str:
    """Swap adjacent letters inside words: scanning left to right, each pair of adjacent
    letters (``str.isalpha``, any script) is swapped with probability ``rate``; a swapped
    pair is skipped over, so no letter moves twice. Digits are not letters, so they never
    move; ``rate=0`` returns ``text`` unchanged.
    """
    _check_rate(rate)
    rng = random.Random(seed)
    chars = list(text)
    i = 0
    while i < len(chars) - 1:
        if chars[i].isalpha() and chars[i + 1].isalpha() and rng.random() < rate:
            chars[i], chars[i + 1] = chars[i + 1], chars[i]
            i += 2
        else:
            i += 1
    return "".join(chars)


DISTRACTORS: tuple[str, ...] = (
    "Note that the sky is blue.",
    "Remember that water boils at a high temperature.",
    "By the way, cats like to sleep in the sun.",
    "Incidentally, the library closes at six.",
    "Also, true is true and false is false.",
    "Keep in mind that trains usually run on time.",
)
"""Irrelevant sentences :func:`add_distractor` inserts."""


def add_distractor(text: str, seed: int = 0) -> str:
    """Add one irrelevant sentence from :data:`DISTRACTORS` before or after ``text``
    (the sentence and the side are drawn from the seed). The sentence is joined with a
    newline when ``text`` spans several lines (a prompt), else with a space."""
    rng = random.Random(seed)
    sentence = rng.choice(DISTRACTORS)
    prepend = rng.random() < 0.5
    if not text:
        return sentence
    separator = "\n" if "\n" in text else " "
    return sentence + separator + text if prepend else text + separator + sentence


INSTRUCTION_PARAPHRASES: dict[str, tuple[str, ...]] = {
    "Answer the following question": ("Respond to the following question", "Reply to the question below"),
    "Choose the correct answer": ("Pick the right answer", "Select the correct option"),
    "Let's think step by step": ("Let's work through this step by step", "Let's reason it out one step at a time"),
    "Summarize the following": ("Sum up the following", "Give a short summary of the following"),
    "Translate the following": ("Render the following", "Give a translation of the following"),
    "Question:": ("Query:", "Problem:"),
    "Answer:": ("Response:", "Reply:"),
    "Context:": ("Passage:", "Background:"),
    "Options:": ("Choices:", "Alternatives:"),
    "Choices:": ("Options:", "Alternatives:"),
}
"""Instruction phrases :func:`reword_instruction` recognises (case-insensitively) and the
paraphrases it may put in their place."""


def _phrase_pattern(phrases: list[str]) -> re.Pattern[str]:
    """One case-insensitive pattern matching any phrase, longest first, as whole words
    (a word boundary is required at an end only where the phrase ends in a word char)."""
    parts = []
    for phrase in sorted(phrases, key=len, reverse=True):
        start = r"\b" if re.match(r"\w", phrase[0]) else ""
        end = r"\b" if re.match(r"\w", phrase[-1]) else ""
        parts.append(start + re.escape(phrase) + end)
    return re.compile("|".join(parts), re.IGNORECASE)


_INSTRUCTION_PATTERN = _phrase_pattern(list(INSTRUCTION_PARAPHRASES))
_PARAPHRASES_BY_KEY = {phrase.lower(): options for phrase, options in INSTRUCTION_PARAPHRASES.items()}


def _match_case(found: str, replacement: str) -> str:
    """Give ``replacement`` the casing of ``found``: all capitals if ``found`` is (with more
    than one letter), capitalised if ``found`` starts with a capital, else lowercase first."""
    if found.isupper() and sum(c.isalpha() for c in found) > 1:
        return replacement.upper()
    first = replacement[0].upper() if found[0].isupper() else replacement[0].lower()
    return first + replacement[1:]


def reword_instruction(text: str, seed: int = 0) -> str:
    """Replace every instruction phrase of :data:`INSTRUCTION_PARAPHRASES` found in
    ``text`` (case-insensitively, whole words) by one of its paraphrases, drawn from the
    seed in order of appearance, keeping the phrase's case (``"ANSWER:"`` ->
    ``"RESPONSE:"``, ``"answer:"`` -> ``"response:"``). Text without such phrases is
    returned unchanged; the question's content is never reworded.
    """
    rng = random.Random(seed)

    def replace(match: re.Match[str]) -> str:
        found = match.group(0)
        return _match_case(found, rng.choice(_PARAPHRASES_BY_KEY[found.lower()]))

    return _INSTRUCTION_PATTERN.sub(replace, text)


PERTURBATIONS: dict[str, Callable[[str, int], str]] = {
    "typos": lambda text, seed: typos(text, rate=DEFAULT_RATE, seed=seed),
    "swap_chars": lambda text, seed: swap_chars(text, rate=DEFAULT_RATE, seed=seed),
    "add_distractor": add_distractor,
    "reword_instruction": reword_instruction,
}
"""The built-in perturbations by name, each ``callable(text, seed) -> text`` at its default
strength (:data:`DEFAULT_RATE` for the character-level ones)."""


def perturb(text: str, name: str, seed: int = 0) -> str:
    """Apply the perturbation called ``name`` (a key of :data:`PERTURBATIONS`) with ``seed``."""
    if name not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {name!r}; choose from: {', '.join(PERTURBATIONS)}")
    return PERTURBATIONS[name](text, seed)
