"""The masked-language-model stage (BERT): hide some tokens, predict them from both sides.

Each sequence is a window of the packed token stream framed as BERT frames a text,
``[CLS] tokens [SEP]`` (lmforge's begin- and end-of-text tokens play those parts). Of
its positions, 15% are chosen (special tokens never); of the chosen, 80% are replaced
by the mask token, 10% by a random token and 10% kept as they are, so the model cannot
tell which visible tokens it will be asked about. The loss is the cross entropy on the
chosen positions only (Devlin et al., 2019, arXiv:1810.04805, section 3.1).

With next-sentence prediction (``nsp=True``) a sequence is a pair ``[CLS] A [SEP] B
[SEP]``, segment ids 0 for A and 1 for B: half of the time B is the text that follows A,
half of the time a window from elsewhere; the ``mlm+nsp`` head's classifier on the
pooled first token learns which, and its cross entropy is added to the masked-LM loss.

As in every stage, a batch depends only on (seed, step): masks are drawn per global
batch, so a resumed or data-parallel run sees the same masked sequences.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.runtime import Runtime
from lmforge.tokenizer.special import BEGIN_OF_TEXT, END_OF_TEXT, MASK, NUM_SPECIAL, SPECIAL_IDS
from lmforge.train.metrics import RecordsFigures

IGNORE = -100  # target of a position that is not scored
CLS, SEP, MASK_ID = SPECIAL_IDS[BEGIN_OF_TEXT], SPECIAL_IDS[END_OF_TEXT], SPECIAL_IDS[MASK]


def mask_tokens(ids: np.ndarray, rng: np.random.Generator, vocab_size: int, rate: float = 0.15
                ) -> tuple[np.ndarray, np.ndarray]:
    """BERT's corruption of token ids (B, T): (inputs, targets). ``rate`` of the non-special positions
    are chosen; of those 80% become the mask token, 10% a random non-special token, 10% stay.
    ``targets`` holds the original id at chosen positions and :data:`IGNORE` elsewhere."""
    candidates = ids >= NUM_SPECIAL  # special tokens ([CLS], [SEP], padding, ...) are never chosen
    chosen = candidates & (rng.random(ids.shape) < rate)
    action = rng.random(ids.shape)
    inputs = ids.copy()
    inputs[chosen & (action < 0.8)] = MASK_ID
    randomized = chosen & (action >= 0.8) & (action < 0.9)
    inputs[randomized] = rng.integers(NUM_SPECIAL, vocab_size, size=int(randomized.sum()))
    targets = np.where(chosen, ids, IGNORE)
    return inputs, targets


class MaskedLMStage(RecordsFigures):
    """Masked-language-model pretraining (and optionally next-sentence prediction) over a token array.

    ``tokens``: 1-D array of token ids (a shard); ``vocab_size``: where random replacements are
    drawn from (the tokenizer's size); ``seq_len``: tokens per sequence, the framing included.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, vocab_size: int,
                 val_tokens: np.ndarray | None = None, nsp: bool = False, rate: float = 0.15):
        if seq_len < 8:
            raise ValueError(f"seq_len must be at least 8 for masked-LM sequences, got {seq_len}")
        if len(tokens) < 2 * seq_len:
            raise ValueError(f"training data has {len(tokens)} tokens, fewer than two sequences of {seq_len}")
        if not 0.0 < rate < 1.0:
            raise ValueError(f"the masking rate must be in (0, 1), got {rate}")
        self.tokens, self.val_tokens, self.seq_len, self.seed = tokens, val_tokens, seq_len, seed
        self.vocab_size, self.nsp, self.rate = vocab_size, nsp, rate

    # ---- sequences ------------------------------------------------------------------------

    def sequences(self, tokens: np.ndarray, rng: np.random.Generator, count: int) -> tuple[np.ndarray, ...]:
        """``count`` framed sequences drawn from ``tokens``: (ids, token_types, is_random_next), each (count, T)
        or (count,)."""
        text = self.seq_len - (3 if self.nsp else 2)  # room left by [CLS], [SEP] (and the second [SEP])
        ids = np.zeros((count, self.seq_len), dtype=np.int64)
        types = np.zeros((count, self.seq_len), dtype=np.int64)
        random_next = np.zeros(count, dtype=np.int64)
        starts = rng.integers(0, len(tokens) - text, size=count)
        if not self.nsp:
            for row, start in enumerate(starts):
                ids[row] = [CLS, *tokens[start:start + text], SEP]
            return ids, types, random_next
        split = rng.integers(text // 4, 3 * text // 4 + 1, size=count)  # where A ends
        random_next = (rng.random(count) < 0.5).astype(np.int64)
        elsewhere = rng.integers(0, len(tokens) - text, size=count)
        for row in range(count):
            a_len, b_len = int(split[row]), text - int(split[row])
            a = tokens[starts[row]:starts[row] + a_len]
            b_start = elsewhere[row] if random_next[row] else starts[row] + a_len
            b = tokens[b_start:b_start + b_len]
            ids[row] = [CLS, *a, SEP, *b, SEP]
            types[row, a_len + 2:] = 1
        return ids, types, random_next

    def batch(self, step: int, first: int, size: int, global_size: int, device: torch.device) -> dict:
        """Sequences first .. first+size-1 of the global batch of ``step``, masked."""
        rng = np.random.default_rng([self.seed, step])
        ids, types, random_next = self.sequences(self.tokens, rng, global_size)
        inputs, targets = mask_tokens(ids, rng, self.vocab_size, self.rate)
        part = slice(first, first + size)
        return {"input_ids": torch.from_numpy(inputs[part]).to(device),
                "targets": torch.from_numpy(targets[part]).to(device),
                "token_types": torch.from_numpy(types[part]).to(device),
                "random_next": torch.from_numpy(random_next[part]).to(device)}

    # ---- loss -----------------------------------------------------------------------------

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """Masked-token cross entropy on the chosen positions (+ next-sentence cross entropy)."""
        token_types = batch["token_types"] if model.config.type_vocab_size else None
        hidden = model(batch["input_ids"], token_types=token_types, return_hidden=True)  # (B, T, dim)
        chosen = batch["targets"] != IGNORE
        logits = model.logits(hidden[chosen]).float()  # only the chosen positions go through the output layer
        loss = F.cross_entropy(logits, batch["targets"][chosen])
        self.record({"mlm_loss": loss.item(),
                     "mlm_accuracy": (logits.argmax(-1) == batch["targets"][chosen]).float().mean().item()})
        if self.nsp:
            nsp_logits = model.next_sentence_logits(hidden).float()
            nsp_loss = F.cross_entropy(nsp_logits, batch["random_next"])
            self.record({"nsp_loss": nsp_loss.item(),
                         "nsp_accuracy": (nsp_logits.argmax(-1) == batch["random_next"]).float().mean().item()})
            loss = loss + nsp_loss
        return loss

    # ---- validation -----------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, runtime: Runtime, max_tokens: int, batch_size: int) -> dict:
        """Masked-token loss and accuracy on validation sequences masked with a fixed seed (the same
        sequences and masks at every evaluation), and next-sentence accuracy with NSP."""
        if self.val_tokens is None or len(self.val_tokens) < 2 * self.seq_len:
            return {}
        was_training = model.training
        model.eval()
        rng = np.random.default_rng([self.seed, 2**31 - 1])
        count = max(1, max_tokens // self.seq_len)
        ids, types, random_next = self.sequences(self.val_tokens, rng, count)
        inputs, targets = mask_tokens(ids, rng, self.vocab_size, self.rate)
        total_loss = total_right = total = nsp_right = 0.0
        for first in range(0, count, batch_size):
            part = slice(first, first + batch_size)
            x = torch.from_numpy(inputs[part]).to(runtime.device)
            y = torch.from_numpy(targets[part]).to(runtime.device)
            t = torch.from_numpy(types[part]).to(runtime.device) if model.config.type_vocab_size else None
            with runtime.autocast():
                hidden = model(x, token_types=t, return_hidden=True)
                chosen = y != IGNORE
                logits = model.logits(hidden[chosen]).float()
            total_loss += F.cross_entropy(logits, y[chosen], reduction="sum").item()
            total_right += (logits.argmax(-1) == y[chosen]).sum().item()
            total += int(chosen.sum())
            if self.nsp:
                with runtime.autocast():
                    guess = model.next_sentence_logits(hidden).argmax(-1).cpu().numpy()
                nsp_right += (guess == random_next[part]).sum()
        model.train(was_training)
        out = {"val_loss": total_loss / max(total, 1), "val_mlm_accuracy": total_right / max(total, 1)}
        if self.nsp:
            out["val_nsp_accuracy"] = float(nsp_right / count)
        return out
