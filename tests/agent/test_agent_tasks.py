"""The built-in agent tasks under `lmforge eval`: items, checking answers, scoring with and without tools."""

from __future__ import annotations

import dataclasses
import json
import re
import types

import pytest
from agent_script import Scripted, answer, call, calls

import lmforge.agent.tasks as agent_tasks
from lmforge.agent.backend import Reply
from lmforge.agent.builtin import calculator
from lmforge.agent.loop import ANSWER_NOW, FINAL_ANSWER
from lmforge.agent.tasks import agent_arith, agent_code, agent_memory, solved
from lmforge.cli import main
from lmforge.eval.run import EvalConfig, evaluate
from lmforge.eval.tasks_builtin import builtin_task


def test_arith_items_are_seeded_and_their_answers_right():
    task = agent_arith(seed=3)
    assert [i.question for i in task.test] == [i.question for i in agent_arith(seed=3).test]
    assert [i.question for i in task.test] != [i.question for i in agent_arith(seed=4).test]
    assert task.kind == "agent" and task.tools == ("calculator",) and len(task.test) == 40
    for item in task.test:
        a, b, c = (int(n) for n in re.findall(r"\d+", item.question))
        expression = {"A crate": f"{a}*{b}*{c}", "What is": f"{a}*{b}-{c}", "Add": f"({a}+{b})*{c}",
                      "A train": f"{a}*{b}+{c}", "A farm": f"{a}*{b}-{c}"}[next(
                          k for k in ("A crate", "What is", "Add", "A train", "A farm") if item.question.startswith(k))]
        assert calculator(expression) == item.gold_text
    assert builtin_task("agent_memory", limit=3).test == agent_memory(limit=3).test


def test_answers_are_checked_by_number_by_value_and_by_running_tests():
    arith, memory, code = agent_arith().test[0], agent_memory().test[0], next(
        i for i in agent_code().test if i.answer == "add")
    gold = arith.gold_text
    assert solved(agent_arith(), arith, f"The answer is {int(gold):,}.")
    assert not solved(agent_arith(), arith, f"{gold} is close; the answer is {int(gold) + 1}")
    assert solved(agent_memory(), memory, f"It is {memory.gold_text}.") and not solved(agent_memory(), memory, "?")
    assert solved(agent_code(), code, "```python\ndef add(a, b):\n    return a + b\n```")
    assert not solved(agent_code(), code, "def add(a, b):\n    return a - b")
    assert not solved(agent_code(), code, "import os\nos.system('echo hi')\ndef add(a, b): return a + b")


# A right answer for every coding item (each must be solvable: its tests hold for this code).
SOLUTIONS = {
    "add": "return a + b", "is_even": "return n % 2 == 0", "reverse": "return s[::-1]", "largest": "return max(xs)",
    "count_vowels": "return sum(c in 'aeiou' for c in s)", "factorial": "import math\n    return math.factorial(n)",
    "square_all": "return [x * x for x in xs]", "is_palindrome": "return s == s[::-1]", "multiply": "return a * b",
    "smallest": "return min(xs)", "total": "return sum(xs)", "average": "return sum(xs) / len(xs)",
    "count_words": "return len(s.split())", "upper": "return s.upper()", "first": "return xs[0]", "last": "return xs[-1]",
    "absolute": "return abs(n)", "square": "return n * n", "is_positive": "return n > 0",
    "double_all": "return [2 * x for x in xs]", "length": "return len(s)", "repeat": "return s * n",
    "evens": "return [x for x in xs if x % 2 == 0]", "contains": "return x in xs"}


def test_every_coding_item_is_solvable_and_answered_in_words():
    task = agent_code()
    assert len(task.test) == len(SOLUTIONS) == 24 and task.agent_answer == "words"
    assert agent_arith().agent_answer == agent_memory().agent_answer == "tool"
    with pytest.raises(ValueError, match="agent_answer must be tool or words"):
        dataclasses.replace(task, agent_answer="prose")
    for item in task.test:
        signature = re.search(rf"{item.answer}\([^)]*\)", item.question).group(0)
        code = f"```python\ndef {signature}:\n    {SOLUTIONS[item.answer]}\n```"
        assert solved(task, item, code), item.id
        assert not solved(task, item, f"```python\ndef {signature}:\n    return None\n```"), item.id


@pytest.fixture
def scripted(monkeypatch):
    """`lmforge eval`'s agent scorer on a scripted model (one script for all runs)."""
    holder = {}

    def backend(model, constrain=True):
        return holder["backend"]

    monkeypatch.setattr(agent_tasks, "chat_backend", backend)
    return holder


def test_eval_scores_the_agent_beside_the_model_without_tools(scripted):
    task = agent_arith(limit=2)
    first, second = task.test
    scripted["backend"] = Scripted(
        calls(call("calculator", expression="2*3")), *answer(first.gold_text),  # solved
        Reply(content="<tool_call>{", text="<tool_call>{", malformed=True), *answer("7"),
        Reply(content="about 12"), Reply(content=f"It is {second.gold_text}"))  # no tools: one of two
    results = evaluate(types.SimpleNamespace(), EvalConfig(tasks="agent_arith", bootstrap=20), "scripted", [task])
    agent, plain = results["tasks"]["agent_arith"]["agent"], results["tasks"]["agent_arith"]["no_tools"]
    assert agent["metrics"]["success"]["value"] == 0.5 and plain["metrics"]["success"]["value"] == 0.5
    assert agent["metrics"]["parse_rate"]["value"] == pytest.approx((1.0 + 0.5) / 2)
    assert agent["metrics"]["steps"]["value"] == 2 and plain["metrics"]["steps"]["value"] == 1
    low, high = agent["metrics"]["success_ci95"]["value"].values()
    assert 0 < low < 0.5 < high < 1
    records = results["samples"]["agent_arith.agent"]
    assert [r["success"] for r in records] == [1.0, 0.0] and records[0]["tool_calls"] == 2
    assert agent["metrics"]["tokens_per_success"]["value"] == sum(r["tokens"] for r in records)


def test_eval_agent_answer_words_takes_the_answer_from_a_turn_asked_the_question_again(scripted, tmp_path, capsys):
    from lmforge.eval.run import config_hash

    task = agent_arith(limit=1)
    item = task.test[0]
    scripted["backend"] = backend = Scripted(
        calls(call("calculator", expression="2*3")), calls(call(FINAL_ANSWER)), Reply(content=f"It is {item.gold_text}."),
        Reply(content="no idea"))  # the model without tools
    results = evaluate(types.SimpleNamespace(), EvalConfig(tasks="agent_arith", bootstrap=20, agent_answer="words"),
                       "scripted", [task])
    assert results["tasks"]["agent_arith"]["agent"]["metrics"]["success"]["value"] == 1.0
    assert backend.seen[2]["tools"] == [] and backend.seen[2]["messages"][-1]["content"].endswith(item.question)
    # the hash tells the ways apart where an agent task's answer came back otherwise than as final_answer's
    # argument (the one way once: those runs keep their hashes)
    tool, code = [task], [agent_code(limit=1)]
    assert config_hash(EvalConfig(agent_answer="words"), "m", tool) != config_hash(EvalConfig(), "m", tool) \
        == config_hash(EvalConfig(agent_answer="tool"), "m", tool) == config_hash(EvalConfig(), "m")
    assert config_hash(EvalConfig(), "m", code) == config_hash(EvalConfig(agent_answer="words"), "m", code) \
        != config_hash(EvalConfig(agent_answer="tool"), "m", code)
    assert main(["eval", "unused", "--tasks", "agent_arith", "--out", str(tmp_path / "x"),
                 "--agent-answer", "maybe"]) == 2
    assert "--agent-answer: answer must be words or tool, got 'maybe' (or task: each task's own)" \
        in capsys.readouterr().err


def test_eval_asks_each_agent_task_for_its_own_kind_of_answer_unless_told(scripted):
    """By default agent_code's answer is a turn of its own (code as written), agent_arith's final_answer's
    argument; --agent-answer tool makes agent_code's the argument too."""
    task = agent_code(limit=1)
    item = task.test[0]
    signature = re.search(rf"{item.answer}\([^)]*\)", item.question).group(0)
    reply = f"```python\ndef {signature}:\n    pass\n```"
    for setting, argument in (("task", False), ("tool", True)):
        script = [calls(call("python", code="print(1)"))]
        script += [calls(call(FINAL_ANSWER, answer=reply))] if argument else \
            [calls(call(FINAL_ANSWER)), Reply(content=reply)]
        scripted["backend"] = backend = Scripted(*script, Reply(content="no idea"))
        results = evaluate(types.SimpleNamespace(), EvalConfig(tasks="agent_code", bootstrap=20, agent_answer=setting),
                           "scripted", [task])
        record = results["samples"]["agent_code.agent"][0]
        assert record["answer"] == reply
        third = backend.seen[2]  # words: the answer turn; tool: the model asked without tools
        assert (third["messages"][-1]["content"] == ANSWER_NOW.format(question=item.question)) != argument


def test_the_memory_task_remembers_in_a_first_session_and_answers_in_a_second(scripted):
    task = agent_memory(limit=1)
    item = task.test[0]

    def answer_from_the_system_prompt(messages):
        numbers = re.findall(r"\d{4}", messages[0]["content"])
        return Reply(content=numbers[0] if numbers else "I do not know")

    scripted["backend"] = Scripted(calls(call("remember", fact=item.meta["setup"])),
                                   *answer("Noted."), calls(call(FINAL_ANSWER)), answer_from_the_system_prompt,
                                   Reply(content="I do not know."))
    results = evaluate(types.SimpleNamespace(), EvalConfig(tasks="agent_memory", bootstrap=20), "scripted", [task])
    assert results["tasks"]["agent_memory"]["agent"]["metrics"]["success"]["value"] == 1.0
    assert results["tasks"]["agent_memory"]["no_tools"]["metrics"]["success"]["value"] == 0.0


def test_cli_eval_runs_an_agent_task_on_a_local_model(tiny_lm, tmp_path):
    from lmforge.checkpoint import save_checkpoint

    checkpoint = save_checkpoint(tmp_path / "ckpt", tiny_lm.model, tiny_lm.tokenizer)
    out = tmp_path / "ev"
    assert main(["eval", str(checkpoint), "--tasks", "agent_arith", "--limit", "2", "--out", str(out),
                 "--leaderboard", "", "--dtype", "fp32", "--bootstrap", "20"]) == 0
    results = json.loads((out / "results.json").read_text())
    agent = results["tasks"]["agent_arith"]["agent"]["metrics"]
    assert set(agent) >= {"success", "success_ci95", "parse_rate", "steps", "tool_calls", "tokens"}
    assert agent["parse_rate"]["value"] == 1.0  # forced calls under the schema: every one parses
    free = tmp_path / "free"
    assert main(["eval", str(checkpoint), "--tasks", "agent_arith", "--limit", "1", "--out", str(free),
                 "--leaderboard", "", "--dtype", "fp32", "--bootstrap", "20", "--agent-constrain", "false"]) == 0
    unconstrained = json.loads((free / "results.json").read_text())["tasks"]["agent_arith"]["agent"]["metrics"]
    assert unconstrained["parse_rate"]["value"] < 1.0  # the random model's free-running calls do not parse
    lines = (out / "samples" / "agent_arith.agent.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["steps"] >= 1 for line in lines)
    assert "agent_arith" in (out / "report.md").read_text()


def test_the_langref_task_searches_the_language_reference(scripted):
    from lmforge.agent.tasks import agent_langref

    task = agent_langref()
    assert len(task.test) == 100 and task.tools == ("search",)
    item = next(i for i in task.test if "__debug__" in i.question)
    assert solved(task, item, "It is false.") and not solved(task, item, "It is True.")

    def answer_from_the_result(messages):
        found = any("__debug__" in m["content"] for m in messages if m["role"] == "tool")
        return Reply(content="False" if found else "?")

    scripted["backend"] = Scripted(calls(call("search", query="__debug__ -O switch")), calls(call(FINAL_ANSWER)),
                                   answer_from_the_result)
    results = evaluate(types.SimpleNamespace(), EvalConfig(bootstrap=20), "scripted",
                       [dataclasses.replace(task, test=[item])])
    record = results["samples"]["agent_langref.agent"][0]
    assert record["success"] == 1.0 and record["tool_calls"] == 2
