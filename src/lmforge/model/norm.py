"""Normalization layers: RMSNorm and LayerNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def to_autocast_dtype(out: torch.Tensor) -> torch.Tensor:
    """A norm's output in the autocast dtype when autocast is on, else as it is.

    A norm's output only feeds matrix products (q, k, v; gate and up; the output layer),
    which autocast runs in bf16: each of them would cast the fp32 output again, and in
    training each LoRA adapter keeps its own bf16 copy for the backward pass (three for
    q, k, v, two for gate and up). Cast once here, every product shares one tensor: the
    same numbers, and a LoRA DPO step on SmolLM2-135M (8 pairs, benchmarks/align.py)
    peaks at +2944 / +2961 MB in two runs instead of +3229 MB.
    """
    device = out.device.type
    if torch.is_autocast_enabled(device):
        return out.to(torch.get_autocast_dtype(device))
    return out


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight  (Zhang & Sennrich, 2019, arXiv:1910.07467).

    Computed in fp32 whatever the input dtype, then cast back (to the autocast dtype
    under autocast: :func:`to_autocast_dtype`): the mean of squares loses too much
    precision in bf16.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype:  # PyTorch's rms_norm computes the same in fp32, in fewer dispatched ops
            return to_autocast_dtype(F.rms_norm(x, self.weight.shape, self.weight, self.eps))
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return to_autocast_dtype((x32 * self.weight.float()).to(x.dtype))


class LayerNorm(nn.LayerNorm):
    """PyTorch's LayerNorm, its output in the autocast dtype under autocast (:func:`to_autocast_dtype`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return to_autocast_dtype(super().forward(x))


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """The normalization named by the config: "rmsnorm" or "layernorm"."""
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    return LayerNorm(dim, eps=eps)
