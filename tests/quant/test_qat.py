"""Quantization-aware training: the forward pass sees the quantized weights, the gradient reaches the float ones,
and the integer checkpoint holds exactly what training used."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import InputError
from lmforge.model import DecoderLM, preset
from lmforge.quant.integer import QuantSpec, dequantize, quantize_model, quantize_tensor
from lmforge.quant.qat import QATEmbedding, QATLinear, fake_quantize, prepare_qat, qat_spec


def test_fake_quantization_rounds_forward_and_passes_the_gradient_straight_through():
    torch.manual_seed(0)
    weight = torch.randn(8, 32, requires_grad=True)
    spec = QuantSpec(4, "asymmetric", "group", 16)
    rounded = fake_quantize(weight, spec)
    assert torch.equal(rounded.detach(), dequantize(*quantize_tensor(weight, spec)))
    assert not torch.equal(rounded.detach(), weight.detach())  # 4 bits: the values do change
    upstream = torch.randn(8, 32)
    (rounded * upstream).sum().backward()
    assert torch.equal(weight.grad, upstream)  # round() skipped in the backward pass


@pytest.mark.parametrize("tie", [False, True], ids=["own head", "tied head"])
def test_qat_layers_share_the_weights_and_convert_exactly(tie):
    torch.manual_seed(0)
    model = DecoderLM(preset("tiny", vocab_size=97, tie_embeddings=tie)).eval()
    spec = qat_spec("int4")
    weights_before = {name: p for name, p in model.named_parameters()}
    assert prepare_qat(model, spec) == 7 * model.config.num_layers + 1
    assert isinstance(model.blocks[0].attn.q_proj, QATLinear)
    if tie:  # the table is rounded where it is looked up and where it is the head
        assert isinstance(model.embed, QATEmbedding) and model.lm_head.weight is model.embed.weight
    assert dict(model.named_parameters()).keys() == weights_before.keys()  # same names: the same checkpoints
    assert all(p is weights_before[name] for name, p in model.named_parameters())  # the same tensors
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        trained_view = model(ids)  # what the loss saw
    quantize_model(model, spec)  # QATLinear is an nn.Linear: converted like one
    with torch.no_grad():
        torch.testing.assert_close(model(ids), trained_view, rtol=0, atol=1e-5)
    with pytest.raises(InputError, match="--qat"):
        qat_spec("int2")
