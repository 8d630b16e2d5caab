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
  slot; the decode rows attend over slots 0..B-1, and the prompts, gathered into padded
  batches (:class:`Prompts`), each over its own slot's keys with its own mask: one
  attention call per batch, not per prompt. Bound for a compiler, all prompts form one
  batch and the pass is only tensors: one compiled graph serves every packed pass
  (:meth:`CompiledDecodeStep.packed`).

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

from lmforge.model.attention import GROUPED_QUERIES

ZERO_AHEAD = 64  # positions zeroed at a time


@dataclass
class Segment:
    """One slot's new tokens in a packed pass, as the engine describes them: tokens ``[start, stop)``
    of the pass, stored in slot ``slot``; they attend over its first ``mask.shape[-1]`` keys where
    ``mask`` (T, keys) allows."""

    slot: int
    start: int
    stop: int
    mask: torch.Tensor


@dataclass
class Prompts:
    """A packed pass's segments as one padded batch (what :meth:`SlotKVCache.attend` reads): S segments
    of at most T tokens. ``slots`` (S,) each one's slot; ``rows`` (S, T) which token of the pass each
    query is; ``mask`` (S, 1, T, Tk) the keys of its slot each query sees. A segment's rows past its
    last token repeat token 0 and see key 0 only (finite, and never read)."""

    slots: torch.Tensor
    rows: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def pack(cls, segments: list[Segment], device: torch.device, for_compiler: bool = False) -> Prompts:
        # For a compiler every size is at least 2 (a segment of padding rows, a padding row, a masked key
        # where needed), since it makes sizes 0 and 1 constants, and more than GROUPED_QUERIES rows, since
        # the backend picks its kernel by the rows: one graph then serves every pass.
        least = 2 if for_compiler else 1
        count = max(len(segments), least)
        width = max(GROUPED_QUERIES + 1 if for_compiler else 1, *(s.stop - s.start for s in segments))
        seen = max(least, *(s.mask.shape[-1] for s in segments))
        rows = torch.zeros(count, width, dtype=torch.long)
        mask = torch.zeros(count, 1, width, seen, dtype=torch.bool)
        mask[..., 0] = True
        for i, segment in enumerate(segments):
            n, keys = segment.stop - segment.start, segment.mask.shape[-1]
            rows[i, :n] = torch.arange(segment.start, segment.stop)
            mask[i, 0, :n, 0] = False
            mask[i, 0, :n, :keys] = segment.mask
        slots = torch.tensor([s.slot for s in segments] + [0] * (count - len(segments)))
        return cls(slots.to(device), rows.to(device), mask.to(device))

    def mark_dynamic(self) -> None:
        """Tell a compiler that every size here changes from pass to pass."""
        for tensor, dims in ((self.slots, (0,)), (self.rows, (0, 1)), (self.mask, (0, 2, 3))):
            for dim in dims:
                torch._dynamo.maybe_mark_dynamic(tensor, dim)


# Small batches of prompts go together whatever their padding: a separate attention call costs about
# what this many (query, key) pairs do (SmolLM2's shapes on 2 cores: ~45 us a call, ~0.02 us a pair).
PAIRS_PER_CALL = 2048


def _batches(segments: list[Segment]) -> list[list[Segment]]:
    """Segments in padded batches, largest first: a segment joins the current batch unless the padded
    batch would do more than 1.5 times its segments' own (query, key) pairs (plus one call's worth)."""
    def pairs(segment: Segment) -> int:
        return (segment.stop - segment.start) * segment.mask.shape[-1]

    batches: list[list[Segment]] = []
    for segment in sorted(segments, key=pairs, reverse=True):
        if batches:
            batch = batches[-1] + [segment]
            width = max(s.stop - s.start for s in batch)
            padded = len(batch) * width * max(s.mask.shape[-1] for s in batch)
            if padded <= 1.5 * sum(map(pairs, batch)) + PAIRS_PER_CALL:
                batches[-1] = batch
                continue
        batches.append([segment])
    return batches


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
        self.decode_mask, self.prompts, self.order = None, [], None

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
                    segments: list[Segment], for_compiler: bool = False) -> None:
        """Prepare a packed pass of N tokens: token i's keys go to slot ``slot_index[i]`` at
        ``write_index[i]`` (N,). With ``decode_mask`` (B, 1, 1, Tk), the first B tokens are a decode
        step over slots 0..B-1 (one token each, padding rows included); ``segments`` follow them.
        Tokens in neither (padding) write where ``write_index`` says and their outputs are not read.

        The segments attend in padded batches (:class:`Prompts`): few, and none where padding adds more
        than half to the attention's work (a long prompt and short ones go apart). ``for_compiler``:
        all in one batch whose sizes take the same branches in every pass (:meth:`Prompts.pack`)."""
        decode_keys = 0 if decode_mask is None else decode_mask.shape[-1]
        kv_len = max([decode_keys] + [s.mask.shape[-1] for s in segments])
        if kv_len > self.context:
            raise ValueError(f"KV slot is full: {kv_len} positions needed, context is {self.context}")
        self._zero_up_to(kv_len)
        self.slot_index, self.write_index, self.decode_mask = slot_index, write_index, decode_mask
        groups = [segments] if for_compiler else _batches(segments)
        self.prompts = [Prompts.pack(group, self.device, for_compiler) for group in groups if group]
        # the attention's output rows: the decode rows (B), then each batch's S x T rows
        order = torch.zeros(len(slot_index), dtype=torch.long)
        order[:self.decode_rows] = torch.arange(self.decode_rows)
        start = self.decode_rows
        for group, prompts in zip(groups, self.prompts):
            width = prompts.rows.shape[1]
            for i, segment in enumerate(group):
                first = start + i * width
                order[segment.start:segment.stop] = torch.arange(first, first + segment.stop - segment.start)
            start += prompts.rows.numel()
        self.order = order.to(self.device)
        self.attends = True

    @property
    def decode_rows(self) -> int:
        """The packed pass's decode rows B (its first B tokens), 0 without; symbolic when compiled."""
        return 0 if self.decode_mask is None else self.decode_mask.shape[0]

    def mark_dynamic(self) -> None:
        """Tell a compiler that every size of the bound packed pass changes from pass to pass: its
        tokens, decode rows, keys read, and each batch of prompts."""
        mark = torch._dynamo.maybe_mark_dynamic
        for tensor in (self.slot_index, self.write_index, self.order):
            mark(tensor, 0)
        if self.decode_mask is not None:
            mark(self.decode_mask, 0)
            mark(self.decode_mask, 3)
        for prompts in self.prompts:
            prompts.mark_dynamic()

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
        """A packed pass's attention: store k, v (1, Hkv, N, D) in their slots, then the decode rows attend
        over slots 0..B-1 and the new prompts, in padded batches, each over its own slot's keys; q (1, H,
        N, D) -> (1, H, N, D). ``attention`` is the model's backend (``q, k, v, dropout, training, mask``).
        One call for the decode rows and one per batch of prompts, not one per prompt; bound for a
        compiler (one batch) the pass is only tensors, one graph."""
        keys, values = self.keys[layer], self.values[layer]
        if k.dtype != keys.dtype:
            k, v = k.to(keys.dtype), v.to(values.dtype)
        keys[self.slot_index, :, self.write_index] = k[0].transpose(0, 1)  # target (N, Hkv, D)
        values[self.slot_index, :, self.write_index] = v[0].transpose(0, 1)
        parts = []
        if self.decode_mask is not None:  # one query per slot 0..B-1: the decode step's attention
            rows, seen = self.decode_rows, self.decode_mask.shape[-1]
            out = attention(q[0, :, :rows, None].transpose(0, 1), keys[:rows, :, :seen], values[:rows, :, :seen],
                            0.0, False, self.decode_mask)  # (B, H, 1, D)
            parts.append(out[:, :, 0])  # (B, H, D)
        for prompts in self.prompts:
            seen, (count, width) = prompts.mask.shape[-1], prompts.rows.shape
            out = attention(q[0][:, prompts.rows].transpose(0, 1), keys[prompts.slots, :, :seen],
                            values[prompts.slots, :, :seen], 0.0, False, prompts.mask)  # (S, H, T, D)
            parts.append(out.transpose(1, 2).reshape(count * width, q.shape[1], q.shape[3]))
        return torch.cat(parts)[self.order].transpose(0, 1)[None]  # each token's row, in the pass's order

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
