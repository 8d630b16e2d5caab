"""How the next token is chosen from the logits: the settings and the pure functions.

Every function takes logits of shape (B, V) (one row per sequence, one column per
token id) and returns a new tensor; nothing here touches the model. The order in
:func:`sample_next` is the usual one (as in Hugging Face's logits processors):
repetition penalty -> temperature -> top-k -> top-p -> draw.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lmforge.settings import field


@dataclass
class SamplingConfig:
    """How to decode: the length, the sampling filters, the stop conditions and beam search."""

    max_new_tokens: int = field(128, "most tokens to generate after the prompt; 0 only scores the prompt")
    temperature: float = field(1.0, "divide the logits by this before sampling; 0 picks the likeliest token (greedy)")
    top_k: int = field(0, "sample only from the k likeliest tokens; 0 turns the filter off")
    top_p: float = field(1.0, "sample only from the smallest set of tokens whose probability reaches p; 1 is off")
    repetition_penalty: float = field(1.0, "shrink the logits of tokens already in the prompt or output; 1 is off")
    presence_penalty: float = field(0.0, "subtract this from the logit of every token already generated (OpenAI's); 0 is off")
    frequency_penalty: float = field(0.0, "subtract this times its count from each generated token's logit (OpenAI's); 0 is off")
    stop: list[str] = field([], "stop when the generated text contains one of these strings (it is cut off)")
    stop_token_ids: list[int] = field([], "stop a sequence when it generates one of these token ids")
    seed: int | None = field(None, "random seed for sampling; None draws from the global generator")
    num_beams: int = field(1, "beam search width; 1 decodes without beam search")
    length_penalty: float = field(1.0, "beam search ranks by sum of log-probs / length**length_penalty")

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "top_k", "num_beams", "seed"):  # values from files and requests
            value = getattr(self, name)
            if not (value is None and name == "seed") and (type(value) is not int or not -2**63 <= value < 2**63):
                raise ValueError(f"{name} must be a whole number, got {value!r:.60}")
        for name in ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
                     "length_penalty"):
            value = getattr(self, name)
            if type(value) not in (int, float) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r:.60}")
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0 (0 only scores the prompt), got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 is off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 is off), got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 is off), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if isinstance(self.stop, str):
            raise ValueError(f"stop must be a list of strings, got the string {self.stop!r}; write [{self.stop!r}]")
        if not isinstance(self.stop, (list, tuple)) or any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must hold non-empty strings, got {self.stop!r}")
        if not isinstance(self.stop_token_ids, (list, tuple)) or any(
                type(t) is not int or not 0 <= t < 2**31 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must hold token ids (ints >= 0), got {self.stop_token_ids!r}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be at least 1, got {self.num_beams}")
        if self.num_beams > 1 and (self.temperature != 0 or self.top_k or self.top_p != 1.0):
            raise ValueError("beam search is deterministic: with num_beams > 1 set temperature=0 "
                             f"and leave top_k/top_p off (got temperature={self.temperature}, "
                             f"top_k={self.top_k}, top_p={self.top_p})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, token_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al., 2019, arXiv:1909.05858) for tokens already seen.

    logits (B, V); token_ids (B, N) the ids seen so far in each row (repeats are fine).
    A seen token's logit is divided by ``penalty`` when positive and multiplied by it
    when negative, so penalty > 1 always makes it less likely.
    """
    if penalty == 1.0:
        return logits
    seen = logits.gather(1, token_ids)  # (B, N)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, token_ids, seen)


def apply_presence_frequency_penalty(logits: torch.Tensor, counts: torch.Tensor, presence: float,
                                     frequency: float) -> torch.Tensor:
    """OpenAI's penalties on generated tokens: logit -= presence * [count > 0] + frequency * count.

    logits (B, V); counts (B, V) how often each token was generated so far in each row.
    Negative values encourage repetition instead.
    """
    if presence == 0.0 and frequency == 0.0:
        return logits
    counts = counts.to(logits.dtype)
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits of each row (ties with the k-th are kept too); -inf elsewhere."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


NUCLEUS_FIRST_TRY = 64  # tokens ranked before falling back to sorting the whole vocabulary


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter (Holtzman et al., 2019, arXiv:1904.09751).

    Keep the smallest set of likeliest tokens whose probabilities sum to at least ``p``;
    the likeliest token is always kept. -inf elsewhere.
    """
    if p >= 1.0:
        return logits
    # Sorting the whole vocabulary costs ~2 ms a row at 32k tokens, and a trained model's nucleus is
    # usually a few dozen tokens. So rank the 64 likeliest first (probabilities still over the whole
    # vocabulary); when they hold p the set is the one a full sort finds; else sort everything.
    logits_f = logits.float()
    total = torch.logsumexp(logits_f, dim=-1, keepdim=True)  # (B, 1)
    top, order = torch.topk(logits_f, min(NUCLEUS_FIRST_TRY, logits.shape[-1]), dim=-1)  # likeliest first
    probs = torch.exp(top - total)
    if not bool((probs.sum(dim=-1) >= p).all()):
        top, order = torch.sort(logits_f, dim=-1, descending=True)  # (B, V)
        probs = torch.exp(top - total)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
    keep_ranked = mass_before < p  # the set had not reached p without this token
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter(1, order, keep_ranked)  # back to vocabulary order
    return logits.masked_fill(~keep, float("-inf"))


def sample_next(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None = None,
                seen_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Choose one token per row. logits (B, V) -> token ids (B,).

    ``seen_ids`` (B, N) are the prompt and output tokens so far, needed only by the
    repetition penalty. Greedy (temperature 0) takes the argmax after the penalty.
    """
    logits = logits.float()
    if seen_ids is not None:
        logits = apply_repetition_penalty(logits, seen_ids, config.repetition_penalty)
    return draw(logits, config, generator)


# a generator for every row, or one per row (None: torch's global generator)
Generators = torch.Generator | None | Sequence[torch.Generator | None]


def draw(logits: torch.Tensor, config: SamplingConfig, generator: Generators = None) -> torch.Tensor:
    """The last part of :func:`sample_next`, after the penalties: (B, V) fp32 logits -> token ids (B,).

    Greedy takes the argmax; otherwise temperature -> top-k -> top-p -> one draw from the distribution
    (:func:`draw_from`). Every step is row by row, so rows drawn together with a generator each get the
    tokens they would get drawn alone.
    """
    if config.greedy:
        return argmax(logits)
    return draw_from(probabilities(logits, config), generator)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """The index of each row's largest logit (the first one on ties), (..., V) -> (...). fp32 logits on a CPU
    go through NumPy, whose vectorized argmax took 5 us for 32,000 of them where ``torch.argmax`` took 65
    (2 cores): 4% of a llama-42m decode step with int4 weights."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return torch.from_numpy(np.asarray(logits.detach().numpy().argmax(-1)))
    return logits.argmax(dim=-1)


def probabilities(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """(B, V) fp32 logits -> the distribution :func:`draw` samples from: temperature, top-k, top-p, softmax.
    (Speculative decoding compares the model's and the drafter's.)"""
    logits = top_p_filter(top_k_filter(logits / config.temperature, config.top_k), config.top_p)
    return torch.softmax(logits, dim=-1)


def draw_from(probs: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """One token per row of ``probs`` (B, V), by inverting the cumulative distribution: a uniform number u
    per row, and the first token whose cumulative probability exceeds u. One random number per row
    instead of one per vocabulary entry (``torch.multinomial`` draws V exponentials: 2 ms a row for a
    49k vocabulary on a CPU core, a third of a batched decode step). Tokens of probability 0 are never
    drawn: the cumulative sum does not rise there, and the search takes the first index above u.

    ``generator``: one for all rows (or None: torch's global one), or a list with one per row."""
    cdf = probs.double().cumsum(-1)  # (B, V); float64 so 49k small terms still sum to 1 closely
    if isinstance(generator, (list, tuple)):
        u = torch.cat([torch.rand(1, 1, generator=g, dtype=torch.float64, device=probs.device) for g in generator])
    else:
        u = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64, device=probs.device)
    chosen = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1)
    return chosen.clamp(max=probs.shape[1] - 1)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A seeded generator for reproducible sampling, or None to use the global one."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)
