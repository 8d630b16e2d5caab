"""Reward models and aligned policies looked at, token by token: the reward model's score after each reply
token, and the policy's log-probability ratio against its reference (DPO's implicit reward is beta times its sum).

    reward_view(rm, tokenizer, "What is 2 + 2?", "4").values
    policy_ratio_view(policy, reference, tokenizer, prompt, reply).log_ratios
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from lmforge.errors import InputError
from lmforge.infer.constrain import token_bytes
from lmforge.infer.generate import eval_mode
from lmforge.inspector.core import piece_text
from lmforge.inspector.plain import Plain, load_any


@dataclass
class ReplyToken(Plain):
    position: int  # index in the rendered conversation's ids
    id: int
    text: str


@dataclass
class RewardView(Plain):
    """A reward model's score of a conversation, and the score it gives each prefix of the reply."""

    score: float  # at the conversation's last token: what ``lmforge rm score`` and reward-model training read
    ids: np.ndarray  # (T,) the rendered conversation, as the reward model reads it
    tokens: list[ReplyToken]  # the reply's tokens (its end of turn included)
    values: np.ndarray  # (len(tokens),) the score head at each: the reward had the reply stopped there
    before_reply: float  # the score head at the last token before the reply (the prompt alone)
    truncated: bool  # the conversation was longer than the model's context: its start was cut


@dataclass
class RatioView(Plain):
    """Per reply token, log p under the policy and under the reference (teacher-forced, as DPO scores)."""

    tokens: list[ReplyToken]
    policy_logps: np.ndarray  # (n,)
    reference_logps: np.ndarray  # (n,)
    log_ratios: np.ndarray  # (n,) log pi - log pi_ref
    policy_logp: float  # summed over the reply: log pi(y | x)
    reference_logp: float
    log_ratio: float  # the sum of log_ratios
    beta: float
    implicit_reward: float  # beta * log_ratio: DPO's reward of this reply (rewards/chosen in its logs)


def _messages(prompt: str | list[dict[str, str]]) -> list[dict[str, str]]:
    """A prompt as chat messages: a string is one user message."""
    if isinstance(prompt, str):
        if not prompt:
            raise InputError("the prompt is empty")
        return [{"role": "user", "content": prompt}]
    return list(prompt)


def _rendered(tokenizer: Any, prompt: str | list[dict[str, str]], reply: str, seq_len: int):
    """(ids, length, reply mask, truncated) of the conversation with ``reply`` as the assistant's last turn,
    rendered as reward-model training (:class:`~lmforge.train.reward.PairRows`: ids and length) and DPO
    (:class:`~lmforge.train.dpo.PreferenceRows`: the final answer's mask, end of turn included) render it; a
    conversation longer than ``seq_len`` keeps its end, as both do."""
    from lmforge.data.preferences import Preference
    from lmforge.train.dpo import PreferenceRows
    from lmforge.train.reward import PairRows

    if not isinstance(reply, str):
        raise InputError(f"the reply must be text, got {type(reply).__name__}")
    pair = [Preference(_messages(prompt), reply, reply, "inspector")]
    scored = PairRows(tokenizer, pair, seq_len)
    length = int(scored.chosen_len[0])
    marked = PreferenceRows(tokenizer, pair, seq_len)
    ids = scored.chosen[0, :length]
    if not np.array_equal(marked.chosen[0, :length], ids):
        raise RuntimeError("reward-model and DPO rendering disagree")  # a bug, not the user's input
    return ids, length, marked.chosen_mask[0, :length], bool(marked.truncated)


def _reply_tokens(tokenizer: Any, vocab_size: int, ids: np.ndarray,
                  positions: np.ndarray) -> list[ReplyToken]:
    vocab = token_bytes(tokenizer, vocab_size)
    return [ReplyToken(int(p), int(ids[p]), piece_text(vocab, tokenizer, int(ids[p]))) for p in positions]


@torch.no_grad()
def reward_view(reward_model: Any, tokenizer: Any, prompt: str | list[dict[str, str]],
                reply: str) -> RewardView:
    """Score ``reply`` to ``prompt`` (a user message, or chat messages) with ``reward_model`` (a model with
    the ``score`` head, or a LanguageModel holding one): the conversation rendered as reward-model training
    renders it, the score read where :func:`~lmforge.model.heads.last_token_scores` reads it, and the head's
    value at every reply token."""
    from lmforge.model.heads import last_token_scores

    model = load_any(reward_model)
    head = getattr(getattr(model, "config", None), "head", None)
    if head != "score":
        raise InputError(f"a reward model has the 'score' head; this model has {head!r} (train one with "
                         "`lmforge rm`)")
    ids, length, mask, truncated = _rendered(tokenizer, prompt, reply, model.config.max_seq_len)
    device = next(model.parameters()).device
    row = torch.from_numpy(ids)[None].to(device)
    with eval_mode(model):
        score = float(last_token_scores(model, row, torch.tensor([length])).float()[0])
        values = model(row)[0].float().cpu().numpy()  # (T,) causal: value t is the score of ids[:t + 1]
    positions = np.flatnonzero(mask)
    before = float(values[positions[0] - 1]) if len(positions) and positions[0] > 0 else math.nan
    return RewardView(score, ids.copy(), _reply_tokens(tokenizer, model.config.vocab_size, ids, positions),
                      values[positions], before, truncated)


def _reply_logps(model: nn.Module, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """log p of each reply token (at ``positions``) given everything before it, by DPO's own
    :func:`lmforge.train.dpo.answer_token_logps`."""
    from lmforge.train.dpo import answer_token_logps

    device = next(model.parameters()).device
    mask = torch.zeros(1, len(ids), dtype=torch.bool, device=device)
    mask[0, torch.from_numpy(positions).to(device)] = True
    with eval_mode(model):
        logps, _ = answer_token_logps(model, torch.from_numpy(ids)[None].to(device), mask)
    return logps.float().cpu().numpy()


@torch.no_grad()
def policy_ratio_view(policy: Any, reference: Any, tokenizer: Any, prompt: str | list[dict[str, str]],
                      reply: str, beta: float = 0.1) -> RatioView:
    """How far ``policy`` has moved from ``reference`` on one reply: per reply token, log p under each
    (teacher-forced on the conversation as DPO renders it), their difference, the sums and DPO's implicit
    reward ``beta · (log pi(y|x) − log pi_ref(y|x))``.

    ``policy`` and ``reference``: language models (a :class:`~lmforge.model.DecoderLM`, or a LanguageModel
    whose ``.model`` is used); ``reference=None`` is the policy with its LoRA adapters switched off, the
    reference DPO uses when it trains adapters. ``tokenizer`` renders the conversation for both."""
    from lmforge.peft.lora import adapters_disabled, lora_layers

    if not beta > 0:
        raise InputError(f"beta must be positive, got {beta}")
    policy = load_any(policy)
    reference = None if reference is None else load_any(reference)
    for model in (policy, reference):
        head = "lm" if model is None else getattr(getattr(model, "config", None), "head", None)
        if head not in ("lm", "lm+value"):
            raise InputError(f"log-probabilities need a language model; this one has the {head!r} head")
    ids, _, mask, _ = _rendered(tokenizer, prompt, reply, policy.config.max_seq_len)
    positions = np.flatnonzero(mask)
    positions = positions[positions > 0]  # the first token has nothing before it to be predicted from
    if not len(positions):
        raise InputError("the reply has no tokens to score")
    policy_logps = _reply_logps(policy, ids, positions)
    if reference is None:
        if not lora_layers(policy):
            raise InputError("reference=None means the policy without its LoRA adapters, and it has none: "
                             "pass the reference model")
        with adapters_disabled(policy):
            reference_logps = _reply_logps(policy, ids, positions)
    else:
        reference_logps = _reply_logps(reference, ids, positions)
    ratios = policy_logps - reference_logps
    total = float(policy_logps.sum(dtype=np.float64)) - float(reference_logps.sum(dtype=np.float64))
    return RatioView(_reply_tokens(tokenizer, policy.config.vocab_size, ids, positions), policy_logps,
                     reference_logps, ratios, float(policy_logps.sum(dtype=np.float64)),
                     float(reference_logps.sum(dtype=np.float64)), total, float(beta), beta * total)
