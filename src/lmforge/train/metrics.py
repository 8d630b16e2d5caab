"""One reporting path: JSON lines on disk (always) and plots made from them."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from lmforge.errors import InputError
from lmforge.files import write_text_atomic


class RecordsFigures:
    """For a stage with figures beside its loss (:class:`lmforge.train.loop.ReportingStage`): ``record``
    them as they come; ``pop_metrics`` gives each one's mean since the last call."""

    def record(self, figures: dict[str, float]) -> None:
        log = self.__dict__.setdefault("_figures", defaultdict(list))
        for name, value in figures.items():
            log[name].append(value)

    def pop_metrics(self) -> dict[str, float]:
        log = self.__dict__.pop("_figures", {})
        return {name: sum(values) / len(values) for name, values in log.items()}


class MetricsLog:
    """Appends one JSON object per line to ``path``; on resume, drops lines past ``keep_until_step``."""

    def __init__(self, path: str | Path, keep_until_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if keep_until_step is not None and self.path.exists():
            rows = [r for r in read_metrics(self.path) if r.get("step", 0) <= keep_until_step]
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in rows))  # a kill: the old lines stay
        elif keep_until_step is None and self.path.exists():
            self.path.unlink()

    def write(self, **row) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics log (none when it is missing); a last line cut short by a kill mid-write is
    left out (it was never finished); any other line that is not a JSON object with a whole-number
    ``step`` is an InputError naming it."""
    from lmforge.data.jsonl import iter_records

    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for row, where in iter_records(path, finished_only=True):
        if not isinstance(row, dict) or type(row.get("step", 0)) is not int:
            raise InputError(f"{where}: a metrics row is a JSON object with a whole-number 'step'")
        rows.append(row)
    return rows


def plot_losses(metrics_path: str | Path, png_path: str | Path, title: str = "loss") -> Path | None:
    """Training and validation loss against tokens seen, as a PNG. None if nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [(r["tokens"], r["loss"]) for r in rows if r.get("kind") == "train"]
    val = [(r["tokens"], r["val_loss"]) for r in rows if r.get("kind") == "val"]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", linewidth=1.5)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return Path(png_path)


def plot_rewards(metrics_path: str | Path, png_path: str | Path) -> Path | None:
    """Preference training's curves against steps: the implicit rewards of the chosen and rejected
    answers and their margin (left), and how often the chosen one wins (right). None if not logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(metrics_path) if r.get("kind") == "train" and "rewards/margins" in r]
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        left.plot(steps, [r[name] for r in rows], label=name.split("/")[1], linewidth=1.2)
    left.axhline(0, color="grey", linewidth=0.6)
    left.set_xlabel("step")
    left.set_ylabel("implicit reward β·log(π/π_ref)")
    left.legend()
    right.plot(steps, [r["rewards/accuracies"] for r in rows], color="tab:green", linewidth=1.2)
    right.set_ylim(0, 1.02)
    right.set_xlabel("step")
    right.set_ylabel("share of pairs where chosen wins")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return Path(png_path)


def plot_curves(metrics_path: str | Path, png_path: str | Path, panels: list[tuple[str, str]]) -> Path | None:
    """One panel per logged training figure (``(name, axis label)``) against steps; figures never logged
    are left out. None if none was."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(metrics_path) if r.get("kind") == "train"]
    panels = [(name, label) for name, label in panels if any(name in r for r in rows)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), dpi=110, squeeze=False)
    for ax, (name, label) in zip(axes[0], panels):
        points = [(r["step"], r[name]) for r in rows if name in r]
        ax.plot(*zip(*points), linewidth=1.2)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return Path(png_path)
