"""The integer-weight CPU kernels (lmforge.quant.kernels) against the dequantize-then-multiply reference."""

from __future__ import annotations

import copy

import pytest
import torch

from lmforge.infer import CompiledDecodeStep, SamplingConfig, generate
from lmforge.model import DecoderLM, KVCache, preset
from lmforge.quant import kernels
from lmforge.quant.integer import (
    IntLinear,
    QuantSpec,
    quantize_activations,
    quantize_model,
    quantize_tensor,
)

pytestmark = pytest.mark.skipif(not kernels.available(), reason="the integer kernels did not build here")

SPECS = [QuantSpec(8, "symmetric", "channel"), QuantSpec(8, "symmetric", "tensor"),
         QuantSpec(8, "asymmetric", "group", 16), QuantSpec(4, "symmetric", "group", 32),
         QuantSpec(4, "asymmetric", "group", 16), QuantSpec(4, "symmetric", "channel"),
         QuantSpec(4, "asymmetric", "tensor")]
# (inputs, outputs): widths that fill whole AVX-512 and AVX2 vectors, and widths that leave tails
SHAPES = [(128, 40), (96, 7), (80, 33)]


def isas() -> list[str]:
    """The instruction sets this CPU can run: the best one and every one below it."""
    order = ["scalar", "avx2", "avx512"]
    return order[:order.index(kernels.best_isa()) + 1]


@pytest.fixture
def restore_isa():
    yield
    kernels.set_isa("best")


def run_kernel(layer: IntLinear, x: torch.Tensor) -> torch.Tensor:
    return kernels.int_linear(x, layer.qweight, layer.scale, layer.zero, layer.spec.bits, layer.offset)


@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: spec.name.replace(" ", "-"))
def test_kernel_equals_dequantize_then_multiply(isa, spec, restore_isa):
    kernels.set_isa(isa)
    assert kernels.isa() == isa
    torch.manual_seed(0)
    for inputs, outputs in SHAPES:
        if spec.granularity == "group" and inputs % spec.group_size:
            continue
        weight = torch.randn(outputs, inputs) * torch.linspace(0.2, 2, outputs)[:, None] + 0.1
        layer = IntLinear.from_linear(torch.nn.Linear(inputs, outputs, bias=False), spec)
        layer.set_codes(*quantize_tensor(weight, spec))
        reference_weight = layer.dequantized()
        for rows in (1, 2, 3, 4, 5, 6, 8, 9):
            x = torch.randn(rows, inputs)
            y = run_kernel(layer, x)
            expected = x.double() @ reference_weight.double().T
            # every product is exact; only the order of the fp32 sums differs from the reference
            bound = 1e-5 * (x.abs().double() @ reference_weight.abs().double().T) + 1e-6
            assert y.shape == (rows, outputs) and y.dtype == torch.float32
            assert ((y.double() - expected).abs() <= bound).all(), (inputs, outputs, rows)


def test_isas_agree_and_bad_calls_are_refused(restore_isa):
    torch.manual_seed(1)
    layer = IntLinear.from_linear(torch.nn.Linear(64, 24), QuantSpec(4, "asymmetric", "group", 32))
    x = torch.randn(2, 3, 64)  # any leading shape
    results = []
    for isa in isas():
        kernels.set_isa(isa)
        results.append(run_kernel(layer, x))
    assert results[0].shape == (2, 3, 24)
    for other in results[1:]:
        torch.testing.assert_close(other, results[0])
    with pytest.raises(RuntimeError, match="inputs"):
        run_kernel(layer, torch.randn(1, 63))
    with pytest.raises(RuntimeError, match="unknown instruction set"):
        kernels.set_isa("sse9")
    eight = IntLinear.from_linear(torch.nn.Linear(80, 4), QuantSpec(8, activations="dynamic"))
    with pytest.raises(RuntimeError, match="multiple of 32"):  # activation groups need whole groups of 32
        kernels.int_linear_a8(torch.randn(1, 80), eight.qweight, eight.scale, None, None, 8, 0, act_group=32)
    with pytest.raises(RuntimeError, match="groups are of 32"):
        kernels.int_linear_a8(torch.randn(1, 80), eight.qweight, eight.scale, None, None, 8, 0, act_group=16)


def test_activation_groups_keep_an_outlier_to_its_own_32_inputs():
    """One large input in a row: with one scale a row it leaves the other inputs a few levels; with a scale
    every 32 inputs only its own group loses precision, and the layer's output is closer to the float one."""
    torch.manual_seed(2)
    x = torch.randn(3, 512) * 0.1
    x[:, 5] = 40.0
    rounded, scale = quantize_activations(x, None, group=32)
    error = (rounded * scale - x).abs()
    assert (error[:, 32:] <= x[:, 32:].abs().amax() / 254 + 1e-7).all()  # the other groups: their own step
    rounded_row, scale_row = quantize_activations(x, None)
    assert (rounded_row * scale_row - x)[:, 32:].abs().max() > 10 * error[:, 32:].max()
    linear = torch.nn.Linear(512, 16, bias=False)
    errors = {}  # the outlier's own 31 neighbours round to about 0 either way; with one scale, all 511 do
    for mode in ("group", "dynamic"):  # against the same integer weights with float inputs
        layer = IntLinear.from_linear(linear, QuantSpec(8, activations=mode))
        errors[mode] = (layer(x) - x @ layer.dequantized().T).abs().max()
    assert errors["group"] < errors["dynamic"] / 2


def test_int_layer_uses_the_kernel_for_few_rows(monkeypatch):
    torch.manual_seed(2)
    linear = torch.nn.Linear(64, 32)
    layer = IntLinear.from_linear(linear, QuantSpec(8))
    calls = []
    kernel = kernels.int_linear
    monkeypatch.setattr(kernels, "int_linear", lambda *args: calls.append(args[0].shape) or kernel(*args))
    x = torch.randn(1, 1, 64)
    torch.testing.assert_close(layer(x), layer.reference(x))
    assert calls == [(1, 1, 64)]
    many = torch.randn(1, kernels.KERNEL_MAX_ROWS + 1, 64)  # a prompt: the reference's matrix kernels
    torch.testing.assert_close(layer(many), layer.reference(many), rtol=0, atol=0)
    assert len(calls) == 1
    bf16 = layer(x.bfloat16())  # bf16 activations: fp32 inside, the input's dtype out
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.float(), layer.reference(x), rtol=2e-2, atol=2e-2)


@pytest.mark.slow
@pytest.mark.parametrize("spec", [QuantSpec(8), QuantSpec(4, "asymmetric", "group", 32)], ids=["int8", "int4"])
def test_quantized_model_decodes_alike_with_kernel_reference_and_compiled_step(spec, monkeypatch):
    torch.manual_seed(0)
    model = DecoderLM(preset("tiny", vocab_size=96, tie_embeddings=False, init_std=0.3)).eval()
    quantize_model(model, spec)
    prompt = [[3, 1, 4, 1, 5, 9]]
    config = SamplingConfig(max_new_tokens=12, temperature=0)
    fast = generate(model, prompt, config)
    step = CompiledDecodeStep(model, max_autotune=False)  # the op goes into the graph as an opaque kernel
    assert generate(model, prompt, config, decode_step=step) == fast
    monkeypatch.setattr(kernels, "available", lambda: False)
    assert generate(model, prompt, config) == fast


A8_SPECS = [(8, "symmetric", "channel"), (8, "symmetric", "group"), (8, "symmetric", "tensor"),
            (4, "symmetric", "group"), (4, "asymmetric", "group"), (4, "symmetric", "channel"),
            (4, "asymmetric", "tensor")]


@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("activations", ["group", "dynamic", "static"])
@pytest.mark.parametrize("method", A8_SPECS, ids=lambda m: f"int{m[0]}-{m[1]}-{m[2]}")
def test_int8_activation_kernel_equals_its_reference(isa, activations, method, restore_isa):
    kernels.set_isa(isa)
    torch.manual_seed(3)
    shapes = [(128, 40), (96, 7), (160, 33), (80, 5), (192, 9)]  # whole 64-byte steps, short last ones of 16-48
    cases = [(QuantSpec(*method, 32, activations=activations), shapes)]
    if method[2] == "group":  # groups of 64: a VNNI int4 step holds 2, a half step 1
        cases.append((QuantSpec(*method, 64, activations=activations), [(128, 6), (192, 5), (320, 3)]))
    for spec, (inputs, outputs) in [(spec, shape) for spec, shapes in cases for shape in shapes]:
        if (spec.granularity == "group" and inputs % spec.group_size) or inputs % (spec.act_group or 1):
            continue
        layer = IntLinear.from_linear(torch.nn.Linear(inputs, outputs), spec)
        if activations == "static":
            layer.act_scale.fill_(2.5 / 127)  # inputs beyond 2.5 are clipped, as calibrated scales do
        for rows in (1, 3, 6):
            x = torch.randn(rows, inputs)
            got = layer(x)
            expected = layer.reference(x)
            rounded, scale = quantize_activations(x, layer.act_scale, spec.act_group)
            assert rounded.abs().max() <= 127 and torch.equal(rounded, rounded.round())
            # integer sums are exact; the scales multiply in a different order
            bound = 1e-5 * ((rounded.abs() * scale) @ layer.dequantized().abs().T) + 1e-6
            assert ((got - expected).abs() <= bound).all(), (spec.group_size, inputs, outputs, rows)
            # rows done together (VNNI int4: up to 4 a pass over the weights) give each row's own bits
            assert torch.equal(got, torch.cat([layer(row[None]) for row in x])), (spec.group_size, inputs, rows)
    many = torch.randn(kernels.KERNEL_MAX_ROWS + 1, layer.in_features)  # the reference path, rounding alike
    torch.testing.assert_close(layer(many), layer.reference(many), rtol=0, atol=0)


needs_vnni = pytest.mark.skipif(not kernels.interleaves(), reason="interleaved codes need AVX-512 VNNI")


@needs_vnni
@pytest.mark.parametrize("activations", ["group", "dynamic", "static"])
@pytest.mark.parametrize("method", A8_SPECS, ids=lambda m: f"int{m[0]}-{m[1]}-{m[2]}")
def test_interleaved_codes_give_the_row_layouts_products(activations, method, restore_isa):
    """The VNNI kernel over 16 rows interleaved: the same integer sums as the reference, each row's bits its
    own whatever the rows beside it; outputs that do not fill a block of 16 (7, 33, 40) are written, no more."""
    import copy

    torch.manual_seed(6)
    shapes = [(128, 40), (96, 7), (160, 33), (576, 48), (64, 16)]
    cases = [(QuantSpec(*method, 32, activations=activations), shapes)]
    if method[2] == "group":
        cases.append((QuantSpec(*method, 64, activations=activations), [(128, 6), (192, 21)]))
    for spec, (inputs, outputs) in [(spec, shape) for spec, shapes in cases for shape in shapes]:
        if (spec.granularity == "group" and inputs % spec.group_size) or inputs % 32:
            continue
        row_layout = IntLinear.from_linear(torch.nn.Linear(inputs, outputs), spec)
        if activations == "static":
            row_layout.act_scale.fill_(2.5 / 127)
        layer = copy.deepcopy(row_layout)
        assert layer.interleave() and layer.il_codes.shape[0] == -(-outputs // 16)
        assert set(layer.state_dict()) == set(row_layout.state_dict())  # a second copy, never saved
        for rows in (1, 3, 6, kernels.KERNEL_MAX_ROWS + 5):  # the last a prompt's: the kernel still, not the reference
            x = torch.randn(rows, inputs)
            got = layer(x)
            rounded, scale = quantize_activations(x, layer.act_scale, spec.act_group)
            bound = 1e-5 * ((rounded.abs() * scale) @ layer.dequantized().abs().T) + 1e-6
            assert got.shape == (rows, outputs)
            assert ((got - layer.reference(x)).abs() <= bound).all(), (spec.name, inputs, outputs, rows)
            assert ((got - row_layout(x)).abs() <= 2 * bound).all()
            assert torch.equal(got, torch.cat([layer(row[None]) for row in x])), (spec.name, inputs, rows)
        kernels.set_isa("avx2")  # the interleaved codes only serve the VNNI kernel: the row layout's runs
        x = torch.randn(2, inputs)
        assert torch.equal(layer(x), row_layout(x))
        kernels.set_isa("best")
        layer.set_codes(*quantize_tensor(torch.randn(outputs, inputs), spec))  # new codes drop the copy
        assert layer.il_codes is None and layer.il_scale is None


@needs_vnni
def test_load_layout_interleaves_the_layers_that_run(monkeypatch):
    """lmforge.load's layout: a fused q/k/v or gate/up layer gets the interleaved codes, not its members; a
    weight-only layer none; LMFORGE_PACKED_WEIGHTS=off none; the decoded tokens stay the row layout's."""
    import copy

    from lmforge.model.fused import fuse_projections, interleave_integer_layers

    torch.manual_seed(0)
    model = DecoderLM(preset("tiny", vocab_size=96, tie_embeddings=False, init_std=0.3)).eval()
    quantize_model(model, QuantSpec(4, "symmetric", "group", 32, activations="group"))
    fuse_projections(model)
    plain = copy.deepcopy(model)
    monkeypatch.setenv("LMFORGE_PACKED_WEIGHTS", "off")
    assert interleave_integer_layers(model) == 0
    monkeypatch.delenv("LMFORGE_PACKED_WEIGHTS")
    blocks = len(model.blocks)
    assert interleave_integer_layers(model) == 4 * blocks + 1  # qkv, o, gate_up, down a block; the head
    block = model.blocks[0]
    assert block.attn.qkv.layer.il_codes is not None and block.attn.q_proj.il_codes is None
    prompt, config = [[3, 1, 4, 1, 5, 9]], SamplingConfig(max_new_tokens=12, temperature=0)
    assert generate(model, prompt, config) == generate(plain, prompt, config)
    weight_only = DecoderLM(preset("tiny", vocab_size=96)).eval()
    quantize_model(weight_only, QuantSpec(8))
    assert interleave_integer_layers(weight_only) == 0


@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: spec.name.replace(" ", "-"))
def test_dequantize_kernel_gives_the_references_bits(spec):
    from lmforge.quant.integer import dequantize

    torch.manual_seed(4)
    layer = IntLinear.from_linear(torch.nn.Linear(96, 24), spec)
    fast = kernels.dequantize(layer.qweight, layer.scale, layer.zero, spec.bits, layer.offset)
    assert torch.equal(fast, dequantize(layer.codes(), layer.scale, layer.zero))
    assert torch.equal(layer.dequantized(), fast)


@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_weight_kernel_equals_widen_then_multiply(isa, dtype, restore_isa, monkeypatch):
    """16-bit weights widened in registers: every product exact (a 16-bit float widens exactly), the sums
    in another order than fp32 matmul's."""
    from lmforge.quant.weight_only import WeightOnlyLinear

    kernels.set_isa(isa)
    torch.manual_seed(5)
    for inputs, outputs in SHAPES:
        weight = torch.randn(outputs, inputs).to(dtype)
        for rows in (1, 2, 3, 4, 5, 6, 8, 9):
            x = torch.randn(rows, inputs)
            y = kernels.half_linear(x, weight)
            expected = x.double() @ weight.double().T
            bound = 1e-5 * (x.abs().double() @ weight.abs().double().T) + 1e-6
            assert y.shape == (rows, outputs) and ((y.double() - expected).abs() <= bound).all(), (inputs, rows)
    layer = WeightOnlyLinear(weight, torch.randn(outputs))  # the layer takes the kernel up to 64 rows
    calls, kernel = [], kernels.half_linear
    monkeypatch.setattr(kernels, "half_linear", lambda *args: calls.append(args[0].shape) or kernel(*args))
    for rows in (1, 5, kernels.KERNEL_MAX_ROWS):
        x = torch.randn(1, rows, inputs)
        torch.testing.assert_close(layer(x), x @ weight.float().T + layer.bias, rtol=1e-5, atol=1e-5)
    assert len(calls) == 3 and calls[-1] == (1, kernels.KERNEL_MAX_ROWS, inputs)
    with pytest.raises(RuntimeError, match="fp16 or bf16"):
        kernels.half_linear(torch.randn(1, inputs), weight.float())


needs_bf16_dots = pytest.mark.skipif(not kernels.bf16_dots(), reason="bf16_linear needs AVX-512 BF16 (no AMX)")


@needs_bf16_dots
def test_bf16_dot_kernel_equals_fp32_products_rounded_once(restore_isa, monkeypatch):
    """bf16 x bf16 with AVX-512 BF16: every product exact in fp32, the sums in fp32, one rounding to bf16 at the
    end; a row's bits the same alone or among others (1-19 rows: tiles of 8 and every remainder); N not a multiple
    of 16 and an odd K (the layout's padding) included."""
    torch.manual_seed(6)
    for inputs, outputs in [*SHAPES, (577, 49), (5, 17), (1536, 16)]:
        weight = torch.randn(outputs, inputs).bfloat16()
        pairs = kernels.bf16_pairs(weight)
        assert pairs.dtype == torch.int32 and pairs.shape == (-(-outputs // 16), -(-inputs // 2), 16)
        for bias in (None, torch.randn(outputs)):
            x = torch.randn(19, inputs).bfloat16()
            y = kernels.bf16_linear(x, pairs, bias, outputs)
            exact = x.double() @ weight.double().T + (0 if bias is None else bias.double())
            bound = exact.abs() * 2.0 ** -8 + 1e-6 * (x.abs().double() @ weight.abs().double().T) + 1e-30
            assert y.dtype == torch.bfloat16 and y.shape == (19, outputs)
            assert ((y.double() - exact).abs() <= bound).all(), (inputs, outputs)
            for rows in (1, 2, 7, 8, 9, 16):
                assert torch.equal(kernels.bf16_linear(x[:rows], pairs, bias, outputs), y[:rows])
            assert torch.equal(kernels.bf16_linear(x[5:6], pairs, bias, outputs), y[5:6])
        assert torch.equal(kernels.bf16_linear(x.view(1, 19, inputs), pairs, None, outputs)[0],
                           kernels.bf16_linear(x, pairs, None, outputs))
    with pytest.raises(RuntimeError, match="bf16 activations"):
        kernels.bf16_linear(x.float(), pairs, None, outputs)
    with pytest.raises(RuntimeError, match="inputs"):
        kernels.bf16_linear(x[:, :-2], pairs, None, outputs)
    monkeypatch.setenv("LMFORGE_BF16_KERNEL", "off")
    assert not kernels.bf16_dots()
    monkeypatch.delenv("LMFORGE_BF16_KERNEL")
    kernels.set_isa("avx2")
    assert not kernels.bf16_dots()
    with pytest.raises(RuntimeError, match="AVX-512 BF16"):
        kernels.bf16_linear(x, pairs, None, outputs)


def grouped_attention_case(batch: int, heads: int, kv_heads: int, dim: int, tokens: int, keys: int, seed: int = 0,
                           dtype: torch.dtype = torch.bfloat16):
    """q (B, H, T, D) and k, v read from a larger cache (as the engine's slots: views, not copies), and a
    ragged causal mask: each slot's first new token sees its own number of keys; keys beyond are NaN."""
    torch.manual_seed(seed)
    q = torch.randn(batch, heads, tokens, dim).to(dtype)
    cache = torch.randn(2, batch, kv_heads, keys + 7, dim).to(dtype)
    seen = torch.randint(0, keys - tokens + 1, (batch, 1))
    mask = (torch.arange(keys)[None, None, :] <= (seen + torch.arange(tokens))[:, :, None])[:, None]
    cache[:, :, :, keys:] = float("nan")
    for b in range(batch):  # nothing a row may not see should matter, even NaN
        cache[:, b, :, int(seen[b]) + tokens:] = float("nan")
    return q, cache[0, :, :, :keys], cache[1, :, :, :keys], mask


f32_attention = pytest.mark.skipif(not (kernels.f32_dots() and kernels.isa() == "avx512"),
                                   reason="the fp32 attention kernel needs AVX-512 (and LMFORGE_F32_KERNEL not off)")


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, marks=needs_bf16_dots),
                                   pytest.param(torch.float32, marks=f32_attention)])
def test_grouped_attention_equals_the_reference_and_each_rows_own(dtype, monkeypatch):
    """A decoder's cached attention in C++, bf16 or fp32: within rounding of softmax(q k^T / sqrt(D)) v in float64
    (grouped heads, ragged masks, every head size it takes, a decode step's one token a row to a prompt's 40);
    masked keys add nothing, not even their NaN; a row that may see no key gives 0; each row's bits the same
    alone, among the new tokens of its slot, and in a batch of slots (where the work is split among threads by
    slot instead of by row)."""
    from lmforge.model.attention import eager_attention, sdpa_attention

    switch, tolerance = ("LMFORGE_BF16_KERNEL", 2.0 ** -8) if dtype == torch.bfloat16 else ("LMFORGE_F32_KERNEL", 1e-5)
    for batch, heads, kv_heads, dim, tokens, keys in [(1, 9, 3, 64, 1, 45), (20, 9, 3, 64, 5, 45),
                                                      (3, 8, 2, 128, 3, 45), (12, 4, 4, 32, 2, 45),
                                                      (2, 6, 1, 96, 1, 45), (2, 9, 3, 64, 40, 100)]:
        q, k, v, mask = grouped_attention_case(batch, heads, kv_heads, dim, tokens, keys, dtype=dtype)
        out = kernels.grouped_attention(q, k, v, mask)
        assert out.dtype == dtype and out.shape == q.shape and not out.isnan().any()
        reference = eager_attention(q.double(), k.double().nan_to_num(), v.double().nan_to_num(), mask=mask)
        assert ((out.double() - reference).abs() <= reference.abs() * tolerance + 1e-5).all(), (batch, dim, tokens)
        for t in range(tokens):
            assert torch.equal(kernels.grouped_attention(q[:, :, t:t + 1], k, v, mask[:, :, t:t + 1]),
                               out[:, :, t:t + 1])
        assert torch.equal(kernels.grouped_attention(q[-1:], k[-1:], v[-1:], mask[-1:]), out[-1:])
        assert torch.equal(sdpa_attention(q, k, v, mask=mask), out)  # the model's decode steps take it
    # the one-sequence loop's steps (one token a row, no mask: every cached key) take it too
    q1, k1, v1 = q[:, :, -1:], k.nan_to_num(), v.nan_to_num()
    one = kernels.grouped_attention(q1, k1, v1, torch.ones(q1.shape[0], 1, 1, k1.shape[2], dtype=torch.bool))
    assert torch.equal(sdpa_attention(q1, k1, v1), one)
    blind = mask.clone()
    blind[0] = False
    assert not kernels.grouped_attention(q, k, v, blind)[0].any()
    monkeypatch.setenv(switch, "off")  # the switch turns it off too: the fused kernel's result
    assert not kernels.attends(q, k, v)
    assert not torch.equal(sdpa_attention(q, k.nan_to_num(), v.nan_to_num(), mask=mask), out)
    assert not torch.equal(sdpa_attention(q1, k1, v1), one)
    monkeypatch.delenv(switch)
    assert not kernels.attends(q.half(), k.half(), v.half())
    other = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16  # autocast: queries in bf16, an fp32 cache
    assert not kernels.attends(q, k.to(other), v.to(other))
    if dtype == torch.bfloat16:  # decoding under bf16 autocast over an fp32 cache: the fused kernel, which casts
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert sdpa_attention(q1, k1.float(), v1.float()).dtype == torch.bfloat16
    assert not kernels.attends(q.requires_grad_(), k, v)  # no backward
    with pytest.raises(RuntimeError, match="all alike"):
        kernels.grouped_attention(q.double(), k, v, mask)
    with pytest.raises(RuntimeError, match="head size 48"):
        kernels.grouped_attention(q[..., :48], k[..., :48], v[..., :48], mask)
    with pytest.raises(RuntimeError, match="does not fit"):
        kernels.grouped_attention(q[:1], k, v, mask[:1])


@needs_bf16_dots
@pytest.mark.slow
def test_bf16_model_decodes_alike_eager_and_compiled_with_the_dot_kernels():
    """The load layout of a bf16 model (pairs) decodes through the product and attention kernels eagerly and
    inside a compiled step (opaque ops in the frozen graph): the same greedy tokens, and the kernels' logits
    within bf16 rounding of the plain model's."""
    from lmforge.infer.slot_cache import SlotKVCache, attention_mask
    from lmforge.model.fused import inference_layout

    torch.manual_seed(0)
    config = preset("tiny", vocab_size=96, tie_embeddings=False, init_std=0.3, num_heads=2, num_kv_heads=1)
    assert config.head_dim == 32  # a head size the attention kernel takes
    model = DecoderLM(config).eval().to(torch.bfloat16)
    plain = copy.deepcopy(model)
    inference_layout(model, torch.bfloat16, "cpu")
    assert model.lm_head.packed.pairs and model.blocks[0].attn.qkv.packed.pairs
    prompt = [[3, 1, 4, 1, 5, 9]]
    sampling = SamplingConfig(max_new_tokens=12, temperature=0)
    eager = generate(model, prompt, sampling)
    step = CompiledDecodeStep(model, max_autotune=False)
    assert generate(model, prompt, sampling, decode_step=step) == eager
    ids = torch.tensor([prompt[0] + eager[0]])
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).float(), plain(ids).float(), rtol=0.03, atol=0.03)
    cache = SlotKVCache.for_model(model, 2, 32)
    positions = torch.tensor([[5], [7]])
    cache.bind(positions, 8)
    with torch.no_grad():  # what a compiled engine step traces: both kernels, no graph break
        explained = torch._dynamo.explain(model)(torch.tensor([[1], [2]]), cache, positions=positions,
                                                 mask=attention_mask(positions, 8))
    assert explained.graph_break_count == 0
    targets = [node.target for graph in explained.graphs for node in graph.graph.nodes]
    attention = torch.ops.lmforge.grouped_attention
    assert sum(t in (attention, attention.default) for t in targets) == config.num_layers
    assert sum(t in (torch.ops.lmforge.bf16_linear, torch.ops.lmforge.bf16_linear.default) for t in targets) > 0
    single = KVCache.for_model(model, 1, 32)  # the one-sequence loop's step (generate, a draft): no mask
    single.advance(6)
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(torch.tensor([[1]]), single)
    targets = [node.target for graph in explained.graphs for node in graph.graph.nodes]
    assert explained.graph_break_count == 0
    assert sum(t in (attention, attention.default) for t in targets) == config.num_layers
    # the engine's packed passes compiled too (every size symbolic: prompts of any length through the kernels'
    # fakes): each prompt token's log-probability within bf16 rounding of the eager engine's (greedy tokens
    # may part at near-ties: Inductor's norms round otherwise), no graph after the warm-up
    from torch._dynamo.utils import counters

    from lmforge.infer import Engine, Request

    prompts = [[3, 1, 4], [2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4, 5, 9, 0, 4, 5, 2, 3, 5], [9, 9, 8, 2, 4]]
    first = SamplingConfig(max_new_tokens=1, temperature=0)
    eager_engine = Engine(model, max_batch_size=2).generate([Request(p, first, prompt_logprobs=0) for p in prompts])
    engine = Engine(model, max_batch_size=2, decode_step=CompiledDecodeStep(model, max_autotune=False, prefill=True))
    engine.warm_up()
    graphs = counters["stats"]["unique_graphs"]
    compiled = engine.generate([Request(p, first, prompt_logprobs=0) for p in prompts])
    pairs = [(a, b) for c, e in zip(compiled, eager_engine) for a, b in zip(c.prompt_logprobs, e.prompt_logprobs)
             if a is not None]
    assert len(pairs) == sum(len(p) - 1 for p in prompts)
    assert all(a.logprob == pytest.approx(b.logprob, abs=0.15) for a, b in pairs)
    assert counters["stats"]["unique_graphs"] == graphs


def test_a_build_guard_left_by_a_killed_process_does_not_block_the_next_load():
    """torch's guard around building or loading the extension is a plain file: a process killed inside
    (SIGKILL, `lmforge killtest` found it) left it behind, and every later load waited for it forever."""
    import subprocess
    import sys
    from pathlib import Path

    from torch.utils import cpp_extension

    if not kernels.available():
        pytest.skip("the extension does not build here")
    build = Path(cpp_extension._get_build_directory(kernels.extension_name(), verbose=False))
    (build / "lock").write_text("")  # what the killed process left
    answer = subprocess.run([sys.executable, "-c", "from lmforge.quant import kernels; assert kernels.available()"],
                            capture_output=True, text=True, timeout=240)
    assert answer.returncode == 0, answer.stderr[-1000:]
    assert not (build / "lock").exists()
