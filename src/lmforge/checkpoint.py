"""The one checkpoint format: a directory anyone can read.

    config.json            the model config (ModelConfig fields)
    model.safetensors      the weights (tied weights stored once)
    tokenizer.json         the tokenizer, when one is given
    trainer_state.json     step, tokens seen, run config ... (training only)
    quantization.json      how integer layers were quantized (lmforge quantize; lmforge.quant.integer)
    optimizer.safetensors  optimizer moments and RNG state (training only)

A checkpoint is written to a temporary sibling directory and renamed into place,
so a crash never leaves a half-written checkpoint behind. An imported model's
checkpoint also holds its ``tokenizer_config.json`` (special tokens, chat template).

:func:`load_model` and :func:`load_tokenizer` read other formats as well: Hugging
Face model directories (Llama, Mistral, Qwen2, GPT-2; :mod:`lmforge.interop.hf`),
GGUF files (:mod:`lmforge.interop.gguf`), and packaged models by their short name
(``smollm2-135m-instruct``; :mod:`lmforge.interop.packaged`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from lmforge.errors import InputError
from lmforge.files import new_folder, read_json
from lmforge.interop.gguf import load_gguf, metadata, open_gguf, tokenizer_from_gguf
from lmforge.interop.hf import is_hf_dir, load_hf, mmap_safetensors
from lmforge.interop.packaged import resolve_model
from lmforge.model import DecoderLM, ModelConfig, Transformer, build_model

CONFIG, WEIGHTS, TOKENIZER, STATE, OPTIMIZER = (
    "config.json", "model.safetensors", "tokenizer.json", "trainer_state.json", "optimizer.safetensors")


def model_state(model: DecoderLM) -> dict[str, torch.Tensor]:
    """Weights as a flat dict, tied head dropped (safetensors refuses shared storage)."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        for name in ("weight", "qweight", "scale", "zero"):  # an integer tied head shares the table's codes too
            state.pop(f"lm_head.{name}", None)
    return state


def save_checkpoint(path: str | Path, model: DecoderLM, tokenizer=None, trainer_state: dict | None = None,
                    extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a checkpoint directory atomically; returns its path."""
    return write_checkpoint(path, model.config, model_state(model), tokenizer, trainer_state, extra_tensors)


def write_checkpoint(path: str | Path, config: ModelConfig, state: dict[str, torch.Tensor], tokenizer=None,
                     trainer_state: dict | None = None, extra_tensors: dict[str, torch.Tensor] | None = None,
                     files: dict[str, str] | None = None) -> Path:
    """Write ``config`` and lmforge-named weights ``state`` (tied head left out) as a checkpoint, atomically;
    ``files``: more text files to put in it (name -> content)."""
    path = Path(path)
    with new_folder(path, "the checkpoint (the previous one, if any, is kept)", marker=CONFIG) as tmp:
        config.save(tmp / CONFIG)
        save_file({k: v.contiguous() for k, v in state.items()}, tmp / WEIGHTS, metadata={"format": "pt"})
        if tokenizer is not None:
            from lmforge.tokenizer.pretrained import PretrainedTokenizer

            # An imported model's tokenizer keeps its tokenizer_config.json (special tokens, chat template).
            tokenizer.save(tmp if isinstance(tokenizer, PretrainedTokenizer) else tmp / TOKENIZER)
        if trainer_state is not None:
            (tmp / STATE).write_text(json.dumps(trainer_state, indent=2) + "\n", encoding="utf-8")
        if extra_tensors:
            save_file({k: v.contiguous() for k, v in extra_tensors.items()}, tmp / OPTIMIZER)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
    return path


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / CONFIG).is_file() and (Path(path) / WEIGHTS).is_file() and not is_hf_dir(path)


def read_checkpoint(path: str | Path, dtype: torch.dtype | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and lmforge-named weights (memory-mapped) of an lmforge checkpoint, a Hugging
    Face model directory, a GGUF file or a packaged model's name; the weights in ``dtype``,
    or as stored when it is None (GGUF block-quantized tensors always come out fp32)."""
    path = resolve_model(path)
    if path.suffix == ".gguf":
        config, state, _ = load_gguf(path)
        return config, state
    if is_hf_dir(path):
        config, state, _ = load_hf(path, dtype)
        return config, state
    if not is_checkpoint(path):
        raise InputError(f"{path} is not an lmforge checkpoint (needs {CONFIG} and {WEIGHTS}) "
                         "nor a Hugging Face model directory")
    return ModelConfig.load(path / CONFIG), mmap_safetensors(path / WEIGHTS, dtype)


def load_model(path: str | Path, device: torch.device | str = "cpu", attention: str = "sdpa") -> Transformer:
    """Build the model of an lmforge checkpoint or a HF model directory, with fp32 weights.

    The weights are memory-mapped: an fp32 file is used in place (pages are read when
    first touched), another dtype is converted one tensor at a time.
    """
    from lmforge.quant.integer import prepare_quantized, read_spec, tie_head

    quantized = read_spec(resolve_model(path)) if resolve_model(path).is_dir() else None
    config, state = read_checkpoint(path, None if quantized else torch.float32)
    with torch.device("meta"):
        model = build_model(config, attention=attention)
    if quantized:  # integer layers (lmforge quantize): their codes and scales load as stored
        prepare_quantized(model, *quantized)
    state = {name: tensor.to(device=device, dtype=torch.float32 if tensor.is_floating_point() else tensor.dtype)
             for name, tensor in state.items()}
    tied_integer = config.tie_embeddings and "embed.qweight" in state
    if config.tie_embeddings:
        for name in ("qweight", "scale", "zero") if tied_integer else ("weight",):
            if f"embed.{name}" in state:
                state[f"lm_head.{name}"] = state[f"embed.{name}"]
    load_weights(model, state, resolve_model(path), assign=True)
    if tied_integer:
        tie_head(model)
    elif config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    model.init_buffers(device)  # the RoPE/sinusoidal tables were built on "meta"
    return model.float().eval()  # (an IntLinear keeps its integer codes and fp32 scales through .float())


def load_tokenizer(path: str | Path):
    """The tokenizer of a checkpoint, HF directory or GGUF file: lmforge's own, or an imported model's
    (:class:`~lmforge.tokenizer.pretrained.PretrainedTokenizer`, when ``tokenizer_config.json`` is there)."""
    from lmforge.tokenizer import Tokenizer
    from lmforge.tokenizer.pretrained import CONFIG_FILE, PretrainedTokenizer

    path = resolve_model(path)
    if path.suffix == ".gguf":
        return tokenizer_from_gguf(metadata(open_gguf(path)), str(path))
    if not (path / TOKENIZER).is_file():
        raise InputError(f"{path} has no {TOKENIZER}")
    if (path / CONFIG_FILE).is_file():
        return PretrainedTokenizer.from_dir(path)
    return Tokenizer.from_file(path / TOKENIZER)


def read_trainer_state(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Trainer state JSON and the saved optimizer/RNG tensors of a checkpoint."""
    path = Path(path)
    if not (path / STATE).is_file():
        raise InputError(f"{path} has no {STATE}: not a resumable training checkpoint")
    state = read_json(path / STATE)
    numbers = {key: state.get(key) for key in ("step", "max_steps", "elapsed")}
    if not all(isinstance(numbers[key], int) and not isinstance(numbers[key], bool) for key in ("step", "max_steps")) \
            or not 0 <= numbers["step"] <= numbers["max_steps"]:
        raise InputError(f"{path / STATE}: needs whole numbers 'step' and 'max_steps' with 0 <= step <= max_steps, "
                         f"found {numbers['step']!r} and {numbers['max_steps']!r}")
    if not isinstance(state.get("elapsed", 0.0), (int, float)):
        raise InputError(f"{path / STATE}: 'elapsed' must be a number of seconds, found {numbers['elapsed']!r}")
    tensors = mmap_safetensors(path / OPTIMIZER) if (path / OPTIMIZER).is_file() else {}
    return state, tensors


def load_weights(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path,
                 assign: bool = False) -> None:
    """``module.load_state_dict(state, strict=True)``, or an InputError naming ``source`` when the weights do
    not fit the module (a name missing or extra, a shape or dtype that differs)."""
    try:
        module.load_state_dict(state, strict=True, assign=assign)
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
        raise InputError(f"{source}: the weights do not fit the model: {'; '.join(lines[:3])[:400]}") from err
