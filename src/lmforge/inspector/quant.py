"""A model beside its quantized copy: every layer's rounding error, and one layer's weights before and after
rounding with the grid of levels they snap to (``scale · (q − zero)``), through the project's own dequantization.

    view = quant_view("runs/speedrun/train/checkpoint", "runs/int4")
    view.layers[0].mse, view.error_histogram, view.grid.levels
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from lmforge.errors import InputError
from lmforge.inspector.plain import Plain, load_any, some

GRID_WEIGHTS = 4096  # original weights of the grid's span listed at most


@dataclass
class QuantLayer(Plain):
    """One quantized layer: how far its dequantized weight W' is from the original W."""

    name: str
    bits: int
    scheme: str  # symmetric, asymmetric (or nf4)
    granularity: str  # tensor, channel, group N (or block N)
    shape: tuple[int, int]
    mse: float  # mean of (W' - W)^2
    max_error: float  # largest |W' - W|
    relative_error: float  # ||W' - W|| / ||W||, Frobenius
    max_scale: float | None  # the largest step between two levels (integer layers)
    max_error_in_steps: float | None  # largest |W' - W| / its span's step: <= 0.5 when nothing is clipped


@dataclass
class Histogram(Plain):
    edges: np.ndarray  # (bins + 1,)
    counts: np.ndarray  # (bins,) int64


@dataclass
class QuantGrid(Plain):
    """The values one span's codes can stand for (``scale · (q − zero)``), and where its weights landed."""

    span: str  # "tensor", "row 0" or "row 0, group 0"
    scale: float
    zero: float | None
    levels: np.ndarray  # every level of the span, ascending
    weights: np.ndarray  # the span's original weights (the first GRID_WEIGHTS)
    dequantized: np.ndarray  # what each became: one of the levels
    codes: np.ndarray  # the integer code of each


@dataclass
class QuantView(Plain):
    """A model against its quantized copy: every layer's error, and one layer's weights before and after."""

    spec: str  # the quantization's name (``QuantSpec.name``)
    layers: list[QuantLayer]  # in module order
    layer: str  # the layer looked at closely (default: the largest mean squared error)
    original_histogram: Histogram
    dequantized_histogram: Histogram  # the same bin edges as the original's
    error_histogram: Histogram  # of W' - W
    grid: QuantGrid | None  # None for NF4 layers


def _quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> integer (or NF4) layer; a tied output head, which shares the embedding table's codes, once. The
    4-bit base of a LoRA adapter (QLoRA) goes by the adapted layer's name, which the float model has."""
    from lmforge.peft.lora import LoRALinear
    from lmforge.quant.integer import IntLinear
    from lmforge.quant.nf4 import NF4Linear

    found, seen = {}, set()
    adapted = {name + ".base" for name, module in model.named_modules() if isinstance(module, LoRALinear)}
    for name, module in model.named_modules():
        if isinstance(module, IntLinear):
            if module.qweight.data_ptr() in seen:
                continue
            seen.add(module.qweight.data_ptr())
        elif not isinstance(module, NF4Linear):
            continue
        found[name.removesuffix(".base") if name in adapted else name] = module
    return found


def _dequantized(module: nn.Module) -> torch.Tensor:
    """The fp32 weight a quantized layer computes with, by the layer's own dequantization."""
    from lmforge.quant.integer import IntLinear

    return (module.dequantized() if isinstance(module, IntLinear) else module.weight).detach().float().cpu()


def _steps(module: nn.Module) -> torch.Tensor | None:
    """(N, K): the scale of each weight's span, through :func:`dequantize` (a code of one is one step)."""
    from lmforge.quant.integer import IntLinear, dequantize

    if not isinstance(module, IntLinear):
        return None
    return dequantize(torch.ones(module.out_features, module.in_features, dtype=torch.int16),
                      module.scale.detach().float().cpu(), None)


def _histogram(values: np.ndarray, bins: int, low: float, high: float) -> Histogram:
    if not high > low:  # one value: a bin around it
        low, high = low - 0.5, high + 0.5
    counts, edges = np.histogram(values, bins=bins, range=(low, high))
    return Histogram(edges, counts.astype(np.int64))


def _grid(module: nn.Module, original: torch.Tensor) -> QuantGrid | None:
    """The levels of the first row (per channel), group (per group) or of the tensor, through the project's
    :func:`dequantize`; the codes run over [-qmax, qmax] (symmetric) or [0, 2^bits - 1] (asymmetric)."""
    from lmforge.quant.integer import IntLinear, dequantize

    if not isinstance(module, IntLinear):
        return None
    spec = module.spec
    low, high = (-(2 ** (spec.bits - 1) - 1), 2 ** (spec.bits - 1) - 1) if spec.scheme == "symmetric" \
        else (0, 2 ** spec.bits - 1)
    scale = module.scale.detach().float().cpu()[:1, :1]
    zero = None if module.zero is None else module.zero.detach().float().cpu()[:1, :1]
    codes = torch.arange(low, high + 1, dtype=torch.int16)[None]
    levels = dequantize(codes, scale, zero)[0].numpy()
    width = spec.group_size if spec.granularity == "group" else module.in_features
    span = {"tensor": "tensor", "channel": "row 0", "group": "row 0, group 0"}[spec.granularity]
    count = min(width, GRID_WEIGHTS)
    return QuantGrid(span, float(scale), None if zero is None else float(zero), np.sort(levels),
                     original[0, :count].numpy(), _dequantized(module)[0, :count].numpy(),
                     module.codes()[0, :count].cpu().numpy().astype(np.int64))


@torch.no_grad()
def quant_view(original: Any, quantized: Any, layer: str | None = None, bins: int = 64) -> QuantView:
    """Compare ``original`` (a float :class:`~lmforge.model.DecoderLM`, a LanguageModel, or a checkpoint path)
    with ``quantized``, the same model after :func:`lmforge.quant.integer.quantize_model` (or a checkpoint
    ``lmforge quantize`` wrote). Per quantized layer, the error of its dequantized weight; for ``layer``
    (default: the one with the largest mean squared error) histograms of the weights before and after and
    of the rounding error, in ``bins`` bins, and the grid of levels its first span snaps to."""
    if bins < 1:
        raise InputError(f"bins must be at least 1, got {bins}")
    original, quantized = load_any(original), load_any(quantized)
    found = _quantized_layers(quantized)
    if not found:
        raise InputError("the quantized model holds no integer layers: quantize it with lmforge.quant."
                         "integer.quantize_model, or give a checkpoint `lmforge quantize` wrote")

    def pair(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(original, dequantized) fp32 weights of one layer (made one layer at a time: a big model's
        weights are not all held twice)."""
        try:
            weight = original.get_submodule(name).weight.detach().float().cpu()
        except AttributeError as err:
            raise InputError(f"the original model has no layer {name!r}: give the model that was "
                             "quantized") from err
        after = _dequantized(found[name])
        if after.shape != weight.shape:
            raise InputError(f"{name}: the original weight is {tuple(weight.shape)}, the quantized one "
                             f"{tuple(after.shape)}: give the model that was quantized")
        return weight, after

    rows = []
    for name, module in found.items():
        weight, after = pair(name)
        error = after - weight
        steps = _steps(module)
        norm = float(torch.linalg.norm(weight))
        spec = getattr(module, "spec", None)
        if spec is not None:
            bits, scheme = spec.bits, spec.scheme
            granularity = f"group {spec.group_size}" if spec.granularity == "group" else spec.granularity
        else:
            bits, scheme, granularity = 4, "nf4", f"block {module.block_size}"
        rows.append(QuantLayer(
            name, bits, scheme, granularity, tuple(weight.shape), float(error.pow(2).mean()),
            float(error.abs().max()), float(torch.linalg.norm(error)) / norm if norm > 0 else 0.0,
            None if steps is None else float(module.scale.max()),
            None if steps is None else float((error.abs() / steps).max())))
    chosen = layer if layer is not None else max(rows, key=lambda row: row.mse).name
    if chosen not in found:
        raise InputError(f"no quantized layer {chosen!r}; quantized layers: {some(list(found))}")
    weight, after = pair(chosen)
    before_np, after_np = weight.numpy().ravel(), after.numpy().ravel()
    error_np = after_np - before_np
    low, high = float(min(before_np.min(), after_np.min())), float(max(before_np.max(), after_np.max()))
    module = found[chosen]
    spec = getattr(module, "spec", None)
    return QuantView(spec.name if spec is not None else "nf4", rows, chosen,
                     _histogram(before_np, bins, low, high), _histogram(after_np, bins, low, high),
                     _histogram(error_np, bins, float(error_np.min()), float(error_np.max())),
                     _grid(module, weight))
