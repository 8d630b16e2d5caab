"""What the inspector's views share (export, lora, quant, alignment, rag): JSON-ready data from
dataclasses of NumPy arrays, and models given as modules, LanguageModels or paths."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

SIGNIFICANT = 6  # digits kept by to_dict()


def plain(value: Any) -> Any:
    """``value`` as JSON-ready data: dataclasses as dicts (private fields left out), arrays as lists, floats
    rounded to :data:`SIGNIFICANT` digits, NaN and infinities as None."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not f.name.startswith("_")}
    if isinstance(value, np.ndarray):
        return plain(value.tolist())
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return float(f"{value:.{SIGNIFICANT}g}") if math.isfinite(value) else None
    return value


class Plain:
    def to_dict(self) -> dict[str, Any]:
        """This view as JSON-ready data (``json.dumps`` takes it as it is)."""
        return plain(self)


def unwrap(model: Any) -> nn.Module:
    """The ``nn.Module`` of a model or of a :class:`lmforge.api.LanguageModel` (its ``.model``)."""
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, nn.Module) and not isinstance(model, nn.Module) else model


def load_any(model: Any) -> nn.Module:
    """A model as given, or loaded from a checkpoint path or packaged name (``checkpoint.load_model``)."""
    if isinstance(model, (str, Path)):
        from lmforge.checkpoint import load_model
        from lmforge.interop.packaged import resolve_model

        return load_model(resolve_model(model))
    return unwrap(model)


def some(names: list[str], count: int = 5) -> str:
    """A few names, then how many more (for messages that list what exists)."""
    shown = ", ".join(names[:count])
    return shown + (f" ... ({len(names)} in all)" if len(names) > count else "")
