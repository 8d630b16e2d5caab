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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.errors import InputError
from lmforge.files import write_text_atomic
from lmforge.inspector.core import Inspection
from lmforge.inspector.plain import plain

STATIC = Path(__file__).resolve().parent.parent / "serve" / "static"


@dataclass
class Focus:
    """What an inspection looks at closely: one layer, head and position, the sampler's settings, the decode
    that measures the KV cache."""

    layer: int = 0
    head: int = 0
    stack: str = "self"  # an encoder-decoder's attention drawn in the terminal: self, cross or encoder
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


def missing_views(inspection: Inspection) -> dict[str, str]:
    """The views this model does not give, and why."""
    missing = {}
    if inspection.predicts is None:
        missing["next"] = missing["lens"] = "it has no token logits"
    if not inspection.config["causal"]:
        missing["kv"] = "an encoder keeps no KV cache"
    elif inspection.source_tokens is not None:
        missing["kv"] = "the KV cache view is not drawn for an encoder-decoder yet"
    return missing


def payload(inspection: Inspection, focus: Focus, views: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The inspection as JSON-ready data: every view in ``views`` (None: every view the model gives), the
    detailed ones at ``focus``."""
    unknown = set(views or ()) - set(VIEWS)
    if unknown:
        raise InputError(f"unknown view(s) {', '.join(sorted(unknown))}; the views are {', '.join(VIEWS)}")
    missing = missing_views(inspection)
    if views is None:
        views = tuple(v for v in VIEWS if v not in missing)
    elif refused := [v for v in views if v in missing]:
        raise InputError("; ".join(f"no {v} view: {missing[v]}" for v in refused))
    position = inspection.position(focus.position)
    if focus.stack not in ("self", "cross", "encoder"):
        raise InputError(f"stack {focus.stack!r}: an encoder-decoder's attention is self, cross or encoder")
    if focus.stack != "self" and inspection.source_tokens is None:
        raise InputError(f"stack {focus.stack!r} is an encoder-decoder's; this model has its self-attention only")
    layers = (inspection.encoder_attention if focus.stack == "encoder" else inspection.attention).shape[0]
    if not 0 <= focus.layer < layers:
        where = "" if inspection.source_tokens is None else f" in the {focus.stack} attention"
        raise InputError(f"layer {focus.layer} does not exist{where}: layers 0..{layers - 1}")
    inspection.check(head=focus.head)
    qk_layer = min(focus.layer, inspection.num_layers - 1)  # q.k rows are the decoder's self-attention
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

    if inspection.source_tokens is not None:  # an encoder-decoder: the tokens above are the target's
        out["source_tokens"] = [dataclasses.asdict(t) for t in inspection.source_tokens]
    if "attention" in views:
        out["attention"] = weight_block(inspection.attention)
        if inspection.source_tokens is not None:
            out["cross_attention"] = weight_block(inspection.cross_attention)
            out["encoder_attention"] = weight_block(inspection.encoder_attention)
    if "query_keys" in views:
        qk = inspection.query_keys(qk_layer, focus.head, position)
        out["query_keys"] = {"layer": qk.layer, "head": qk.head, "position": qk.position, "kv_head": qk.kv_head,
                             "query": plain(qk.query), "keys": plain(qk.keys), "values": plain(qk.values),
                             "scores": plain(qk.scores), "weights": plain(qk.weights),
                             "output": plain(qk.output), "scale": 1 / math.sqrt(len(qk.query))}
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
        out["lens"] = {"ids": inspection.lens_top.tolist(), "probs": plain(inspection.lens_probs)}
    if "residual" in views:
        out["residual"] = {"stream": plain(inspection.residual_norm),
                           "attention": plain(inspection.attention_norm),
                           "ffn": plain(inspection.ffn_norm)}
    if "kv" in views:
        kv = inspection.kv_cache(focus.kv_steps)
        out["kv"] = {**dataclasses.asdict(kv), "bytes_per_token": kv.bytes_per_token,
                     "multi_head_bytes_per_token": kv.multi_head_bytes_per_token}
    out["vocab"] = {str(k): v for k, v in sorted(vocab.items())}
    return out


def weight_block(weights: np.ndarray) -> dict[str, Any]:
    """Attention weights in [0, 1] as one block of 16-bit integers (weight x 65535), base64."""
    codes = np.clip(np.round(weights * 65535), 0, 65535).astype("<u2")
    return {"shape": list(codes.shape), "encoding": "uint16 x 65535, base64",
            "data": base64.b64encode(codes.tobytes()).decode("ascii")}


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
    return write_text_atomic(path, to_html(data))
