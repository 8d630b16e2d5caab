"""GPTQ (Frantar et al., 2022): round each weight column knowing what the rounding does to the layer's output.

Round-to-nearest (RTN, :func:`lmforge.quant.integer.quantize_tensor`) makes each weight's error as
small as it can be on its own. What matters is the layer's output on real inputs X: the error
``||X W^T - X Q^T||^2``. Its curvature in the weights is the Hessian ``H = X^T X`` (the same for
every output row), so once column i is rounded, the other columns can move to absorb its error:
the optimal brain surgeon update (Hassibi and Stork, 1993) subtracts ``err_i * Hinv[i, j] /
Hinv[i, i]`` from each later column j. GPTQ does this left to right, column by column, with the
inverse Hessian's upper Cholesky factor holding exactly the rows it needs at each step:

    H = X^T X / n + damp * mean(diag(H)) * I        (inputs seen on calibration text; damped)
    U = cholesky(H^-1, upper)
    for i in 0 .. K-1:
        q_i = quantize(w_i)                          (the grid: per tensor, per row, or per group,
        e_i = (w_i - dequantize(q_i)) / U[i, i]       a group's scale set when its first column comes)
        w_j -= e_i * U[i, j]  for every j > i

With ``act_order`` the columns go in order of decreasing ``H[i, i]`` (the paper's "act-order"),
the groups' grids set beforehand from the unchanged weights.

A column whose input is always zero (``H[i, i] = 0``) does not matter to the output: it is set
to zero. Inputs are those of the float model (one calibration pass for all layers), not of the
layers already quantized before it, a simplification of the paper's layer-by-layer order.
The codes come out on the same grid as RTN's: nothing changes for loading or the kernels.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.quant.integer import QuantSpec, quantize_tensor, round_to_grid, watch_inputs

DAMP = 0.01  # of the mean diagonal: keeps H invertible where inputs are nearly dependent


def input_hessians(model: nn.Module, names: list[str], batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``X^T X / n`` (fp32, K x K) of the inputs each layer in ``names`` sees over ``batches`` of token ids."""
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(names, 0)

    def record(name: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        sums[name] = sums.get(name, 0) + x.T @ x
        counts[name] += len(x)

    watch_inputs(model, names, batches, record)
    return {name: total / max(counts[name], 1) for name, total in sums.items()}


def _grid(weight: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RTN's scale and zero point for ``weight`` (N, k): one per row (or one in all, per tensor)."""
    one = QuantSpec(bits=spec.bits, scheme=spec.scheme, granularity="tensor" if spec.granularity == "tensor"
                    else "channel")
    _, scale, zero = quantize_tensor(weight, one)
    return scale.reshape(-1), None if zero is None else zero.reshape(-1)


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, damp: float = DAMP,
                  act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(codes (N, K) int16, scale, zero)`` of ``weight`` (N, K), shaped as :func:`quantize_tensor`'s, chosen
    column by column to keep ``X W^T`` where ``hessian`` is ``X^T X / n`` (K, K).

    ``act_order``: round the columns with the largest ``H[i, i]`` (the inputs that move the output most) first,
    while the most columns are left to absorb their errors; each group's grid is then fixed beforehand from
    the weights as they were (the groups stay the runs of consecutive inputs that the kernels read)."""
    w = weight.detach().float().clone()
    rows, cols = w.shape
    h = hessian.detach().float().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    span = spec.group_size if spec.granularity == "group" else cols
    groups = spec.groups(cols)
    scales = torch.zeros(rows if spec.granularity != "tensor" else 1, groups, device=w.device)
    zeros = None if spec.scheme == "symmetric" else torch.zeros_like(scales)
    order = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(cols)

    def set_grid(g: int, columns: torch.Tensor) -> None:  # group g's scales (and zeros) from these columns
        scale, zero = _grid(columns if spec.granularity == "group" else w, spec)
        scales[:, g] = scale
        if zeros is not None:
            zeros[:, g] = zero

    if act_order:  # grids first, from the weights as they are; then the columns in that order
        for g in range(groups):
            set_grid(g, w[:, g * span:(g + 1) * span])
        w, h = w[:, order], h[order][:, order]
    h += damp * torch.diagonal(h).mean() * torch.eye(cols, device=h.device)
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros(rows, cols, dtype=torch.int16, device=w.device)
    for i in range(cols):
        column = int(order[i])  # where this column sits in the weight, and so its group
        g = column // span
        if not act_order and column % span == 0:  # a new group: its grid from the columns as they are now
            set_grid(g, w[:, i:i + span])
        scale, zero = scales[:, g], None if zeros is None else zeros[:, g]
        q = round_to_grid(w[:, i], scale, zero, spec.bits)
        codes[:, column] = q.to(torch.int16)
        error = (w[:, i] - ((q - zero) if zero is not None else q) * scale) / upper[i, i]
        w[:, i + 1:] -= error[:, None] * upper[i, i + 1:][None, :]
    return codes, scales, zeros
