"""lmforge's encoder-decoder and transformers' ``T5ForConditionalGeneration``.

T5 is lmforge's encoder-decoder with relative position bias, RMSNorm before each branch
(T5 calls it layer_norm), no biases, and a ReLU (T5) or GELU-gated (T5 v1.1, flan-t5) FFN.
Two of its conventions differ from lmforge's and are folded into the weights on the way:

- T5 does not divide the attention scores by sqrt(head_dim) (its initialisation scales the
  query weights instead). lmforge's attention does, so the query weights are multiplied by
  sqrt(head_dim) when read and divided when written: T5's q . k is lmforge's (sqrt(d) q) . k / sqrt(d).
- The original T5 scales the decoder's output by dim^-0.5 before the tied output layer
  (``scale_decoder_outputs``). lmforge reads such a model with the scale folded into an
  untied output matrix; it writes ``tie_word_embeddings: false`` (no scale) with both matrices.

The rest copies name for name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from lmforge.errors import InputError
from lmforge.model import ModelConfig
from lmforge.model.config import T5_LAYOUT

ACTIVATIONS = {"relu": "relu", "gated-gelu": "geglu", "gated-gelu_new": "geglu"}  # feed_forward_proj -> ours


def check_t5_compatible(config: ModelConfig) -> None:
    """Raise InputError naming each field that T5's layout cannot express."""
    wanted = {"position": "relative", "norm": "rmsnorm", "bias": False, "qkv_bias": False, "norm_position": "pre",
              "num_kv_heads": config.num_heads, "type_vocab_size": 0, "head": "lm"}
    wrong = config.mismatches(wanted, "T5")
    if config.activation not in ("relu", "geglu"):
        wrong.append(f"activation={config.activation!r} (T5 has relu or geglu)")
    if not config.is_encoder_decoder:
        wrong.append("decoder_layers=0 (T5 is an encoder-decoder)")
    if wrong:
        raise InputError("this model does not fit the T5 layout: " + ", ".join(wrong))


def config_from_hf_t5(hf: dict, source: str) -> ModelConfig:
    """ModelConfig from a T5 ``config.json``."""
    proj = hf.get("feed_forward_proj", "relu")
    if proj not in ACTIVATIONS:
        raise InputError(f"{source}: feed_forward_proj={proj!r}; lmforge's T5 has {', '.join(ACTIVATIONS)}")
    try:
        return ModelConfig(**{**T5_LAYOUT, "vocab_size": hf["vocab_size"], "max_seq_len": hf.get("n_positions", 512),
                              "dim": hf["d_model"], "head_dim": hf.get("d_kv", 64), "ffn_dim": hf["d_ff"],
                              "num_layers": hf["num_layers"],
                              "decoder_layers": hf.get("num_decoder_layers") or hf["num_layers"],
                              "num_heads": hf["num_heads"], "num_kv_heads": hf["num_heads"],
                              "activation": ACTIVATIONS[proj], "norm_eps": hf.get("layer_norm_epsilon", 1e-6),
                              "relative_buckets": hf.get("relative_attention_num_buckets", 32),
                              "relative_max_distance": hf.get("relative_attention_max_distance", 128),
                              "decoder_start_id": hf.get("decoder_start_token_id", hf.get("pad_token_id", 0)) or 0,
                              "dropout": 0.0, "init_std": 1.0 / math.sqrt(hf["d_model"])})
    except (KeyError, ValueError, TypeError) as err:
        raise InputError(f"{source}: {err}") from err


def scales_decoder_output(hf: dict) -> bool:
    """Whether a T5 config multiplies the decoder's output by d_model^-0.5 (the original T5 does;
    v1.1 says ``tie_word_embeddings: false``; transformers 5 writes ``scale_decoder_outputs``)."""
    return bool(hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False))


def hf_t5_config(config: ModelConfig) -> dict:
    """The ``config.json`` of transformers' T5 for the same shape."""
    check_t5_compatible(config)
    return {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "vocab_size": config.vocab_size,
            "d_model": config.dim, "d_kv": config.head_dim, "d_ff": config.ffn_dim, "num_layers": config.num_layers,
            "num_decoder_layers": config.decoder_layers, "num_heads": config.num_heads,
            "relative_attention_num_buckets": config.relative_buckets,
            "relative_attention_max_distance": config.relative_max_distance,
            "feed_forward_proj": "relu" if config.activation == "relu" else "gated-gelu",
            "layer_norm_epsilon": config.norm_eps, "dropout_rate": config.dropout, "n_positions": config.max_seq_len,
            "is_encoder_decoder": True, "tie_word_embeddings": False, "scale_decoder_outputs": False,
            "decoder_start_token_id": config.decoder_start_id, "initializer_factor": 1.0}


def t5_names(config: ModelConfig) -> dict[str, str]:
    """lmforge parameter name -> T5 name."""
    names = {"embed.weight": "shared.weight", "lm_head.weight": "lm_head.weight",
             "encoder.norm.weight": "encoder.final_layer_norm.weight",
             "decoder.norm.weight": "decoder.final_layer_norm.weight",
             "encoder.relative.embed.weight": "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
             "decoder.relative.embed.weight": "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"}
    ffn = ({"ffn.up_proj": "wi", "ffn.down_proj": "wo"} if config.activation == "relu"
           else {"ffn.gate_proj": "wi_0", "ffn.up_proj": "wi_1", "ffn.down_proj": "wo"})
    for side, layers in (("encoder", config.num_layers), ("decoder", config.decoder_layers)):
        ffn_layer = 2 if side == "decoder" else 1
        for i in range(layers):
            ours, theirs = f"{side}.blocks.{i}.", f"{side}.block.{i}.layer."
            pairs = {"attn_norm": "0.layer_norm", **{f"attn.{p}_proj": f"0.SelfAttention.{p}" for p in "qkvo"},
                     "ffn_norm": f"{ffn_layer}.layer_norm",
                     **{a: f"{ffn_layer}.DenseReluDense.{b}" for a, b in ffn.items()}}
            if side == "decoder":
                pairs.update({"cross_norm": "1.layer_norm",
                              **{f"cross_attn.{p}_proj": f"1.EncDecAttention.{p}" for p in "qkvo"}})
            names.update({f"{ours}{a}.weight": f"{theirs}{b}.weight" for a, b in pairs.items()})
    return names


def _is_query(name: str) -> bool:
    return name.endswith("attn.q_proj.weight")  # self- and cross-attention alike


def t5_to_lmforge(tensors: Mapping[str, torch.Tensor], config: ModelConfig, hf: dict, source: str = "weights"
                  ) -> dict[str, torch.Tensor]:
    """T5 weights -> lmforge names, the query scale and any decoder-output scale folded in."""
    out = {}
    for ours, theirs in t5_names(config).items():
        if theirs not in tensors:
            if ours == "lm_head.weight" and "shared.weight" in tensors:  # a tied output layer
                theirs = "shared.weight"
            else:
                raise InputError(f"{source}: missing weight {theirs}")
        tensor = tensors[theirs]
        if _is_query(ours):
            tensor = tensor * math.sqrt(config.head_dim)
        elif ours == "lm_head.weight" and scales_decoder_output(hf):
            tensor = tensor * config.dim ** -0.5
        out[ours] = tensor
    return out


def lmforge_to_t5(state: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """lmforge weights -> T5 names (the query scale taken back out); the output layer written on its own."""
    check_t5_compatible(config)
    out = {}
    for ours, theirs in t5_names(config).items():
        tensor = state["embed.weight" if ours == "lm_head.weight" and ours not in state else ours]
        out[theirs] = tensor / math.sqrt(config.head_dim) if _is_query(ours) else tensor
    if out["lm_head.weight"].data_ptr() == out["shared.weight"].data_ptr():  # tied: safetensors stores each once
        out["lm_head.weight"] = out["lm_head.weight"].clone()
    return out
