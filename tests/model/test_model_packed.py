"""Packed weights for inference (lmforge.model.packed): bf16 in oneDNN's layout or in pairs for the AVX-512 BF16
kernel, fp32 in blocks of 16 rows for lmforge's fp32 kernel or transposed for PyTorch's products."""

import copy
import pickle

import pytest
import torch

from lmforge.model import DecoderLM, KVCache, preset
from lmforge.model.fused import fuse_projections
from lmforge.model.packed import PackedLinear, available, pack_weights
from lmforge.quant import kernels

bf16_kernels = pytest.mark.skipif(not available(torch.bfloat16, "cpu"),
                                  reason="this CPU's oneDNN has no native bf16 kernels (packing is off here)")
bf16_dots = pytest.mark.skipif(not kernels.bf16_dots(), reason="the bf16 dot-product kernel needs AVX-512 BF16")
f32_dots = pytest.mark.skipif(not kernels.f32_dots(), reason="the fp32 kernel is off on this CPU (LMFORGE_F32_KERNEL)")


@pytest.fixture
def onednn(monkeypatch):
    """bf16 weights packed in oneDNN's layout, as on CPUs without the bf16 dot-product kernel."""
    monkeypatch.setenv("LMFORGE_BF16_KERNEL", "off")


def tiny(seed: int = 0, dtype: torch.dtype = torch.bfloat16, **overrides) -> DecoderLM:
    torch.manual_seed(seed)
    model = DecoderLM(preset("tiny", vocab_size=97, **overrides)).eval().to(dtype)
    fuse_projections(model)
    return model


def packed_calls(monkeypatch) -> list[int]:
    """A counter of the bf16 products that took a packed path (oneDNN's or the dot-product kernel's)."""
    count = [0]

    def counting(original):
        def counted(*args):
            count[0] += 1
            return original(*args)
        return counted
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", counting(torch.ops.mkldnn._linear_pointwise))
    monkeypatch.setattr(kernels, "bf16_linear", counting(kernels.bf16_linear))
    monkeypatch.setattr(kernels, "f32_linear", counting(kernels.f32_linear))
    return count


@bf16_kernels
@pytest.mark.parametrize("overrides", [dict(), dict(num_kv_heads=1, qkv_bias=True)])
def test_packed_products_give_the_same_bits(overrides, onednn, monkeypatch):
    model = tiny(**overrides)
    plain = copy.deepcopy(model)  # a copy leaves the packed weights behind: it is the plain model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = model.config.num_layers
    assert pack_weights(model) == 4 * layers + 1  # qkv, o, gate_up, down; the head
    assert pack_weights(model) == 0  # packed once
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    calls = packed_calls(monkeypatch)
    ids = torch.randint(0, 97, (2, 12))
    with torch.inference_mode():
        logits = model(ids)
        assert calls[0] == 4 * layers + 1
        cache = KVCache.for_model(model, batch_size=2, max_len=16)
        model(ids[:, :11], cache)
        step = model(ids[:, 11:], cache)
        expected = plain(ids)
    assert calls[0] == 3 * (4 * layers + 1)  # the plain copy took none
    assert torch.equal(logits, expected)
    torch.testing.assert_close(step[:, -1], expected[:, -1], rtol=0.02, atol=0.02)  # bf16 cache rounding


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, marks=bf16_kernels),
                                   pytest.param("bf16 pairs", marks=bf16_dots), torch.float32,
                                   pytest.param("fp32 blocks", marks=f32_dots)])
def test_changed_weights_and_autograd_take_the_plain_product(dtype, monkeypatch):
    if dtype == "bf16 pairs":
        dtype = torch.bfloat16
    elif dtype == "fp32 blocks":
        dtype = torch.float32
    elif dtype == torch.bfloat16:
        monkeypatch.setenv("LMFORGE_BF16_KERNEL", "off")
    else:
        monkeypatch.setenv("LMFORGE_F32_KERNEL", "off")
    model, other = tiny(dtype=dtype), tiny(seed=1, dtype=dtype)
    pack_weights(model)
    model.load_state_dict(other.state_dict())  # written in place: the packed copies are stale
    calls = packed_calls(monkeypatch)
    ids = torch.randint(0, 97, (1, 9))
    with torch.inference_mode():
        assert torch.equal(model(ids), other(ids))
    assert calls[0] == 0
    model = tiny(seed=1, dtype=dtype)
    pack_weights(model)
    model.train()
    model(ids).float().logsumexp(-1).mean().backward()
    assert calls[0] == 0  # with a gradient to take, every product is the plain one
    assert model.blocks[0].attn.o_proj.weight.grad.abs().sum() > 0
    assert model.blocks[0].attn.q_proj.weight.grad.abs().sum() > 0


@bf16_dots
@pytest.mark.parametrize("overrides", [dict(), dict(num_kv_heads=1, qkv_bias=True)])
def test_bf16_pairs_products_are_close_to_the_plain_ones_and_each_rows_own(overrides, monkeypatch):
    """On a CPU with AVX-512 BF16 (no AMX) bf16 layers are laid out in pairs for the dot-product kernel, which eager
    passes and compiled steps call: logits within bf16 rounding of the plain model's, and a row's logits the same
    bits alone or beside others, so a prompt in a batch or alone decodes alike."""
    model = tiny(**overrides)
    plain = copy.deepcopy(model)
    layers = model.config.num_layers
    assert pack_weights(model) == 4 * layers + 1
    qkv = model.blocks[0].attn.qkv
    assert qkv.packed.pairs and qkv.packed.tensor.shape == (-(-qkv.weight.shape[0] // 16), qkv.weight.shape[1] // 2, 16)
    calls = packed_calls(monkeypatch)
    ids = torch.randint(0, 97, (3, 12))
    with torch.inference_mode():
        logits = model(ids)
        assert calls[0] == 4 * layers + 1
        expected = plain(ids)
        torch.testing.assert_close(logits, expected, rtol=0.03, atol=0.03)
        assert torch.equal(model(ids[1:2]), logits[1:2])
        assert torch.equal(model(ids[1:2, :5])[0], logits[1, :5])  # (causal: later positions change nothing)
        qkv.packed.tensor.zero_()  # the copy is what is read
        assert not torch.allclose(model(ids), expected, atol=0.1)
    monkeypatch.undo()
    model = tiny(**overrides)
    pack_weights(model)
    with torch.no_grad():  # a compiled step calls the kernel too
        explained = torch._dynamo.explain(model)(torch.randint(0, 97, (1, 1)))
    assert explained.graph_break_count == 0
    called = [node for graph in explained.graphs for node in graph.graph.nodes
              if node.target in (torch.ops.lmforge.bf16_linear, torch.ops.lmforge.bf16_linear.default)]
    assert len(called) == 4 * layers + 1


@bf16_kernels
def test_a_packed_model_pickles_and_traces_without_its_packed_copies():
    model = tiny()
    pack_weights(model)
    assert isinstance(model.blocks[0].attn.o_proj, PackedLinear)
    restored = pickle.loads(pickle.dumps(model))
    assert restored.blocks[0].attn.o_proj.packed is None and restored.blocks[0].attn.qkv.packed is None
    ids = torch.randint(0, 97, (1, 5))
    with torch.inference_mode():
        assert torch.equal(restored(ids), model(ids))
        explained = torch._dynamo.explain(model)(torch.randint(0, 97, (1, 1)))  # the compiled step's trace
    assert explained.graph_break_count == 0, [b.reason.splitlines()[0] for b in explained.break_reasons]


def test_fp32_and_bf16_with_its_kernels_are_packed(monkeypatch):
    assert available(torch.float32, "cpu") and not available(torch.float16, "cpu")
    assert not available(torch.float32, "meta") and not available(torch.bfloat16, "meta")
    monkeypatch.setenv("LMFORGE_PACKED_WEIGHTS", "off")
    assert not available(torch.bfloat16, "cpu") and not available(torch.float32, "cpu")
    model = tiny(dtype=torch.float16)
    assert pack_weights(model) == 0  # fp16: left alone
    assert not any(isinstance(m, PackedLinear) for m in model.modules())


@pytest.mark.parametrize("layout", ["transposed", pytest.param("blocks", marks=f32_dots)])
def test_fp32_products_read_their_copy(layout, monkeypatch):
    """fp32 layers keep a copy that their inference products read: (in, out) for PyTorch's products
    (``LMFORGE_F32_KERNEL=off``), or 16 rows side by side for lmforge's kernel. The same logits as the plain
    model up to the order of the sums, and a changed copy shows in the output (it is the one read). With the
    kernel a row's logits are the same bits alone or beside others, and a compiled step calls it too."""
    if layout == "transposed":
        monkeypatch.setenv("LMFORGE_F32_KERNEL", "off")
    model = tiny(dtype=torch.float32, num_kv_heads=1, qkv_bias=True)
    plain = copy.deepcopy(model)
    layers = model.config.num_layers
    assert pack_weights(model) == 4 * layers + 1
    o_proj, qkv = model.blocks[0].attn.o_proj, model.blocks[0].attn.qkv
    if layout == "transposed":
        assert o_proj.packed.transposed and o_proj.packed.tensor.shape == o_proj.weight.T.shape
        assert o_proj.packed.tensor.is_contiguous() and torch.equal(o_proj.packed.tensor, o_proj.weight.T)
        assert qkv.packed.transposed and qkv.bias is not None  # the bias is added after the product
    else:
        assert o_proj.packed.blocks and torch.equal(o_proj.packed.tensor, kernels.f32_blocks(o_proj.weight))
        assert o_proj.packed.tensor.shape == (-(-o_proj.weight.shape[0] // 16), o_proj.weight.shape[1], 16)
        assert qkv.packed.blocks and qkv.bias is not None
    ids = torch.randint(0, 97, (3, 10))
    with torch.inference_mode():
        logits, expected = model(ids), plain(ids)
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
        if layout == "blocks":
            assert torch.equal(model(ids[1:2]), logits[1:2])
        o_proj.packed.tensor.zero_()
        assert not torch.allclose(model(ids), expected, atol=1e-3)
    if layout == "blocks":
        model = tiny(dtype=torch.float32)
        pack_weights(model)
        with torch.no_grad():
            explained = torch._dynamo.explain(model)(torch.randint(0, 97, (1, 1)))
        assert explained.graph_break_count == 0
        called = [node for graph in explained.graphs for node in graph.graph.nodes
                  if node.target in (torch.ops.lmforge.f32_linear, torch.ops.lmforge.f32_linear.default)]
        assert len(called) == 4 * layers + 1


def test_load_packs_fp32_models_and_bf16_ones_on_cpus_with_bf16_kernels(tmp_path, monkeypatch):
    """`lmforge.load` is where packing happens: fp32, and bf16 on such a CPU, pack (and decode as the plain
    model does); LMFORGE_PACKED_WEIGHTS=off does not."""
    import lmforge
    from lmforge.checkpoint import save_checkpoint
    from lmforge.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(["def add(a, b):\n    return a + b\n" * 30], 300)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "ckpt", DecoderLM(preset("tiny", vocab_size=tokenizer.vocab_size)).eval(), tokenizer)

    def packed_layers(lm) -> int:
        return sum(isinstance(m, PackedLinear) for m in lm.model.modules())
    monkeypatch.setenv("LMFORGE_PACKED_WEIGHTS", "off")
    plain = lmforge.load(tmp_path / "ckpt", device="cpu", dtype="bf16")
    plain32 = lmforge.load(tmp_path / "ckpt", device="cpu", dtype="fp32")
    assert packed_layers(plain) == 0 and packed_layers(plain32) == 0
    monkeypatch.delenv("LMFORGE_PACKED_WEIGHTS")
    lm32 = lmforge.load(tmp_path / "ckpt", device="cpu", dtype="fp32")
    head = lm32.model.lm_head.packed
    assert packed_layers(lm32) == 2 * lm32.model.config.num_layers + 1 and (head.transposed or head.blocks)
    assert lm32.generate("def ", max_new_tokens=12, temperature=0) == \
        plain32.generate("def ", max_new_tokens=12, temperature=0)
    lm = lmforge.load(tmp_path / "ckpt", device="cpu", dtype="bf16")
    if not available(torch.bfloat16, "cpu"):
        assert packed_layers(lm) == 0
        return
    assert packed_layers(lm) == 2 * lm.model.config.num_layers + 1  # o, down, the head (q/k/v, gate/up fused)
    assert lm.model.blocks[0].attn.qkv.packed is not None
    text = lm.generate("def ", max_new_tokens=12, temperature=0)
    assert text == plain.generate("def ", max_new_tokens=12, temperature=0)
