"""The chat format: messages -> token ids, with a loss mask that is true only on assistant tokens.

A chat model is a language model trained on conversations written in a fixed
format; instruction fine-tuning puts the loss only on the assistant's tokens, so
the model learns to answer, not to imitate the user. lmforge's own format uses the
special tokens every lmforge tokenizer has:

    <|begin_of_text|><|system|>Be brief.<|end_of_turn|><|user|>2+2?<|end_of_turn|><|assistant|>4<|end_of_turn|>
                                                                                                 ^^^^^^^^^^^^^^^^^^
                                                                     loss mask: the answer and the end of its turn

(the model must learn to close its turn: generation stops at ``<|end_of_turn|>``).
:data:`LMFORGE_CHAT_TEMPLATE` is the same format as a Jinja template, which
Hugging Face's ``apply_chat_template`` renders to the same ids. An imported model
keeps its own template; its mask comes from rendering the conversation turn by turn.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

from lmforge.errors import InputError
from lmforge.tokenizer.special import (
    ASSISTANT,
    BEGIN_OF_TEXT,
    END_OF_TEXT,
    END_OF_TURN,
    SPECIAL_IDS,
    SYSTEM,
    TOOL,
    USER,
)

ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT, "tool": TOOL}

LMFORGE_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end_of_turn|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
"""lmforge's chat format as a Jinja template (what ``tokenizer_config.json`` stores on export)."""


@dataclass
class ChatTokens:
    """A rendered conversation: ``ids`` and, per id, whether it is a training target."""

    ids: list[int]
    mask: list[bool]

    def __len__(self) -> int:
        return len(self.ids)


def check_messages(messages: Any, where: str = "messages") -> list[dict[str, str]]:
    """``messages`` as a list of {"role", "content"} dicts with known roles, or InputError naming the problem."""
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where}: expected a non-empty list of messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise InputError(f"{where}[{index}]: expected {{'role': ..., 'content': <text>}}, got {message!r:.80}")
        if message.get("role") not in ROLES:
            raise InputError(f"{where}[{index}]: unknown role {message.get('role')!r}; "
                             f"roles are {', '.join(ROLES)}")
    return messages


@functools.lru_cache(maxsize=16)
def _compiled_template(template: str):
    """A chat template parsed and compiled once (a sandboxed Jinja environment, transformers' variables and
    helpers): compiling took about 5 ms a prompt, a tenth of an evaluation of short questions."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda value, indent=None, **_: json.dumps(value, indent=indent, ensure_ascii=False)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def render_template(template: str, messages: list[dict[str, str]], add_generation_prompt: bool,
                    bos_token: str = "", eos_token: str = "", **variables: Any) -> str:
    """Render a Jinja chat template as transformers does (sandboxed; same variables and helpers)."""
    from jinja2.exceptions import TemplateError

    try:
        return _compiled_template(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                   bos_token=bos_token, eos_token=eos_token, **variables)
    except TemplateError as err:
        raise InputError(f"chat template: {err}") from err
    except Exception as err:  # a template's own arithmetic on the wrong types: TypeError, ZeroDivisionError ...
        raise InputError(f"chat template: {type(err).__name__}: {err}") from err


def render_chat(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> ChatTokens:
    """Token ids of a conversation and its loss mask (true on assistant turns, end-of-turn included).

    ``add_generation_prompt`` appends the opening of an assistant turn (for inference).
    """
    from lmforge.tokenizer.tokenizer import Tokenizer

    messages = check_messages(messages)
    if isinstance(tokenizer, Tokenizer):  # lmforge's own format, built from its special ids
        return _render_lmforge(tokenizer, messages, add_generation_prompt)
    return _render_with_template(tokenizer, messages, add_generation_prompt)


def _render_lmforge(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> ChatTokens:
    ids, mask = [SPECIAL_IDS[BEGIN_OF_TEXT]], [False]
    for message in messages:
        content = tokenizer.encode(message["content"])  # plain text: special strings stay text
        learn = message["role"] == "assistant"
        ids += [SPECIAL_IDS[ROLES[message["role"]]], *content, SPECIAL_IDS[END_OF_TURN]]
        mask += [False] + [learn] * (len(content) + 1)
    if add_generation_prompt:
        ids.append(SPECIAL_IDS[ASSISTANT])
        mask.append(False)
    return ChatTokens(ids, mask)


def _render_with_template(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> ChatTokens:
    """Any tokenizer with a chat template: the assistant spans are the text each assistant turn
    adds after the generation prompt before it; a token is a target when it starts inside one."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] == "assistant":
            before = tokenizer.apply_chat_template(messages[:index], add_generation_prompt=True) if index else ""
            after = tokenizer.apply_chat_template(messages[:index + 1], add_generation_prompt=False)
            if not text.startswith(after) or not after.startswith(before):
                raise InputError(f"{getattr(tokenizer, 'source', 'tokenizer')}: the chat template does not render a conversation as a growing prefix; "
                                 "cannot tell which tokens are the assistant's")
            spans.append((len(before), len(after)))
    encoding = tokenizer.hf.encode(text, add_special_tokens=False)
    mask = [any(lo <= start < hi for lo, hi in spans) for start, _ in encoding.offsets]
    return ChatTokens(list(encoding.ids), mask)


def padding_id(tokenizer) -> int:
    """The id that fills the rest of a padded training row: the tokenizer's padding, else its end of
    text, else 0 (padding is never a target and never attended to, so any id serves)."""
    return next((i for i in (getattr(tokenizer, "pad_id", None), getattr(tokenizer, "eos_id", None))
                 if i is not None), 0)


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn: ``<|end_of_turn|>`` in lmforge's format, else the model's EOS."""
    from lmforge.tokenizer.tokenizer import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return [SPECIAL_IDS[END_OF_TURN], SPECIAL_IDS[END_OF_TEXT]]
    eos = getattr(tokenizer, "eos_id", None)
    return [eos] if eos is not None else []
