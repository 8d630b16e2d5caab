"""AdamW with decay and no-decay parameter groups, and its state as plain tensors."""

from __future__ import annotations

import torch
from torch import nn


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW where matrices (and embeddings) decay and vectors (norm gains, biases) do not.

    Decaying a norm's gain or a bias pulls it towards 0, which only hurts.
    """
    decay, no_decay = [], []
    seen: set[int] = set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:  # tied weights appear once
            continue
        seen.add(id(param))
        (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.device.type in ("cpu", "cuda") for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, fused=fused)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Optimizer moments as a flat ``{"optim.{index}.{name}": tensor}`` dict (safetensors-ready)."""
    out = {}
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            out[f"optim.{index}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return out


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`optimizer_tensors` for an optimizer built over the same parameters. ValueError when
    the tensors are not the state of such an optimizer (an unknown key, a parameter it does not have, a
    moment of another shape)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if not key.startswith("optim."):
            continue
        _, index, name = (key.split(".", 2) + ["", ""])[:3]
        if not index.isdigit() or int(index) >= len(params):
            raise ValueError(f"{key}: the optimizer has {len(params)} parameters")
        param = params[int(index)]
        shape = () if name == "step" else param.shape
        if name not in ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq") or value.shape != shape \
                or not value.is_floating_point():
            raise ValueError(f"{key}: expected a floating-point tensor of shape {list(shape)}, "
                             f"found {value.dtype} {list(value.shape)}")
        state.setdefault(int(index), {})[name] = value
    full = optimizer.state_dict()
    full["state"] = state
    optimizer.load_state_dict(full)
