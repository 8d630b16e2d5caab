"""An agent run as JSON lines: what was asked, every model turn, every tool call, how it ended.

One event a line, written and flushed as it happens, so a run that is stopped part way
leaves a readable trace and can be resumed from it (:func:`read_trace`). The events:

- ``start``: ``question``, ``model``, ``tools`` (their names), ``config`` (the AgentConfig as a
  dict), ``messages`` (the opening messages: system prompt and question), ``time``;
- ``model``: ``step``, ``reply`` (the assistant message), ``text`` (as written), ``prompt_tokens``,
  ``completion_tokens``, ``malformed``, ``seconds``;
- ``tool``: ``step``, ``id`` (the call id), ``name``, ``arguments``, ``content`` (what the model
  was shown), ``ok``, ``error``, ``seconds``;
- ``note``: ``step``, ``role``, ``content``: a message the agent itself added (an error the
  model should repair, a summary of older turns, a plan, the request for the answer in words),
  with ``kind`` (malformed, summary, plan, answer);
- ``resume``: ``step``: the run went on from here (:meth:`lmforge.agent.Agent.resume`);
- ``end``: ``answer``, ``stopped`` (answer, steps, time, tokens, repairs, context), ``steps``, the token
  totals and ``seconds``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from lmforge.data.jsonl import finished_length, iter_records
from lmforge.errors import InputError
from lmforge.tokenizer.chat import ROLES


class TraceWriter:
    """Appends events to a JSONL file (or keeps them in memory only when ``path`` is None) and hands
    each to ``on_event`` (a live view) as it is written."""

    def __init__(self, path: str | Path | None = None, append: bool = False,
                 on_event: Callable[[dict], None] | None = None):
        self.events: list[dict] = []
        self.on_event = on_event
        self.path = Path(path) if path is not None else None
        self._file: IO[str] | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if append and self.path.is_file():  # a line cut by a kill goes: the next event starts a line of its own
                os.truncate(self.path, finished_length(self.path.read_bytes()))
            self._file = self.path.open("a" if append else "w", encoding="utf-8")

    def write(self, event: str, **fields: Any) -> dict:
        record = {"event": event, "time": round(time.time(), 3), **fields}
        self.events.append(record)
        if self._file is not None:
            self._file.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
            self._file.flush()
        if self.on_event is not None:
            self.on_event(record)
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# What a resumed run reads from each kind of event, and its type (a damaged trace is refused up front).
FIELDS = {
    "start": {"question": str, "messages": list, "config": dict},
    "model": {"step": int, "reply": dict, "prompt_tokens": int, "completion_tokens": int, "malformed": bool},
    "tool": {"id": str, "name": str, "content": str, "ok": bool, "error": (str, type(None))},
    "note": {"role": str, "content": str},
    "end": {"stopped": str},
}


def read_events(path: str | Path) -> list[dict]:
    """The events of a trace file, each checked for what a resumed run reads from it; InputError naming
    the line that does not parse or lacks a field. A last line cut short (the process was killed while
    writing it: every line the writer finishes ends with a newline) is left out."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such trace file")
    events = []
    for event, where in iter_records(path, finished_only=True):
        if not isinstance(event, dict) or not isinstance(event.get("event"), str):
            raise InputError(f"{where}: an event needs an 'event' field")
        _check_event(event, where)
        events.append(event)
    if not events or events[0]["event"] != "start":
        raise InputError(f"{path}: a trace begins with a 'start' event")
    return events


def _check_event(event: dict, where: str) -> None:
    for name, kind in FIELDS.get(event["event"], {}).items():
        value = event.get(name)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)) or \
                (kind is int and not 0 <= value < 2**31):
            raise InputError(f"{where}: a {event['event']!r} event needs {name!r} "
                             f"({getattr(kind, '__name__', 'a string or null')}), not {value!r:.60}")
    messages = event["messages"] if event["event"] == "start" else [event["reply"]] if event["event"] == "model" else []
    for message in messages:
        if not (isinstance(message, dict) and message.get("role") in ROLES
                and isinstance(message.get("content"), (str, type(None)))
                and isinstance(message.get("tool_calls", []), (list, type(None)))
                and all(isinstance(call, dict) for call in message.get("tool_calls") or [])):
            raise InputError(f"{where}: a message needs a 'role' ({', '.join(ROLES)}) and a 'content' (text or "
                             "null), its tool calls a list")
    if event["event"] == "note" and event["role"] not in ROLES:
        raise InputError(f"{where}: a note's role is one of {', '.join(ROLES)}, not {event['role']!r:.40}")
    replaces = event.get("replaces")
    if event["event"] == "note" and replaces is not None and not (
            isinstance(replaces, list) and len(replaces) == 2 and all(type(i) is int for i in replaces)):
        raise InputError(f"{where}: 'replaces' is a pair of message indexes")


def replay(events: list[dict]) -> tuple[list[dict], int]:
    """(the conversation the events record, the number of model turns taken): what a resumed run
    continues from. A turn whose tool calls were not all answered is dropped, so it runs again."""
    messages = [dict(m) for m in events[0]["messages"]]
    steps, pending = 0, 0
    turn_start = len(messages)
    for event in events[1:]:
        kind = event["event"]
        if kind == "model":
            turn_start = len(messages)
            messages.append(event["reply"])
            steps = event["step"] + 1
            pending = len(event["reply"].get("tool_calls") or [])
        elif kind == "tool":
            messages.append({"role": "tool", "tool_call_id": event["id"], "name": event["name"],
                             "content": event["content"]})
            pending -= 1
        elif kind == "note":
            if event.get("replaces"):
                start, end = event["replaces"]
                messages[start:end] = [{"role": event["role"], "content": event["content"]}]
            else:
                messages.append({"role": event["role"], "content": event["content"]})
    if pending > 0:  # stopped in the middle of a turn's calls
        del messages[turn_start:]
        steps -= 1
    return messages, steps
