"""The one checkpoint format: a directory anyone can read.

    config.json            the model config (ModelConfig fields)
    model.safetensors      the weights (tied weights stored once)
    tokenizer.json         the tokenizer, when one is given
    trainer_state.json     step, tokens seen, run config ... (training only)
    optimizer.safetensors  optimizer moments and RNG state (training only)

A checkpoint is written to a temporary sibling directory and renamed into place,
so a crash never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmforge.errors import InputError
from lmforge.model import DecoderLM, ModelConfig

CONFIG, WEIGHTS, TOKENIZER, STATE, OPTIMIZER = (
    "config.json", "model.safetensors", "tokenizer.json", "trainer_state.json", "optimizer.safetensors")


def model_state(model: DecoderLM) -> dict[str, torch.Tensor]:
    """Weights as a flat dict, tied head dropped (safetensors refuses shared storage)."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def save_checkpoint(path: str | Path, model: DecoderLM, tokenizer=None, trainer_state: dict | None = None,
                    extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a checkpoint directory atomically; returns its path."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.config.save(tmp / CONFIG)
    save_file(model_state(model), tmp / WEIGHTS, metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(tmp / TOKENIZER)
    if trainer_state is not None:
        (tmp / STATE).write_text(json.dumps(trainer_state, indent=2) + "\n", encoding="utf-8")
    if extra_tensors:
        save_file({k: v.contiguous() for k, v in extra_tensors.items()}, tmp / OPTIMIZER)
    old = path.with_name(path.name + ".old")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old)
    return path


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / CONFIG).is_file() and (Path(path) / WEIGHTS).is_file()


def load_model(path: str | Path, device: torch.device | str = "cpu", attention: str = "sdpa") -> DecoderLM:
    """Build the model from ``config.json`` and load ``model.safetensors`` into it (fp32 weights)."""
    path = Path(path)
    if not is_checkpoint(path):
        raise InputError(f"{path} is not an lmforge checkpoint (needs {CONFIG} and {WEIGHTS})")
    config = ModelConfig.load(path / CONFIG)
    with torch.device("meta"):
        model = DecoderLM(config, attention=attention)
    state = load_file(path / WEIGHTS, device=str(device))
    if config.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    model.init_buffers(device)  # the RoPE/sinusoidal tables were built on "meta"
    return model.float().eval()


def load_tokenizer(path: str | Path):
    """The tokenizer stored in a checkpoint directory."""
    from lmforge.tokenizer import Tokenizer

    file = Path(path) / TOKENIZER
    if not file.is_file():
        raise InputError(f"{path} has no {TOKENIZER}")
    return Tokenizer.from_file(file)


def read_trainer_state(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Trainer state JSON and the saved optimizer/RNG tensors of a checkpoint."""
    path = Path(path)
    if not (path / STATE).is_file():
        raise InputError(f"{path} has no {STATE}: not a resumable training checkpoint")
    state = json.loads((path / STATE).read_text(encoding="utf-8"))
    tensors = load_file(path / OPTIMIZER) if (path / OPTIMIZER).is_file() else {}
    return state, tensors
