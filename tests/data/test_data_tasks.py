"""Verifiable instruction tasks: generation, answers, train/eval split, checking and JSONL output."""

from __future__ import annotations

import json
import re
from pydoc_data.topics import topics

import pytest

from lmforge.data.chat_records import iter_chat_records
from lmforge.data.tasks import (
    KINDS,
    Task,
    accuracy,
    generate_tasks,
    is_correct,
    normalize_answer,
    to_jsonl,
    train_eval_tasks,
)


def _ints(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"-?\d+", text)]


def _expected(task: Task) -> str:
    """The answer recomputed from the prompt alone (for the kinds that allow it)."""
    p = task.prompt
    if task.kind in ("add", "subtract", "multiply"):
        a, op, b = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", p).groups()
        return str({"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op])
    if task.kind == "count":
        letter, word = re.fullmatch(r"How many times does the letter ([a-z]) appear in ([a-z]+)\?", p).groups()
        return str(sum(c == letter for c in word))
    if task.kind == "spell":
        return " ".join(re.fullmatch(r"Spell the word ([a-z]+)\.", p).group(1))
    if task.kind == "reverse":
        return "".join(reversed(re.fullmatch(r"Reverse the word ([a-z]+)\.", p).group(1)))
    if task.kind == "sort":
        return ", ".join(str(n) for n in sorted(_ints(p)))
    if task.kind == "max":
        return str(max(_ints(p)))
    raise AssertionError(task.kind)


def _clean_start(text: str) -> str:
    """A topic's text without heading underlines, whitespace collapsed."""
    kept = [line for line in text.splitlines() if not re.fullmatch(r"\s*[*=-]+\s*", line)]
    return " ".join(" ".join(kept).split())


def test_same_seed_same_tasks_other_seed_other_tasks():
    assert generate_tasks(60, seed=3) == generate_tasks(60, seed=3)
    assert generate_tasks(60, seed=3) != generate_tasks(60, seed=4)
    assert generate_tasks(0) == []
    with pytest.raises(ValueError, match="count"):
        generate_tasks(-1)


def test_round_robin_covers_every_kind_and_answers_are_right():
    tasks = generate_tasks(len(KINDS) * 200, seed=7)
    assert [t.kind for t in tasks[: len(KINDS)]] == list(KINDS)
    assert {k: sum(t.kind == k for t in tasks) for k in KINDS} == dict.fromkeys(KINDS, 200)
    checked = 0
    for task in tasks:
        if task.kind not in ("docs", "identity"):
            assert task.answer == _expected(task), task
            checked += 1
    assert checked == 8 * 200
    assert any(t.answer.startswith("-") for t in tasks if t.kind == "subtract")
    assert any(t.answer == "0" for t in tasks if t.kind == "count")
    for task in tasks:
        assert task.answer and "\n" not in task.answer


def test_operand_sizes():
    tasks = generate_tasks(3000, seed=1, kinds=["add", "multiply"])
    add = [n for t in tasks if t.kind == "add" for n in _ints(t.prompt)]
    assert max(add) <= 9999 and min(add) >= 0 and {len(str(n)) for n in add} == {1, 2, 3, 4}
    for t in tasks:
        if t.kind == "multiply":
            a, b = sorted(_ints(t.prompt))
            assert a <= 99 and b <= 999


def test_docs_answers_are_topic_keys_quoting_the_start_of_the_topic():
    tasks = generate_tasks(400, seed=2, kinds=["docs"])
    starts = {key: _clean_start(text) for key, text in topics.items()}
    assert len({t.answer for t in tasks}) > 40
    for task in tasks:
        assert task.answer in topics
        assert len(task.prompt) < 200
        quote = re.fullmatch(r"Which Python language reference topic begins with the following text: '(.+)'\?",
                             task.prompt).group(1)
        assert len(quote.split()) >= 3
        assert starts[task.answer].startswith(quote)
        others = [k for k, start in starts.items() if k != task.answer and start.startswith(quote)]
        assert others == [], f"{quote!r} also begins {others}"
    assert "if" not in {t.answer for t in tasks} and "else" not in {t.answer for t in tasks}  # same text


def test_identity_answers_name_the_assistant():
    tasks = generate_tasks(50, seed=0, kinds=["identity"])
    assert len({t.prompt for t in tasks}) >= 8
    by_prompt = {t.prompt: t.answer for t in generate_tasks(300, kinds=["identity"])}
    assert "lmforge assistant" in by_prompt["Who are you?"]
    assert "lmforge assistant" in by_prompt["What is your name?"]
    assert "lmforge" in by_prompt["Who made you?"]
    assert by_prompt["What is your name?"] == by_prompt["What's your name?"]


def test_train_and_eval_share_no_prompt_except_identity():
    train, eval_ = train_eval_tasks(3000, 300, seed=5)
    assert len(train) == 3000 and len(eval_) == 300
    assert {t.kind for t in eval_} == set(KINDS)
    train_prompts = {t.prompt for t in train}
    shared = {t.prompt for t in eval_ if t.prompt in train_prompts}
    assert shared and all(t.kind == "identity" for t in eval_ if t.prompt in shared)
    assert train_eval_tasks(3000, 300, seed=5) == (train, eval_)
    assert train_eval_tasks(100, 300, seed=5)[1] == eval_  # the eval set does not depend on the train size


def test_train_eval_raises_when_eval_uses_up_a_kind():
    with pytest.raises(ValueError, match="spell"):
        train_eval_tasks(10, 3000, kinds=["spell"])


def test_normalize_and_is_correct():
    task = Task("add", "What is 347 + 58?", "405")
    assert normalize_answer("  Hello   World. ") == "hello world"
    assert is_correct(task, "405.")
    assert is_correct(task, " 405\nextra")
    assert is_correct(task, "405")
    assert not is_correct(task, "406")
    assert not is_correct(task, "4050")
    assert not is_correct(task, "")
    spell = Task("spell", "Spell the word apple.", "a p p l e")
    assert is_correct(spell, "A  P p l e")
    assert not is_correct(spell, "apple")


def test_accuracy_per_kind_and_all():
    tasks = [Task("add", "1 + 1", "2"), Task("add", "2 + 2", "4"), Task("max", "1, 9", "9")]
    scores = accuracy(tasks, ["2", "5", "9."])
    assert scores == {"add": 0.5, "max": 1.0, "all": pytest.approx(2 / 3)}
    assert accuracy([], []) == {"all": 0.0}
    with pytest.raises(ValueError):
        accuracy(tasks, ["2"])


def test_unknown_kind_names_it_and_lists_known_ones():
    with pytest.raises(ValueError, match="'divide'") as info:
        generate_tasks(3, kinds=["add", "divide"])
    assert all(kind in str(info.value) for kind in KINDS)
    with pytest.raises(ValueError, match="divide"):
        train_eval_tasks(3, 3, kinds=["divide"])


def test_messages_with_and_without_system():
    task = Task("add", "What is 1 + 1?", "2")
    assert task.messages() == [{"role": "user", "content": "What is 1 + 1?"},
                               {"role": "assistant", "content": "2"}]
    assert task.messages("Be brief.")[0] == {"role": "system", "content": "Be brief."}


def test_to_jsonl_round_trip(tmp_path):
    tasks = generate_tasks(25, seed=9)
    path = tmp_path / "tasks.jsonl"
    to_jsonl(tasks, path)
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(records) == 25
    back = [Task(r["kind"], r["messages"][0]["content"], r["answer"]) for r in records]
    assert back == tasks
    assert all(r["messages"] == t.messages() for r, t in zip(records, tasks))
    assert list(iter_chat_records(path)) == [t.messages() for t in tasks]
