"""Where an agent's replies come from: a model lmforge loaded, or any OpenAI-compatible server.

Both speak OpenAI's chat messages (``{"role", "content", "tool_calls", "tool_call_id"}``)
and answer with a :class:`Reply`: the text, the tool calls it makes (OpenAI's shape), and
the tokens it cost.

:class:`LocalChat` renders the messages and the tools exactly as ``lmforge serve`` does
(:func:`lmforge.serve.completions.chat_prompt`: the model's own ``<tool_call>`` format) and
decodes on lmforge's engine. With ``constrain=True`` a tool call cannot fail to parse: the
reply is decoded freely until the model writes ``<tool_call>``, and from there on the JSON
of the call is decoded under the JSON-schema constraint of the tools' names and argument
schemas (:func:`lmforge.serve.tools.forced_call_schema`), then the block is closed. The
model still chooses whether to call a tool and which one; the constraint only makes what
it writes a well-formed call. ``tool_choice="required"`` opens every turn with the call
(as the server does for OpenAI's ``tool_choice``): the model then only picks the tool and
its arguments, which is what small models manage (SmolLM2-135M never starts a call of its
own, but forced and constrained it picks the calculator with the right expression). With ``constrain=False`` the reply is decoded as it comes
and a block that does not parse is reported as ``malformed`` (the agent shows the model
the error and lets it try again): the two settings give the parse rate with and without
the constraint.

:class:`RemoteChat` posts to ``/v1/chat/completions`` with ``tools``; the server parses
the calls (lmforge serve, llama.cpp, vLLM, ...).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Protocol

from lmforge.errors import InputError
from lmforge.serve.tools import CLOSE, OPEN, forced_call_schema, parse_tool_calls


@dataclass
class Reply:
    """One assistant turn."""

    content: str | None  # the text around the tool calls (None when there is none)
    tool_calls: list[dict] = field(default_factory=list)  # [{"id", "type": "function", "function": {"name", "arguments"}}]
    text: str = ""  # the whole reply as the model wrote it (tool-call blocks included)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    malformed: bool = False  # a <tool_call> block was written that did not parse

    def message(self) -> dict:
        """The reply as an OpenAI assistant message."""
        message: dict = {"role": "assistant", "content": self.content if not self.malformed else self.text}
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        return message


class ChatBackend(Protocol):
    """What an agent needs of a model."""

    name: str
    context: int | None  # positions the model sees (None: unknown, a server's own business)

    def complete(self, messages: list[dict], tools: list[dict], *, max_tokens: int = 256,
                 temperature: float = 0.0, seed: int | None = None, tool_choice: str = "auto") -> Reply:
        """The next assistant turn; ``tool_choice``: "auto" (the model decides), "required" (the turn is a
        tool call) or a tool's name (a call of that tool)."""
        ...

    def count_tokens(self, messages: list[dict], tools: list[dict]) -> int:
        """Prompt tokens ``messages`` take (an estimate where the backend cannot tell)."""
        ...


class LocalChat:
    """A loaded :class:`~lmforge.api.LanguageModel`, decoding on its engine in this process."""

    def __init__(self, lm, name: str = "local", constrain: bool = True, context: int | None = None):
        from lmforge.serve.served_model import ServedModel

        self.served = ServedModel(name, lm, max_batch_size=1, context=context)
        self.lm, self.name, self.constrain = lm, name, constrain

    @property
    def context(self) -> int:
        return self.served.context

    def _prompt(self, messages: list[dict], tools: list[dict]) -> list[int]:
        from lmforge.serve.completions import chat_prompt
        from lmforge.serve.protocol import APIError

        try:
            return chat_prompt(self.served, messages, [t["function"] for t in tools])
        except APIError as err:
            raise InputError(str(err)) from err

    def count_tokens(self, messages: list[dict], tools: list[dict]) -> int:
        return len(self._prompt(messages, tools))

    def _decode(self, prompt: list[int], max_tokens: int, temperature: float, seed: int | None,
                stop: list[str], constraint=None) -> tuple[str, int, str | None, bool]:
        """(text, tokens, finish reason, ended on a stop string) of one request on the engine."""
        from lmforge.infer.request import Completion, Request
        from lmforge.infer.sampling import SamplingConfig

        room = self.served.context - len(prompt)
        if room < 1:
            raise InputError(f"the conversation has {len(prompt)} tokens; the model's context is {self.served.context}")
        config = SamplingConfig(max_new_tokens=min(max_tokens, room), temperature=temperature, seed=seed,
                                stop=stop, stop_token_ids=self.served.end_of_turn())
        request: Request = self.served.request(prompt, config, constraint=constraint)
        engine = self.served.engine
        engine.add(request)
        outputs = []
        while engine.has_work:
            outputs += [o for o in engine.step() if o.request_id == request.request_id]
        done = Completion.join(outputs)
        on_string = done.finish_reason == "stop" and done.stop_token_id is None
        return done.text, done.completion_tokens, done.finish_reason, on_string

    def complete(self, messages: list[dict], tools: list[dict], *, max_tokens: int = 256,
                 temperature: float = 0.0, seed: int | None = None, tool_choice: str = "auto") -> Reply:
        names = [t["function"]["name"] for t in tools]
        if tool_choice not in ("auto", "required", *names):
            raise InputError(f"tool_choice must be auto, required or one of the tools, got {tool_choice!r}")
        prompt = self._prompt(messages, tools)
        forced = tool_choice != "auto" and bool(tools)
        if forced:  # the turn opens with the call (as the server does for tool_choice="required")
            text, used, reason = "", 0, "stop"
        else:
            text, used, reason, opened = self._decode(prompt, max_tokens, temperature, seed,
                                                      [OPEN] if self.constrain and tools else [])
            forced = self.constrain and bool(tools) and opened
        if forced:  # a call has begun: its JSON is decoded under the tools' schemas (with constrain)
            head = text + OPEN + "\n"
            constraint = None
            if self.constrain:
                from lmforge.serve.completions import json_constraint

                schema = forced_call_schema([t["function"] for t in tools],
                                            tool_choice if tool_choice in names else "")
                constraint = json_constraint(self.served, schema, self.served.end_of_turn())
            call, more, reason, _ = self._decode(prompt + self.served.encode_plain(head), max(1, max_tokens - used),
                                                 temperature, seed, [] if self.constrain else [CLOSE], constraint)
            text, used = head + call.strip() + "\n" + CLOSE, used + more
        content, calls = parse_tool_calls(text)
        return Reply(content=content, tool_calls=calls, text=text, prompt_tokens=len(prompt),
                     completion_tokens=used, finish_reason="tool_calls" if calls else reason,
                     malformed=not calls and OPEN in text)


class RemoteChat:
    """An OpenAI-compatible server's ``/v1/chat/completions`` with ``tools``."""

    context = None

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None, timeout: float = 300):
        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self.api_key, self.timeout = api_key, timeout
        if model is None:
            models = [m["id"] for m in self._call("GET", "/models").get("data", [])]
            if not models:
                raise InputError(f"{base_url} lists no models; name one (--model)")
            model = models[0]
        self.name = model

    def _call(self, method: str, route: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.base_url + route, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            raise InputError(f"{method} {self.base_url}{route} answered {err.code}: "
                             f"{err.read().decode(errors='replace')[:300]}") from None
        except (urllib.error.URLError, OSError, ValueError) as err:
            raise InputError(f"cannot reach an OpenAI-compatible server at {self.base_url} ({method} {route}: "
                             f"{err})") from None

    def count_tokens(self, messages: list[dict], tools: list[dict]) -> int:
        """About four characters a token: servers do not all offer a tokenizer route."""
        return len(json.dumps(messages, ensure_ascii=False)) // 4 + len(json.dumps(tools)) // 4

    def complete(self, messages: list[dict], tools: list[dict], *, max_tokens: int = 256,
                 temperature: float = 0.0, seed: int | None = None, tool_choice: str = "auto") -> Reply:
        body: dict = {"model": self.name, "messages": messages, "max_tokens": max_tokens, "temperature": temperature}
        if tools:
            body["tools"] = tools
            body["tool_choice"] = tool_choice if tool_choice in ("auto", "required") else \
                {"type": "function", "function": {"name": tool_choice}}
        if seed is not None:
            body["seed"] = seed
        answer = self._call("POST", "/chat/completions", body)
        choice = (answer.get("choices") or [{}])[0]
        message = choice.get("message") or {}
        usage = answer.get("usage") or {}
        content, calls = message.get("content"), message.get("tool_calls") or []
        text = content or ""
        if not calls and OPEN in text:  # the server did not parse it: try once more here
            content, calls = parse_tool_calls(text)
        for call in calls:
            text += ("\n" if text else "") + f"{OPEN}\n" + json.dumps(
                {"name": call["function"]["name"], "arguments": call["function"].get("arguments")},
                ensure_ascii=False) + f"\n{CLOSE}"
        return Reply(content=content, tool_calls=calls, text=text, prompt_tokens=usage.get("prompt_tokens", 0),
                     completion_tokens=usage.get("completion_tokens", 0), finish_reason=choice.get("finish_reason"),
                     malformed=not calls and OPEN in (content or ""))
