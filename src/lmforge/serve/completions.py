"""From an OpenAI request to engine requests, and from engine outputs to OpenAI's answers.

One HTTP request becomes ``n`` engine requests per prompt (``n`` choices), each with its
own seed (``seed + i``). Both chat and text completions go through :func:`build_requests`;
the answers are plain dicts in OpenAI's shapes (``chat.completion``,
``chat.completion.chunk``, ``text_completion``).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from lmforge.infer.request import Request, RequestOutput, TokenLogprob
from lmforge.infer.sampling import SamplingConfig
from lmforge.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
    stop_list,
)
from lmforge.serve.served_model import ServedModel
from lmforge.serve.tools import OPEN, check_tools, forced_call_schema, prepare_messages


@dataclass
class Plan:
    """What a chat or text completion will run: one engine request per choice, and how to answer."""

    requests: list[Request]
    prompt_texts: list[str] = field(default_factory=list)  # for echo
    tools: bool = False  # parse <tool_call> blocks from the replies
    forced_call: bool = False  # the reply began with "<tool_call>\n" inside the prompt
    created: int = field(default_factory=lambda: int(time.time()))
    id: str = ""


def _sampling(body: SamplingFields, max_tokens: int, stop_ids: list[int]) -> SamplingConfig:
    try:
        return SamplingConfig(max_new_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                              top_p=body.top_p if body.top_p is not None else 1.0,
                              top_k=max(0, body.top_k or 0), repetition_penalty=body.repetition_penalty,
                              presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                              stop=stop_list(body.stop), stop_token_ids=stop_ids)
    except ValueError as err:
        raise APIError(400, str(err)) from err


def _max_tokens(model: ServedModel, prompt: list[int], asked: int | None, default: int | None) -> int:
    room = model.context - len(prompt)
    if room < 1:
        raise APIError(400, f"the prompt has {len(prompt)} tokens; this model's context is {model.context} tokens",
                       "messages", "context_length_exceeded")
    wanted = asked if asked is not None else (default if default is not None else room)
    if wanted > room:
        raise APIError(400, f"the prompt has {len(prompt)} tokens and max_tokens is {wanted}: together they exceed "
                            f"this model's context of {model.context} tokens", "max_tokens", "context_length_exceeded")
    return wanted


def json_constraint(model: ServedModel, schema: dict | None, stop_ids: list[int]):
    from lmforge.errors import InputError
    from lmforge.infer.constrain import JsonConstraint

    try:
        return JsonConstraint(model.vocab_bytes, schema, stop_ids=stop_ids)
    except InputError as err:
        raise APIError(400, f"unsupported JSON schema: {err}", "response_format") from err


def _response_schema(response_format: dict | None) -> tuple[bool, dict | None]:
    """(constrain?, schema) from OpenAI's response_format."""
    if not response_format or response_format.get("type", "text") == "text":
        return False, None
    kind = response_format.get("type")
    if kind == "json_object":
        return True, None
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise APIError(400, "response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}",
                           "response_format")
        return True, spec.get("schema", {})
    raise APIError(400, f"response_format type {kind!r} is not one of text, json_object, json_schema",
                   "response_format")


def chat_prompt(model: ServedModel, messages: list[dict], functions: list[dict]) -> list[int]:
    """The prompt ids of OpenAI ``messages`` with the tool definitions ``functions``, in the model's chat
    format (the tools in its template's own words when it has a ``tools`` variable, else the system prompt)."""
    messages = prepare_messages(messages, functions, model.template_takes_tools)
    if not (functions and model.template_takes_tools):
        return model.chat_ids(messages)
    tools = [{"type": "function", "function": f} for f in functions]
    return model.encode_plain(model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=tools))


def build_chat(model: ServedModel, body: ChatCompletionRequest) -> Plan:
    functions, forced = check_tools(body.tools, body.tool_choice)
    prompt = chat_prompt(model, body.messages, functions)
    if forced is not None:
        prompt = prompt + model.encode_plain(OPEN + "\n")
    stop_ids = [] if body.ignore_eos else model.end_of_turn()
    asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if asked == 0:
        raise APIError(400, "max_tokens must be at least 1", "max_tokens")
    config = _sampling(body, _max_tokens(model, prompt, asked, None), stop_ids)
    constrain, schema = _response_schema(body.response_format)
    if forced is not None:
        constrain, schema = True, forced_call_schema(functions, forced)
    top = (body.top_logprobs or 0) if body.logprobs else None
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs")
    requests = [model.request(prompt, _with_seed(config, body.seed, i), logprobs=top,
                              constraint=json_constraint(model, schema, stop_ids or model.end_of_text()) if constrain else None)
                for i in range(body.n)]
    return Plan(requests, tools=bool(functions), forced_call=forced is not None, id=f"chatcmpl-{uuid.uuid4().hex}")


def build_completion(model: ServedModel, body: CompletionRequest) -> Plan:
    if body.suffix:
        raise APIError(400, "suffix (fill in the middle) is not supported", "suffix")
    prompts = _prompts(model, body.prompt)
    if isinstance(body.prompt, str) or all(isinstance(p, str) for p in body.prompt):  # echo the text as given
        echoed = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    else:
        echoed = [model.tokenizer.decode(ids) for ids in prompts]
    if body.max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens=0 only makes sense with echo=true (scoring the prompt)", "max_tokens")
    stop_ids = [] if body.ignore_eos else model.end_of_text()
    requests, texts = [], []
    for prompt, text in zip(prompts, echoed):
        asked = 1 if body.max_tokens == 0 else body.max_tokens
        config = _sampling(body, _max_tokens(model, prompt, asked, 16), stop_ids)
        for i in range(body.n):
            requests.append(model.request(prompt, _with_seed(config, body.seed, i), logprobs=body.logprobs,
                                          prompt_logprobs=body.logprobs if body.echo and body.logprobs is not None
                                          else None))
            texts.append(text)
    return Plan(requests, prompt_texts=texts, id=f"cmpl-{uuid.uuid4().hex}")


def _prompts(model: ServedModel, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        return [model.encode(prompt)]
    if not prompt:
        raise APIError(400, "prompt is empty", "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if all(isinstance(p, str) for p in prompt):
        return [model.encode(p) for p in prompt]
    if all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompt):
        return [list(p) for p in prompt]
    raise APIError(400, "prompt must be a string, a list of strings, a list of token ids or a list of such lists",
                   "prompt")


def _with_seed(config: SamplingConfig, seed: int | None, index: int) -> SamplingConfig:
    from dataclasses import replace

    return replace(config, seed=None if seed is None else seed + index)


# ---- answers --------------------------------------------------------------------------------------

def chat_logprobs(model: ServedModel, entries: list[TokenLogprob]) -> dict:
    def one(token_id: int, logprob: float) -> dict:
        return {"token": model.token_text(token_id), "logprob": logprob, "bytes": model.token_byte_list(token_id)}
    return {"content": [{**one(e.token_id, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                        for e in entries]}


def completion_logprobs(model: ServedModel, token_ids: list[int], entries: list[TokenLogprob | None],
                        echoed: str | None = None) -> dict:
    """The legacy ``logprobs`` object; ``entries`` aligned with ``token_ids`` (None: no value, the first prompt token).

    ``text_offset`` counts characters of the returned text: a token that ends inside a character
    starts the next offset there; with ``echoed`` (the prompt text given), a BOS token that the
    server put before it takes no characters.
    """
    tokens, values, tops, offsets = [], [], [], []
    chars, pending = 0, b""
    for index, (token_id, entry) in enumerate(zip(token_ids, entries)):
        text = model.token_text(token_id)
        tokens.append(text)
        values.append(None if entry is None else entry.logprob)
        tops.append(None if entry is None else {model.token_text(t): lp for t, lp in entry.top})
        offsets.append(chars)
        raw = model.vocab_bytes[token_id] if token_id < len(model.vocab_bytes) else None
        if raw is None:  # a special token: its text, unless it is the BOS the server added
            added = index == 0 and echoed is not None and not echoed.startswith(text)
            chars += 0 if added else len(text)
            continue
        pending += raw
        complete = len(pending)
        while complete > 0:  # the longest prefix that decodes: whole characters only
            try:
                chars += len(pending[:complete].decode("utf-8"))
                break
            except UnicodeDecodeError:
                complete -= 1
        pending = pending[complete:]
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def usage(outputs: list[RequestOutput | None], prompts_once: list[int]) -> dict:
    """OpenAI usage: prompt tokens counted once per prompt, completion tokens over every choice."""
    prompt = sum(prompts_once)
    completion = sum(o.completion_tokens for o in outputs if o is not None)
    cached = sum(o.cached_tokens for o in outputs if o is not None)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def finish_reason(reason: str | None, has_tool_calls: bool) -> str | None:
    if has_tool_calls:
        return "tool_calls"
    return {"abort": "stop"}.get(reason, reason)
