"""The Inspect page (static/inspect.html) in headless Chromium, on the tiny random-weight model of
tests/conftest.py: served by `lmforge serve` (POST /v1/inspect: the heat map, the next-token distribution
under sampler settings, the focus token, errors) and as the one-file export of ``write_html``, which opens
from file:// and makes no request at all: a decoder's, an encoder's and an encoder-decoder's (its three
attentions).

The browser is found as in test_serve_ui.py: the system's `chromium`, else Playwright's own; without
either the browser tests are skipped and say so.
"""

from __future__ import annotations

import re

import httpx
import pytest

from lmforge.inspector import inspect_text
from lmforge.inspector.export import Focus, payload, write_html

TEXT = "The quick brown fox jumps over the lazy dog. Paris is"

# The colours at the centres of the heat map's visible cells (on and below the diagonal): the canvas says
# where its grid lies (data-x0, data-y0, data-cell in CSS pixels; data-ratio device pixels per CSS pixel).
HEATMAP_COLOURS = """() => {
  const canvas = document.querySelector('[data-testid="heatmap"]');
  const { x0, y0, cell, ratio } = Object.fromEntries(Object.entries(canvas.dataset).map(([k, v]) => [k, Number(v)]));
  const T = Math.round((canvas.height / ratio - y0 - 8) / cell);
  const context = canvas.getContext("2d");
  const colours = new Set();
  let transparent = 0;
  for (let row = 0; row < T; row++) {
    for (let column = 0; column <= row; column++) {
      const x = Math.floor((x0 + (column + 0.5) * cell) * ratio);
      const y = Math.floor((y0 + (row + 0.5) * cell) * ratio);
      const [r, g, b, a] = context.getImageData(x, y, 1, 1).data;
      if (a === 0) transparent += 1;
      colours.add(`${r},${g},${b}`);
    }
  }
  return { cells: T * (T + 1) / 2, colours: colours.size, transparent };
}"""

# ... and of the cells above the diagonal (an encoder's: a decoder paints them in the one mask colour)
UPPER_COLOURS = HEATMAP_COLOURS.replace("let column = 0; column <= row;", "let column = row + 1; column < T;")


def check_heatmap(page, tokens: int) -> None:
    seen = page.evaluate(HEATMAP_COLOURS)
    assert seen["cells"] == tokens * (tokens + 1) // 2, seen
    assert seen["transparent"] == 0, seen  # every cell painted
    assert seen["colours"] >= 5, seen  # weights of varying size, not one flat colour



def test_chat_page_links_to_the_inspect_page(live_server):
    chat = httpx.get(live_server + "/", timeout=10)
    assert 'id="inspect-link"' in chat.text and 'href="/static/inspect.html"' in chat.text
    inspect = httpx.get(live_server + "/static/inspect.html", timeout=10)
    assert inspect.status_code == 200 and "<title>lmforge inspect</title>" in inspect.text


def test_inspect_page_served(page, live_server):
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import expect

    page.goto(live_server + "/static/inspect.html")
    expect(page.locator("#model option")).to_have_text(["tiny"])
    expect(page.locator("#views")).to_be_hidden()
    page.fill("#text", TEXT)
    page.click("#inspect")
    expect(page.locator("body")).to_have_attribute("data-state", "shown")
    expect(page.locator("body")).to_have_attribute("data-busy", "false")
    data = page.evaluate("() => window.lmforge.state.data")
    tokens = len(data["tokens"])
    layers, heads = data["config"]["layers"], data["config"]["heads"]
    assert tokens > 5 and data["focus"]["position"] == tokens - 1

    chips = page.locator('[data-testid="tokens"] [data-testid="token"]')
    expect(chips).to_have_count(tokens)
    expect(chips.first).to_have_class(re.compile(r"\binspect-token-special\b"))  # BOS
    expect(chips.nth(2)).to_contain_text("·")  # " quick": the space shown
    expect(page.locator("#token-count")).to_contain_text(f"{tokens} tokens")
    check_heatmap(page, tokens)
    expect(page.locator('[data-testid="head-thumb"]')).to_have_count(heads)
    expect(page.locator("#lens-table tbody tr")).to_have_count(layers + 1)
    expect(page.locator("#residual-table tbody tr")).to_have_count(layers + 1)
    expect(page.locator('[data-testid="kv"]')).to_contain_text("One token, all layers")
    expect(page.locator('[data-testid="kv-server"]')).to_contain_text("Prefix cache hits")

    # the next-token distribution under the sampler's settings; the tiny model's top logits have no ties
    candidates = page.locator('[data-testid="distribution"] [data-testid="candidate"]')
    expect(candidates).to_have_count(min(20, data["config"]["vocab_size"]))
    logits = sorted((c["logit"] for c in data["next"]["candidates"]), reverse=True)
    assert len(set(logits[:4])) == 4, logits[:4]
    kept = page.locator('[data-testid="candidate"][data-kept="true"]')
    page.fill("#temperature", "0")
    expect(page.locator('[data-testid="kept"]')).to_have_text("1")
    expect(kept).to_have_count(1)
    expect(page.locator('[data-testid="choices"]')).to_contain_text("temperature 0 is greedy")
    page.fill("#top-k", "3")
    page.fill("#temperature", "1")
    expect(page.locator('[data-testid="kept"]')).to_have_text("3")
    expect(kept).to_have_count(3)
    assert page.evaluate("() => [...document.querySelectorAll('[data-testid=candidate]')].slice(0, 3)"
                         ".every((row) => row.dataset.kept === 'true')")
    expect(page.locator("#next-view")).not_to_have_attribute("data-stale", "true")

    # a token clicked: the focus moves, the query . key detail shows its keys (causal: itself and before)
    qk = page.locator('[data-testid="qk"]')
    expect(qk).to_have_attribute("data-source", "server")
    expect(qk.locator('[data-testid="qk-key"]')).to_have_count(tokens)
    chips.nth(3).click()
    expect(page.locator("#position")).to_contain_text("#3")
    expect(qk).to_have_attribute("data-position", "3")
    expect(qk).to_have_attribute("data-source", "server")
    expect(qk.locator('[data-testid="qk-key"]')).to_have_count(4)
    expect(page.locator("#heatmap")).to_have_attribute("data-position", "3")
    expect(page.locator("#next-view")).to_have_attribute("data-position", "3")
    expect(chips.nth(3)).to_have_attribute("aria-pressed", "true")

    # layers and heads: only those that exist can be chosen
    expect(page.locator("#layer option")).to_have_text([str(i) for i in range(layers)])
    expect(page.locator("#head option")).to_have_text([str(i) for i in range(heads)])
    with pytest.raises(PlaywrightError):
        page.select_option("#layer", str(layers), timeout=300)
    page.select_option("#layer", str(layers - 1))
    page.locator('[data-testid="head-thumb"]').nth(heads - 1).click()
    expect(qk).to_have_attribute("data-layer", str(layers - 1))
    expect(qk).to_have_attribute("data-head", str(heads - 1))
    expect(qk).to_have_attribute("data-source", "server")
    page.evaluate("""(layer) => { const select = document.getElementById('layer'); select.value = String(layer);
                     select.dispatchEvent(new Event('change')); }""", layers + 3)
    assert page.evaluate("() => window.lmforge.state.focus.layer") == layers - 1
    expect(page.locator("#layer")).to_have_value(str(layers - 1))
    expect(page.locator("#error")).to_be_hidden()

    # a text over the server's 512 tokens: refused with a 400 whose message the banner shows
    page.fill("#text", "word " * 700)
    page.click("#inspect")
    expect(page.locator('[data-testid="error"]')).to_be_visible()
    expect(page.locator("#error-text")).to_contain_text("at most 512")
    expect(page.locator("body")).to_have_attribute("data-state", "shown")  # the last inspection stays
    page.click("#error-close")
    expect(page.locator("#error")).to_be_hidden()


def test_inspect_export_opens_without_a_server(browser, tiny_lm, tmp_path, watch_page):
    """The page of `lmforge inspect --html`: the payload inside, drawn from file:// with no request."""
    from playwright.sync_api import expect

    data = payload(inspect_text(tiny_lm, TEXT, "tiny"), Focus(layer=1, head=2, top_k=3))
    path = write_html(data, tmp_path / "inspect.html")
    tokens = len(data["tokens"])

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()

    def allowed(url: str) -> bool:  # the file itself (and the data: icon), not even another file:// URL
        return url == path.as_uri() or url.startswith("data:")

    problems = watch_page(page, allowed)

    def route(route):
        if allowed(route.request.url):
            route.continue_()
        else:
            problems.append(f"request: {route.request.url}")
            route.abort()

    page.route("**/*", route)
    try:
        page.goto(path.as_uri())
        expect(page.locator("body")).to_have_attribute("data-state", "shown")
        expect(page.locator("body")).to_have_attribute("data-mode", "static")
        assert page.title() == "lmforge inspect: tiny"
        expect(page.locator("#inspect-form")).to_be_hidden()
        expect(page.locator("#static-note")).to_contain_text("lmforge serve")
        for slider in ("#temperature", "#top-k", "#top-p", "#repetition-penalty", "#seed", "#beams"):
            expect(page.locator(slider)).to_be_disabled()
        expect(page.locator("#layer")).to_have_value("1")
        expect(page.locator("#heatmap")).to_have_attribute("data-head", "2")
        check_heatmap(page, tokens)

        expect(page.locator('[data-testid="candidate"]')).to_have_count(20)
        expect(page.locator('[data-testid="kept"]')).to_have_text("3")
        expect(page.locator('[data-testid="candidate"][data-kept="true"]')).to_have_count(3)
        expect(page.locator("#top-k-value")).to_have_text("3")
        qk = page.locator('[data-testid="qk"]')
        expect(qk).to_have_attribute("data-source", "server")  # the saved focus: scores and weights
        expect(qk.locator('[data-testid="qk-key"]')).to_have_count(tokens)

        # another token and head: the weights come from the saved attention, nothing is fetched
        page.locator('[data-testid="token"]').nth(2).click()
        expect(qk).to_have_attribute("data-position", "2")
        expect(qk).to_have_attribute("data-source", "attention")
        expect(qk.locator('[data-testid="qk-key"]')).to_have_count(3)
        expect(page.locator("#next-note")).to_contain_text("saved in this file")
        page.select_option("#layer", "0")
        expect(page.locator("#heatmap")).to_have_attribute("data-layer", "0")
        check_heatmap(page, tokens)
        expect(page.locator("#lens-table tbody tr")).to_have_count(data["config"]["layers"] + 1)
        expect(page.locator("#error")).to_be_hidden()
    finally:
        context.close()
    assert not problems, problems


def test_an_encoders_export_shows_attention_both_ways(browser, tiny_lm, tmp_path, watch_page):
    """A masked-LM encoder saved by `lmforge inspect --html`: no cell is masked, every token's row reads the
    whole text, the distribution is of the token at the position, and the KV cache view says why it is not there."""
    from playwright.sync_api import expect

    from lmforge.embed import Embedder
    from lmforge.model import DecoderLM, preset
    from lmforge.runtime import Runtime

    config = preset("tiny", vocab_size=tiny_lm.tokenizer.vocab_size, causal=False, head="mlm")
    encoder = Embedder(DecoderLM(config).eval(), tiny_lm.tokenizer, Runtime.resolve("cpu", "fp32"))
    data = payload(inspect_text(encoder, TEXT, "bert"), Focus(position=2))
    path = write_html(data, tmp_path / "bert.html")
    tokens = len(data["tokens"])
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    problems = watch_page(page, lambda url: url == path.as_uri() or url.startswith("data:"))
    try:
        page.goto(path.as_uri())
        expect(page.locator("body")).to_have_attribute("data-state", "shown")
        painted = page.evaluate(UPPER_COLOURS)
        assert painted["colours"] >= 5, painted  # weights above the diagonal, not the mask's one colour
        qk = page.locator('[data-testid="qk"]')
        expect(qk.locator('[data-testid="qk-key"]')).to_have_count(tokens)  # token 2 sees every token
        expect(page.locator("#next-title")).to_contain_text("masked")
        expect(page.locator("#next-note")).to_contain_text("what the masked-LM puts there")
        expect(page.locator("#kv-missing")).to_contain_text("keeps no KV cache")
        page.locator('[data-testid="token"]').nth(1).click()
        expect(qk.locator('[data-testid="qk-key"]')).to_have_count(tokens)
    finally:
        context.close()
    assert not problems, problems


# The heat map's grid of any shape (data-rows x data-columns): each cell's colour at its centre, counted as
# transparent, the mask's colour (above or on/below the diagonal) or a weight's colour.
GRID_COLOURS = """() => {
  const canvas = document.querySelector('[data-testid="heatmap"]');
  const [x0, y0, cell, ratio, rows, columns] = ["x0", "y0", "cell", "ratio", "rows", "columns"]
    .map((name) => Number(canvas.dataset[name]));
  const mask = window.lmforge.state.colors.mask.join(",");
  const context = canvas.getContext("2d");
  const colours = new Set();
  let transparent = 0, maskedAbove = 0, maskedBelow = 0;
  for (let row = 0; row < rows; row++) {
    for (let column = 0; column < columns; column++) {
      const x = Math.floor((x0 + (column + 0.5) * cell) * ratio);
      const y = Math.floor((y0 + (row + 0.5) * cell) * ratio);
      const [r, g, b, a] = context.getImageData(x, y, 1, 1).data;
      const colour = `${r},${g},${b}`;
      if (a === 0) transparent += 1;
      else if (colour === mask) column > row ? maskedAbove += 1 : maskedBelow += 1;
      else colours.add(colour);
    }
  }
  return { stack: canvas.dataset.stack, rows, columns, transparent, maskedAbove, maskedBelow, colours: colours.size };
}"""


def test_an_encoder_decoders_export_shows_its_three_attentions(browser, tiny_lm, tmp_path, watch_page):
    """A T5-form encoder-decoder saved by `lmforge inspect --html`: the stack select chooses the decoder's
    self-attention (causal), its cross-attention over the source and the encoder's self-attention (neither
    masked); each has its own grid shape, layers and rows; source tokens have a chip row of their own."""
    import torch
    from playwright.sync_api import expect

    from lmforge.api import LanguageModel
    from lmforge.model import build_model, preset
    from lmforge.runtime import Runtime

    torch.manual_seed(0)
    config = preset("t5-tiny", vocab_size=tiny_lm.tokenizer.vocab_size, decoder_layers=1)  # 2 encoder layers
    t5 = LanguageModel(build_model(config).eval(), tiny_lm.tokenizer, Runtime.resolve("cpu", "fp32"))
    data = payload(inspect_text(t5, "The quick brown fox", "t5", target="jumps over the lazy dog"), Focus())
    path = write_html(data, tmp_path / "t5.html")
    T, S = len(data["tokens"]), len(data["source_tokens"])
    decoder_layers, encoder_layers = data["config"]["layers"], data["config"]["encoder_layers"]
    assert (decoder_layers, encoder_layers) == (1, 2) and T > 3 and S > 3
    shapes = {"self": data["attention"]["shape"], "cross": data["cross_attention"]["shape"],
              "encoder": data["encoder_attention"]["shape"]}
    assert shapes == {"self": [1, 4, T, T], "cross": [1, 4, T, S], "encoder": [2, 4, S, S]}, shapes

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    problems = watch_page(page, lambda url: url == path.as_uri() or url.startswith("data:"))  # no request
    try:
        page.goto(path.as_uri())
        expect(page.locator("body")).to_have_attribute("data-state", "shown")
        stack = page.locator('[data-testid="stack"]')
        expect(stack).to_be_visible()
        expect(stack.locator("option")).to_have_text(["decoder self-attention", "cross-attention: decoder → source",
                                                      "encoder self-attention"])
        assert stack.locator("option").evaluate_all("(options) => options.map((o) => o.value)") == [
            "self", "cross", "encoder"]
        heatmap = page.locator("#heatmap")
        qk = page.locator('[data-testid="qk"]')
        targets = page.locator('[data-testid="tokens"] [data-testid="token"]')
        sources = page.locator('[data-testid="tokens"] [data-testid="source-token"]')
        expect(targets).to_have_count(T)
        expect(sources).to_have_count(S)
        expect(targets.first).to_have_class(re.compile(r"\binspect-token-special\b"))  # the decoder's start
        expect(page.locator('[data-testid="tokens"]')).to_contain_text("Source (the encoder reads)")
        expect(page.locator("#kv-missing")).to_contain_text("not shown for an encoder-decoder yet")

        # the decoder's self-attention: T x T, causal (the mask's colour above the diagonal, and only there)
        expect(heatmap).to_have_attribute("data-stack", "self")
        seen = page.evaluate(GRID_COLOURS)
        assert (seen["rows"], seen["columns"]) == (T, T), seen
        assert seen["maskedAbove"] == T * (T - 1) // 2 and seen["maskedBelow"] == 0, seen
        assert seen["transparent"] == 0 and seen["colours"] >= 3, seen
        expect(qk.locator('[data-testid="qk-key"]')).to_have_count(T)  # the last target token sees them all
        expect(qk).to_have_attribute("data-source", "server")

        # cross-attention: target rows x source columns, every cell a weight; the keys are the source's
        stack.select_option("cross")
        expect(heatmap).to_have_attribute("data-stack", "cross")
        seen = page.evaluate(GRID_COLOURS)
        assert (seen["rows"], seen["columns"]) == (T, S), seen
        assert seen["maskedAbove"] + seen["maskedBelow"] + seen["transparent"] == 0, seen
        assert seen["colours"] >= 3, seen
        expect(heatmap).to_have_attribute("data-position", str(T - 1))
        expect(page.locator("#layer option")).to_have_text([str(i) for i in range(decoder_layers)])
        expect(qk).to_have_attribute("data-stack", "cross")
        expect(qk).to_have_attribute("data-source", "attention")
        expect(qk.locator('[data-testid="qk-key"]')).to_have_count(S)
        expect(page.locator("#qk-note")).to_contain_text("decoder's self-attention only")
        targets.nth(1).click()  # a target token: the cross view's row
        expect(heatmap).to_have_attribute("data-position", "1")
        expect(qk.locator('[data-testid="qk-key"]')).to_have_count(S)

        # the encoder: source rows and columns, both ways, its own layers; its rows have a focus of their own
        stack.select_option("encoder")
        expect(heatmap).to_have_attribute("data-stack", "encoder")
        seen = page.evaluate(GRID_COLOURS)
        assert (seen["rows"], seen["columns"]) == (S, S), seen
        assert seen["maskedAbove"] + seen["maskedBelow"] + seen["transparent"] == 0, seen
        expect(heatmap).to_have_attribute("data-position", str(S - 1))  # the last source token
        expect(page.locator("#position")).to_contain_text(f"source #{S - 1}")
        expect(page.locator("#layer option")).to_have_text([str(i) for i in range(encoder_layers)])
        page.select_option("#layer", "1")
        expect(heatmap).to_have_attribute("data-layer", "1")
        expect(qk.locator('[data-testid="qk-key"]')).to_have_count(S)
        box = heatmap.bounding_box()
        x0, y0, cell = (float(heatmap.get_attribute(f"data-{name}")) for name in ("x0", "y0", "cell"))
        page.mouse.move(box["x"] + x0 + cell / 2, box["y"] + y0 + 1.5 * cell)  # row 1, column 0
        expect(page.locator("#heatmap-tip")).to_contain_text("source #1")
        expect(page.locator("#heatmap-tip")).to_contain_text("→ source #0")
        page.mouse.click(box["x"] + x0 + cell / 2, box["y"] + y0 + cell / 2)  # row 0
        expect(heatmap).to_have_attribute("data-position", "0")  # the source focus; the decoder's stays
        focus = page.evaluate("() => window.lmforge.state.focus")
        assert (focus["source"], focus["position"]) == (0, 1), focus

        # back to the decoder: the encoder's layer 1 does not exist there, it is clamped
        stack.select_option("cross")
        expect(page.locator("#layer")).to_have_value("0")
        expect(heatmap).to_have_attribute("data-layer", "0")
        sources.nth(2).click()  # a source chip: the encoder's view at that token
        expect(stack).to_have_value("encoder")
        expect(heatmap).to_have_attribute("data-position", "2")
        expect(sources.nth(2)).to_have_attribute("aria-pressed", "true")
        targets.nth(2).click()  # a target chip: the decoder's view at that token
        expect(stack).to_have_value("self")
        expect(heatmap).to_have_attribute("data-position", "2")
        expect(qk.locator('[data-testid="qk-key"]')).to_have_count(3)
        expect(page.locator("#lens-table tbody tr")).to_have_count(decoder_layers + 1)
        expect(page.locator("#error")).to_be_hidden()
    finally:
        context.close()
    assert not problems, problems
