"""lmforge's encoder and Hugging Face's BERT layout (``BertModel``, ``BertForMaskedLM``, ``BertForPreTraining``).

BERT is lmforge's Transformer with ``causal=False`` and the original block order:
post-norm (LayerNorm after each residual sum, and on the embeddings), learned absolute
positions plus segment (token type) embeddings, a GELU MLP with biases everywhere, and
full multi-head attention. Its heads map onto lmforge's: ``BertModel`` is the ``hidden``
head (final states and the pooler), ``BertForMaskedLM`` the ``mlm`` head (a dense + GELU
+ LayerNorm transform, then the tied output layer with a bias per token),
``BertForPreTraining`` the ``mlm+nsp`` head (both, and the next-sentence classifier).
The weights copy name for name; only the names differ.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lmforge.errors import InputError
from lmforge.model import ModelConfig
from lmforge.model.config import BERT_LAYOUT

ARCHITECTURES = {"hidden": "BertModel", "mlm": "BertForMaskedLM", "mlm+nsp": "BertForPreTraining"}
ACTIVATIONS = {"gelu": "gelu_erf", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu"}  # HF hidden_act -> ours


def check_bert_compatible(config: ModelConfig) -> None:
    """Raise InputError naming each field that the BERT layout cannot express."""
    wanted = {**{k: v for k, v in BERT_LAYOUT.items() if k not in ("head", "norm_eps", "type_vocab_size",
                                                                   "activation")},
              "num_kv_heads": config.num_heads, "head_dim": config.dim // config.num_heads, "tie_embeddings": True}
    wrong = config.mismatches(wanted, "BERT")
    if config.activation not in ("gelu_erf", "gelu"):
        wrong.append(f"activation={config.activation!r} (BERT needs gelu_erf or gelu)")
    if config.head not in ARCHITECTURES:
        wrong.append(f"head={config.head!r} (BERT has {', '.join(ARCHITECTURES)})")
    if wrong:
        raise InputError("this model does not fit the BERT layout: " + ", ".join(wrong))


def config_from_hf_bert(hf: dict, source: str) -> ModelConfig:
    """ModelConfig from a BERT ``config.json``; the head from its ``architectures``."""
    activation = hf.get("hidden_act", "gelu")
    if activation not in ACTIVATIONS:
        raise InputError(f"{source}: hidden_act={activation!r}; lmforge's BERT has {', '.join(ACTIVATIONS)}")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise InputError(f"{source}: position_embedding_type={hf['position_embedding_type']!r}; only absolute")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise InputError(f"{source}: a BERT used as a decoder is not supported")
    architecture = (hf.get("architectures") or ["BertModel"])[0]
    heads = {name: head for head, name in ARCHITECTURES.items()}
    if architecture not in heads:
        raise InputError(f"{source}: architecture {architecture!r}; lmforge reads {', '.join(heads)}")
    try:
        return ModelConfig(**{**BERT_LAYOUT, "vocab_size": hf["vocab_size"],
                              "max_seq_len": hf.get("max_position_embeddings", 512), "dim": hf["hidden_size"],
                              "num_layers": hf["num_hidden_layers"], "num_heads": hf["num_attention_heads"],
                              "num_kv_heads": hf["num_attention_heads"], "ffn_dim": hf["intermediate_size"],
                              "activation": ACTIVATIONS[activation], "norm_eps": hf.get("layer_norm_eps", 1e-12),
                              "type_vocab_size": hf.get("type_vocab_size", 2), "dropout": 0.0,
                              "init_std": hf.get("initializer_range", 0.02), "head": heads[architecture]})
    except (KeyError, ValueError) as err:
        raise InputError(f"{source}: {err}") from err


def hf_bert_config(config: ModelConfig) -> dict:
    """The ``config.json`` of transformers' BERT for the same shape and head."""
    check_bert_compatible(config)
    return {"architectures": [ARCHITECTURES[config.head]], "model_type": "bert", "vocab_size": config.vocab_size,
            "hidden_size": config.dim, "num_hidden_layers": config.num_layers,
            "num_attention_heads": config.num_heads, "intermediate_size": config.ffn_dim,
            "hidden_act": "gelu" if config.activation == "gelu_erf" else "gelu_new",
            "max_position_embeddings": config.max_seq_len, "type_vocab_size": config.type_vocab_size,
            "layer_norm_eps": config.norm_eps, "initializer_range": config.init_std,
            "hidden_dropout_prob": config.dropout, "attention_probs_dropout_prob": config.dropout,
            "position_embedding_type": "absolute", "pad_token_id": 0, "tie_word_embeddings": True}


def bert_names(config: ModelConfig) -> dict[str, str]:
    """lmforge parameter name -> HF BERT name (without the ``bert.`` prefix of the *For* classes'
    backbone; the heads' ``cls.`` names as they are)."""
    names = {"embed.weight": "embeddings.word_embeddings.weight",
             "positions.weight": "embeddings.position_embeddings.weight",
             "type_embed.weight": "embeddings.token_type_embeddings.weight",
             "embed_norm.weight": "embeddings.LayerNorm.weight", "embed_norm.bias": "embeddings.LayerNorm.bias"}
    for i in range(config.num_layers):
        ours, theirs = f"blocks.{i}.", f"encoder.layer.{i}."
        pairs = {"attn.q_proj": "attention.self.query", "attn.k_proj": "attention.self.key",
                 "attn.v_proj": "attention.self.value", "attn.o_proj": "attention.output.dense",
                 "attn_norm": "attention.output.LayerNorm", "ffn.up_proj": "intermediate.dense",
                 "ffn.down_proj": "output.dense", "ffn_norm": "output.LayerNorm"}
        for a, b in pairs.items():
            for kind in ("weight", "bias"):
                names[f"{ours}{a}.{kind}"] = f"{theirs}{b}.{kind}"
    if config.head in ("hidden", "mlm+nsp"):
        names.update({"pooler.weight": "pooler.dense.weight", "pooler.bias": "pooler.dense.bias"})
    if config.head.startswith("mlm"):
        names.update({"mlm_dense.weight": "cls.predictions.transform.dense.weight",
                      "mlm_dense.bias": "cls.predictions.transform.dense.bias",
                      "mlm_norm.weight": "cls.predictions.transform.LayerNorm.weight",
                      "mlm_norm.bias": "cls.predictions.transform.LayerNorm.bias",
                      "lm_head.bias": "cls.predictions.bias"})
    if config.head == "mlm+nsp":
        names.update({"nsp.weight": "cls.seq_relationship.weight", "nsp.bias": "cls.seq_relationship.bias"})
    return names


def bert_to_lmforge(tensors: Mapping[str, torch.Tensor], config: ModelConfig, source: str = "weights"
                    ) -> dict[str, torch.Tensor]:
    """HF BERT weights (backbone names with or without ``bert.``) -> lmforge names."""
    out = {}
    for ours, theirs in bert_names(config).items():
        for key in (theirs, "bert." + theirs):
            if key in tensors:
                out[ours] = tensors[key]
                break
        else:
            raise InputError(f"{source}: missing weight {theirs}")
    return out


def lmforge_to_bert(state: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """lmforge weights -> HF BERT names, with the ``bert.`` prefix the *For* classes save (none for
    ``BertModel``). The output matrix is the word embeddings (tied), so it is not written twice."""
    check_bert_compatible(config)
    prefix = "" if config.head == "hidden" else "bert."
    return {(theirs if theirs.startswith("cls.") else prefix + theirs): state[ours]
            for ours, theirs in bert_names(config).items()}
