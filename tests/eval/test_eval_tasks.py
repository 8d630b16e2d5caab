"""Built-in evaluation tasks (tasks_builtin) and user task files (task_file)."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from lmforge.errors import InputError
from lmforge.eval.task_file import load_task_file
from lmforge.eval.tasks_builtin import BUILTIN_TASKS, FAIRNESS_GROUPS, builtin_task, zh_number

# the agent tasks (no few-shot split, fewer items) are tested in tests/agent/test_agent_tasks.py
NAMES = [name for name in BUILTIN_TASKS if not name.startswith("agent_")]
CJK = re.compile(r"[\u4e00-\u9fff]")


def _snapshot(task):
    return [(i.id, i.question, i.choices, i.answer, i.aliases, i.group) for i in task.test + task.train]


# ---- built-in tasks --------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_builtin_deterministic_and_seed_dependent(name):
    assert _snapshot(builtin_task(name, limit=20, seed=3)) == _snapshot(builtin_task(name, limit=20, seed=3))
    assert _snapshot(builtin_task(name, limit=20, seed=3)) != _snapshot(builtin_task(name, limit=20, seed=4))


@pytest.mark.parametrize("name", NAMES)
def test_builtin_splits_disjoint_and_well_formed(name):
    task = builtin_task(name)
    assert task.name == name and len(task.test) >= 50 and len(task.train) >= 5
    assert not {i.id for i in task.test} & {i.id for i in task.train}
    assert not {i.question for i in task.test} & {i.question for i in task.train}
    assert len({i.id for i in task.test + task.train}) == len(task.test + task.train)
    for item in task.test + task.train:
        assert item.question.strip()
        if task.kind == "multiple_choice":
            width = 2 if name == "fairness_yn" else 4  # yes / no
            assert len(item.choices) == width and len(set(item.choices)) == width
            assert isinstance(item.answer, int) and 0 <= item.answer < len(item.choices)
        elif task.kind == "generate":
            assert isinstance(item.answer, str) and item.answer
        else:
            assert item.answer is None


@pytest.mark.parametrize("name", NAMES)
def test_builtin_context_five_shot(name):
    task = builtin_task(name, limit=5)
    for item in task.test:
        shots = task.fewshot_examples(item, 5)
        assert len(shots) == 5 and item not in shots
        prompt = task.context(item, k=5)
        assert prompt.endswith(task.render(item)) and all(task.render(s) in prompt for s in shots)


@pytest.mark.parametrize("name", NAMES)
def test_builtin_limit(name):
    assert len(builtin_task(name, limit=8).test) == 8
    full = builtin_task(name, seed=1)
    limited = builtin_task(name, limit=10, seed=1)
    if name != "verifiable":  # verifiable generates `limit` items; the others pick from a fixed set
        positions = [full.test.index(item) for item in limited.test]
        assert positions == sorted(positions)  # a subset, in the original order
    assert builtin_task(name, limit=0).test == []


def test_chinese_items():
    for name in ("zh_mc", "zh_qa"):
        task = builtin_task(name)
        assert task.language == "zh" and task.target_delimiter == ""
        assert len(task.test) + len(task.train) >= 60
        assert all(CJK.search(item.question) and CJK.search(item.gold_text) for item in task.test + task.train)
    mc = {item.id: item for item in builtin_task("zh_mc").test + builtin_task("zh_mc").train}
    assert mc["add-3-4"].question == "三加四等于多少？" and mc["add-3-4"].gold_text == "七"
    assert [zh_number(n) for n in (0, 7, 10, 12, 40, 99)] == ["零", "七", "十", "十二", "四十", "九十九"]
    assert "rouge" in builtin_task("zh_qa").metrics


def test_fairness_every_problem_in_every_group():
    for task in (builtin_task("fairness_mc"), builtin_task("fairness_mc", limit=10)):
        by_problem: dict[str, list] = {}
        for item in task.test:
            by_problem.setdefault(item.meta["problem"], []).append(item)
        assert by_problem
        for items in by_problem.values():
            assert sorted(i.group for i in items) == sorted(FAIRNESS_GROUPS)
            assert len({(i.choices, i.answer) for i in items}) == 1  # only the person differs
            assert len({i.question for i in items}) == len(FAIRNESS_GROUPS)
    train_problems = {i.meta["problem"] for i in builtin_task("fairness_mc").train}
    assert not train_problems & {i.meta["problem"] for i in builtin_task("fairness_mc").test}


def test_masked_names_do_not_leak():
    for item in builtin_task("pydoc_mc").test:
        function = item.gold_text.rsplit(".", 1)[1]
        assert not re.search(rf"(?i)\b{re.escape(function)}\b", item.question), item.id
    for item in builtin_task("pyref_qa").test:
        assert "___" in item.question and not re.search(rf"(?i)\b{item.answer}\b", item.question)
    mc = {item.id: item for item in builtin_task("pyref_mc").test + builtin_task("pyref_mc").train}
    assert "yield" not in mc["yield"].question.lower() and "lambda" not in mc["lambda"].question.lower()


def test_unknown_builtin_task():
    with pytest.raises(ValueError, match="unknown task 'nope'.*pyref_mc"):
        builtin_task("nope")


# ---- task files ------------------------------------------------------------------------------


def _jsonl(path, *records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in records), encoding="utf-8")
    return path


def test_jsonl_round_trip(tmp_path):
    path = _jsonl(tmp_path / "quiz.jsonl",
                  {"question": "2 + 2 =", "choices": ["3", "4", "5"], "answer": 1, "group": "a"},
                  "",
                  {"question": "Capital of France?", "choices": ["Paris", "Rome"], "answer": "Paris",
                   "id": "fr", "source": "atlas"},
                  {"question": "1 + 1 =", "choices": ["2", "3"], "answer": 0, "split": "train"})
    task = load_task_file(path)
    assert (task.name, task.kind, task.source) == ("quiz", "multiple_choice", str(path))
    assert [i.id for i in task.test] == ["1", "fr"] and [i.id for i in task.train] == ["4"]
    first, second = task.test
    assert first.choices == ("3", "4", "5") and first.answer == 1 and first.group == "a"
    assert second.answer == 0 and second.meta == {"source": "atlas"}
    assert task.context(second, k=1).endswith("Question: Capital of France?\nAnswer:")

    generate = load_task_file(_jsonl(tmp_path / "gen.jsonl",
                                     {"question": "3 + 4 =", "answer": 7, "aliases": ["seven"]}))
    assert generate.kind == "generate" and generate.test[0].answer == "7"
    assert generate.test[0].aliases == ("seven",)


def test_yaml_round_trip(tmp_path):
    _jsonl(tmp_path / "capitals.jsonl", {"question": "France", "country": "France", "answer": "Paris"},
           {"question": "Japan", "country": "Japan", "answer": "Tokyo", "aliases": ["Tōkyō"]})
    spec = {
        "name": "capitals", "kind": "generate", "description": "Capitals.\n\n",
        "template": "Q: What is the capital of {country}?\nA:", "stop": "\n", "max_new_tokens": 8,
        "answer_pattern": r"(\w+)", "metrics": ["exact_match"], "language": "en", "num_fewshot": 1,
        "data": "capitals.jsonl",
        "train_items": [{"question": "Italy", "country": "Italy", "answer": "Rome"}],
    }
    path = tmp_path / "capitals.yaml"
    path.write_text(yaml.safe_dump(spec, allow_unicode=True), encoding="utf-8")
    task = load_task_file(path)
    assert (task.name, task.kind, task.stop, task.max_new_tokens, task.metrics) == (
        "capitals", "generate", ("\n",), 8, ("exact_match",))
    assert [i.answer for i in task.test] == ["Paris", "Tokyo"] and task.train[0].id == "train-0"
    assert task.context(task.test[0]) == ("Capitals.\n\nQ: What is the capital of Italy?\nA: Rome\n\n"
                                          "Q: What is the capital of France?\nA:")

    inline = tmp_path / "inline.yml"
    inline.write_text("items:\n  - {question: 'Sky?', choices: [blue, red], answer: blue}\n"
                      "  - {question: 'Grass?', choices: [green, red], answer: 0, split: train}\n")
    task = load_task_file(inline)
    assert (task.name, task.kind, len(task.test), len(task.train)) == ("inline", "multiple_choice", 1, 1)
    assert task.test[0].id == "0" and task.test[0].answer == 0


MC = {"question": "q", "choices": ["a", "b", "c", "d"], "answer": 0}


@pytest.mark.parametrize(("lines", "message"), [
    ([MC, {"choices": ["a", "b"], "answer": 0}], r"bad\.jsonl, line 2: field 'question' is missing"),
    ([{**MC, "answer": 5}], r"line 1: field 'answer': answer 5 is out of range for 4 choices"),
    ([MC, MC | {"answer": "z"}], r"line 2: field 'answer': 'z' is not one of the choices"),
    ([MC, MC | {"answer": True}], r"line 2: field 'answer' must be a choice index"),
    ([MC | {"choices": "abc"}], r"line 1: field 'choices' must be a list of strings, got a string"),
    ([MC | {"question": 3}], r"line 1: field 'question' must be a string, got an integer"),
    ([MC, "{not json"], r"line 2: invalid JSON"),
    ([MC, "[1, 2]"], r"line 2: an item must be a mapping"),
    ([MC, {"question": "q"}], r"line 2: field 'choices' is missing"),
    ([{"question": "q", "answer": "x"}, {"question": "r", "answer": ["x"]}], r"line 2: field 'answer' must be a string"),
    ([MC | {"split": "dev"}], r"line 1: field 'split' must be 'test' or 'train'"),
    ([MC | {"id": "x"}, MC | {"id": "x"}], r"item id 'x' is used twice"),
    ([], r"bad\.jsonl: the file is empty"),
])
def test_jsonl_errors(tmp_path, lines, message):
    with pytest.raises(InputError, match=message):
        load_task_file(_jsonl(tmp_path / "bad.jsonl", *lines))


@pytest.mark.parametrize(("spec", "message"), [
    ({"kind": "essay", "items": [MC]}, r"bad\.yaml: 'kind': unknown kind 'essay'; known kinds: multiple_choice"),
    ({"metrics": ["acc", "perplexity"], "items": [MC]}, r"bad\.yaml: 'metrics': unknown metric 'perplexity'; known: acc"),
    ({"metrics": "bleu", "items": [MC]}, r"bad\.yaml: 'metrics': 'bleu' is for generate tasks; this task is multiple"),
    ({"itmes": [MC]}, r"unknown key 'itmes'; known keys: name, kind"),
    ({"items": [MC, {**MC, "answer": 4}]}, r"bad\.yaml, items\[1\]: field 'answer': answer 4 is out of range"),
    ({"items": [MC, {"answer": 0}]}, r"items\[1\]: field 'question' is missing"),
    ({"items": [MC], "train_items": [{**MC, "answer": "e"}]}, r"train_items\[0\]: field 'answer': 'e' is not one"),
    ({"items": [MC], "num_fewshot": "two"}, r"'num_fewshot' must be an integer, got a string"),
    ({"items": [MC], "num_fewshot": 2}, r"'num_fewshot' is 2 but the file has 0 train items"),
    ({"items": [MC], "template": "{passage}"}, r"'template' cannot be filled in for item '0'.*passage"),
    ({"name": "x"}, r"no items: give 'items'"),
    ({"items": [MC], "data": "d.jsonl"}, r"give one of 'items', 'data', 'hf_data', not items and data"),
    ({"data": "missing.jsonl"}, r"'data': file not found"),
    ({"kind": "perplexity", "items": [{"question": "text", "answer": "x"}]}, r"items\[0\]: field 'answer' is not used"),
])
def test_yaml_errors(tmp_path, spec, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    with pytest.raises(InputError, match=message):
        load_task_file(path)


def test_yaml_data_errors_name_the_data_file_and_line(tmp_path):
    _jsonl(tmp_path / "d.jsonl", MC, {**MC, "answer": 9})
    path = tmp_path / "t.yaml"
    path.write_text("data: d.jsonl\n")
    with pytest.raises(InputError, match=r"d\.jsonl, line 2: field 'answer': answer 9 is out of range"):
        load_task_file(path)


@pytest.mark.parametrize(("name", "text", "message"), [
    ("empty.yaml", "", r"empty\.yaml: the file is empty"),
    ("list.yaml", "- 1\n", r"expected a mapping"),
    ("broken.yaml", "items: [\n", r"invalid YAML"),
    ("task.txt", "x", r"must end in \.jsonl, \.yaml or \.yml"),
])
def test_file_level_errors(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        load_task_file(path)
    with pytest.raises(InputError, match="task file not found"):
        load_task_file(tmp_path / "absent.jsonl")


def test_yaml_task_from_a_hugging_face_dataset(tmp_path, monkeypatch):
    """hf_data streams a dataset (a stand-in module here: no network in tests); fields map its columns."""
    import sys
    import types

    rows = {"test": [{"id": "q1", "question": "Sky colour?", "choices": {"text": ["red", "blue"], "label": ["A", "B"]},
                      "answerKey": "B"},
                     {"id": "q2", "question": "Grass colour?", "choices": {"text": ["green", "pink"], "label": ["A", "B"]},
                      "answerKey": "A"}],
            "train": [{"id": "t1", "question": "Snow colour?", "choices": {"text": ["white", "black"]}, "answerKey": "A"}]}
    module = types.ModuleType("datasets")
    module.load_dataset = lambda name, config, split, streaming: iter(rows[split])
    monkeypatch.setitem(sys.modules, "datasets", module)
    spec = tmp_path / "arc.yaml"
    spec.write_text("hf_data: hf:allenai/ai2_arc:ARC-Easy:test\nhf_train_data: hf:allenai/ai2_arc:ARC-Easy:train\n"
                    "fields: {question: question, choices: choices.text, answer: answerKey, id: id}\n"
                    "num_fewshot: 1\n")
    task = load_task_file(spec)
    assert task.kind == "multiple_choice" and [i.id for i in task.test] == ["q1", "q2"]
    assert [i.answer for i in task.test] == [1, 0] and task.test[0].choices == ("red", "blue")
    assert [i.id for i in task.train] == ["t1"]
    spec.write_text("hf_data: hf:allenai/ai2_arc:ARC-Easy:test\nfields: {question: query}\n")
    with pytest.raises(InputError, match="no column 'query'"):
        load_task_file(spec)
