"""Multi-head self-attention with separate key/value heads (MHA, GQA, MQA): causal in a decoder,
bidirectional in an encoder (``ModelConfig.causal``).

:class:`CrossAttention` is the encoder-decoder's other attention: the decoder's queries over the
encoder's output. A mask may be boolean (True where attention is allowed) or a float bias added
to the scores (T5's relative positions, ``-inf`` where not allowed).

Two backends compute the same thing: "sdpa" calls PyTorch's fused
``scaled_dot_product_attention``; "eager" spells out softmax(q k^T / sqrt(d) + mask) v
and is the reference the tests compare against.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.config import ModelConfig
from lmforge.model.kv_cache import KVCache
from lmforge.model.position import RotaryEmbedding, rotate
from lmforge.quant import kernels


def causal_mask(num_queries: int, num_keys: int, device: torch.device) -> torch.Tensor:
    """Boolean (Tq, Tk) mask, True where attention is allowed.

    The queries are the last ``num_queries`` positions of the ``num_keys`` keys, so
    query i may see keys 0 .. num_keys - num_queries + i.
    """
    offset = num_keys - num_queries
    q = torch.arange(num_queries, device=device)[:, None]
    k = torch.arange(num_keys, device=device)[None, :]
    return k <= q + offset


def sees_every_key(q: torch.Tensor, num_keys: int) -> torch.Tensor:
    """Boolean (B, 1, 1, Tk) mask, all True: one new token a row that may look at every cached key (a view, no
    copy), for :func:`lmforge.quant.kernels.grouped_attention`, which always takes a mask."""
    return torch.ones((1, 1, 1, 1), dtype=torch.bool, device=q.device).expand(q.shape[0], 1, 1, num_keys)


def packed_mask(segments: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """(B, 1, T, T) boolean mask for packed sequences: only within one's own segment, and causal
    unless ``causal`` is false (an encoder).

    segments (B, T): which packed example each position belongs to (equal ids, contiguous runs).
    """
    seq_len = segments.shape[1]
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    if causal:
        same = same & causal_mask(seq_len, seq_len, segments.device)
    return same[:, None]


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float = 0.0,
                    training: bool = False, mask: torch.Tensor | None = None, causal: bool = True) -> torch.Tensor:
    """Reference attention. q (B, H, Tq, D); k, v (B, Hkv, Tk, D) -> (B, H, Tq, D).

    ``mask`` (B, 1, Tq, Tk), True where allowed, replaces the causal mask (packed sequences,
    padding); a float mask (B or 1, 1 or H, Tq, Tk) is added to the scores instead. Without a
    mask, ``causal=False`` lets every query see every key (an encoder).
    """
    weights = attention_weights(q, k, mask, causal).to(v.dtype)
    weights = F.dropout(weights, p=dropout, training=training)
    return weights @ v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)  # each kv head serves its group


def attention_scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None,
                     causal: bool = True) -> torch.Tensor:
    """The scaled dot products q k^T / sqrt(d) in fp32, masked: (B, H, Tq, Tk), ``-inf`` where a query may
    not look (the mask as in :func:`eager_attention`). q (B, H, Tq, D); k (B, Hkv, Tk, D)."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (B, H, Tk, D): each kv head serves `groups` heads
    return masked((q @ k.transpose(-2, -1)).float() / math.sqrt(q.shape[-1]), mask, causal)  # (B, H, Tq, Tk)


def masked(scores: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """Scores (B, H, Tq, Tk) with the mask applied as :func:`eager_attention` describes it: a float mask added
    (in the scores' dtype), a boolean one (or, without one, the causal mask when ``causal``) as ``-inf``."""
    allowed = mask if mask is not None or not causal else causal_mask(scores.shape[-2], scores.shape[-1],
                                                                       scores.device)
    if allowed is not None and allowed.is_floating_point():
        return scores + allowed.to(scores.dtype)
    if allowed is not None:
        return scores.masked_fill(~allowed, float("-inf"))
    return scores


def attention_weights(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None,
                      causal: bool = True) -> torch.Tensor:
    """softmax over the keys of :func:`attention_scores`: (B, H, Tq, Tk) fp32, each row summing to one."""
    return torch.softmax(attention_scores(q, k, mask, causal), dim=-1)


# Steps of at most this many new tokens a row (a decode step, a speculative step checking its
# guesses, a short prompt) take grouped_query_attention; longer prefills the fused kernel's GQA.
GROUPED_QUERIES = 16
LEAST_QUERY_ROWS = 4  # grouped_query_attention's fewest fp32 query rows a kernel call (see there)


def grouped_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of a few new tokens a row over their own keys (the batched engine's steps).

    q (B, H, T, D); k, v (B, Hkv, Tk, D); mask (B, 1, T, Tk). The G query heads that share a
    key/value head become G x T query rows of one fused attention over that head's keys
    (q as (B, Hkv, G * T, D)), so keys are read once per group and never repeated per head.
    Measured on 2 cores (Intel AMX), median of interleaved runs, per layer: bf16 SmolLM2
    shapes at batch 16 with 86 keys, one token a row, 292 us against 602 for grouped matrix
    products and a softmax (the previous version, itself 5x faster than the fused kernel with
    ``enable_gqa`` in bf16); llama-42m's (8 heads, no grouping) at batch 8, 336 against 882.
    In fp32 it is as fast as ``enable_gqa`` and closer to it than 1e-6.

    Each query row comes out the same, to the bit, whatever the number of rows beside it
    (the kernel treats up to a few dozen rows as one block and each row alike): a
    speculative step's row for its pending token equals the one-token step's, so checking
    guesses keeps the greedy output of plain decoding (tested). In fp32, fewer than
    :data:`LEAST_QUERY_ROWS` rows are padded up to it: on an AMD EPYC (Zen 4) the fp32 kernel
    took another path for 1-3 rows, whose last bits differed from the same row's among 4 or
    more (Intel's took one path for all; bf16 one path on both). The padding costs about 15 us
    a call at one row over 200 keys (36 -> 51 us there), nothing measurable at 16 rows.

    In bf16 on CPUs with AVX-512 BF16 and no AMX, and in fp32 on AVX-512 CPUs without AMX,
    :func:`sdpa_attention` calls lmforge's C++ kernel instead (:func:`~lmforge.quant.kernels.grouped_attention`),
    whose rows are independent too.
    """
    batch, heads, queries, dim = q.shape
    kv_heads, num_keys = k.shape[1], k.shape[2]
    group, rows = heads // kv_heads, heads // kv_heads * queries
    grouped = q.reshape(batch, kv_heads, rows, dim)  # rows (head in group, token)
    mask = mask.expand(batch, 1, queries, num_keys)
    if group > 1:
        mask = mask[:, :, None].expand(batch, 1, group, queries, num_keys).reshape(batch, 1, rows, num_keys)
    if rows < LEAST_QUERY_ROWS and q.dtype == torch.float32:  # padding rows: zero queries, the first row's mask
        grouped = torch.cat([grouped, grouped.new_zeros(batch, kv_heads, LEAST_QUERY_ROWS - rows, dim)], dim=2)
        mask = torch.cat([mask, mask[:, :, :1].expand(batch, 1, LEAST_QUERY_ROWS - rows, num_keys)], dim=2)
    out = F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask)
    return out[:, :, :rows].reshape(batch, heads, queries, dim)


def spelled_out_for_training(q: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> bool:
    """Whether a training step on the CPU computes this attention as :func:`compact_attention`.

    PyTorch's fused CPU kernel has no backward for a bias that is learned (T5's relative
    positions): it falls back to a composite that is slower than spelling the steps out. Its
    flash backward in bf16 is slow on the shapes of encoders and cross-attention too. Measured on
    2 cores (Intel AMX), forward and backward, (batch 16, 4 heads, head dim 64): a learned bias
    over 232 keys 36.9 ms fused against 16.6 spelled out in bf16 (45.3 / 29.9 in fp32);
    cross-attention of 52 queries over 232 keys 15.4 / 6.8 in bf16; an encoder with padding
    32.8 / 24.1 in bf16; bert-tiny's head dim 16, 42.0 / 8.2. Causal attention stays fused (the
    speedrun's shape: 23.2 fused against 28.2 spelled out in bf16, packed rows of 512 tokens 105
    against 166; llama-42m's in fp32 74.5 / 158), and so does fp32 without a bias (the encoder
    with padding 22.9 / 34.6, bert-tiny 7.2 / 11.5; only the unpadded encoder, 21.9 / 19.7, went
    the other way).
    """
    if q.device.type != "cpu":
        return False
    bias = mask is not None and mask.is_floating_point()
    return bias or (q.dtype == torch.bfloat16 and not causal)


def compact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float = 0.0,
                      mask: torch.Tensor | None = None, causal: bool = True) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v with every step in q's dtype (the softmax's own sums are fp32
    inside the kernel): the contract of :func:`eager_attention`, with half the memory traffic of its
    fp32 scores in bf16, for training on the CPU (:func:`spelled_out_for_training`). Its scores are
    rounded to bf16 as autocast rounds any bf16 product's output (transformers' T5 adds its bias so)."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = masked((q * (1 / math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1), mask, causal)  # (B, H, Tq, Tk)
    weights = F.dropout(torch.softmax(scores, dim=-1), p=dropout, training=dropout > 0)
    return weights @ v


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float = 0.0,
                   training: bool = False, mask: torch.Tensor | None = None, causal: bool = True) -> torch.Tensor:
    """Fused attention, same contract as :func:`eager_attention`.

    A decoder's masked inference attention (the engine's decode steps and speculative checks, prompts in padded
    batches, multiple-choice passes) runs in lmforge's C++ kernel where :func:`lmforge.quant.kernels.attends`:
    bf16 on CPUs with AVX-512 BF16 and no AMX, fp32 on AVX-512 CPUs without AMX
    (:func:`~lmforge.quant.kernels.grouped_attention`). On a 2-core Zen 4, SmolLM2's shapes: a compiled 16-row bf16
    decode step at 200 cached positions spent 0.46 ms a layer in PyTorch's fused kernel (37% of the step); a call
    takes 3.5-6x less time in this one for decode steps, 2.7-3x for prompts of 17-40 tokens in batches, 1.1-1.3x
    for long ones; in fp32 0.52 ms a layer against 0.23 (docs/BENCHMARKS.md). The one-sequence loop's one-token
    steps (``generate`` through one KV cache, a draft model's guesses: no mask, every cached key) take it too: at
    batch 1 and 200 keys the fused kernel took 131 us a layer in bf16 against 11, 22 against 13 in fp32."""
    num_queries, num_keys = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    p = dropout if training else 0.0
    if training and spelled_out_for_training(q, mask, causal):
        return compact_attention(q, k, v, p, mask, causal)
    if (mask is not None and mask.dtype == torch.bool and causal and not training
            and kernels.attends(q, k, v)):  # a decoder's cached steps and packed prompts: C++
        return kernels.grouped_attention(q, k, v, mask)
    if mask is not None and mask.is_floating_point():  # an additive bias: the fused kernel wants q's dtype
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), dropout_p=p, enable_gqa=gqa)
    if mask is not None and num_queries <= GROUPED_QUERIES and not training:
        return grouped_query_attention(q, k, v, mask)
    if mask is not None or not causal:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, enable_gqa=gqa)
    if num_queries == num_keys:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p, enable_gqa=gqa)
    if num_queries == 1:  # one new token sees the whole prefix: no mask needed
        if not training and kernels.attends(q, k, v):  # the one-sequence decode loop (generate, a draft model): C++
            return kernels.grouped_attention(q, k, v, sees_every_key(q, num_keys))
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, enable_gqa=gqa)
    # Several new tokens after a cached prefix: is_causal would align the mask top-left.
    mask = causal_mask(num_queries, num_keys, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, enable_gqa=gqa)


BACKENDS = {"sdpa": sdpa_attention, "eager": eager_attention}


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, rope: RotaryEmbedding | None, backend: str = "sdpa"):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.dropout = config.dropout
        qkv_bias = config.bias or config.qkv_bias
        self.q_proj = nn.Linear(config.dim, config.num_heads * config.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(config.dim, config.num_kv_heads * config.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(config.dim, config.num_kv_heads * config.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, config.dim, bias=config.bias)
        self.rope = rope
        self.backend = backend
        self.causal = config.causal
        self.qkv = None  # the three projections as one product, for inference (lmforge.model.fused)

    def project(self, x: torch.Tensor, rotary: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The queries (B, H, T, D), keys and values (B, Hkv, T, D) of x (B, T, dim), q and k rotated to
        their positions (``rotary``, as in :meth:`forward`)."""
        batch, seq_len, _ = x.shape
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        if self.qkv is not None and self.qkv.usable():  # one product; q and k rotated together
            qkv = self.qkv(x).view(batch, seq_len, heads + 2 * kv_heads, dim)
            qk, v = qkv[:, :, :heads + kv_heads], qkv[:, :, heads + kv_heads:]
            if rotary is not None:
                qk = rotate(qk, *rotary)
            q, k = qk.split([heads, kv_heads], dim=2)
        else:
            q = self.q_proj(x).view(batch, seq_len, heads, dim)
            k = self.k_proj(x).view(batch, seq_len, kv_heads, dim)
            v = self.v_proj(x).view(batch, seq_len, kv_heads, dim)
            if rotary is not None:
                q, k = rotate(q, *rotary), rotate(k, *rotary)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, T, heads, D) -> (B, heads, T, D)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, rotary: tuple | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, dim); ``rotary``: the (cos, signed_sin) of the tokens' positions (RotaryEmbedding.tables);
        ``mask`` (B, 1, T, Tk) for packed rows and the batched engine."""
        batch, seq_len, _ = x.shape
        q, k, v = self.project(x, rotary)
        if cache is not None and cache.attends:  # a packed pass of the batched engine: the cache knows each row's keys
            out = cache.attend(self.layer, q, k, v, BACKENDS[self.backend])
        else:
            if cache is not None:
                k, v = cache.update(self.layer, k, v)  # (B, Hkv, start+T, D)
            out = BACKENDS[self.backend](q, k, v, self.dropout, self.training, mask, self.causal)  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq_len, self.num_heads * self.head_dim))


class CrossAttention(nn.Module):
    """The decoder's queries over the encoder's output (``memory``), in an encoder-decoder.

    Keys and values come from the memory, the same for every decoding step: a generating
    model computes them once (:meth:`keys_values`) and passes them in each step. No positions
    are applied here; each side has placed its own tokens already.
    """

    def __init__(self, config: ModelConfig, layer: int, backend: str = "sdpa"):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.dropout = config.dropout
        self.q_proj = nn.Linear(config.dim, config.num_heads * config.head_dim, bias=config.bias)
        self.k_proj = nn.Linear(config.dim, config.num_kv_heads * config.head_dim, bias=config.bias)
        self.v_proj = nn.Linear(config.dim, config.num_kv_heads * config.head_dim, bias=config.bias)
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, config.dim, bias=config.bias)
        self.backend = backend

    def keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """memory (B, S, dim) -> keys, values (B, Hkv, S, D)."""
        batch, length, _ = memory.shape
        k = self.k_proj(memory).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(memory).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return k, v

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, dim) -> queries (B, H, T, D)."""
        batch, seq_len, _ = x.shape
        return self.q_proj(x).view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, keys_values: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, dim); ``keys_values`` of the memory; ``mask`` (B, 1, 1, S), False at the memory's padding.

        A packed pass of the batched engine (one row of N tokens from several requests) gives each token
        its own memory: keys and values (N, Hkv, S, D) and mask (N, 1, 1, S) for x (1, N, dim)."""
        batch, seq_len, _ = x.shape
        q = self.queries(x)
        k, v = keys_values
        per_token = k.shape[0] != batch
        if per_token:  # (1, H, N, D) -> (N, H, 1, D): each token a row of its own
            q = q.transpose(0, 2)
        out = BACKENDS[self.backend](q, k, v, self.dropout, self.training, mask, False)  # (B, H, T, D)
        if per_token:
            out = out.transpose(0, 2)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq_len, self.num_heads * self.head_dim))
