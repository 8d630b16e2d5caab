"""The agent loop: tool calls and answers, budgets, repairs, repeated calls, traces and resuming,
short-term memory; tool calls decoded on the engine under the tools' schemas; `lmforge agent`."""

from __future__ import annotations

import json

import pytest
from agent_script import Scripted, answer, call, calls

from lmforge.agent.backend import LocalChat, Reply
from lmforge.agent.builtin import calculator
from lmforge.agent.loop import FINAL_ANSWER, Agent, AgentConfig
from lmforge.agent.tools import Toolbox, tool
from lmforge.agent.trace import read_events, replay
from lmforge.cli import main
from lmforge.errors import InputError


@pytest.fixture
def tools():
    @tool
    def add(a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: the first
            b: the second
        """
        return a + b

    @tool
    def broken() -> str:
        """Always fails."""
        raise RuntimeError("disk on fire")

    return Toolbox([add, broken, tool(calculator)])


def test_tool_result_goes_back_to_the_model_and_final_answer_ends_the_run(tools, tmp_path):
    backend = Scripted(calls(call("add", a=2, b=40)), *answer("42"))
    result = Agent(backend, tools).run("What is 2 + 40?", trace=tmp_path / "t.jsonl")
    assert (result.answer, result.stopped, result.steps, result.tool_calls) == ("42", "answer", 2, 2)
    second = backend.seen[1]["messages"]
    assert second[-1] == {"role": "tool", "tool_call_id": call("add", a=2, b=40)["id"], "name": "add",
                          "content": "42"}
    assert backend.seen[0]["tool_choice"] == "required" and FINAL_ANSWER in backend.seen[1]["tools"]
    assert FINAL_ANSWER not in backend.seen[0]["tools"]  # act first: the first turn calls a tool
    events = read_events(tmp_path / "t.jsonl")
    assert [e["event"] for e in events] == ["start", "model", "tool", "model", "tool", "end"]
    assert events[2]["arguments"] == {"a": 2, "b": 40} and events[-1]["stopped"] == "answer"


def test_answer_in_words_asks_for_the_answer_in_a_turn_without_tools(tools, tmp_path):
    backend = Scripted(calls(call("add", a=2, b=40)), calls(call(FINAL_ANSWER)), Reply(content=" 42 "))
    result = Agent(backend, tools, AgentConfig(answer="words")).run("What is 2 + 40?", trace=tmp_path / "t.jsonl")
    assert (result.answer, result.stopped, result.steps) == ("42", "answer", 2)
    assert backend.seen[2]["tools"] == [] and backend.seen[2]["messages"][-1]["role"] == "user"
    assert backend.seen[2]["messages"][-1]["content"].endswith("answer the question: What is 2 + 40?")
    events = read_events(tmp_path / "t.jsonl")
    assert [e["event"] for e in events] == ["start", "model", "tool", "model", "tool", "note", "model", "end"]


def test_without_act_first_the_first_turn_may_answer_at_once(tools):
    backend = Scripted(*answer("42"))
    result = Agent(backend, tools, AgentConfig(act_first=False)).run("What is 2 + 40?")
    assert (result.answer, result.steps, backend.seen[0]["tools"][-1]) == ("42", 1, FINAL_ANSWER)


def test_a_run_out_of_turns_still_gets_an_answer_in_words(tools):
    backend = Scripted(calls(call("add", a=1, b=1)), calls(call("add", a=2, b=2)), Reply(content="It is 4."))
    result = Agent(backend, tools, AgentConfig(max_steps=2)).run("Q")
    assert (result.stopped, result.answer, result.steps) == ("steps", "It is 4.", 2)
    assert backend.seen[-1]["tools"] == []


def test_auto_mode_answers_in_plain_text_without_a_final_answer_tool(tools):
    backend = Scripted(calls(call("add", a=1, b=1)), Reply(content=" It is 2. "))
    result = Agent(backend, tools, AgentConfig(tool_choice="auto")).run("1+1?")
    assert (result.answer, result.stopped) == ("It is 2.", "answer")
    assert FINAL_ANSWER not in backend.seen[0]["tools"] and backend.seen[0]["tool_choice"] == "auto"


def test_bad_calls_are_shown_to_the_model_and_the_run_stops_after_the_repairs(tools):
    backend = Scripted(calls(call("nope")), calls(call("add", a="two", b=1)), calls(call("broken")))
    result = Agent(backend, tools, AgentConfig(repairs=2)).run("Q")
    assert result.stopped == "repairs" and result.failed_calls == 3 and result.steps == 3
    shown = [m["content"] for m in result.messages if m["role"] == "tool"]
    assert "there is no tool 'nope'" in shown[0] and "add" in shown[0]
    assert "argument 'a'" in shown[1]
    assert "RuntimeError: disk on fire" in shown[2]


def test_a_good_call_resets_the_repair_count(tools):
    script = [calls(call("nope")), calls(call("nope")), calls(call("add", a=1, b=2)), calls(call("nope")),
              *answer("3")]
    result = Agent(Scripted(*script), tools, AgentConfig(repairs=2)).run("Q")
    assert (result.stopped, result.answer, result.failed_calls) == ("answer", "3", 3)


def test_a_malformed_call_is_sent_back_and_counted():
    backend = Scripted(Reply(content="<tool_call>{oops", text="<tool_call>{oops", malformed=True),
                       *answer("ok"))
    result = Agent(backend, Toolbox([])).run("Q")
    assert result.answer == "ok" and result.malformed == 1 and result.parse_rate == 0.5
    assert "did not parse" in backend.seen[1]["messages"][-1]["content"]


def test_a_repeated_call_is_not_run_again_and_the_next_turn_asks_for_the_answer(tools):
    ran = []

    @tool
    def lookup(word: str) -> str:
        """Look a word up."""
        ran.append(word)
        return f"{word}: a small fox"

    backend = Scripted(calls(call("lookup", word="fennec")), calls(call("lookup", word="fennec")),
                       *answer("a small fox"))
    result = Agent(backend, Toolbox([lookup])).run("What is a fennec?")
    assert ran == ["fennec"] and result.answer == "a small fox"
    assert [s["tool_choice"] for s in backend.seen] == ["required", "required", FINAL_ANSWER]
    assert "already called" in backend.seen[2]["messages"][-1]["content"]


@pytest.mark.parametrize("budget,stopped", [({"max_steps": 3}, "steps"), ({"max_tokens": 12}, "tokens"),
                                            ({"max_seconds": 1e-9}, "time")])
def test_every_budget_ends_the_run(tools, budget, stopped):
    endless = [calls(call("add", a=i, b=1)) for i in range(20)]
    result = Agent(Scripted(*endless), tools, AgentConfig(**budget)).run("Q")
    assert result.stopped == stopped
    assert result.steps == {"steps": 3, "tokens": 3, "time": 0}[stopped]


def test_the_token_budget_caps_each_turn(tools):
    backend = Scripted(*[calls(call("add", a=i, b=1)) for i in range(5)])
    Agent(backend, tools, AgentConfig(max_tokens=12, max_new_tokens=8)).run("Q")
    assert [s["max_tokens"] for s in backend.seen] == [8, 7, 2]


def test_a_stopped_run_resumes_from_its_trace_as_if_never_stopped(tools, tmp_path):
    script = [calls(call("add", a=1, b=2)), calls(call("add", a=3, b=3)), *answer("6")]
    whole = Agent(Scripted(*script), tools).run("Q", trace=tmp_path / "whole.jsonl")
    part = Agent(Scripted(*script[:1]), tools, AgentConfig(max_steps=1)).run("Q", trace=tmp_path / "part.jsonl")
    assert part.stopped == "steps"
    lines = (tmp_path / "part.jsonl").read_text().splitlines()
    config = json.loads(lines[0])["config"]
    config["max_steps"] = 8
    (tmp_path / "part.jsonl").write_text(json.dumps({**json.loads(lines[0]), "config": config}) + "\n"
                                         + "\n".join(lines[1:3]) + "\n")  # as if killed after the first turn
    backend = Scripted(*script[1:])
    resumed = Agent(backend, tools).resume(tmp_path / "part.jsonl")
    assert (resumed.answer, resumed.steps, resumed.tool_calls) == (whole.answer, whole.steps, whole.tool_calls)
    assert replay(read_events(tmp_path / "part.jsonl"))[0] == replay(read_events(tmp_path / "whole.jsonl"))[0]
    with pytest.raises(InputError, match="has ended"):
        Agent(Scripted(), tools).resume(tmp_path / "whole.jsonl")


def test_replay_drops_a_turn_whose_calls_were_not_all_answered(tools, tmp_path):
    Agent(Scripted(calls(call("add", a=1, b=2), call("add", a=2, b=2)), *answer("x")),
          tools).run("Q", trace=tmp_path / "t.jsonl")
    events = read_events(tmp_path / "t.jsonl")
    cut = [e for e in events if e["event"] != "end"][:3]  # start, model (two calls), one tool result
    messages, steps = replay(cut)
    assert steps == 0 and [m["role"] for m in messages] == ["system", "user"]


def test_sampled_turns_use_seed_plus_step_and_greedy_turns_no_seed(tools):
    backend = Scripted(calls(call("add", a=1, b=1)), *answer("2"))
    Agent(backend, tools, AgentConfig(temperature=0.7, seed=11)).run("Q")
    assert [s["seed"] for s in backend.seen] == [11, 12]
    greedy = Scripted(*answer("2"))
    Agent(greedy, tools).run("Q")
    assert greedy.seen[0]["seed"] is None


def test_older_turns_are_summarized_to_fit_the_context(tools):
    class Small(Scripted):
        context = 700

    def answer_or_summary(messages):
        if "Summarize" in messages[-1]["content"]:
            return Reply(content="added numbers")
        return calls(call("add", a=len(messages), b=1))

    backend = Small(*[answer_or_summary] * 12)
    result = Agent(backend, tools, AgentConfig(max_steps=8, keep_turns=2, max_new_tokens=64)).run("Q" * 50)
    summaries = [e for e in result.events if e["event"] == "note" and e["kind"] == "summary"]
    assert summaries and "added numbers" in summaries[0]["content"]
    for seen in backend.seen:
        if "Summarize" not in seen["messages"][-1]["content"]:
            assert backend.count_tokens(seen["messages"], []) <= 700 - 64


def test_config_is_checked():
    for bad in ({"max_steps": 0}, {"tool_choice": "sometimes"}, {"repairs": -1}):
        with pytest.raises(ValueError):
            AgentConfig(**bad)
    with pytest.raises(InputError, match="empty"):
        Agent(Scripted(), Toolbox([])).run("  ")


# ---- on the engine ---------------------------------------------------------------------------------


def test_constrained_tool_calls_always_parse_on_the_engine(tiny_lm, tools):
    """A random tiny model forced to call: under the tools' schemas every call parses and names a tool
    with arguments of the right types; without the constraint its calls do not parse."""
    chat = LocalChat(tiny_lm, constrain=True)
    messages = [{"role": "system", "content": "Use the tools."}, {"role": "user", "content": "What is 2 + 2?"}]
    for seed in range(4):
        reply = chat.complete(messages, tools.schemas(), max_tokens=48, temperature=1.0, seed=seed,
                              tool_choice="required")
        assert reply.tool_calls and not reply.malformed, reply.text
        function = reply.tool_calls[0]["function"]
        assert function["name"] in tools.names
        assert tools.call(function["name"], function["arguments"]).error != "bad_arguments"
    named = chat.complete(messages, tools.schemas(), max_tokens=48, tool_choice="add")
    assert named.tool_calls[0]["function"]["name"] == "add"
    free = LocalChat(tiny_lm, constrain=False).complete(messages, tools.schemas(), max_tokens=24,
                                                        tool_choice="required")
    assert free.malformed and not free.tool_calls and free.text.startswith("<tool_call>")


def test_smollm2_with_the_calculator_multiplies_right(capsys, tmp_path):
    """SmolLM2-135M alone gets 1234 * 5678 wrong; as an agent it calls the calculator and answers 7006652."""
    trace = tmp_path / "run.jsonl"
    assert main(["agent", "What is 1234 * 5678?", "--tools", "calculator", "--dtype", "fp32", "--max-steps", "4",
                 "--trace", str(trace)]) == 0
    out = capsys.readouterr().out
    assert "calculator(" in out and out.splitlines()[-2] == "7006652"
    names = [e["name"] for e in read_events(trace) if e["event"] == "tool"]
    assert names[0] == "calculator" and names[-1] == FINAL_ANSWER


def test_cli_bad_input_exits_2(capsys, tmp_path):
    cases = [(["Q", "--tools", "teleport"], "teleport"), (["Q", "--tools", "search"], "--kb"),
             (["Q", "--tools", "read_file"], "root"), (["Q", "--resume", str(tmp_path / "none.jsonl")], "both"),
             (["--resume", str(tmp_path / "none.jsonl")], "no such trace"),
             (["Q", "--base-url", "http://127.0.0.1:9", "--model", "m"], "cannot reach")]
    for flags, message in cases:
        assert main(["agent", *flags, "--dtype", "fp32"]) == 2, flags
        assert message in capsys.readouterr().err, flags


def test_plan_then_execute_writes_a_plan_and_revises_it_after_a_failed_step(tools, tmp_path):
    backend = Scripted(Reply(content="1. Add the numbers with add.\n2. Give the answer."),
                       calls(call("add", a="2", b=2)),
                       Reply(content="1. Call add with integers.\n2. Give the answer."),
                       calls(call("add", a=2, b=2)), *answer("4"))
    result = Agent(backend, tools, AgentConfig(plan=True)).run("What is 2 + 2?", trace=tmp_path / "t.jsonl")
    assert result.answer == "4"
    assert backend.seen[0]["tools"] == [] and "numbered plan" in backend.seen[0]["messages"][-1]["content"]
    assert "Your plan:\n1. Add the numbers with add." in backend.seen[1]["messages"][0]["content"]
    assert "A step failed: error: argument 'a'" in backend.seen[2]["messages"][-1]["content"]
    revised = backend.seen[3]["messages"][0]["content"]
    assert "1. Call add with integers." in revised and "Add the numbers with add" not in revised
    assert [e["kind"] for e in result.events if e["event"] == "note"] == ["plan", "plan"]
    assert replay(read_events(tmp_path / "t.jsonl"))[0][0]["content"] == revised


def test_plan_revisions_are_bounded(tools):
    backend = Scripted(Reply(content="1. Try."), calls(call("broken")), Reply(content="1. Try again."),
                       calls(call("broken")), *answer("no"))
    result = Agent(backend, tools, AgentConfig(plan=True, revisions=1, repairs=5)).run("Q")
    assert [e["kind"] for e in result.events if e["event"] == "note"] == ["plan", "plan"]
    assert result.answer == "no" and len(backend.seen) == 5


def test_a_conversation_that_cannot_fit_ends_the_run_instead_of_failing(tools):
    class Tiny(Scripted):
        context = 120

    backend = Tiny(*[calls(call("add", a=i, b=1)) for i in range(8)])
    result = Agent(backend, tools, AgentConfig(max_new_tokens=64)).run("Q" * 100)
    assert result.stopped == "context" and result.steps == 0


def test_interactive_agent_answers_each_question_until_an_empty_line(tiny_lm, tmp_path, monkeypatch, capsys):
    from lmforge.checkpoint import save_checkpoint

    checkpoint = save_checkpoint(tmp_path / "ckpt", tiny_lm.model, tiny_lm.tokenizer)
    questions = iter(["What is 2 + 2?", "And 3 + 3?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(questions))
    assert main(["agent", "--model", str(checkpoint), "--tools", "calculator", "--dtype", "fp32", "--max-steps", "2",
                 "--max-new-tokens", "24", "--trace", str(tmp_path / "run.jsonl")]) == 0
    out = capsys.readouterr().out
    assert out.count("agent> ") == 2 and "with tools calculator, final_answer" in out
    for number, question in ((1, "What is 2 + 2?"), (2, "And 3 + 3?")):
        events = read_events(tmp_path / f"run.jsonl.{number}")
        assert events[0]["question"] == question and events[-1]["event"] == "end"


def test_an_agent_killed_mid_line_resumes_from_its_trace(tools, tmp_path):
    """The trace's last line cut by a kill is left out on resume, and the resumed run's events start a line
    of their own (appended to the cut line, they would not parse): it ends as a run never killed."""
    script = [calls(call("add", a=1, b=2)), calls(call("add", a=3, b=3)), *answer("6")]
    whole = Agent(Scripted(*script), tools).run("Q", trace=tmp_path / "whole.jsonl")
    trace = tmp_path / "t.jsonl"
    lines = (tmp_path / "whole.jsonl").read_text().splitlines()
    assert [json.loads(line)["event"] for line in lines[:4]] == ["start", "model", "tool", "model"]
    trace.write_text("\n".join(lines[:3]) + "\n" + lines[3][:40])  # killed while writing the second turn
    assert len(read_events(trace)) == 3
    resumed = Agent(Scripted(*script[1:]), tools).resume(trace)
    assert (resumed.answer, resumed.steps, resumed.tool_calls) == (whole.answer, whole.steps, whole.tool_calls)
    assert read_events(trace)[-1]["event"] == "end"
