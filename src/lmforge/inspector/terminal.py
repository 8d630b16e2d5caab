"""An inspection drawn in the terminal: the text of ``lmforge inspect``, one function per view.

Each function takes the :func:`lmforge.inspector.export.payload` data (the same the Inspect page draws), so
the terminal, the page and a saved JSON file show one set of numbers.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

SHADES = " ·░▒▓█"  # attention weight 0 .. 1, by sixths
BAR = 28  # characters of a full-length bar


def shown(text: str, width: int = 12) -> str:
    """A token's text made visible on one line: spaces as ·, line breaks as ↵, tabs as →; cut to ``width``."""
    text = text.replace(" ", "·").replace("\n", "↵").replace("\t", "→").replace("\r", "␍")
    return text if len(text) <= width else text[:width - 1] + "…"


def bar(value: float, width: int = BAR) -> str:
    filled = max(0.0, min(1.0, value)) * width
    return "█" * int(filled) + ("▌" if filled - int(filled) >= 0.5 else "")


def attention_array(data: dict[str, Any], name: str = "attention") -> np.ndarray:
    """The (L, H, T, T) weights of a payload (``name``: an encoder-decoder's ``cross_attention`` (L, H, T, S)
    or ``encoder_attention`` (Le, H, S, S)), decoded from their 16-bit block."""
    block = data[name]
    raw = np.frombuffer(base64.b64decode(block["data"]), dtype="<u2")
    return raw.reshape(block["shape"]).astype(np.float32) / 65535


def tokens_view(data: dict[str, Any]) -> str:
    count = data["count"]
    lines = [f"{count['tokens']} tokens · {count['characters']} characters · {count['bytes']} bytes · "
             f"{count['words']} words · {count['bytes_per_token']:.2f} bytes per token", ""]
    if "source_tokens" in data:  # an encoder-decoder: the source it read, then the target its decoder wrote
        lines += ["source (the encoder reads):", *chips(data["source_tokens"]), "",
                  "target (the decoder writes, after its start token):", *chips(data["tokens"])]
        return "\n".join(lines)
    return "\n".join(lines + chips(data["tokens"]))


def chips(tokens: list[dict]) -> list[str]:
    """Tokens as two aligned lines per row, text above id, wrapped at 100 characters."""
    lines, row_text, row_ids, width = [], [], [], 0
    for token in tokens:
        text = shown(token["text"], 16)
        cell = max(len(text), len(str(token["id"])))
        if width + cell + 1 > 100 and row_text:
            lines += ["|".join(row_text), "|".join(row_ids), ""]
            row_text, row_ids, width = [], [], 0
        row_text.append(text.ljust(cell))
        row_ids.append(str(token["id"]).ljust(cell))
        width += cell + 1
    if row_text:
        lines += ["|".join(row_text), "|".join(row_ids)]
    return lines


def attention_view(data: dict[str, Any], window: int = 32) -> str:
    """The focus head's heat map over the last ``window`` tokens up to the focus, then how the focus row is made."""
    focus = data["focus"]
    layer, head, position, stack = focus["layer"], focus["head"], focus["position"], focus.get("stack", "self")
    rows = [shown(t["text"], 10) for t in data["source_tokens" if stack == "encoder" else "tokens"]]
    columns = data["source_tokens"] if stack != "self" else data["tokens"]
    weights = attention_array(data, {"self": "attention", "cross": "cross_attention",
                                     "encoder": "encoder_attention"}[stack])
    what = {"self": "", "cross": " (cross-attention: target tokens over the source)",
            "encoder": " (the encoder's self-attention)"}[stack]
    lines = [f"layer {layer}, head {head}{what}: row = the token attending, column = the token attended to "
             f"(shade: weight, {SHADES[1]} small .. {SHADES[-1]} near 1)"]
    causal = stack == "self" and data["config"].get("causal", True)  # else every token sees every column
    if stack == "encoder":
        position = len(rows) - 1
    start = max(0, position + 1 - window) if causal else 0
    end = position + 1 if causal else min(len(rows), start + window)
    grid = weights[layer, head, start:end, :len(columns)] if not causal else weights[layer, head, start:end, start:end]
    if start or end < len(rows):
        lines.append(f"(rows {start}..{end - 1} of {len(rows)}; --position moves the window)")
    if stack != "self":
        lines.append(f"{'':>15} columns: {' '.join(shown(t['text'], 8) for t in columns)}")
    for row, query in enumerate(range(start, end)):
        cells = "".join(SHADES[min(len(SHADES) - 1, int(np.ceil(w * (len(SHADES) - 1))))] for w in grid[row])
        lines.append(f"{query:>4} {rows[query]:>10} {cells}")
    labels = [shown(t["text"], 10) for t in data["tokens"]]
    qk = data.get("query_keys")
    if qk and stack == "self":
        lines += ["", f"how row {qk['position']} is made: weights = softmax(q·k × {qk['scale']:.4f}) "
                      f"(1/√{len(qk['query'])}); kv head {qk['kv_head']}; the largest:"]
        order = sorted(range(len(qk["weights"])), key=lambda i: -qk["weights"][i])[:8]
        for key in order:
            lines.append(f"  key {key:>4} {labels[key]:>10}  q·k/√d {qk['scores'][key]:>8.3f}  "
                         f"weight {qk['weights'][key]:.4f} {bar(qk['weights'][key], 20)}")
    return "\n".join(lines)


def next_view(data: dict[str, Any]) -> str:
    nt = data["next"]
    settings = (f"temperature {nt['temperature']}, top-k {nt['top_k'] or 'off'}, top-p {nt['top_p']}, "
                f"repetition penalty {nt['repetition_penalty']}")
    where = f"after token {nt['position']}" if data.get("predicts") != "masked" else \
        f"at token {nt['position']} (what the masked-LM puts there)"
    lines = [f"{where} ({settings}): {nt['kept']} token(s) kept, holding "
             f"{nt['kept_mass']:.1%} of the model's probability; entropy {nt['entropy']:.2f} -> "
             f"{nt['final_entropy']:.2f} nats",
             f"  {'token':>14} {'id':>6} {'logit':>8} {'model p':>8} {'sampled p':>9}"]
    for c in nt["candidates"]:
        mark = "✓" if c["kept"] else " "
        lines.append(f"{mark} {shown(c['text'], 14):>14} {c['id']:>6} {c['logit']:>8.3f} {c['probability']:>8.4f} "
                     f"{c['final']:>9.4f} {bar(c['final'])}")

    def run(tokens: list[dict]) -> str:
        return "".join(t["text"] for t in tokens).replace("\n", "↵")

    lines.append(f"greedy picks {shown(nt['greedy']['text'], 20)!r}"
                 + ("" if nt["sampled"] is None else f"; a draw with seed {nt['seed']} picks "
                                                      f"{shown(nt['sampled']['text'], 20)!r}"))
    if nt["greedy_run"]:
        lines += [f"greedy goes on: {run(nt['greedy_run'])!r}", f"beam search ({nt['beams']} beams): {run(nt['beam'])!r}"]
    return "\n".join(lines)


def lens_view(data: dict[str, Any], columns: int = 6) -> str:
    """The top guess read from each layer at the last ``columns`` positions up to the focus."""
    lens, vocab, position = data["lens"], data["vocab"], data["focus"]["position"]
    positions = list(range(max(0, position + 1 - columns), position + 1))
    header = f"{'layer':>6} " + " ".join(f"{shown(data['tokens'][p]['text'], 14):>21}" for p in positions)
    lines = ["the logit lens: the residual stream after each layer (embed: before the first) through the final "
             "norm and the output layer; columns: the token read, cells: the guess for "
             + ("the token there" if data.get("predicts") == "masked" else "the token after it"), header]
    layers = len(lens["ids"])
    for layer in range(layers):
        name = "embed" if layer == 0 else f"{layer - 1}{'=out' if layer == layers - 1 else ''}"
        cells = [f"{shown(vocab[str(lens['ids'][layer][p][0])], 14):>14} {lens['probs'][layer][p][0]:>6.1%}"
                 for p in positions]
        lines.append(f"{name:>6} " + " ".join(cells))
    return "\n".join(lines)


def residual_view(data: dict[str, Any]) -> str:
    res, position = data["residual"], data["focus"]["position"]
    lines = [f"the residual stream at token {position}: its norm entering each layer, and the norm of what the "
             "layer's attention and feed-forward add", f"{'layer':>6} {'stream':>9} {'+attention':>11} {'+ffn':>9}"]
    for layer in range(len(res["attention"])):
        lines.append(f"{layer:>6} {res['stream'][layer][position]:>9.3f} {res['attention'][layer][position]:>11.3f} "
                     f"{res['ffn'][layer][position]:>9.3f}")
    lines.append(f"{'out':>6} {res['stream'][-1][position]:>9.3f}")
    return "\n".join(lines)


def kv_view(data: dict[str, Any]) -> str:
    kv = data["kv"]
    lines = [f"KV cache ({kv['dtype']}): keys and values of {kv['kv_heads']} head(s) × {kv['head_dim']} per layer = "
             f"{kv['bytes_per_token_layer']:,} bytes per token per layer, {kv['bytes_per_token']:,} per token over "
             f"{kv['layers']} layers"]
    if kv["kv_heads"] < kv["heads"]:
        lines.append(f"with one key/value head per query head (MHA, {kv['heads']}) it would be "
                     f"{kv['multi_head_bytes_per_token']:,} per token: grouped queries save "
                     f"{kv['heads'] // kv['kv_heads']}x")
    lines.append(f"a static cache of {kv['max_positions']} positions holds {kv['allocated_bytes'] / 2**20:,.1f} MiB")
    steps = kv["steps"]
    if steps:
        lines.append(f"as a greedy decode goes on: {steps[0]['tokens']} tokens after the prefill = "
                     f"{steps[0]['bytes'] / 2**10:,.1f} KiB, then +{kv['bytes_per_token'] / 2**10:,.1f} KiB a token, "
                     f"{steps[-1]['tokens']} tokens = {steps[-1]['bytes'] / 2**10:,.1f} KiB")
    return "\n".join(lines)


RENDERERS = {"tokens": tokens_view, "attention": attention_view, "next": next_view, "lens": lens_view,
             "residual": residual_view, "kv": kv_view}


def render(data: dict[str, Any]) -> str:
    """Every view the payload holds, each under its heading."""
    parts = []
    for name, draw in RENDERERS.items():
        if name in data or (name == "tokens"):
            parts.append(f"── {name} " + "─" * (60 - len(name)) + "\n" + draw(data))
    return "\n\n".join(parts)


# ---- the other stages (lmforge.inspector.lora, quant, alignment, rag) -------------------------------------

def lora_table(view) -> str:
    lines = [f"{len(view.layers)} adapted layers: {view.adapter_parameters:,} adapter weights beside "
             f"{view.base_parameters:,} frozen ones ({view.adapter_parameters / max(1, view.base_parameters):.2%})",
             f"{'layer':<34} {'r':>3} {'scale':>6} {'‖W‖':>8} {'‖ΔW‖':>8} {'‖ΔW‖/‖W‖':>9} {'eff. rank':>9}  "
             "ΔW singular values"]
    for layer in view.layers:
        values = " ".join(f"{v:.3g}" for v in layer.delta_singular[:4])
        lines.append(f"{layer.name:<34} {layer.rank:>3} {layer.scale:>6.3g} {layer.weight_norm:>8.3f} "
                     f"{layer.delta_norm:>8.4f} {layer.ratio:>9.2%} {layer.effective_rank:>9.2f}  {values}"
                     + (" …" if len(layer.delta_singular) > 4 else ""))
    return "\n".join(lines)


def quant_table(view) -> str:
    lines = [f"{view.spec}: {len(view.layers)} quantized layers",
             f"{'layer':<34} {'bits':>4} {'granularity':>12} {'mean sq. error':>14} {'max |error|':>11} "
             f"{'relative':>9}"]
    for layer in view.layers:
        lines.append(f"{layer.name:<34} {layer.bits:>4} {layer.granularity:>12} {layer.mse:>14.3e} "
                     f"{layer.max_error:>11.3e} {layer.relative_error:>9.3%}")
    grid = view.grid
    chosen = next(layer for layer in view.layers if layer.name == view.layer)
    lines.append(f"\n{view.layer}: mean squared error {chosen.mse:.3e}, "
                 f"the largest {chosen.max_error:.3e}"
                 + ("" if chosen.max_error_in_steps is None else
                    f" = {chosen.max_error_in_steps:.2f} of a step (rounding to the nearest level: at most 0.5)"))
    if grid is not None:
        shown_levels = ", ".join(f"{v:.4g}" for v in grid.levels[:3]) + ", …, " + \
            ", ".join(f"{v:.4g}" for v in grid.levels[-2:])
        lines.append(f"the grid of {grid.span}: {len(grid.levels)} levels {shown_levels} (scale {grid.scale:.4g}"
                     + ("" if grid.zero is None else f", zero {grid.zero:g}") + ")")
        pairs = ", ".join(f"{w:+.4f}→{d:+.4f} (q={q})" for w, d, q in
                          zip(grid.weights[:4], grid.dequantized[:4], grid.codes[:4], strict=False))
        lines.append(f"  the first weights: {pairs}")
    return "\n".join(lines)


def reward_table(view) -> str:
    lines = [f"reward {view.score:+.4f} (the score at the conversation's last token"
             + ("; its start was cut to fit the context" if view.truncated else "") + ")",
             f"before the reply: {view.before_reply:+.4f}; after each reply token:"]
    for token, value in zip(view.tokens, view.values, strict=True):
        lines.append(f"  {shown(token.text, 16):>16} {value:+9.4f}")
    return "\n".join(lines)


def ratio_table(view) -> str:
    lines = [f"log π(y|x) = {view.policy_logp:.3f}, log π_ref(y|x) = {view.reference_logp:.3f}: log ratio "
             f"{view.log_ratio:+.3f}, DPO's implicit reward β·ratio = {view.implicit_reward:+.4f} (β {view.beta})",
             f"  {'token':>16} {'log π':>9} {'log π_ref':>9} {'ratio':>8}"]
    for token, p, r, d in zip(view.tokens, view.policy_logps, view.reference_logps, view.log_ratios, strict=True):
        lines.append(f"  {shown(token.text, 16):>16} {p:>9.3f} {r:>9.3f} {d:>+8.3f}")
    return "\n".join(lines)


def rag_table(view) -> str:
    def rank(value) -> str:
        return "-" if value is None else str(value)

    lines = [f"{len(view.chunks)} chunks by {view.method} search"
             + ("" if view.relevant else f" (none is close enough: best cosine {view.best_dense:.3f}; "
                                         "`rag ask` would answer that it cannot tell)"),
             f"  {'#':>2} {'bm25':>8} {'rank':>4} {'dense':>7} {'rank':>4} {'fused':>7} {'rank':>4}  "
             f"{'in the prompt':<18} source"]
    for c in view.chunks:
        where = "-" if c.prompt_start is None else f"msg {c.message} {c.prompt_start}:{c.prompt_end}"
        if c.token_start is not None:
            where += f" t{c.token_start}:{c.token_end}"
        lines.append(f"  {c.number:>2} {c.bm25_score:>8.3f} {rank(c.bm25_rank):>4} {c.dense_score:>7.3f} "
                     f"{rank(c.dense_rank):>4} {c.fused_score:>7.4f} {rank(c.fused_rank):>4}  {where:<18} "
                     f"{c.source}" + (f" ({c.title})" if c.title else ""))
    if view.answer is not None:
        lines += ["", f"answer: {view.answer}", f"cites: {view.cited or 'nothing'}"]
    return "\n".join(lines)
