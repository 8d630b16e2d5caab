"""Pictures of the stage views (``lmforge inspect lora|quant --plot FILE``), with matplotlib."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_lora(view, path: str | Path) -> Path:
    """Left: ‖ΔW‖ / ‖W‖ per adapted layer, blocks by projection. Right: each layer's ΔW singular values, largest first (a rank-r
    update has r of them), beside the frozen weight's largest ones."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 3.8))
    blocks, kinds, ratios = [], [], {}
    for layer in view.layers:  # blocks.<i>.<attn|ffn>.<kind>: a grid of blocks by projection
        parts = layer.name.split(".")
        block = int(parts[1]) if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit() else -1
        blocks.append(block)
        kinds.append(parts[-1])
        ratios[block, parts[-1]] = layer.ratio
    rows, columns = list(dict.fromkeys(kinds)), sorted(set(blocks))
    grid = np.full((len(rows), len(columns)), np.nan)
    for (block, kind), ratio in ratios.items():
        grid[rows.index(kind), columns.index(block)] = ratio
    image = left.imshow(grid, aspect="auto", cmap="Oranges", interpolation="nearest")
    left.set_yticks(range(len(rows)), rows, fontsize=8)
    step = max(1, len(columns) // 15)
    left.set_xticks(range(0, len(columns), step), [str(c) if c >= 0 else "-" for c in columns[::step]], fontsize=8)
    left.set_xlabel("block")
    left.set_title("‖ΔW‖ / ‖W‖: how far each adapter moves its layer")
    fig.colorbar(image, ax=left, fraction=0.04)
    for layer in view.layers:
        right.plot(np.arange(1, len(layer.delta_singular) + 1), layer.delta_singular, color="tab:orange",
                   alpha=0.5, linewidth=1)
        right.plot(np.arange(1, len(layer.weight_singular) + 1), layer.weight_singular, color="tab:blue",
                   alpha=0.3, linewidth=1)
    right.plot([], [], color="tab:orange", label="ΔW = scale · B A")
    right.plot([], [], color="tab:blue", label="frozen W (largest r)")
    right.set_yscale("log")
    right.set_xlabel("singular value index")
    right.set_title("spectra, one line per layer")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_quant(view, path: str | Path) -> Path:
    """Left: the chosen layer's weights before and after rounding (same bins). Middle: the rounding error.
    Right: the first weights of one span against the levels they snapped to."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    before, after, error = view.original_histogram, view.dequantized_histogram, view.error_histogram
    centers = (before.edges[:-1] + before.edges[1:]) / 2
    width = before.edges[1] - before.edges[0]
    axes[0].bar(centers, before.counts, width=width, alpha=0.5, label="before")
    axes[0].bar(centers, after.counts, width=width, alpha=0.5, label="after rounding")
    axes[0].set_yscale("log")
    axes[0].set_title(f"{view.layer}: weights")
    axes[0].legend(fontsize=8)
    axes[1].bar((error.edges[:-1] + error.edges[1:]) / 2, error.counts, width=error.edges[1] - error.edges[0],
                color="tab:red")
    axes[1].set_title("rounding error (after − before)")
    grid = view.grid
    if grid is not None:
        count = min(64, len(grid.weights))
        for level in grid.levels:
            if grid.weights[:count].min() - grid.scale <= level <= grid.weights[:count].max() + grid.scale:
                axes[2].axhline(level, color="0.85", linewidth=0.6)
        axes[2].plot(grid.weights[:count], "o", markersize=3, label="weight")
        axes[2].plot(grid.dequantized[:count], "_", markersize=8, color="tab:red", label="its level")
        axes[2].set_title(f"{grid.span}: {len(grid.levels)} levels, step {grid.scale:.3g}")
        axes[2].legend(fontsize=8)
    else:
        axes[2].axis("off")
    fig.suptitle(view.spec)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
