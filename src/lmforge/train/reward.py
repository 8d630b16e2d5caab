"""Reward-model training as a stage of the one loop: preference pairs and the Bradley-Terry loss.

A pair is a conversation (the prompt) with two answers, one preferred. Both are rendered in the
model's chat format, the chosen and the rejected answer after the same prompt, and a model with
the ``score`` head (:func:`lmforge.model.heads.with_head`) reads one scalar at each one's last
token. The loss asks the chosen to score higher: ``−log σ(r_chosen − r_rejected − margin)``.
Validation reports the held-out pair accuracy and mean margin.
"""

from __future__ import annotations

import numpy as np
import torch

from lmforge.data.preferences import Preference
from lmforge.model.heads import last_token_scores
from lmforge.runtime import Runtime
from lmforge.tokenizer.chat import render_chat
from lmforge.train.preference import bradley_terry_loss
from lmforge.train.sft import epoch_rows


class PairRows:
    """Pairs as padded token rows: ``chosen``/``rejected`` (N, T) and their lengths (N,)."""

    def __init__(self, tokenizer, pairs: list[Preference], seq_len: int, pad_id: int = 0):
        if not pairs:
            raise ValueError("no preference pairs")
        encoded = [(self._encode(tokenizer, p.prompt, p.chosen, seq_len),
                    self._encode(tokenizer, p.prompt, p.rejected, seq_len)) for p in pairs]
        self.chosen = np.full((len(pairs), seq_len), pad_id, dtype=np.int64)
        self.rejected = np.full((len(pairs), seq_len), pad_id, dtype=np.int64)
        self.chosen_len = np.array([len(c) for c, _ in encoded])
        self.rejected_len = np.array([len(r) for _, r in encoded])
        for i, (c, r) in enumerate(encoded):
            self.chosen[i, :len(c)], self.rejected[i, :len(r)] = c, r

    @staticmethod
    def _encode(tokenizer, prompt: list[dict], answer: str, seq_len: int) -> list[int]:
        """The conversation with ``answer`` as the assistant's turn; a long one keeps its end (the answer)."""
        return render_chat(tokenizer, [*prompt, {"role": "assistant", "content": answer}]).ids[-seq_len:]

    def __len__(self) -> int:
        return len(self.chosen)

    def take(self, rows, device: torch.device) -> dict:
        return {name: torch.from_numpy(getattr(self, name)[rows]).to(device)
                for name in ("chosen", "rejected", "chosen_len", "rejected_len")}


class RewardStage:
    """Batches of preference pairs and the pairwise loss, for :func:`lmforge.train.fit`. Batches depend
    only on (seed, step), as SFT's: resume and data parallelism see the same pairs."""

    def __init__(self, train: PairRows, seed: int, val: PairRows | None = None, margin: float = 0.0):
        self.train, self.val, self.seed, self.margin = train, val, seed, margin

    def batch(self, step: int, first: int, size: int, global_size: int, device: torch.device) -> dict:
        return self.train.take(epoch_rows(self.seed, len(self.train), step, first, size, global_size), device)

    def scores(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) scores (B,), both halves in one forward pass."""
        width = int(max(batch["chosen_len"].max(), batch["rejected_len"].max()))  # drop all-padding columns
        ids = torch.cat([batch["chosen"][:, :width], batch["rejected"][:, :width]])
        scores = last_token_scores(model, ids, torch.cat([batch["chosen_len"], batch["rejected_len"]]))
        return scores.chunk(2)

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        chosen, rejected = self.scores(model, batch)
        return bradley_terry_loss(chosen, rejected, self.margin or None)[0]

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, runtime: Runtime, max_tokens: int, batch_size: int) -> dict:
        """Held-out pair accuracy (the chosen scores higher) and mean margin r_chosen − r_rejected."""
        if self.val is None:
            return {}
        was_training = model.training
        model.eval()
        chosen, rejected = [], []
        for first in range(0, len(self.val), batch_size):
            batch = self.val.take(np.arange(first, min(len(self.val), first + batch_size)), runtime.device)
            with runtime.autocast():
                c, r = self.scores(model, batch)
            chosen.append(c.float())
            rejected.append(r.float())
        model.train(was_training)
        chosen, rejected = torch.cat(chosen), torch.cat(rejected)
        loss, figures = bradley_terry_loss(chosen, rejected, self.margin or None)
        return {"val_loss": loss.item(), "pair_accuracy": figures["accuracy"], "margin": figures["margin"]}
