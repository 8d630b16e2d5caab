"""Prompt perturbations: seeded determinism, strength 0 is identity, digits survive, and the
name registry."""

from __future__ import annotations

import re

import pytest

from lmforge.eval.perturb import (
    DISTRACTORS,
    KEYBOARD_NEIGHBOURS,
    PERTURBATIONS,
    add_distractor,
    perturb,
    reword_instruction,
    swap_chars,
    typos,
)

PROMPT = (
    "Question: A farmer has 17 sheep and buys 25 more. How many sheep does the farmer have now?\n"
    "Answer the following question with a number.\n"
    "Answer:"
)


@pytest.mark.parametrize("name", sorted(PERTURBATIONS))
def test_each_perturbation_is_deterministic_and_seed_dependent(name):
    outputs = [perturb(PROMPT, name, seed) for seed in range(8)]
    assert outputs == [perturb(PROMPT, name, seed) for seed in range(8)]  # same seed, same text
    assert len(set(outputs)) > 1  # seeds differ
    assert all(out != PROMPT for out in outputs)  # the prompt is long enough to be changed


@pytest.mark.parametrize("function", [typos, swap_chars])
def test_rate_zero_is_identity_and_digits_survive(function):
    assert function(PROMPT, rate=0.0, seed=3) == PROMPT
    text = "Room 101, 2024-06-01: pay 3.50 for item 42b and 7x."
    for seed in range(20):
        changed = function(text, rate=1.0, seed=seed)
        assert re.findall(r"\d", changed) == re.findall(r"\d", text)  # digits kept, in order
        assert re.findall(r"\d+", changed) == re.findall(r"\d+", text)  # and never split or joined
    with pytest.raises(ValueError, match="rate"):
        function(text, rate=1.5, seed=0)


def test_typos_edits_are_keyboard_neighbours_deletions_or_doubles():
    for seed in range(20):
        out = typos("g", rate=1.0, seed=seed)
        assert out in {"", "gg"} or (len(out) == 1 and out in KEYBOARD_NEIGHBOURS["g"])
        assert typos("G", rate=1.0, seed=seed) == out.upper()  # case kept
    assert set(KEYBOARD_NEIGHBOURS["a"]) == set("qwsz")
    assert typos("日本語 ✓ ü", rate=1.0, seed=0) == "日本語 ✓ ü"  # only ASCII letters are typed


def test_swap_chars_swaps_adjacent_letters_within_words():
    for seed in range(20):
        out = swap_chars("ab cd", rate=1.0, seed=seed)
        assert out == "ba dc"  # every pair swapped, never across the space
    out = swap_chars("abcdef", rate=0.5, seed=1)
    assert sorted(out) == sorted("abcdef")  # a permutation of the same letters


def test_add_distractor_uses_a_fixed_sentence_on_either_side():
    sides = set()
    for seed in range(20):
        out = add_distractor("What is 2 + 2?", seed)
        sentence = next(s for s in DISTRACTORS if s in out)
        assert out in (f"{sentence} What is 2 + 2?", f"What is 2 + 2? {sentence}")
        sides.add(out.startswith(sentence))
    assert sides == {True, False}
    assert "\n" in add_distractor("line one\nline two", 0)  # prompts keep their line structure
    assert add_distractor("", 0) in DISTRACTORS


def test_reword_instruction_paraphrases_with_case():
    out = reword_instruction("Question: Why?\nAnswer:", seed=0)
    assert out.split("\n")[0] in ("Query: Why?", "Problem: Why?")
    assert out.split("\n")[1] in ("Response:", "Reply:")
    assert reword_instruction("ANSWER:", 0) in ("RESPONSE:", "REPLY:")
    assert reword_instruction("answer:", 0) in ("response:", "reply:")
    # longest phrase wins, and only whole words are replaced
    assert reword_instruction("Answer the following question.", 0).startswith(("Respond to", "Reply to"))
    assert reword_instruction("Answered: no. Contexts: none.", 0) == "Answered: no. Contexts: none."
    assert reword_instruction("Nothing to reword here.", 5) == "Nothing to reword here."


def test_unknown_name_lists_the_choices():
    with pytest.raises(ValueError) as error:
        perturb(PROMPT, "leetspeak", 0)
    for name in PERTURBATIONS:
        assert name in str(error.value)
