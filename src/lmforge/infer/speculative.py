"""Speculative decoding: a cheap drafter guesses the next tokens, the model checks them all in one pass.

Decoding one token at a time reads every weight of the model for every token. A forward
pass over a few tokens reads the weights once as well, so on a CPU (and on a GPU at batch
1) checking k guessed tokens costs little more than making one. A drafter proposes k
tokens; the model runs once over them and keeps the longest run it agrees with, plus one
token of its own: one pass yields between 1 and k + 1 tokens.

Exactness (the tokens are those the model alone would give):

- greedy: at every guessed place the model's own argmax is known from the one pass; the
  guesses are kept up to the first place they differ, and the model's token is taken
  there (or after the last guess when all were right).
- sampling (Leviathan et al., 2023; Chen et al., 2023): p is the model's distribution at a
  place (after temperature, top-k and top-p), q the drafter's. A guessed token x is kept
  with probability min(1, p(x) / q(x)); at the first one rejected, a token is drawn from
  max(0, p - q), renormalized; when all are kept, one more is drawn from p. Every token
  then follows p exactly, whatever q is. A drafter that guesses without a distribution
  (prompt lookup) has q = 1 at its guess: x is kept with probability p(x), and a rejected
  place draws from p without x.

Drafters:

- :class:`DraftModel`: a smaller model with the same tokenizer (one the speedrun trains,
  say), with its own KV cache; it decodes k tokens with the same sampling settings.
  ``DraftModel.first_layers(model, n)`` is a self-draft: the model's own first n layers.
- :class:`PromptLookup` (Saxena, 2023): the last ``ngram`` tokens (then fewer) are looked
  for earlier in the prompt and output, and the tokens that followed the latest match are
  the guess. Free to compute; it pays off where the output repeats the input
  (summaries, edits, extraction, code).
- :class:`FirstGuesses`: several drafters in order (prompt lookup, then a draft model).

:func:`speculative_tokens` decodes one sequence; :class:`SpeculativeStats` counts what was
guessed and kept.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from lmforge.infer.generate import autocast_for, check_request, eval_mode
from lmforge.infer.sampling import SamplingConfig, argmax, draw_from, make_generator
from lmforge.infer.sampling import probabilities as distribution
from lmforge.model import DecoderLM, KVCache
from lmforge.runtime import Runtime


@dataclass
class SpeculativeStats:
    """What the drafter guessed and the model kept, over one or more sequences."""

    passes: int = 0  # forward passes of the model after the prompt
    drafted: int = 0  # tokens the drafter proposed
    accepted: int = 0  # of those, tokens the model kept
    tokens: int = 0  # tokens produced

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_pass(self) -> float:
        return self.tokens / self.passes if self.passes else 0.0


class Drafter(Protocol):
    """What guesses tokens: :class:`PromptLookup`, :class:`DraftModel`, or your own."""

    def propose(self, tokens: list[int], count: int, config: SamplingConfig,
                generator: torch.Generator | None) -> tuple[list[int], torch.Tensor | None]:
        """Up to ``count`` guesses to follow ``tokens`` (the prompt and the output so far), and the
        distribution (count, V) each was drawn from, or None for certain guesses (q = 1)."""

    def reset(self) -> None:
        """Forget the sequence (free what it holds)."""

    def fork(self) -> Drafter:
        """A drafter for another sequence decoded alongside (the batched engine: one per request)."""


def check_speculative(config: SamplingConfig) -> None:
    """Settings speculative decoding cannot keep exact: penalties depend on every token before, beams on
    many sequences."""
    if config.num_beams > 1:
        raise ValueError("speculative decoding and beam search do not go together (set num_beams=1)")
    if config.repetition_penalty != 1.0 or config.presence_penalty or config.frequency_penalty:
        raise ValueError("speculative decoding does not support repetition, presence or frequency penalties")


def _forward(model: DecoderLM, ids: list[int], cache: KVCache, runtime: Runtime | None,
             last_only: bool = False) -> torch.Tensor:
    """Logits (T, V) fp32 of ``ids`` fed after what ``cache`` holds; with ``last_only``, (1, V) of the last
    one (a prompt's pass: the output layer over the other positions would be thrown away)."""
    device = next(model.parameters()).device
    with torch.inference_mode(), autocast_for(model, runtime):
        ids_t = torch.tensor([ids], dtype=torch.long, device=device)
        if not last_only:
            return model(ids_t, cache)[0].float()
        return model.logits(model(ids_t, cache, return_hidden=True)[0, -1:]).float()


class PromptLookup:
    """Guesses from n-gram matches in the tokens so far: the tokens after the latest earlier occurrence of
    the last ``ngram`` tokens (then of fewer, down to ``min_ngram``)."""

    def __init__(self, ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= ngram:
            raise ValueError(f"prompt lookup needs 1 <= min_ngram <= ngram, got {min_ngram} and {ngram}")
        self.ngram, self.min_ngram = ngram, min_ngram

    def propose(self, tokens: list[int], count: int, config: SamplingConfig,
                generator: torch.Generator | None) -> tuple[list[int], torch.Tensor | None]:
        """Up to ``count`` guessed tokens and no distribution (they are certain guesses, q = 1)."""
        for size in range(min(self.ngram, len(tokens) - 1), self.min_ngram - 1, -1):
            tail = tokens[-size:]
            for start in range(len(tokens) - size - 1, -1, -1):  # latest match first, never the tail itself
                if tokens[start:start + size] == tail:
                    follow = tokens[start + size:start + size + count]
                    if follow:
                        return follow, None
        return [], None

    def reset(self) -> None:
        pass

    def fork(self) -> PromptLookup:
        return self  # it keeps nothing between calls


class FirstGuesses:
    """Several drafters in order: the first one's guesses when it has any, else the next one's.

    Prompt lookup then a draft model: where the output is copying its input, lookup's free guesses; elsewhere
    the model's. Each pass is checked with the distribution of the drafter that guessed it, so greedy and
    sampled outputs stay exact. A draft model's cache catches up on the tokens of the passes it sat out."""

    def __init__(self, drafters: list):
        if not drafters:
            raise ValueError("FirstGuesses needs at least one drafter")
        self.drafters = list(drafters)

    def propose(self, tokens: list[int], count: int, config: SamplingConfig,
                generator: torch.Generator | None) -> tuple[list[int], torch.Tensor | None]:
        for drafter in self.drafters:
            guesses, q = drafter.propose(tokens, count, config, generator)
            if guesses:
                return guesses, q
        return [], None

    def reset(self) -> None:
        for drafter in self.drafters:
            drafter.reset()

    def fork(self) -> FirstGuesses:
        return FirstGuesses([drafter.fork() for drafter in self.drafters])


CATCH_UP = 8  # up to this many new tokens, a compiled draft catches up one step at a time


class DraftModel:
    """A smaller model with the same tokenizer that decodes the guesses; its KV cache follows the
    sequence (what was rejected is cropped away).

    ``decode_step`` (a :class:`lmforge.infer.compiled.CompiledDecodeStep` of ``model``) runs the
    one-token forwards that make the guesses: a draft is small, so an eager step of it is mostly
    per-operation overhead, which the compiled graph removes (a 4-layer, 15M-parameter draft with
    SmolLM2's vocabulary in bf16 on 2 cores: 4.2 ms a guess eager, 2.5 compiled, catching up on kept
    tokens included; docs/QUANTIZATION.md). Its cache is then allocated once at the model's full
    length, so that the graph's shapes stay the same."""

    def __init__(self, model: DecoderLM, runtime: Runtime | None = None, decode_step=None):
        self.model, self.runtime, self.decode_step = model, runtime, decode_step
        self.cache: KVCache | None = None
        self.seen: list[int] = []  # the tokens in self.cache

    @classmethod
    def first_layers(cls, model: DecoderLM, layers: int, runtime: Runtime | None = None) -> DraftModel:
        """A self-draft (early exit, as in LayerSkip): the model's own first ``layers`` blocks, then its
        final norm and output layer. It shares the model's weights (nothing is copied or trained); its
        guesses are only as good as what those layers already know."""
        if not 1 <= layers < model.config.num_layers:
            raise ValueError(f"a self-draft takes 1 to {model.config.num_layers - 1} of the model's "
                             f"{model.config.num_layers} layers, got {layers}")
        draft = copy.copy(model)  # a second module over the same submodules
        draft._modules = dict(model._modules)
        draft.blocks = nn.ModuleList(list(model.blocks[:layers]))
        draft.config = dataclasses.replace(model.config, num_layers=layers)
        return cls(draft, runtime)

    def reset(self) -> None:
        self.cache, self.seen = None, []

    def fork(self) -> DraftModel:
        """The same draft model (and compiled step) with a KV cache of its own."""
        return DraftModel(self.model, self.runtime, self.decode_step)

    def _make_room(self, needed: int) -> None:
        """A cache of at least ``needed`` positions (up to the model's length), grown by doubling: a
        short request with a long-context draft model does not hold its whole context."""
        if self.cache is not None and self.cache.max_len >= needed:
            return
        full = self.model.config.max_seq_len
        size = full if self.decode_step is not None else min(full, max(256, 2 * needed))
        grown = KVCache.for_model(self.model, 1, size)
        if self.cache is not None:
            kept = self.cache.length
            for old, new in zip(self.cache.keys + self.cache.values, grown.keys + grown.values):
                new[:, :, :kept] = old[:, :, :kept]
            grown.length = kept
        self.cache = grown

    def propose(self, tokens: list[int], count: int, config: SamplingConfig,
                generator: torch.Generator | None) -> tuple[list[int], torch.Tensor | None]:
        """``count`` tokens decoded after ``tokens``, and their distributions (count, V) when sampling."""
        count = min(count, self.model.config.max_seq_len - len(tokens))  # no guesses past the draft's context
        if count <= 0:
            return [], None
        self._make_room(len(tokens) + count)
        common = 0
        for a, b in zip(self.seen, tokens):
            if a != b:
                break
            common += 1
        common = min(common, len(tokens) - 1)  # the last token is fed again: its logits are the next guess's
        self.cache.crop(common)
        with eval_mode(self.model):
            logits = self._forward(tokens[common:])
            self.seen = list(tokens)
            guesses, dists = [], []
            for i in range(count):
                if config.greedy:
                    token = int(argmax(logits))
                else:
                    dist = distribution(logits, config)
                    token = int(draw_from(dist, generator))
                    dists.append(dist[0])
                guesses.append(token)
                if i + 1 < count:
                    logits = self._forward([token])
                    self.seen.append(token)
        return guesses, torch.stack(dists) if dists else None

    def _forward(self, ids: list[int]) -> torch.Tensor:
        """Logits (1, V) fp32 of the last of ``ids``, fed after the cache. With a compiled step, a few tokens
        (the ones the model kept since the last guesses: 1 to ``CATCH_UP``) go through it one at a time
        rather than in one eager pass: 3 guesses after 3 new tokens took 29 ms instead of 53 with an int4
        copy of SmolLM2 as the draft, 7.3 instead of 8.5 with ``lmforge distill``'s draft (bf16, 2 cores)."""
        if self.decode_step is None or len(ids) > CATCH_UP or self.cache.length == 0:
            return _forward(self.model, ids, self.cache, self.runtime, last_only=True)
        device = next(self.model.parameters()).device
        with torch.inference_mode(), autocast_for(self.model, self.runtime):
            for token in ids:
                logits = self.decode_step(torch.tensor([[token]], dtype=torch.long, device=device), self.cache)
            return logits[0].float()


def speculative_tokens(model: DecoderLM, prompt_ids: list[int], config: SamplingConfig, drafter,
                       draft_tokens: int = 4, runtime: Runtime | None = None,
                       stats: SpeculativeStats | None = None) -> Iterator[int]:
    """The new tokens of one prompt, as :func:`lmforge.infer.generate.generate_tokens` yields them
    (stopping before a stop token), decoded speculatively with ``drafter`` guessing up to
    ``draft_tokens`` tokens per pass. ``stats`` (optional) is updated as tokens come."""
    check_speculative(config)
    check_request(model, [prompt_ids], config.max_new_tokens)
    if draft_tokens < 1:
        raise ValueError(f"draft_tokens must be at least 1, got {draft_tokens}")
    return _speculate(model, prompt_ids, config, drafter, draft_tokens, runtime, stats or SpeculativeStats())


def _speculate(model: DecoderLM, prompt_ids: list[int], config: SamplingConfig, drafter, draft_tokens: int,
               runtime: Runtime | None, stats: SpeculativeStats) -> Iterator[int]:
    generator = make_generator(config.seed, next(model.parameters()).device)
    stop_ids = set(config.stop_token_ids)
    # room for the prompt, the output, and guesses past the end that are fed and then cropped
    cache = KVCache.for_model(model, 1, min(model.config.max_seq_len, len(prompt_ids) + config.max_new_tokens))
    tokens = list(prompt_ids)
    drafter.reset()
    with eval_mode(model):
        if len(prompt_ids) > 1:  # the prompt but its last token; that one is fed with the first guesses
            _forward(model, prompt_ids[:-1], cache, runtime, last_only=True)
        produced = 0
        while produced < config.max_new_tokens:
            room = config.max_new_tokens - produced - 1  # the model's own token comes on top of the guesses
            guesses, q = drafter.propose(tokens, min(draft_tokens, room), config, generator) if room > 0 else ([], None)
            kept_before = cache.length
            logits = _forward(model, [tokens[-1], *guesses], cache, runtime)  # (1 + g, V): p at each place
            stats.passes += 1
            stats.drafted += len(guesses)
            new = verify(logits, guesses, q, config, generator)
            stats.accepted += len(new) - 1
            cache.crop(kept_before + len(new))  # the last token and the kept guesses; the next pass feeds new[-1]
            for token in new:
                if token in stop_ids:
                    return
                tokens.append(token)
                produced += 1
                stats.tokens += 1
                yield token


def verify(logits: torch.Tensor, guesses: list[int], q: torch.Tensor | None, config: SamplingConfig,
            generator: torch.Generator | None) -> list[int]:
    """The kept guesses and the model's own next token. logits (1 + g, V): row i is the model's logits for
    the place of guess i (row g: the place after the last guess); q (g, V) the drafter's distributions,
    None for certain guesses."""
    if config.greedy:
        choice = argmax(logits).tolist()
        kept = 0
        while kept < len(guesses) and guesses[kept] == choice[kept]:
            kept += 1
        return guesses[:kept] + [choice[kept]]
    p = distribution(logits, config)  # (1 + g, V)
    if q is not None and q.shape[-1] != p.shape[-1]:  # vocabularies padded to different widths
        width = p.shape[-1]
        q = q[:, :width] if q.shape[-1] > width else torch.nn.functional.pad(q, (0, width - q.shape[-1]))
    for i, token in enumerate(guesses):
        q_token = 1.0 if q is None else float(q[i, token])
        u = float(torch.rand(1, generator=generator, dtype=torch.float64))
        if u * q_token < float(p[i, token]):  # kept with probability min(1, p / q)
            continue
        residual = p[i].clone()
        if q is None:
            residual[token] = 0.0  # max(0, p - one_hot(token))
        else:
            residual = (residual - q[i]).clamp_min(0.0)
        if float(residual.sum()) <= 0:  # p == q up to rounding: nothing left to correct, draw from p
            residual = p[i]
        return guesses[:i] + [int(draw_from(residual[None] / residual.sum(), generator))]
    return guesses + [int(draw_from(p[-1:], generator))]
