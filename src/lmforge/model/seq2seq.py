"""The encoder-decoder Transformer (the original Transformer's form; T5).

An encoder reads the whole source with bidirectional attention; a decoder writes the
target one token at a time with causal self-attention and, in every block, a second
attention over the encoder's output (cross-attention). The two stacks share the token
embeddings; the decoder's final states give next-token logits.

    source ids --embed--> encoder blocks --> memory (B, S, dim)
    target ids --embed--> decoder blocks (self-attention, cross-attention to memory, FFN) --> logits

Positions are configured as in the one-stack model (rotary, learned or sinusoidal, each
stack placing its own tokens from 0), or ``relative``: T5's bias on the attention scores,
one learned value per (distance bucket, head), computed once per stack and shared by its
layers; the encoder's buckets tell left from right, the decoder's look back only.

Generation keeps two caches (:class:`Seq2SeqCache`): the decoder's own keys and values,
growing a token at a time as in :class:`~lmforge.model.kv_cache.KVCache`, and each layer's
cross-attention keys and values, computed from the memory once.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.model.attention import CrossAttention, causal_mask
from lmforge.model.config import ModelConfig
from lmforge.model.kv_cache import KVCache
from lmforge.model.norm import make_norm, to_autocast_dtype
from lmforge.model.position import LearnedPositions, RotaryEmbedding, SinusoidalPositions
from lmforge.model.transformer import Block, Transformer, padding_mask


def relative_buckets(relative: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int
                     ) -> torch.Tensor:
    """The bucket of each relative position (key position - query position), as T5 counts them.

    Bidirectional (an encoder): half of the buckets for keys to the right, half for the left.
    Causal (a decoder): every bucket for the distance back (keys to the right never count).
    Within a side, the first half of its buckets are exact distances 0, 1, ...; the rest
    cover distances up to ``max_distance`` on a log scale, and farther ones share the last.
    """
    bucket = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (relative > 0).long() * num_buckets
        distance = relative.abs()
    else:
        distance = (-relative).clamp(min=0)
    exact = num_buckets // 2
    far = exact + (torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact)
                   * (num_buckets - exact)).long()
    far = far.clamp(max=num_buckets - 1)
    return bucket + torch.where(distance < exact, distance, far)


class RelativePositionBias(nn.Module):
    """T5's relative position bias: a learned scalar per (bucket, head) added to the attention scores.

    The bucket of every (query, key) pair up to ``max_seq_len`` is computed once (a table derived
    from the config, not stored in checkpoints); a forward pass looks its rows up.
    """

    def __init__(self, config: ModelConfig, bidirectional: bool):
        super().__init__()
        self.bidirectional, self.max_seq_len = bidirectional, config.max_seq_len
        self.num_buckets, self.max_distance = config.relative_buckets, config.relative_max_distance
        self.embed = nn.Embedding(config.relative_buckets, config.num_heads)
        self.init_buffers()

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        positions = torch.arange(self.max_seq_len, device=device)
        relative = positions[None, :] - positions[:, None]  # key - query, (L, L)
        buckets = relative_buckets(relative, self.bidirectional, self.num_buckets, self.max_distance)
        self.register_buffer("buckets", buckets, persistent=False)

    def forward(self, num_queries: int, num_keys: int, start: int = 0) -> torch.Tensor:
        """(1, H, Tq, Tk) bias of queries at positions start .. start+Tq-1 over keys 0 .. Tk-1."""
        buckets = self.buckets[start:start + num_queries, :num_keys]
        return self.embed(buckets).permute(2, 0, 1)[None]  # (Tq, Tk, H) -> (1, H, Tq, Tk)


class DecoderBlock(Block):
    """A decoder block of an encoder-decoder: causal self-attention, cross-attention over the
    encoder's output, then the FFN; each on a residual branch (pre- or post-norm as configured)."""

    def __init__(self, config: ModelConfig, layer: int, rope: RotaryEmbedding | None, attention: str):
        super().__init__(config, layer, rope, attention)
        self.cross_norm = make_norm(config.norm, config.dim, config.norm_eps)
        self.cross_attn = CrossAttention(config, layer, attention)

    def forward(self, x: torch.Tensor, cache: KVCache | None, rotary: tuple | None = None,
                mask: torch.Tensor | None = None, memory: tuple | None = None,
                memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``memory``: this layer's cross-attention keys and values (CrossAttention.keys_values)."""
        if self.post_norm:
            x = self.attn_norm(x + self.dropout(self.attn(x, cache, rotary, mask)))
            x = self.cross_norm(x + self.dropout(self.cross_attn(x, memory, memory_mask)))
            return self.ffn_norm(x + self.dropout(self.ffn(x)))
        x = x + self.dropout(self.attn(self.attn_norm(x), cache, rotary, mask))
        x = x + self.dropout(self.cross_attn(self.cross_norm(x), memory, memory_mask))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class Stack(nn.Module):
    """One side of an encoder-decoder: its positions, its blocks and its final norm.

    The encoder's blocks attend both ways; the decoder's causally, and to the memory.
    """

    def __init__(self, config: ModelConfig, num_layers: int, decoder: bool, attention: str):
        super().__init__()
        self.config, self.decoder = config, decoder
        self.positions: nn.Module | None = None
        self.rope = self.relative = None
        if config.position == "learned":
            self.positions = LearnedPositions(config.max_seq_len, config.dim)
        elif config.position == "sinusoidal":
            self.positions = SinusoidalPositions(config.max_seq_len, config.dim)
        elif config.position == "rope":
            self.rope = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta, config.rope_scaling)
        else:
            self.relative = RelativePositionBias(config, bidirectional=not decoder)
        kind = DecoderBlock if decoder else Block
        self.blocks = nn.ModuleList(kind(config, i, self.rope, attention) for i in range(num_layers))
        if not decoder:
            for block in self.blocks:
                block.attn.causal = False
        post = config.norm_position == "post"
        self.embed_norm = make_norm(config.norm, config.dim, config.norm_eps) if post else None
        self.norm = nn.Identity() if post else make_norm(config.norm, config.dim, config.norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def place(self, x: torch.Tensor, start: int = 0, positions: torch.Tensor | None = None) -> tuple:
        """Embedded tokens x (B, T, dim) at positions start.. (or each its own, ``positions`` (B, T)): x with
        absolute positions added (and normalized, post-norm), and the rotary tables of those positions (or None)."""
        seq_len = x.shape[1]
        if self.positions is not None:
            x = x + self.positions(seq_len, start, positions)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = self.dropout(x)
        rotary = None
        if self.rope is not None:
            device = x.device.type
            dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
            rotary = self.rope.tables(start, seq_len, positions, dtype)
        return x, rotary

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, cache: KVCache | None = None,
                memory: list | None = None, memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, dim) embedded tokens -> final states (B, T, dim).

        ``mask`` (B, 1, 1, T): False at padding keys (the encoder's source). The decoder continues
        ``cache`` (its positions start at ``cache.length``) and reads ``memory``, one (keys, values)
        per layer, with ``memory_mask`` (B, 1, 1, S) hiding the source's padding.
        """
        seq_len = x.shape[1]
        start = cache.length if cache is not None else 0
        if start + seq_len > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + seq_len} tokens exceeds max_seq_len={self.config.max_seq_len}")
        x, rotary = self.place(x, start)
        if self.relative is not None:  # one bias for every layer, the mask folded in as -inf
            bias = self.relative(seq_len, start + seq_len, start)  # (1, H, T, Tk)
            if self.decoder and seq_len > 1:  # (one new token has no later key to hide)
                bias = bias.masked_fill(~causal_mask(seq_len, start + seq_len, x.device), float("-inf"))
            if mask is not None:
                bias = bias.masked_fill(~mask, float("-inf"))  # (B, H, T, Tk)
            # once for every layer: in the dtype the scores are computed in, keys innermost (the gathered
            # bias has heads innermost, and a broadcast add over such a layout costs 10x a plain one)
            mask = to_autocast_dtype(bias).contiguous()
        for i, block in enumerate(self.blocks):
            if self.decoder:
                x = block(x, cache, rotary, mask, memory[i], memory_mask)
            else:
                x = block(x, None, rotary, mask)
        if cache is not None:
            cache.advance(seq_len)
        return self.norm(x)


class Seq2SeqCache(KVCache):
    """The decoder's key/value cache plus each layer's cross-attention keys and values.

    ``memory`` is filled on the first decoder pass (from the encoder's output) and kept; it
    follows the rows of the self-attention cache in :meth:`reorder` (beam search).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.memory: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.memory_mask: torch.Tensor | None = None

    def reorder(self, rows: torch.Tensor) -> None:
        super().reorder(rows)
        if self.memory is not None:
            self.memory = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.memory]
        if self.memory_mask is not None:
            self.memory_mask = self.memory_mask.index_select(0, rows)


class EncoderDecoderLM(Transformer):
    """An encoder-decoder language model (``ModelConfig.decoder_layers > 0``).

    ``forward(input_ids, decoder_input_ids, attention_mask)`` -> logits (B, T, V) of the token
    after each decoder input. :meth:`encode` and :meth:`decode` split it for generation.
    ``attention`` picks the attention backend ("sdpa" or "eager"), a runtime choice.
    """

    def __init__(self, config: ModelConfig, attention: str = "sdpa"):
        super().__init__()
        if not config.is_encoder_decoder:
            raise ValueError("EncoderDecoderLM needs decoder_layers > 0; a one-stack model is a DecoderLM")
        self.config, self.depth = config, max(config.num_layers, config.decoder_layers)
        self.embed = nn.Embedding(config.vocab_size, config.dim)  # shared by both stacks
        self.encoder = Stack(config, config.num_layers, decoder=False, attention=attention)
        self.decoder = Stack(config, config.decoder_layers, decoder=True, attention=attention)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Source ids (B, S) -> memory (B, S, dim). ``attention_mask`` (B, S): 1 at tokens, 0 at padding."""
        mask = padding_mask(attention_mask) if attention_mask is not None else None
        return self.encoder(self.embed(input_ids), mask)

    def memory_keys_values(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each decoder layer's cross-attention keys and values of ``memory`` (B, S, dim)."""
        return [block.cross_attn.keys_values(memory) for block in self.decoder.blocks]

    def decode(self, decoder_input_ids: torch.Tensor, memory: torch.Tensor | None,
               attention_mask: torch.Tensor | None = None, cache: Seq2SeqCache | None = None,
               return_hidden: bool = False) -> torch.Tensor:
        """Target ids (B, T) -> logits (B, T, V), reading ``memory`` (the encoder's output; ``attention_mask``
        (B, S) marks its real tokens). With a cache, the tokens continue the cached ones, and the
        memory's keys and values are computed on the first call and kept (``memory`` may then be None)."""
        if cache is not None and cache.memory is not None:
            keys_values, memory_mask = cache.memory, cache.memory_mask
        else:
            if memory is None:
                raise ValueError("the decoder needs the encoder's output (memory) on its first pass")
            keys_values = self.memory_keys_values(memory)
            memory_mask = padding_mask(attention_mask) if attention_mask is not None else None
            if cache is not None:
                cache.memory, cache.memory_mask = keys_values, memory_mask
        hidden = self.decoder(self.embed(decoder_input_ids), None, cache, keys_values, memory_mask)
        return hidden if return_hidden else self.lm_head(hidden)

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None, return_hidden: bool = False) -> torch.Tensor:
        """Source ids (B, S) and target ids (B, T) -> logits (B, T, V) (teacher forcing), or the decoder's
        final hidden states (B, T, dim)."""
        memory = self.encode(input_ids, attention_mask)
        return self.decode(decoder_input_ids, memory, attention_mask, return_hidden=return_hidden)

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None
                  ) -> Seq2SeqCache:
        """An empty decoder cache for ``batch_size`` rows and ``max_len`` target positions."""
        config, param = self.config, next(self.parameters())
        return Seq2SeqCache(config.decoder_layers, batch_size, max_len or config.max_seq_len, config.num_kv_heads,
                            config.head_dim, dtype or param.dtype, param.device)

    def shift_right(self, labels: torch.Tensor, pad_id: int) -> torch.Tensor:
        """Decoder inputs for target ``labels`` (B, T): the start token, then the labels but the last
        (positions the loss ignores, -100, become ``pad_id``)."""
        inputs = labels.new_full(labels.shape, self.config.decoder_start_id)
        inputs[:, 1:] = labels[:, :-1]
        return inputs.masked_fill(inputs < 0, pad_id)
