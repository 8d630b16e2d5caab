"""LoRA adapters looked at: for each adapted layer, the frozen weight W beside its update ΔW = (alpha / r) B A,
their norms and singular values (a rank-r product has at most r), and how many directions the update uses.

    view = lora_view(load_lora("smollm2-135m-instruct", "runs/lora/adapter"))
    view.layers[0].delta_singular       # ΔW's spectrum
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmforge.errors import InputError
from lmforge.inspector.plain import Plain, load_any, some, unwrap


@dataclass
class LoraLayer(Plain):
    """One adapted layer: its frozen weight W (out, in) and the update ΔW = (alpha / r) · B A beside it."""

    name: str
    rank: int  # r: A is (r, in), B is (out, r)
    alpha: float
    scale: float  # alpha / r
    shape: tuple[int, int]
    weight_norm: float  # ||W||, Frobenius
    delta_norm: float  # ||ΔW||
    ratio: float  # ||ΔW|| / ||W||: how far the adapter moves the layer
    delta_singular: np.ndarray  # (r,) the largest singular values of ΔW: a rank-r product has at most r
    delta_tail: float  # the largest singular value of ΔW past the r-th (0 up to float32 rounding)
    weight_singular: np.ndarray  # (r,) the largest singular values of W, for scale
    effective_rank: float  # exp(entropy of ΔW's normalised singular values): r when all are equal, 1 for one
    enabled: bool  # off: the layer is its base alone (a reference model inside DPO, PPO, GRPO)
    merged: bool  # ΔW already added into the base weight (W above is the weight without it)


@dataclass
class LoraView(Plain):
    """Every LoRA adapter of a model, in module order."""

    layers: list[LoraLayer]
    adapter_parameters: int  # entries of every A and B
    base_parameters: int  # entries of the frozen weights they adapt

    def layer(self, name: str) -> LoraLayer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        names = [layer.name for layer in self.layers]
        raise InputError(f"no LoRA adapter on {name!r}; adapted layers: {some(names)}")



def effective_rank(singular: torch.Tensor) -> float:
    """exp(H(p)) with p = s / sum(s) (Roy and Vetterli, 2007): how many directions carry the update; 0 for
    an update that is all zero (a fresh adapter, B = 0)."""
    total = float(singular.sum())
    if total <= 0:
        return 0.0
    p = singular[singular > 0].double() / total
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def lora_view(model: Any) -> LoraView:
    """Look at the LoRA adapters of ``model`` (a model after ``apply_lora`` or :func:`load_lora`, or a
    :class:`lmforge.api.LanguageModel` holding one): per adapted layer, rank, alpha, the norms of W and ΔW,
    their singular values (``torch.linalg.svdvals`` in float32) and ΔW's effective rank."""
    from lmforge.peft.lora import lora_layers

    module = unwrap(model)
    adapted = lora_layers(module) if isinstance(module, nn.Module) else {}
    if not adapted:
        raise InputError("this model holds no LoRA adapters: put them on with lmforge.peft.apply_lora, or "
                         "load a saved adapter with lmforge.inspector.stages.load_lora(base, adapter_dir)")
    config_alpha = getattr(getattr(module, "lora_config", None), "alpha", None)
    layers, adapter_parameters, base_parameters = [], 0, 0
    for name, layer in adapted.items():
        rank = layer.lora_A.shape[0]
        delta = layer.delta().detach().float()  # (out, in)
        weight = layer.base.weight.detach().float()
        if layer.merged:  # the base weight holds W + ΔW
            weight = weight - delta
        delta_singular = torch.linalg.svdvals(delta)
        weight_singular = torch.linalg.svdvals(weight)
        weight_norm, delta_norm = float(torch.linalg.norm(weight)), float(torch.linalg.norm(delta))
        alpha = float(config_alpha) if config_alpha is not None and \
            math.isclose(config_alpha / rank, layer.scale) else layer.scale * rank
        tail = float(delta_singular[rank:].max()) if len(delta_singular) > rank else 0.0
        ratio = delta_norm / weight_norm if weight_norm > 0 else math.inf
        layers.append(LoraLayer(
            name, rank, alpha, float(layer.scale), tuple(delta.shape), weight_norm, delta_norm, ratio,
            delta_singular[:rank].cpu().numpy(), tail, weight_singular[:rank].cpu().numpy(),
            effective_rank(delta_singular[:rank]), layer.enabled, layer.merged))
        adapter_parameters += layer.lora_A.numel() + layer.lora_B.numel()
        base_parameters += weight.numel()
    return LoraView(layers, adapter_parameters, base_parameters)


def load_lora(base: Any, adapter_dir: str | Path) -> nn.Module:
    """``base`` with the adapters saved in ``adapter_dir`` (PEFT layout: what ``lmforge sft|dpo|rm --method
    lora`` writes to ``OUT/adapter``) put on, ready for :func:`lora_view`.

    ``base``: a model (changed in place), a checkpoint path or packaged name, or None for the model the
    adapter names (``base_model_name_or_path``, the run's ``--model``). A run's ``OUT/model`` already has
    the adapters merged in: load them onto the model the run started from. A reward model's adapter
    (``task_type`` SEQ_CLS) carries its score head; a language-model base gets that head first."""
    from lmforge.model.heads import with_head
    from lmforge.peft.lora import ADAPTER_WEIGHTS, load_adapter, read_adapter

    folder = Path(adapter_dir)
    peft_config, tensors = read_adapter(folder)
    if base is None:
        base = peft_config.get("base_model_name_or_path") or None
        if base is None:
            raise InputError(f"{folder}: the adapter does not name its base model; pass base")
    model = load_any(base)
    score_key = "base_model.model.score.weight"
    if peft_config.get("task_type") == "SEQ_CLS" and model.config.head != "score":
        model = with_head(model, "score")
    load_adapter(model, folder)
    if model.config.head == "score" and score_key in tensors:
        if tensors[score_key].shape != model.score.weight.shape:
            raise InputError(f"{folder / ADAPTER_WEIGHTS}: {score_key} has shape {list(tensors[score_key].shape)}, "
                             f"the model's score head {list(model.score.weight.shape)}")
        with torch.no_grad():
            model.score.weight.copy_(tensors[score_key])
    return model.eval()
