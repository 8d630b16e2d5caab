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

from dataclasses import replace

import torch
from torch import nn

from lmforge.model.packed import available as packing_helps
from lmforge.model.packed import linear, pack_weights, switched_off


class FusedLinear:
    """Several ``nn.Linear`` of one module computed as one: ``fused(x)`` is their outputs side by side.

    Not an ``nn.Module``: it owns no parameters (the members' are views of its weight), so
    the model's parameters, ``state_dict`` and module tree are what they were.
    """

    packed = None  # a packed copy of the stacked weight (lmforge.model.packed.pack_weights)

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
        return linear(x, self.weight, self.bias, self.packed)


class FusedIntLinear(FusedLinear):
    """Integer layers (:class:`~lmforge.quant.integer.IntLinear`, one method) computed as one: their codes
    stacked in one tensor, of which the members' codes become views; their scales and zeros (a few
    floats a row) copied side by side, a per-tensor scale repeated for each of its rows."""

    def __init__(self, owner: nn.Module, names: list[str]):
        from lmforge.quant.integer import IntLinear

        members = [getattr(owner, name) for name in names]
        self.owner, self.names, self.members = owner, names, members
        self.sizes = [m.out_features for m in members]
        spec = members[0].spec
        layer = IntLinear(members[0].in_features, sum(self.sizes), members[0].bias is not None,
                          replace(spec, granularity="channel") if spec.granularity == "tensor" else spec,
                          members[0].qweight.device)
        layer.qweight = torch.cat([m.qweight for m in members])
        layer.scale = torch.cat([m.scale.expand(m.out_features, -1) for m in members]).contiguous()
        if spec.scheme == "asymmetric":
            layer.zero = torch.cat([m.zero.expand(m.out_features, -1) for m in members]).contiguous()
        if layer.bias is not None:
            layer.bias = nn.Parameter(torch.cat([m.bias.detach() for m in members]), requires_grad=False)
        if layer.act_scale is not None:  # (W8A8: the members read one input, calibrated alike)
            layer.act_scale = torch.stack([m.act_scale for m in members]).amax(0)
        start = 0
        for member, size in zip(members, self.sizes):
            member.qweight = layer.qweight[start:start + size]  # the codes are stored once
            start += size
        self.layer = layer
        self._pointers = self._storage()

    def _storage(self) -> list[int]:
        return [m.qweight.data_ptr() for m in self.members]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _fusable(members: list[nn.Module]) -> bool:
    """Plain linear layers (not LoRA, not NF4, not missing) with one dtype, device and input width, all
    with or without a bias; or integer layers of one quantization method."""
    from lmforge.quant.integer import IntLinear

    if all(type(m) is IntLinear for m in members):
        first = members[0]
        return all(m.spec == first.spec and m.in_features == first.in_features and m.qweight.device ==
                   first.qweight.device and (m.bias is None) == (first.bias is None) for m in members)
    if not all(type(m) is nn.Linear for m in members):
        return False
    first = members[0].weight
    same = all(m.weight.dtype == first.dtype and m.weight.device == first.device
               and m.in_features == members[0].in_features for m in members)
    return same and len({m.bias is None for m in members}) == 1


def fuse_projections(model: nn.Module) -> int:
    """Stack each block's q/k/v and gate/up weights (see the module's docstring); returns the groups made.

    For inference: ``lmforge.load`` calls it after casting the weights. Idempotent; layers
    that are neither plain ``nn.Linear`` nor integer ones of one method (LoRA, NF4) are left alone.
    """
    made = 0
    blocks = [m for m in model.modules() if hasattr(m, "attn") and hasattr(m, "ffn")]  # every stack's blocks
    for block in blocks:
        for owner, names, attribute in ((block.attn, ["q_proj", "k_proj", "v_proj"], "qkv"),
                                        (block.ffn, ["gate_proj", "up_proj"], "gate_up")):
            current = getattr(owner, attribute)
            if current is not None and current.intact():
                continue  # fused already
            members = [getattr(owner, name, None) for name in names]  # (a GELU or ReLU FFN has no gate_proj)
            if _fusable(members):
                fused = FusedLinear if type(members[0]) is nn.Linear else FusedIntLinear
                setattr(owner, attribute, fused(owner, names))
                made += 1
    return made


def inference_layout(model: nn.Module, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    """The layout ``lmforge.load`` gives a model whose weights are final and which takes no gradients:
    q/k/v and gate/up one product each (:func:`fuse_projections`), each weight a packed copy where the
    products run in ``dtype`` on ``device`` and packing helps there (:mod:`lmforge.model.packed`), and integer
    layers with int8 activations their codes interleaved where the CPU has AVX-512 VNNI."""
    fuse_projections(model)
    if packing_helps(dtype, device):
        pack_weights(model)
    interleave_integer_layers(model)
    return model


def interleave_integer_layers(model: nn.Module) -> int:
    """Give each W8A8 / W4A8 layer that runs (a fused group's one layer, not its members) its codes in the VNNI
    kernel's layout, where the CPU has one (:meth:`~lmforge.quant.integer.IntLinear.interleave`); returns how
    many. ``LMFORGE_PACKED_WEIGHTS=off`` turns it off, with the other packed copies."""
    from lmforge.quant.integer import IntLinear

    if switched_off():
        return 0
    groups = [value for module in model.modules() for value in vars(module).values()
              if isinstance(value, FusedIntLinear)]
    members = {id(member) for group in groups for member in group.members}
    layers = [group.layer for group in groups]
    layers += [m for m in model.modules() if type(m) is IntLinear and id(m) not in members]
    return sum(layer.interleave() for layer in layers)
