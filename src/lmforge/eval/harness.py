"""The three request types of an evaluation, answered by a local model or an OpenAI-compatible server.

An :class:`EvalModel` answers, for many inputs at once:

* ``loglikelihood(pairs)``: for each (context, continuation), the sum of the log-probabilities
  of the continuation's tokens given the context, and whether greedy decoding would have
  produced exactly those tokens;
* ``generate(prompts, stop, max_new_tokens)``: a greedy reply to each prompt, cut before the
  first stop string;
* ``loglikelihood_rolling(texts)``: the sum of the log-probabilities of every token of each
  text (perplexity), and the token count.

:class:`LocalModel` runs them on the batched engine (:mod:`lmforge.infer.engine`). A context
and its continuation are tokenized as lm-evaluation-harness does: whitespace at the end of
the context moves to the continuation, the pair is encoded whole, and the continuation is
what follows the context's own tokens. The choices of one multiple-choice item share their
context: one request carries them all as ``continuations``, which the engine scores as branches
of a tree in the context's own prefill row (each choice sees the context and itself), so the
context is computed once and every choice beside it, in one pass.

:class:`EndpointModel` sends the same requests to any OpenAI-compatible server (lmforge
serve, vLLM, llama.cpp's server): log-likelihoods through ``/v1/completions`` with
``echo`` and ``logprobs`` (the server must return prompt log-probabilities with text offsets),
generation through ``/v1/completions`` or, for chat, ``/v1/chat/completions``.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from tqdm.auto import tqdm

from lmforge.api import LanguageModel
from lmforge.errors import InputError
from lmforge.infer.request import Completion, Request, RequestOutput
from lmforge.infer.sampling import SamplingConfig
from lmforge.infer.stream import cut_at_stop


@dataclass
class Loglikelihood:
    """The log-probability of a continuation given its context."""

    logprob: float  # natural log, summed over the continuation's tokens
    greedy: bool  # every continuation token was the likeliest at its place
    tokens: int


class EvalModel(Protocol):
    """What the evaluation runner asks of a model (see the module docstring)."""

    name: str
    chat: bool  # prompts are wrapped in the model's chat format (a user turn, then the assistant's)

    def loglikelihood(self, pairs: Sequence[tuple[str, str]], desc: str = "") -> list[Loglikelihood]: ...

    def generate(self, prompts: Sequence[str], stop: Sequence[str], max_new_tokens: int,
                 desc: str = "") -> list[str]: ...

    def loglikelihood_rolling(self, texts: Sequence[str], desc: str = "") -> list[Loglikelihood]: ...


def split_pair(context: str, continuation: str) -> tuple[str, str]:
    """Move whitespace at the end of the context to the start of the continuation (lm-eval's rule)."""
    stripped = context.rstrip()
    return stripped, context[len(stripped):] + continuation


class LocalModel:
    """An lmforge :class:`LanguageModel` behind the three request types, on its batched engine."""

    def __init__(self, lm: LanguageModel, name: str = "model", batch_size: int = 16, chat: bool = False,
                 progress: bool = True, add_bos: bool | None = None, context: int | None = 4096):
        """``batch_size``: engine slots (questions scored together); ``context``: positions per slot, at
        most the model's (a longer prompt loses its start); ``add_bos``: start plain prompts with the
        BOS token (None: when the tokenizer has one, as lmforge trains; False matches lm-eval's
        default for causal models)."""
        self.lm, self.name, self.chat, self.progress = lm, name, chat, progress
        self.add_bos = add_bos
        # With a compiled decode step every step runs at the full batch: one graph to compile, not one
        # per batch bucket (evaluation keeps the slots full until its last requests).
        full = (batch_size,) if lm.decode_step is not None else None
        self.engine = lm.engine(batch_size, min(context or lm.model.config.max_seq_len, lm.model.config.max_seq_len),
                                decode_buckets=full)
        self.window = self.engine.context

    # ---- tokenization ----------------------------------------------------------------------------

    def context_ids(self, context: str) -> list[int]:
        if self.chat:
            return self.lm.chat_prompt([{"role": "user", "content": context}])
        if self.add_bos is None:
            return self.lm.encode_prompt(context)
        bos = getattr(self.lm.tokenizer, "bos_id", None)
        return ([bos] if self.add_bos and bos is not None else []) + self.lm.tokenizer.encode(context)

    def pair_ids(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) as the model sees them.

        Plain: the pair encoded whole and split after the context's tokens (lm-eval's way; a
        BOS token first when the tokenizer has one). Chat: the context as a user turn in the
        chat format, then the continuation (its leading whitespace dropped) as the reply.
        """
        if self.chat:
            return self.context_ids(context), self.lm.tokenizer.encode(continuation.lstrip())
        context, continuation = split_pair(context, continuation)
        context_ids = self.context_ids(context)
        whole = self.context_ids(context + continuation)
        if whole[: len(context_ids)] != context_ids:  # the pair merged across the boundary: encode apart
            return context_ids, self.lm.tokenizer.encode(continuation)
        return context_ids, whole[len(context_ids):]

    # ---- the three request types -----------------------------------------------------------------

    def loglikelihood(self, pairs: Sequence[tuple[str, str]], desc: str = "loglikelihood") -> list[Loglikelihood]:
        """Consecutive pairs with the same context (a question's choices) go in one request whose
        continuations the engine scores as branches of one prefill row: the context once, every
        choice beside it. A question too long for the window is scored pair by pair instead, with
        the start of its context cut."""
        encoded = []
        for context, continuation in pairs:
            context_ids, continuation_ids = self.pair_ids(context, continuation)
            if not continuation_ids:
                raise InputError(f"the continuation {continuation!r} has no tokens: nothing to score")
            encoded.append((context_ids, continuation_ids))
        requests, owners = [], []  # owners[r]: the pair indices request r scores
        index = 0
        while index < len(encoded):
            context_ids = encoded[index][0]
            group = [index]
            while group[-1] + 1 < len(encoded) and encoded[group[-1] + 1][0] == context_ids:
                group.append(group[-1] + 1)
            branches = [encoded[i][1] for i in group]
            if len(context_ids) + sum(map(len, branches)) <= self.window:
                requests.append(Request(context_ids, SamplingConfig(max_new_tokens=0), continuations=branches))
                owners.append(group)
            else:
                for i in group:
                    requests.append(self._score_request(*encoded[i]))
                    owners.append([i])
            index = group[-1] + 1
        # the longest first (as lm-eval sorts): prefill passes of rows of similar length
        order = sorted(range(len(requests)), key=lambda r: -(len(requests[r].prompt_ids)
                                                               + sum(map(len, requests[r].continuations or ()))))
        results: list[Loglikelihood | None] = [None] * len(pairs)
        for r, completion in zip(order, self._run([requests[r] for r in order], desc)):
            if requests[r].continuations is None:
                results[owners[r][0]] = _sum_logprobs(completion.prompt_logprobs[requests[r].prompt_logprobs_start:])
            else:
                for i, entries in zip(owners[r], completion.continuation_logprobs):
                    results[i] = _sum_logprobs(entries)
        return results

    def loglikelihood_rolling(self, texts: Sequence[str], desc: str = "perplexity") -> list[Loglikelihood]:
        """Windows of the model's context over each text, each window's first token the one before it
        (lm-eval's rolling windows with a context of one token): every token is scored exactly once."""
        first = self.lm.tokenizer.bos_id if getattr(self.lm.tokenizer, "bos_id", None) is not None \
            else self.lm.tokenizer.eos_id
        requests, owner = [], []
        for index, text in enumerate(texts):
            ids = self.lm.tokenizer.encode(text)
            step = self.window - 1
            for start in range(0, len(ids), step):
                previous = first if start == 0 else ids[start - 1]
                requests.append(Request([previous, *ids[start:start + step]], SamplingConfig(max_new_tokens=0),
                                        prompt_logprobs=1))
                owner.append(index)
        totals = [Loglikelihood(0.0, True, 0) for _ in texts]
        for index, completion in zip(owner, self._run(requests, desc)):
            part = _sum_logprobs(completion.prompt_logprobs[1:])
            total = totals[index]
            total.logprob += part.logprob
            total.greedy &= part.greedy
            total.tokens += part.tokens
        return totals

    def generate(self, prompts: Sequence[str], stop: Sequence[str], max_new_tokens: int,
                 desc: str = "generate") -> list[str]:
        requests = []
        for prompt in prompts:
            ids = self.context_ids(prompt)
            ids = ids[max(0, len(ids) + max_new_tokens - self.window):]  # the end of a prompt too long to fit
            settings = {"max_new_tokens": max_new_tokens, "temperature": 0.0, "stop": list(stop)}
            if self.chat:
                settings = self.lm.chat_sampling(settings)
            requests.append(self.lm.request(ids, self.lm.sampling_config(**settings)))  # speculative with a drafter
        return [cut_at_stop(c.text, list(stop)) for c in self._run(requests, desc)]

    # ---- running requests on the engine ----------------------------------------------------------

    def _score_request(self, context_ids: list[int], continuation_ids: list[int]) -> Request:
        """A scoring-only request; a pair longer than the window loses the start of its context."""
        ids = (context_ids + continuation_ids)[-self.window:]
        start = max(len(ids) - len(continuation_ids), 1)
        return Request(ids, SamplingConfig(max_new_tokens=0), prompt_logprobs=1, prompt_logprobs_start=start)

    def _run(self, requests: list[Request], desc: str) -> list[Completion]:
        """All ``requests`` through the engine, in order, with a progress bar."""
        outputs: dict[str, list[RequestOutput]] = {r.request_id: [] for r in requests}
        for request in requests:
            self.engine.add(request)
        with tqdm(total=len(requests), desc=desc, disable=not self.progress, leave=False, unit="req") as bar:
            while self.engine.has_work:
                for output in self.engine.step():
                    if output.request_id in outputs:
                        outputs[output.request_id].append(output)
                        bar.update(int(output.finished))
        return [Completion.join(outputs[r.request_id]) for r in requests]


def _sum_logprobs(entries: list) -> Loglikelihood:
    """The total of scored tokens (TokenLogprob with the likeliest token first in ``top``)."""
    return Loglikelihood(sum(e.logprob for e in entries),
                         all(e.top and e.top[0][0] == e.token_id for e in entries), len(entries))


class EndpointModel:
    """An OpenAI-compatible server behind the three request types (``concurrency`` requests in flight)."""

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None, chat: bool = False,
                 concurrency: int = 8, timeout: float = 600, progress: bool = True):
        import httpx

        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(headers=headers, timeout=timeout, trust_env=False)
        self.chat, self.concurrency, self.progress = chat, concurrency, progress
        try:
            listed = self.http.get(self.base_url + "/models")
            listed.raise_for_status()
            models = [m["id"] for m in listed.json().get("data", [])]
        except (httpx.HTTPError, ValueError) as error:
            raise InputError(f"cannot reach an OpenAI-compatible server at {base_url} "
                             f"(GET {self.base_url}/models: {error})") from None
        if model is None and not models:
            raise InputError(f"{base_url} lists no models; name the one to score (the MODEL argument)")
        self.name = model or models[0]

    def post(self, route: str, body: dict) -> dict:
        """POST ``body`` (with this model's name) to ``route`` under /v1; the JSON answer, InputError otherwise."""
        import httpx

        try:
            response = self.http.post(self.base_url + route, json={"model": self.name, **body})
        except httpx.HTTPError as error:
            raise InputError(f"{self.base_url}{route}: {error}") from None
        if response.status_code != 200:
            raise InputError(f"{self.base_url}{route} answered {response.status_code}: {response.text[:300]}")
        return response.json()

    def _map(self, function, items: Sequence, desc: str) -> list:
        with ThreadPoolExecutor(self.concurrency) as pool, \
                tqdm(total=len(items), desc=desc, disable=not self.progress, leave=False, unit="req") as bar:
            results = []
            for result in pool.map(function, items):
                results.append(result)
                bar.update()
        return results

    def _prompt_logprobs(self, text: str) -> tuple[list[int], list[float | None], list[dict | None]]:
        """(text offsets, token log-probs, top log-probs) of ``text``'s tokens, as the server scores them."""
        choice = self.post("/completions", {"prompt": text, "max_tokens": 1, "echo": True, "logprobs": 1,
                                             "temperature": 0.0})["choices"][0]
        logprobs = choice.get("logprobs") or {}
        offsets, values = logprobs.get("text_offset"), logprobs.get("token_logprobs")
        if not offsets or not values:
            raise InputError(f"{self.base_url}/completions returned no prompt log-probabilities with text offsets "
                             "(echo + logprobs): this server can run generation tasks only")
        count = sum(1 for offset in offsets if offset < len(text))  # the echoed prompt; then the generated token
        return offsets[:count], values[:count], (logprobs.get("top_logprobs") or [None] * count)[:count]

    def loglikelihood(self, pairs: Sequence[tuple[str, str]], desc: str = "loglikelihood") -> list[Loglikelihood]:
        if self.chat:
            raise InputError("log-likelihood tasks cannot use the chat format against a server (the chat API "
                             "returns no prompt log-probabilities); run them without --chat")

        def score(pair: tuple[str, str]) -> Loglikelihood:
            context, continuation = split_pair(*pair)
            offsets, values, tops = self._prompt_logprobs(context + continuation)
            picked = [i for i, offset in enumerate(offsets) if offset >= len(context)]
            if not picked:
                raise InputError(f"the server gave no tokens for the continuation {continuation!r}")
            greedy = all(tops[i] and max(tops[i], key=tops[i].get) == _token_text(context + continuation, offsets, i)
                         for i in picked)
            return Loglikelihood(sum(values[i] for i in picked), greedy, len(picked))

        return self._map(score, list(pairs), desc)

    def loglikelihood_rolling(self, texts: Sequence[str], desc: str = "perplexity") -> list[Loglikelihood]:
        def score(text: str) -> Loglikelihood:
            offsets, values, _ = self._prompt_logprobs(text)
            scored = [v for v in values[1:] if v is not None]  # the first token has no context to be scored by
            return Loglikelihood(sum(scored), False, len(scored))

        return self._map(score, list(texts), desc)

    def generate(self, prompts: Sequence[str], stop: Sequence[str], max_new_tokens: int,
                 desc: str = "generate") -> list[str]:
        stops = list(stop)[:4]  # OpenAI's limit; the rest are cut here

        def reply(prompt: str) -> str:
            body = {"max_tokens": max_new_tokens, "temperature": 0.0, "stop": stops or None}
            if self.chat:
                answer = self.post("/chat/completions", {"messages": [{"role": "user", "content": prompt}], **body})
                text = answer["choices"][0]["message"].get("content") or ""
            else:
                text = self.post("/completions", {"prompt": prompt, **body})["choices"][0]["text"]
            return cut_at_stop(text, list(stop))

        return self._map(reply, list(prompts), desc)


def _token_text(text: str, offsets: list[int], i: int) -> str:
    """The text of token ``i`` of ``text``, from the offsets of it and the next token."""
    end = offsets[i + 1] if i + 1 < len(offsets) else len(text)
    return text[offsets[i]:end]
