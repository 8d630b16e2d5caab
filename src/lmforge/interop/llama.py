"""lmforge's decoder and Hugging Face's Llama layout, name for name.

A model with RoPE, RMSNorm and SwiGLU (the defaults) *is* a Llama: the same
matrices in the same order, and our RoPE pairs dimension i with i + head_dim/2 as
HF checkpoints do, so every weight copies without permutation. This module gives
the two halves of that mapping: the config (as the dict a ``config.json`` holds)
and the weights under HF's names.
"""

from __future__ import annotations

import torch

from lmforge.errors import InputError
from lmforge.model import DecoderLM, ModelConfig

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN = ("gate_proj", "up_proj", "down_proj")


def check_llama_compatible(config: ModelConfig) -> None:
    """Raise InputError naming each field that the Llama layout cannot express."""
    wanted = {"position": "rope", "norm": "rmsnorm", "activation": "swiglu"}
    wrong = [f"{name}={getattr(config, name)!r} (Llama needs {value!r})" for name, value in wanted.items()
             if getattr(config, name) != value]
    if wrong:
        raise InputError("this model does not fit the Llama layout: " + ", ".join(wrong))


def hf_llama_config(config: ModelConfig) -> dict:
    """The ``config.json`` fields of transformers' ``LlamaConfig`` for the same shape."""
    check_llama_compatible(config)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": config.vocab_size, "hidden_size": config.dim, "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
        "max_position_embeddings": config.max_seq_len, "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta, "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": config.bias, "mlp_bias": config.bias, "hidden_act": "silu",
        "initializer_range": config.init_std, "attention_dropout": config.dropout,
    }


def hf_llama_state(model: DecoderLM) -> dict[str, torch.Tensor]:
    """``model``'s weights under HF Llama's parameter names (shared, not copied).

    With tied embeddings ``lm_head.weight`` is the embedding matrix itself, as in HF.
    """
    check_llama_compatible(model.config)
    state = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight,
             "lm_head.weight": model.lm_head.weight}
    for i, block in enumerate(model.blocks):
        prefix = f"model.layers.{i}."
        state[prefix + "input_layernorm.weight"] = block.attn_norm.weight
        state[prefix + "post_attention_layernorm.weight"] = block.ffn_norm.weight
        for name in ATTENTION:
            linear = getattr(block.attn, name)
            state[prefix + f"self_attn.{name}.weight"] = linear.weight
            if linear.bias is not None:
                state[prefix + f"self_attn.{name}.bias"] = linear.bias
        for name in FFN:
            linear = getattr(block.ffn, name)
            state[prefix + f"mlp.{name}.weight"] = linear.weight
            if linear.bias is not None:
                state[prefix + f"mlp.{name}.bias"] = linear.bias
    return {name: tensor.detach() for name, tensor in state.items()}
