"""The inference layout (lmforge.model.fused): q/k/v and gate/up as one product each."""

import copy

import pytest
import torch
from torch import nn

from lmforge.checkpoint import load_model, save_checkpoint
from lmforge.model import DecoderLM, KVCache, preset
from lmforge.model.fused import fuse_projections
from lmforge.peft import LoraConfig, apply_lora


def tiny(**overrides) -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(preset("tiny", vocab_size=97, **overrides)).eval()


def fused(**overrides) -> DecoderLM:
    model = tiny(**overrides)
    fuse_projections(model)
    return model


def calls_of(model: DecoderLM, name: str) -> list[int]:
    """A counter of the forward calls of every block's ``name`` projection (e.g. "attn.q_proj")."""
    count = [0]
    for block in model.blocks:
        block.get_submodule(name).register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


@pytest.mark.parametrize("overrides", [dict(), dict(num_kv_heads=1, qkv_bias=True), dict(num_kv_heads=4)])
def test_fused_model_gives_the_same_logits_with_one_product(overrides):
    model = tiny(**overrides)
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 97, (2, 12))
    assert fuse_projections(model) == 2 * model.config.num_layers
    q_calls, gate_calls = calls_of(model, "attn.q_proj"), calls_of(model, "ffn.gate_proj")
    with torch.inference_mode():
        fused, expected = model(ids), reference(ids)
        cache = KVCache.for_model(model, batch_size=2, max_len=16)  # a cached decode takes the fused path too
        model(ids[:, :11], cache)
        step = model(ids[:, 11:], cache)
    assert q_calls[0] == 0 and gate_calls[0] == 0  # the separate projections never ran
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step[:, -1], expected[:, -1], rtol=1e-4, atol=1e-4)


def test_parameters_stay_the_models_own_and_are_views_of_the_stacked_weight():
    model = tiny(qkv_bias=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fuse_projections(model)
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    # new weights loaded into the parameters reach the one product
    other = tiny(qkv_bias=True)
    torch.manual_seed(1)
    other.reset_parameters()
    model.load_state_dict(other.state_dict())
    ids = torch.randint(0, 97, (1, 9))
    with torch.inference_mode():
        torch.testing.assert_close(model(ids), other(ids), rtol=1e-5, atol=1e-5)


def test_gradients_reach_the_parameters_of_a_fused_model():
    model = fused()
    ids = torch.randint(0, 97, (2, 8))
    model(ids).logsumexp(-1).mean().backward()  # with autograd on, the separate projections run
    for block in model.blocks:
        for linear in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj, block.ffn.gate_proj):
            assert linear.weight.grad is not None and linear.weight.grad.abs().sum() > 0


def test_a_changed_group_falls_back_to_the_separate_projections():
    model = fused()
    ids = torch.randint(0, 97, (1, 10))
    # LoRA wraps q/k/v: the group is no longer the plain layers it stacked
    lora = apply_lora(copy.deepcopy(model), LoraConfig(rank=4, targets=["q_proj", "v_proj"]))
    assert not lora.blocks[0].attn.qkv.intact()
    with torch.no_grad():
        for module in lora.modules():
            if hasattr(module, "lora_B"):
                module.lora_B.normal_()  # adapters that change the output
    with torch.inference_mode():
        assert not torch.allclose(lora(ids), model(ids), atol=1e-3)
    # a cast gives the parameters new storage: the stacked copy is stale, and is not used
    wide = model.double()
    assert not wide.blocks[0].attn.qkv.intact() and not wide.blocks[0].ffn.gate_up.intact()
    with torch.inference_mode():
        wide(ids)  # the stale fp32 product would fail on fp64 inputs
    assert fuse_projections(wide) == 2 * wide.config.num_layers  # fusing again makes it usable
    assert wide.blocks[0].attn.qkv.intact()


def test_only_plain_linear_groups_are_fused():
    model = tiny()
    apply_lora(model, LoraConfig(rank=4, targets=["q_proj"]))
    assert fuse_projections(model) == model.config.num_layers  # gate/up only
    assert all(block.attn.qkv is None for block in model.blocks)
    assert not isinstance(model.blocks[0].ffn.gate_up, nn.Module)  # adds no module: the tree is unchanged


def test_a_fused_model_saves_and_loads(tmp_path):
    model = fused()
    save_checkpoint(tmp_path / "ckpt", model)
    loaded = load_model(tmp_path / "ckpt")
    ids = torch.randint(0, 97, (1, 7))
    with torch.inference_mode():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=1e-5, atol=1e-5)


def test_a_fused_model_traces_into_one_graph():
    """The compiled decode step traces the fused path without a graph break per layer."""
    model = fused()
    with torch.inference_mode():
        explained = torch._dynamo.explain(model)(torch.randint(0, 97, (1, 1)))
    assert explained.graph_break_count == 0, [b.reason.splitlines()[0] for b in explained.break_reasons]


@pytest.mark.parametrize("spec", ["int8 tensor", "int4 group"])
def test_integer_layers_of_one_method_fuse_into_one_product(spec, tmp_path):
    from lmforge.quant.integer import QuantSpec, quantize_model

    spec = QuantSpec(8, granularity="tensor") if spec == "int8 tensor" else QuantSpec(4, "asymmetric", "group", 16)
    model = tiny(num_kv_heads=1, qkv_bias=True)
    quantize_model(model, spec)
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 97, (1, 3))  # few rows: the integer kernels where built, else the reference
    assert fuse_projections(model) == 2 * model.config.num_layers
    attn = model.blocks[0].attn
    assert attn.q_proj.qweight.data_ptr() == attn.qkv.layer.qweight.data_ptr()  # the codes are stored once
    q_calls = calls_of(model, "attn.q_proj")
    with torch.inference_mode():
        torch.testing.assert_close(model(ids), reference(ids), rtol=1e-5, atol=1e-5)
        assert q_calls[0] == 0  # one product per group, a per-tensor scale repeated for each row
    save_checkpoint(tmp_path / "q", model)  # the members' state is what it was
    assert set(model.state_dict()) == set(reference.state_dict())
