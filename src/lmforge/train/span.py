"""The span-corruption stage (T5): hide spans of the text, have the decoder write them back.

A window of the packed token stream is split into alternating runs of kept and hidden
tokens. In the encoder's input each hidden run becomes one sentinel token; the decoder's
target lists each sentinel followed by the tokens it stands for:

    text    the cat sat on the warm mat
    input   the cat <s0> on the <s1> </s>
    target  <s0> sat <s1> warm mat </s>

Of ``length`` tokens, ``round(length * noise_density)`` are hidden, in
``round(hidden / mean_span_length)`` runs, a kept run first and a hidden run last; the
run lengths are a uniformly random composition of each count (Raffel et al., 2020, arXiv:1910.10683, section 3.3.4). Both
counts depend on the length only, so every input and every target of a batch has the
same length and nothing is padded. Sentinel ``i`` is the ``i``-th id from the top of the
model's vocabulary (T5's ``<extra_id_i>``): an encoder-decoder that lmforge pretrains has
``NUM_SENTINELS`` ids above its tokenizer's.

As in every stage, a batch depends only on (seed, step).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lmforge.runtime import Runtime
from lmforge.tokenizer.special import END_OF_TEXT, PAD, SPECIAL_IDS
from lmforge.train.lm_loss import token_loss_and_hits
from lmforge.train.metrics import RecordsFigures

NUM_SENTINELS = 100  # as T5's vocabulary
EOS, PAD_ID = SPECIAL_IDS[END_OF_TEXT], SPECIAL_IDS[PAD]


def sentinel_ids(vocab_size: int, count: int = NUM_SENTINELS) -> list[int]:
    """Sentinel i = ``vocab_size - 1 - i``: the top ``count`` ids of the model's vocabulary."""
    return [vocab_size - 1 - i for i in range(count)]


def span_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(hidden tokens, hidden runs) for a window of ``length`` tokens: at least one of each, and at
    least one kept token per run (a run of kept tokens comes first)."""
    hidden = min(max(round(length * noise_density), 1), length - 1)
    runs = max(round(hidden / mean_span_length), 1)
    return hidden, min(runs, hidden, length - hidden)


def _composition(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """``total`` split into ``parts`` positive integers, uniformly over all such splits."""
    cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [total]]))


def noise_mask(length: int, noise_density: float, mean_span_length: float, rng: np.random.Generator) -> np.ndarray:
    """(length,) bool, True at hidden tokens: alternating kept and hidden runs, kept first."""
    hidden, runs = span_counts(length, noise_density, mean_span_length)
    kept = _composition(length - hidden, runs, rng)
    noise = _composition(hidden, runs, rng)
    mask = np.zeros(length, dtype=bool)
    position = 0
    for keep, hide in zip(kept, noise):
        position += keep
        mask[position:position + hide] = True
        position += hide
    return mask


def corrupt(ids: Sequence[int], mask: np.ndarray, sentinels: Sequence[int], eos: int | None = EOS
            ) -> tuple[list[int], list[int]]:
    """(input, target) of ``ids`` with ``mask``'s hidden runs: each run becomes the next sentinel in
    the input, and the target lists each sentinel then the run's tokens; both end with ``eos``."""
    inputs: list[int] = []
    targets: list[int] = []
    run = -1
    for position, token in enumerate(ids):
        if mask[position]:
            if position == 0 or not mask[position - 1]:  # a hidden run starts
                run += 1
                if run >= len(sentinels):
                    raise ValueError(f"{run + 1} hidden runs, but only {len(sentinels)} sentinel tokens")
                inputs.append(sentinels[run])
                targets.append(sentinels[run])
            targets.append(int(token))
        else:
            inputs.append(int(token))
    if eos is not None:
        inputs.append(eos)
        targets.append(eos)
    return inputs, targets


def reconstruct(inputs: Sequence[int], targets: Sequence[int], sentinels: Sequence[int], eos: int | None = EOS
                ) -> list[int]:
    """The original tokens from an (input, target) pair: each sentinel in the input replaced by what
    follows it in the target (the inverse of :func:`corrupt`)."""
    marks, inputs, targets = set(sentinels), list(inputs), list(targets)
    if eos is not None:  # the end marks corrupt() added (an end-of-text inside the text stays)
        inputs = inputs[:-1] if inputs[-1:] == [eos] else inputs
        targets = targets[:-1] if targets[-1:] == [eos] else targets
    spans: dict[int, list[int]] = {}
    current: list[int] = []
    for token in targets:
        if token in marks:
            current = spans.setdefault(token, [])
        else:
            current.append(token)
    out: list[int] = []
    for token in inputs:
        out.extend(spans.get(token, []) if token in marks else [token])
    return out


class SpanCorruptionStage(RecordsFigures):
    """Span-corruption pretraining of an encoder-decoder over a token array.

    ``tokens``: 1-D array of token ids (a shard); ``seq_len``: text tokens per example (the input
    is shorter by the hidden tokens, plus a sentinel per run and the end mark); ``sentinels``: the
    ids that stand for the runs (:func:`sentinel_ids`), at least as many as a window has runs.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, sentinels: Sequence[int],
                 val_tokens: np.ndarray | None = None, noise_density: float = 0.15, mean_span_length: float = 3.0):
        if not 0.0 < noise_density < 1.0:
            raise ValueError(f"noise_density must be in (0, 1), got {noise_density}")
        if mean_span_length < 1.0:
            raise ValueError(f"mean_span_length must be at least 1, got {mean_span_length}")
        if seq_len < 4:
            raise ValueError(f"seq_len must be at least 4 for span corruption, got {seq_len}")
        if len(tokens) < seq_len + 1:
            raise ValueError(f"training data has {len(tokens)} tokens, fewer than one sequence of {seq_len}")
        self.tokens, self.val_tokens, self.seq_len, self.seed = tokens, val_tokens, seq_len, seed
        self.noise_density, self.mean_span_length = noise_density, mean_span_length
        _, runs = span_counts(seq_len, noise_density, mean_span_length)
        if runs > len(sentinels):
            raise ValueError(f"a window of {seq_len} tokens has {runs} hidden runs, more than the {len(sentinels)} "
                             "sentinel tokens: use a shorter --seq-len or a longer --mean-span-length")
        self.sentinels = list(sentinels)

    def examples(self, tokens: np.ndarray, rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
        """``count`` corrupted windows of ``tokens``: inputs (count, S) and targets (count, T)."""
        starts = rng.integers(0, len(tokens) - self.seq_len + 1, size=count)
        pairs = [corrupt(np.asarray(tokens[s:s + self.seq_len]),
                         noise_mask(self.seq_len, self.noise_density, self.mean_span_length, rng), self.sentinels)
                 for s in starts]
        return np.array([p[0] for p in pairs], dtype=np.int64), np.array([p[1] for p in pairs], dtype=np.int64)

    def batch(self, step: int, first: int, size: int, global_size: int, device: torch.device) -> dict:
        """Examples first .. first+size-1 of the global batch of ``step``."""
        inputs, targets = self.examples(self.tokens, np.random.default_rng([self.seed, step]), global_size)
        part = slice(first, first + size)
        return {"input_ids": torch.from_numpy(inputs[part]).to(device),
                "targets": torch.from_numpy(targets[part]).to(device)}

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """Cross entropy of the target tokens, the decoder fed the target shifted right (teacher forcing)."""
        targets = batch["targets"]
        hidden = model(batch["input_ids"], model.shift_right(targets, PAD_ID), return_hidden=True)  # (B, T, dim)
        loss, hits = token_loss_and_hits(model, hidden, targets)  # the output layer folded in (lm_loss.py)
        self.record({"span_accuracy": hits.item() / targets.numel()})
        return loss

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, runtime: Runtime, max_tokens: int, batch_size: int) -> dict:
        """Target loss (nats per target token) and accuracy on validation windows corrupted with a fixed
        seed (the same examples at every evaluation)."""
        if self.val_tokens is None or len(self.val_tokens) < self.seq_len + 1:
            return {}
        was_training = model.training
        model.eval()
        count = max(1, max_tokens // self.seq_len)
        inputs, targets = self.examples(self.val_tokens, np.random.default_rng([self.seed, 2**31 - 1]), count)
        total_loss = right = total = 0.0
        for first in range(0, count, batch_size):
            x = torch.from_numpy(inputs[first:first + batch_size]).to(runtime.device)
            y = torch.from_numpy(targets[first:first + batch_size]).to(runtime.device)
            with runtime.autocast():  # the training loss's own computation (span targets hold no padding)
                loss, hits = token_loss_and_hits(model, model(x, model.shift_right(y, PAD_ID), return_hidden=True), y)
            total_loss += loss.item() * y.numel()
            right += hits.item()
            total += y.numel()
        model.train(was_training)
        return {"val_loss": total_loss / total, "val_span_accuracy": right / total}
