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
        self.memory, self.attention_mask = memory, attention_mask

    def new_cache(self, batch_size: int, max_len: int | None = None) -> Seq2SeqCache:
        return self.model.new_cache(batch_size, max_len)

    def forward(self, input_ids: torch.Tensor, cache: Seq2SeqCache | None = None) -> torch.Tensor:
        """Target ids (B, T) -> logits (B, T, V); without a cache the whole target is recomputed (the reference)."""
        return self.model.decode(input_ids, self.memory, self.attention_mask, cache)


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
