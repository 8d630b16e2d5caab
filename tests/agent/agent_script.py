"""A scripted stand-in for a model, shared by the agent tests."""

from __future__ import annotations

import json

from lmforge.agent.backend import Reply


def call(name: str, **arguments) -> dict:
    return {"id": f"call_{name}_{json.dumps(arguments, sort_keys=True)}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments)}}


class Scripted:
    """A backend that replies from a script (a Reply or a function of the messages), and records what it saw."""

    name, context = "scripted", None

    def __init__(self, *replies):
        self.replies, self.seen = list(replies), []

    def count_tokens(self, messages, tools):
        return sum(len(m.get("content") or "") + len(json.dumps(m.get("tool_calls") or "")) for m in messages)

    def complete(self, messages, tools, *, max_tokens=256, temperature=0.0, seed=None, tool_choice="auto"):
        self.seen.append({"messages": [dict(m) for m in messages], "tool_choice": tool_choice, "seed": seed,
                          "max_tokens": max_tokens, "tools": [t["function"]["name"] for t in tools]})
        reply = self.replies.pop(0) if self.replies else Reply(content="(script ended)")
        reply = reply(messages) if callable(reply) else reply
        reply.completion_tokens = reply.completion_tokens or 5
        return reply


def calls(*tool_calls) -> Reply:
    return Reply(content=None, tool_calls=list(tool_calls), text="<tool_call>...</tool_call>")


def answer(text: str) -> list:
    """The turn that ends a run by default: the final_answer call with the answer."""
    return [calls(call("final_answer", answer=text))]
