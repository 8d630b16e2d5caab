"""LoRA: starts as the base model, trains only the adapters, merges exactly, and PEFT reads what it saves."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import InputError
from lmforge.interop.hf import save_hf
from lmforge.model import DecoderLM, preset
from lmforge.peft import (
    LoraConfig,
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_layers,
    merge_lora,
    save_adapter,
)
from lmforge.peft.lora import merged_copy


def model_and_ids(seed: int = 0):
    torch.manual_seed(seed)
    return DecoderLM(preset("tiny", vocab_size=120)).eval(), torch.randint(0, 120, (2, 20))


def randomise_adapters(model):
    torch.manual_seed(1)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.05)


def test_a_fresh_adapter_is_the_base_model_and_only_adapters_train():
    model, ids = model_and_ids()
    base = model(ids)
    apply_lora(model, LoraConfig(rank=4, alpha=8))
    torch.testing.assert_close(model(ids), base)  # B starts at zero
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)
    assert len(lora_layers(model)) == 2 * 7  # 2 layers x (4 attention + 3 FFN projections)
    frozen_before = model.blocks[0].attn.q_proj.base.weight.clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    assert torch.equal(model.blocks[0].attn.q_proj.base.weight, frozen_before)
    assert not torch.allclose(model(ids), base)


def test_merge_equals_the_adapted_model_and_unmerge_restores_it():
    model, ids = model_and_ids()
    apply_lora(model, LoraConfig(rank=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"]))
    randomise_adapters(model)
    adapted = model(ids)
    layer: LoRALinear = model.blocks[1].attn.q_proj
    original = layer.base.weight.clone()
    layer.merge()
    layer.merge()  # merging twice must not add twice
    torch.testing.assert_close(model(ids), adapted, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, original, rtol=0, atol=1e-6)
    merged = merge_lora(model)
    assert not lora_layers(merged)
    torch.testing.assert_close(merged(ids), adapted, rtol=1e-5, atol=1e-5)


def test_a_merged_copy_has_the_adapted_logits_and_leaves_the_model_alone():
    model, ids = model_and_ids()
    apply_lora(model, LoraConfig(rank=4, alpha=8))
    randomise_adapters(model)
    adapted = model(ids)
    copy = merged_copy(model, torch.float32)
    torch.testing.assert_close(copy(ids), adapted, rtol=1e-4, atol=1e-4)
    assert not lora_layers(copy) and not any(p.requires_grad for p in copy.parameters())
    assert copy.lm_head.weight is copy.embed.weight  # the tie survives
    torch.testing.assert_close(model(ids), adapted)  # the model keeps its adapters, unmerged
    assert lora_layers(model) and not any(layer.merged for layer in lora_layers(model).values())
    half = merged_copy(model, torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16
    assert (half(ids).float() - adapted).abs().max() < 0.1
    from lmforge.quant import quantize_model_nf4

    quantized, ids = model_and_ids()
    quantize_model_nf4(quantized)
    apply_lora(quantized, LoraConfig(rank=4, alpha=8))
    randomise_adapters(quantized)
    torch.testing.assert_close(merged_copy(quantized, torch.float32)(ids), quantized(ids), rtol=1e-4, atol=1e-4)


def test_a_merged_copy_refreshed_in_place_equals_a_new_one():
    model, ids = model_and_ids()
    apply_lora(model, LoraConfig(rank=4, alpha=8))
    randomise_adapters(model)
    copy = merged_copy(model, torch.bfloat16)
    randomise_adapters(model)  # the policy moved on
    with torch.no_grad():
        model.blocks[0].ffn_norm.weight.mul_(1.5)  # a weight outside the adapters too
    refreshed = merged_copy(model, torch.bfloat16, into=copy)
    fresh = merged_copy(model, torch.bfloat16)
    assert refreshed is copy and refreshed.lm_head.weight is refreshed.embed.weight
    for (name, a), b in zip(refreshed.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    # the copy decodes with q/k/v and gate/up stacked (lmforge.model.fused): the refresh wrote into the stacks
    assert refreshed.blocks[0].attn.qkv.intact() and refreshed.blocks[0].ffn.gate_up.intact()
    with torch.inference_mode():
        torch.testing.assert_close(refreshed(ids), fresh(ids), rtol=0, atol=0)


def test_hugging_face_peft_loads_the_adapter_with_the_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model, ids = model_and_ids()
    save_hf(tmp_path / "base", model.config, dict(model.state_dict()))
    apply_lora(model, LoraConfig(rank=4, alpha=16, targets=["q_proj", "k_proj", "o_proj", "up_proj"]))
    randomise_adapters(model)
    save_adapter(model, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size < 100_000  # adapters only
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    hf = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.inference_mode():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=1e-4, atol=1e-5)

    reloaded, _ = model_and_ids()
    load_adapter(reloaded, tmp_path / "adapter")
    torch.testing.assert_close(reloaded(ids), model(ids))


def test_an_encoder_decoder_adapter_loads_into_peft_over_transformers_t5(tmp_path):
    """Adapters on both stacks (cross-attention included) in PEFT's layout for T5: its projection names, and
    the query updates scaled as T5's query weights are (lmforge.interop.t5)."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from lmforge.model import build_model

    torch.manual_seed(0)
    model = build_model(preset("t5-tiny", vocab_size=120)).eval()
    source, target = torch.randint(0, 120, (2, 15)), torch.randint(0, 120, (2, 9))
    save_hf(tmp_path / "base", model.config, dict(model.state_dict()))
    apply_lora(model, LoraConfig(rank=4, alpha=16, targets=["q_proj", "v_proj", "gate_proj", "down_proj"]))
    randomise_adapters(model)
    save_adapter(model, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "base").eval()
    hf = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.inference_mode():
        expected = model(source, target)
        torch.testing.assert_close(hf(input_ids=source, decoder_input_ids=target).logits, expected,
                                   rtol=1e-4, atol=1e-4)
    torch.manual_seed(0)
    reloaded = build_model(preset("t5-tiny", vocab_size=120)).eval()
    load_adapter(reloaded, tmp_path / "adapter")
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(source, target), expected)


def test_bad_settings_and_missing_adapters_are_clear(tmp_path):
    with pytest.raises(ValueError, match="rank must be at least 1"):
        LoraConfig(rank=0)
    model, _ = model_and_ids()
    with pytest.raises(InputError, match="no layer named qkv"):
        apply_lora(model, LoraConfig(targets=["qkv"]))
    with pytest.raises(InputError, match="no LoRA adapter"):
        load_adapter(model, tmp_path)


def test_under_autocast_each_norm_output_is_kept_once_for_the_backward_pass():
    """The products after a norm share one bf16 copy of its output: with LoRA, an fp32 norm output is cast
    and kept by each adapter that reads it (q, k and v: three copies; gate and up: two)."""
    model, ids = model_and_ids()
    apply_lora(model, LoraConfig(rank=4, alpha=8))
    model.train()
    dim = model.config.dim
    saved = {}

    def pack(tensor):
        if tensor.dtype == torch.bfloat16 and tensor.shape[-1] == dim and tensor.numel() == ids.numel() * dim \
                and tensor.dim() <= 3:  # a product's input, (B, T, dim) or (B*T, dim); not attention's (B, H, T, D)
            saved[tensor.untyped_storage().data_ptr()] = tensor
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16):
        model(ids).float().sum().backward()
    # Kept for the adapters' gradients, per block: the attention norm's output (q, k, v), the attention's output
    # (o_proj), the FFN norm's output (gate, up). With the norm's output in fp32 it was 6: one copy per adapter.
    assert len(saved) == 3 * model.config.num_layers
    from lmforge.model.norm import RMSNorm

    norm, x = RMSNorm(dim), torch.randn(2, 3, dim)
    with torch.autocast("cpu", torch.bfloat16):
        low = norm(x)
    assert low.dtype == torch.bfloat16 and torch.equal(low, norm(x).bfloat16())  # the same numbers, cast once
