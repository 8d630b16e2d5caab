"""The agent loop: think, call a tool, observe, ... answer.

Each step the model reads the conversation (system prompt with the tools, the question,
its earlier turns and the tools' results) and writes one turn. A turn with tool calls
runs them (:class:`~lmforge.agent.tools.Toolbox`: arguments validated, errors, timeouts
and oversized output turned into text the model reads) and the loop goes on; a turn
without one is the answer. The loop always ends: at the answer, or when a budget runs
out (model turns, seconds, generated tokens), or after ``repairs`` failed calls in a row, or
when the conversation no longer fits the context even summarized. With every turn a call
(``tool_choice="required"``), the first is offered the tools without ``final_answer``
(``act_first``), and an answer written in a turn of its own is asked with the question again.

Short-term memory: before each turn the conversation must fit the model's context with
room for the reply. When it does not, the oldest turns (everything between the question
and the last ``keep_turns`` turns) are replaced by a summary the model writes of them;
if that is still too long, the oldest tool results are cut.

Plan, then execute (``plan=True``): before the first turn the model writes a numbered plan
(no tools), which goes into the system prompt; after a failed tool call it rewrites the plan
(at most ``revisions`` times) before going on.

Long-term memory (:class:`~lmforge.agent.memory.Memory`, optional): the facts relevant to
the question are put in the system prompt, the model gets ``remember`` and ``recall``
tools, and an answered question is stored with its answer.

Every step is written to a trace (:mod:`lmforge.agent.trace`); :meth:`Agent.resume`
continues a stopped run from its trace. Turn ``i`` is decoded with seed ``seed + i``, so
the same seed gives the same trajectory (greedy decoding, the default, needs no seed).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lmforge.agent.backend import ChatBackend, Reply
from lmforge.agent.memory import Memory
from lmforge.agent.tools import Tool, Toolbox, tool
from lmforge.agent.trace import TraceWriter, read_events, replay
from lmforge.errors import InputError
from lmforge.eval.task import AGENT_ANSWERS
from lmforge.settings import field

SYSTEM = ("You are a helpful assistant. Solve the task step by step. Call a tool when it helps; "
          "read its result, then go on. When you know the answer, reply with the answer alone.")
MALFORMED = ("Your tool call did not parse. Write it as <tool_call>\n{\"name\": <tool name>, \"arguments\": "
             "{...}}\n</tool_call> with valid JSON, or answer without a tool.")
FINAL_ANSWER = "final_answer"
PLAN_MARK = "\n\nYour plan:\n"
PLAN = ("Write a short numbered plan (at most five steps) for answering the question above with the tools "
        "{tools}. Write only the plan.")
REVISE = ("A step failed: {error}\nWrite a revised numbered plan (at most five steps) that gets around it. "
          "Write only the plan.")
# The question again, last: a small model that reads only "your final answer" after a long
# conversation tends to answer some other question (SmolLM2-135M: 0 of 8 coding items, 4 with it).
ANSWER_NOW = "Using what the tools returned above, answer the question: {question}"
SUMMARIZE = "Summarize the conversation above in a few lines: what was asked, what was tried, what was found."


@dataclass
class AgentConfig:
    """How an agent runs (`lmforge agent` flags)."""

    tool_choice: str = field("required", "required: every turn is a tool call and the answer comes through the "
                                         "final_answer tool (what small models manage); auto: the model decides, "
                                         "and a turn without a call is the answer")
    answer: str = field("tool", "with tool_choice required: tool (the answer is final_answer's argument, a JSON "
                                "string) or words (final_answer() takes no argument; the model then writes its "
                                "answer in a turn without tools, asked the question again)")
    act_first: bool = field(True, "with tool_choice required: the first turn calls one of the tools, final_answer "
                                  "is offered from the second on (a small model otherwise answers from its own "
                                  "guess at once)")
    max_steps: int = field(8, "model turns at most (a turn may call several tools)")
    max_seconds: float = field(300.0, "wall-clock budget for the run, in seconds")
    max_tokens: int = field(4096, "tokens the model may generate over the whole run")
    max_new_tokens: int = field(256, "tokens per model turn")
    repairs: int = field(2, "failed tool calls in a row sent back to the model before the run stops")
    temperature: float = field(0.0, "0 decodes greedily; above 0 samples (turn i with seed + i)")
    seed: int = field(0, "seed for sampled turns")
    plan: bool = field(False, "plan, then execute: the model first writes a numbered plan, follows it with the "
                              "tools, and revises it when a step fails")
    revisions: int = field(2, "with plan: times the plan may be rewritten after a failed step")
    keep_turns: int = field(4, "turns kept word for word when older ones are summarized to fit the context")
    system: str = field(SYSTEM, "the system prompt (the tool list is added to it)")

    def __post_init__(self) -> None:
        for name in ("max_steps", "max_tokens", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.answer not in AGENT_ANSWERS:
            raise ValueError(f"answer must be words or tool, got {self.answer!r}")
        if self.tool_choice not in ("required", "auto"):
            raise ValueError(f"tool_choice must be required or auto, got {self.tool_choice!r}")
        if self.revisions < 0:
            raise ValueError(f"revisions must be >= 0, got {self.revisions}")
        if self.max_seconds <= 0 or self.repairs < 0 or self.temperature < 0 or self.keep_turns < 1:
            raise ValueError("max_seconds must be > 0, repairs >= 0, temperature >= 0, keep_turns >= 1")


def _config_from_trace(saved: dict, trace: str | Path) -> AgentConfig:
    """The AgentConfig a trace's start event recorded; InputError when a value has the wrong type or range."""
    fields = {f.name: f for f in dataclasses.fields(AgentConfig)}
    values = {}
    for name, value in saved.items():
        if name not in fields:
            continue  # a setting of another version
        default = fields[name].default
        kind = (int, float) if isinstance(default, float) else type(default)
        if not isinstance(value, kind) or (isinstance(value, bool) and not isinstance(default, bool)) or \
                (isinstance(value, (int, float)) and not isinstance(value, bool) and not -2**31 < value < 2**31):
            raise InputError(f"{trace}: the recorded setting {name} = {value!r:.60} is not a {type(default).__name__} "
                             "in range")
        values[name] = value
    try:
        return AgentConfig(**values)
    except ValueError as err:
        raise InputError(f"{trace}: the recorded settings: {err}") from err


@dataclass
class AgentResult:
    """How a run ended."""

    answer: str
    stopped: str  # "answer", "steps", "time", "tokens", "repairs" or "context" (no room left, even summarized)
    steps: int  # model turns taken
    tool_calls: int
    failed_calls: int  # tool calls that did not succeed (unknown tool, bad arguments, errors, timeouts)
    malformed: int  # turns whose tool call did not parse
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    messages: list[dict]
    events: list[dict]

    @property
    def parse_rate(self) -> float:
        """Of the turns that tried to call a tool, the share whose call parsed (1.0 with none)."""
        tried = self.tool_call_turns + self.malformed
        return 1.0 if tried == 0 else self.tool_call_turns / tried

    @property
    def tool_call_turns(self) -> int:
        return sum(1 for e in self.events if e["event"] == "model" and e["reply"].get("tool_calls"))


class Agent:
    """A model (:class:`~lmforge.agent.backend.ChatBackend`) with tools, a loop and a trace."""

    def __init__(self, backend: ChatBackend, tools: Toolbox, config: AgentConfig | None = None,
                 on_event: Callable[[dict], None] | None = None, memory: Memory | None = None):
        self.backend, self.config, self.memory = backend, config or AgentConfig(), memory
        extra = [*(memory.tools() if memory is not None else []),
                 *([final_answer_tool(self.config.answer)] if self.config.tool_choice == "required" else [])]
        self.tools = Toolbox([*tools, *(t for t in extra if t.name not in tools)], max_output=tools.max_output)
        self.on_event = on_event  # sees every trace event as it happens (`lmforge agent` prints them)

    def run(self, question: str, trace: str | Path | None = None, context: str = "") -> AgentResult:
        """Answer ``question``; ``context``: text put before it in the system prompt (recalled memory, a plan)."""
        if not question.strip():
            raise InputError("the question is empty")
        recalled = self.memory.context(question) if self.memory is not None else ""
        context = "\n\n".join(part for part in (context, recalled) if part)
        system = self.config.system + (f"\n\n{context}" if context else "")
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        writer = TraceWriter(trace, on_event=self.on_event)
        writer.write("start", question=question, model=self.backend.name, tools=self.tools.names,
                     config=dataclasses.asdict(self.config), messages=messages)
        return self._keep(question, self._loop(messages, 0, writer))

    def resume(self, trace: str | Path) -> AgentResult:
        """Continue the run that ``trace`` records (with its config), appending to the same file.
        A finished run is returned as it ended."""
        events = read_events(trace)
        if events[-1]["event"] == "end":
            raise InputError(f"{trace}: this run has ended ({events[-1]['stopped']}); nothing to resume")
        self.config = _config_from_trace(events[0]["config"], trace)
        messages, steps = replay(events)
        writer = TraceWriter(trace, append=True, on_event=self.on_event)
        writer.events = list(events)
        writer.write("resume", step=steps)
        return self._keep(events[0]["question"], self._loop(messages, steps, writer))

    def _keep(self, question: str, result: AgentResult) -> AgentResult:
        """With a memory: an answered question is stored with its answer for later sessions."""
        if self.memory is not None and result.stopped == "answer" and result.answer:
            self.memory.remember(f"Asked: {' '.join(question.split())} Answer: {result.answer}", source="answer")
        return result

    # ---- the loop ---------------------------------------------------------------------------

    def _loop(self, messages: list[dict], step: int, writer: TraceWriter) -> AgentResult:
        config, schemas = self.config, self.tools.schemas()
        start = time.monotonic()
        counts = {"tool_calls": 0, "failed": 0, "malformed": 0, "prompt": 0, "completion": 0}
        done: dict[str, str] = {}  # a call (name and arguments) that succeeded -> its result
        for event in writer.events:  # a resumed run counts what it had done
            if event["event"] == "model":
                counts["prompt"] += event["prompt_tokens"]
                counts["completion"] += event["completion_tokens"]
                counts["malformed"] += int(event["malformed"])
            elif event["event"] == "tool":
                counts["tool_calls"] += 1
                counts["failed"] += int(not event["ok"])
                if event["ok"] and event["error"] is None:
                    done[event["name"] + json.dumps(event["arguments"], sort_keys=True)] = event["content"]
        answer, stopped, failures = "", "steps", 0
        revisions = sum(1 for e in writer.events if e["event"] == "note" and e.get("kind") == "plan") - 1
        if config.plan and revisions < 0:  # plan, then execute
            counts["completion"] += self._plan(messages, step, writer, PLAN.format(tools=", ".join(
                n for n in self.tools.names if n != FINAL_ANSWER)))
            revisions = 0
        choice = config.tool_choice  # the next turn's: after a repeated call, the final answer is asked for
        while step < config.max_steps:
            if time.monotonic() - start >= config.max_seconds:
                stopped = "time"
                break
            left = config.max_tokens - counts["completion"]
            if left < 1:
                stopped = "tokens"
                break
            if not self._fit(messages, schemas, step, writer):
                stopped = "context"
                break
            began = time.monotonic()
            offered = schemas
            if step == 0 and config.act_first and choice != "auto" and len(schemas) > 1:
                offered = [s for s in schemas if s["function"]["name"] != FINAL_ANSWER]
            reply = self.backend.complete(messages, offered, max_tokens=min(config.max_new_tokens, left),
                                          temperature=config.temperature,
                                          seed=config.seed + step if config.temperature > 0 else None,
                                          tool_choice=choice)
            counts["prompt"] += reply.prompt_tokens
            counts["completion"] += reply.completion_tokens
            messages.append(reply.message())
            writer.write("model", step=step, reply=reply.message(), text=reply.text, prompt_tokens=reply.prompt_tokens,
                         completion_tokens=reply.completion_tokens, malformed=reply.malformed,
                         seconds=round(time.monotonic() - began, 3))
            step += 1
            if reply.malformed:
                counts["malformed"] += 1
                failures += 1
                self._note(messages, writer, step, "user", MALFORMED, "malformed")
            elif not reply.tool_calls:
                answer, stopped = (reply.content or "").strip(), "answer"
                break
            choice = config.tool_choice
            for call in reply.tool_calls:
                key = _call_key(call)
                if key in done:  # the same call again: show the earlier result instead of running it
                    messages.append({"role": "tool", "tool_call_id": call["id"], "name": call["function"]["name"],
                                     "content": f"{done[key]}\n(already called with these arguments: use the result)"})
                    writer.write("tool", step=step - 1, id=call["id"], name=call["function"]["name"],
                                 arguments=_arguments(call), content=messages[-1]["content"], ok=True,
                                 error="repeated", seconds=0.0)
                    counts["tool_calls"] += 1
                    choice = FINAL_ANSWER if FINAL_ANSWER in self.tools else choice
                    continue
                result = self.tools.call(call["function"]["name"], call["function"].get("arguments"))
                if result.ok:
                    done[key] = result.content
                counts["tool_calls"] += 1
                counts["failed"] += int(not result.ok)
                failures = 0 if result.ok else failures + 1
                messages.append({"role": "tool", "tool_call_id": call["id"], "name": result.name,
                                 "content": result.content})
                writer.write("tool", step=step - 1, id=call["id"], name=result.name, arguments=result.arguments,
                             content=result.content, ok=result.ok, error=result.error,
                             seconds=round(result.seconds, 3))
                if result.ok and result.name == FINAL_ANSWER:
                    stopped = "answer"
                    answer = result.content.strip() if config.answer == "tool" else \
                        self._answer_in_words(messages, step, writer, counts)
                    break
                if not result.ok and config.plan and revisions < config.revisions:
                    revisions += 1
                    counts["completion"] += self._plan(messages, step, writer, REVISE.format(error=result.content))
            if stopped == "answer":
                break
            if failures > config.repairs:
                stopped = "repairs"
                break
        else:
            stopped = "steps"
        if stopped in ("steps", "repairs") and config.max_tokens > counts["completion"]:
            answer = self._answer_in_words(messages, step, writer, counts)  # out of turns: one last, plain one
        elif stopped != "answer":
            answer = _last_words(messages)
        seconds = time.monotonic() - start
        writer.write("end", answer=answer, stopped=stopped, steps=step, tool_calls=counts["tool_calls"],
                     prompt_tokens=counts["prompt"], completion_tokens=counts["completion"], seconds=round(seconds, 3))
        writer.close()
        return AgentResult(answer=answer, stopped=stopped, steps=step, tool_calls=counts["tool_calls"],
                           failed_calls=counts["failed"], malformed=counts["malformed"],
                           prompt_tokens=counts["prompt"], completion_tokens=counts["completion"],
                           seconds=seconds, messages=messages, events=writer.events)

    def _answer_in_words(self, messages: list[dict], step: int, writer: TraceWriter, counts: dict) -> str:
        """The answer as the model writes it in a turn without tools (its usual format: prose, a code
        block), after the conversation so far; recorded as a model turn and a note."""
        self._note(messages, writer, step, "user", ANSWER_NOW.format(question=self._question(messages)), "answer")
        if not self._fit(messages, [], step, writer):
            return _last_words(messages)
        began = time.monotonic()
        config = self.config
        reply = self.backend.complete(messages, [], max_tokens=min(config.max_new_tokens,
                                                                   config.max_tokens - counts["completion"]),
                                      temperature=config.temperature,
                                      seed=config.seed + step if config.temperature > 0 else None)
        counts["prompt"] += reply.prompt_tokens
        counts["completion"] += reply.completion_tokens
        messages.append(reply.message())
        writer.write("model", step=step, reply=reply.message(), text=reply.text, prompt_tokens=reply.prompt_tokens,
                     completion_tokens=reply.completion_tokens, malformed=False,
                     seconds=round(time.monotonic() - began, 3))
        return (reply.content or "").strip()

    @staticmethod
    def _question(messages: list[dict]) -> str:
        """The user's question (the first user message; a summary or plan never replaces it)."""
        return next(m["content"] for m in messages if m["role"] == "user")

    def _plan(self, messages: list[dict], step: int, writer: TraceWriter, ask: str) -> int:
        """Have the model write (or rewrite) its plan, kept in the system prompt; the tokens it took."""
        request = [*messages, {"role": "user", "content": ask}]
        reply = self.backend.complete(request, [], max_tokens=min(160, self.config.max_new_tokens))
        plan = (reply.content or "").strip() or "(no plan)"
        system = messages[0]["content"].split(PLAN_MARK)[0] + PLAN_MARK + plan + "\nCarry it out step by step."
        self._note(messages, writer, step, "system", system, "plan", replaces=(0, 1))
        return reply.completion_tokens

    def _note(self, messages: list[dict], writer: TraceWriter, step: int, role: str, content: str, kind: str,
              replaces: tuple[int, int] | None = None) -> None:
        """Add (or, with ``replaces``, put in place of messages[start:end]) a message of the agent's own."""
        if replaces:
            messages[replaces[0]:replaces[1]] = [{"role": role, "content": content}]
        else:
            messages.append({"role": role, "content": content})
        writer.write("note", step=step, role=role, content=content, kind=kind,
                     replaces=list(replaces) if replaces else None)

    # ---- short-term memory ------------------------------------------------------------------

    def _fit(self, messages: list[dict], schemas: list[dict], step: int, writer: TraceWriter) -> bool:
        """Make the conversation leave room for a reply in the model's context: summarize the older
        turns, then cut the oldest tool results; False when even that is not enough."""
        context = self.backend.context
        if context is None:
            return True
        budget = context - self.config.max_new_tokens
        if self.backend.count_tokens(messages, schemas) <= budget:
            return True
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if len(turns) > self.config.keep_turns and turns[0] > 1:
            start, end = 2, turns[-self.config.keep_turns]
            older = messages[start:end]
            summary = self._summarize(messages[:2] + older)
            self._note(messages, writer, step, "user", f"Summary of the earlier steps: {summary}", "summary",
                       replaces=(start, end))
        for message in messages[2:]:  # still too long: cut tool results, oldest first
            if self.backend.count_tokens(messages, schemas) <= budget:
                return True
            if message["role"] == "tool" and len(message["content"]) > 200:
                message["content"] = message["content"][:200] + " [cut to fit the context]"
        return self.backend.count_tokens(messages, schemas) <= budget

    def _summarize(self, messages: list[dict]) -> str:
        flat = "\n".join(f"{m['role']}: {m.get('content') or json.dumps(m.get('tool_calls'))}" for m in messages[1:])
        ask = [{"role": "system", "content": "You summarize conversations briefly."},
               {"role": "user", "content": f"{flat[-6000:]}\n\n{SUMMARIZE}"}]
        reply: Reply = self.backend.complete(ask, [], max_tokens=min(128, self.config.max_new_tokens))
        return (reply.content or "").strip() or "(no summary)"


def final_answer_tool(answer: str = "words") -> Tool:
    """The tool that ends a run with ``tool_choice="required"``: with ``answer="tool"`` its argument is the
    answer; with ``"words"`` it takes none, and the model writes the answer in a turn of its own."""
    def final_answer(answer: str) -> str:
        """Give the final answer to the user's question. Call it once the answer is known.

        Args:
            answer: the answer, as short as it can be (a number, a name, a short sentence).
        """
        return answer

    def ready_to_answer() -> str:
        """Call this once you know the answer: you will then write the final answer to the user's question."""
        return "ok"

    return tool(final_answer) if answer == "tool" else tool(ready_to_answer, name=FINAL_ANSWER)


def _call_key(call: dict) -> str:
    return call["function"]["name"] + json.dumps(_arguments(call), sort_keys=True)


def _arguments(call: dict):
    """A call's arguments as parsed JSON (the text itself when it does not parse)."""
    arguments = call["function"].get("arguments")
    try:
        return json.loads(arguments) if isinstance(arguments, str) else arguments
    except json.JSONDecodeError:
        return arguments


def _last_words(messages: list[dict]) -> str:
    """A stopped run's best answer: the last thing the model said in plain words."""
    for message in reversed(messages):
        if message["role"] == "assistant" and message.get("content") and not message.get("tool_calls"):
            return message["content"].strip()
    return ""
