"""The KV cache of the batched engine: one slot per sequence, each with its own length.

Layout. Every layer keeps keys and values in one tensor of shape
(num_slots, Hkv, context + 1, D). Slot ``s`` holds one sequence; the keys of its token at
position ``p`` sit at index ``p``, so a position is also a cache index and a row's
attention mask is simply "key index <= my position". This is llama.cpp's slot layout,
not vLLM's paged one: it wastes the unused tail of each slot, but needs no block table,
keeps every slot's keys contiguous for the attention kernel, and lets one compiled graph
serve any mix of lengths.

Two kinds of forward pass:

- **A decode step** works on slots ``0 .. B-1`` (B a bucketed batch size; slots in that
  range without a running request are padding rows), one token each. The engine calls
  :meth:`bind` with where each new token's keys go; the model then calls :meth:`update`
  once per layer (the same contract as :class:`KVCache`) and attends with the engine's
  mask. Fixed shapes: this is the pass a compiled step runs.
- **A packed pass** (:meth:`bind_packed`) carries new prompts, and optionally a decode
  step's rows, as one sequence of tokens (1, N) with no padding between them: the
  products see N real tokens, where right-padding every prompt to the longest would
  compute up to rows x longest. The cache then does the attention itself
  (:meth:`attend`, since ``attends`` is true): it stores each token's keys in its own
  slot, and each prompt attends over its own slot's keys with its own mask.

Padding rows write to the extra index ``context`` (a scratch column nobody reads) and
attend only to key 0, so they never disturb a slot's contents and never produce NaNs.

Memory is zeroed lazily up to the furthest index used so far: a slot is read up to the
longest running row, and never-written entries must be finite (a masked score gives
weight 0, but 0 * NaN is NaN).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

ZERO_AHEAD = 64  # positions zeroed at a time


@dataclass
class Segment:
    """One slot's new tokens in a packed pass: tokens ``[start, stop)`` of the pass, stored in slot
    ``slot``; they attend over its first ``mask.shape[-1]`` keys where ``mask`` (1, 1, T, keys) allows."""

    slot: int
    start: int
    stop: int
    mask: torch.Tensor


class SlotKVCache:
    def __init__(self, num_layers: int, num_slots: int, context: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (num_slots, num_kv_heads, context + 1, head_dim)  # +1: the padding rows' scratch column
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_slots, self.context, self.scratch = num_slots, context, context
        self._zeroed = 0  # indices [0, _zeroed) of every slot hold finite values
        # where the current forward pass reads and writes (set by bind)
        self.rows, self.kv_len = 0, 0
        self.write_index = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.attends = False  # True while bound to a packed pass: the model calls attend, not update
        self.decode_rows, self.decode_mask, self.segments = 0, None, []

    @classmethod
    def for_model(cls, model, num_slots: int, context: int | None = None,
                  dtype: torch.dtype | None = None) -> SlotKVCache:
        config = model.config
        param = next(model.parameters())
        return cls(config.num_layers, num_slots, context or config.max_seq_len, config.num_kv_heads,
                   config.head_dim, dtype or param.dtype, param.device)

    @property
    def device(self) -> torch.device:
        return self.keys[0].device

    def bytes_per_slot(self) -> int:
        return sum(k[0].numel() * k.element_size() for k in self.keys + self.values)

    def bind(self, write_index: torch.Tensor, kv_len: int) -> None:
        """Prepare a forward pass over slots ``0 .. B-1`` (a decode step).

        write_index (B, T): the cache index of each new token's keys (its position, or
        :attr:`scratch` for a padding row). ``kv_len``: how many leading indices the
        attention reads (the longest row's length after this pass).
        """
        if kv_len > self.context:
            raise ValueError(f"KV slot is full: {kv_len} positions needed, context is {self.context}")
        self._zero_up_to(kv_len)
        self.rows, self.kv_len = write_index.shape[0], kv_len
        self.write_index = write_index
        self.slot_index = torch.arange(self.rows, device=write_index.device)[:, None]  # (B, 1)
        self.attends = False

    def bind_packed(self, slot_index: torch.Tensor, write_index: torch.Tensor, decode_mask: torch.Tensor | None,
                    segments: list[Segment]) -> None:
        """Prepare a packed pass of N tokens: token i's keys go to slot ``slot_index[i]`` at
        ``write_index[i]`` (N,). With ``decode_mask`` (B, 1, 1, Tk), the first B tokens are a decode
        step over slots 0..B-1 (one token each, padding rows included); ``segments`` follow them."""
        decode_keys = 0 if decode_mask is None else decode_mask.shape[-1]
        kv_len = max([decode_keys] + [s.mask.shape[-1] for s in segments])
        if kv_len > self.context:
            raise ValueError(f"KV slot is full: {kv_len} positions needed, context is {self.context}")
        self._zero_up_to(kv_len)
        self.slot_index, self.write_index = slot_index, write_index
        self.decode_rows = 0 if decode_mask is None else decode_mask.shape[0]
        self.decode_mask, self.segments, self.attends = decode_mask, segments, True

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, Hkv, T, D) at each row's write indices; return (B, Hkv, kv_len, D) views."""
        keys, values = self.keys[layer], self.values[layer]
        if k.dtype != keys.dtype:  # under autocast they may come in a lower precision than the cache keeps
            k, v = k.to(keys.dtype), v.to(values.dtype)
        # Advanced indices on dims 0 and 2 (slot (B, 1), index (B, T)) put their (B, T) shape first:
        # the target is (B, T, Hkv, D).
        keys[self.slot_index, :, self.write_index] = k.transpose(1, 2)
        values[self.slot_index, :, self.write_index] = v.transpose(1, 2)
        return keys[:self.rows, :, :self.kv_len], values[:self.rows, :, :self.kv_len]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               attention: Callable[..., torch.Tensor]) -> torch.Tensor:
        """A packed pass's attention: store k, v (1, Hkv, N, D) in their slots, then each part of the
        pass attends over its own slots' keys; q (1, H, N, D) -> (1, H, N, D). ``attention`` is the
        model's backend (``q, k, v, dropout, training, mask``)."""
        keys, values = self.keys[layer], self.values[layer]
        if k.dtype != keys.dtype:
            k, v = k.to(keys.dtype), v.to(values.dtype)
        keys[self.slot_index, :, self.write_index] = k[0].transpose(0, 1)  # target (N, Hkv, D)
        values[self.slot_index, :, self.write_index] = v[0].transpose(0, 1)
        parts, rows = [], self.decode_rows
        if rows:  # one query per slot 0..B-1: the decode step's attention
            seen = self.decode_mask.shape[-1]
            out = attention(q[0, :, :rows, None].transpose(0, 1), keys[:rows, :, :seen], values[:rows, :, :seen],
                            0.0, False, self.decode_mask)  # (B, H, 1, D)
            parts.append(out[:, :, 0].transpose(0, 1))  # (H, B, D)
        for segment in self.segments:
            seen, s = segment.mask.shape[-1], segment.slot
            out = attention(q[:, :, segment.start:segment.stop], keys[s:s + 1, :, :seen], values[s:s + 1, :, :seen],
                            0.0, False, segment.mask)  # (1, H, T, D)
            parts.append(out[0])
        return torch.cat(parts, dim=1)[None]

    def advance(self, num_tokens: int) -> None:
        """Part of the cache contract; lengths live with the engine's slots, so nothing to do."""

    def copy_prefix(self, source: int, target: int, length: int) -> None:
        """Copy the first ``length`` positions of slot ``source`` into slot ``target`` (prefix reuse)."""
        for tensors in (self.keys, self.values):
            for t in tensors:
                t[target, :, :length] = t[source, :, :length]

    def _zero_up_to(self, length: int) -> None:
        if length > self._zeroed:  # (the scratch column is written, never read: it may hold anything)
            length = min(max(length, self._zeroed + ZERO_AHEAD), self.context)  # not one column per decode step
            for t in self.keys + self.values:
                t[:, :, self._zeroed:length] = 0
            self._zeroed = length


# A decode step reads its keys in whole blocks of this many. The fused attention's rounding depends on
# how many keys it is given, even masked ones (measured: docs/QUANTIZATION.md), so a row given the same
# count, the same keys and the same mask comes out the same, to the bit, in every pass.
KEY_BLOCK = 16


def key_count(needed: int, context: int) -> int:
    """How many leading cache indices a decode step reads when its rows need ``needed``: rounded up to
    a whole :data:`KEY_BLOCK` (the extra ones masked), at most ``context``."""
    return min(-(-needed // KEY_BLOCK) * KEY_BLOCK, context)


def block_room(position: int) -> int:
    """How many more tokens a step may hold after a row's token at ``position`` without its tokens
    spanning two key blocks (which would give them other key counts than one-token steps give)."""
    return KEY_BLOCK - 1 - position % KEY_BLOCK


def attention_mask(positions: torch.Tensor, kv_len: int) -> torch.Tensor:
    """(B, 1, T, kv_len) boolean mask: a token at position p sees cache indices 0..p.

    positions (B, T). Causal within a prefill and ragged across rows, because a
    position is a cache index in the slot layout.
    """
    keys = torch.arange(kv_len, device=positions.device)
    return (keys[None, None, :] <= positions[:, :, None])[:, None]
