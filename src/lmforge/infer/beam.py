"""Beam search: keep the ``num_beams`` likeliest partial sequences at every step.

Each step scores every (beam, next token) pair by the beam's summed log-probability
plus the token's, keeps the best ``2 * num_beams`` candidates, moves those that end in
a stop token to the finished list and continues the best ``num_beams`` others. The KV
cache holds one row per beam; ``cache.reorder(parents)`` makes each row follow the
beam it grew from. Finished sequences are ranked by
``sum log p / length ** length_penalty`` (Wu et al., 2016, arXiv:1609.08144 use a
similar normalisation): length_penalty > 0 favours longer outputs, 0 compares raw
sums. The length counts the generated tokens, including the stop token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.infer.generate import DecodeStep, cache_for, check_request, eval_mode, forward_last
from lmforge.infer.sampling import SamplingConfig, apply_repetition_penalty
from lmforge.model import DecoderLM
from lmforge.runtime import Runtime


@dataclass
class BeamResult:
    """The best sequence found: its new tokens (stop token excluded) and its scores."""

    tokens: list[int]
    score: float  # log_prob / length ** length_penalty, what the beams were ranked by
    log_prob: float  # sum of the log-probabilities of the generated tokens, stop token included
    stopped: bool  # True when it ended with a stop token, False when it ran to max_new_tokens


@dataclass
class _Finished:
    tokens: list[int]
    log_prob: float
    score: float
    stopped: bool


def beam_search(model: DecoderLM, prompt_ids: list[int], config: SamplingConfig, runtime: Runtime | None = None,
                decode_step: DecodeStep | None = None) -> BeamResult:
    """Beam search of width ``config.num_beams`` after one prompt; returns the best sequence.

    Stops when ``num_beams`` sequences have finished and no running beam can beat the
    worst of them at its current length (the usual heuristic), or after
    ``config.max_new_tokens`` tokens, when the running beams count as finished.
    ``config.repetition_penalty`` applies to the log-probabilities; the sampling
    filters (temperature, top-k, top-p) do not exist in beam search.
    """
    check_request(model, [prompt_ids], config.max_new_tokens, decode_step=decode_step)
    width, max_new = config.num_beams, config.max_new_tokens
    device = next(model.parameters()).device
    stop_ids = set(config.stop_token_ids)
    finished: list[_Finished] = []

    def finish(tokens: list[int], log_prob: float, stopped: bool) -> None:
        finished.append(_Finished(tokens, log_prob, log_prob / len(tokens) ** config.length_penalty, stopped))
        finished.sort(key=lambda f: f.score, reverse=True)
        del finished[width:]

    with eval_mode(model), torch.inference_mode():
        prompt = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T)
        cache = cache_for(model, 1, len(prompt_ids) + max_new, decode_step)
        logits = forward_last(model, prompt, cache, runtime).expand(width, -1)  # (K, V): every beam = the prompt
        cache.reorder(torch.zeros(width, dtype=torch.long, device=device))  # one cache row per beam
        beams = torch.empty(width, 0, dtype=torch.long, device=device)  # (K, t) tokens of each beam
        beam_scores = torch.full((width,), float("-inf"), device=device)
        beam_scores[0] = 0.0  # the beams start identical: expand only the first
        for step in range(max_new):
            if config.repetition_penalty != 1.0:
                seen = torch.cat([prompt.expand(width, -1), beams], dim=1)  # (K, T + t)
                logits = apply_repetition_penalty(logits, seen, config.repetition_penalty)
            candidates = beam_scores[:, None] + torch.log_softmax(logits, dim=-1)  # (K, V)
            top_scores, top_index = candidates.view(-1).topk(2 * width)  # (2K,)
            vocab = candidates.shape[1]
            parents, tokens, scores = [], [], []
            for score, index in zip(top_scores.tolist(), top_index.tolist()):
                if score == float("-inf") or len(parents) == width:
                    break
                parent, token = divmod(index, vocab)
                if token in stop_ids:
                    finish(beams[parent].tolist() + [token], score, stopped=True)
                else:
                    parents.append(parent)
                    tokens.append(token)
                    scores.append(score)
            while len(parents) < width:  # every candidate stopped: fill with dead beams
                parents.append(0)
                tokens.append(0)
                scores.append(float("-inf"))
            parent_rows = torch.tensor(parents, device=device)
            beams = torch.cat([beams[parent_rows], torch.tensor(tokens, device=device)[:, None]], dim=1)
            beam_scores = torch.tensor(scores, device=device)
            if step + 1 == max_new or max(scores) == float("-inf") or _done(finished, scores, step + 1, config):
                break
            cache.reorder(parent_rows)
            logits = forward_last(model, beams[:, -1:], cache, runtime, decode_step)  # (K, V)
        for row, score in enumerate(scores):
            if score > float("-inf"):
                finish(beams[row].tolist(), score, stopped=False)
    best = finished[0]
    tokens = best.tokens[:-1] if best.stopped else best.tokens
    return BeamResult(tokens, best.score, best.log_prob, best.stopped)


def _done(finished: list[_Finished], running_scores: list[float], length: int, config: SamplingConfig) -> bool:
    """True when num_beams sequences finished and the best running beam, scored at its
    current length, is already worse than the worst finished one."""
    if len(finished) < config.num_beams:
        return False
    best_running = max(running_scores)
    return best_running / length ** config.length_penalty <= finished[-1].score
