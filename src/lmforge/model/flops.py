"""Counting: parameters and floating-point operations per token.

A matmul of (m x k) by (k x n) costs 2mkn FLOPs. The forward pass therefore costs
2 FLOPs per weight per token, plus attention's two matmuls (q k^T and weights v),
2 * 2 * T * head_dim * num_heads per layer per token at full context T. Training
(forward + backward) costs three times the forward (Kaplan et al., 2020).
"""

from __future__ import annotations

from lmforge.model.config import ModelConfig


def matmul_parameters(config: ModelConfig) -> int:
    """Weights that take part in a matmul for every token (the head, not the embedding lookup)."""
    c = config
    attn = c.dim * c.num_heads * c.head_dim * 2 + c.dim * c.num_kv_heads * c.head_dim * 2
    ffn = c.dim * c.ffn_dim * (3 if c.activation == "swiglu" else 2)
    return c.num_layers * (attn + ffn) + c.dim * c.vocab_size


def forward_flops_per_token(config: ModelConfig, seq_len: int | None = None) -> float:
    """FLOPs to process one token in a forward pass at context ``seq_len`` (average over causal positions)."""
    seq_len = config.max_seq_len if seq_len is None else seq_len
    # Causal attention: on average each token attends over half the sequence.
    attention = 2 * 2 * config.num_layers * config.num_heads * config.head_dim * seq_len / 2
    return 2 * matmul_parameters(config) + attention


def train_flops_per_token(config: ModelConfig, seq_len: int | None = None) -> float:
    """Forward + backward FLOPs per token (backward costs twice the forward)."""
    return 3 * forward_flops_per_token(config, seq_len)
