"""How a training command changes a model's weights: all of them, LoRA adapters, or adapters over a 4-bit base.

Every command that fine-tunes (``sft``, ``dpo``, and the RL commands) shares these fields and these
two steps: :func:`prepare_weights` before training (freeze, quantize, put adapters on) and
:func:`finish_weights` after it (save the adapters in PEFT's layout, merge them into plain weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lmforge.peft.lora import ALL_PROJECTIONS, LoraConfig, apply_lora, merge_lora, save_adapter
from lmforge.settings import field

METHODS = ("full", "lora", "qlora")


@dataclass
class MethodConfig:
    """Which weights train."""

    method: str = field("lora", "full (every weight), lora (adapters) or qlora (adapters over a 4-bit base)")
    lora_rank: int = field(8, "LoRA rank")
    lora_alpha: float = field(16.0, "LoRA alpha (the update is scaled by alpha / rank)")
    lora_dropout: float = field(0.0, "dropout on the LoRA branch")
    lora_targets: list[str] = field(list(ALL_PROJECTIONS), "linear layers that get adapters")

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}; choose one of {', '.join(METHODS)}")

    @property
    def adapters(self) -> bool:
        return self.method != "full"


def prepare_weights(model: nn.Module, config: MethodConfig, seed: int) -> int:
    """Quantize the base (qlora) and put adapters on (lora, qlora); returns the trainable parameter count."""
    if config.method == "qlora":
        from lmforge.quant import quantize_model_nf4

        quantize_model_nf4(model)
    if config.adapters:
        torch.manual_seed(seed)  # the adapters' initial A: the same run twice is the same run
        apply_lora(model, LoraConfig(config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_targets))
        if getattr(model, "score", None) is not None:  # a reward or value head starts fresh: it trains in full
            model.score.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def finish_weights(model: nn.Module, config: MethodConfig, out: Path, base_model: str) -> None:
    """Save the adapters to ``out/adapter`` (PEFT layout) and merge them: ``model`` becomes a plain model."""
    if not config.adapters:
        return
    save_adapter(model, Path(out) / "adapter", base_model=base_model)
    if config.method == "qlora":  # the 4-bit base back to plain weights, so the adapters can merge
        from lmforge.quant import dequantize_model

        dequantize_model(model)
    merge_lora(model)
