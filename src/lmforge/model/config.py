"""The model's shape: every concept of the Transformer is a field here.

Defaults are the modern decoder's choices (RoPE, RMSNorm, SwiGLU, grouped-query
attention) so that a model maps onto the Llama layout. ``causal=False`` with
``norm_position="post"``, learned positions, segment embeddings and an ``mlm`` head is
the encoder-only form (BERT). ``decoder_layers > 0`` is the encoder-decoder form (T5):
``num_layers`` encoder blocks and ``decoder_layers`` decoder blocks that also attend to the
encoder's output (:mod:`lmforge.model.seq2seq`). Presets name whole shapes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import InputError
from lmforge.settings import field, load_json

POSITIONS = ("rope", "learned", "sinusoidal", "relative")
NORMS = ("rmsnorm", "layernorm")
ACTIVATIONS = ("swiglu", "geglu", "gelu", "gelu_erf", "relu")
GATED = ("swiglu", "geglu")  # activations with a gate projection beside the up projection
HEADS = ("lm", "score", "lm+value", "mlm", "mlm+nsp", "hidden")
NORM_POSITIONS = ("pre", "post")


@dataclass
class ModelConfig:
    """Hyper-parameters of a Transformer: a decoder-only language model, or (``causal=False``) an encoder."""

    vocab_size: int = field(8192, "number of token ids (the tokenizer's vocabulary)")
    max_seq_len: int = field(512, "longest sequence the model attends over")
    dim: int = field(256, "width of the residual stream (embedding size)")
    num_layers: int = field(6, "number of Transformer blocks")
    num_heads: int = field(4, "query heads per attention layer")
    num_kv_heads: int = field(2, "key/value heads: =num_heads is MHA, 1 is MQA, between is GQA")
    head_dim: int = field(0, "width of one head; 0 means dim // num_heads")
    ffn_dim: int = field(0, "hidden width of the feed-forward network; 0 derives it from dim")
    activation: str = field("swiglu", "feed-forward network: swiglu, geglu (GELU-gated, T5 v1.1), gelu (tanh "
                                      "approximation, GPT-2), gelu_erf (exact, BERT) or relu")
    norm: str = field("rmsnorm", "normalization: rmsnorm or layernorm")
    norm_position: str = field("pre", "pre: x + f(norm(x)) and a final norm (GPT-2, Llama); post: norm(x + f(x)), "
                                      "the embeddings normalized and no final norm (the original Transformer, BERT)")
    causal: bool = field(True, "each position attends to earlier ones only (a decoder); false: to every position "
                               "(an encoder, BERT)")
    type_vocab_size: int = field(0, "segment (token type) embeddings added to the tokens' (BERT: 2, for sentence "
                                    "A and B); 0: none")
    norm_eps: float = field(1e-5, "epsilon inside the normalization")
    position: str = field("rope", "positional encoding: rope, learned, sinusoidal, or relative (T5's bucketed "
                                  "relative position bias added to the attention scores)")
    relative_buckets: int = field(32, "relative positions: number of distance buckets (half each way in an encoder)")
    relative_max_distance: int = field(128, "relative positions: distances from here on share the last bucket")
    rope_theta: float = field(10000.0, "RoPE base frequency")
    rope_scaling: dict | None = field(None, 'RoPE frequency scaling as JSON: {"type": "linear", "factor": 4} or '
                                            '{"type": "llama3", "factor", "low_freq_factor", "high_freq_factor", '
                                            '"original_max_position_embeddings"}')
    tie_embeddings: bool = field(True, "share the input embedding matrix with the output head")
    bias: bool = field(False, "add biases to every linear layer (GPT-2)")
    qkv_bias: bool = field(False, "add biases to the query/key/value projections only (Qwen2)")
    dropout: float = field(0.0, "dropout on embeddings, attention weights and residual branches")
    init_std: float = field(0.02, "standard deviation of the initial weights")
    decoder_layers: int = field(0, "encoder-decoder (T5): decoder blocks that attend to the output of the "
                                   "num_layers encoder blocks; 0: one stack (a decoder, or an encoder)")
    decoder_start_id: int = field(0, "encoder-decoder: the token the decoder starts from (T5: padding, id 0; "
                                     "lmforge tokenizers: begin-of-text, also id 0)")
    head: str = field("lm", "output head: lm (next-token logits), score (one scalar per position: a reward model), "
                            "lm+value (logits, and a value head beside them: a PPO policy in training), mlm "
                            "(masked-token logits: BERT's transform then the tied output layer), mlm+nsp (and a "
                            "next-sentence classifier on the pooled first token) or hidden (the final hidden "
                            "states, and the pooler: an encoder for embeddings)")

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            if self.dim % self.num_heads:
                raise ValueError(f"dim={self.dim} is not divisible by num_heads={self.num_heads}")
            self.head_dim = self.dim // self.num_heads
        if self.ffn_dim == 0:
            if self.activation in GATED:
                # Two input projections instead of one: 2/3 of 4*dim keeps the parameter
                # count of a 4*dim MLP; round up to a multiple of 64 for fast matmuls.
                self.ffn_dim = 64 * ((int(8 * self.dim / 3) + 63) // 64)
            else:
                self.ffn_dim = 4 * self.dim
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        for name, value, allowed in (("position", self.position, POSITIONS), ("norm", self.norm, NORMS),
                                     ("activation", self.activation, ACTIVATIONS), ("head", self.head, HEADS),
                                     ("norm_position", self.norm_position, NORM_POSITIONS)):
            if value not in allowed:
                raise ValueError(f"{name}={value!r}; choose one of {', '.join(allowed)}")
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
        if self.rope_scaling is not None:
            check_rope_scaling(self.rope_scaling)
        for name in ("init_std", "norm_eps"):
            if not 0.0 <= getattr(self, name) < float("inf"):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if not 0.0 < self.rope_theta < float("inf"):
            raise ValueError(f"rope_theta must be a finite number > 0, got {self.rope_theta}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.type_vocab_size < 0:
            raise ValueError(f"type_vocab_size must be at least 0, got {self.type_vocab_size}")
        if self.relative_buckets < 2 or self.relative_max_distance < self.relative_buckets // 2:
            raise ValueError(f"relative positions need relative_buckets >= 2 and relative_max_distance >= "
                             f"relative_buckets / 2, got {self.relative_buckets} and {self.relative_max_distance}")
        if self.decoder_layers < 0:
            raise ValueError(f"decoder_layers must be at least 0, got {self.decoder_layers}")
        if self.position == "relative" and not self.decoder_layers:
            raise ValueError("position=relative is built for the encoder-decoder form (decoder_layers > 0); "
                             "a one-stack model takes rope, learned or sinusoidal")
        if self.decoder_layers and (self.head != "lm" or not self.causal or self.type_vocab_size):
            raise ValueError("an encoder-decoder (decoder_layers > 0) has the lm head, causal=true (its decoder) "
                             "and no segment embeddings")
        if self.head.startswith("mlm") and self.causal:
            raise ValueError(f"head={self.head!r} predicts masked tokens from both sides: it needs causal=false")

    @property
    def is_encoder_decoder(self) -> bool:
        return self.decoder_layers > 0

    @property
    def attention_kind(self) -> str:
        if self.num_kv_heads == self.num_heads:
            return "MHA"
        return "MQA" if self.num_kv_heads == 1 else "GQA"

    def mismatches(self, wanted: dict, layout: str) -> list[str]:
        """``field=value (LAYOUT needs X)`` for each field of ``wanted`` this config holds otherwise (what an
        export to another library's layout names in its refusal)."""
        return [f"{name}={getattr(self, name)!r} ({layout} needs {value!r})" for name, value in wanted.items()
                if getattr(self, name) != value]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        if not isinstance(values, dict):
            raise InputError(f"a model config is a JSON object of fields, not {type(values).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise InputError(f"unknown model config fields: {', '.join(sorted(unknown))}")
        for f in dataclasses.fields(cls):
            if f.name in values and not _of_type(values[f.name], f.type):
                raise InputError(f"invalid model config: {f.name}={values[f.name]!r} is not {_type_words(f.type)}")
        if isinstance(values.get("max_seq_len"), int) and values["max_seq_len"] > MAX_POSITIONS:
            raise InputError(f"invalid model config: max_seq_len={values['max_seq_len']} is past the "
                             f"{MAX_POSITIONS:,} positions lmforge builds position tables for")
        for name, value in values.items():
            low = 1 if name in SIZES else 0 if name in COUNTS else None
            if low is not None and value < low or isinstance(value, int) and abs(value) >= 2**31:
                raise InputError(f"invalid model config: {name}={value} is out of range"
                                 + (f" (it must be at least {low})" if low is not None else ""))
        try:
            return cls(**values)
        except (TypeError, ValueError) as err:
            raise InputError(f"invalid model config: {err}") from err

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        try:
            values = load_json(path)
        except InputError as err:
            if not Path(path).exists():
                raise InputError(f"no model config at {path}") from err
            raise
        try:
            return cls.from_dict(values)
        except InputError as err:
            raise InputError(f"{path}: {err}") from err


MAX_POSITIONS = 2**20  # RoPE and sinusoidal tables hold every position up front (1M positions: ~0.5 GB to build)
COUNTS = ("head_dim", "ffn_dim", "decoder_layers", "type_vocab_size", "decoder_start_id")  # each at least 0
SIZES = ("vocab_size", "max_seq_len", "dim", "num_layers", "num_heads", "num_kv_heads")  # each at least 1


def _of_type(value, annotation: str) -> bool:
    """Whether a JSON value fits a field annotated ``annotation`` (``int``: a whole number, not a bool;
    ``float``: any finite or infinite number; ``dict | None`` ...)."""
    kinds = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "dict": (dict,), "None": (type(None),)}
    allowed = tuple(t for part in annotation.split("|") for t in kinds[part.strip()])
    return isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)


def _type_words(annotation: str) -> str:
    return " or ".join({"int": "a whole number", "float": "a number", "str": "a string", "bool": "true or false",
                        "dict": "a JSON object", "None": "null"}[part.strip()] for part in annotation.split("|"))


ROPE_SCALINGS = {"linear": ("factor",),
                 "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def check_rope_scaling(scaling: dict) -> None:
    """Raise ValueError unless ``scaling`` names a known type and all of its fields."""
    kind = scaling.get("type") if isinstance(scaling, dict) else None
    if kind not in ROPE_SCALINGS:
        raise ValueError(f"rope_scaling={scaling!r}: its 'type' must be one of {', '.join(ROPE_SCALINGS)}")
    missing = [name for name in ROPE_SCALINGS[kind] if name not in scaling]
    if missing:
        raise ValueError(f"rope_scaling of type {kind!r} needs {', '.join(missing)}")


# The encoder-only form as BERT lays it out (transformers' BertModel and its heads read it).
BERT_LAYOUT = dict(causal=False, norm_position="post", norm="layernorm", norm_eps=1e-12, activation="gelu_erf",
                   bias=True, position="learned", type_vocab_size=2, head="mlm")

# The encoder-decoder form as T5 v1.1 lays it out (transformers' T5ForConditionalGeneration reads it).
T5_LAYOUT = dict(position="relative", norm="rmsnorm", norm_eps=1e-6, activation="geglu", bias=False,
                 tie_embeddings=False)

# Named shapes. vocab_size and max_seq_len may be overridden when a preset is used.
PRESETS: dict[str, dict] = {
    # For tests: runs a forward pass in milliseconds.
    "tiny": dict(dim=64, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=128),
    # The CPU speedrun default: about 5M parameters with an 8k vocabulary.
    "cpu-small": dict(dim=256, num_layers=6, num_heads=4, num_kv_heads=2, max_seq_len=512),
    # A draft for speculative decoding (`lmforge distill`): shallow, so that a guess costs a fraction of a
    # step of the model it drafts for (its vocabulary is that model's).
    "draft-small": dict(dim=256, num_layers=4, num_heads=4, num_kv_heads=2, max_seq_len=1024),
    "cpu-base": dict(dim=384, num_layers=8, num_heads=6, num_kv_heads=2, max_seq_len=512),
    # The benchmark shape compared with transformers' LlamaForCausalLM: 42M with a 32k vocabulary.
    "llama-42m": dict(dim=512, num_layers=8, num_heads=8, num_kv_heads=8, max_seq_len=512, vocab_size=32000),
    # Encoder-only (BERT layout): bidirectional attention, post-norm, learned positions, segment embeddings.
    "bert-tiny": dict(dim=64, num_layers=2, num_heads=4, num_kv_heads=4, max_seq_len=128, **BERT_LAYOUT),
    "bert-small": dict(dim=256, num_layers=4, num_heads=4, num_kv_heads=4, max_seq_len=512, **BERT_LAYOUT),
    # Encoder-decoder (T5 v1.1 layout): relative position bias, RMSNorm, GELU-gated FFN, no biases.
    "t5-tiny": dict(dim=64, num_layers=2, decoder_layers=2, num_heads=4, num_kv_heads=4, max_seq_len=128,
                    **T5_LAYOUT),
    "t5-small": dict(dim=256, num_layers=3, decoder_layers=3, num_heads=4, num_kv_heads=4, max_seq_len=512,
                     **T5_LAYOUT),
    # GPU sizes.
    "gpu-125m": dict(dim=768, num_layers=12, num_heads=12, num_kv_heads=4, max_seq_len=1024, vocab_size=32768),
    "gpu-350m": dict(dim=1024, num_layers=24, num_heads=16, num_kv_heads=4, max_seq_len=2048, vocab_size=32768),
    "gpu-1b": dict(dim=2048, num_layers=16, num_heads=32, num_kv_heads=8, max_seq_len=2048, vocab_size=32768,
                   rope_theta=500000.0),
}


def preset(name: str, **overrides) -> ModelConfig:
    """Build a named preset, with any field overridden."""
    if name not in PRESETS:
        raise InputError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig.from_dict({**PRESETS[name], **overrides})
