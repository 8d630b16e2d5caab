/* The Inspect page (static/inspect.html): one forward pass of a model over a text, seen from inside.
 * Plain JavaScript, no build step, no library.
 *
 * Two modes:
 *   served  the page of `lmforge serve`: the form sends POST /v1/inspect (the payload of
 *           src/lmforge/inspector/export.py, plus "server": the engine's prefix-cache counters). Changing
 *           the layer, head or token asks again for ["query_keys"] (and ["next"] for a token); moving a
 *           sampler setting asks for ["next"] only, 250 ms after the last move.
 *   static  the file of `lmforge inspect --html` (export.to_html): the payload is in
 *           the JSON script element #inspection; the page shows it and makes no request at
 *           all. The attention weights of every layer and head are in it, so layer, head and token can still
 *           be changed; other settings need the server or the CLI.
 * In the export this script is inlined in <head> without defer: it waits for the DOM.
 *
 * Attention weights arrive once as base64 little-endian uint16 (weight x 65535, (L, H, T, T) row-major),
 * decoded into one Uint16Array; the heat map and the heads' thumbnails are drawn from it as images.
 *
 * An encoder-decoder (T5's form; config.encoder_decoder) has three such blocks, three "stacks" the #stack
 * select chooses between: "self" the decoder's self-attention (data.attention, (Ld, H, T, T), causal),
 * "cross" the decoder's cross-attention ((Ld, H, T, S): rows the target tokens data.tokens, columns the source
 * tokens data.source_tokens) and "encoder" the encoder's self-attention ((Le, H, S, S), both ways). The
 * decoder's focus token (focus.position) drives query·key, next token, lens and residual; the encoder's rows
 * have a focus of their own (focus.source), which fetches nothing.
 *
 * Stable hooks (tests/serve/test_serve_inspect_ui.py relies on these):
 *   #model #text #inspect      the form (served mode); #target an encoder-decoder's target text (shown once
 *                              one was inspected); #static-note says what a saved file cannot do
 *   #layer #head               selects (only layers and heads that exist, of the stack shown); #position the
 *                              focus token (of the rows shown); #stack the stack (hidden with only one)
 *   [data-testid=token]        the token chips (data-index); a click sets the focus; an encoder-decoder's
 *                              source tokens are [data-testid=source-token] (a click: the encoder's view)
 *   #heatmap                   the canvas; data-stack/-layer/-head/-position say what it shows (position: the
 *                              focus row), data-rows/-columns its grid's size, data-x0/-y0/-cell where the grid
 *                              lies (CSS pixels; cells are square), data-ratio device pixels per CSS pixel
 *   #qk-view                   data-stack/-layer/-head/-position, data-source "server" (scores from the
 *                              server) or "attention" (weights only, from the heat map's data);
 *                              [data-testid=qk-key] rows
 *   #next-view                 data-position, data-stale while new settings are being fetched;
 *                              [data-testid=candidate][data-kept], [data-testid=kept] the kept count
 *   #temperature #top-k #top-p #repetition-penalty #seed #beams   the sampler's settings
 *   body[data-state]           "empty", "loading", "shown"; body[data-mode] "served" or "static";
 *                              body[data-busy] "true" while a request runs
 *   window.lmforge             {state, inspect, setFocus, setStack, load}
 */
"use strict";

(() => {
  const { $, showError, clearError, element, readStorage, writeStorage, api } = window.lmforgePage;

  const STORAGE = { model: "lmforge.model" };
  const SETTINGS = [
    // [input id, request field, how its value reads]
    ["temperature", "temperature", (v) => (v === 0 ? "0 (greedy)" : String(v))],
    ["top-k", "top_k", (v) => (v === 0 ? "off" : String(v))],
    ["top-p", "top_p", (v) => (v >= 1 ? "1 (off)" : String(v))],
    ["repetition-penalty", "repetition_penalty", (v) => (v === 1 ? "1 (off)" : String(v))],
    ["seed", "seed", String],
    ["beams", "beams", String],
  ];
  const INTEGER = new Set(["top_k", "seed", "beams"]);
  const DEBOUNCE_MS = 250;
  const SVG = "http://www.w3.org/2000/svg";

  const state = {
    mode: "served",
    data: null, // the payload shown
    attention: null, // Uint16Array of (L, H, T, T) weights x 65535, or null (the decoder's self-attention)
    causal: true, // a decoder (later tokens masked); false: an encoder
    encoderDecoder: false, // T5's form: a source the encoder reads, a target the decoder writes
    target: null, // the target text sent with the inspection shown (null: the model's own reply)
    stacks: {}, // "self" (always), "cross" and "encoder" (an encoder-decoder's): see stackOf()
    stack: "self", // the stack the heat map shows
    noNext: "", // why the next-token view is missing, when it is
    L: 0, // the decoder's layers
    H: 0,
    T: 0, // tokens (the decoder's)
    S: 0, // source tokens (an encoder-decoder's encoder), else 0
    focus: { layer: 0, head: 0, position: 0, source: 0 },
    busy: 0,
    generation: 0, // bumped by each new inspection: older answers are dropped
    seq: { query_keys: 0, next: 0 }, // the latest request of each partial view
    pending: new Set(),
    timer: null,
    thumbsLayer: "", // the stack and layer whose thumbnails are drawn
    geometry: null, // where the heat map's grid lies
    lensCells: [], // per position: the lens table's cells of that column
    colors: null,
  };

  // ---------------------------------------------------------------- small helpers

  function svgElement(tag, attributes) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attributes || {})) node.setAttribute(name, String(value));
    return node;
  }

  /** A token's text with its whitespace made visible. */
  function visible(text) {
    const value = String(text ?? "");
    if (!value) return "∅";
    return value.replace(/ /g, "·").replace(/\r\n|\n/g, "↵").replace(/\r/g, "␍").replace(/\t/g, "⇥")
      .replace(/[\u0000-\u0008\u000b-\u001f\u007f-\u009f]/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, "0")}`);
  }

  /** Fill ``node`` with ``text``, its `backquoted` parts as <code> (commands and flags). */
  function withCode(node, text) {
    node.replaceChildren();
    String(text).split("`").forEach((part, i) => {
      if (part) node.append(i % 2 ? element("code", "", part) : document.createTextNode(part));
    });
    return node;
  }

  function shorten(text, length) {
    return text.length > length ? `${text.slice(0, length - 1)}…` : text;
  }

  /** A decoder's token (an encoder-decoder's target token) by its index, for the page's words. */
  function tokenLabel(index) {
    const token = state.data.tokens[index];
    const name = `${state.encoderDecoder ? "target " : ""}#${index}`;
    return token ? `${name} «${visible(token.text)}»` : name;
  }

  /** An encoder-decoder's source token (what the encoder reads) by its index. */
  function sourceLabel(index) {
    const token = (state.data.source_tokens || [])[index];
    return token ? `source #${index} «${visible(token.text)}»` : `source #${index}`;
  }

  function vocabText(id) {
    const text = state.data && state.data.vocab ? state.data.vocab[String(id)] : undefined;
    return text === undefined ? `id ${id}` : text;
  }

  function percent(p) {
    if (p === null || p === undefined || !Number.isFinite(p)) return "—";
    if (p === 0) return "0%";
    if (p < 0.0001) return "<0.01%";
    return `${(p * 100).toFixed(p >= 0.1 ? 1 : 2)}%`;
  }

  function fixed(value, digits) {
    return value === null || value === undefined || !Number.isFinite(value) ? "—" : value.toFixed(digits);
  }

  function bytes(count) {
    if (!Number.isFinite(count)) return "?";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let value = count;
    let unit = 0;
    while (value >= 1024 && unit < units.length - 1) {
      value /= 1024;
      unit += 1;
    }
    return unit === 0 ? `${count} B` : `${value.toFixed(value < 10 ? 2 : 1)} ${units[unit]}`;
  }

  function plural(count, word) {
    return `${count} ${word}${count === 1 ? "" : "s"}`;
  }

  function mean(values) {
    const finite = (values || []).filter((v) => Number.isFinite(v));
    return finite.length ? finite.reduce((a, b) => a + b, 0) / finite.length : 0;
  }

  /** A small horizontal bar: ``value`` of ``max`` in a ``width``-pixel track. */
  function bar(value, max, className, width = 110) {
    const svg = svgElement("svg", { width, height: 10, class: `inspect-bar ${className || ""}`, "aria-hidden": "true" });
    svg.append(svgElement("rect", { x: 0, y: 0, width, height: 10, class: "inspect-bar-track" }));
    const share = max > 0 && Number.isFinite(value) ? Math.max(0, Math.min(1, value / max)) : 0;
    const w = share > 0 ? Math.max(1, share * width) : 0;
    svg.append(svgElement("rect", { x: 0, y: 0, width: w, height: 10, class: "inspect-bar-fill" }));
    return svg;
  }

  /** A chip of a token's text (whitespace visible), for lists of tokens. */
  function chip(text, className) {
    const node = element("span", `inspect-chip${className ? ` ${className}` : ""}`, visible(text));
    node.title = JSON.stringify(String(text ?? ""));
    return node;
  }

  // ---------------------------------------------------------------- colours

  function parseColor(value) {
    const text = String(value || "").trim();
    let match = /^#([0-9a-f]{3})$/i.exec(text);
    if (match) return match[1].split("").map((c) => parseInt(c + c, 16));
    match = /^#([0-9a-f]{6})$/i.exec(text);
    if (match) return [0, 2, 4].map((i) => parseInt(match[1].slice(i, i + 2), 16));
    match = /^rgba?\(\s*([\d.]+)[\s,]+([\d.]+)[\s,]+([\d.]+)/i.exec(text);
    if (match) return [1, 2, 3].map((i) => Math.round(Number(match[i])));
    return null;
  }

  function cssColor(name, fallback) {
    const value = getComputedStyle(document.documentElement).getPropertyValue(name);
    return parseColor(value) || parseColor(fallback);
  }

  /** The theme's colours and a lookup table: weight (uint16 >> 4) to RGBA, light to dark on sqrt(weight). */
  function themeColors() {
    const low = cssColor("--inspect-heat-low", "#ffffff");
    const high = cssColor("--inspect-heat", "#2f6fde");
    const colors = {
      low,
      high,
      mask: cssColor("--inspect-mask", "#d9dbe0"),
      text: cssColor("--text", "#1d1f23"),
      muted: cssColor("--muted", "#6b7079"),
      focus: cssColor("--inspect-focus", "#e8590c"),
      lut: new Uint8ClampedArray(4096 * 4),
    };
    for (let i = 0; i < 4096; i++) {
      const t = Math.sqrt(i / 4095);
      for (let c = 0; c < 3; c++) colors.lut[i * 4 + c] = Math.round(low[c] + (high[c] - low[c]) * t);
      colors.lut[i * 4 + 3] = 255;
    }
    return colors;
  }

  const rgb = (color, alpha = 1) => `rgba(${color[0]}, ${color[1]}, ${color[2]}, ${alpha})`;

  // ---------------------------------------------------------------- attention weights

  /** The (L, H, R, C) uint16 weights of a payload's base64 block, checked against its shape. */
  function decodeAttention(attention) {
    if (!attention || typeof attention.data !== "string" || !Array.isArray(attention.shape)) return null;
    const shape = attention.shape.map(Number);
    const count = shape.reduce((a, b) => a * b, 1);
    const binary = atob(attention.data);
    if (binary.length !== count * 2) {
      throw new Error(`an attention block holds ${binary.length} bytes, not the ${count * 2} its shape says`);
    }
    const raw = new Uint8Array(binary.length);
    for (let i = 0; i < binary.length; i++) raw[i] = binary.charCodeAt(i);
    const littleEndian = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;
    if (littleEndian) return new Uint16Array(raw.buffer);
    const view = new DataView(raw.buffer);
    const out = new Uint16Array(count);
    for (let i = 0; i < count; i++) out[i] = view.getUint16(i * 2, true);
    return out;
  }

  /** A stack of attention: {name, weights (Uint16Array or null), L, H, R rows, C columns, masked (causal: cells
   * above the diagonal), rows and columns ("target": the decoder's tokens, "source": the encoder's)}. */
  function stackOf(name = state.stack) {
    return state.stacks[name] || state.stacks.self;
  }

  function tokensOf(kind) {
    return kind === "source" ? state.data.source_tokens || [] : state.data.tokens;
  }

  function labelOf(kind, index) {
    return kind === "source" ? sourceLabel(index) : tokenLabel(index);
  }

  /** The focus row of a stack: the source focus in the encoder's rows, else the decoder's focus token. */
  function focusRow(stack = stackOf()) {
    return stack.rows === "source" ? state.focus.source : state.focus.position;
  }

  function weight(layer, head, row, column, stack = stackOf("self")) {
    return stack.weights[((layer * stack.H + head) * stack.R + row) * stack.C + column] / 65535;
  }

  /** One head's R x C weights of a stack as an image (masked cells, above the diagonal, in the mask colour). */
  function headImage(layer, head, stack = stackOf()) {
    const { R, C } = stack;
    const image = new ImageData(C, R);
    const pixels = image.data;
    const { lut, mask } = state.colors;
    const base = (layer * stack.H + head) * R * C;
    for (let row = 0; row < R; row++) {
      for (let column = 0; column < C; column++) {
        const at = row * C + column;
        const out = at * 4;
        if (stack.masked && column > row) {
          pixels[out] = mask[0];
          pixels[out + 1] = mask[1];
          pixels[out + 2] = mask[2];
          pixels[out + 3] = 255;
        } else {
          const k = (stack.weights[base + at] >> 4) * 4;
          pixels[out] = lut[k];
          pixels[out + 1] = lut[k + 1];
          pixels[out + 2] = lut[k + 2];
          pixels[out + 3] = 255;
        }
      }
    }
    return image;
  }

  // ---------------------------------------------------------------- requests (served mode)

  function setBusy(change) {
    state.busy = Math.max(0, state.busy + change);
    const busy = state.busy > 0;
    document.body.dataset.busy = String(busy);
    $("busy").hidden = !busy;
  }

  async function loadModels() {
    const select = $("model");
    let models = [];
    try {
      models = ((await api("/v1/models")) || {}).data || [];
    } catch (error) {
      showError(`Could not list the models: ${error.message}`);
    }
    select.replaceChildren(...models.map((m) => new Option(m.id, m.id)));
    if (!models.length) select.append(new Option("no model", ""));
    const previous = readStorage(STORAGE.model);
    if (models.some((m) => m.id === previous)) select.value = previous;
  }

  function settings() {
    const out = {};
    for (const [id, field] of SETTINGS) {
      const value = Number($(id).value);
      out[field] = INTEGER.has(field) ? Math.round(value) : value;
    }
    if (!Number.isFinite(out.seed)) out.seed = 0;
    if (!Number.isFinite(out.beams) || out.beams < 1) out.beams = 1;
    return out;
  }

  function requestBody(model, text, views, position, target = null) {
    // query_keys are the decoder's self-attention's: the layer and head of another stack, clamped into it
    const self = state.stacks.self || {}; // none before the first inspection
    const layer = self.L ? Math.min(state.focus.layer, self.L - 1) : state.focus.layer;
    const head = self.H ? Math.min(state.focus.head, self.H - 1) : state.focus.head;
    const body = { text, layer, head, position, ...settings() };
    if (model) body.model = model;
    if (target !== null) body.target = target;
    if (views) body.views = views;
    return body;
  }

  async function post(body) {
    setBusy(+1);
    try {
      const data = await api("/v1/inspect", { method: "POST", body: JSON.stringify(body) });
      clearError();
      return data;
    } catch (error) {
      showError(error.message);
      return null;
    } finally {
      setBusy(-1);
    }
  }

  /** A new inspection of the form's text. */
  async function inspect() {
    if (state.mode !== "served") return;
    const text = $("text").value;
    if (!text) {
      showError("Type a text to inspect.");
      return;
    }
    const model = $("model").value;
    // an encoder-decoder's target: the field shows once such a model was inspected
    const target = !$("target-field").hidden && $("target").value ? $("target").value : null;
    const same = state.data && state.data.model === model;
    if (!same) state.focus = { layer: 0, head: 0, position: 0, source: 0 };
    state.generation += 1;
    const generation = state.generation;
    state.pending.clear();
    clearTimeout(state.timer);
    if (!state.data) document.body.dataset.state = "loading";
    $("inspect").disabled = true;
    try {
      const data = await post(requestBody(model, text, null, null, target));
      if (data && generation === state.generation) {
        state.target = target;
        load(data);
      }
    } catch (error) {
      showError(`Cannot show the inspection: ${error.message}`);
    } finally {
      $("inspect").disabled = false;
      if (!state.data) document.body.dataset.state = "empty";
    }
  }

  /** Ask again for some views at the current focus and settings, ``delay`` ms after the last ask. */
  function refresh(views, delay = 0) {
    if (state.mode !== "served" || !state.data) return;
    for (const view of views) state.pending.add(view);
    if (state.pending.has("next")) $("next-view").dataset.stale = "true";
    clearTimeout(state.timer);
    state.timer = setTimeout(flush, delay);
  }

  async function flush() {
    state.timer = null;
    const views = [...state.pending];
    state.pending.clear();
    if (!views.length || !state.data) return;
    const tickets = {};
    for (const view of views) tickets[view] = ++state.seq[view];
    const generation = state.generation;
    const { model, text } = state.data;
    const data = await post(requestBody(model, text, views, state.focus.position, state.target));
    if (generation !== state.generation) return;
    const fresh = views.filter((view) => tickets[view] === state.seq[view]);
    if (!data) {
      if (fresh.includes("next")) delete $("next-view").dataset.stale;
      return;
    }
    for (const view of fresh) state.data[view] = data[view];
    state.data.vocab = { ...(state.data.vocab || {}), ...(data.vocab || {}) };
    if (data.server) state.data.server = data.server;
    if (fresh.includes("query_keys")) renderQk();
    if (fresh.includes("next")) {
      if (!state.pending.has("next")) delete $("next-view").dataset.stale;
      renderNext();
    }
    renderServer();
  }

  // ---------------------------------------------------------------- loading a payload

  function fillSelect(select, count, selected) {
    select.replaceChildren(...Array.from({ length: count }, (_, i) => new Option(String(i), String(i))));
    select.value = String(selected);
  }

  /** A stack of attention from a payload's block, its shape checked against [L, H, R, C] (null: no block). */
  function readStack(name, block, expected, rows, columns, masked) {
    const weights = decodeAttention(block);
    if (weights) {
      const shape = block.shape.map(Number);
      if (shape.length !== 4 || shape[0] !== expected[0] || shape[2] !== expected[2] || shape[3] !== expected[3]) {
        throw new Error(`the ${name} attention block's shape ${block.shape.join("x")} does not match the model and ` +
          `text (${expected[0]} layers x ${expected[1]} heads x ${expected[2]} x ${expected[3]})`);
      }
      expected = shape;
    }
    if (block) delete block.data; // decoded: the base64 text is not kept twice
    const [L, H, R, C] = expected;
    return { name, weights, L, H, R, C, rows, columns, masked };
  }

  function clampInteger(value, fallback, count) {
    return Math.min(Math.max(Number.isInteger(value) ? value : fallback, 0), Math.max(0, count - 1));
  }

  /** Show a payload (served: an answer of POST /v1/inspect; static: the one in the page). */
  function load(data) {
    if (!data || !Array.isArray(data.tokens) || !data.tokens.length || !data.config) {
      throw new Error("the inspection has no tokens");
    }
    const config = data.config;
    const L = Number(config.layers);
    const H = Number(config.heads);
    const T = data.tokens.length;
    const causal = config.causal !== false; // a decoder; an encoder sees the whole text
    const encoderDecoder = config.encoder_decoder === true;
    const sources = encoderDecoder && Array.isArray(data.source_tokens) ? data.source_tokens : [];
    if (encoderDecoder && !sources.length) throw new Error("the encoder-decoder's inspection has no source tokens");
    const S = sources.length;
    const stacks = { self: readStack("self", data.attention, [L, H, T, T], "target", "target", causal) };
    if (encoderDecoder) {
      const Le = Number(config.encoder_layers ?? (data.encoder_attention ? data.encoder_attention.shape[0] : L));
      if (data.cross_attention) {
        stacks.cross = readStack("cross", data.cross_attention, [L, H, T, S], "target", "source", false);
      }
      if (data.encoder_attention) {
        stacks.encoder = readStack("encoder", data.encoder_attention, [Le, H, S, S], "source", "source", false);
      }
    }
    state.L = L;
    state.H = H;
    state.T = T;
    state.S = S;
    state.causal = causal;
    state.encoderDecoder = encoderDecoder;
    state.stacks = stacks;
    state.attention = stacks.self.weights;
    if (state.mode === "static" && data.focus && data.focus.stack in stacks) state.stack = data.focus.stack;
    if (!(state.stack in stacks)) state.stack = "self";
    data.vocab = data.vocab || {};
    state.data = data;
    const focus = data.focus || {};
    const stack = stackOf();
    state.focus = {
      layer: clampInteger(Number(focus.layer) || 0, 0, stack.L),
      head: clampInteger(Number(focus.head) || 0, 0, stack.H),
      position: clampInteger(focus.position, T - 1, T),
      source: clampInteger(focus.source, S - 1, S),
    };
    state.thumbsLayer = "";
    fillStacks();
    fillSelect($("layer"), stack.L, state.focus.layer);
    fillSelect($("head"), stack.H, state.focus.head);
    setSettings(data.next || focus);
    $("source").textContent = `${data.model}${state.mode === "static" ? " · saved inspection" : ""}`;
    const layers = encoderDecoder
      ? `${plural(Number(config.encoder_layers ?? stacks.encoder?.L ?? 0), "encoder layer")} + ${plural(L, "decoder layer")}`
      : plural(L, "layer");
    $("config").textContent = `${layers} · ${H} heads (${config.kv_heads} key/value) · ` +
      `head size ${config.head_dim} · width ${config.dim} · vocabulary ${config.vocab_size}`;
    if (state.mode === "served") $("target-field").hidden = !encoderDecoder;
    $("intro").hidden = true;
    $("views").hidden = false;
    document.body.dataset.state = "shown";
    delete $("next-view").dataset.stale;
    renderAll();
  }

  const STACK_NAMES = {
    self: "decoder self-attention",
    cross: "cross-attention: decoder → source",
    encoder: "encoder self-attention",
  };

  /** The #stack select: the stacks this payload has (hidden with only one). */
  function fillStacks() {
    const select = $("stack");
    const names = Object.keys(state.stacks);
    select.replaceChildren(...names.map((name) => new Option(STACK_NAMES[name], name)));
    select.value = state.stack;
    $("stack-label").hidden = names.length < 2;
  }

  /** Show another stack: its layers in the select (the chosen layer kept where it exists, else clamped). */
  function setStack(name) {
    if (!state.data || !(name in state.stacks)) {
      $("stack").value = state.stack;
      return;
    }
    if (name === state.stack) return;
    state.stack = name;
    const stack = stackOf();
    state.focus.layer = Math.min(state.focus.layer, stack.L - 1);
    state.focus.head = Math.min(state.focus.head, stack.H - 1);
    fillSelect($("layer"), stack.L, state.focus.layer);
    fillSelect($("head"), stack.H, state.focus.head);
    $("stack").value = name;
    renderFocus();
    if (name === "self" && !qkExact()) refresh(["query_keys"], 60);
  }

  function setSettings(values) {
    for (const [id, field] of SETTINGS) {
      if (values[field] === undefined || values[field] === null) continue;
      $(id).value = String(values[field]);
    }
    showSettings(values);
  }

  /** The value beside each slider (static mode: the saved values, which a slider may not reach). */
  function showSettings(values) {
    for (const [id, field, read] of SETTINGS) {
      const output = $(`${id}-value`);
      if (!output) continue;
      const value = values && values[field] !== undefined && values[field] !== null ? Number(values[field]) : Number($(id).value);
      output.textContent = read(value);
    }
  }

  // ---------------------------------------------------------------- focus

  /** Change the focus: layer and head (of the stack shown), the decoder's token (position; its views are
   * fetched again in served mode) and an encoder-decoder's source token (source; nothing to fetch). */
  function setFocus(change) {
    if (!state.data) return;
    const stack = stackOf();
    const before = { ...state.focus };
    const next = { ...state.focus, ...change };
    if (!Number.isInteger(next.layer) || next.layer < 0 || next.layer >= stack.L) next.layer = before.layer;
    if (!Number.isInteger(next.head) || next.head < 0 || next.head >= stack.H) next.head = before.head;
    if (!Number.isInteger(next.position) || next.position < 0 || next.position >= state.T) next.position = before.position;
    if (!Number.isInteger(next.source) || next.source < 0 || next.source >= state.S) next.source = before.source;
    const moved = next.position !== before.position;
    const turned = next.layer !== before.layer || next.head !== before.head;
    if (!moved && !turned && next.source === before.source) {
      $("layer").value = String(before.layer); // a value the select does not hold reads back as none
      $("head").value = String(before.head);
      return;
    }
    state.focus = next;
    renderFocus();
    // the scores are the decoder's self-attention's: another stack's layer or head asks for none
    const views = moved ? ["query_keys", "next"] : turned && state.stack === "self" ? ["query_keys"] : [];
    if (views.length) refresh(views, moved ? 120 : 60);
  }

  /** The focus row of the stack shown, one step up or down. */
  function stepFocus(step) {
    if (stackOf().rows === "source") setFocus({ source: state.focus.source + step });
    else setFocus({ position: state.focus.position + step });
  }

  /** A source token looked at: the encoder's view, at that row. */
  function focusSource(index) {
    setFocus({ source: index });
    if (state.stacks.encoder) setStack("encoder");
  }

  // ---------------------------------------------------------------- rendering

  /** The words that differ between a decoder and an encoder, and why a view may be missing. */
  function describeModel() {
    const data = state.data;
    $("next-title").textContent = data.predicts === "masked" ? "The token at a position (masked LM)" : "Next token";
    const noLogits = "This model gives no token probabilities (an embedder or a reward model has no output layer " +
      "over the vocabulary).";
    $("lens-missing").textContent = data.predicts ? "This inspection has no logit lens (its views left it out)." : noLogits;
    $("kv-missing").textContent = state.encoderDecoder
      ? "The KV cache is not shown for an encoder-decoder yet (its decoder keeps one for its own tokens and one " +
        "for the encoder's output)."
      : state.causal ? "This inspection has no KV cache view (its views left it out)."
        : "An encoder reads the whole text in one pass: it keeps no KV cache.";
    state.noNext = data.predicts ? "This inspection has no next-token view (its views left it out)." : noLogits;
  }

  function renderAll() {
    describeModel();
    state.colors = themeColors();
    renderTokens();
    renderLens();
    renderKv();
    renderNext();
    renderFocus(); // and the residual stream, whose second half is at the focus token
  }

  /** What the heat map's rows and columns are, for the stack shown. */
  function explainStack() {
    const name = stackOf().name;
    let text;
    if (name === "cross") {
      text = "Cross-attention: each row is a target token (the decoder's query) looking at the source, the tokens the " +
        "encoder read (keys and values from the encoder's output): how it spreads its attention over them (the row " +
        "sums to 1). Nothing is masked: every target token sees the whole source. Darker is more attention. Click a " +
        "row to look at that target token.";
    } else if (name === "encoder") {
      text = "The encoder's self-attention: each row is a source token looking at the whole source (an encoder sees " +
        "both sides, nothing is masked): how it spreads its attention (the row sums to 1). Darker is more attention. " +
        "Click a row to look at that source token.";
    } else if (state.causal) {
      text = `Each row is a ${state.encoderDecoder ? "target token (the decoder's) looking back at the target" :
        "token looking back at the text"}: how it spreads its attention over the tokens it may see (the row sums ` +
        "to 1). Darker is more attention; grey cells are masked, since a token cannot see the tokens after it. " +
        "Click a row to look at that token.";
    } else {
      text = "Each row is a token looking at the whole text (an encoder sees both sides, nothing is masked): how it " +
        "spreads its attention (the row sums to 1). Darker is more attention. Click a row to look at that token.";
    }
    $("attention-explain").textContent = text;
  }

  function renderFocus() {
    const { layer, head, position, source } = state.focus;
    const onSource = stackOf().rows === "source";
    $("stack").value = state.stack;
    $("layer").value = String(layer);
    $("head").value = String(head);
    $("position").textContent = onSource ? sourceLabel(source) : tokenLabel(position);
    $("position-prev").disabled = onSource ? source <= 0 : position <= 0;
    $("position-next").disabled = onSource ? source >= state.S - 1 : position >= state.T - 1;
    const mark = (holder, index) => {
      for (const node of holder.children) {
        const focused = Number(node.dataset.index) === index;
        node.classList.toggle("inspect-focus", focused);
        node.setAttribute("aria-pressed", String(focused));
      }
    };
    mark($("token-chips"), position);
    mark($("source-chips"), source);
    explainStack();
    drawThumbnails();
    drawHeatmap();
    renderQk();
    focusLens();
    renderResidual();
    renderNextNote();
  }

  // ---- tokens

  /** One token's chip: ``kind`` "target" (the decoder's; a click sets the focus) or "source" (the encoder's). */
  function tokenChip(token, kind) {
    const node = element("button", `inspect-token ${token.index % 2 ? "inspect-token-b" : "inspect-token-a"}`);
    node.type = "button";
    node.setAttribute("data-testid", kind === "source" ? "source-token" : "token");
    node.dataset.index = String(token.index);
    if (token.special) node.classList.add("inspect-token-special");
    const size = token.end - token.start;
    const name = `${kind === "source" ? "source " : state.encoderDecoder ? "target " : ""}#${token.index}`;
    node.title = token.special
      ? `${name}: the special token ${token.text} (id ${token.id}); it covers no bytes of the text`
      : `${name}: id ${token.id}, bytes ${token.start}–${token.end} of the text (${plural(size, "byte")})\n` +
        JSON.stringify(token.text);
    if (kind === "source") node.title += "\nClick: the encoder's self-attention, at this token";
    node.append(element("span", "inspect-token-text", token.special ? token.text : visible(token.text)),
      element("span", "inspect-token-id", token.id));
    node.addEventListener("click", () => {
      if (kind === "source") {
        focusSource(token.index);
        return;
      }
      setFocus({ position: token.index });
      if (state.stack === "encoder") setStack("self"); // the encoder's rows are the source's: the decoder's view
    });
    return node;
  }

  function renderTokens() {
    const { tokens, count } = state.data;
    const sources = state.encoderDecoder ? state.data.source_tokens || [] : [];
    $("token-chips").replaceChildren(...tokens.map((token) => tokenChip(token, "target")));
    $("source-chips").replaceChildren(...sources.map((token) => tokenChip(token, "source")));
    $("source-tokens").hidden = !state.encoderDecoder;
    $("target-heading").hidden = !state.encoderDecoder;
    $("source-heading").textContent = `Source (the encoder reads) · ${plural(sources.length, "token")}`;
    $("target-heading").textContent = `Target (the decoder writes) · ${plural(tokens.length, "token")}`;
    if (count) {
      const perToken = Number(count.bytes_per_token);
      $("token-count").textContent = (state.encoderDecoder ? "The source text: " : "") + [plural(count.tokens, "token"),
        plural(count.characters, "character"), plural(count.bytes, "byte"), plural(count.words, "word"),
        `${Number.isFinite(perToken) ? perToken.toFixed(2) : "?"} bytes per token`].join(" · ");
    }
  }

  // ---- attention

  function drawThumbnails() {
    const holder = $("heads");
    const stack = stackOf();
    const missing = !stack.weights;
    holder.hidden = missing;
    if (missing) return;
    const { layer, head } = state.focus;
    const key = `${stack.name}:${layer}`;
    if (state.thumbsLayer !== key || holder.childElementCount !== stack.H) {
      holder.replaceChildren();
      const where = stack.name === "self" ? "" : `${STACK_NAMES[stack.name]}, `;
      for (let h = 0; h < stack.H; h++) {
        const button = element("button", "inspect-thumb");
        button.type = "button";
        button.setAttribute("data-testid", "head-thumb");
        button.dataset.head = String(h);
        button.title = `${where}layer ${layer}, head ${h}`;
        const canvas = element("canvas", "inspect-thumb-canvas");
        canvas.width = stack.C;
        canvas.height = stack.R;
        canvas.getContext("2d").putImageData(headImage(layer, h, stack), 0, 0);
        button.append(canvas, element("span", "inspect-thumb-label", `head ${h}`));
        button.addEventListener("click", () => setFocus({ head: h }));
        holder.append(button);
      }
      state.thumbsLayer = key;
    }
    for (const button of holder.children) button.setAttribute("aria-pressed", String(Number(button.dataset.head) === head));
  }

  function drawHeatmap() {
    const canvas = $("heatmap");
    const stack = stackOf();
    const missing = !stack.weights;
    $("attention-missing").hidden = !missing;
    $("heatmap-wrap").hidden = missing;
    if (missing) return;
    const { layer, head } = state.focus;
    const position = focusRow(stack);
    const { R, C } = stack;
    const context = canvas.getContext("2d");
    const label = (t) => shorten(t.special ? t.text : visible(t.text), 10);
    const rowLabels = tokensOf(stack.rows).map(label);
    const columnLabels = tokensOf(stack.columns).map(label);
    const available = Math.max(260, Math.min(($("heatmap-wrap").clientWidth || 700) - 4, 980));

    let font = 11;
    const margin = () => {
      context.font = `${font}px system-ui, sans-serif`;
      return Math.min(96, Math.ceil(Math.max(...rowLabels.map((l) => context.measureText(l).width),
        ...columnLabels.map((l) => context.measureText(l).width))) + 10);
    };
    let edge = margin();
    let cell = Math.max(2, Math.min(28, Math.floor((available - edge - 8) / C)));
    if (cell < 12) {
      font = Math.max(7, Math.min(11, cell - 1));
      edge = margin();
      cell = Math.max(2, Math.min(28, Math.floor((available - edge - 8) / C)));
    }
    const every = cell >= 7 ? 1 : Math.ceil(8 / cell);
    const x0 = edge;
    const y0 = edge;
    const across = C * cell;
    const down = R * cell;
    const width = x0 + across + 8;
    const height = y0 + down + 8;
    const ratio = window.devicePixelRatio || 1;
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    canvas.style.width = `${width}px`;
    canvas.style.height = `${height}px`;
    context.setTransform(ratio, 0, 0, ratio, 0, 0);
    context.clearRect(0, 0, width, height);

    const image = document.createElement("canvas");
    image.width = C;
    image.height = R;
    image.getContext("2d").putImageData(headImage(layer, head, stack), 0, 0);
    context.imageSmoothingEnabled = false;
    context.drawImage(image, x0, y0, across, down);

    // the column of the source focus, where the columns are the source (cross-attention, the encoder)
    const focusColumn = stack.columns === "source" ? state.focus.source : -1;
    context.textBaseline = "middle";
    for (let i = 0; i < R; i++) {
      if (i % every !== 0 && i !== position) continue;
      const focused = i === position;
      context.fillStyle = rgb(focused ? state.colors.focus : state.colors.text);
      context.font = `${focused ? "bold " : ""}${font}px system-ui, sans-serif`;
      context.textAlign = "right";
      context.fillText(rowLabels[i], x0 - 4, y0 + i * cell + cell / 2, edge - 6);
    }
    for (let j = 0; j < C; j++) {
      const focused = j === focusColumn;
      if (j % every !== 0 && !focused) continue;
      context.save();
      context.translate(x0 + j * cell + cell / 2, y0 - 4);
      context.rotate(-Math.PI / 2);
      context.textAlign = "left";
      context.fillStyle = rgb(focused ? state.colors.focus : state.colors.text);
      context.font = `${focused ? "bold " : ""}${font}px system-ui, sans-serif`;
      context.fillText(columnLabels[j], 0, 0, edge - 6);
      context.restore();
    }
    // the focus row
    context.strokeStyle = rgb(state.colors.focus);
    context.lineWidth = 2;
    context.strokeRect(x0 - 1, y0 + position * cell - 1, across + 2, cell + 2);

    state.geometry = { x0, y0, cell, R, C };
    Object.assign(canvas.dataset, {
      stack: stack.name, layer: String(layer), head: String(head), position: String(position),
      rows: String(R), columns: String(C),
      x0: String(x0), y0: String(y0), cell: String(cell), ratio: String(ratio),
    });
    canvas.setAttribute("aria-label", `${STACK_NAMES[stack.name] || "Attention"} weights of layer ${layer}, head ` +
      `${head}: rows are queries (${stack.rows === "source" ? "source" : state.encoderDecoder ? "target" : "the"} ` +
      `tokens), columns keys (${stack.columns === "source" ? "source" : state.encoderDecoder ? "target" : "the"} tokens)`);
    canvas.title = "";
  }

  function cellAt(event) {
    const geometry = state.geometry;
    if (!geometry || !stackOf().weights) return null;
    const box = $("heatmap").getBoundingClientRect();
    const x = event.clientX - box.left;
    const y = event.clientY - box.top;
    const row = Math.floor((y - geometry.y0) / geometry.cell);
    const column = Math.floor((x - geometry.x0) / geometry.cell);
    if (row < 0 || row >= geometry.R) return null;
    return { row, column: column >= 0 && column < geometry.C && x >= geometry.x0 ? column : null, x, y };
  }

  function hoverHeatmap(event) {
    const tip = $("heatmap-tip");
    const at = cellAt(event);
    if (!at || at.column === null) {
      tip.hidden = true;
      return;
    }
    const { layer, head } = state.focus;
    const stack = stackOf();
    const pair = `${labelOf(stack.rows, at.row)} → ${labelOf(stack.columns, at.column)}`;
    tip.textContent = stack.masked && at.column > at.row
      ? `${pair}: masked (a token cannot see later tokens)`
      : `${pair}: ${weight(layer, head, at.row, at.column, stack).toFixed(4)}`;
    const canvas = $("heatmap");
    tip.style.left = `${canvas.offsetLeft + at.x + 14}px`;
    tip.style.top = `${canvas.offsetTop + at.y + 14}px`;
    tip.hidden = false;
  }

  // ---- query . key

  /** Whether the query·key data at hand is the focus's (the decoder's self-attention, its layer, head, token). */
  function qkExact() {
    const qk = state.data && state.data.query_keys;
    const { layer, head, position } = state.focus;
    return Boolean(qk && qk.layer === layer && qk.head === head && qk.position === position);
  }

  function renderQk() {
    const section = $("qk-view");
    const stack = stackOf();
    if (stack.name !== "self") {
      renderStackQk(stack);
      return;
    }
    const rows = $("qk-rows");
    const vectors = $("qk-vectors");
    const { layer, head, position } = state.focus;
    const qk = state.data.query_keys;
    const exact = qkExact();
    Object.assign(section.dataset, { stack: "self", layer: String(layer), head: String(head), position: String(position) });
    section.dataset.source = exact ? "server" : state.attention ? "attention" : "none";
    rows.replaceChildren();
    vectors.replaceChildren();
    const config = state.data.config;
    const d = exact ? qk.query.length : Number(config.head_dim);
    const scale = exact ? qk.scale : 1 / Math.sqrt(d);
    const group = state.H / Number(config.kv_heads || state.H);
    const kvHead = exact ? qk.kv_head : Math.floor(head / group);
    $("qk-formula").textContent = `weights = softmax(q·k / √d): d = ${d}, so each dot product is multiplied by ` +
      `1/√${d} = ${fixed(scale, 4)}. ${state.encoderDecoder ? "The decoder's self-attention, layer" : "Layer"} ` +
      `${layer}, head ${head}` +
      (group > 1 ? ` (it shares key/value head ${kvHead} with ${group - 1} other query head${group > 2 ? "s" : ""})` : "") +
      `; the query of ${tokenLabel(position)}.`;

    const keys = [];
    if (exact) {
      qk.scores.forEach((score, j) => {
        if (score !== null) keys.push({ index: j, score, weight: qk.weights[j] });
      });
    } else if (state.attention) {
      const seen = state.causal ? position + 1 : state.T; // an encoder's token sees the whole text
      for (let j = 0; j < seen; j++) keys.push({ index: j, score: null, weight: weight(layer, head, position, j) });
    }
    const masked = state.T - keys.length;
    let note = `${plural(keys.length, "key")} it may see`;
    if (masked > 0) note += `; ${plural(masked, "token")} after it ${masked === 1 ? "is" : "are"} masked`;
    if (!exact) {
      note += state.mode === "served"
        ? ". Fetching the scores…"
        : `. Only the weights are saved for this head and token (from the heat map); the scores were saved for layer ` +
          `${qk ? qk.layer : "?"}, head ${qk ? qk.head : "?"}, token #${qk ? qk.position : "?"}. Other scores need ` +
          "`lmforge serve` or `lmforge inspect --layer --head --position`.";
    }
    withCode($("qk-note"), `${note}${note.endsWith(".") || note.endsWith("…") ? "" : "."}`);
    if (!keys.length) return;
    qkRows(keys, "target", true);
    if (exact) {
      vectors.append(vectorStrip("query q", qk.query), vectorStrip("output = Σ weight × value", qk.output));
    }
  }

  /** An encoder-decoder's cross-attention or encoder self-attention: the focus row's keys (source tokens) and
   * their weights, from the stack's block (no scores: those are the decoder's self-attention's only). */
  function renderStackQk(stack) {
    const section = $("qk-view");
    const { layer, head } = state.focus;
    const row = focusRow(stack);
    Object.assign(section.dataset, { stack: stack.name, layer: String(layer), head: String(head), position: String(row) });
    section.dataset.source = stack.weights ? "attention" : "none";
    $("qk-rows").replaceChildren();
    $("qk-vectors").replaceChildren();
    const scores = state.mode === "served" ? "fetched" : "saved";
    if (stack.name === "cross") {
      $("qk-formula").textContent = `Cross-attention, layer ${layer}, head ${head}: the query of ${tokenLabel(row)} ` +
        "comes from the decoder, the keys (and values) from the encoder's output, one per source token; " +
        "weights = softmax(q·k), with no position term: every target token sees the whole source.";
    } else {
      $("qk-formula").textContent = `The encoder's self-attention, layer ${layer}, head ${head}: the query of ` +
        `${sourceLabel(row)} against the key of every source token, both sides (nothing is masked).`;
    }
    const keys = [];
    if (stack.weights) {
      for (let j = 0; j < stack.C; j++) keys.push({ index: j, score: null, weight: weight(layer, head, row, j, stack) });
    }
    withCode($("qk-note"), `${plural(keys.length, "key")} it sees, every source token. Only the weights are shown ` +
      `here (from the heat map): q·k scores are ${scores} for the decoder's self-attention only.`);
    if (keys.length) qkRows(keys, "source", false);
  }

  /** The rows of keys: token (``kind``: "target" or "source"), score and weight. */
  function qkRows(keys, kind, withScores) {
    const rows = $("qk-rows");
    const header = element("div", "inspect-qk-row inspect-qk-header");
    header.setAttribute("role", "row");
    for (const text of ["key", withScores ? "score = q·k / √d" : "", "", "weight (bar: of the largest)", ""]) {
      header.append(element("span", "", text));
    }
    rows.append(header);
    const maxScore = Math.max(1e-9, ...keys.map((k) => (k.score === null ? 0 : Math.abs(k.score))));
    const maxWeight = Math.max(1e-9, ...keys.map((k) => k.weight));
    const tokens = tokensOf(kind);
    for (const key of keys) {
      const row = element("div", "inspect-qk-row");
      row.setAttribute("role", "row");
      row.setAttribute("data-testid", "qk-key");
      row.dataset.index = String(key.index);
      const token = tokens[key.index];
      const name = element("button", "inspect-qk-token");
      name.type = "button";
      name.title = `Look at ${labelOf(kind, key.index)}`;
      name.append(element("span", "inspect-qk-index", `${kind === "source" ? "source " : ""}#${key.index}`),
        chip(token ? token.text : "", token && token.special ? "inspect-chip-special" : ""));
      name.addEventListener("click", () => (kind === "source" ? focusSource(key.index)
        : setFocus({ position: key.index })));
      const scoreBar = element("span", withScores ? "inspect-diverging" : ""); // none: no track either
      if (key.score !== null) {
        const fill = element("span", `inspect-diverging-fill ${key.score < 0 ? "inspect-negative" : ""}`);
        const share = Math.min(1, Math.abs(key.score) / maxScore) * 50;
        fill.style.width = `${share}%`;
        fill.style.left = key.score < 0 ? `${50 - share}%` : "50%";
        scoreBar.append(fill);
      }
      const score = key.score !== null ? key.score.toFixed(3) : withScores ? "—" : "";
      row.append(name, scoreBar, element("span", "inspect-number", score),
        bar(key.weight, maxWeight, "inspect-weight", 140), element("span", "inspect-number", key.weight.toFixed(4)));
      rows.append(row);
    }
  }

  /** A vector as a strip of cells coloured by sign and size, with its norm. */
  function vectorStrip(name, values) {
    const holder = element("div", "inspect-vector");
    const norm = Math.sqrt(values.reduce((sum, v) => sum + (v || 0) * (v || 0), 0));
    holder.append(element("span", "inspect-vector-name", `${name} (${values.length} numbers, norm ${norm.toFixed(3)})`));
    const max = Math.max(1e-9, ...values.map((v) => Math.abs(v || 0)));
    const width = Math.max(2, Math.min(8, Math.floor(480 / Math.max(1, values.length))));
    const svg = svgElement("svg", { width: values.length * width, height: 14, class: "inspect-vector-strip" });
    values.forEach((v, i) => {
      const rect = svgElement("rect", { x: i * width, y: 0, width, height: 14, class: v < 0 ? "inspect-negative" : "inspect-positive" });
      rect.setAttribute("fill-opacity", String(Math.abs(v || 0) / max));
      const title = svgElement("title");
      title.textContent = `${i}: ${fixed(v, 4)}`;
      rect.append(title);
      svg.append(rect);
    });
    holder.append(svg);
    return holder;
  }

  // ---- next token

  function renderNextNote() {
    const next = state.data.next;
    const note = $("next-note");
    const section = $("next-view");
    if (!next) {
      note.textContent = state.noNext;
      section.dataset.position = "";
      return;
    }
    section.dataset.position = String(next.position);
    if (next.position === state.focus.position) {
      note.textContent = state.data.predicts === "masked"
        ? `At ${tokenLabel(next.position)}, what the masked-LM puts there (mask that token in the text to ask it):`
        : `After ${tokenLabel(next.position)}, the model's next token:`;
    } else if (state.mode === "served") {
      note.textContent = `Fetching the next token after ${tokenLabel(state.focus.position)}… (below: after ${tokenLabel(next.position)})`;
    } else {
      withCode(note, `Below: the next token after ${tokenLabel(next.position)}, the token saved in this file. After ` +
        "another token needs `lmforge serve` or `lmforge inspect --position N`.");
    }
  }

  function renderNext() {
    const next = state.data.next;
    renderNextNote();
    const summary = $("next-summary");
    const list = $("candidates");
    const choices = $("choices");
    summary.replaceChildren();
    list.replaceChildren();
    choices.replaceChildren();
    $("controls").hidden = !next;
    if (!next) return;
    if (state.mode === "static") showSettings(next);

    const kept = element("strong", "inspect-kept", next.kept);
    kept.id = "kept";
    kept.setAttribute("data-testid", "kept");
    summary.append(kept, ` of ${state.data.config.vocab_size} tokens kept, holding ${percent(next.kept_mass)} of the ` +
      `model's probability · entropy ${fixed(next.entropy, 2)} nats before the settings → ${fixed(next.final_entropy, 2)} after`);

    const header = element("div", "inspect-candidate inspect-candidate-header");
    header.setAttribute("role", "row");
    for (const text of ["token", "id", "logit", "model", "", "after the settings", ""]) header.append(element("span", "", text));
    list.append(header);
    for (const candidate of next.candidates || []) {
      const row = element("div", `inspect-candidate${candidate.kept ? " inspect-kept-row" : ""}`);
      row.setAttribute("role", "row");
      row.setAttribute("data-testid", "candidate");
      row.dataset.kept = String(Boolean(candidate.kept));
      row.dataset.id = String(candidate.id);
      row.append(chip(candidate.text), element("span", "inspect-number inspect-muted", candidate.id),
        element("span", "inspect-number", fixed(candidate.logit, 3)),
        bar(candidate.probability, 1, "inspect-model-bar"), element("span", "inspect-number", percent(candidate.probability)),
        bar(candidate.final, 1, "inspect-final-bar"), element("span", "inspect-number", percent(candidate.final)));
      row.title = candidate.kept ? "kept: sampling may draw it" : "dropped by the settings: sampling never draws it";
      list.append(row);
    }

    const sequence = (tokens) => {
      const holder = element("span", "inspect-sequence");
      if (!tokens || !tokens.length) holder.append(element("span", "inspect-muted", "(none: the context is full)"));
      for (const token of tokens || []) holder.append(chip(token.text));
      return holder;
    };
    const add = (term, ...details) => {
      const dd = element("dd");
      dd.append(...details);
      choices.append(element("dt", "", term), dd);
    };
    add("Greedy takes", chip(next.greedy.text), element("span", "inspect-muted", " the likeliest (after the penalty)"));
    add(`A draw with seed ${next.seed}`, next.sampled ? chip(next.sampled.text)
      : element("span", "inspect-muted", "none: temperature 0 is greedy, there is no draw"));
    const same = JSON.stringify((next.beam || []).map((t) => t.id)) === JSON.stringify((next.greedy_run || []).map((t) => t.id));
    add(`Beam search, ${plural(next.beams, "beam")}`, sequence(next.beam));
    add("Greedy, as many tokens", sequence(next.greedy_run),
      element("span", "inspect-muted", same ? " the same as the beam's" : " differs from the beam's"));
  }

  // ---- logit lens

  function renderLens() {
    const lens = state.data.lens;
    const table = $("lens-table");
    table.replaceChildren();
    state.lensCells = [];
    $("lens-missing").hidden = Boolean(lens);
    $("lens-wrap").hidden = !lens;
    if (!lens) return;
    const { tokens } = state.data;
    const rows = lens.ids.length;
    const head = element("thead");
    const headRow = element("tr");
    headRow.append(element("th", "inspect-lens-corner", "layer ╲ token"));
    for (const token of tokens) {
      const th = element("th", "inspect-lens-token", shorten(token.special ? token.text : visible(token.text), 8));
      th.title = `${tokenLabel(token.index)}: click to look at it`;
      th.dataset.index = String(token.index);
      th.addEventListener("click", () => setFocus({ position: token.index }));
      headRow.append(th);
      state.lensCells[token.index] = [th];
    }
    head.append(headRow);
    const body = element("tbody");
    const high = state.colors.high;
    for (let r = 0; r < rows; r++) {
      const tr = element("tr");
      const name = r === 0 ? "embed" : r === rows - 1 ? `${r - 1} · output` : String(r - 1);
      const th = element("th", "inspect-lens-layer", name);
      th.title = r === 0 ? "the token embeddings, before any layer" : r === rows - 1
        ? `after layer ${r - 1}, the last: the model's own prediction` : `after layer ${r - 1}`;
      tr.append(th);
      for (let p = 0; p < tokens.length; p++) {
        const ids = lens.ids[r][p];
        const probs = lens.probs[r][p];
        const top = probs[0] ?? 0;
        const td = element("td", `inspect-lens-cell${top > 0.5 ? " inspect-strong" : ""}`,
          shorten(visible(vocabText(ids[0])), 8));
        td.style.background = rgb(high, Math.max(0, Math.min(1, top)));
        td.title = `${r === 0 ? "embeddings" : `after layer ${r - 1}`}, ${tokenLabel(p)} → next:\n` +
          ids.map((id, k) => `${JSON.stringify(vocabText(id))} ${percent(probs[k])}`).join("\n");
        td.addEventListener("click", () => setFocus({ position: p }));
        tr.append(td);
        state.lensCells[p].push(td);
      }
      body.append(tr);
    }
    table.append(head, body);
    if (rows === state.L + 1) table.dataset.rows = String(rows);
  }

  function focusLens() {
    for (const [index, cells] of state.lensCells.entries()) {
      const focused = index === state.focus.position;
      for (const cell of cells || []) cell.classList.toggle("inspect-focus-column", focused);
    }
  }

  // ---- residual stream

  function renderResidual() {
    const residual = state.data.residual;
    const table = $("residual-table");
    table.replaceChildren();
    $("residual-missing").hidden = Boolean(residual);
    table.hidden = !residual;
    if (!residual) return;
    const p = state.focus.position;
    const L = residual.attention.length;
    const meanStream = residual.stream.map(mean);
    const meanAttention = residual.attention.map(mean);
    const meanFfn = residual.ffn.map(mean);
    const at = (rows, i) => (rows[i] ? rows[i][p] : null);
    const maxStream = Math.max(...meanStream, ...residual.stream.map((row) => row[p] || 0));
    const maxAdd = Math.max(...meanAttention, ...meanFfn, ...residual.attention.map((row) => row[p] || 0),
      ...residual.ffn.map((row) => row[p] || 0));

    const head = element("thead");
    const groups = element("tr");
    const mean3 = element("th", "inspect-group", "mean over the tokens");
    const focus3 = element("th", "inspect-group", `at ${tokenLabel(p)}`);
    mean3.colSpan = 3;
    focus3.colSpan = 3;
    groups.append(element("th"), mean3, focus3);
    const names = element("tr");
    for (const text of ["", "stream entering", "attention adds", "feed-forward adds", "stream entering", "attention adds",
      "feed-forward adds"]) names.append(element("th", "", text));
    head.append(groups, names);
    const body = element("tbody");
    const cell = (value, max, className) => {
      const td = element("td", "inspect-residual-cell");
      if (value === null || value === undefined) return td;
      td.append(bar(value, max, className, 90), element("span", "inspect-number", fixed(value, 2)));
      return td;
    };
    for (let i = 0; i <= L; i++) {
      const tr = element("tr");
      tr.append(element("th", "", i < L ? `layer ${i}` : "output"));
      tr.append(cell(meanStream[i], maxStream, "inspect-stream-bar"),
        cell(i < L ? meanAttention[i] : null, maxAdd, "inspect-attention-bar"),
        cell(i < L ? meanFfn[i] : null, maxAdd, "inspect-ffn-bar"),
        cell(at(residual.stream, i), maxStream, "inspect-stream-bar"),
        cell(i < L ? at(residual.attention, i) : null, maxAdd, "inspect-attention-bar"),
        cell(i < L ? at(residual.ffn, i) : null, maxAdd, "inspect-ffn-bar"));
      if (i === L) tr.title = "the stream after the last layer, before the final norm";
      body.append(tr);
    }
    table.append(head, body);
  }

  // ---- KV cache

  function renderKv() {
    const kv = state.data.kv;
    const facts = $("kv-facts");
    facts.replaceChildren();
    $("kv-chart").replaceChildren();
    $("kv-layers").replaceChildren();
    $("kv-missing").hidden = Boolean(kv);
    for (const node of $("kv-view").querySelectorAll(".inspect-kv-charts, .inspect-kv-facts")) node.hidden = !kv;
    renderServer();
    if (!kv) return;
    const fact = (term, text, title) => {
      const dd = element("dd", "", text);
      if (title) dd.title = title;
      facts.append(element("dt", "", term), dd);
    };
    const element_size = kv.bytes_per_token_layer / (2 * kv.kv_heads * kv.head_dim);
    fact("One token, one layer", `${bytes(kv.bytes_per_token_layer)} = 2 (key and value) × ${kv.kv_heads} key/value ` +
      `heads × ${kv.head_dim} numbers × ${element_size} bytes (${kv.dtype})`);
    fact("One token, all layers", `${bytes(kv.bytes_per_token)} (× ${kv.layers} layers)`, `${kv.bytes_per_token} bytes`);
    if (kv.kv_heads < kv.heads) {
      fact("With one key/value head per query head (MHA)", `${bytes(kv.multi_head_bytes_per_token)} per token: sharing ` +
        `${kv.kv_heads} key/value heads among ${kv.heads} query heads (${kv.kv_heads === 1 ? "MQA" : "GQA"}) stores ` +
        `${(kv.heads / kv.kv_heads).toFixed(kv.heads % kv.kv_heads ? 1 : 0)}× less`);
    }
    fact("Allocated cache", `${bytes(kv.allocated_bytes)} for ${kv.max_positions} positions (a static cache, allocated ` +
      "for the longest sequence before decoding starts)", `${kv.allocated_bytes} bytes`);
    const steps = kv.steps || [];
    if (steps.length) {
      const last = steps[steps.length - 1];
      fact("After the decode", `${bytes(last.bytes)} for ${plural(last.tokens, "token")} (the text, then ` +
        `${plural(steps.length - 1, "generated token")})`, `${last.bytes} bytes`);
      $("kv-chart").append(kvChart(steps));
    }
    if ((kv.per_layer_bytes || []).length) $("kv-layers").append(layerBars(kv.per_layer_bytes));
  }

  function kvChart(steps) {
    const width = 320;
    const height = 150;
    const left = 58;
    const bottom = 22;
    const svg = svgElement("svg", { width, height, class: "inspect-chart", role: "img",
      "aria-label": "bytes of the KV cache against tokens" });
    const xs = steps.map((s) => s.tokens);
    const ys = steps.map((s) => s.bytes);
    const x0 = Math.min(...xs);
    const x1 = Math.max(...xs, x0 + 1);
    const y1 = Math.max(...ys, 1);
    const x = (v) => left + ((v - x0) / (x1 - x0)) * (width - left - 10);
    const y = (v) => height - bottom - (v / y1) * (height - bottom - 10);
    svg.append(svgElement("line", { x1: left, y1: height - bottom, x2: width - 6, y2: height - bottom, class: "inspect-axis" }),
      svgElement("line", { x1: left, y1: 6, x2: left, y2: height - bottom, class: "inspect-axis" }));
    const label = (text, attributes) => {
      const node = svgElement("text", { class: "inspect-chart-label", ...attributes });
      node.textContent = text;
      svg.append(node);
    };
    label(bytes(y1), { x: left - 4, y: y(y1) + 4, "text-anchor": "end" });
    label("0", { x: left - 4, y: height - bottom + 4, "text-anchor": "end" });
    label(String(x0), { x: x(x0), y: height - 6, "text-anchor": "middle" });
    label(`${x1} tokens`, { x: x(x1), y: height - 6, "text-anchor": "end" });
    svg.append(svgElement("polyline", { points: steps.map((s) => `${x(s.tokens)},${y(s.bytes)}`).join(" "),
      class: "inspect-chart-line" }));
    for (const step of steps) {
      const dot = svgElement("circle", { cx: x(step.tokens), cy: y(step.bytes), r: 2.5, class: "inspect-chart-dot" });
      const title = svgElement("title");
      title.textContent = `${plural(step.tokens, "token")}: ${bytes(step.bytes)} (${step.bytes} bytes)`;
      dot.append(title);
      svg.append(dot);
    }
    return svg;
  }

  function layerBars(values) {
    const width = 320;
    const height = 150;
    const bottom = 22;
    const max = Math.max(...values, 1);
    const step = Math.min(32, (width - 12) / values.length);
    const svg = svgElement("svg", { width, height, class: "inspect-chart", role: "img", "aria-label": "bytes per layer" });
    svg.append(svgElement("line", { x1: 6, y1: height - bottom, x2: width - 6, y2: height - bottom, class: "inspect-axis" }));
    values.forEach((value, i) => {
      const h = (value / max) * (height - bottom - 10);
      const rect = svgElement("rect", { x: 6 + i * step + step * 0.15, y: height - bottom - h, width: Math.max(1, step * 0.7),
        height: h, class: "inspect-layer-bar" });
      const title = svgElement("title");
      title.textContent = `layer ${i}: ${bytes(value)} (${value} bytes)`;
      rect.append(title);
      svg.append(rect);
    });
    const label = svgElement("text", { x: 6, y: height - 6, class: "inspect-chart-label" });
    label.textContent = `layers 0–${values.length - 1}, ${bytes(values[0])} each${values.every((v) => v === values[0]) ? "" : " (first)"}`;
    svg.append(label);
    return svg;
  }

  function renderServer() {
    const holder = $("kv-server");
    const server = state.data && state.data.server;
    holder.hidden = !(state.mode === "served" && server);
    if (holder.hidden) return;
    holder.replaceChildren(element("h3", "", "This server's cache"));
    const list = element("dl", "trace-facts");
    const fact = (term, text) => list.append(element("dt", "", term), element("dd", "", text));
    const rate = server.prefix_queries ? server.prefix_hits / server.prefix_queries : 0;
    fact("Prefix cache hits", `${server.prefix_hits} of ${server.prefix_queries} requests (${percent(rate)}): a request ` +
      "whose prompt starts like an earlier one reuses its keys and values");
    fact("Cached prompt tokens", `${server.cached_tokens} of ${server.prompt_tokens} ` +
      `(${percent(server.prompt_tokens ? server.cached_tokens / server.prompt_tokens : 0)}) were not computed again`);
    if (server.text_cached_tokens !== undefined) {
      const tokens = state.data.tokens.length;
      fact("This text", `${server.text_cached_tokens} of its ${tokens} tokens are in the cache now: a request ` +
        "starting with it would reuse their keys and values (it always computes its last token)");
    }
    fact("Requests", `${server.running} running, ${server.waiting} waiting`);
    fact("KV positions in use", percent(server.kv_cache_usage));
    holder.append(list, element("p", "hint", "The engine's counters, for the chat and completion requests it served; " +
      "the inspector runs its own forward pass, outside that cache."));
  }

  // ---------------------------------------------------------------- wiring

  function wire() {
    $("error-close").addEventListener("click", clearError);
    $("stack").addEventListener("change", () => setStack($("stack").value));
    $("layer").addEventListener("change", () => setFocus({ layer: parseInt($("layer").value, 10) }));
    $("head").addEventListener("change", () => setFocus({ head: parseInt($("head").value, 10) }));
    $("position-prev").addEventListener("click", () => stepFocus(-1));
    $("position-next").addEventListener("click", () => stepFocus(+1));

    const canvas = $("heatmap");
    canvas.addEventListener("mousemove", hoverHeatmap);
    canvas.addEventListener("mouseleave", () => {
      $("heatmap-tip").hidden = true;
    });
    canvas.addEventListener("click", (event) => {
      const at = cellAt(event);
      if (!at) return;
      if (stackOf().rows === "source") setFocus({ source: at.row });
      else setFocus({ position: at.row });
    });
    canvas.addEventListener("keydown", (event) => {
      const moves = { ArrowUp: -1, ArrowDown: 1 };
      if (!(event.key in moves)) return;
      event.preventDefault();
      stepFocus(moves[event.key]);
    });

    for (const [id] of SETTINGS) {
      $(id).addEventListener("input", () => {
        showSettings(null);
        refresh(["next"], DEBOUNCE_MS);
      });
    }

    let resizing = null;
    window.addEventListener("resize", () => {
      clearTimeout(resizing);
      resizing = setTimeout(() => {
        if (state.data) drawHeatmap();
      }, 150);
    });
    if (window.matchMedia) {
      const scheme = window.matchMedia("(prefers-color-scheme: dark)");
      const redraw = () => {
        if (!state.data) return;
        state.colors = themeColors();
        state.thumbsLayer = "";
        renderLens();
        renderFocus();
      };
      if (scheme.addEventListener) scheme.addEventListener("change", redraw);
    }
  }

  function startStatic(holder) {
    state.mode = "static";
    document.body.dataset.mode = "static";
    const form = $("inspect-form");
    form.hidden = true;
    for (const control of form.elements) control.disabled = true;
    for (const [id] of SETTINGS) $(id).disabled = true;
    $("controls").title = "A saved inspection: other settings need `lmforge serve` or the flags of `lmforge inspect`";
    $("intro").hidden = true;
    let data;
    try {
      data = JSON.parse(holder.textContent);
    } catch (error) {
      showError(`The saved inspection is not JSON (${error.message}).`);
      return;
    }
    const note = $("static-note");
    withCode(note, `A saved inspection of ${data && data.model ? data.model : "a model"}: this file makes no requests. ` +
      "The layer, head and token can be changed here; another text or other sampler settings need `lmforge serve` " +
      "(its web UI has this Inspect page) or `lmforge inspect` again with other flags (`--temperature`, `--top-k`, " +
      "`--top-p`, `--repetition-penalty`, `--seed`, `--beams`, `--position`).");
    note.hidden = false;
    try {
      load(data);
    } catch (error) {
      showError(`Cannot show the saved inspection: ${error.message}`);
    }
  }

  function startServed() {
    $("inspect-form").addEventListener("submit", (event) => {
      event.preventDefault();
      inspect();
    });
    for (const id of ["text", "target"]) {
      $(id).addEventListener("keydown", (event) => {
        if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
          event.preventDefault();
          inspect();
        }
      });
    }
    showSettings(null);
    loadModels();
  }

  function start() {
    wire();
    const holder = $("inspection");
    if (holder) startStatic(holder);
    else startServed();
    window.lmforge = { state, inspect, setFocus, setStack, load };
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start, { once: true });
  else start();
})();
