"""A study's results as Markdown with plots (matplotlib, written beside ``results.md``)."""

from __future__ import annotations

import math
from pathlib import Path

from lmforge.files import write_text_atomic
from lmforge.study.fit import LossSurface
from lmforge.study.ladder import frontier


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _interval(ci: list[float]) -> str:
    return f"[{ci[0]:.3g}, {ci[1]:.3g}]" if all(math.isfinite(v) for v in ci) else "(too few runs to resample)"


def _save(fig, ax, path: Path) -> str:
    """Legend, layout, the PNG written and the figure closed; returns the file's name."""
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    _plt().close(fig)
    return path.name


def plot_scaling(out: Path, results: dict) -> list[str]:
    """loss_vs_compute.png, isoflop.png and surface.png; returns their file names."""
    plt = _plt()
    rows = results["runs"]
    ladder = [r for r in rows if not r["holdout"]]
    fits = results["fits"]
    names = []

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for size in dict.fromkeys(r["size"] for r in ladder):
        points = sorted((r["flops"], r["loss"]) for r in ladder if r["size"] == size)
        ax.plot(*zip(*points), "o-", label=size, alpha=0.8)
    if "compute_power_law" in fits:
        law = fits["compute_power_law"]
        span = [min(r["flops"] for r in rows), max(r["flops"] for r in rows)]
        ax.plot(span, [law["coefficient"] * c ** -law["exponent"] for c in span], "k--",
                label=f"frontier: L = {law['coefficient']:.3g} C^-{law['exponent']:.3f}")
    for r in rows:
        if r["holdout"]:
            ax.plot([r["flops"]], [r["loss"]], "r*", markersize=12, label=f"held out {r['size']} (measured)")
            if "prediction" in results:
                ax.plot([r["flops"]], [results["prediction"]["predicted_loss"]], "rx", markersize=10,
                        label="held out (predicted before training)")
    ax.set(xscale="log", yscale="log", xlabel="training compute C = 6 N D (FLOPs)", ylabel="validation loss (nats)",
           title="loss against compute")
    names.append(_save(fig, ax, out / "loss_vs_compute.png"))

    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for flops in sorted({r["flops"] for r in ladder}):
        group = sorted((r["parameters"], r["loss"]) for r in ladder if r["flops"] == flops)
        line = ax.plot(*zip(*group), "o", label=f"C = {flops:.0e}")[0]
        for budget in fits["isoflop"]["budgets"]:
            if budget["flops"] == flops:
                x = np.linspace(math.log(group[0][0]), math.log(group[-1][0]), 50)
                ax.plot(np.exp(x), np.polyval(budget["parabola"], x), "-", color=line.get_color(), alpha=0.6)
                ax.plot([budget["n_opt"]], [budget["loss_opt"]], "v", color=line.get_color())
    ax.set(xscale="log", xlabel="parameters N (without embeddings)", ylabel="validation loss (nats)",
           title="IsoFLOP: each budget's best size (parabola vertex)")
    names.append(_save(fig, ax, out / "isoflop.png"))

    surface = LossSurface.from_dict(fits["surface"])

    def predicted(r):
        return surface(r["parameters"], r["tokens"])
    fig, ax = plt.subplots(figsize=(4.6, 4.2), dpi=110)
    ax.plot([r["loss"] for r in ladder], [predicted(r) for r in ladder], "o", label="ladder (fitted)")
    held = [r for r in rows if r["holdout"]]
    if held:
        ax.plot([r["loss"] for r in held], [predicted(r) for r in held], "r*", markersize=12, label="held out")
    low = min(min(r["loss"] for r in rows), min(predicted(r) for r in rows))
    high = max(max(r["loss"] for r in rows), max(predicted(r) for r in rows))
    ax.plot([low, high], [low, high], "k:", linewidth=1)
    ax.set(xlabel="measured loss", ylabel="L(N, D) fit", title="the loss surface against the runs")
    names.append(_save(fig, ax, out / "surface.png"))
    return names


def write_scaling_report(out: Path, results: dict) -> Path:
    """results.md: the runs, the three fits with their intervals, the prediction, and the plots."""
    rows, fits, config = results["runs"], results["fits"], results["config"]
    plots = plot_scaling(out, results)
    lines = ["# Scaling study", "", f"Runtime: {results['runtime']}. Data: {', '.join(config['inputs'])}; "
             f"vocabulary {config['vocab_size']}, sequences of {config['seq_len']} tokens, batch {config['batch_size']}, "
             f"peak learning rate {config['lr']}; {results.get('data_tokens', 0):,} training tokens. N counts "
             "parameters without embeddings; C = 6 N D.", "",
             "| run | N | D (tokens) | C (FLOPs) | D / N | val loss | bits/byte | minutes |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        bpb = f"{r['bpb']:.4f}" if r.get("bpb") is not None else ""
        lines.append(f"| {r['name']}{' (held out)' if r['holdout'] else ''} | {r['parameters']:,} | {r['tokens']:,} | "
                     f"{r['flops']:.1e} | {r['tokens'] / r['parameters']:.1f} | {r['loss']:.4f} | {bpb} | "
                     f"{r['seconds'] / 60:.1f} |")
    if results.get("skipped"):
        lines += ["", "Left out: " + "; ".join(results["skipped"]) + "."]
    lines += ["", "## Compute frontier", ""]
    if "compute_power_law" in fits:
        law = fits["compute_power_law"]
        lines.append(f"Through the best run of each of {law['points']} budgets: "
                     f"**L(C) = {law['coefficient']:.4g} · C^-{law['exponent']:.4f}**.")
    else:
        lines.append("One budget only: no frontier to fit.")
    iso = fits["isoflop"]
    lines += ["", "## IsoFLOP (approach 2)", "",
              "| C (FLOPs) | N_opt | D_opt | D/N | loss at N_opt | vertex inside the sizes |", "|---:|---:|---:|---:|---:|:-:|"]
    for b in iso["budgets"]:
        lines.append(f"| {b['flops']:.1e} | {b['n_opt']:,.0f} | {b['d_opt']:,.0f} | {b['tokens_per_parameter']:.1f} | "
                     f"{b['loss_opt']:.4f} | {'yes' if b['inside'] else 'no (extrapolated)'} |")
    if iso["n_exponent"] is not None:
        lines.append(f"\nN_opt ∝ C^{iso['n_exponent']:.3f}, D_opt ∝ C^{iso['d_exponent']:.3f} "
                     "(Hoffmann et al. find about 0.5 and 0.5).")
    else:
        lines.append("\nFewer than two budgets with a minimum: no exponent.")
    s = fits["surface"]
    ci = s["ci95"]
    lines += ["", "## The loss surface (approach 3)", "",
              "L(N, D) = E + A / N^α + B / D^β, Huber loss (δ = 1e-3) on log loss, L-BFGS from the best points of a "
              f"grid; 95% intervals from {s['bootstrap']} bootstrap resamples of the runs.", "",
              "| parameter | fit | 95% interval |", "|---|---:|---|"]
    for name in ("E", "A", "B", "alpha", "beta"):
        lines.append(f"| {name} | {s[name]:.4g} | {_interval(ci[name])} |")
    lines += ["", f"At C = {s['at_flops']:.1e} FLOPs the surface puts the optimum at N = {s['n_opt']:,.0f} and D = "
              f"{s['d_opt']:,.0f}: **{s['tokens_per_parameter']:.1f} tokens per parameter** "
              f"(95% interval {_interval(ci['tokens_per_parameter'])}; Chinchilla: about 20)."]
    if "prediction" in results and "actual_loss" in results["prediction"]:
        p = results["prediction"]
        lines += ["", "## Prediction of the held-out run", "",
                  f"Before {p['run']} was trained, the surface fitted on the ladder predicted a final loss of "
                  f"{p['predicted_loss']:.4f}; it reached {p['actual_loss']:.4f}: an error of {p['error']:+.4f} "
                  f"nats ({100 * p['relative_error']:+.1f}%)."]
    lines += ["", *[f"![{name}]({name})" for name in plots], ""]
    path = out / "results.md"
    write_text_atomic(path, "\n".join(lines))
    return path


def write_emergence_report(out: Path, results: dict) -> Path:
    """results.md and emergence.png: the whole-task exact match beside the smooth sub-task metrics, and the
    measured (p, exact match) pairs beside the notes' arithmetic p^k."""
    plt = _plt()
    rows, config = results["runs"], results["config"]
    k = config["k"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), dpi=110)
    best = frontier(rows)  # each budget's run with the lowest validation loss
    for key, style, label in (("whole_exact", "o-", "whole task: exact match"),
                              ("sub_accuracy", "s-", "sub-task accuracy p"), ("p_to_the_k", "x--", f"p^{k}")):
        line = axes[0].plot([r["flops"] for r in best], [r[key] for r in best], style, label=label)[0]
        axes[0].plot([r["flops"] for r in rows], [r[key] for r in rows], style[0], color=line.get_color(), alpha=0.25)
    axes[0].set(xscale="log", xlabel="training compute (FLOPs)", ylabel="accuracy",
                title="two ways of scoring (lines: each budget's best run)")
    axes[0].legend(fontsize=7)
    axes[1].plot([r["flops"] for r in best], [r["answer_logprob"] for r in best], "o-")
    axes[1].plot([r["flops"] for r in rows], [r["answer_logprob"] for r in rows], "o", alpha=0.25)
    axes[1].set(xscale="log", xlabel="training compute (FLOPs)", ylabel="mean log-likelihood per answer token",
                title="a continuous metric")
    curve = [i / 100 for i in range(101)]
    axes[2].plot(curve, [c ** k for c in curve], "k--", label=f"p^{k}: independent sub-tasks")
    axes[2].plot([r["sub_accuracy"] for r in rows], [r["whole_exact"] for r in rows], "o", label="runs")
    axes[2].set(xlabel="sub-task accuracy p", ylabel="whole-task exact match", title="the notes' arithmetic")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "emergence.png")
    plt.close(fig)
    lines = ["# Emergence study", "", f"Runtime: {results['runtime']}. Items of {k} sub-tasks drawn from "
             f"{', '.join(config['kinds'])}; {config['train_items']:,} items to pretrain on, {config['eval_items']} "
             "held out. An answer counts when each of its tokens and the line break after it are the model's "
             "likeliest next token after the gold text before it.", "", "An item:", "", "```",
             results["example"].rstrip(), "```", "",
             f"| run | N | C (FLOPs) | val loss | sub-task accuracy p | p^{k} | whole task exact | answer log-lik/token |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['parameters']:,} | {r['flops']:.1e} | {r['loss']:.4f} | "
                     f"{r['sub_accuracy']:.3f} | {r['p_to_the_k']:.3f} | {r['whole_exact']:.3f} | "
                     f"{r['answer_logprob']:.3f} |")
    if results.get("skipped"):
        lines += ["", "Left out: " + "; ".join(results["skipped"]) + "."]
    lines += ["", "![emergence.png](emergence.png)", ""]
    path = out / "results.md"
    write_text_atomic(path, "\n".join(lines))
    return path


def write_architectures_report(out: Path, results: dict) -> Path:
    """results.md and architectures.png: each form's exact match (with standard errors) and answer
    log-likelihood in the four settings."""
    from lmforge.study.architectures import SETTINGS

    plt = _plt()
    rows, config = results["forms"], results["config"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), dpi=110)
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        at = [s + (i - (len(rows) - 1) / 2) * width for s in range(len(SETTINGS))]
        scores = [r["scores"][s] for s in SETTINGS]
        axes[0].bar(at, [s["exact"] for s in scores], width, yerr=[s["exact_se"] for s in scores], capsize=3,
                    label=f"{r['form']} ({r['objective']})")
        axes[1].bar(at, [s["answer_logprob"] for s in scores], width, label=r["form"])
    for ax, label in ((axes[0], "exact match (± standard error)"),
                      (axes[1], "mean log-likelihood per answer token")):
        ax.set_xticks(range(len(SETTINGS)), SETTINGS)
        ax.set(ylabel=label)
        ax.legend(fontsize=7)
    axes[0].set_title(f"held-out questions ({config['eval_items']}), same size and compute")
    axes[1].set_title("a continuous reading of the same answers")
    fig.tight_layout()
    fig.savefig(out / "architectures.png")
    plt.close(fig)

    def cell(score: dict) -> str:
        return f"{score['exact']:.3f} ± {score['exact_se']:.3f}"

    lines = ["# The Transformer's three forms", "", f"Runtime: {results['runtime']}. Size {config['size']}, "
             f"{config['flops']:.2g} pretraining FLOPs each (counted by torch), {results['data_tokens']:,} tokens "
             f"of text (the built-in corpus with {config['task_items']:,} question/answer lines of "
             f"{', '.join(config['kinds'])}); multitask tuning {config['tune_steps']} steps; {config['eval_items']} "
             f"held-out questions, {config['shots']} solved ones before each in the few-shot settings.", "",
             "Exact match: each answer token is the model's likeliest, the gold tokens before it given, and for "
             "the generating forms the likeliest token after it ends the answer (a line break, the end of the text, "
             "or for the encoder-decoder the next sentinel): what greedy decoding writes. The encoder is told the "
             "answer's length (one mask per token).", "",
             "| form | objective | layers (enc + dec) | N (no embeddings) | steps | text tokens | "
             + " | ".join(SETTINGS) + " |", "|---|---|---|---:|---:|---:|" + "---:|" * len(SETTINGS)]
    for r in rows:
        layers = f"{r['layers'][0]} + {r['layers'][1]}" if r["layers"][1] else str(r["layers"][0])
        lines.append(f"| {r['form']} | {r['objective']} | {layers} | {r['parameters']:,} | {r['steps']:,} | "
                     f"{r['text_tokens']:,} | " + " | ".join(cell(r["scores"][s]) for s in SETTINGS) + " |")
    lines += ["", "Mean log-likelihood per answer token (nats) and the share of answer tokens right:", "",
              "| form | " + " | ".join(SETTINGS) + " |", "|---|" + "---:|" * len(SETTINGS)]
    for r in rows:
        lines.append(f"| {r['form']} | " + " | ".join(
            f"{r['scores'][s]['answer_logprob']:.3f} / {r['scores'][s]['token_accuracy']:.3f}" for s in SETTINGS)
            + " |")
    kinds = list(rows[0]["scores"]["zero-shot"]["by_kind"])
    lines += ["", "Exact match per task kind (zero-shot / few-shot / tuned zero-shot / tuned few-shot):", "",
              "| form | " + " | ".join(kinds) + " |", "|---|" + "---:|" * len(kinds)]
    for r in rows:
        lines.append(f"| {r['form']} | " + " | ".join(
            " / ".join(f"{r['scores'][s]['by_kind'][kind]:.2f}" for s in SETTINGS) for kind in kinds) + " |")
    lines += ["", "A few-shot question:", "", "```", results["example"]["few-shot"].rstrip(), "```", "",
              "![architectures.png](architectures.png)", ""]
    path = out / "results.md"
    write_text_atomic(path, "\n".join(lines))
    return path
