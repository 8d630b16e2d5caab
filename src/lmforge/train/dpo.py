"""Direct preference optimization as a stage of the one loop: pairs, answer log-probabilities, a reference.

DPO (Rafailov et al., 2023) learns from pairs without a reward model. For a prompt ``x`` with a
chosen answer ``y_w`` and a rejected one ``y_l``, the policy ``π`` (the model that learns) and a
frozen reference ``π_ref`` (where it started) each give the answers' log-probabilities, summed over
the answer's tokens only; the loss (:func:`lmforge.train.preference.dpo_loss`) pushes
``log π(y_w) − log π_ref(y_w)`` above ``log π(y_l) − log π_ref(y_l)``. ``β`` sets how far from the
reference that may go. The variants: IPO (a squared loss on length-averaged log-ratios, as TRL
computes it), conservative DPO (``label_smoothing``: each label may be wrong with that
probability), and SimPO (reference-free: length-averaged log-probabilities and a margin ``γ``).

The reference is either a separate frozen model, or, when the policy trains LoRA adapters, the
policy itself with its adapters switched off (:func:`lmforge.peft.lora.adapters_disabled`): no
second copy of the weights is held.

Each step logs TRL's figures: ``rewards/chosen``, ``rewards/rejected`` (the implicit rewards
``β·(log π − log π_ref)``), ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``,
``logps/rejected``.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from torch import nn

from lmforge.data.preferences import Preference
from lmforge.peft.lora import adapters_disabled, lora_layers
from lmforge.runtime import Runtime
from lmforge.tokenizer.chat import render_chat
from lmforge.train.metrics import RecordsFigures
from lmforge.train.preference import answer_nll, dpo_loss, label_logps, preference_metrics, simpo_loss
from lmforge.train.sft import epoch_rows

DPO_LOSSES = ("sigmoid", "ipo", "simpo")


def _last_turn(mask: list[bool]) -> list[bool]:
    """The mask of the last run of target tokens only: the final answer, not earlier assistant turns."""
    end = len(mask)
    while end and not mask[end - 1]:
        end -= 1
    start = end
    while start and mask[start - 1]:
        start -= 1
    return [start <= i < end for i in range(len(mask))]


class PreferenceRows:
    """Pairs as padded token rows: ``chosen`` / ``rejected`` ids (N, T) and masks (N, T) that are true on
    the tokens of the final answer (end of turn included). A conversation longer than T keeps its end."""

    SIDES = ("chosen", "rejected")

    def __init__(self, tokenizer, pairs: list[Preference], seq_len: int, pad_id: int = 0):
        if not pairs:
            raise ValueError("no preference pairs")
        self.truncated = 0
        for side in self.SIDES:
            ids = np.full((len(pairs), seq_len), pad_id, dtype=np.int64)
            mask = np.zeros((len(pairs), seq_len), dtype=bool)
            for i, pair in enumerate(pairs):
                tokens = render_chat(tokenizer, [*pair.prompt, {"role": "assistant", "content": getattr(pair, side)}])
                self.truncated += len(tokens.ids) > seq_len
                ids[i, :min(seq_len, len(tokens))] = tokens.ids[-seq_len:]
                mask[i, :min(seq_len, len(tokens))] = _last_turn(tokens.mask)[-seq_len:]
            setattr(self, side, ids)
            setattr(self, side + "_mask", mask)
        self.width = np.maximum(seq_len_of(self.chosen_mask), seq_len_of(self.rejected_mask))

    def __len__(self) -> int:
        return len(self.chosen)

    def take(self, rows, device: torch.device) -> dict:
        """The pairs at ``rows``, cut to the longest conversation among them."""
        width = int(self.width[rows].max())
        return {name: torch.from_numpy(getattr(self, name)[rows, :width]).to(device)
                for name in ("chosen", "rejected", "chosen_mask", "rejected_mask")}


def seq_len_of(mask: np.ndarray) -> np.ndarray:
    """Per row, one past the last true position (the answer ends the conversation)."""
    return np.where(mask.any(1), mask.shape[1] - mask[:, ::-1].argmax(1), 0)


def answer_token_logps(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of every answer token (N,), the row of each (N,)) under ``model``, in row-major order.

    Token t is predicted at position t − 1. Only the answer positions go through the output layer, so
    a long prompt costs its pass through the blocks but no vocabulary-sized logits.
    """
    hidden = model(ids, return_hidden=True)  # (B, T, dim)
    rows, cols = mask[:, 1:].nonzero(as_tuple=True)
    head = getattr(model, "module", model).lm_head  # through a DistributedDataParallel wrapper
    return label_logps(head(hidden[rows, cols]), ids[:, 1:][rows, cols]), rows


def answer_logps(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p over each row's answer tokens (B,), their count (B,)) under ``model``
    (:func:`answer_token_logps`, summed per row)."""
    logps, rows = answer_token_logps(model, ids, mask)
    sums = torch.zeros(ids.shape[0], device=ids.device, dtype=logps.dtype).index_add(0, rows, logps)
    return sums, mask[:, 1:].sum(1)


class DPOStage(RecordsFigures):
    """Batches of pairs and the DPO loss (or IPO, cDPO, SimPO), for :func:`lmforge.train.fit`;
    ``rpo_alpha > 0`` adds α times the chosen answers' token NLL (RPO, :func:`answer_nll`).

    ``reference``: a frozen model; ``None`` means the policy with its LoRA adapters switched off (the
    policy must have adapters), or no reference at all for SimPO.
    """

    def __init__(self, train: PreferenceRows, seed: int, val: PreferenceRows | None = None,
                 loss_type: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0,
                 simpo_gamma: float = 0.5, reference: nn.Module | None = None, rpo_alpha: float = 0.0):
        if loss_type not in DPO_LOSSES:
            raise ValueError(f"loss_type must be one of {', '.join(DPO_LOSSES)}, got {loss_type!r}")
        if beta <= 0:
            raise ValueError(f"beta must be positive, got {beta}")
        if rpo_alpha < 0:
            raise ValueError(f"rpo_alpha must be >= 0, got {rpo_alpha}")
        self.rpo_alpha = rpo_alpha
        self.train, self.val, self.seed = train, val, seed
        self.loss_type, self.beta, self.label_smoothing, self.simpo_gamma = loss_type, beta, label_smoothing, simpo_gamma
        self.reference = reference
        if reference is not None:
            reference.eval().requires_grad_(False)

    def batch(self, step: int, first: int, size: int, global_size: int, device: torch.device) -> dict:
        return self.train.take(epoch_rows(self.seed, len(self.train), step, first, size, global_size), device)

    @staticmethod
    def logps(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(chosen sums, rejected sums, chosen counts, rejected counts), both sides in one forward pass."""
        sums, counts = answer_logps(model, torch.cat([batch["chosen"], batch["rejected"]]),
                                    torch.cat([batch["chosen_mask"], batch["rejected_mask"]]))
        return (*sums.chunk(2), *counts.chunk(2))

    @torch.no_grad()
    def reference_logps(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, ...]:
        if self.reference is not None:
            return self.logps(self.reference, batch)
        if not lora_layers(model):
            raise ValueError("DPO needs a reference: pass a frozen model, or train LoRA adapters (the reference is "
                             "then the model with its adapters off)")
        was_training = model.training
        model.eval()  # no dropout in the reference
        try:
            with adapters_disabled(model):
                return self.logps(model, batch)
        finally:
            model.train(was_training)

    def losses(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """Per-pair losses (B,) and the batch's figures under TRL's names."""
        if self.loss_type != "simpo":  # first, so its pass never overlaps the policy's saved activations
            ref_chosen, ref_rejected, _, _ = self.reference_logps(model, batch)
        chosen, rejected, n_chosen, n_rejected = self.logps(model, batch)
        if self.loss_type == "simpo":
            losses, chosen_rewards, rejected_rewards = simpo_loss(
                chosen / n_chosen.clamp(min=1), rejected / n_rejected.clamp(min=1), self.beta, self.simpo_gamma)
        else:
            # the logged rewards are β·(summed log-ratio) for every variant, as TRL logs them
            chosen_rewards, rejected_rewards = self.beta * (chosen.detach() - ref_chosen), \
                self.beta * (rejected.detach() - ref_rejected)
            if self.loss_type == "ipo":  # as TRL: the log-ratios averaged over the answer's tokens
                n_chosen, n_rejected = n_chosen.clamp(min=1), n_rejected.clamp(min=1)
                losses = dpo_loss(chosen / n_chosen, rejected / n_rejected, ref_chosen / n_chosen,
                                  ref_rejected / n_rejected, self.beta, "ipo")[0]
            else:
                losses = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta, "sigmoid",
                                  self.label_smoothing)[0]
        figures = preference_metrics(chosen_rewards, rejected_rewards, chosen, rejected)
        if self.rpo_alpha:  # RPO: the chosen answers' token NLL, the same for every pair (its mean adds α·NLL)
            nll = answer_nll(chosen, n_chosen)
            losses = losses + self.rpo_alpha * nll
            figures["nll_loss"] = nll.item()
        return losses, figures

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        losses, figures = self.losses(model, batch)
        self.record(figures)
        return losses.mean()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, runtime: Runtime, max_tokens: int, batch_size: int) -> dict:
        """On the held-out pairs: the loss, and how often and by how much the chosen answer's reward wins."""
        if self.val is None:
            return {}
        was_training = model.training
        model.eval()
        totals: dict[str, float] = defaultdict(float)
        for first in range(0, len(self.val), batch_size):
            rows = np.arange(first, min(len(self.val), first + batch_size))
            batch = self.val.take(rows, runtime.device)
            with runtime.autocast():
                losses, figures = self.losses(model, batch)
            totals["loss"] += losses.float().sum().item()
            for name, value in figures.items():
                totals[name] += value * len(rows)
        model.train(was_training)
        return {"val_" + name: value / len(self.val) for name, value in totals.items()}
