"""The dual-encoder stage (dense passage retrieval): questions and their passages pulled together.

Each batch holds B (question, passage) pairs. Both sides go through the same encoder and
are pooled into unit vectors q_i and p_j; the loss is the cross entropy of
``softmax_j(q_i . p_j / temperature)`` with the right passage as the target, so each
question's own passage must outscore the B - 1 other passages of the batch, which serve
as negatives for free ("in-batch negatives", Karpukhin et al., 2020, arXiv:2004.04906;
one encoder for both sides as in Sentence-BERT). A larger batch means more negatives.

Batches depend only on (seed, step), as in every stage. Logged: ``in_batch_accuracy``
(how often a question's own passage scores highest in its batch).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.embed import embed_batch, pad_rows
from lmforge.runtime import Runtime


class ContrastiveStage:
    """``pairs``: (question token ids, passage token ids), framed as the encoder frames a text."""

    def __init__(self, pairs: list[tuple[list[int], list[int]]], seed: int, temperature: float = 0.05,
                 pooling: str = "mean"):
        if len(pairs) < 2:
            raise ValueError(f"contrastive training needs at least 2 pairs, got {len(pairs)}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.pairs, self.seed, self.temperature, self.pooling = pairs, seed, temperature, pooling
        self._accuracy: list[float] = []

    def batch(self, step: int, first: int, size: int, global_size: int, device: torch.device) -> dict:
        """Pairs first .. first+size-1 of the global batch of ``step`` (distinct pairs within a batch)."""
        rng = np.random.default_rng([self.seed, step])
        chosen = rng.choice(len(self.pairs), size=min(global_size, len(self.pairs)), replace=False)[first:first + size]
        questions, question_mask = pad_rows([self.pairs[i][0] for i in chosen], device)
        passages, passage_mask = pad_rows([self.pairs[i][1] for i in chosen], device)
        return {"questions": questions, "question_mask": question_mask, "passages": passages,
                "passage_mask": passage_mask}

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        q = embed_batch(model, batch["questions"], batch["question_mask"], self.pooling)
        p = embed_batch(model, batch["passages"], batch["passage_mask"], self.pooling)
        scores = q @ p.T / self.temperature  # (B, B): row i's own passage is column i
        target = torch.arange(len(q), device=q.device)
        self._accuracy.append((scores.argmax(-1) == target).float().mean().item())
        return F.cross_entropy(scores, target)

    def pop_metrics(self) -> dict[str, float]:
        out = {"in_batch_accuracy": float(np.mean(self._accuracy))} if self._accuracy else {}
        self._accuracy = []
        return out

    def evaluate(self, model: torch.nn.Module, runtime: Runtime, max_tokens: int, batch_size: int) -> dict:
        return {}  # retrieval is measured on the knowledge base (lmforge.rag.train), not per step
