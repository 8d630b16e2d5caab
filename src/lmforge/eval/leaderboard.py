"""A leaderboard of every evaluation run: SQLite rows, a Markdown table, a static HTML page with plots.

Each `lmforge eval` run adds one row per (task, prompting strategy, metric) to a SQLite
database (``runs/leaderboard.sqlite`` by default) with the model, the time, whether the chat
format was used and the hash of the run's config, so runs with the same settings compare and
runs with other settings are told apart. `lmforge leaderboard` prints the latest score of
each (model, task, prompting, metric) and writes ``leaderboard.md`` and ``leaderboard.html``
(one bar chart per task and metric, models side by side with their error bars; the images
are inlined, so the page is one file that opens anywhere without a network).
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import math
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from lmforge.errors import InputError
from lmforge.files import database_errors, write_text_atomic

SCHEMA = """
CREATE TABLE IF NOT EXISTS scores (
    run_id TEXT NOT NULL,
    created REAL NOT NULL,
    model TEXT NOT NULL,
    task TEXT NOT NULL,
    prompting TEXT NOT NULL,
    metric TEXT NOT NULL,
    value REAL NOT NULL,
    stderr REAL,
    n INTEGER NOT NULL,
    chat_template INTEGER NOT NULL,
    config_hash TEXT NOT NULL
)
"""
# the metrics a leaderboard shows, per task kind: the main one first
SHOWN = ("acc", "acc_norm", "exact_match_flexible", "exact_match_strict", "f1", "rougeL", "bits_per_byte", "ece")


@contextlib.contextmanager
def connect(path: str | Path) -> Iterator[sqlite3.Connection]:
    """The leaderboard database at ``path`` (made when missing), as one transaction; closed after."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with database_errors(path, "leaderboard"):
        db = sqlite3.connect(path)
        try:
            with db:
                db.execute(SCHEMA)
                yield db
        finally:
            db.close()


def record(path: str | Path, results: dict, run_id: str | None = None) -> int:
    """Add a run's numeric metrics (``results`` as :func:`lmforge.eval.run.evaluate` returns it);
    returns the number of rows written."""
    run_id = run_id or f"{results['config_hash']}-{int(time.time() * 1000)}"
    rows = []
    for task, strategies in results["tasks"].items():
        for prompting, entry in strategies.items():
            for metric, stat in entry["metrics"].items():
                value = stat.get("value")
                if not isinstance(value, (int, float)) or math.isnan(value):
                    continue  # per-group tables and the like stay in results.json
                stderr = stat.get("stderr")
                rows.append((run_id, time.time(), results["model"], task, prompting, metric, float(value),
                             None if stderr is None or math.isnan(stderr) else float(stderr), entry["n"],
                             int(bool(entry.get("chat_template"))), results["config_hash"]))
    with connect(path) as db:
        db.executemany("INSERT INTO scores VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    return len(rows)


def latest(path: str | Path) -> list[dict]:
    """The newest score of every (model, task, prompting, metric, chat, config hash), best first within a
    task: a run with other settings (limit, seed, tasks) is another line, not a replacement."""
    with connect(path) as db:
        db.row_factory = sqlite3.Row
        rows = db.execute("""
            SELECT s.* FROM scores s JOIN (
                SELECT model, task, prompting, metric, chat_template, config_hash, MAX(created) AS created
                FROM scores GROUP BY model, task, prompting, metric, chat_template, config_hash) newest
            USING (model, task, prompting, metric, chat_template, config_hash, created)
            ORDER BY task, metric, prompting, value DESC""").fetchall()
    out = [dict(r) for r in rows]
    kinds = {"model": str, "task": str, "prompting": str, "metric": str, "value": (int, float), "n": int,
             "stderr": (int, float, type(None))}
    if any(not isinstance(row.get(key), kind) for row in out for key, kind in kinds.items()):
        raise InputError(f"{path}: a score row holds values of the wrong type; the leaderboard is damaged")
    return out


def _cell(row: dict) -> str:
    stderr = row["stderr"]
    return f"{row['value']:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")


def markdown(rows: list[dict]) -> str:
    """One table per task: a line per (model, prompting, chat), a column per shown metric."""
    out = ["# Leaderboard", ""]
    for task in sorted({r["task"] for r in rows}):
        task_rows = [r for r in rows if r["task"] == task]
        metrics = [m for m in SHOWN if any(r["metric"] == m for r in task_rows)]
        if not metrics:
            continue
        out += [f"## {task}", "", "| model | prompting | chat | n | " + " | ".join(metrics) + " |",
                "|---|---|---|---:|" + "---:|" * len(metrics)]
        keys = sorted({(r["model"], r["prompting"], r["chat_template"]) for r in task_rows})
        cells = {(r["model"], r["prompting"], r["chat_template"], r["metric"]): r for r in task_rows}
        keys.sort(key=lambda k: -(cells.get((*k, metrics[0])) or {"value": -math.inf})["value"])
        for model, prompting, chat in keys:
            n = next(r["n"] for r in task_rows if (r["model"], r["prompting"], r["chat_template"]) == (model, prompting, chat))
            values = [_cell(cells[(model, prompting, chat, m)]) if (model, prompting, chat, m) in cells else "–"
                      for m in metrics]
            out.append(f"| {model} | {prompting} | {'yes' if chat else 'no'} | {n} | " + " | ".join(values) + " |")
        out.append("")
    return "\n".join(out)


def _plot(task_rows: list[dict], metric: str) -> str:
    """A horizontal bar chart (PNG, base64) of one metric for every (model, prompting) of a task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted((r for r in task_rows if r["metric"] == metric), key=lambda r: r["value"])
    labels = [f"{r['model']} · {r['prompting']}{' · chat' if r['chat_template'] else ''}" for r in rows]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2), dpi=100)
    ax.barh(labels, [r["value"] for r in rows], xerr=[r["stderr"] or 0 for r in rows], color="#4c72b0",
            capsize=3)
    ax.set_xlabel(metric)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def html_page(rows: list[dict]) -> str:
    """A self-contained page: the tables of :func:`markdown` and a chart per task's main metric."""
    parts = ["<!doctype html><meta charset='utf-8'><title>lmforge leaderboard</title>",
             "<style>body{font:14px system-ui,sans-serif;max-width:960px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
             "text-align:right}td:first-child,th:first-child{text-align:left}</style>",
             "<h1>lmforge leaderboard</h1>"]
    for task in sorted({r["task"] for r in rows}):
        task_rows = [r for r in rows if r["task"] == task]
        metrics = [m for m in SHOWN if any(r["metric"] == m for r in task_rows)]
        if not metrics:
            continue
        parts.append(f"<h2>{html.escape(task)}</h2><table><tr><th>model</th><th>prompting</th><th>chat</th>"
                     + "".join(f"<th>{html.escape(m)}</th>" for m in metrics) + "</tr>")
        cells = {(r["model"], r["prompting"], r["chat_template"], r["metric"]): r for r in task_rows}
        for model, prompting, chat in sorted({(r["model"], r["prompting"], r["chat_template"]) for r in task_rows}):
            values = [_cell(cells[(model, prompting, chat, m)]) if (model, prompting, chat, m) in cells else "–"
                      for m in metrics]
            parts.append(f"<tr><td>{html.escape(model)}</td><td>{html.escape(prompting)}</td>"
                         f"<td>{'yes' if chat else 'no'}</td>" + "".join(f"<td>{v}</td>" for v in values) + "</tr>")
        parts.append("</table>")
        parts.append(f"<img alt='{html.escape(task)} {metrics[0]}' src='data:image/png;base64,"
                     f"{_plot(task_rows, metrics[0])}'>")
    return "\n".join(parts) + "\n"


def write(path: str | Path, out: str | Path) -> tuple[Path, Path]:
    """Write ``leaderboard.md`` and ``leaderboard.html`` into ``out``; returns their paths."""
    rows = latest(path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md, page = out / "leaderboard.md", out / "leaderboard.html"
    write_text_atomic(md, markdown(rows) + "\n")  # each replaced whole: a crash leaves the old page or the new
    write_text_atomic(page, html_page(rows))
    return md, page
