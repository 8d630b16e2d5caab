"""Counting: parameters and floating-point operations per token.

A matmul of (m x k) by (k x n) costs 2mkn FLOPs. The forward pass therefore costs
2 FLOPs per weight per token, plus attention's two matmuls (q k^T and weights v),
2 * 2 * T * head_dim * num_heads per layer per token at full context T. Training
(forward + backward) costs three times the forward (Kaplan et al., 2020).
"""

from __future__ import annotations

from lmforge.model.config import GATED, ModelConfig


def matmul_parameters(config: ModelConfig) -> int:
    """Weights that take part in a matmul for every token (the head, not the embedding lookup).

    In an encoder-decoder a token goes through one stack: a source token through the encoder,
    a target token through the decoder (its cross-attention too) and the head. The count is the
    mean of the two paths, a token's cost when sources and targets are equally long.
    """
    c = config
    attn = c.dim * c.num_heads * c.head_dim * 2 + c.dim * c.num_kv_heads * c.head_dim * 2
    ffn = c.dim * c.ffn_dim * (3 if c.activation in GATED else 2)
    if c.is_encoder_decoder:
        return (c.num_layers * (attn + ffn) + c.decoder_layers * (2 * attn + ffn) + c.dim * c.vocab_size) // 2
    return c.num_layers * (attn + ffn) + c.dim * c.vocab_size


def forward_flops_per_token(config: ModelConfig, seq_len: int | None = None) -> float:
    """FLOPs to process one token in a forward pass at context ``seq_len`` (average over causal positions)."""
    seq_len = config.max_seq_len if seq_len is None else seq_len
    # Causal attention: on average each token attends over half the sequence.
    layers = (config.num_layers + config.decoder_layers) / 2 if config.is_encoder_decoder else config.num_layers
    attention = 2 * 2 * layers * config.num_heads * config.head_dim * seq_len / 2
    return 2 * matmul_parameters(config) + attention


def train_flops_per_token(config: ModelConfig, seq_len: int | None = None) -> float:
    """Forward + backward FLOPs per token (backward costs twice the forward)."""
    return 3 * forward_flops_per_token(config, seq_len)
