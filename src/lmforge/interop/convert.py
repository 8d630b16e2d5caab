"""``lmforge import`` and ``lmforge export``: whole checkpoints between lmforge and other formats.

Weights keep their stored dtype in both directions, so HF -> lmforge -> HF gives
back every tensor bit for bit.
"""

from __future__ import annotations

from pathlib import Path

from lmforge.checkpoint import TOKENIZER, load_tokenizer, read_checkpoint, write_checkpoint
from lmforge.errors import InputError
from lmforge.interop.hf import is_hf_dir, save_hf
from lmforge.interop.packaged import resolve_model

FORMATS = ("hf",)


def import_model(source: str | Path, out: str | Path) -> Path:
    """A Hugging Face model directory, a GGUF file or a packaged model's name -> an lmforge
    checkpoint (config, weights, tokenizer with its chat template)."""
    path = resolve_model(source)
    if path.suffix != ".gguf" and not is_hf_dir(path):
        raise InputError(f"{source}: neither a Hugging Face model directory (config.json with model_type) "
                         "nor a .gguf file")
    config, state = read_checkpoint(path)
    has_tokenizer = path.suffix == ".gguf" or (path / TOKENIZER).is_file()
    return write_checkpoint(out, config, state, load_tokenizer(path) if has_tokenizer else None)


def export_checkpoint(checkpoint: str | Path, out: str | Path, format: str = "hf") -> Path:
    """An lmforge checkpoint (or HF directory) -> ``format``: "hf" writes a transformers model directory,
    Llama layout (Qwen2 with q/k/v biases) for RoPE models, GPT-2 layout for learned positions."""
    if format not in FORMATS:
        raise InputError(f"unknown export format {format!r}; choose {', '.join(FORMATS)}")
    config, state = read_checkpoint(checkpoint)
    tokenizer = load_tokenizer(checkpoint) if (Path(checkpoint) / TOKENIZER).is_file() else None
    return save_hf(out, config, state, tokenizer)
