"""Generation with an encoder-decoder: encode the source once, then decode the target token by token.

Once the source is encoded, the decoder is a causal language model over target tokens
whose every layer also reads the fixed memory. :class:`ConditionedDecoder` presents it
so: ``forward(ids, cache) -> logits``, a cache with the decoder's layers (and the memory's
keys and values, computed on the first pass). The same sampling loop and beam search that
decode a decoder-only model (:mod:`lmforge.infer.generate`, :mod:`lmforge.infer.beam`)
then decode it, with every sampler, stop token and penalty they have; the target starts
from ``config.decoder_start_id``.

A model pretrained by span corruption has sentinel ids above its tokenizer's
(:mod:`lmforge.train.span`); :func:`encode_text` reads ``<extra_id_i>`` in a prompt as
sentinel i, and :func:`decode_text` writes sentinels back so, as T5's tokenizer does.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import torch
from torch import nn

from lmforge.infer.beam import BeamResult, beam_search
from lmforge.infer.generate import autocast_for, eval_mode, generate
from lmforge.infer.sampling import SamplingConfig
from lmforge.model.seq2seq import EncoderDecoderLM, Seq2SeqCache
from lmforge.runtime import Runtime


class ConditionedDecoder(nn.Module):
    """An encoder-decoder's decoder bound to encoded sources: a causal LM over target tokens.

    ``memory`` (B, S, dim) the encoder's output, ``attention_mask`` (B, S) its real tokens. Row i
    of every batch it decodes reads source i (beam search: one source, its rows the beams).
    """

    def __init__(self, model: EncoderDecoderLM, memory: torch.Tensor, attention_mask: torch.Tensor | None):
        super().__init__()
        self.model, self.config = model, model.config
        self.training = model.training  # the model's mode: decoding switches it (and back) only when training
        self.memory, self.attention_mask = memory, attention_mask

    def new_cache(self, batch_size: int, max_len: int | None = None) -> Seq2SeqCache:
        return self.model.new_cache(batch_size, max_len)

    def forward(self, input_ids: torch.Tensor, cache: Seq2SeqCache | None = None) -> torch.Tensor:
        """Target ids (B, T) -> logits (B, T, V); without a cache the whole target is recomputed (the reference)."""
        return self.model.decode(input_ids, self.memory, self.attention_mask, cache)


class SlotDecoder(nn.Module):
    """An encoder-decoder as the batched engine's model (:class:`lmforge.infer.engine.Engine`).

    The engine runs it as it runs a decoder-only model: its "prompt" is the decoder's start token,
    its KV cache the engine's slot cache (the decoder's self-attention), its passes the packed and
    decode passes. Each slot also holds the memory of its request's source: :meth:`encode` runs the
    encoder once when the request takes the slot and keeps every decoder layer's cross-attention
    keys and values (num_slots, Hkv, S, D) with the source's mask. A decode step's row i reads slot
    i's memory; in a packed pass each token reads its own slot's (``cache.slot_index``).
    Relative positions (T5) become float masks: the engine's boolean masks with each (query, key)
    pair's bias added, as the decoder stack builds them for one sequence.

    A compiled decode step reads no Python state of its rows: the engine passes the rows' memory
    mask (:meth:`decode_memory_mask`), whose width says how many memory columns they read. So a
    compiled decode step (:class:`lmforge.infer.compiled.CompiledDecodeStep`) serves sources of
    every length with one graph per batch size; the packed passes run eagerly.
    """

    def __init__(self, model: EncoderDecoderLM, num_slots: int):
        super().__init__()
        c = model.config
        self.model, self.stack = model, model.decoder
        self.training = model.training  # the model's mode (the engine switches it per step only when training)
        # what the engine and its slot cache read of a model's shape: the decoder's layers
        self.config = SimpleNamespace(num_layers=c.decoder_layers, max_seq_len=c.max_seq_len, causal=True,
                                      vocab_size=c.vocab_size, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                                      is_encoder_decoder=True)
        param = next(model.parameters())
        shape = (num_slots, c.num_kv_heads, c.max_seq_len, c.head_dim)
        self.memory = [(torch.zeros(shape, dtype=param.dtype, device=param.device),
                        torch.zeros(shape, dtype=param.dtype, device=param.device)) for _ in range(c.decoder_layers)]
        self.memory_mask = torch.zeros(num_slots, c.max_seq_len, dtype=torch.bool, device=param.device)
        self.memory_mask[:, 0] = True  # a slot with no source yet (a padding row) reads one zero column, not NaN
        self.source_lengths = [1] * num_slots  # each slot's real memory columns (the mask's True ones)
        # the position of the token whose keys sit at each cache index (scored branches sit past the prompt)
        self.key_positions = torch.zeros(num_slots, c.max_seq_len + 1, dtype=torch.long, device=param.device)

    def encode(self, slots: list[int], sources: list[list[int]]) -> None:
        """Encode ``sources`` together (right-padded) into the memory of ``slots``: every decoder layer's
        cross-attention keys and values, and which columns are real."""
        memory, mask = encode_sources(self.model, sources)
        for (keys, values), (k, v) in zip(self.memory, self.model.memory_keys_values(memory)):
            for row, (slot, source) in enumerate(zip(slots, sources)):
                keys[slot, :, :len(source)], values[slot, :, :len(source)] = k[row, :, :len(source)], v[row, :, :len(source)]
        for slot, source in zip(slots, sources):
            self.memory_mask[slot] = False
            self.memory_mask[slot, :len(source)] = True
            self.source_lengths[slot] = len(source)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden)

    def decode_memory_mask(self, rows: int, for_compiler: bool = False) -> torch.Tensor | None:
        """The memory mask of a decode step over slots 0..rows-1: (rows, 1, 1, W), True at each row's real
        source columns, W the longest source among them; None when every row's source has W tokens (an
        eager step then attends without a mask, 1-3% faster). ``for_compiler``: always a mask, at least
        2 wide (a compiler would make a width of 1 a constant, and its first step may be all padding)."""
        lengths = self.source_lengths[:rows]
        if not for_compiler and min(lengths) == max(lengths):
            return None
        width = min(max([2, *lengths]), self.memory_mask.shape[1])
        return self.memory_mask[:rows, :width][:, None, None, :]

    def _bias(self, mask: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor | slice) -> torch.Tensor:
        """A boolean mask (B, 1, T, Tk) as the float mask of relative positions: each query at ``positions``
        (B, T) over the keys at cache indices 0..Tk-1 of ``slots`` gets its bias (B, H, T, Tk), -inf where
        the mask hides the key."""
        relative = self.stack.relative
        keys = self.key_positions[slots, :mask.shape[-1]]  # (B, Tk)
        buckets = relative.buckets[positions[..., None], keys[:, None, :]]  # (B, T, Tk), the stack's (query, key) table
        bias = relative.embed(buckets).permute(0, 3, 1, 2)  # (B, H, T, Tk)
        return bias.masked_fill(~mask, float("-inf"))

    def forward(self, input_ids: torch.Tensor, cache, return_hidden: bool = False,
                positions: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The engine's pass: input_ids and positions (B, T) with a slot cache bound to them; a decode step's
        ``mask`` (B, 1, T, Tk) and ``memory_mask`` (:meth:`decode_memory_mask`); a packed pass keeps its
        masks in the cache and reads its slots' memory masks itself."""
        stack, batch = self.stack, input_ids.shape[0]
        x, rotary = stack.place(self.model.embed(input_ids), positions=positions)
        if stack.relative is not None:  # each new key's position, which the relative biases read
            self.key_positions[cache.slot_index, cache.write_index] = positions.reshape(cache.write_index.shape)
        if cache.attends:  # packed: each token reads its slot's memory
            pick = cache.slot_index
            if stack.relative is not None:
                if cache.decode_mask is not None:
                    cache.decode_mask = self._bias(cache.decode_mask, positions[0, :cache.decode_rows, None],
                                                   slice(0, cache.decode_rows))
                for prompts in cache.prompts:
                    prompts.mask = self._bias(prompts.mask, positions[0, prompts.rows], prompts.slots)
            lengths = [self.source_lengths[i] for i in pick.tolist()]
            width = max(lengths)  # the longest source among the tokens' slots; sources of one length need no mask
            memory_mask = None if min(lengths) == width else self.memory_mask[pick, :width][:, None, None, :]
        else:  # a decode step: row i is slot i (a slice: no copy of the memory)
            pick = slice(0, batch)
            # the mask's width, or without one (eager: every row's source is as long) the rows' length
            width = memory_mask.shape[-1] if memory_mask is not None else self.source_lengths[0]
            if stack.relative is not None:
                mask = self._bias(mask, positions, pick)
        for block, (keys, values) in zip(stack.blocks, self.memory):
            x = block(x, cache, rotary, mask, (keys[pick, :, :width], values[pick, :, :width]), memory_mask)
        x = stack.norm(x)
        return x if return_hidden else self.logits(x)


def encode_sources(model: EncoderDecoderLM, sources: list[list[int]], runtime: Runtime | None = None,
                   pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``sources`` into one batch and encode it: (memory (B, S, dim), attention_mask (B, S))."""
    for row, source in enumerate(sources):
        if not source:
            raise ValueError(f"source {row} is empty: give at least one token")
        if len(source) > model.config.max_seq_len:
            raise ValueError(f"source {row} has {len(source)} tokens; the model reads at most "
                             f"max_seq_len={model.config.max_seq_len}")
    device = next(model.parameters()).device
    longest = max(len(s) for s in sources)
    ids = torch.full((len(sources), longest), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(len(sources), longest, dtype=torch.long, device=device)
    for row, source in enumerate(sources):
        ids[row, :len(source)] = torch.tensor(source, device=device)
        mask[row, :len(source)] = 1
    with torch.inference_mode(), autocast_for(model, runtime), eval_mode(model):
        return model.encode(ids, mask), mask


def generate_seq2seq(model: EncoderDecoderLM, sources: list[list[int]], config: SamplingConfig,
                     runtime: Runtime | None = None, use_cache: bool = True) -> list[list[int]]:
    """The target tokens written for each source (decoder start and stop token not included).

    Greedy, sampled (temperature, top-k, top-p, penalties) or, with ``config.num_beams > 1``,
    beam search, exactly as :func:`lmforge.infer.generate.generate` decodes a decoder-only model.
    The sources are encoded together (padded); each row's target equals decoding it alone.
    """
    start = [model.config.decoder_start_id]
    if config.num_beams > 1:
        return [beam_search_seq2seq(model, source, config, runtime).tokens for source in sources]
    memory, mask = encode_sources(model, sources, runtime)
    decoder = ConditionedDecoder(model, memory, mask)
    return generate(decoder, [start] * len(sources), config, runtime, use_cache)


def beam_search_seq2seq(model: EncoderDecoderLM, source: list[int], config: SamplingConfig,
                        runtime: Runtime | None = None) -> BeamResult:
    """Beam search for one source (its memory's keys and values follow the beams in the cache)."""
    memory, mask = encode_sources(model, [source], runtime)
    return beam_search(ConditionedDecoder(model, memory, mask), [model.config.decoder_start_id], config, runtime)


SENTINEL = re.compile(r"<extra_id_(\d+)>")


def sentinels_above(tokenizer, model: EncoderDecoderLM) -> int:
    """How many sentinel ids the model has above an lmforge tokenizer's vocabulary (0 when none). An imported
    model's tokenizer (T5's) holds its own ``<extra_id_i>`` tokens, and ids past it are only padding."""
    from lmforge.tokenizer.pretrained import PretrainedTokenizer

    if isinstance(tokenizer, PretrainedTokenizer):
        return 0
    size = getattr(tokenizer, "vocab_size", None)
    return max(model.config.vocab_size - size, 0) if isinstance(size, int) else 0


def encode_text(tokenizer, model: EncoderDecoderLM, text: str) -> list[int]:
    """Token ids of ``text``, each ``<extra_id_i>`` as sentinel i (id ``vocab_size - 1 - i``) where the model
    has sentinels above its tokenizer's ids."""
    count = sentinels_above(tokenizer, model)
    if not count:
        return tokenizer.encode(text)
    ids: list[int] = []
    for index, part in enumerate(SENTINEL.split(text)):
        if index % 2:  # a sentinel's number
            if int(part) >= count:
                raise ValueError(f"<extra_id_{part}>: the model has sentinels 0..{count - 1}")
            ids.append(model.config.vocab_size - 1 - int(part))
        elif part:
            ids.extend(tokenizer.encode(part))
    return ids


def decode_text(tokenizer, model: EncoderDecoderLM, ids: list[int], decode) -> str:
    """Text of ``ids`` (``decode`` turns runs of the tokenizer's own ids into text), sentinels written
    ``<extra_id_i>``."""
    size = model.config.vocab_size - sentinels_above(tokenizer, model)
    pieces, run = [], []
    for token in ids:
        if token >= size:
            pieces.append(decode(run) + f"<extra_id_{model.config.vocab_size - 1 - token}>")
            run = []
        else:
            run.append(token)
    return "".join(pieces) + decode(run)
