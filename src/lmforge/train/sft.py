"""The supervised fine-tuning stage: conversations, loss on the assistant's tokens only, packed rows.

Instruction fine-tuning trains on the same next-token loss as pretraining, but
only where the assistant speaks: the user's words and the template's markers are
context, never targets. Examples are short, so they are packed several to a row of
``seq_len`` tokens without padding between them; the model sees each row's
``segments`` and attends only inside an example, with positions restarting at 0,
so a packed example trains exactly as it would alone (the notes' padding-free
collation). The loop (loop.py) is the one pretraining uses.

An encoder-decoder is fine-tuned on the same conversations split in two
(:func:`split_examples`): the encoder reads everything up to the assistant's first
token (the template's opening of its turn included), the decoder writes the rest, with
the same answer-only mask; rows are padded, not packed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmforge.runtime import Runtime
from lmforge.tokenizer.chat import ChatTokens
from lmforge.train.lm_loss import IGNORE, token_loss


@dataclass
class PackedRows:
    """Rows of packed examples, numpy arrays of shape (N, seq_len).

    ``inputs``: token ids; ``targets``: the next token where it is an assistant token of
    the same example, else IGNORE; ``segments``: example index within the row (-1 on padding).
    """

    inputs: np.ndarray
    targets: np.ndarray
    segments: np.ndarray
    truncated: int = 0  # examples longer than a row, cut to fit

    def __len__(self) -> int:
        return len(self.inputs)


def pack_examples(examples: list[ChatTokens], seq_len: int, pad_id: int) -> PackedRows:
    """Pack examples into rows in order (first fit on the current row, then a new row).

    An example of n tokens takes n - 1 positions (inputs ids[:-1], targets ids[1:]);
    one longer than ``seq_len + 1`` tokens is truncated and counted.
    """
    rows: list[list[tuple[list[int], list[int]]]] = [[]]
    used, truncated = 0, 0
    for example in examples:
        ids, mask = example.ids[:seq_len + 1], example.mask[:seq_len + 1]
        truncated += len(example.ids) > seq_len + 1
        if len(ids) < 2:
            continue
        inputs = ids[:-1]
        targets = [token if learn else IGNORE for token, learn in zip(ids[1:], mask[1:])]
        if used + len(inputs) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append((inputs, targets))
        used += len(inputs)
    rows = [row for row in rows if row]
    shape = (len(rows), seq_len)
    out = PackedRows(np.full(shape, pad_id, np.int64), np.full(shape, IGNORE, np.int64),
                     np.full(shape, -1, np.int64), truncated)
    for r, row in enumerate(rows):
        at = 0
        for index, (inputs, targets) in enumerate(row):
            out.inputs[r, at:at + len(inputs)] = inputs
            out.targets[r, at:at + len(inputs)] = targets
            out.segments[r, at:at + len(inputs)] = index
            at += len(inputs)
    return out


def epoch_rows(seed: int, count: int, step: int, first: int, size: int, global_size: int) -> np.ndarray:
    """Indices (of ``count`` examples) of sequences first..first+size-1 of the global batch of ``step``:
    each epoch visits every example once, in an order drawn from (seed, epoch)."""
    index = step * global_size + first + np.arange(size)  # position in the endless stream of examples
    epoch, offset = np.divmod(index, count)
    return np.array([np.random.default_rng([seed, e]).permutation(count)[o] for e, o in zip(epoch, offset)])


@dataclass
class Seq2SeqRows:
    """Examples split for an encoder-decoder, numpy arrays padded to the longest: ``sources`` (N, S) and
    ``source_mask`` (1 at tokens), ``decoder_ids`` (N, T) what the decoder writes and ``targets`` the same
    ids where the loss counts them (assistant tokens), else IGNORE."""

    sources: np.ndarray
    source_mask: np.ndarray
    decoder_ids: np.ndarray
    targets: np.ndarray
    truncated: int = 0  # sources or targets longer than seq_len, cut (a source keeps its end)

    def __len__(self) -> int:
        return len(self.sources)


def split_examples(examples: list[ChatTokens], seq_len: int, pad_id: int) -> Seq2SeqRows:
    """Each example cut before its first assistant token: the source before, the target from there on."""
    pairs, truncated = [], 0
    for example in examples:
        if not any(example.mask):
            continue
        first = example.mask.index(True)
        source, target, learn = example.ids[:first], example.ids[first:], example.mask[first:]
        truncated += len(source) > seq_len or len(target) > seq_len
        source, target, learn = source[-seq_len:], target[:seq_len], learn[:seq_len]
        pairs.append((source or [pad_id], target, [t if m else IGNORE for t, m in zip(target, learn)]))
    if not pairs:
        return Seq2SeqRows(*(np.zeros((0, 1), np.int64) for _ in range(4)))
    source_len, target_len = max(len(p[0]) for p in pairs), max(len(p[1]) for p in pairs)
    rows = Seq2SeqRows(np.full((len(pairs), source_len), pad_id, np.int64), np.zeros((len(pairs), source_len), np.int64),
                       np.full((len(pairs), target_len), pad_id, np.int64),
                       np.full((len(pairs), target_len), IGNORE, np.int64), truncated)
    for row, (source, target, labels) in enumerate(pairs):
        rows.sources[row, :len(source)], rows.source_mask[row, :len(source)] = source, 1
        rows.decoder_ids[row, :len(target)], rows.targets[row, :len(target)] = target, labels
    return rows


class SFTStage:
    """Batches of packed rows and the answer-only loss, for :func:`lmforge.train.fit`.

    Batches depend only on (seed, step): each epoch visits every row once in an order
    drawn from the seed, so resume and data parallelism see the same sequences.
    """

    fields = ("inputs", "targets", "segments")  # the row arrays a batch holds

    def __init__(self, train: PackedRows | Seq2SeqRows, seed: int, val: PackedRows | Seq2SeqRows | None = None):
        if len(train) == 0:
            raise ValueError("no training examples after packing")
        self.train, self.val, self.seed = train, val, seed

    def rows_of(self, step: int, first: int, size: int, global_size: int) -> np.ndarray:
        return epoch_rows(self.seed, len(self.train), step, first, size, global_size)

    def batch(self, step: int, first: int, size: int, global_size: int, device: torch.device) -> dict:
        rows = self.rows_of(step, first, size, global_size)
        return {name: torch.from_numpy(getattr(self.train, name)[rows]).to(device) for name in self.fields}

    @staticmethod
    def hidden(model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """The final hidden states (B, T, dim) whose next tokens the targets are."""
        return model(batch["inputs"], segments=batch["segments"], return_hidden=True)

    @classmethod
    def loss(cls, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """Mean cross-entropy over the assistant tokens of the batch (0 when it has none), the output layer
        folded into the loss (lm_loss.token_loss)."""
        return token_loss(model, cls.hidden(model, batch), batch["targets"])

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, runtime: Runtime, max_tokens: int, batch_size: int) -> dict:
        """Answer-only validation loss over (up to ``max_tokens`` positions of) the validation rows."""
        if self.val is None or len(self.val) == 0:
            return {}
        was_training = model.training
        model.eval()
        count = max(1, min(len(self.val), max_tokens // getattr(self.val, self.fields[0]).shape[1]))
        total, tokens = 0.0, 0
        for first in range(0, count, batch_size):
            part = slice(first, min(count, first + batch_size))
            batch = {name: torch.from_numpy(getattr(self.val, name)[part]).to(runtime.device)
                     for name in self.fields}
            counted = int((batch["targets"] != IGNORE).sum())
            with runtime.autocast():
                total += token_loss(model, self.hidden(model, batch), batch["targets"]).item() * counted
            tokens += counted
        model.train(was_training)
        return {"val_loss": total / max(tokens, 1)}


class Seq2SeqSFTStage(SFTStage):
    """:class:`SFTStage` for an encoder-decoder: the encoder reads the source, the decoder is fed the target
    shifted right (teacher forcing), and the loss counts the assistant's tokens."""

    fields = ("sources", "source_mask", "decoder_ids", "targets")

    @staticmethod
    def hidden(model: torch.nn.Module, batch: dict) -> torch.Tensor:
        decoder_inputs = model.shift_right(batch["decoder_ids"], pad_id=0)  # (decoder_ids hold no IGNORE)
        return model(batch["sources"], decoder_inputs, batch["source_mask"], return_hidden=True)  # (B, T, dim)
