"""The agent trace page (static/agent.html) in headless Chromium: a trace written the way the agent loop
writes it (src/lmforge/agent/loop.py) is opened from a file and from ``?trace=URL``, shown turn by turn
with its tool results, note and end, walked step by step; a broken file names the line that is wrong.

The browser is found as in test_serve_ui.py: the system's `chromium`, else Playwright's own; without
either the browser tests are skipped and say so.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import httpx
import pytest

from lmforge.agent import AgentConfig
from lmforge.agent.trace import TraceWriter

QUESTION = "What is 1234 * 5678?"
SYSTEM = AgentConfig().system


def call(call_id: str, name: str, arguments: dict) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def turn(writer: TraceWriter, step: int, calls: list[dict], text: str, prompt_tokens: int) -> None:
    writer.write("model", step=step, reply={"role": "assistant", "content": None, "tool_calls": calls}, text=text,
                 prompt_tokens=prompt_tokens, completion_tokens=30, malformed=False, seconds=1.5)


def write_trace(path: Path) -> Path:
    """A run as loop.py records it: a calculator call, a call to a tool that does not exist, the older
    turns summarized to fit the context, then the final answer."""
    writer = TraceWriter(path)
    config = dataclasses.asdict(AgentConfig(max_steps=6))
    writer.write("start", question=QUESTION, model="smollm2-135m-instruct", tools=["calculator", "now", "final_answer"],
                 config=config, messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}])
    calculator = call("call_1", "calculator", {"expression": "1234 * 5678"})
    turn(writer, 0, [calculator], '<tool_call>\n{"name": "calculator", "arguments": {"expression": "1234 * 5678"}}\n'
                                  "</tool_call>", 499)
    writer.write("tool", step=0, id="call_1", name="calculator", arguments={"expression": "1234 * 5678"},
                 content="7006652", ok=True, error=None, seconds=0.002)
    turn(writer, 1, [call("call_2", "check", {"value": 7006652})],
         'Let me <b>check</b> it.\n<tool_call>\n{"name": "check", "arguments": {"value": 7006652}}\n</tool_call>', 560)
    writer.write("tool", step=1, id="call_2", name="check", arguments=None,
                 content="error: there is no tool 'check'; the tools are: calculator, now, final_answer",
                 ok=False, error="unknown_tool", seconds=0.0)
    writer.write("note", step=2, role="user", kind="summary", replaces=[2, 6],
                 content="Summary of the earlier steps: the calculator gave 7006652; 'check' is not a tool.")
    turn(writer, 2, [call("call_3", "final_answer", {"answer": "7006652"})],
         '<tool_call>\n{"name": "final_answer", "arguments": {"answer": "7006652"}}\n</tool_call>', 610)
    writer.write("tool", step=2, id="call_3", name="final_answer", arguments={"answer": "7006652"},
                 content="7006652", ok=True, error=None, seconds=0.0)
    writer.write("end", answer="7006652", stopped="answer", steps=3, tool_calls=3, prompt_tokens=1669,
                 completion_tokens=90, seconds=4.62)
    writer.close()
    return path


@pytest.fixture
def trace(tmp_path) -> Path:
    return write_trace(tmp_path / "run.jsonl")



def visible_steps(page) -> int:
    return page.locator(".step:visible").count()


def test_chat_page_links_to_the_trace_page(live_server):
    chat = httpx.get(live_server + "/", timeout=10)
    assert 'href="/static/agent.html"' in chat.text and "Agent traces" in chat.text
    viewer = httpx.get(live_server + "/static/agent.html", timeout=10)
    assert viewer.status_code == 200 and 'href="/"' in viewer.text


def test_trace_page_shows_a_run_step_by_step(page, live_server, trace):
    from playwright.sync_api import expect

    page.goto(live_server + "/static/agent.html")
    expect(page.locator("#run")).to_be_hidden()
    page.set_input_files("#file", str(trace))
    expect(page.locator("body")).to_have_attribute("data-state", "shown")

    expect(page.locator("#question")).to_have_text(QUESTION)
    expect(page.locator("#model")).to_have_text("smollm2-135m-instruct")
    expect(page.locator("#tools code")).to_have_text(["calculator", "now", "final_answer"])
    expect(page.locator("#config")).not_to_have_attribute("open", "")
    page.click("#config summary")
    expect(page.locator("#config-table")).to_contain_text("max_steps")

    steps = page.locator(".step")
    expect(steps).to_have_count(3)
    expect(steps.locator(":scope > .trace-card-heading .trace-card-title")).to_have_text(["Step 1", "Step 2", "Step 3"])
    expect(steps.nth(1).locator(".model-text")).to_contain_text("Let me <b>check</b> it.")  # text, not markup
    expect(steps.nth(1).locator("b")).to_have_count(0)
    expect(page.locator(".tool-call")).to_have_count(3)
    expect(steps.first.locator(".tool-call")).to_have_text('calculator({\n  "expression": "1234 * 5678"\n})')
    expect(page.locator(".tool-result")).to_have_count(3)
    expect(page.locator(".tool-result.ok")).to_have_count(2)
    failed = page.locator(".tool-result.failed")
    expect(failed).to_have_count(1)
    expect(failed).to_contain_text("unknown_tool")
    expect(failed).to_contain_text("there is no tool 'check'")
    assert failed.evaluate("node => node.closest('.step').dataset.step") == "2"  # under its call
    note = page.locator(".note")
    expect(note).to_have_count(1)
    expect(note).to_have_attribute("data-kind", "summary")
    expect(note).to_contain_text("the calculator gave 7006652")
    expect(page.locator("#answer")).to_have_text("7006652")
    expect(page.locator("#stopped")).to_contain_text("answer")
    expect(page.locator("#end")).to_contain_text("1669 prompt + 90 generated")
    expect(page.locator("#error")).to_be_hidden()

    # step by step: "next" starts at the first step; a note goes with the turn before it; the end comes last
    expect(page.locator("#all")).to_be_disabled()
    assert visible_steps(page) == 3
    page.click("#next")
    assert visible_steps(page) == 1
    expect(page.locator("#position")).to_have_text("step 1 of 3")
    expect(page.locator("#prev")).to_be_disabled()
    expect(page.locator(".note")).to_be_hidden()
    page.click("#next")
    assert visible_steps(page) == 2
    expect(page.locator(".note")).to_be_visible()
    expect(page.locator("#answer")).to_be_hidden()
    page.click("#next")
    page.click("#next")
    assert visible_steps(page) == 3
    expect(page.locator("#answer")).to_be_visible()
    expect(page.locator("#next")).to_be_disabled()
    page.click("#prev")
    page.click("#prev")
    assert visible_steps(page) == 2
    page.click("#all")
    assert visible_steps(page) == 3
    expect(page.locator("#answer")).to_be_visible()
    page.click("#prev")  # from "show all", one step back from the end
    assert visible_steps(page) == 3
    expect(page.locator("#answer")).to_be_hidden()


def test_trace_page_names_what_is_wrong_with_a_file(page, live_server, trace, tmp_path):
    from playwright.sync_api import expect

    lines = trace.read_text(encoding="utf-8").splitlines()
    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n".join([lines[0], lines[1][:40], *lines[2:]]) + "\n", encoding="utf-8")
    headless = tmp_path / "headless.jsonl"
    headless.write_text("\n".join(lines[1:]) + "\n", encoding="utf-8")

    page.goto(live_server + "/static/agent.html")
    page.set_input_files("#file", str(trace))
    expect(page.locator(".step")).to_have_count(3)
    page.set_input_files("#file", str(broken))
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error")).to_contain_text("broken.jsonl: line 2: not JSON")
    expect(page.locator("#run")).to_be_hidden()
    expect(page.locator("body")).to_have_attribute("data-state", "error")
    page.set_input_files("#file", str(headless))
    expect(page.locator("#error")).to_contain_text('line 1: a trace begins with a "start" event, not "model"')
    page.set_input_files("#file", str(trace))  # a good file clears the error
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator("#answer")).to_have_text("7006652")


def test_trace_page_opens_a_trace_by_url(page, live_server, trace):
    from playwright.sync_api import expect

    page.route(live_server + "/runs/run.jsonl",
               lambda route: route.fulfill(status=200, content_type="application/jsonl", body=trace.read_text()))
    page.goto(live_server + "/static/agent.html?trace=/runs/run.jsonl")
    expect(page.locator("#answer")).to_have_text("7006652")
    expect(page.locator(".step")).to_have_count(3)
    expect(page.locator("#source")).to_have_text("/runs/run.jsonl")

    page.goto(live_server + "/static/agent.html?trace=/runs/missing.jsonl")
    expect(page.locator("#error")).to_contain_text("/runs/missing.jsonl: cannot load the trace (HTTP 404")
    page.goto(live_server + "/static/agent.html?trace=https://example.com/run.jsonl")  # never fetched
    expect(page.locator("#error")).to_contain_text("only traces on this server are opened")


def test_trace_page_shows_repairs_and_a_resumed_run(page, live_server, tmp_path):
    """A turn whose call did not parse, the agent's repair request, a resume, and no end yet."""
    from playwright.sync_api import expect

    writer = TraceWriter(tmp_path / "stopped.jsonl")
    writer.write("start", question=QUESTION, model="smollm2-135m-instruct", tools=["calculator"],
                 config=dataclasses.asdict(AgentConfig()), messages=[{"role": "user", "content": QUESTION}])
    writer.write("model", step=0, reply={"role": "assistant", "content": "<tool_call>{calculator"},
                 text="<tool_call>{calculator", prompt_tokens=400, completion_tokens=8, malformed=True, seconds=0.8)
    writer.write("note", step=1, role="user", kind="malformed", replaces=None,
                 content="Your tool call did not parse. Write it as <tool_call> ...")
    writer.write("resume", step=1)
    writer.close()

    page.goto(live_server + "/static/agent.html")
    page.set_input_files("#file", str(writer.path))
    expect(page.locator(".step.malformed")).to_have_count(1)
    expect(page.locator(".step")).to_contain_text("did not parse")
    expect(page.locator('.note[data-kind="malformed"]')).to_contain_text("Repair request")
    expect(page.locator(".resume")).to_contain_text("Resumed at step 2")
    expect(page.locator("#end")).to_contain_text("no end event")
    expect(page.locator("#answer")).to_have_count(0)
