"""Positional encodings: rotary (RoPE), learned absolute, and sinusoidal.

RoPE rotates query/key pairs inside attention; the other two are added to the
token embeddings. All take the absolute position of the first token, so that a
KV-cached decode step sees the same positions as a full forward pass.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al., 2021, arXiv:2104.09864).

    Uses the "rotate half" pairing (dimension i with i + head_dim/2), the layout of
    Hugging Face Llama checkpoints, so their weights load without permutation.
    ``scaling`` (ModelConfig.rope_scaling) stretches the frequencies for longer contexts.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0, scaling: dict | None = None):
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta, self.scaling = head_dim, max_seq_len, theta, scaling
        self.init_buffers()

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the cos/sin tables; derived from the config, so never stored in checkpoints."""
        d = self.head_dim
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d))
        if self.scaling is not None:
            inv_freq = scale_frequencies(inv_freq, self.scaling)
        positions = torch.arange(self.max_seq_len, dtype=torch.float64, device=device)
        angles = torch.outer(positions, inv_freq)  # (L, D/2)
        angles = torch.cat([angles, angles], dim=-1)  # (L, D)
        # rotate_half(x) * sin == roll(x, D/2) * signed_sin: the first half's sines negated (see rotate)
        signed_sin = angles.sin()
        signed_sin[:, :d // 2] *= -1
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("signed_sin", signed_sin.float(), persistent=False)

    def tables(self, start: int, seq_len: int, positions: torch.Tensor | None = None,
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed_sin) for positions start .. start+T-1, each (T, 1, D); or for ``positions``
        (B, T) when given (packed sequences restart at 0; the batched engine's rows), each (B, T, 1, D).
        Computed once per forward pass and used by every layer (:func:`rotate`)."""
        if positions is not None:
            cos, sin = self.cos[positions][:, :, None], self.signed_sin[positions][:, :, None]
        else:
            cos, sin = self.cos[start:start + seq_len, None], self.signed_sin[start:start + seq_len, None]
        return cos.to(dtype), sin.to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys x (B, T, heads, D) by the angles of their positions (RotaryEmbedding.tables).

    Dimension i pairs with i + D/2: x * cos + rotate_half(x) * sin, where rotate_half(x) =
    (-x2, x1) for the halves x1, x2. Rolling x by D/2 gives (x2, x1); the sines of the first
    half come negated in ``signed_sin``, so the same numbers take one op instead of four.
    """
    if cos.dtype != x.dtype:
        cos, signed_sin = cos.to(x.dtype), signed_sin.to(x.dtype)
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def scale_frequencies(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """RoPE frequencies (D/2,) stretched for a longer context.

    "linear" (position interpolation, Chen et al., 2023, arXiv:2306.15595) divides every
    frequency by ``factor``. "llama3" (Llama 3 report, 2024) divides only the low
    frequencies, whose wavelength exceeds ``original_max_position_embeddings /
    low_freq_factor``; keeps the high ones (wavelength below ``... / high_freq_factor``);
    and blends linearly in between.
    """
    factor = scaling["factor"]
    if scaling["type"] == "linear":
        return inv_freq / factor
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    blend = ((context / wavelength - low) / (high - low)).clamp(0.0, 1.0)  # 0: low frequency, 1: high
    return (1 - blend) * inv_freq / factor + blend * inv_freq


class LearnedPositions(nn.Module):
    """A trained vector per absolute position (GPT-2 style), added to token embeddings."""

    def __init__(self, max_seq_len: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(max_seq_len, dim))

    def forward(self, seq_len: int, start: int, positions: torch.Tensor | None = None) -> torch.Tensor:
        if positions is not None:
            return self.weight[positions]  # (B, T, dim)
        return self.weight[start:start + seq_len]  # (T, dim)


class SinusoidalPositions(nn.Module):
    """Fixed sine/cosine position vectors (Vaswani et al., 2017), added to token embeddings."""

    def __init__(self, max_seq_len: int, dim: int):
        super().__init__()
        self.max_seq_len, self.dim = max_seq_len, dim
        self.init_buffers()

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the table; derived from the config, so never stored in checkpoints."""
        dim = self.dim
        position = torch.arange(self.max_seq_len, dtype=torch.float64, device=device)[:, None]
        freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64, device=device) * (-math.log(10000.0) / dim))
        table = torch.zeros(self.max_seq_len, dim, dtype=torch.float64, device=device)
        table[:, 0::2] = torch.sin(position * freq)
        table[:, 1::2] = torch.cos(position * freq[: dim // 2])
        self.register_buffer("table", table.float(), persistent=False)

    def forward(self, seq_len: int, start: int, positions: torch.Tensor | None = None) -> torch.Tensor:
        if positions is not None:
            return self.table[positions]  # (B, T, dim)
        return self.table[start:start + seq_len]  # (T, dim)
