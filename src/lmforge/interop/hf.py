"""Hugging Face model directories in and out: Llama, Mistral, Qwen2, GPT-2, BERT and T5 families.

A HF directory holds ``config.json`` (with ``model_type``), weights in
``model.safetensors`` or shards listed by ``model.safetensors.index.json``, and the
tokenizer (``tokenizer.json``, ``tokenizer_config.json`` with the chat template).

Reading maps the safetensors files into memory (copy-on-write) and hands out views,
so a weight is read from disk when it is first touched and never held twice; only a
change of layout (GPT-2's transposed ``Conv1D`` matrices) or of dtype makes a copy.
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from lmforge.errors import InputError
from lmforge.files import read_json
from lmforge.interop.bert import bert_to_lmforge, config_from_hf_bert, hf_bert_config, lmforge_to_bert
from lmforge.interop.gpt2 import config_from_hf_gpt2, gpt2_to_lmforge, hf_gpt2_config, lmforge_to_gpt2
from lmforge.interop.llama import LLAMA_FAMILY, config_from_hf_llama, hf_llama_config, llama_names
from lmforge.interop.t5 import config_from_hf_t5, hf_t5_config, lmforge_to_t5, t5_to_lmforge
from lmforge.model import ModelConfig

FAMILIES = (*LLAMA_FAMILY, "gpt2", "bert", "t5")
SAFETENSORS_MAX_HEADER = 100 * 2**20  # the most header a safetensors file may have (the format's own limit)
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def is_hf_dir(path: str | Path) -> bool:
    """True for a folder whose ``config.json`` names a transformers ``model_type``."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        found = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return False
    return isinstance(found, dict) and "model_type" in found


def read_hf_config(path: str | Path) -> dict:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise InputError(f"{path}: no config.json (not a Hugging Face model directory)")
    return read_json(file)


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """The lmforge ModelConfig of a transformers ``config.json`` (Llama, Mistral, Qwen2, GPT-2, BERT, T5)."""
    kind = hf.get("model_type")
    readers = {**dict.fromkeys(LLAMA_FAMILY, config_from_hf_llama), "gpt2": config_from_hf_gpt2,
               "bert": config_from_hf_bert, "t5": config_from_hf_t5}
    if kind not in readers:
        raise InputError(f"{source}: model_type {kind!r} is not supported; lmforge reads {', '.join(FAMILIES)}")
    try:
        config = readers[kind](hf, source)
    except KeyError as err:
        raise InputError(f"{source}: no {err.args[0]!r}, which a {kind} config needs") from err
    except (TypeError, ValueError, ZeroDivisionError, OverflowError) as err:  # a field of the wrong type or range
        raise InputError(f"{source}: {type(err).__name__}: {err}") from err
    try:  # the same type and range checks as an lmforge config.json
        return ModelConfig.from_dict(config.to_dict())
    except InputError as err:
        raise InputError(f"{source}: {err}") from err


# ---- safetensors, memory-mapped --------------------------------------------------------------------


def mmap_safetensors(path: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a ``.safetensors`` file as a view into a copy-on-write memory map.

    Nothing is read until a tensor is used; writing to one changes private pages only.
    With ``dtype``, tensors stored otherwise are converted one at a time and the file
    pages they came from are given back at once, so that loading bf16 weights into an
    fp32 model holds the fp32 copy, not both.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header_len = struct.unpack("<Q", f.read(8))[0]
            # the length is read from the file: check it against the file before reading that much
            if header_len > min(size - 8, SAFETENSORS_MAX_HEADER):
                raise InputError(f"{path}: not a safetensors file: its header claims {header_len:,} bytes "
                                 f"in a file of {size:,}")
            header = json.loads(f.read(header_len))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise InputError(f"{path}: not a readable safetensors file ({err})") from err
    entries = _checked_header(path, header, size - 8 - header_len)
    data_size = size - 8 - header_len
    data = torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c", offset=8 + header_len)) if data_size \
        else torch.empty(0, dtype=torch.uint8)
    out = {}
    for name, (stored, shape, start, end) in entries.items():
        raw = data[start:end]
        if start % stored.itemsize:  # a misaligned tensor cannot be viewed in place: copy it
            raw = raw.clone()
        tensor = raw.view(stored).view(shape)
        if dtype is not None and stored != dtype:
            tensor = tensor.to(dtype)
            _give_back_pages(raw)
        out[name] = tensor
    return out


def _checked_header(path: Path, header: object, data_size: int) -> dict[str, tuple]:
    """name -> (dtype, shape, start, end) of every tensor a safetensors header lists, each checked: a known
    dtype, a shape of non-negative integers, offsets inside the data whose span holds exactly that shape."""
    if not isinstance(header, dict):
        raise InputError(f"{path}: not a safetensors file: its header is not a JSON object")
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict):
            raise InputError(f"{where}: its entry is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in SAFETENSORS_DTYPES:
            raise InputError(f"{where} has dtype {dtype!r}, which lmforge does not read")
        if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
            raise InputError(f"{where}: shape {shape!r} is not a list of sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_size):
            raise InputError(f"{where}: data_offsets {offsets!r} do not lie in the file's {data_size:,} data bytes")
        stored = SAFETENSORS_DTYPES[dtype]
        if offsets[1] - offsets[0] != math.prod(shape) * stored.itemsize:
            raise InputError(f"{where}: {offsets[1] - offsets[0]:,} bytes do not hold a {dtype} tensor of shape "
                             f"{shape}")
        entries[name] = (stored, shape, *offsets)
    return entries


def _give_back_pages(raw: torch.Tensor) -> None:
    """Drop the resident pages under ``raw``, a view into a private file mapping.

    Safe only right after mapping: no page has been written yet, so a page dropped
    here that a neighbouring tensor still uses is read again from the file.
    """
    if not hasattr(mmap, "MADV_DONTNEED") or raw.numel() == 0:
        return
    page = mmap.PAGESIZE
    first = raw.data_ptr() // page * page
    last = -(-(raw.data_ptr() + raw.numel()) // page) * page
    ctypes.CDLL(None).madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), mmap.MADV_DONTNEED)


def read_hf_weights(path: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All weights of a HF directory, single file or sharded (``model.safetensors.index.json``);
    ``dtype`` as in :func:`mmap_safetensors`."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(n, str) and n and Path(n).name == n
                                                       and n not in (".", "..") for n in weight_map.values()):
            raise InputError(f"{index}: 'weight_map' must map tensor names to file names in this folder")
        files = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        hint = " (pytorch_model.bin is not read: convert it to safetensors)" if (path / "pytorch_model.bin").exists() else ""
        raise InputError(f"{path}: no model.safetensors or model.safetensors.index.json{hint}")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        if not (path / name).is_file():
            raise InputError(f"{path}: the index lists {name}, which is missing")
        tensors.update(mmap_safetensors(path / name, dtype))
    return tensors


def weights_from_hf(tensors: Mapping[str, torch.Tensor], config: ModelConfig, hf: dict,
                    source: str = "weights") -> dict[str, torch.Tensor]:
    """HF weights -> lmforge parameter names, in their stored dtype (views where the layout allows);
    ``hf`` is the model's ``config.json``."""
    model_type = hf["model_type"]
    if model_type == "t5":
        return t5_to_lmforge(tensors, config, hf, source)
    if model_type == "gpt2":
        return gpt2_to_lmforge(tensors, config)
    if model_type == "bert":
        return bert_to_lmforge(tensors, config, source)
    out = {}
    for ours, theirs in llama_names(config).items():
        if theirs not in tensors:
            if ours == "lm_head.weight" and "model.embed_tokens.weight" in tensors:
                raise InputError(f"{source}: no lm_head.weight but tie_word_embeddings is false")
            raise InputError(f"{source}: missing weight {theirs}")
        out[ours] = tensors[theirs]
    return out


# ---- whole directories --------------------------------------------------------------------------------


def load_hf(path: str | Path, dtype: torch.dtype | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor], str]:
    """(config, lmforge-named weights, model_type) of a HF model directory; the weights in
    ``dtype``, or in their stored dtype when it is None."""
    hf = read_hf_config(path)
    config = config_from_hf(hf, str(Path(path) / "config.json"))
    weights = weights_from_hf(read_hf_weights(path, dtype), config, hf, str(path))
    return config, weights, hf["model_type"]


def hf_config_for(config: ModelConfig, model_type: str | None = None) -> dict:
    """The HF ``config.json`` for an lmforge config: T5 for encoder-decoders, BERT for encoders, GPT-2 for
    classic decoders, Llama (or Qwen2) for modern ones."""
    if config.is_encoder_decoder:
        return hf_t5_config(config)
    if not config.causal:
        return hf_bert_config(config)
    if config.position == "learned":
        return hf_gpt2_config(config)
    return hf_llama_config(config, model_type or "llama")


def save_hf(out: str | Path, config: ModelConfig, state: Mapping[str, torch.Tensor], tokenizer=None,
            model_type: str | None = None) -> Path:
    """Write a HF model directory from lmforge-named weights: config.json, model.safetensors, tokenizer files;
    the folder is replaced whole (:func:`lmforge.files.new_folder`): a crash leaves the old one or the new one."""
    from lmforge.files import new_folder

    out = Path(out)
    hf = hf_config_for(config, model_type)
    if hf["model_type"] == "gpt2":
        tensors = lmforge_to_gpt2(state, config)
    elif hf["model_type"] == "bert":
        tensors = lmforge_to_bert(state, config)
    elif hf["model_type"] == "t5":
        tensors = lmforge_to_t5(state, config)
    else:
        tensors = {theirs: state[ours] for ours, theirs in llama_names(config).items()}
    dtypes = {t.dtype for t in tensors.values()}
    hf["torch_dtype"] = str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else "float32"
    if tokenizer is not None:
        for key in ("bos_id", "eos_id", "pad_id"):
            if getattr(tokenizer, key, None) is not None:
                hf[key.replace("_id", "_token_id")] = getattr(tokenizer, key)
    with new_folder(out, "the model (the previous one, if any, is kept)", marker="config.json") as tmp:
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n", encoding="utf-8")
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / "model.safetensors", metadata={"format": "pt"})
        if tokenizer is not None:
            save_tokenizer_hf(tokenizer, tmp)
            _save_generation_config(tokenizer, tmp)
    return out


def _save_generation_config(tokenizer, out: Path) -> None:
    """generation_config.json: generate() stops at the end of an assistant turn as well as at EOS."""
    from lmforge.tokenizer.chat import end_of_turn_ids

    stops = list(dict.fromkeys([*end_of_turn_ids(tokenizer), *([tokenizer.eos_id] if tokenizer.eos_id is not None else [])]))
    config = {"eos_token_id": stops if len(stops) > 1 else (stops[0] if stops else None)}
    for key in ("bos_id", "pad_id"):
        if getattr(tokenizer, key, None) is not None:
            config[key.replace("_id", "_token_id")] = getattr(tokenizer, key)
    (out / "generation_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def save_tokenizer_hf(tokenizer, out: Path) -> None:
    """tokenizer.json and a tokenizer_config.json that AutoTokenizer reads with the same ids."""
    from lmforge.tokenizer.pretrained import PretrainedTokenizer

    if isinstance(tokenizer, PretrainedTokenizer):
        tokenizer.save(out)
        return
    # An lmforge Tokenizer. lmforge models learn every document after <|begin_of_text|>, and
    # lmforge.load() frames prompts so; a post-processor makes transformers frame them alike.
    import tokenizers
    from tokenizers import processors

    bos = tokenizer.id_to_token(tokenizer.bos_id)
    hf = tokenizers.Tokenizer.from_str(tokenizer.hf.to_str())
    hf.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                      special_tokens=[(bos, tokenizer.bos_id)])
    hf.save(str(out / "tokenizer.json"))
    names = {"bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id, "pad_token": tokenizer.pad_id}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True, "add_eos_token": False,
              "clean_up_tokenization_spaces": False, "model_max_length": 1_000_000,
              **{key: tokenizer.id_to_token(index) for key, index in names.items()}}
    template = getattr(tokenizer, "chat_template", None)
    if template:
        config["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
