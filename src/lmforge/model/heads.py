"""Heads on one backbone: the same decoder with next-token logits (``head="lm"``), one scalar per
position (``head="score"``: a reward model), or both (``head="lm+value"``: a PPO policy with its value head).

The checkpoint's ``config.json`` names the head, so ``load_model`` builds the right one.
:func:`with_head` turns a language model into a reward model (or back): the backbone's weights
are copied, the new head starts fresh. :func:`last_token_scores` reads a sequence's score where
reward models read it, at its last real token.
"""

from __future__ import annotations

import dataclasses

import torch

from lmforge.model.transformer import DecoderLM


def with_head(model: DecoderLM, head: str) -> DecoderLM:
    """A copy of ``model`` with another output head: the backbone (embeddings, blocks, final norm and
    the language-model head's weights) copied, a new head initialised as the model would be."""
    config = dataclasses.replace(model.config, head=head)
    new = DecoderLM(config)
    new.to(next(model.parameters()).device)
    own = new.state_dict()
    shared = {k: v for k, v in model.state_dict().items() if k in own and own[k].shape == v.shape}
    missing = new.load_state_dict(shared, strict=False).missing_keys
    unexpected = set(missing) - {"score.weight"}
    if unexpected:
        raise ValueError(f"the backbone did not carry over: {sorted(unexpected)}")
    return new


def last_token_scores(model: DecoderLM, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B,) the score of each right-padded row (B, T) at its last real token (``lengths`` (B,) tokens)."""
    if model.config.head != "score":
        raise ValueError(f"this model has the {model.config.head!r} head; make a reward model with "
                         "with_head(model, 'score')")
    if int(lengths.min()) < 1 or int(lengths.max()) > input_ids.shape[1]:
        raise ValueError(f"lengths must be in [1, {input_ids.shape[1]}]")
    scores = model(input_ids)  # (B, T); causal: padding after a row's end does not change its scores
    return scores.gather(1, (lengths - 1)[:, None].to(scores.device))[:, 0]
