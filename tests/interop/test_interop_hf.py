"""Hugging Face directories of each family load with transformers' logits, and go back out bit for bit."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.checkpoint import load_model, load_tokenizer, read_checkpoint, write_checkpoint
from lmforge.errors import InputError
from lmforge.infer import SamplingConfig, generate
from lmforge.interop.hf import load_hf, mmap_safetensors, read_hf_weights, save_hf
from lmforge.model import DecoderLM, preset

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128)
FAMILIES = {
    "llama-gqa-tied": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "llama3-rope-scaling": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_key_value_heads=1, rope_theta=50000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32})),
    "llama-linear-rope-bias": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_scaling={"rope_type": "linear", "factor": 2.0}, attention_bias=True, mlp_bias=True)),
    "qwen2-qkv-bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "mistral-untied": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=None)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", None),
}


def make_hf_model(family: str, tmp_path):
    config_name, model_name, extra = FAMILIES[family]
    torch.manual_seed(0)
    if extra is None:
        config = transformers.GPT2Config(vocab_size=211, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    else:
        config = getattr(transformers, config_name)(**SMALL, **extra)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():  # biases and norm gains start at 0 and 1: make them matter
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.generation_config.eos_token_id = None
    model.save_pretrained(tmp_path / "hf")
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_greedy_tokens_equal_transformers(family, tmp_path):
    hf = make_hf_model(family, tmp_path)
    ours = load_model(tmp_path / "hf")
    ids = torch.randint(0, 211, (2, 48))
    with torch.inference_mode():
        expected, got = hf(ids).logits, ours(ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    prompts = ids[:, :6]
    with torch.inference_mode():
        theirs = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=10, do_sample=False,
                             pad_token_id=0)[:, 6:].tolist()
    assert generate(ours, prompts.tolist(), SamplingConfig(max_new_tokens=10, temperature=0)) == theirs


@pytest.mark.parametrize("family", ["llama-gqa-tied", "qwen2-qkv-bias", "gpt2"])
def test_round_trip_hf_lmforge_hf_keeps_every_tensor_bit_for_bit(family, tmp_path):
    hf = make_hf_model(family, tmp_path)
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "hf-bf16")  # a stored dtype other than fp32 survives too
    config, state, model_type = load_hf(tmp_path / "hf-bf16")
    write_checkpoint(tmp_path / "ckpt", config, state)  # a tied head has no entry of its own
    config2, state2 = read_checkpoint(tmp_path / "ckpt")
    assert config2 == config
    save_hf(tmp_path / "back", config2, state2, model_type=model_type)
    before, after = read_hf_weights(tmp_path / "hf-bf16"), read_hf_weights(tmp_path / "back")
    before = {k.removeprefix("transformer."): v for k, v in before.items()}
    after = {k.removeprefix("transformer."): v for k, v in after.items()}
    if config.tie_embeddings:
        before.pop("lm_head.weight", None)
    assert set(after) == set(before)
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype == torch.bfloat16, name
        assert torch.equal(after[name], tensor), name
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").float().eval()
    ids = torch.randint(0, 211, (1, 20))
    with torch.inference_mode():  # hf now holds the bf16-rounded weights (to() works in place)
        torch.testing.assert_close(reloaded(ids).logits, hf.float()(ids).logits)


def test_export_of_an_lmforge_model_loads_in_transformers(tmp_path):
    torch.manual_seed(0)
    model = DecoderLM(preset("tiny", vocab_size=150, qkv_bias=True)).eval()
    save_hf(tmp_path / "out", model.config, dict(model.state_dict()))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "qwen2"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 150, (2, 30))
    with torch.inference_mode():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=1e-4, atol=1e-5)


def test_sharded_weights_and_memory_map(tmp_path):
    hf = make_hf_model("llama-gqa-tied", tmp_path)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    torch.testing.assert_close(load_model(tmp_path / "sharded").embed.weight, hf.model.embed_tokens.weight)
    tensors = mmap_safetensors(tmp_path / "hf" / "model.safetensors")
    weight = tensors["model.norm.weight"]
    assert weight.untyped_storage().nbytes() > weight.numel() * 4  # a view into the whole mapped file
    # bf16 on disk, converted tensor by tensor (each one's file pages given back): the same numbers
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    loaded = dict(load_model(tmp_path / "bf16").named_parameters())
    for name, theirs in {"embed.weight": hf.model.embed_tokens.weight, "blocks.1.ffn.down_proj.weight":
                         hf.model.layers[1].mlp.down_proj.weight, "norm.weight": hf.model.norm.weight}.items():
        assert loaded[name].dtype == torch.float32 and torch.equal(loaded[name], theirs.float()), name


def test_missing_and_unsupported_are_named(tmp_path):
    make_hf_model("llama-gqa-tied", tmp_path)
    folder = tmp_path / "hf"
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "falcon"}))
    with pytest.raises(InputError, match="model_type 'falcon' is not supported"):
        load_model(folder)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").rename(folder / "elsewhere.safetensors")
    with pytest.raises(InputError, match="no model.safetensors"):
        load_model(folder)
    with pytest.raises(InputError, match="has no tokenizer.json"):
        load_tokenizer(folder)
