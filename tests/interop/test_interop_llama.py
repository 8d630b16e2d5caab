"""lmforge's decoder equals transformers' LlamaForCausalLM on the same weights."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import InputError
from lmforge.infer import SamplingConfig, generate
from lmforge.interop import hf_llama_config, hf_llama_state
from lmforge.model import DecoderLM, preset

transformers = pytest.importorskip("transformers")


def llama_pair(**overrides) -> tuple[DecoderLM, torch.nn.Module]:
    torch.manual_seed(0)
    model = DecoderLM(preset("tiny", vocab_size=101, **overrides)).eval()
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_llama_config(model.config))).eval()
    hf.load_state_dict(hf_llama_state(model), strict=True)
    hf.generation_config.eos_token_id = None  # greedy for exactly max_new_tokens, as ours
    return model, hf


@pytest.mark.parametrize("overrides", [
    dict(),  # GQA, tied embeddings
    dict(num_kv_heads=4, tie_embeddings=False),  # MHA, separate output head
    dict(num_kv_heads=1, bias=True, rope_theta=500.0),  # MQA, biases, another RoPE base
])
def test_logits_and_greedy_tokens_equal_transformers(overrides):
    model, hf = llama_pair(**overrides)
    ids = torch.randint(0, 101, (2, 40))
    with torch.inference_mode():
        ours, theirs = model(ids), hf(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    prompts = ids[:, :8]
    new = generate(model, prompts.tolist(), SamplingConfig(max_new_tokens=12, temperature=0))
    with torch.inference_mode():
        hf_new = hf.generate(prompts, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(prompts),
                             pad_token_id=0)[:, 8:]
    assert new == hf_new.tolist()


def test_a_classic_model_is_refused_with_the_fields_named():
    config = preset("tiny", position="learned", norm="layernorm")
    with pytest.raises(InputError, match="position='learned'.*norm='layernorm'"):
        hf_llama_config(config)
