"""Preference pairs: reading (plain, TRL conversational, human-rating export), errors, writing, built-in pairs, split."""

from __future__ import annotations

import json
import random

import pytest

from lmforge.data.preferences import (
    PAIR_MALFORMED,
    PAIR_WRONG,
    Preference,
    builtin_preferences,
    load_pairs,
    malformed_answer,
    preferences_from_samples,
    read_preferences,
    split_preferences,
    write_preferences,
    wrong_answer,
)
from lmforge.data.tasks import KINDS, Task, generate_tasks, is_correct
from lmforge.errors import InputError


def _write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines),
                    encoding="utf-8")
    return path


def _user(text):
    return [{"role": "user", "content": text}]


def test_round_trip(tmp_path):
    prefs = [
        Preference(_user("What is 2 + 2?"), "4", "5", "x"),
        Preference([{"role": "system", "content": "Be brief."}, *_user("Hi"), {"role": "assistant", "content": "Hello"},
                    *_user("Spell cat.")], "c a t", "c a a t", "y"),
        Preference(_user("ünïcode ✓"), "ja\nnein", "nein", "z"),
    ]
    path = tmp_path / "p.jsonl"
    assert write_preferences(prefs, path) == 3
    back, stats = read_preferences(path)
    assert stats == {"read": 3, "skipped": {}}
    assert [(p.prompt, p.chosen, p.rejected) for p in back] == [(p.prompt, p.chosen, p.rejected) for p in prefs]
    assert [p.source for p in back] == [f"{path}:{n}" for n in (1, 2, 3)]


def test_text_prompt_is_one_user_message(tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "Q?", "chosen": "A", "rejected": "B"}, ""])
    (pref,), stats = read_preferences(path)
    assert pref == Preference(_user("Q?"), "A", "B", f"{path}:1")
    assert stats["read"] == 1


def test_trl_conversational(tmp_path):
    system = {"role": "system", "content": "Be kind."}
    implicit = {"chosen": [system, *_user("Q?"), {"role": "assistant", "content": "good"}],
                "rejected": [system, *_user("Q?"), {"role": "assistant", "content": "bad"}]}
    explicit = {"prompt": [system, *_user("Q?")], "chosen": [{"role": "assistant", "content": "good"}],
                "rejected": [{"role": "assistant", "content": "bad"}]}
    duplicated = {"prompt": [system, *_user("Q?")], **implicit}
    path = _write(tmp_path / "p.jsonl", [implicit, explicit, duplicated])
    prefs, _ = read_preferences(path)
    assert [(p.prompt, p.chosen, p.rejected) for p in prefs] == [([system, *_user("Q?")], "good", "bad")] * 3


def test_human_rating_export_lines(tmp_path):
    lines = [
        {"prompt": "Name a fruit.", "chosen": "apple", "rejected": "car", "chosen_model": "a", "rejected_model": "b",
         "item": 3, "rater": "ann", "criteria": {"chosen": {"helpful": 5}, "rejected": {"helpful": 1}}, "comment": ""},
        {"prompt": "Name a fruit.", "chosen": "pear", "rejected": "car", "chosen_model": "a", "rejected_model": "b",
         "item": 4, "raters": ["ann", "bob"], "votes": {"a": 2, "b": 0, "tie": 0}, "criteria": {}},
    ]
    prefs, stats = read_preferences(_write(tmp_path / "h.jsonl", lines))
    assert stats == {"read": 2, "skipped": {}}
    assert [(p.prompt, p.chosen, p.rejected) for p in prefs] == [
        (_user("Name a fruit."), "apple", "car"), (_user("Name a fruit."), "pear", "car")]


GOOD = {"prompt": "Q?", "chosen": "A", "rejected": "B"}
BAD = [  # (line, reason, words the message must contain)
    ({"prompt": "Q?", "rejected": "B"}, "missing_field", "'chosen'"),
    ({"prompt": "Q?", "chosen": "A"}, "missing_field", "'rejected'"),
    ({"chosen": "A", "rejected": "B"}, "missing_field", "'prompt'"),
    ({"prompt": 5, "chosen": "A", "rejected": "B"}, "wrong_type", "'prompt'"),
    ({"prompt": "Q?", "chosen": 1, "rejected": "B"}, "wrong_type", "'chosen'"),
    ({"prompt": "Q?", "chosen": "A", "rejected": [{"role": "nobody", "content": "x"}]}, "wrong_type", "'rejected'"),
    ({"prompt": "Q?", "chosen": "A", "rejected": _user("B")}, "invalid_record", "'rejected'"),
    ({"prompt": "Q?", "chosen": "same", "rejected": " same "}, "same_answer", "'chosen' and 'rejected'"),
    ({"prompt": "Q?", "chosen": "  ", "rejected": "B"}, "empty_text", "'chosen'"),
    ({"prompt": "", "chosen": "A", "rejected": "B"}, "empty_text", "'prompt'"),
    ({"chosen": [*_user("Q1"), {"role": "assistant", "content": "A"}],
      "rejected": [*_user("Q2"), {"role": "assistant", "content": "B"}]}, "prompt_mismatch", "'chosen' and 'rejected'"),
    ("[1, 2]", "invalid_record", "JSON object"),
    ('{"prompt": "Q?", "chosen": ', "invalid_json", "invalid JSON"),
]


@pytest.mark.parametrize(("line", "reason", "words"), BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_errors_name_file_line_and_field(tmp_path, line, reason, words):
    path = _write(tmp_path / "bad.jsonl", [GOOD, line])
    with pytest.raises(InputError) as err:
        read_preferences(path)
    assert f"{path}:2" in str(err.value)
    assert words in str(err.value)


def test_skip_bad_counts_reasons(tmp_path):
    path = _write(tmp_path / "bad.jsonl", [GOOD] + [line for line, _, _ in BAD] + [GOOD])
    prefs, stats = read_preferences(path, skip_bad=True)
    expected: dict[str, int] = {}
    for _, reason, _ in BAD:
        expected[reason] = expected.get(reason, 0) + 1
    assert len(prefs) == 2 and stats == {"read": 2, "skipped": expected}
    assert [p.source for p in prefs] == [f"{path}:1", f"{path}:{len(BAD) + 2}"]


def test_hugging_face_dataset_rows(monkeypatch):
    import sys
    import types

    rows = [{"prompt": "2+2?", "chosen": [{"role": "assistant", "content": "4"}],  # TRL's conversational rows
             "rejected": [{"role": "assistant", "content": "5"}]},
            {"prompt": "Capital of France?", "chosen": "Paris", "rejected": ""},
            {"prompt": "Colour of snow?", "chosen": "white", "rejected": "black"}]
    asked = []
    module = types.ModuleType("datasets")
    module.load_dataset = lambda name, config, split, streaming: asked.append((name, config, split)) or iter(rows)
    monkeypatch.setitem(sys.modules, "datasets", module)
    with pytest.raises(InputError, match=r"hf:org/prefs:train:2: field 'rejected' is empty"):
        load_pairs(["hf:org/prefs:train"], count=0, seed=0)
    pairs, read, _ = load_pairs(["hf:org/prefs:train"], count=0, seed=0, skip_bad=True)
    assert asked[-1] == ("org/prefs", None, "train")
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [(_user("2+2?"), "4", "5"),
                                                                  (_user("Colour of snow?"), "white", "black")]
    assert read == {"hf:org/prefs:train": {"read": 2, "skipped": {"empty_text": 1}}}


def test_sampled_answers_ranked_by_the_checker():
    tasks = [Task("max", "Largest of 3, 9, 4?", "9"), Task("max", "Largest of 1, 2?", "2"),
             Task("max", "Largest of 5, 7?", "7")]
    samples = [["9", "4", "I think 3", "9"],  # right and wrong: a right one over a wrong one
               ["1", "one", ""],  # none right: the task's answer over a wrong one (never the empty answer)
               ["7", "7"]]  # all right: no pair
    prefs, all_right = preferences_from_samples(tasks, samples, seed=3)
    assert all_right == 1 and len(prefs) == 2
    assert prefs[0].chosen == "9" and prefs[0].rejected in ("4", "I think 3")
    assert prefs[1].chosen == "2" and prefs[1].rejected in ("1", "one")
    assert [p.source.rsplit(":", 1)[1] for p in prefs] == ["sample-vs-sample", "answer-vs-sample"]
    assert prefs == preferences_from_samples(tasks, samples, seed=3)[0]  # seeded
    asked = []
    pairs, read, held_out = load_pairs(["sampled-preferences"], count=6, seed=0, eval_tasks=4, kinds=["max"],
                                       sample_answers=lambda ts: asked.extend(ts) or [["0", t.answer] for t in ts])
    assert len(asked) == 6 and not {t.prompt for t in asked} & {t.prompt for t in held_out}
    assert len(pairs) == 6 and read == {"sampled-preferences": {"read": 6, "skipped": {}}}
    with pytest.raises(InputError, match="needs a model"):
        load_pairs(["sampled-preferences"], count=6, seed=0)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_preferences(tmp_path / "none.jsonl")


def _pair_kind(pref):
    return pref.source.rsplit(":", 1)[1]


def test_builtin_deterministic_and_correct():
    count, seed = 60, 7
    prefs = builtin_preferences(count, seed)
    assert prefs == builtin_preferences(count, seed)
    assert prefs != builtin_preferences(count, seed + 1)
    tasks = generate_tasks(count, seed)
    kinds = [_pair_kind(p) for p in prefs]
    assert kinds.count(PAIR_WRONG) == kinds.count(PAIR_MALFORMED) == count // 2
    for task in KINDS:  # every task kind gets both kinds of pair
        assert {_pair_kind(p) for p, t in zip(prefs, tasks) if t.kind == task} == {PAIR_WRONG, PAIR_MALFORMED}
    for pref, task in zip(prefs, tasks):
        assert pref.prompt == _user(task.prompt) and pref.chosen == task.answer
        assert is_correct(task, pref.chosen) and not is_correct(task, pref.rejected)
        assert pref.rejected.strip() and pref.rejected != pref.chosen
        if _pair_kind(pref) == PAIR_MALFORMED:
            assert task.answer[: len(task.answer) // 2].rstrip() in pref.rejected


def test_wrong_and_malformed_answers_over_many_tasks():
    rng = random.Random(0)
    for task in generate_tasks(300, seed=3):
        wrong, bad = wrong_answer(task, rng), malformed_answer(task, rng)
        assert not is_correct(task, wrong) and not is_correct(task, bad)
        if task.kind in ("add", "subtract", "multiply", "count"):
            assert 1 <= abs(int(wrong) - int(task.answer)) <= 2
        if task.kind == "spell":
            assert len(wrong.replace(" ", "")) - len(task.answer.replace(" ", "")) in (-1, 0, 1)


def test_builtin_round_trips_through_file(tmp_path):
    prefs = builtin_preferences(20, seed=1)
    write_preferences(prefs, tmp_path / "b.jsonl")
    back, stats = read_preferences(tmp_path / "b.jsonl")
    assert stats["read"] == 20
    assert [(p.prompt, p.chosen, p.rejected) for p in back] == [(p.prompt, p.chosen, p.rejected) for p in prefs]


def test_split_disjoint_by_prompt():
    prefs = builtin_preferences(200, seed=2)
    prefs += [Preference(p.prompt, p.chosen, p.rejected + "!", "dup") for p in prefs[:50]]  # repeated prompts
    train, val = split_preferences(prefs, 0.2, seed=5)
    assert len(train) + len(val) == len(prefs) and train and val
    prompts = lambda ps: {json.dumps(p.prompt) for p in ps}  # noqa: E731
    assert not prompts(train) & prompts(val)
    assert 0.1 < len(prompts(val)) / len(prompts(prefs)) < 0.3
    assert split_preferences(prefs, 0.2, seed=5) == (train, val)
    assert split_preferences(prefs, 0.2, seed=6) != (train, val)
    assert split_preferences(prefs, 0.0) == (list(prefs), [])
    assert len(split_preferences(prefs[:2], 0.01)[1]) == 1
    with pytest.raises(ValueError):
        split_preferences(prefs, 1.0)
