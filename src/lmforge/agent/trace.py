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
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from lmforge.errors import InputError


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


def read_events(path: str | Path) -> list[dict]:
    """The events of a trace file; InputError naming the line that does not parse."""
    from lmforge.data.jsonl import iter_records

    if not Path(path).is_file():
        raise InputError(f"{path}: no such trace file")
    events = []
    for event, where in iter_records(path):
        if not isinstance(event, dict) or "event" not in event:
            raise InputError(f"{where}: an event needs an 'event' field")
        events.append(event)
    if not events or events[0]["event"] != "start":
        raise InputError(f"{path}: a trace begins with a 'start' event")
    return events


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
