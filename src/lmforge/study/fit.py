"""Fits of loss against model size, data and compute: the three ways the scaling-law papers read a ladder.

A run is (N parameters, D training tokens, L final validation loss); its compute is
C = 6 N D FLOPs (a forward and backward pass over each token, Kaplan et al., 2020).

- :func:`fit_compute_power_law`: the compute frontier L(C) = a C^(-b), a straight line in
  log-log through the best run of each compute budget.
- :func:`fit_isoflop`: Hoffmann et al. (2022), approach 2. For each compute budget, a parabola
  in log N through its runs; its vertex is the budget's best size N_opt(C). Then
  N_opt = k C^a across budgets, and D_opt = C / (6 N_opt).
- :func:`fit_loss_surface`: approach 3, L(N, D) = E + A / N^alpha + B / D^beta, fitted
  robustly: the Huber loss (delta 1e-3) between log predicted and log observed loss,
  minimised by L-BFGS from the best points of a grid of starts, as Hoffmann et al. do;
  :func:`bootstrap_surface` gives confidence intervals by refitting resampled runs. The
  surface implies the compute-optimal split: for compute C, N_opt = G (C/6)^(beta/(alpha+beta))
  with G = (alpha A / (beta B))^(1/(alpha+beta)), and D_opt = C / (6 N_opt).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch


def compute(parameters: float, tokens: float) -> float:
    """Training FLOPs of a run: 6 N D."""
    return 6.0 * parameters * tokens


@dataclass
class PowerLaw:
    """L(C) = coefficient * C^(-exponent), fitted in log-log space."""

    coefficient: float
    exponent: float
    points: int

    def __call__(self, flops: float) -> float:
        return self.coefficient * flops ** -self.exponent


def fit_compute_power_law(flops: Sequence[float], losses: Sequence[float]) -> PowerLaw:
    """The compute frontier: least squares of log L on log C through the given (best-per-budget) runs."""
    if len(flops) < 2:
        raise ValueError("a power law needs runs at two compute budgets at least")
    slope, intercept = np.polyfit(np.log(flops), np.log(losses), 1)
    return PowerLaw(float(math.exp(intercept)), float(-slope), len(flops))


@dataclass
class IsoFlop:
    """Approach 2: each budget's best size, and how it grows with compute."""

    budgets: list[dict]  # {"flops", "n_opt", "d_opt", "loss_opt", "tokens_per_parameter", "parabola"}
    n_exponent: float | None  # N_opt ∝ C^a
    d_exponent: float | None  # D_opt ∝ C^(1 - a)


def fit_isoflop(runs: Sequence[dict]) -> IsoFlop:
    """``runs``: dicts with "flops" (the budget they share), "parameters" and "loss". A budget needs three
    sizes for its parabola, and the parabola must open upwards (a minimum inside, or near, the sizes)."""
    budgets = []
    for flops in sorted({r["flops"] for r in runs}):
        group = [r for r in runs if r["flops"] == flops]
        if len(group) < 3:
            continue
        x = np.log([r["parameters"] for r in group])
        curve = np.polyfit(x, [r["loss"] for r in group], 2)
        if curve[0] <= 0:
            continue  # no minimum: every size on one side of the optimum
        vertex = -curve[1] / (2 * curve[0])
        n_opt = float(math.exp(vertex))
        budgets.append({"flops": flops, "n_opt": n_opt, "d_opt": flops / (6 * n_opt),
                        "loss_opt": float(np.polyval(curve, vertex)),
                        "tokens_per_parameter": flops / (6 * n_opt * n_opt),
                        "inside": bool(x.min() <= vertex <= x.max()), "parabola": [float(c) for c in curve]})
    exponent = None
    if len(budgets) >= 2:
        exponent = float(np.polyfit(np.log([b["flops"] for b in budgets]), np.log([b["n_opt"] for b in budgets]),
                                    1)[0])
    return IsoFlop(budgets, exponent, None if exponent is None else 1.0 - exponent)


@dataclass
class LossSurface:
    """L(N, D) = E + A / N^alpha + B / D^beta."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    huber: float  # the objective at the fit (sum over runs)

    def __call__(self, parameters: float, tokens: float) -> float:
        return self.E + self.A / parameters ** self.alpha + self.B / tokens ** self.beta

    def optimal(self, flops: float) -> tuple[float, float]:
        """(N_opt, D_opt) that minimise the loss at ``flops`` = 6 N D."""
        a, b = self.alpha, self.beta
        g = (a * self.A / (b * self.B)) ** (1 / (a + b))
        n = g * (flops / 6) ** (b / (a + b))
        return n, flops / (6 * n)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> LossSurface:
        """The surface of :meth:`to_dict`'s output (other keys ignored)."""
        return cls(**{name: values[name] for name in ("E", "A", "B", "alpha", "beta", "huber")})


HUBER_DELTA = 1e-3


def _objective(theta: torch.Tensor, log_n: torch.Tensor, log_d: torch.Tensor, log_l: torch.Tensor) -> torch.Tensor:
    """Summed Huber loss of log predicted vs log observed loss; theta = (a, b, e, alpha, beta), A = e^a, ..."""
    a, b, e, alpha, beta = (part[..., None] for part in theta.unbind(-1))  # each (..., 1) against runs (R,)
    terms = torch.stack(torch.broadcast_tensors(a - alpha * log_n, b - beta * log_d, e), dim=-1)
    error = torch.logsumexp(terms, dim=-1) - log_l
    return torch.nn.functional.huber_loss(error, torch.zeros_like(error), delta=HUBER_DELTA,
                                          reduction="none").sum(-1)


GRID = {"a": [0.0, 5.0, 10.0, 15.0, 20.0], "b": [0.0, 5.0, 10.0, 15.0, 20.0], "e": [-1.0, -0.5, 0.0, 0.5, 1.0],
        "alpha": [0.0, 0.5, 1.0, 1.5, 2.0], "beta": [0.0, 0.5, 1.0, 1.5, 2.0]}  # Hoffmann et al.'s starting grid


def fit_loss_surface(parameters: Sequence[float], tokens: Sequence[float], losses: Sequence[float],
                     starts: int = 8, init: Sequence[float] | None = None) -> LossSurface:
    """The robust fit of L(N, D) over the runs: L-BFGS from the ``starts`` best grid points (and from ``init``,
    a previous fit's theta, when given), the best result kept."""
    if len(losses) < 5:
        raise ValueError(f"the loss surface has 5 parameters: it needs 5 runs at least, got {len(losses)}")
    log_n, log_d, log_l = (torch.tensor(np.log(v), dtype=torch.float64) for v in (parameters, tokens, losses))
    grid = torch.tensor(list(itertools.product(*GRID.values())), dtype=torch.float64)
    scores = _objective(grid, log_n, log_d, log_l)  # every grid point scored at once; the best few refined
    candidates = grid[scores.argsort()[:starts]]
    if init is not None:
        candidates = torch.cat([torch.tensor([list(init)], dtype=torch.float64), candidates])
    best, best_score = None, math.inf
    for start in candidates:
        theta, score = _refine(start, log_n, log_d, log_l)
        if math.isfinite(score) and score < best_score:
            best, best_score = theta, score
    a, b, e, alpha, beta = best.tolist()
    return LossSurface(math.exp(e), math.exp(a), math.exp(b), alpha, beta, best_score)


def _refine(start: torch.Tensor, log_n: torch.Tensor, log_d: torch.Tensor, log_l: torch.Tensor
            ) -> tuple[torch.Tensor, float]:
    """L-BFGS from ``start``: (theta, objective)."""
    theta = start.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([theta], lr=1.0, max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-12,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        value = _objective(theta, log_n, log_d, log_l)
        value.backward()
        return value
    optimizer.step(closure)
    return theta.detach(), float(_objective(theta.detach(), log_n, log_d, log_l))


def theta_of(surface: LossSurface) -> list[float]:
    return [math.log(surface.A), math.log(surface.B), math.log(surface.E), surface.alpha, surface.beta]


def bootstrap_surface(parameters: Sequence[float], tokens: Sequence[float], losses: Sequence[float],
                      surface: LossSurface, samples: int = 200, seed: int = 0, flops: float | None = None
                      ) -> dict[str, list[float]]:
    """95% intervals (2.5th and 97.5th percentiles) of E, A, B, alpha, beta (and, at ``flops``, of the
    compute-optimal tokens per parameter) over fits to runs resampled with replacement."""
    rng = np.random.default_rng(seed)
    n, d, l_ = (np.asarray(v, dtype=np.float64) for v in (parameters, tokens, losses))
    draws: dict[str, list[float]] = {name: [] for name in ("E", "A", "B", "alpha", "beta")}
    if flops is not None:
        draws["tokens_per_parameter"] = []
    for _ in range(samples):
        pick = rng.integers(0, len(l_), size=len(l_))
        if len({(n[i], d[i]) for i in pick}) < 5:
            continue  # fewer distinct runs than parameters: not identifiable
        fitted = fit_loss_surface(n[pick], d[pick], l_[pick], starts=1, init=theta_of(surface))
        for name in ("E", "A", "B", "alpha", "beta"):
            draws[name].append(getattr(fitted, name))
        if flops is not None:
            n_opt, d_opt = fitted.optimal(flops)
            draws["tokens_per_parameter"].append(d_opt / n_opt)
    return {name: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if v else [math.nan, math.nan]
            for name, v in draws.items()}
