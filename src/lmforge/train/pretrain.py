"""The pretraining stage: random windows of the packed token stream, next-token loss.

A stage gives the loop its batches and its loss; the loop (loop.py) is shared by
every stage. Batches depend only on (seed, step), so a resumed run and a
data-parallel run see exactly the sequences an uninterrupted single process sees.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.runtime import Runtime
from lmforge.train.lm_loss import token_loss


class PretrainStage:
    """Next-token prediction over a memory-mapped token array.

    ``tokens``: 1-D array of token ids (a shard). ``token_bytes``: UTF-8 length of each
    vocabulary entry (0 for special tokens), used for bits per byte.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, val_tokens: np.ndarray | None = None,
                 token_bytes: list[int] | None = None):
        if len(tokens) < seq_len + 2:
            raise ValueError(f"training data has {len(tokens)} tokens, fewer than one sequence of {seq_len}")
        self.tokens, self.val_tokens, self.seq_len, self.seed = tokens, val_tokens, seq_len, seed
        self.token_bytes = torch.tensor(token_bytes) if token_bytes is not None else None

    def window_offsets(self, step: int, count: int) -> np.ndarray:
        """Start offsets of the ``count`` sequences of the global batch of ``step``."""
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, len(self.tokens) - self.seq_len - 1, size=count)

    def batch(self, step: int, first: int, size: int, global_size: int, device: torch.device) -> dict:
        """Sequences first .. first+size-1 of the global batch of ``step``."""
        offsets = self.window_offsets(step, global_size)[first:first + size]
        rows = np.stack([np.asarray(self.tokens[o:o + self.seq_len + 1], dtype=np.int64) for o in offsets])
        ids = torch.from_numpy(rows).to(device)
        return {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}

    @staticmethod
    def loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """Mean next-token cross entropy, the output layer folded into the loss (lm_loss.token_loss)."""
        return token_loss(model, model(batch["input_ids"], return_hidden=True), batch["targets"])

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, runtime: Runtime, max_tokens: int, batch_size: int) -> dict:
        """Validation loss (nats/token) and bits per byte over the first ``max_tokens`` of the val split.

        bits/byte = sum of losses / (ln 2 * sum of target UTF-8 bytes); special tokens
        (0 bytes) are left out of both sums, so tokenizers of any vocabulary compare.
        """
        if self.val_tokens is None or len(self.val_tokens) < self.seq_len + 1:
            return {}
        was_training = model.training
        model.eval()
        count = max(1, min(max_tokens, len(self.val_tokens) - 1) // self.seq_len)
        total_loss = total_tokens = total_bytes = total_loss_counted = 0.0
        for first in range(0, count, batch_size):
            rows = [np.asarray(self.val_tokens[i * self.seq_len:(i + 1) * self.seq_len + 1], dtype=np.int64)
                    for i in range(first, min(count, first + batch_size))]
            ids = torch.from_numpy(np.stack(rows)).to(runtime.device)
            with runtime.autocast():
                logits = model(ids[:, :-1])
            targets = ids[:, 1:]
            losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
            total_loss += losses.sum().item()
            total_tokens += losses.numel()
            if self.token_bytes is not None:
                nbytes = self.token_bytes.to(targets.device)[targets.flatten()]
                counted = nbytes > 0
                total_loss_counted += losses[counted].sum().item()
                total_bytes += nbytes.sum().item()
        model.train(was_training)
        out = {"val_loss": total_loss / total_tokens}
        if total_bytes:
            out["val_bpb"] = total_loss_counted / (math.log(2) * total_bytes)
        return out
