"""Weight-only 16-bit storage: half the bytes per weight, arithmetic still in fp32.

Decoding one token at batch 1 multiplies one vector by every weight matrix of the
model, so each step reads all the weights once and does only two FLOPs per weight
read: the step is bound by memory bandwidth, not by arithmetic. Storing the weights
in 16 bits (bf16 or fp16) halves the bytes each step reads. On CPUs without native
16-bit arithmetic (AVX2: bf16 matmuls there are emulated, about 1 GFLOP/s) the
weights must not be *used* in 16 bits, only stored: each one is widened to fp32 as it
is loaded and multiplied into an fp32 accumulator. llama.cpp's f16 files work the
same way.

PyTorch has no such mixed-precision matmul kernel on CPUs, but Inductor writes one
when the product is spelled as a broadcast multiply and a sum over the inner
dimension (:func:`matvec`): it fuses the load, the widening, the multiply and the
reduction into one vectorized loop that streams each weight row once. That path is
taken inside ``torch.compile`` (:class:`~lmforge.infer.CompiledDecodeStep`) for one
row, batch-1 decoding. For 2 to 64 rows (a batch, a speculative step checking guesses, a
short prompt), and for every row count up to 64 in eager mode, the C++ kernel of
:mod:`lmforge.quant.kernels` does the same, one pass over the weights serving up to
eight rows (``half_linear``: F16C or AVX-512 widening, fp32 FMAs). Above 64 rows (a
long prompt) the weight is widened to fp32 and multiplied by the usual kernels, which win
once each weight serves many rows.

Measured on SmolLM2-135M, 2 AVX2 cores, one engine decode step at 200 positions: eager,
fp32 weights 52 ms at 1 row and 91-110 ms at 5; fp16 weights with the kernel 26-31 ms and
30-32 ms. Compiled: Inductor's loop 15 ms at 1 row but 89-93 ms at 5 (it widens the whole
weight first); the kernel 18-22 ms at 1 row and 22-23 ms at 5.

Measured on a 2-core AVX2 CPU (docs/BENCHMARKS.md): a llama-42m decode step reads
165 MB in fp32 and 84 MB in 16 bits, and the compiled step with 16-bit weights takes
1.52x fewer ms per token than the fp32 one at batch 1 (and 2x fewer than transformers
with its model cast to fp16). At batch 8 the two are level.

    model = quantize_weights(model, "fp16")   # in place; logits within fp16 rounding
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.quant import kernels

__all__ = ["MATVEC_MAX_ROWS", "WEIGHT_DTYPES", "WeightOnlyEmbedding", "WeightOnlyLinear", "matvec",
           "quantize_weights"]

WEIGHT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# Up to this many rows the compiled step uses the matvec loops. Measured for llama-42m on
# 2 AVX2 cores: faster than Inductor's fp32 GEMM kernels at 1 row, level at 2, slower at 4
# and 2x slower at 8, where reading the weights no longer bounds the step. Above it the
# weights are widened to fp32 for the GEMM kernels (measured level with fp32 weights at 2
# and 8 rows).
MATVEC_MAX_ROWS = 1


def matvec(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x (R, K) @ weight (N, K).T -> (R, N)`` in ``x``'s dtype, as one fused loop under Inductor.

    One product-and-sum per row of ``x``, each over the same (N, K) range: Inductor fuses
    them into one kernel that loads each weight row once and vectorizes along K, so R
    rows cost about one pass over the weights. (A single broadcast product over
    (N, R, K) instead gets vectorized along R for R > 1, with a scalar loop over K:
    up to 20x slower in a whole model at R = 2.)
    """
    return torch.stack([(weight * x[row]).sum(-1) for row in range(x.shape[0])])


class WeightOnlyLinear(nn.Module):
    """An ``nn.Linear`` whose weight is stored in 16 bits and used in the input's dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("weight", weight)  # (out_features, in_features), bf16 or fp16
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype) -> WeightOnlyLinear:
        return cls(linear.weight.detach().to(dtype), linear.bias)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if torch.compiler.is_compiling() and rows <= MATVEC_MAX_ROWS:  # Inductor's fused loop
            y = matvec(x.reshape(rows, x.shape[-1]), self.weight).reshape(*x.shape[:-1], self.out_features)
        elif x.dtype == torch.float32 and kernels.serves(x):  # the C++ kernel: weights widened in registers
            y = kernels.half_linear(x, self.weight)
        else:
            return F.linear(x, self.weight.to(x.dtype), self.bias)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight={self.weight.dtype}"


class WeightOnlyEmbedding(nn.Module):
    """An ``nn.Embedding`` whose table is stored in 16 bits; looked-up rows come out in ``dtype``.

    A lookup reads only the rows it needs, so this saves memory, not time; it lets an
    embedding tied to the output head keep sharing one 16-bit table with it.
    """

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.register_buffer("weight", weight)  # (num_embeddings, dim), bf16 or fp16
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, {self.weight.shape[1]}, weight={self.weight.dtype}"


def quantize_weights(model: nn.Module, dtype: str | torch.dtype) -> nn.Module:
    """Store every ``nn.Linear`` and ``nn.Embedding`` weight of ``model`` in ``dtype`` ("bf16" or "fp16"), in place.

    The model must be in fp32 (the dtype its arithmetic keeps). A weight shared by
    several modules, such as an output head tied to the token embedding, stays one
    shared 16-bit tensor. The model is for inference from then on: the stored weights
    are buffers, not trainable parameters.
    """
    if isinstance(dtype, str):
        if dtype not in WEIGHT_DTYPES:
            raise ValueError(f"unknown weight dtype {dtype!r}; choose one of {', '.join(WEIGHT_DTYPES)}")
        dtype = WEIGHT_DTYPES[dtype]
    if dtype not in WEIGHT_DTYPES.values():
        raise ValueError(f"weight-only storage is bf16 or fp16, not {dtype}")
    floating = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if floating - {torch.float32}:
        raise ValueError(f"weight-only storage keeps the arithmetic in fp32, but the model holds "
                         f"{', '.join(sorted(str(d) for d in floating))} parameters; load it in fp32")
    stored: dict[int, torch.Tensor] = {}  # id of an fp32 weight -> its 16-bit copy, made once

    def small(weight: torch.Tensor) -> torch.Tensor:
        if id(weight) not in stored:
            stored[id(weight)] = weight.detach().to(dtype)
        return stored[id(weight)]

    targets = [(name, module) for name, module in model.named_modules(remove_duplicate=False)
               if isinstance(module, (nn.Linear, nn.Embedding)) and name]
    for name, module in targets:
        if isinstance(module, nn.Linear):
            replacement: nn.Module = WeightOnlyLinear(small(module.weight), module.bias)
        else:
            replacement = WeightOnlyEmbedding(small(module.weight), torch.float32)
        model.set_submodule(name, replacement)
    return model
