"""The Transformer: a decoder-only language model, or with ``causal=False`` an encoder (BERT).

tokens -> embedding (+ absolute positions, + segment embeddings) -> N blocks -> head
Pre-norm blocks as in GPT-2/Llama: x + attn(norm(x)), x + ffn(norm(x)), then a final norm.
Post-norm blocks as in the original Transformer and BERT: norm(x + attn(x)), norm(x + ffn(x)),
with the embeddings normalized first and no final norm.

Heads on the one backbone (``ModelConfig.head``): next-token logits (``lm``), one scalar per
position (``score``), both (``lm+value``), masked-token logits through BERT's transform (``mlm``),
and a next-sentence classifier on the pooled first token beside them (``mlm+nsp``), or the
hidden states themselves (``hidden``, an encoder for embeddings).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.attention import Attention, CrossAttention, packed_mask
from lmforge.model.config import ModelConfig
from lmforge.model.kv_cache import KVCache
from lmforge.model.mlp import FeedForward
from lmforge.model.norm import make_norm
from lmforge.model.position import LearnedPositions, RotaryEmbedding, SinusoidalPositions


def positions_in_segments(segments: torch.Tensor) -> torch.Tensor:
    """(B, T) position of each token inside its own packed segment: 0, 1, 2, 0, 1, ..."""
    index = torch.arange(segments.shape[1], device=segments.device).expand_as(segments)  # (B, T)
    first = torch.ones_like(segments, dtype=torch.bool)
    first[:, 1:] = segments[:, 1:] != segments[:, :-1]  # a segment starts here
    return index - torch.cummax(torch.where(first, index, 0), dim=1).values


def padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, 1, 1, T) boolean mask from a tokenizer's attention mask (B, T) of 1 (token) and 0 (padding):
    every query of an encoder sees the row's real tokens only."""
    return attention_mask.bool()[:, None, None, :]


class Block(nn.Module):
    """One Transformer block: attention and FFN, each on a residual branch, normalized before the
    branch (pre-norm) or after the sum (post-norm)."""

    def __init__(self, config: ModelConfig, layer: int, rope: RotaryEmbedding | None, attention: str):
        super().__init__()
        self.attn_norm = make_norm(config.norm, config.dim, config.norm_eps)
        self.attn = Attention(config, layer, rope, attention)
        self.ffn_norm = make_norm(config.norm, config.dim, config.norm_eps)
        self.ffn = FeedForward(config.dim, config.ffn_dim, config.activation, config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.post_norm = config.norm_position == "post"

    def forward(self, x: torch.Tensor, cache: KVCache | None, rotary: tuple | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.post_norm:
            x = self.attn_norm(x + self.dropout(self.attn(x, cache, rotary, mask)))
            return self.ffn_norm(x + self.dropout(self.ffn(x)))
        x = x + self.dropout(self.attn(self.attn_norm(x), cache, rotary, mask))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class Transformer(nn.Module):
    """What every lmforge model shares, whatever its form (:class:`DecoderLM`, the encoder-decoder
    :class:`~lmforge.model.seq2seq.EncoderDecoderLM`): initialisation, the attention backend switch,
    derived tables and the parameter count. Subclasses set ``config``, ``embed`` and ``depth``."""

    config: ModelConfig
    depth: int  # blocks in the deepest stack (initialisation scales the residual projections by it)

    def reset_parameters(self) -> None:
        """All weight initialisation happens here.

        Normal(0, init_std) for matrices; the projections that write into the residual
        stream (o_proj, down_proj) are scaled by 1/sqrt(2 * depth) (depth: blocks in the
        deepest stack) so the stream's variance does not grow with depth (GPT-2).
        """
        std = self.config.init_std
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                scale = 1 / math.sqrt(2 * self.depth) if name.endswith(("o_proj", "down_proj")) else 1.0
                nn.init.normal_(module.weight, mean=0.0, std=std * scale)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, LearnedPositions):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif hasattr(module, "weight") and isinstance(getattr(module, "weight", None), nn.Parameter) \
                    and module.weight.dim() == 1:  # norms
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def set_attention(self, backend: str) -> None:
        """Switch the attention backend of every attention layer ("sdpa" or "eager")."""
        for module in self.modules():
            if isinstance(module, (Attention, CrossAttention)):
                module.backend = backend

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute derived tables (RoPE, sinusoidal, relative buckets) on ``device``: after building on "meta"."""
        for module in self.modules():
            if module is not self and hasattr(module, "init_buffers"):
                module.init_buffers(device)

    def num_parameters(self, embeddings: bool = True) -> int:
        """Parameter count; tied weights count once, and weights stored as buffers (16-bit or integer
        codes, lmforge.quant) count as the parameters they stand for."""
        total = sum(p.numel() for p in self.parameters())
        stored = {}  # storage -> weights it holds (a tied table is one storage)
        for module in self.modules():
            codes, weight = module._buffers.get("qweight"), module._buffers.get("weight")
            if codes is not None:
                stored[codes.data_ptr()] = module.out_features * module.in_features
            elif weight is not None:
                stored[weight.data_ptr()] = weight.numel()
        total += sum(stored.values())
        if not embeddings and isinstance(self.embed, nn.Embedding):  # (an integer table holds no parameters)
            total -= self.embed.weight.numel()
            total -= sum(m.weight.numel() for m in self.modules() if isinstance(m, LearnedPositions))
        return total


class DecoderLM(Transformer):
    """A Transformer on token ids: a causal language model (``forward(ids, cache) -> logits``), or with
    ``causal=False`` an encoder (``forward(ids, token_types=, mask=)`` -> masked-token logits or hidden
    states, by its head).

    ``attention`` picks the attention backend ("sdpa" or "eager"); it is a runtime
    choice, not part of the saved config.
    """

    def __init__(self, config: ModelConfig, attention: str = "sdpa"):
        super().__init__()
        self.config, self.depth = config, config.num_layers
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.positions: nn.Module | None = None
        rope = None
        if config.position == "learned":
            self.positions = LearnedPositions(config.max_seq_len, config.dim)
        elif config.position == "sinusoidal":
            self.positions = SinusoidalPositions(config.max_seq_len, config.dim)
        else:
            rope = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta, config.rope_scaling)
        self.rope = rope  # one table shared by every layer
        # BERT's segment embeddings: which sentence of a pair a token belongs to
        self.type_embed = nn.Embedding(config.type_vocab_size, config.dim) if config.type_vocab_size else None
        post = config.norm_position == "post"
        self.embed_norm = make_norm(config.norm, config.dim, config.norm_eps) if post else None
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i, rope, attention) for i in range(config.num_layers))
        self.norm = nn.Identity() if post else make_norm(config.norm, config.dim, config.norm_eps)
        head = config.head
        # masked-token logits (BERT): dense + GELU + norm, then the output layer with a bias per token
        self.mlm_dense = nn.Linear(config.dim, config.dim) if head.startswith("mlm") else None
        self.mlm_norm = make_norm(config.norm, config.dim, config.norm_eps) if head.startswith("mlm") else None
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=head.startswith("mlm"))
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # one scalar per position read off the same backbone: the output of a reward model (head "score"),
        # or a PPO policy's value estimate beside its logits (head "lm+value", read by the PPO stage)
        self.score = nn.Linear(config.dim, 1, bias=False) if head in ("score", "lm+value") else None
        # the first token's final state through dense + tanh (BERT's pooler), and whether sentence B follows A
        self.pooler = nn.Linear(config.dim, config.dim) if head in ("mlm+nsp", "hidden") and not config.causal else None
        self.nsp = nn.Linear(config.dim, 2) if head == "mlm+nsp" else None
        self.reset_parameters()

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                return_hidden: bool = False, segments: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                token_types: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V), scores (B, T) for a model with the "score" head, or the
        final hidden states (B, T, dim).

        With a cache, the tokens continue the cached prefix: their positions start at
        ``cache.length``, and their keys/values are added to it. With ``segments``
        (B, T), a row holds several examples packed back to back (equal ids, contiguous
        runs): each attends only within itself and its positions restart at 0, so the
        logits equal those of each example run alone.

        Rows of different lengths (the batched engine, :mod:`lmforge.infer.engine`) pass
        ``positions`` (B, T), each token's own position, and ``mask`` (B, 1, T, Tk), True
        where a token may attend to a cached or new key; their cache stores each row's
        keys at its own positions (:class:`lmforge.infer.slot_cache.SlotKVCache`).

        An encoder (``causal=False``) sees the whole row; ``mask`` (B, 1, 1, T) hides padding keys
        (:func:`padding_mask`), and ``token_types`` (B, T) are the segment ids (0 when omitted).
        """
        batch, seq_len = input_ids.shape
        start = 0
        if positions is None:
            start = cache.length if cache is not None else 0
            if start + seq_len > self.config.max_seq_len:
                raise ValueError(f"sequence of {start + seq_len} tokens exceeds max_seq_len={self.config.max_seq_len}")
        if segments is not None:
            if cache is not None:
                raise ValueError("packed segments are for training and scoring, not for a KV-cached decode")
            positions, mask = positions_in_segments(segments), packed_mask(segments, self.config.causal)
        x = self.embed(input_ids)  # (B, T, dim)
        if self.positions is not None:
            x = x + self.positions(seq_len, start, positions)
        if self.type_embed is not None:
            x = x + (self.type_embed(token_types) if token_types is not None else self.type_embed.weight[0])
        elif token_types is not None:
            raise ValueError("token_types given, but this model has no segment embeddings (type_vocab_size=0)")
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = self.dropout(x)
        rotary = None
        if self.rope is not None:  # the tables of these positions, once for every layer, in q's dtype
            device = x.device.type
            dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
            rotary = self.rope.tables(start, seq_len, positions, dtype)
        for block in self.blocks:
            x = block(x, cache, rotary, mask)
        if cache is not None:
            cache.advance(seq_len)
        x = self.norm(x)
        if return_hidden or self.config.head == "hidden":
            return x
        if self.config.head == "score":
            return self.score(x).squeeze(-1)  # (B, T)
        return self.logits(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Token logits of final hidden states (..., dim): the output layer, after BERT's transform for
        the masked-LM heads."""
        if self.mlm_dense is not None:
            hidden = self.mlm_norm(F.gelu(self.mlm_dense(hidden)))
        return self.lm_head(hidden)

    def next_sentence_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, 2) logits of "sentence B follows A" (index 0) and "B is random" (1), from final hidden
        states (B, T, dim): BERT's pooler (dense + tanh on the first token) then the classifier."""
        if self.nsp is None:
            raise ValueError(f"this model has the {self.config.head!r} head; next-sentence prediction needs mlm+nsp")
        return self.nsp(self.pooled(hidden))

    def pooled(self, hidden: torch.Tensor) -> torch.Tensor:
        """BERT's pooled output (B, dim): tanh(dense(first token's final state))."""
        if self.pooler is None:
            raise ValueError(f"this model has no pooler (head {self.config.head!r})")
        return torch.tanh(self.pooler(hidden[:, 0]))
