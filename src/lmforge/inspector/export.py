"""An inspection as plain JSON (what the server's ``POST /v1/inspect`` answers and the Inspect page draws),
and as one HTML file that opens with no server: the Inspect page with the JSON inside it.

The attention weights of every layer and head travel as one block of 16-bit integers (weight x 65535,
row-major (L, H, T, T), little-endian, base64): 30 layers x 9 heads x 64 x 64 tokens is 2.2 MB that way,
against about 8 MB as JSON numbers. Scores masked out (-inf) are ``null``.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.data.prepare import temp_path
from lmforge.errors import InputError
from lmforge.inspector.core import Inspection

STATIC = Path(__file__).resolve().parent.parent / "serve" / "static"


@dataclass
class Focus:
    """What an inspection looks at closely: one layer, head and position, the sampler's settings, the decode
    that measures the KV cache."""

    layer: int = 0
    head: int = 0
    position: int | None = None  # None: the last token
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0
    beams: int = 4
    beam_tokens: int = 8
    kv_steps: int = 16


VIEWS = ("tokens", "attention", "query_keys", "next", "lens", "residual", "kv")


def available(inspection: Inspection) -> tuple[str, ...]:
    """The views this model gives: no token distribution or lens without token logits, no KV cache in an
    encoder."""
    missing = set()
    if inspection.predicts is None:
        missing |= {"next", "lens"}
    if not inspection.config["causal"]:
        missing.add("kv")
    return tuple(v for v in VIEWS if v not in missing)


def payload(inspection: Inspection, focus: Focus, views: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The inspection as JSON-ready data: every view in ``views`` (None: every view the model gives), the
    detailed ones at ``focus``."""
    unknown = set(views or ()) - set(VIEWS)
    if unknown:
        raise InputError(f"unknown view(s) {', '.join(sorted(unknown))}; the views are {', '.join(VIEWS)}")
    if views is None:
        views = available(inspection)
    elif missing := [v for v in views if v not in available(inspection)]:
        raise InputError(f"this model does not give the {', '.join(missing)} view(s) ("
                         f"{'an encoder keeps no KV cache' if 'kv' in missing else 'it has no token logits'}); "
                         f"it gives {', '.join(available(inspection))}")
    position = inspection.position(focus.position)
    inspection.check(focus.layer, focus.head)
    count = inspection.count
    out: dict[str, Any] = {
        "model": inspection.model, "text": inspection.text, "config": inspection.config,
        "predicts": inspection.predicts,
        "tokens": [dataclasses.asdict(t) for t in inspection.tokens],
        "count": {**dataclasses.asdict(count), "bytes_per_token": round(count.bytes_per_token, 3)},
        "focus": {**dataclasses.asdict(focus), "position": position},
    }
    vocab: dict[int, str] = {}

    def token(token_id: int) -> dict[str, Any]:
        vocab.setdefault(int(token_id), inspection.token_text(int(token_id)))
        return {"id": int(token_id), "text": vocab[int(token_id)]}

    if "attention" in views:
        weights = np.clip(np.round(inspection.attention * 65535), 0, 65535).astype("<u2")
        out["attention"] = {"shape": list(weights.shape), "encoding": "uint16 x 65535, base64",
                            "data": base64.b64encode(weights.tobytes()).decode("ascii")}
    if "query_keys" in views:
        qk = inspection.query_keys(focus.layer, focus.head, position)
        out["query_keys"] = {"layer": qk.layer, "head": qk.head, "position": qk.position, "kv_head": qk.kv_head,
                             "query": _floats(qk.query), "keys": _floats(qk.keys), "values": _floats(qk.values),
                             "scores": _floats(qk.scores), "weights": _floats(qk.weights),
                             "output": _floats(qk.output), "scale": 1 / math.sqrt(len(qk.query))}
    if "next" in views:
        nt = inspection.next_token(position, focus.temperature, focus.top_k, focus.top_p, focus.repetition_penalty,
                                   focus.seed, focus.beams, focus.beam_tokens)
        out["next"] = {
            "position": nt.position, "temperature": nt.temperature, "top_k": nt.top_k, "top_p": nt.top_p,
            "repetition_penalty": nt.repetition_penalty, "seed": nt.seed, "kept": len(nt.kept_ids),
            "kept_mass": nt.kept_mass, "entropy": nt.entropy, "final_entropy": nt.final_entropy,
            "candidates": [{**dataclasses.asdict(c), "text": token(c.id)["text"]} for c in nt.candidates],
            "greedy": token(nt.greedy), "sampled": None if nt.sampled is None else token(nt.sampled),
            "beam": [token(t) for t in nt.beam], "greedy_run": [token(t) for t in nt.greedy_run],
            "beams": focus.beams}
    if "lens" in views:
        for token_id in np.unique(inspection.lens_top):
            token(token_id)
        out["lens"] = {"ids": inspection.lens_top.tolist(), "probs": _floats(inspection.lens_probs, 4)}
    if "residual" in views:
        out["residual"] = {"stream": _floats(inspection.residual_norm, 3),
                           "attention": _floats(inspection.attention_norm, 3),
                           "ffn": _floats(inspection.ffn_norm, 3)}
    if "kv" in views:
        kv = inspection.kv_cache(focus.kv_steps)
        out["kv"] = {**dataclasses.asdict(kv), "bytes_per_token": kv.bytes_per_token,
                     "multi_head_bytes_per_token": kv.multi_head_bytes_per_token}
    out["vocab"] = {str(k): v for k, v in sorted(vocab.items())}
    return out


def _floats(array: np.ndarray, digits: int = 6) -> Any:
    """Rounded floats in nested lists; -inf and NaN as None (JSON has neither)."""
    array = np.asarray(array, dtype=np.float64)
    rounded = np.round(array, digits)
    return rounded.tolist() if np.isfinite(rounded).all() else _nulls(rounded.tolist())


def _nulls(value: Any) -> Any:
    if isinstance(value, list):
        return [_nulls(v) for v in value]
    return value if math.isfinite(value) else None


def to_html(data: dict[str, Any]) -> str:
    """The Inspect page with ``data`` (a :func:`payload`) inside it, its style and script inlined: one file
    that any browser opens with no server."""
    def read(name: str) -> str:
        return (STATIC / name).read_text(encoding="utf-8")

    page = read("inspect.html")
    # "<" as \u003c: no text in the data (a "</script>", a "<!--") can end or alter the script element holding it
    embedded = json.dumps(data, ensure_ascii=False).replace("<", "\\u003c")
    inlined = {'<link rel="stylesheet" href="/static/style.css">': f"<style>\n{read('style.css')}\n</style>",
               '<script src="/static/page.js" defer></script>': f"<script>\n{read('page.js')}\n</script>",
               '<script src="/static/inspect.js" defer></script>':
                   f'<script id="inspection" type="application/json">{embedded}</script>\n'
                   f"<script>\n{read('inspect.js')}\n</script>"}
    for tag, replacement in inlined.items():
        if tag not in page:
            raise RuntimeError(f"inspect.html lost the tag {tag}: the export cannot inline it")
        page = page.replace(tag, replacement)
    return page.replace("<title>lmforge inspect</title>",
                        f"<title>lmforge inspect: {html.escape(data['model'])}</title>")


def write_html(data: dict[str, Any], path: str | Path) -> Path:
    """Write :func:`to_html` to ``path`` (through a temporary file: a half-written page never appears)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temp_path(path)
    temporary.write_text(to_html(data), encoding="utf-8")
    os.replace(temporary, path)
    return path
