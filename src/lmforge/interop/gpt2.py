"""lmforge's decoder and Hugging Face's GPT-2 layout.

GPT-2 is the classic form of the same decoder: learned absolute positions,
LayerNorm, a GELU (tanh) MLP four times as wide, biases everywhere, tied output
head. Two differences in storage: its linear layers are ``Conv1D`` modules whose
weights are stored transposed, (in, out), and the query/key/value projections are
one fused ``c_attn`` matrix.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lmforge.errors import InputError
from lmforge.model import ModelConfig


def check_gpt2_compatible(config: ModelConfig) -> None:
    """Raise InputError naming each field that the GPT-2 layout cannot express."""
    wanted = {"position": "learned", "norm": "layernorm", "activation": "gelu", "bias": True,
              "tie_embeddings": True, "num_kv_heads": config.num_heads, "head_dim": config.dim // config.num_heads}
    wrong = [f"{name}={getattr(config, name)!r} (GPT-2 needs {value!r})" for name, value in wanted.items()
             if getattr(config, name) != value]
    if wrong:
        raise InputError("this model does not fit the GPT-2 layout: " + ", ".join(wrong))


def config_from_hf_gpt2(hf: dict, source: str) -> ModelConfig:
    """ModelConfig from a GPT-2 ``config.json``."""
    activation = hf.get("activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh"):
        raise InputError(f"{source}: activation_function={activation!r}; lmforge's GELU is the tanh approximation")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(flag):
            raise InputError(f"{source}: {flag}=true is not supported")
    if hf.get("scale_attn_weights", True) is False:
        raise InputError(f"{source}: scale_attn_weights=false is not supported")
    dim = hf["n_embd"]
    try:
        return ModelConfig(vocab_size=hf["vocab_size"], max_seq_len=hf.get("n_positions", 1024), dim=dim,
                           num_layers=hf["n_layer"], num_heads=hf["n_head"], num_kv_heads=hf["n_head"],
                           ffn_dim=hf.get("n_inner") or 4 * dim, activation="gelu", norm="layernorm",
                           norm_eps=hf.get("layer_norm_epsilon", 1e-5), position="learned", tie_embeddings=True,
                           bias=True, dropout=0.0, init_std=hf.get("initializer_range", 0.02))
    except ValueError as err:
        raise InputError(f"{source}: {err}") from err


def hf_gpt2_config(config: ModelConfig) -> dict:
    """The ``config.json`` of transformers' GPT-2 for the same shape."""
    check_gpt2_compatible(config)
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": config.vocab_size,
            "n_positions": config.max_seq_len, "n_embd": config.dim, "n_layer": config.num_layers,
            "n_head": config.num_heads, "n_inner": config.ffn_dim, "activation_function": "gelu_new",
            "layer_norm_epsilon": config.norm_eps, "initializer_range": config.init_std,
            "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
            "tie_word_embeddings": True}


def gpt2_to_lmforge(tensors: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """HF GPT-2 weights (with or without the ``transformer.`` prefix) -> lmforge names."""
    get = _getter(tensors)
    out = {"embed.weight": get("wte.weight"), "positions.weight": get("wpe.weight"),
           "norm.weight": get("ln_f.weight"), "norm.bias": get("ln_f.bias")}
    dim = config.dim
    for i in range(config.num_layers):
        theirs, ours = f"h.{i}.", f"blocks.{i}."
        for norm, name in (("ln_1", "attn_norm"), ("ln_2", "ffn_norm")):
            out[ours + f"{name}.weight"] = get(theirs + f"{norm}.weight")
            out[ours + f"{name}.bias"] = get(theirs + f"{norm}.bias")
        qkv_weight = get(theirs + "attn.c_attn.weight").t()  # Conv1D (dim, 3*dim) -> Linear (3*dim, dim)
        qkv_bias = get(theirs + "attn.c_attn.bias")
        for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            out[ours + f"attn.{proj}.weight"] = qkv_weight[j * dim:(j + 1) * dim].contiguous()
            out[ours + f"attn.{proj}.bias"] = qkv_bias[j * dim:(j + 1) * dim].contiguous()
        for conv, linear in (("attn.c_proj", "attn.o_proj"), ("mlp.c_fc", "ffn.up_proj"),
                             ("mlp.c_proj", "ffn.down_proj")):
            out[ours + f"{linear}.weight"] = get(theirs + f"{conv}.weight").t().contiguous()
            out[ours + f"{linear}.bias"] = get(theirs + f"{conv}.bias")
    return out


def lmforge_to_gpt2(state: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """lmforge weights -> HF GPT-2 names (``transformer.`` prefix, as GPT2LMHeadModel saves them)."""
    check_gpt2_compatible(config)
    p = "transformer."
    out = {p + "wte.weight": state["embed.weight"], p + "wpe.weight": state["positions.weight"],
           p + "ln_f.weight": state["norm.weight"], p + "ln_f.bias": state["norm.bias"]}
    for i in range(config.num_layers):
        theirs, ours = f"{p}h.{i}.", f"blocks.{i}."
        for norm, name in (("ln_1", "attn_norm"), ("ln_2", "ffn_norm")):
            out[theirs + f"{norm}.weight"] = state[ours + f"{name}.weight"]
            out[theirs + f"{norm}.bias"] = state[ours + f"{name}.bias"]
        projections = [state[ours + f"attn.{proj}.weight"] for proj in ("q_proj", "k_proj", "v_proj")]
        out[theirs + "attn.c_attn.weight"] = torch.cat(projections).t().contiguous()
        out[theirs + "attn.c_attn.bias"] = torch.cat([state[ours + f"attn.{proj}.bias"]
                                                      for proj in ("q_proj", "k_proj", "v_proj")])
        for conv, linear in (("attn.c_proj", "attn.o_proj"), ("mlp.c_fc", "ffn.up_proj"),
                             ("mlp.c_proj", "ffn.down_proj")):
            out[theirs + f"{conv}.weight"] = state[ours + f"{linear}.weight"].t().contiguous()
            out[theirs + f"{conv}.bias"] = state[ours + f"{linear}.bias"]
    return out


def _getter(tensors: Mapping[str, torch.Tensor]):
    def get(name: str) -> torch.Tensor:
        for key in (name, "transformer." + name):
            if key in tensors:
                return tensors[key]
        raise InputError(f"GPT-2 weights have no {name!r}")
    return get
