"""The distillation stage: a small student learns to predict what a large teacher predicts.

A draft model for speculative decoding is useful only as far as its guesses match the
target's: greedy decoding keeps a guess exactly when it is the target's own likeliest
token. So the student trains on the teacher's answers, at the answer positions only
(the prompt is context, as in SFT), towards two things the teacher gave while it wrote
them: the token it chose (cross-entropy) and its k likeliest tokens with their
probabilities (Hinton et al.'s soft targets, kept sparse):

    loss = (1 - w) * CE + w * KL(p_top || q_top)  [+ u * CE on the prompt's own next tokens]

where p_top is the teacher's distribution over its k likeliest tokens and one bucket for
all the others (probability 1 - sum of the k), q_top the student's over the same k + 1
outcomes: an exact KL between the two distributions coarsened to those outcomes, which
needs only the k log-probabilities the engine reported, never a second teacher pass.
The optional last term (weight u) is plain next-token prediction on the prompts' text:
more language for the student to learn from, and the copying from earlier in the text
that summaries and quotes need.

The figure that says how good a draft is: ``agreement``, the share of answer positions
where the student's likeliest token is the teacher's (what greedy speculative decoding
keeps, guess by guess).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.runtime import Runtime
from lmforge.train.sft import IGNORE, PackedRows, SFTStage


@dataclass
class TeacherRows(PackedRows):
    """:class:`PackedRows` of teacher answers, and at each answer position the teacher's ``k`` likeliest tokens:
    ``top_ids`` (N, seq_len, k) and their log-probabilities ``top_logprobs`` (0 and 0.0 off the answers)."""

    top_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None


def pack_teacher_rows(rows: PackedRows, tops: list[list[list[tuple[int, float]]]], k: int) -> TeacherRows:
    """``rows`` (from :func:`pack_examples` over examples whose learned tokens are the answers, none cut) with
    each answer token's ``k`` likeliest (token, log-prob) pairs: ``tops[e][i]`` for answer token i of example e.
    The pairs fill the rows' answer positions in order (rows keep the examples' order)."""
    flat = [entry for example in tops for entry in example]
    answers = rows.targets != IGNORE
    if int(answers.sum()) != len(flat):
        raise ValueError(f"{int(answers.sum())} answer positions in the rows, {len(flat)} teacher entries")
    ids = np.zeros((*rows.targets.shape, k), np.int64)
    logprobs = np.zeros((*rows.targets.shape, k), np.float32)
    for (row, col), entry in zip(np.argwhere(answers), flat):
        entry = entry[:k]
        ids[row, col, :len(entry)] = [token for token, _ in entry]
        logprobs[row, col, :len(entry)] = [lp for _, lp in entry]
        logprobs[row, col, len(entry):] = -np.inf  # fewer than k: the missing ones have probability 0
    return TeacherRows(rows.inputs, rows.targets, rows.segments, rows.truncated, ids, logprobs)


def distill_loss(logits: torch.Tensor, targets: torch.Tensor, top_ids: torch.Tensor, top_logprobs: torch.Tensor,
                 kl_weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss at N answer positions: student ``logits`` (N, V), the teacher's tokens ``targets`` (N,), its k
    likeliest tokens ``top_ids`` (N, k) and their log-probabilities ``top_logprobs`` (N, k); and its parts
    ``ce``, ``kl`` and ``agreement`` (the student's likeliest token is the teacher's)."""
    log_q = torch.log_softmax(logits.float(), dim=-1)
    ce = -log_q.gather(1, targets[:, None]).mean()
    q_top = log_q.gather(1, top_ids)  # (N, k)
    known = torch.isfinite(top_logprobs)  # fewer than k reported: the rest are -inf, probability 0
    p_log = torch.where(known, top_logprobs, 0.0)
    p_top = torch.where(known, p_log.exp(), 0.0)
    kl_top = (p_top * (p_log - q_top)).sum(-1)
    p_rest = (1 - p_top.sum(-1)).clamp(min=1e-6)  # the other tokens, one outcome
    q_rest = (1 - torch.where(known, q_top.exp(), 0.0).sum(-1)).clamp(min=1e-6)
    kl = (kl_top + p_rest * (p_rest.log() - q_rest.log())).mean()
    with torch.no_grad():
        agreement = (logits.argmax(-1) == top_ids[:, 0]).float().mean()
    return (1 - kl_weight) * ce + kl_weight * kl, {"ce": ce.detach(), "kl": kl.detach(), "agreement": agreement}


def _module(model: nn.Module) -> nn.Module:
    """The model inside data-parallel and compile wrappers (for its output layer)."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


class DistillStage(SFTStage):
    """Batches of :class:`TeacherRows` and :func:`distill_loss` (``kl_weight`` w). Reports ``ce``, ``kl`` and
    ``agreement`` beside the loss. Only the answer positions go through the output layer: with a vocabulary
    of tens of thousands that layer is most of a small student's cost."""

    fields = ("inputs", "targets", "segments", "top_ids", "top_logprobs")

    def __init__(self, train: TeacherRows, seed: int, val: TeacherRows | None = None, kl_weight: float = 0.5,
                 prompt_weight: float = 0.0):
        super().__init__(train, seed, val)
        if not 0.0 <= kl_weight <= 1.0:
            raise ValueError(f"kl_weight must be in [0, 1], got {kl_weight}")
        if prompt_weight < 0:
            raise ValueError(f"prompt_weight must be >= 0, got {prompt_weight}")
        self.kl_weight, self.prompt_weight = kl_weight, prompt_weight
        self._sums: dict[str, float] = {}
        self._count = 0

    def _parts(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        answers = batch["targets"] != IGNORE
        hidden = model(batch["inputs"], segments=batch["segments"], return_hidden=True)
        logits = _module(model).logits(hidden[answers])
        loss, parts = distill_loss(logits, batch["targets"][answers], batch["top_ids"][answers],
                                   batch["top_logprobs"][answers], self.kl_weight)
        if self.prompt_weight > 0:  # the prompt's next token, where it is still the prompt's own text
            segments, inputs = batch["segments"], batch["inputs"]
            text = (segments[:, :-1] >= 0) & (segments[:, 1:] == segments[:, :-1]) & ~answers[:, :-1]
            prompt_logits = _module(model).logits(hidden[:, :-1][text]).float()
            prompt_ce = F.cross_entropy(prompt_logits, inputs[:, 1:][text]) if text.any() else loss.new_zeros(())
            loss = loss + self.prompt_weight * prompt_ce
            parts["prompt_ce"] = prompt_ce.detach()
        return loss, parts, int(answers.sum())

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        loss, parts, _ = self._parts(model, batch)
        for name, value in parts.items():
            self._sums[name] = self._sums.get(name, 0.0) + float(value)
        self._count += 1
        return loss

    def pop_metrics(self) -> dict[str, float]:
        out = {name: total / max(self._count, 1) for name, total in self._sums.items()}
        self._sums, self._count = {}, 0
        return out

    @torch.no_grad()
    def evaluate(self, model: nn.Module, runtime: Runtime, max_tokens: int, batch_size: int) -> dict:
        """Over (up to ``max_tokens`` positions of) the validation rows' answers: ``val_loss`` (cross-entropy on
        the teacher's tokens), ``val_kl`` and ``val_agreement``."""
        if self.val is None or len(self.val) == 0:
            return {}
        was_training = model.training
        model.eval()
        count = max(1, min(len(self.val), max_tokens // self.val.inputs.shape[1]))
        totals, answers = {"ce": 0.0, "kl": 0.0, "agreement": 0.0}, 0  # (prompt_ce is not validated)
        for first in range(0, count, batch_size):
            part = slice(first, min(count, first + batch_size))
            batch = {name: torch.from_numpy(getattr(self.val, name)[part]).to(runtime.device) for name in self.fields}
            with runtime.autocast():
                _, parts, n = self._parts(model, batch)
            for name in totals:
                totals[name] += float(parts[name]) * n
            answers += n
        model.train(was_training)
        return {f"val_{'loss' if name == 'ce' else name}": total / max(answers, 1) for name, total in totals.items()}
