"""The position-wise feed-forward network: ReLU, GELU (tanh approximation or exact), or gated: SwiGLU, GEGLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FeedForward(nn.Module):
    """up-project, non-linearity, down-project.

    SwiGLU (Shazeer, 2020, arXiv:2002.05202) gates the up projection with a second
    one: down(silu(gate(x)) * up(x)); GEGLU (same paper; T5 v1.1) gates with GELU's tanh
    approximation instead of SiLU. ReLU and GELU use up and down only.
    """

    def __init__(self, dim: int, hidden: int, activation: str, bias: bool = False):
        super().__init__()
        self.activation = activation
        if activation in ("swiglu", "geglu"):
            self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.gate_up = None  # gate and up as one product, for inference (lmforge.model.fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation in ("swiglu", "geglu"):
            if self.gate_up is not None and self.gate_up.usable():
                gate, up = self.gate_up(x).split(self.gate_up.sizes, dim=-1)
            else:
                gate, up = self.gate_proj(x), self.up_proj(x)
            gate = F.silu(gate) if self.activation == "swiglu" else F.gelu(gate, approximate="tanh")
            hidden = gate * up
        elif self.activation == "gelu":  # GPT-2's tanh approximation
            hidden = F.gelu(self.up_proj(x), approximate="tanh")
        elif self.activation == "gelu_erf":  # x * Phi(x) exactly, as BERT
            hidden = F.gelu(self.up_proj(x))
        else:
            hidden = F.relu(self.up_proj(x))
        return self.down_proj(hidden)
