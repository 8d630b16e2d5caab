"""Weights laid out for the CPU's matrix products: faster eager inference in bf16 and fp32.

A bf16 ``F.linear`` on a CPU asks oneDNN to multiply by a weight in PyTorch's row-major
layout, which oneDNN reorders into its own blocked layout on every call. Reordered once,
ahead of time, the same product reads the weight straight through: on a 2-core Intel Xeon
with AMX, SmolLM2-135M's 120 layer products (every weight read from memory, as in a
decode step) took 11.5-12.3 ms instead of 17.6 at 1 to 16 rows, and 15.9 instead of
24.4 at 60 rows (a prefill of a short prompt beside decoding rows). The results are the
plain product's bits wherever it multiplies two or more rows (1,800 random products of
SmolLM2's shapes and a 64 x 64 layer, 1 to 16 rows: no difference). One row alone the
plain product hands to another kernel, which now and then rounds differently (1 of 300
random inputs to a 64 x 64 layer); the packed product gives a row the same bits alone or
among others, which keeps speculative decoding exact (docs/QUANTIZATION.md).

On a CPU with AVX-512 BF16 and no AMX (AMD Zen 4, Intel Cooper Lake) bf16 weights are laid out
in pairs for lmforge's own dot-product kernel instead (:func:`lmforge.quant.kernels.bf16_linear`):
16 rows side by side, two inputs of each in 4 bytes, one ``vdpbf16ps`` for both inputs of 16 rows.
On a 2-core Zen 4 SmolLM2's 121 products (every weight read from memory) took 9.0 ms at one row
against 13.8 packed by oneDNN (1.3-1.7x at 1-8 rows, 1.1-1.2x at 16-32, 0.9-1.1x per layer at
512-2,048 prompt rows). Its sums run in another order than oneDNN's (the last bits differ); a row's
bits are its own at any row count. ``LMFORGE_BF16_KERNEL=off`` keeps oneDNN's
layout; ``=on`` takes the kernel on AMX CPUs too (not measured there).

fp32 weights are laid out 16 rows side by side for lmforge's fp32 kernel where
:func:`lmforge.quant.kernels.f32_dots` (AVX-512 CPUs without AMX; ``LMFORGE_F32_KERNEL=off|on``): on a 2-core
Zen 4 PyTorch's fp32 products (MKL) ran SmolLM2's compiled 16-row decode step at about 45 GFLOP/s; the kernel
took 1.3-3.5x less time at 1-256 rows, the compiled step 131 -> 43 ms at 16 rows and 41 -> 23 at one
(docs/BENCHMARKS.md). Each output is one chain of FMAs in input order: a row's bits are its own.

Elsewhere an fp32 ``F.linear`` multiplies by the weight transposed (``x @ W.T``); for a few rows
PyTorch's BLAS was up to three times as slow at that as at ``x @ Wt`` with ``Wt`` (in, out) stored
in memory order. The fp32 copy is that transpose: 2 cores, Intel Xeon, 8 rows, plain / copy
(us): a 256 x 8,292 output layer 585 / 263, 576 x 960 142 / 64, 512 x 2,048 266 / 150;
at one row and at 64 the same within noise. Its sums run in another order than the plain
product's, so the last bits differ (at most 5e-5 in outputs up to about 60: random 256-input
layers); in both products a row alone and the same row among others differ as much.

Inductor's ``freezing`` does this inside a compiled step (:mod:`lmforge.infer.compiled`);
:func:`pack_weights` does it for the eager passes: the batched engine's prefill passes,
and every step where nothing is compiled. It costs a second copy of each weight in
memory, the packed one, kept beside the parameter, which stays what it was: state dicts,
LoRA, exports and a compiled step see the plain model.

The packed path is taken only where it computes what ``F.linear`` would: no autograd, not
while Dynamo traces (except the bf16 kernel's pairs: a compiled step calls the kernel too,
1.2-1.5x fewer ms a step than Inductor's own products at 1-16 rows without autotuning, about
5% more at one row with it), an input of the weight's dtype on the CPU, and the weight unchanged
since it was packed (the same tensor, storage and version); otherwise the product is the
plain one.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.quant import kernels

# The row count oneDNN is told to expect when it chooses the packed layout. Measured the same
# from 1 to 700 rows with 16 on SmolLM2's shapes, so one packing serves every pass.
ROWS_HINT = 16


def available(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether packing helps here: on a CPU, fp32, or bf16 where oneDNN has native bf16 kernels,
    unless the environment says ``LMFORGE_PACKED_WEIGHTS=off`` (to measure against the plain
    products)."""
    if switched_off() or torch.device(device).type != "cpu":
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and _bf16_kernels())


def switched_off() -> bool:
    """``LMFORGE_PACKED_WEIGHTS=off``: no packed copies (these, nor the integer layers' interleaved codes)."""
    return os.environ.get("LMFORGE_PACKED_WEIGHTS", "on") == "off"


def _bf16_kernels() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _packs(weight: torch.Tensor) -> bool:
    """Whether :func:`pack_weights` gives this weight a packed copy: fp32, or bf16 with oneDNN's kernels."""
    return weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16 and _bf16_kernels())


class PackedWeight:
    """A weight in the layout its products read fastest, and the identity of the tensor it was made
    from: bf16 reordered into oneDNN's blocks or in pairs for the bf16 kernel, fp32 in blocks of 16 rows for the
    fp32 kernel or transposed to (in, out) in memory order."""

    def __init__(self, weight: torch.Tensor):
        self.source = weight
        self.pointer, self.version = weight.data_ptr(), weight._version
        fp32 = weight.dtype == torch.float32
        self.blocks = fp32 and kernels.f32_dots()  # the fp32 kernel's layout
        self.transposed = fp32 and not self.blocks
        self.pairs = not fp32 and kernels.bf16_dots()  # the dot-product kernel's layout
        with torch.no_grad():
            if self.blocks:
                self.tensor = kernels.f32_blocks(weight)
            elif self.transposed:
                self.tensor = weight.detach().t().contiguous()
            elif self.pairs:
                self.tensor = kernels.bf16_pairs(weight)
            else:
                self.tensor = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), ROWS_HINT)

    def __reduce__(self):
        """A copy or a pickle of a model leaves the packed copy behind (its layers take the plain path):
        oneDNN's layout is an opaque tensor that does not pickle, and a copy's weights are new tensors."""
        return _nothing, ()

    def serves(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether ``x @ weight.T`` may use the packed copy: same results, no gradient to lose."""
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            return False
        if torch.compiler.is_compiling():
            # oneDNN's layout and the transposed one: the compiled step freezes and packs the plain weight on its
            # own. Pairs and blocks: the kernels run in the graph too (a graph is frozen on the weights it traced)
            if self.pairs:
                return weight is self.source and x.dtype == torch.bfloat16 and kernels.bf16_dots()
            return self.blocks and weight is self.source and x.dtype == torch.float32 and kernels.f32_dots()
        return (weight is self.source and weight.data_ptr() == self.pointer and weight._version == self.version
                and x.dtype == weight.dtype and x.device.type == "cpu")


def _nothing() -> None:
    return None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           packed: PackedWeight | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through ``packed`` where it serves."""
    if packed is not None and packed.serves(x, weight):
        if packed.transposed:
            y = torch.matmul(x, packed.tensor)
            return y if bias is None else y.add_(bias)
        if packed.pairs:
            if kernels.bf16_dots():  # (not when a test moved the kernels to a lower instruction set)
                return kernels.bf16_linear(x, packed.tensor, bias, weight.shape[0])
            return F.linear(x, weight, bias)
        if packed.blocks:
            if kernels.f32_dots():
                return kernels.f32_linear(x, packed.tensor, bias, weight.shape[0])
            return F.linear(x, weight, bias)
        return torch.ops.mkldnn._linear_pointwise(x, packed.tensor, bias, "none", [None], "")
    return F.linear(x, weight, bias)


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` with a packed copy of its weight (:func:`pack_weights` turns a layer into one
    in place: same parameters, names and state dict)."""

    packed: PackedWeight | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.packed)


def pack_weights(model: nn.Module) -> int:
    """Give every plain ``nn.Linear`` of ``model`` (and every fused group of
    :mod:`lmforge.model.fused`) a packed copy of its weight; returns how many were packed.

    For inference, after the weights have their final dtype and the projections are fused
    (``lmforge.load`` calls it through :func:`lmforge.model.fused.inference_layout` where
    :func:`available`). Layers already packed, integer layers, the members of an intact fused
    group and weights of another dtype than fp32 or bf16 (bf16 only with oneDNN's bf16 kernels)
    are left alone (a LoRA wrapper is too; the plain base layer inside it is packed like any other).
    """
    from lmforge.model.fused import FusedLinear

    groups = [value for module in model.modules() for value in vars(module).values()
              if type(value) is FusedLinear]  # fused groups are plain attributes, not submodules
    fused = {id(member) for group in groups if group.intact() for member in group.members}
    made = 0
    for group in groups:
        if group.intact() and _packs(group.weight) and group.packed is None:
            group.packed = PackedWeight(group.weight)
            made += 1
    for module in model.modules():
        # a fused group's members compute only where the group cannot (with autograd): not packed
        if type(module) is nn.Linear and _packs(module.weight) and id(module) not in fused:
            module.__class__ = PackedLinear
            module.packed = PackedWeight(module.weight)
            made += 1
    return made
