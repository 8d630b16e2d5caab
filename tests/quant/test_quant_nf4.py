import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.quant import NF4_LEVELS, NF4Linear, NF4Tensor, nf4_levels_from_normal, quantize_model_nf4


def normal_weight(shape=(256, 512), std=0.02, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator) * std


def int4_absmax_roundtrip(weight: torch.Tensor, block_size: int) -> torch.Tensor:
    """Plain blockwise absmax int4 (uniform levels -7..7), the baseline NF4 should beat."""
    blocks = weight.reshape(-1, block_size)  # (nb, B)
    absmax = blocks.abs().amax(dim=1, keepdim=True)  # (nb, 1)
    codes = torch.round(blocks / absmax * 7).clamp(-7, 7)
    return (codes * absmax / 7).view_as(weight)


def test_levels_derived_from_normal_quantiles_match_the_constant():
    derived = nf4_levels_from_normal()
    assert derived.shape == (16,) and derived.dtype == torch.float32
    torch.testing.assert_close(derived, NF4_LEVELS, rtol=0, atol=1e-6)
    assert (NF4_LEVELS > 0).sum() == 8 and (NF4_LEVELS < 0).sum() == 7 and (NF4_LEVELS == 0).sum() == 1


def test_every_dequantized_value_is_a_level_times_its_block_scale():
    weight = normal_weight()
    quantized = NF4Tensor.quantize(weight)
    restored = quantized.dequantize()
    assert restored.shape == weight.shape and restored.dtype == torch.float32
    scales = quantized.scales()  # (nb,)
    assert scales.shape == (weight.numel() // 64,)
    ratios = restored.reshape(-1, 64) / scales[:, None]  # (nb, 64)
    distance = (ratios[..., None] - NF4_LEVELS).abs()  # (nb, 64, 16)
    assert distance.min(dim=-1).values.max() < 1e-6
    # And the level chosen is the nearest one to the weight divided by that same scale.
    nearest = (weight.reshape(-1, 64)[..., None] / scales[:, None, None] - NF4_LEVELS).abs().argmin(dim=-1)
    assert torch.equal(distance.argmin(dim=-1), nearest)


def test_nf4_error_is_small_and_beats_uniform_int4():
    weight = normal_weight()
    nf4_error = (NF4Tensor.quantize(weight).dequantize() - weight).abs().mean().item()
    int4_error = (int4_absmax_roundtrip(weight, 64) - weight).abs().mean().item()
    # Measured: NF4 1.46e-3, int4 absmax 1.83e-3 (NF4/int4 ~ 0.80) for std 0.02, block 64.
    assert nf4_error < 2.2e-3
    assert nf4_error < 0.9 * int4_error


def test_double_quantized_scales_are_within_one_percent():
    weight = normal_weight()
    quantized = NF4Tensor.quantize(weight)
    exact = weight.reshape(-1, 64).abs().amax(dim=1)  # (2048,) blocks
    relative = (quantized.scales() - exact).abs() / exact
    assert relative.max() < 0.01  # measured ~0.4% worst, far less on average
    assert quantized.absmax_codes.dtype == torch.int8
    assert quantized.absmax_scales.shape == (2048 // 256,) and quantized.absmax_scales.dtype == torch.float32
    torch.testing.assert_close(quantized.absmax_mean, exact.mean())


def test_scale_blocks_need_not_divide_the_number_of_blocks():
    weight = normal_weight((3, 64 * 100), seed=1)  # 300 blocks: one full group of 256 and one of 44
    quantized = NF4Tensor.quantize(weight)
    assert quantized.absmax_scales.shape == (2,) and quantized.absmax_codes.shape == (300,)
    exact = weight.reshape(-1, 64).abs().amax(dim=1)
    assert ((quantized.scales() - exact).abs() / exact).max() < 0.01


def test_storage_is_about_four_bits_per_parameter():
    weight = normal_weight()
    quantized = NF4Tensor.quantize(weight)
    assert quantized.packed.dtype == torch.uint8 and quantized.packed.numel() == weight.numel() // 2
    num_blocks = weight.numel() // 64
    expected = (
        weight.numel() // 2 + num_blocks + 4 * (num_blocks // 256) + 4
    )  # codes, scale codes, scales, mean
    assert quantized.nbytes == expected
    bits = 8 * quantized.nbytes / weight.numel()
    assert bits < 4.2  # 4.127; a fp32 scale per block of 64 would be 4.5
    assert quantized.bits_per_parameter == pytest.approx(bits)


def test_packing_two_codes_per_byte_round_trips_the_levels_exactly():
    # Weights that are exactly the levels times a power of two quantize without error.
    levels = NF4_LEVELS.repeat(4 * 256)  # (16384,): 256 blocks of 64, absmax 1 in each
    quantized = NF4Tensor.quantize(levels.view(128, 128) * 0.5)
    assert torch.equal(quantized.dequantize().view(-1), levels * 0.5)


def test_dequantize_dtype_and_to_device():
    quantized = NF4Tensor.quantize(normal_weight((64, 128)))
    assert quantized.dequantize(torch.bfloat16).dtype == torch.bfloat16
    moved = quantized.to("cpu")
    assert moved.device.type == "cpu"
    assert torch.equal(moved.dequantize(), quantized.dequantize())


def test_size_not_divisible_by_block_size_raises_clear_error():
    with pytest.raises(ValueError, match="multiple of block_size=64"):
        NF4Tensor.quantize(torch.randn(3, 10))
    with pytest.raises(ValueError, match="floating-point"):
        NF4Tensor.quantize(torch.ones(64, dtype=torch.int64))
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(10, 3))
    with pytest.raises(ValueError, match="'1'.*multiple of block_size=64"):
        quantize_model_nf4(model)


def make_layer(bias=True) -> tuple[nn.Linear, NF4Linear]:
    torch.manual_seed(0)
    linear = nn.Linear(128, 96, bias=bias)
    return linear, NF4Linear.from_linear(linear)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_nf4_linear_matches_f_linear_with_dequantized_weight(dtype, bias):
    linear, layer = make_layer(bias)
    x = torch.randn(2, 5, 128, dtype=dtype)
    weight = NF4Tensor.quantize(linear.weight).dequantize(dtype)
    expected = F.linear(x, weight, None if linear.bias is None else linear.bias.detach().to(dtype))
    out = layer(x)
    assert out.dtype == dtype and out.shape == (2, 5, 96)
    assert torch.equal(out, expected)
    # Close to the unquantized layer too (a sanity bound, not the point of the test).
    reference = linear(x.float()).detach()
    assert (out.float() - reference).abs().mean() < 0.1 * reference.abs().mean()


def test_nf4_linear_is_frozen_but_passes_gradients_to_its_input():
    _, layer = make_layer()
    assert list(layer.parameters()) == []
    assert layer.in_features == 128 and layer.out_features == 96
    x = torch.randn(3, 128, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, layer.weight.sum(dim=0).expand(3, -1))


def test_weight_property_reports_shape_and_dtype():
    _, layer = make_layer()
    assert layer.weight.shape == (96, 128) and layer.weight.dtype == torch.float32
    assert torch.equal(layer.weight, layer.quantized.dequantize())
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    # The scale buffers are part of the format and stay fp32 through a dtype cast.
    assert layer.absmax_scales.dtype == torch.float32 and layer.absmax_mean.dtype == torch.float32
    assert layer.packed.dtype == torch.uint8 and layer.absmax_codes.dtype == torch.int8


def test_state_dict_round_trip_and_to_device():
    _, layer = make_layer()
    state = layer.state_dict()
    assert set(state) == {"packed", "absmax_codes", "absmax_scales", "absmax_mean", "bias"}
    fresh = NF4Linear(128, 96, bias=True)
    fresh.load_state_dict(state)
    x = torch.randn(4, 128)
    assert torch.equal(fresh(x), layer(x))
    moved = layer.to("cpu")
    assert moved is layer and moved.packed.device.type == "cpu"
    assert torch.equal(moved(x), fresh(x))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
        self.proj = nn.Linear(64, 64, bias=False)

    def forward(self, x):
        return self.proj(self.mlp(x))


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 64)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.lm_head = nn.Linear(64, 50, bias=False)
        self.lm_head.weight = self.embed.weight  # tied

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(x)


def test_quantize_model_replaces_nested_linears_and_skips_lm_head():
    torch.manual_seed(0)
    model = TinyLM()
    ids = torch.randint(0, 50, (2, 7))
    before = model(ids).detach()
    assert quantize_model_nf4(model) is model
    for block in model.blocks:
        assert isinstance(block.mlp[0], NF4Linear) and isinstance(block.mlp[2], NF4Linear)
        assert isinstance(block.proj, NF4Linear) and block.proj.bias is None
        assert not any(p.requires_grad for p in block.parameters())
        assert list(block.parameters()) == []
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.embed.weight
    after = model(ids)
    assert after.shape == before.shape
    assert (after - before).abs().mean() < 0.2 * before.abs().mean()


def test_quantize_model_custom_skip_and_lmforge_model():
    from lmforge.model import DecoderLM, preset

    torch.manual_seed(0)
    model = DecoderLM(preset("tiny", vocab_size=97)).eval()
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    ids = torch.randint(0, 97, (1, 9))
    before = model(ids).detach()
    quantize_model_nf4(model, skip=lambda name: name.endswith("lm_head") or name == "blocks.0.attn.q_proj")
    replaced = {name for name, module in model.named_modules() if isinstance(module, NF4Linear)}
    kept = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    assert replaced | kept == set(linears) and len(replaced) > 0
    assert kept == {"lm_head", "blocks.0.attn.q_proj"}
    assert model.lm_head.weight is model.embed.weight  # the tie survives
    after = model(ids)
    assert (after - before).abs().mean() < 0.2 * before.abs().mean()


def test_quantize_model_on_a_bare_linear_returns_the_replacement():
    linear = nn.Linear(64, 32)
    assert isinstance(quantize_model_nf4(linear), NF4Linear)


def test_backward_gives_the_input_gradient_without_keeping_the_fp32_weight():
    torch.manual_seed(0)
    layer = NF4Linear.from_linear(torch.nn.Linear(128, 256))
    x = torch.randn(4, 128, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = layer(x)
    assert max(saved, default=0) < 128 * 256  # the dequantized (256, 128) weight is not kept for backward
    out.square().sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x_ref, layer.quantized.dequantize(), layer.bias).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
