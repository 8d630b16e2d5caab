"""lmforge's decoder and Hugging Face's Llama layout (Llama, Mistral, Qwen2), name for name.

A model with RoPE, RMSNorm and SwiGLU (the defaults) *is* a Llama: the same
matrices in the same order, and our RoPE pairs dimension i with i + head_dim/2 as
HF checkpoints do, so every weight copies without permutation. Mistral adds a
sliding window, Qwen2 biases on the query/key/value projections; the weight names
are the same. This module gives both halves of the mapping: the config (as the
dict a ``config.json`` holds) and the weight names.
"""

from __future__ import annotations

import torch

from lmforge.errors import InputError
from lmforge.model import DecoderLM, ModelConfig

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN = ("gate_proj", "up_proj", "down_proj")
LLAMA_FAMILY = ("llama", "mistral", "qwen2")
TIED_BY_DEFAULT = {"llama": False, "mistral": False, "qwen2": False}  # transformers' config defaults


def check_llama_compatible(config: ModelConfig) -> None:
    """Raise InputError naming each field that the Llama layout cannot express."""
    wanted = {"position": "rope", "norm": "rmsnorm", "activation": "swiglu"}
    wrong = config.mismatches(wanted, "Llama")
    if wrong:
        raise InputError("this model does not fit the Llama layout: " + ", ".join(wrong))


def llama_names(config: ModelConfig) -> dict[str, str]:
    """lmforge parameter name -> HF Llama parameter name, for every stored weight.

    With tied embeddings the output head is the embedding matrix and has no entry.
    """
    names = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if config.head == "score":  # transformers' *ForSequenceClassification: a score head, no lm_head
        names["score.weight"] = "score.weight"
    elif not config.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    for i in range(config.num_layers):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        names[ours + "attn_norm.weight"] = theirs + "input_layernorm.weight"
        names[ours + "ffn_norm.weight"] = theirs + "post_attention_layernorm.weight"
        for proj in ATTENTION:
            names[ours + f"attn.{proj}.weight"] = theirs + f"self_attn.{proj}.weight"
            if config.bias or (config.qkv_bias and proj != "o_proj"):
                names[ours + f"attn.{proj}.bias"] = theirs + f"self_attn.{proj}.bias"
        for proj in FFN:
            names[ours + f"ffn.{proj}.weight"] = theirs + f"mlp.{proj}.weight"
            if config.bias:
                names[ours + f"ffn.{proj}.bias"] = theirs + f"mlp.{proj}.bias"
    return names


def hf_llama_config(config: ModelConfig, model_type: str = "llama") -> dict:
    """The ``config.json`` of transformers' Llama (or Qwen2 when ``config.qkv_bias``) for the same shape."""
    check_llama_compatible(config)
    if config.qkv_bias and not config.bias:
        model_type = "qwen2"  # Llama's attention_bias also puts a bias on o_proj; Qwen2's layout is q/k/v only
    if config.bias and model_type != "llama":
        raise InputError(f"biases on every linear layer do not fit the {model_type} layout")
    family = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[model_type]
    out = {
        "architectures": [family + ("ForSequenceClassification" if config.head == "score" else "ForCausalLM")],
        "model_type": model_type,
        "vocab_size": config.vocab_size, "hidden_size": config.dim, "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
        "max_position_embeddings": config.max_seq_len, "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta, "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu", "initializer_range": config.init_std, "attention_dropout": config.dropout,
    }
    if config.head == "score":
        out["num_labels"] = 1  # one reward per sequence, read at its last non-padding token
    if model_type == "llama":
        out.update(attention_bias=config.bias, mlp_bias=config.bias)
    if model_type in ("mistral", "qwen2"):
        out["sliding_window"] = None
    if config.rope_scaling is not None:
        scaling = {k: v for k, v in config.rope_scaling.items() if k != "type"}
        out["rope_scaling"] = {"rope_type": config.rope_scaling["type"], **scaling}
    return out


def config_from_hf_llama(hf: dict, source: str) -> ModelConfig:
    """ModelConfig from a Llama, Mistral or Qwen2 ``config.json``."""
    kind = hf["model_type"]
    if hf.get("hidden_act", "silu") != "silu":
        raise InputError(f"{source}: hidden_act={hf['hidden_act']!r}; lmforge's SwiGLU uses silu")
    bias = False
    if kind == "llama":
        attention_bias, mlp_bias = hf.get("attention_bias", False), hf.get("mlp_bias", False)
        if attention_bias != mlp_bias:
            raise InputError(f"{source}: attention_bias={attention_bias} with mlp_bias={mlp_bias} is not supported "
                             "(lmforge puts biases on every linear layer or on none)")
        bias = attention_bias
    max_len = hf.get("max_position_embeddings", 2048)
    window = hf.get("sliding_window")
    if window and (kind == "mistral" or hf.get("use_sliding_window")) and window < max_len:
        max_len = window  # within the window, sliding-window attention is plain causal attention
    heads = hf["num_attention_heads"]
    rope = dict(hf.get("rope_parameters") or {})  # transformers >= 5 keeps theta and scaling here
    theta = hf.get("rope_theta") or rope.get("rope_theta") or 10000.0
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    return _build(source, vocab_size=hf["vocab_size"], max_seq_len=max_len, dim=hf["hidden_size"],
                  num_layers=hf["num_hidden_layers"], num_heads=heads,
                  num_kv_heads=hf.get("num_key_value_heads") or heads,
                  head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, ffn_dim=hf["intermediate_size"],
                  norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
                  rope_scaling=_rope_scaling_from_hf(scaling, source),
                  tie_embeddings=hf.get("tie_word_embeddings", TIED_BY_DEFAULT[kind]),
                  bias=bias, qkv_bias=kind == "qwen2")


def _rope_scaling_from_hf(scaling: dict | None, source: str) -> dict | None:
    if not scaling:
        return None
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind in (None, "default"):
        return None
    if kind == "linear":
        return {"type": "linear", "factor": scaling["factor"]}
    if kind == "llama3":
        return {"type": "llama3", **{k: scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                              "original_max_position_embeddings")}}
    raise InputError(f"{source}: RoPE scaling {kind!r} is not supported (lmforge has linear and llama3)")


def _build(source: str, **fields) -> ModelConfig:
    try:
        return ModelConfig(**fields)
    except ValueError as err:
        raise InputError(f"{source}: {err}") from err


def hf_llama_state(model: DecoderLM) -> dict[str, torch.Tensor]:
    """``model``'s weights under HF Llama's parameter names (shared, not copied).

    With tied embeddings ``lm_head.weight`` is the embedding matrix itself, as in HF.
    """
    check_llama_compatible(model.config)
    ours = dict(model.named_parameters(remove_duplicate=False))
    state = {theirs: ours[name].detach() for name, theirs in llama_names(model.config).items()}
    state["lm_head.weight"] = model.lm_head.weight.detach()
    return state
