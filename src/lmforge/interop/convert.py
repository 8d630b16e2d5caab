"""``lmforge import`` and ``lmforge export``: whole checkpoints between lmforge and other formats.

Weights keep their stored dtype in both directions, so HF -> lmforge -> HF gives
back every tensor bit for bit.
"""

from __future__ import annotations

from pathlib import Path

from lmforge.checkpoint import TOKENIZER, load_tokenizer, read_checkpoint, write_checkpoint
from lmforge.errors import InputError
from lmforge.files import holds_output
from lmforge.interop.gguf import save_gguf
from lmforge.interop.hf import is_hf_dir, save_hf
from lmforge.interop.packaged import resolve_model
from lmforge.quant.integer import dequantized_state, read_spec

FORMATS = ("hf", "gguf")


@holds_output("out")
def import_model(source: str | Path, out: str | Path) -> Path:
    """A Hugging Face model directory, a GGUF file or a packaged model's name -> an lmforge
    checkpoint (config, weights, tokenizer with its chat template)."""
    path = resolve_model(source)
    if path.suffix != ".gguf" and not is_hf_dir(path):
        raise InputError(f"{source}: neither a Hugging Face model directory (config.json with model_type) "
                         "nor a .gguf file")
    config, state = read_checkpoint(path)
    return write_checkpoint(out, config, state, _tokenizer_or_none(path))


@holds_output("out")
def export_checkpoint(checkpoint: str | Path, out: str | Path, format: str = "hf", gguf_type: str = "f16") -> Path:
    """An lmforge checkpoint (or any model lmforge reads) -> ``format``.

    "hf" writes a transformers model directory: Llama layout (Qwen2 with q/k/v biases)
    for RoPE models, GPT-2 layout for learned positions, BERT for encoders, T5 for encoder-decoders. "gguf" writes one file for
    llama.cpp/ollama (Llama layout), its matrices in ``gguf_type`` (f32, f16, bf16, q8_0, q4_0).
    A checkpoint of ``lmforge quantize`` is exported from its dequantized weights.
    """
    if format not in FORMATS:
        raise InputError(f"unknown export format {format!r}; choose {', '.join(FORMATS)}")
    path = resolve_model(checkpoint)
    config, state = read_checkpoint(path)
    if path.is_dir() and (quantized := read_spec(path)):
        state = dequantized_state(state, *quantized)
    if config.head == "lm+value":
        raise InputError(f"{path} is a PPO training checkpoint (a policy with a value head): export the policy "
                         "that `lmforge ppo` writes to OUT_DIR/model")
    if config.is_encoder_decoder and format != "hf":
        raise InputError(f"{path} is an encoder-decoder: it exports to transformers' T5 (--format hf), not to GGUF")
    if config.head != "lm" and format != "hf":
        kind = "a reward model" if config.head == "score" else "an encoder"
        raise InputError(f"{path} has the {config.head!r} head ({kind}): it exports to transformers "
                         "(--format hf), not to GGUF")
    if config.head == "score" and config.position != "rope":
        raise InputError(f"{path}: a reward model exports in the Llama layout only (RoPE), not {config.position!r}")
    tokenizer = _tokenizer_or_none(path)
    if format == "gguf":
        return save_gguf(out, config, state, tokenizer, gguf_type, name=path.stem if path.suffix else path.name)
    return save_hf(out, config, state, tokenizer)


def _tokenizer_or_none(path: Path):
    """The model's tokenizer; None for a weights-only folder."""
    return load_tokenizer(path) if path.suffix == ".gguf" or (path / TOKENIZER).is_file() else None
