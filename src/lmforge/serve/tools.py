"""Tool calling in the model's own chat format.

SmolLM2, Qwen2.5 and the Hermes models write a call as JSON inside tags:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

The server turns OpenAI's ``tools`` into that convention and back:

- the tool list goes to the chat template as its ``tools`` variable when the template
  uses one (Qwen2.5), else into the system prompt, in the same words such templates use;
- earlier assistant turns with ``tool_calls`` are written back as ``<tool_call>`` blocks,
  and ``tool`` messages keep their role;
- the reply is parsed: each ``<tool_call>`` block whose JSON names a function becomes a
  ``tool_calls`` entry; what is left is plain content (a reply without one is plain content);
- ``tool_choice="required"`` or a named function forces a call: the reply starts with
  ``<tool_call>\\n`` and the JSON is constrained to the tools' names and argument schemas.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from lmforge.serve.protocol import APIError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CLOSE) + r"|$)", re.DOTALL)


def check_tools(tools: list[dict[str, Any]] | None, tool_choice: str | dict | None) -> tuple[list[dict], str | None]:
    """Validate ``tools``/``tool_choice``; returns the function definitions in use and the forced name.

    The forced name is None for "auto", "" for "required" (any tool), else the named function.
    """
    functions = []
    for index, tool in enumerate(tools or []):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function, dict) \
                or not isinstance(function.get("name"), str):
            raise APIError(400, "each tool must be {'type': 'function', 'function': {'name': ..., 'parameters': ...}}",
                           f"tools[{index}]")
        functions.append(function)
    choice = tool_choice if tool_choice is not None else ("auto" if functions else "none")
    if choice == "none" or not functions:
        if isinstance(choice, dict) or choice == "required":
            raise APIError(400, "tool_choice asks for a tool call but no tools were given", "tool_choice")
        return [], None
    if choice == "auto":
        return functions, None
    if choice == "required":
        return functions, ""
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in {f["name"] for f in functions}:
            raise APIError(400, f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
        return functions, name
    raise APIError(400, "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', "
                        "'function': {'name': ...}}", "tool_choice")


def tools_system_text(functions: list[dict]) -> str:
    """The tool instructions for a template that has no ``tools`` variable (Hermes/Qwen wording)."""
    listing = "\n".join(json.dumps({"type": "function", "function": f}, ensure_ascii=False) for f in functions)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
            f"{listing}\n</tools>\n\nFor each function call, return a json object with function name and "
            "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def prepare_messages(messages: list[dict[str, Any]], functions: list[dict], template_takes_tools: bool) -> list[dict]:
    """OpenAI messages -> {"role", "content"} messages for the chat template.

    Content given as a list of parts is joined; assistant ``tool_calls`` become
    ``<tool_call>`` blocks; the tool list joins the system prompt unless the template
    renders it itself.
    """
    out = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise APIError(400, "each message needs a role", f"messages[{index}]")
        content = message.get("content")
        if isinstance(content, list):
            if any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
                raise APIError(400, "only text content parts are supported", f"messages[{index}].content")
            content = "".join(p.get("text", "") for p in content)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise APIError(400, "content must be a string or a list of text parts", f"messages[{index}].content")
        for call in message.get("tool_calls") or []:
            function = call.get("function", {}) if isinstance(call, dict) else {}
            arguments = function.get("arguments", "{}")
            try:
                arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
            except json.JSONDecodeError:
                pass
            block = json.dumps({"name": function.get("name"), "arguments": arguments}, ensure_ascii=False)
            content += ("\n" if content else "") + f"{OPEN}\n{block}\n{CLOSE}"
        out.append({"role": message["role"], "content": content})
    if functions and not template_takes_tools:
        text = tools_system_text(functions)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


def forced_call_schema(functions: list[dict], name: str) -> dict:
    """The JSON schema of a call of ``name`` (or of any tool when ``name`` is "")."""
    def call(function: dict) -> dict:
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        return {"type": "object", "properties": {"name": {"const": function["name"]}, "arguments": parameters},
                "required": ["name", "arguments"]}
    chosen = [f for f in functions if not name or f["name"] == name]
    return call(chosen[0]) if len(chosen) == 1 else {"anyOf": [call(f) for f in chosen]}


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """Split a reply into plain content and OpenAI ``tool_calls`` (blocks that do not parse stay content)."""
    calls, kept, last = [], [], 0
    for match in _BLOCK.finditer(text):
        try:
            call = json.loads(match.group(1))
        except json.JSONDecodeError:
            continue
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            continue
        arguments = call.get("arguments", call.get("parameters", {}))
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": call["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}})
        kept.append(text[last:match.start()])
        last = match.end()
    if not calls:
        return text, []
    content = ("".join(kept) + text[last:]).strip()
    return content or None, calls


class ToolCallStream:
    """Streams plain text until a ``<tool_call>`` begins; from there on holds everything back.

    ``push(piece) -> text to emit now``; at the end, :func:`parse_tool_calls` on
    :attr:`held` gives the calls (and any content they did not use).
    """

    def __init__(self) -> None:
        self.pending, self.held, self.calling = "", "", False

    def push(self, piece: str) -> str:
        if self.calling:
            self.held += piece
            return ""
        self.pending += piece
        start = self.pending.find(OPEN)
        if start >= 0:
            self.calling, self.held = True, self.pending[start:]
            text, self.pending = self.pending[:start], ""
            return text
        keep = next((i for i in range(max(0, len(self.pending) - len(OPEN) + 1), len(self.pending))
                     if OPEN.startswith(self.pending[i:])), len(self.pending))
        text, self.pending = self.pending[:keep], self.pending[keep:]
        return text

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text
