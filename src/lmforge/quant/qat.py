"""Quantization-aware training (QAT): train with the weights the quantized model will have.

Post-training quantization rounds weights the training never saw rounded. QAT, as the
notes put it, keeps full-precision master weights, runs the forward pass with their
quantized version, and updates the full-precision weights in the backward pass:

    w_q = dequantize(quantize(w))            # what the integer checkpoint will hold
    forward:  y = x @ w_q.T                  # the loss sees the rounding
    backward: dL/dw := dL/dw_q               # straight-through estimator: round() has zero
                                             # gradient almost everywhere, so it is skipped

written ``w + (w_q - w).detach()``: the value of ``w_q``, the gradient of ``w``. The
master weights drift to where rounding costs the loss least. At the end
:func:`lmforge.quant.integer.quantize_model` with the same :class:`QuantSpec` stores
exactly the ``w_q`` the training used.

``lmforge pretrain --qat int8|int4`` and ``lmforge sft --qat int8|int4`` (full
fine-tuning) do this and write ``OUT_DIR/quantized`` with its report.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import InputError
from lmforge.quant.integer import (
    QuantSpec,
    _set_module,
    check_group_size,
    dequantize,
    quantizable_layers,
    quantize_tensor,
)

QAT_SPECS = {"int8": QuantSpec(8, "symmetric", "channel"), "int4": QuantSpec(4, "asymmetric", "group", 32)}


def qat_spec(name: str) -> QuantSpec:
    if name not in QAT_SPECS:
        raise InputError(f"unknown --qat {name!r}; choose {' or '.join(QAT_SPECS)}")
    return QAT_SPECS[name]


def fake_quantize(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``weight``'s quantized-then-dequantized values, with the gradient passing straight through to ``weight``."""
    with torch.no_grad():
        rounded = dequantize(*quantize_tensor(weight, spec)).to(weight.dtype)
    return weight + (rounded - weight).detach()


class QATLinear(nn.Linear):
    """An ``nn.Linear`` whose forward pass uses its fake-quantized weight; same parameters, same names."""

    spec: QuantSpec

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec) -> QATLinear:
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features, layer.spec = linear.in_features, linear.out_features, spec
        layer.weight, layer.bias = linear.weight, linear.bias  # the same Parameter objects: the optimizer's
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, fake_quantize(self.weight, self.spec), self.bias)


class QATEmbedding(nn.Embedding):
    """An ``nn.Embedding`` whose lookups read its fake-quantized table; same parameter, same name."""

    spec: QuantSpec

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, spec: QuantSpec) -> QATEmbedding:
        layer = cls.__new__(cls)
        layer.__dict__.update(embedding.__dict__)  # its settings, and the same Parameter object
        layer.spec = spec
        return layer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, fake_quantize(self.weight, self.spec))


def prepare_qat(model: nn.Module, spec: QuantSpec) -> int:
    """Make every layer :func:`quantize_model` would quantize use its fake-quantized weight (:class:`QATLinear`;
    a table tied to the head: :class:`QATEmbedding` and the head a :class:`QATLinear` over the same
    parameter); returns how many layers."""
    check_group_size(model, spec)  # a group size that does not divide: said before training starts
    names = quantizable_layers(model)
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, nn.Embedding):
            _set_module(model, name, QATEmbedding.from_embedding(module, spec))
            model.lm_head = QATLinear.from_linear(model.lm_head, spec)  # (its weight is the table)
            continue
        _set_module(model, name, QATLinear.from_linear(module, spec))
    return len(names)
