"""GGUF files (llama.cpp, ollama) in and out: Llama-family weights, tokenizer and chat template.

A GGUF file is one self-describing file: metadata (the shape under
``{architecture}.*`` keys, the tokenizer under ``tokenizer.ggml.*``, the chat
template) and tensors, possibly quantized in blocks (q8_0, q4_0, q4_1 ...). The
``gguf`` package reads it; quantized tensors are dequantized to fp32 on load.

Two layout facts matter:
* GGUF shapes list the fastest dimension first (``[in, out]``); the array the reader
  returns is already ``(out, in)``, a ``nn.Linear`` weight.
* llama.cpp's converter reorders the rows of the Llama query and key projections so
  that RoPE rotates adjacent pairs (2i, 2i+1); lmforge, like Hugging Face, rotates
  (i, i + head_dim/2). :func:`unpermute_rotary` undoes that reordering. Qwen2 files
  keep HF's order.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from lmforge.errors import InputError
from lmforge.files import new_file
from lmforge.model import ModelConfig
from lmforge.tokenizer.bytelevel import SPLIT_PATTERN

ARCHITECTURES = ("llama", "qwen2")
TOKENIZER_MODELS = ("gpt2",)  # byte-level BPE; sentencepiece ("llama") vocabularies are not read yet

# Pre-tokenizer regexes by ``tokenizer.ggml.pre``: how text is cut into words before BPE, applied
# in turn (each regex splits the pieces the one before made), as llama.cpp's llama-vocab.cpp does.
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
DIGIT_SPLIT = r"\p{N}"  # every digit on its own (SmolLM, StarCoder), before the GPT-2 split
LLAMA3_SPLIT = SPLIT_PATTERN  # lmforge's own tokenizers split text as Llama 3 does
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
               r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
PRE_TOKENIZER_SPLITS = {"default": (GPT2_SPLIT,), "gpt-2": (GPT2_SPLIT,), "smollm": (DIGIT_SPLIT, GPT2_SPLIT),
                        "starcoder": (DIGIT_SPLIT, GPT2_SPLIT), "llama-bpe": (LLAMA3_SPLIT,),
                        "llama3": (LLAMA3_SPLIT,), "qwen2": (QWEN2_SPLIT,),
                        "gpt2": (GPT2_SPLIT,)}  # "gpt2": what lmforge wrote before; llama.cpp refuses it
# The name written for each split, as llama.cpp's convert_hf_to_gguf.py names it (Llama 3 ->
# "llama-bpe", GPT-2 -> "gpt-2", SmolLM -> "smollm", Qwen2 -> "qwen2"); a tokenizer read from a
# GGUF file keeps the name it carried (GGUF_PRE_KEY of its config) instead.
EXPORT_PRE_NAMES = ("llama-bpe", "qwen2", "gpt-2", "smollm")
GGUF_PRE_KEY = "gguf_pre_tokenizer"
CONTROL = 3  # tokenizer.ggml.token_type of special tokens such as <|im_end|>


def open_gguf(path: str | Path):
    """A ``gguf.GGUFReader`` (the file is memory-mapped), with a clear error for anything unreadable.

    Readers are cached by path and modification time: parsing the metadata of a
    vocabulary of 50k tokens takes seconds, and loading a model reads it twice
    (weights, then tokenizer).
    """
    try:
        import gguf  # noqa: F401
    except ImportError as err:
        raise InputError("reading GGUF files needs the gguf package: pip install gguf") from err
    path = Path(path).resolve()
    if not path.is_file():
        raise InputError(f"GGUF file not found: {path}")
    return _reader(path, path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _reader(path: Path, mtime_ns: int):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as err:  # the reader raises ValueError, struct.error ... on a damaged file
        raise InputError(f"{path}: not a readable GGUF file ({err})") from err


def metadata(reader) -> dict:
    """Every metadata key with its value (arrays as lists)."""
    out = {}
    for key, field in reader.fields.items():
        try:
            out[key] = field.contents()
        except Exception:  # a value type the package cannot decode: leave it out
            continue
    return out


def config_from_gguf(meta: dict, source: str) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise InputError(f"{source}: GGUF architecture {arch!r} is not supported; lmforge reads {', '.join(ARCHITECTURES)}")

    def get(key: str, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise InputError(f"{source}: GGUF metadata has no {arch}.{key}")
        return value

    dim, heads = get("embedding_length"), get("attention.head_count")
    scaling_type = meta.get(f"{arch}.rope.scaling.type", "none")
    scaling = None
    if scaling_type == "linear":
        scaling = {"type": "linear", "factor": get("rope.scaling.factor")}
    elif scaling_type not in ("none", None):
        raise InputError(f"{source}: RoPE scaling {scaling_type!r} in GGUF is not supported")
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or [])
    try:
        return ModelConfig(vocab_size=vocab, max_seq_len=get("context_length"), dim=dim,
                           num_layers=get("block_count"), num_heads=heads,
                           num_kv_heads=get("attention.head_count_kv", heads),
                           head_dim=get("attention.key_length", meta.get(f"{arch}.rope.dimension_count", dim // heads)),
                           ffn_dim=get("feed_forward_length"), norm_eps=_float32(get("attention.layer_norm_rms_epsilon")),
                           rope_theta=_float32(get("rope.freq_base", 10000.0)), rope_scaling=scaling,
                           qkv_bias=arch == "qwen2", tie_embeddings=True)
    except ValueError as err:
        raise InputError(f"{source}: {err}") from err


def permute_rotary(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp's row order for q/k projections, from HF's: per head, rows (2, pair) -> (pair, 2)."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _float32(value: float) -> float:
    """A float GGUF stored in 32 bits, as the shortest decimal that rounds to it (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def unpermute_rotary(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's row order for q/k projections: per head, rows (pair, 2) -> (2, pair).

    weight (heads * head_dim, ...) or a bias (heads * head_dim,).
    """
    rows = weight.shape[0]
    return weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def tensor_to_torch(tensor) -> torch.Tensor:
    """A GGUF tensor as a torch tensor of its own memory: f32/f16 copied out of the read-only
    mapped file (training writes to weights in place), bf16 reinterpreted, block-quantized
    types dequantized to fp32."""
    import gguf

    kind = tensor.tensor_type
    data = tensor.data
    if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return torch.from_numpy(np.array(data))
    if kind == gguf.GGMLQuantizationType.BF16:
        shape = tuple(int(d) for d in reversed(tensor.shape))
        return torch.from_numpy(np.asarray(data).view(np.uint16).reshape(shape).copy()).view(torch.bfloat16)
    try:
        return torch.from_numpy(gguf.quants.dequantize(data, kind))
    except NotImplementedError as err:
        raise InputError(f"tensor {tensor.name}: GGUF type {kind.name} cannot be dequantized") from err


def load_gguf(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], dict]:
    """(config, lmforge-named weights, metadata) of a Llama-family GGUF file."""
    reader = open_gguf(path)
    meta = metadata(reader)
    config = config_from_gguf(meta, str(path))
    tensors = {t.name: t for t in reader.tensors}
    permute = meta["general.architecture"] == "llama"

    def take(name: str) -> torch.Tensor:
        if name not in tensors:
            raise InputError(f"{path}: GGUF file has no tensor {name}")
        return tensor_to_torch(tensors[name])

    state = {"embed.weight": take("token_embd.weight"), "norm.weight": take("output_norm.weight")}
    if "output.weight" in tensors:
        state["lm_head.weight"] = take("output.weight")
        config.tie_embeddings = False
    for i in range(config.num_layers):
        ours, theirs = f"blocks.{i}.", f"blk.{i}."
        state[ours + "attn_norm.weight"] = take(theirs + "attn_norm.weight")
        state[ours + "ffn_norm.weight"] = take(theirs + "ffn_norm.weight")
        for proj, name, heads in (("q_proj", "attn_q", config.num_heads), ("k_proj", "attn_k", config.num_kv_heads),
                                  ("v_proj", "attn_v", 0), ("o_proj", "attn_output", 0)):
            weight = take(theirs + f"{name}.weight")
            state[ours + f"attn.{proj}.weight"] = unpermute_rotary(weight, heads) if permute and heads else weight
            if config.qkv_bias and proj != "o_proj":
                state[ours + f"attn.{proj}.bias"] = take(theirs + f"{name}.bias")
        for proj, name in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
            state[ours + f"ffn.{proj}.weight"] = take(theirs + f"{name}.weight")
    return config, state, meta


def tokenizer_from_gguf(meta: dict, source: str):
    """The byte-level BPE tokenizer, special tokens and chat template stored in GGUF metadata."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    from lmforge.tokenizer.pretrained import PretrainedTokenizer

    kind = meta.get("tokenizer.ggml.model")
    if kind not in TOKENIZER_MODELS:
        raise InputError(f"{source}: GGUF tokenizer model {kind!r} is not supported; lmforge reads byte-level BPE "
                         "('gpt2')")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZER_SPLITS:
        raise InputError(f"{source}: GGUF pre-tokenizer {pre!r} is not known; known: {', '.join(PRE_TOKENIZER_SPLITS)}")
    tokens, merges = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.merges", [])
    types = meta.get("tokenizer.ggml.token_type") or []
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens) \
            or not isinstance(merges, list) or not all(isinstance(m, str) and " " in m for m in merges) \
            or not isinstance(types, list) or not all(isinstance(t, int) for t in types):
        raise InputError(f"{source}: the GGUF tokenizer needs tokenizer.ggml.tokens (strings), merges ('a b' "
                         "strings) and token types (integers)")
    merges = [tuple(merge.split(" ", 1)) for merge in merges]
    hf = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        *(pre_tokenizers.Split(Regex(split), behavior="isolated") for split in PRE_TOKENIZER_SPLITS[pre]),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                           for i, kind in enumerate(types) if kind == CONTROL])

    def name(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}")
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    config = {"bos_token": name("bos_token_id"), "eos_token": name("eos_token_id"), "pad_token": name("padding_token_id"),
              "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
              "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False))}
    if "tokenizer.ggml.pre" in meta:  # written back on export: it names the model's split, not just its regex
        config[GGUF_PRE_KEY] = pre
    return PretrainedTokenizer(hf, config, meta.get("tokenizer.chat_template"), source=source)


# ---- out --------------------------------------------------------------------------------------------------

GGUF_OUT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")


def save_gguf(path: str | Path, config: ModelConfig, state: dict[str, torch.Tensor], tokenizer=None,
              out_type: str = "f16", name: str = "lmforge model") -> Path:
    """Write a Llama-layout model as a GGUF file that llama.cpp and ollama load.

    ``out_type`` stores the matrices as f32, f16, bf16, q8_0 (blocks of 32 int8
    weights with one f16 scale: absmax quantization) or q4_0 (blocks of 32 4-bit codes,
    the scale the block's largest-magnitude weight over -8); norm gains stay f32, as
    llama.cpp expects. The tokenizer (byte-level BPE, its merges, special tokens,
    chat template) goes into the metadata.
    """
    import gguf

    from lmforge.interop.llama import check_llama_compatible

    check_llama_compatible(config)
    if out_type not in GGUF_OUT_TYPES:
        raise InputError(f"GGUF type {out_type!r}; choose one of {', '.join(GGUF_OUT_TYPES)}")
    if config.bias or config.qkv_bias or config.rope_scaling:
        raise InputError("GGUF export covers plain Llama layouts: no biases, no RoPE scaling")
    with new_file(path, "the GGUF file (the previous one, if any, is kept)") as temporary:
        _write_gguf(gguf.GGUFWriter(str(temporary), "llama"), config, state, tokenizer, out_type, name)
    return Path(path)


def _write_gguf(writer, config: ModelConfig, state: dict[str, torch.Tensor], tokenizer, out_type: str,
                name: str) -> None:
    import gguf

    writer.add_name(name)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.ffn_dim)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                  "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
    writer.add_file_type(file_types[out_type])
    if tokenizer is not None:
        _write_tokenizer(writer, tokenizer, config.vocab_size)
    for gguf_name, tensor in _gguf_tensors(config, state):
        _add_tensor(writer, gguf_name, tensor, out_type if tensor.dim() == 2 else "f32")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _gguf_tensors(config: ModelConfig, state: dict[str, torch.Tensor]):
    yield "token_embd.weight", state["embed.weight"]
    for i in range(config.num_layers):
        ours, theirs = f"blocks.{i}.", f"blk.{i}."
        yield theirs + "attn_norm.weight", state[ours + "attn_norm.weight"]
        yield theirs + "attn_q.weight", permute_rotary(state[ours + "attn.q_proj.weight"], config.num_heads)
        yield theirs + "attn_k.weight", permute_rotary(state[ours + "attn.k_proj.weight"], config.num_kv_heads)
        yield theirs + "attn_v.weight", state[ours + "attn.v_proj.weight"]
        yield theirs + "attn_output.weight", state[ours + "attn.o_proj.weight"]
        yield theirs + "ffn_norm.weight", state[ours + "ffn_norm.weight"]
        for proj, name in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
            yield theirs + f"{name}.weight", state[ours + f"ffn.{proj}.weight"]
    yield "output_norm.weight", state["norm.weight"]
    if not config.tie_embeddings:
        yield "output.weight", state["lm_head.weight"]


def _add_tensor(writer, name: str, tensor: torch.Tensor, out_type: str) -> None:
    import gguf

    data = tensor.detach().float().contiguous().numpy()
    if out_type == "f32":
        writer.add_tensor(name, data)
    elif out_type == "f16":
        writer.add_tensor(name, data.astype(np.float16))
    else:
        qtype = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
                 "q4_0": gguf.GGMLQuantizationType.Q4_0}[out_type]
        if out_type != "bf16" and data.shape[-1] % 32:
            raise InputError(f"{name}: {out_type} needs rows that are a multiple of 32 wide, got {data.shape[-1]}")
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


def _pre_tokenizer_name(pre: dict) -> str:
    """The ``tokenizer.ggml.pre`` name under which llama.cpp splits text as this pre-tokenizer does.

    ``pre`` is the ``pre_tokenizer`` of a ``tokenizer.json``: Split steps with a regex (lmforge's
    own tokenizers, and what :func:`tokenizer_from_gguf` builds), a Digits step, and ByteLevel
    (whose own regex is GPT-2's when ``use_regex``).
    """
    splits = []
    for step in pre.get("pretokenizers") or [pre]:
        kind = step.get("type")
        if kind == "Split" and (step.get("pattern") or {}).get("Regex"):
            splits.append(step["pattern"]["Regex"])
        elif kind == "Digits" and step.get("individual_digits"):
            splits.append(DIGIT_SPLIT)
        elif kind == "ByteLevel" and step.get("use_regex", True):
            splits.append(GPT2_SPLIT)
        elif kind not in ("ByteLevel", None):
            raise InputError(f"GGUF export: the tokenizer's {kind} pre-tokenizer step has no llama.cpp equivalent")
    for name in EXPORT_PRE_NAMES:
        if tuple(splits) == PRE_TOKENIZER_SPLITS[name]:
            return name
    if splits:
        raise InputError("GGUF export: the tokenizer splits text with a regex llama.cpp does not know by name")
    raise InputError("GGUF export: the tokenizer is not byte-level BPE with a known split "
                     f"({', '.join(EXPORT_PRE_NAMES)})")


def _kept_pre_tokenizer_name(tokenizer) -> str | None:
    """The name a tokenizer read from a GGUF file carried, when llama.cpp knows it (not lmforge's old "gpt2")."""
    name = (getattr(tokenizer, "config", None) or {}).get(GGUF_PRE_KEY)
    if name == "gpt2":
        return "gpt-2"
    return name if name in PRE_TOKENIZER_SPLITS else None


def _write_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """Byte-level BPE vocabulary, merges and specials under llama.cpp's ``tokenizer.ggml.*`` keys."""
    import json

    config = json.loads(tokenizer.hf.to_str())
    vocab: dict[str, int] = dict(config["model"]["vocab"])
    for added in config.get("added_tokens") or []:
        vocab[added["content"]] = added["id"]
    special = {added["content"] for added in config.get("added_tokens") or [] if added.get("special")}
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]  # ids the tokenizer never produces
    types = [5] * vocab_size  # 5: unused
    for token, index in vocab.items():
        if index < vocab_size:
            tokens[index], types[index] = token, CONTROL if token in special else 1  # 1: normal
    merges = [" ".join(m) if isinstance(m, list) else m for m in config["model"].get("merges") or []]
    writer.add_tokenizer_model("gpt2")
    pre = _kept_pre_tokenizer_name(tokenizer) or _pre_tokenizer_name(config.get("pre_tokenizer") or {})
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, add in (("bos_id", writer.add_bos_token_id), ("eos_id", writer.add_eos_token_id),
                     ("pad_id", writer.add_pad_token_id)):
        if getattr(tokenizer, key, None) is not None:
            add(getattr(tokenizer, key))
    bos_token = getattr(tokenizer, "bos_token", None)
    if getattr(tokenizer, "bos_id", None) is None and bos_token in vocab:
        writer.add_bos_token_id(vocab[bos_token])  # named but not added (SmolLM2): else llama.cpp assumes id 11
    writer.add_add_bos_token(getattr(tokenizer, "bos_id", None) is not None)
    template = getattr(tokenizer, "chat_template", None)
    if template:
        writer.add_chat_template(template)
