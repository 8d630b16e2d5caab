"""Normalization layers: RMSNorm and LayerNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight  (Zhang & Sennrich, 2019, arXiv:1910.07467).

    Computed in fp32 whatever the input dtype, then cast back: the mean of squares
    loses too much precision in bf16.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype:  # PyTorch's rms_norm computes the same in fp32, in fewer dispatched ops
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """The normalization named by the config: "rmsnorm" or "layernorm"."""
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    return nn.LayerNorm(dim, eps=eps)
