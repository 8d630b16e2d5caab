"""The inference layout: one matrix product where a block has several that read the same input.

A decode step multiplies a few rows by every weight matrix of the model. At that size a
product costs little more than reading its weights, and small products read them
slowly: on a 2-core CPU SmolLM2's 211 bf16 products at 8 rows reached about 5 GB/s,
and its k and v projections (192 output features) about 3. Attention's q, k and v
projections all read the same normalized input, and so do SwiGLU's gate and up: stacked,
they are one product of 960 and one of 3072 output features per layer instead of five
small ones (a SmolLM2 decode step at batch 8: 64 against 73 ms, medians of interleaved runs).

:func:`fuse_projections` stores each group's weights in one tensor, rows stacked in
the order of the group, and makes the original parameters views of it. Nothing else
changes: the parameters keep their names, shapes and values; ``state_dict``, LoRA and
the interop code see the same model; loading new weights into the parameters writes
into the stacked tensor. The forward pass takes the one-product path only when it
cannot change a result that matters:

- without autograd (a gradient would reach the stacked tensor, not the parameters), and
- while the group is intact: the same plain ``nn.Linear`` modules, still views of the
  stacked tensor (``model.to(...)`` or wrapping a projection in LoRA ends that).

Otherwise it runs the separate projections, which compute the same numbers up to rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FusedLinear:
    """Several ``nn.Linear`` of one module computed as one: ``fused(x)`` is their outputs side by side.

    Not an ``nn.Module``: it owns no parameters (the members' are views of its weight), so
    the model's parameters, ``state_dict`` and module tree are what they were.
    """

    def __init__(self, owner: nn.Module, names: list[str]):
        members = [getattr(owner, name) for name in names]
        self.owner, self.names, self.members = owner, names, members
        self.sizes = [m.out_features for m in members]
        self.weight = torch.cat([m.weight.detach() for m in members])  # (sum of outputs, in)
        self.bias = None if members[0].bias is None else torch.cat([m.bias.detach() for m in members])
        start = 0
        for member, size in zip(members, self.sizes):
            # a Parameter made from a view shares its storage: the member's weight now lives in self.weight
            member.weight = nn.Parameter(self.weight[start:start + size], requires_grad=member.weight.requires_grad)
            if self.bias is not None:
                member.bias = nn.Parameter(self.bias[start:start + size], requires_grad=member.bias.requires_grad)
            start += size
        self._pointers = self._storage()

    def _storage(self) -> list[int]:
        return [m.weight.data_ptr() for m in self.members] + [m.bias.data_ptr() for m in self.members
                                                              if m.bias is not None]

    def _in_place(self) -> bool:
        return all(getattr(self.owner, name) is member for name, member in zip(self.names, self.members))

    def intact(self) -> bool:
        """The owner still has these members, and their parameters are still views of the stacked tensors."""
        return self._in_place() and self._storage() == self._pointers

    def usable(self) -> bool:
        """Whether the one product gives what the members would: no autograd, and the group intact.

        While Dynamo traces (a compiled decode step), data pointers cannot be compared without a
        graph break in every layer; a compiled step is frozen on the weights it traced anyway
        (:mod:`lmforge.infer.compiled`), so only the members are checked there.
        """
        if torch.is_grad_enabled():
            return False
        if torch.compiler.is_compiling():
            return self._in_place()
        return self.intact()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., sum of the members' outputs), the members' outputs side by side."""
        return F.linear(x, self.weight, self.bias)


def _fusable(members: list[nn.Module]) -> bool:
    """Plain linear layers (not LoRA, not quantized, not missing) with one dtype, device and input width,
    all with or without a bias."""
    if not all(type(m) is nn.Linear for m in members):
        return False
    first = members[0].weight
    same = all(m.weight.dtype == first.dtype and m.weight.device == first.device
               and m.in_features == members[0].in_features for m in members)
    return same and len({m.bias is None for m in members}) == 1


def fuse_projections(model: nn.Module) -> int:
    """Stack each block's q/k/v and gate/up weights (see the module's docstring); returns the groups made.

    For inference: ``lmforge.load`` calls it after casting the weights. Idempotent; layers
    that are not plain ``nn.Linear`` (LoRA, quantized) are left alone.
    """
    made = 0
    for block in model.blocks:
        for owner, names, attribute in ((block.attn, ["q_proj", "k_proj", "v_proj"], "qkv"),
                                        (block.ffn, ["gate_proj", "up_proj"], "gate_up")):
            current = getattr(owner, attribute)
            if current is not None and current.intact():
                continue  # fused already
            members = [getattr(owner, name, None) for name in names]  # (a GELU or ReLU FFN has no gate_proj)
            if _fusable(members):
                setattr(owner, attribute, FusedLinear(owner, names))
                made += 1
    return made
