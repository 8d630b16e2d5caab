"""What goes into the batched engine and what comes out of it.

A :class:`Request` is one prompt with its own sampling settings, seed, stop strings,
stop tokens, token limit and (optionally) a constraint on the tokens it may produce.
Each engine step reports, for every request that moved, a :class:`RequestOutput` with
the tokens and text it added; the last one has ``finished=True`` and a reason.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from lmforge.infer.sampling import SamplingConfig
from lmforge.infer.speculative import Drafter


class TokenConstraint(Protocol):
    """Limits which tokens a request may produce (e.g. :class:`lmforge.infer.constrain.JsonConstraint`)."""

    def allowed(self, remaining: int | None = None) -> torch.Tensor:
        """(V,) bool: the tokens that may come next; ``remaining`` tokens are left in the budget."""

    def advance(self, token_id: int) -> None:
        """Take the token that was chosen."""


@dataclass
class TokenLogprob:
    """A token's log-probability under the model, and the ``k`` likeliest alternatives at its place."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, log-prob), likeliest first


@dataclass
class Request:
    """One prompt to continue.

    ``logprobs``: None for none; k >= 0 reports each generated token's log-probability and
    the k likeliest tokens at its place. ``prompt_logprobs``: the same for the prompt's
    tokens from index ``prompt_logprobs_start`` on (default 1: all but the first, which has
    none). The prefix cache can serve only the tokens before ``prompt_logprobs_start - 1``,
    since a cached position's logits are not kept: scoring the continuations of one context
    (multiple choice) computes the context once. With ``max_new_tokens=0`` the request only
    scores its prompt and generates nothing. ``continuations``: token lists to score each as the
    continuation of the prompt (the choices of a question), all in the prompt's own prefill row
    (a tree: each sees the prompt and itself, not the others); the request then generates nothing
    and its output carries ``continuation_logprobs``. ``drafter`` (a
    :class:`lmforge.infer.speculative.Drafter`, one per request: ``drafter.fork()``) decodes the
    request speculatively, up to ``draft_tokens`` guesses checked per pass: the same tokens
    greedy, the same distribution sampled. ``decode`` turns ids into text
    for streaming and for stop strings; without it the outputs carry token ids only and
    stop strings cannot be checked.
    """

    prompt_ids: list[int]
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    prompt_logprobs_start: int = 1
    continuations: list[list[int]] | None = None
    constraint: TokenConstraint | None = None
    drafter: Drafter | None = None
    draft_tokens: int = 4
    decode: Callable[[list[int]], str] | None = None
    arrival: float = field(default_factory=time.monotonic)


@dataclass
class RequestOutput:
    """What one engine step added to one request."""

    request_id: str
    token_ids: list[int]  # new tokens (a stop token is not included)
    text: str = ""  # their text: complete characters only, cut before any stop string
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per new token, a stop token included
    prompt_logprobs: list[TokenLogprob | None] | None = None  # in the first output, when asked for; None
    # before prompt_logprobs_start
    continuation_logprobs: list[list[TokenLogprob]] | None = None  # per continuation, one per token
    finished: bool = False
    finish_reason: str | None = None  # "stop" (stop token or string), "length", "abort"
    stop_token_id: int | None = None  # the stop token that ended the request, if one did
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache instead of computed
    completion_tokens: int = 0  # generated so far, a stop token included


@dataclass
class Completion:
    """A finished request, all its outputs joined (what :meth:`Engine.generate` returns)."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[TokenLogprob]
    prompt_logprobs: list[TokenLogprob | None] | None
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    continuation_logprobs: list[list[TokenLogprob]] | None = None
    stop_token_id: int | None = None  # the stop token that ended it (not in token_ids), if one did

    @classmethod
    def join(cls, outputs: list[RequestOutput]) -> Completion:
        last = outputs[-1]
        return cls(last.request_id, [t for o in outputs for t in o.token_ids], "".join(o.text for o in outputs),
                   last.finish_reason, [lp for o in outputs for lp in o.logprobs], outputs[0].prompt_logprobs,
                   last.prompt_tokens, last.cached_tokens, last.completion_tokens, outputs[0].continuation_logprobs,
                   last.stop_token_id)
