/* The chat page of `lmforge serve`: plain JavaScript, no build step, no framework, and nothing
 * fetched from anywhere but the server that serves this page (its OpenAI-compatible API).
 *
 * Stable hooks (tests/serve/test_serve_ui.py relies on these; keep them when restyling):
 *   #model            <select> filled from GET /v1/models (option value = model id)
 *   #prompt           the message box: Enter sends, Shift+Enter adds a line
 *   #send, #stop      Send is hidden while an answer streams; Stop is shown only then
 *   #messages         the conversation; each turn is an <article data-testid="message"
 *                     data-role="user|assistant">, holding [data-testid="message-content"]
 *                     and, for answers, [data-testid="message-stats"] (token counts, tokens/s)
 *   #system-prompt, #temperature, #top-p, #top-k, #max-tokens, #seed, #api-key   settings
 *   #new-chat, #export-json, #export-md, #settings-toggle                         buttons
 *   #rag              checkbox, shown when GET /v1/rag finds a knowledge base: questions then go to
 *                     POST /v1/rag/ask; the answer's [n] become a.citation links and its sources an
 *                     <ol data-testid="sources"> of <li data-testid="source" data-cited="true|false">
 *   #error            the error banner (role="alert"); its text is in #error-text
 *   body[data-state]  "idle" or "streaming"
 *   window.lmforge    {state, send, stop, newChat, renderMarkdown, conversationJSON, conversationMarkdown}
 *
 * An answer streams from POST /v1/chat/completions as server-sent events (an answer from the
 * knowledge base comes whole, with its sources); Stop aborts the
 * fetch (AbortController) and keeps what has arrived. Answers are rendered from a small
 * Markdown subset by renderMarkdown, which escapes all HTML first: model output never
 * becomes markup of its own.
 */
"use strict";

(() => {
  const { $, showError, clearError: hideError, readStorage, writeStorage } = window.lmforgePage;
  const STORAGE = { settings: "lmforge.settings", apiKey: "lmforge.apiKey", model: "lmforge.model" };
  const SETTING_IDS = ["system-prompt", "temperature", "top-p", "top-k", "max-tokens", "seed"];

  const state = {
    messages: [], // the conversation without the system prompt: {role, content, stats, sources}
    models: [], // the entries of GET /v1/models
    controller: null, // the AbortController of the answer streaming now, if any
    views: 0, // message views made so far (their ids keep source anchors apart)
  };

  // ---------------------------------------------------------------- Markdown

  function escapeHtml(text) {
    return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
  }

  /** Markdown (escaped first) to HTML: headings, paragraphs, emphasis, inline code, fenced code,
   *  lists (nested), block quotes, rules, tables and links (http, https, mailto only). */
  function renderMarkdown(text) {
    const clean = String(text).replace(/\r\n?/g, "\n").replace(/\u0000/g, "");
    return renderBlocks(escapeHtml(clean).split("\n"));
  }

  const FENCE = /^\s*(`{3,}|~{3,})\s*([^\s`]*)/;
  const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
  const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
  const QUOTE = /^ {0,3}&gt; ?/;
  const LIST_ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
  const TABLE_RULE = /^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$/;

  function startsBlock(line) {
    return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || LIST_ITEM.test(line);
  }

  function renderBlocks(lines) {
    const out = [];
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      let match;
      if (/^\s*$/.test(line)) {
        i += 1;
      } else if ((match = line.match(FENCE))) {
        const fence = readFence(lines, i, match);
        out.push(fence.html);
        i = fence.next;
      } else if ((match = line.match(HEADING))) {
        const level = match[1].length;
        out.push(`<h${level}>${inline(match[2])}</h${level}>`);
        i += 1;
      } else if (RULE.test(line)) {
        out.push("<hr>");
        i += 1;
      } else if (QUOTE.test(line)) {
        const quoted = [];
        while (i < lines.length && QUOTE.test(lines[i])) quoted.push(lines[i++].replace(QUOTE, ""));
        out.push(`<blockquote>${renderBlocks(quoted)}</blockquote>`);
      } else if (LIST_ITEM.test(line)) {
        const list = readList(lines, i);
        out.push(list.html);
        i = list.next;
      } else if (line.includes("|") && i + 1 < lines.length && lines[i + 1].includes("|") && TABLE_RULE.test(lines[i + 1])) {
        const table = readTable(lines, i);
        out.push(table.html);
        i = table.next;
      } else {
        const paragraph = [];
        while (i < lines.length && !/^\s*$/.test(lines[i]) && (paragraph.length === 0 || !startsBlock(lines[i]))) {
          paragraph.push(lines[i++].trim());
        }
        out.push(`<p>${inline(paragraph.join("\n")).replace(/\n/g, "<br>")}</p>`);
      }
    }
    return out.join("");
  }

  /** A fenced code block from lines[start] (an open fence) to its closing fence, or to the end:
   *  while an answer streams, its last code block is still open. */
  function readFence(lines, start, match) {
    const marker = match[1];
    const indent = lines[start].match(/^\s*/)[0].length;
    const language = /^[\w+#.-]+$/.test(match[2]) ? match[2] : "";
    const body = [];
    let i = start + 1;
    while (i < lines.length && !new RegExp(`^\\s*${marker[0]}{${marker.length},}\\s*$`).test(lines[i])) {
      body.push(lines[i].replace(new RegExp(`^ {0,${indent}}`), ""));
      i += 1;
    }
    const label = language || "text";
    const html =
      `<div class="code-block"><div class="code-header"><span class="code-lang">${label}</span>` +
      `<button type="button" class="copy-code" data-testid="copy-code">Copy</button></div>` +
      `<pre><code${language ? ` class="language-${language}"` : ""}>${body.join("\n")}</code></pre></div>`;
    return { html, next: i + 1 };
  }

  /** A list starting at lines[start]; deeper-indented items open a nested list. */
  function readList(lines, start) {
    const first = lines[start].match(LIST_ITEM);
    const indent = first[1].length;
    const ordered = /\d/.test(first[2]);
    const items = []; // {text: [lines], blocks: [html]}
    let i = start;
    while (i < lines.length) {
      const line = lines[i];
      const item = line.match(LIST_ITEM);
      const lineIndent = line.match(/^\s*/)[0].length;
      if (item && item[1].length <= indent + 1) {
        if (/\d/.test(item[2]) !== ordered) break;
        items.push({ text: [item[3]], blocks: [] });
        i += 1;
      } else if (items.length && item && item[1].length > indent) {
        const nested = readList(lines, i);
        items[items.length - 1].blocks.push(nested.html);
        i = nested.next;
      } else if (items.length && lineIndent > indent && FENCE.test(line)) {
        const fence = readFence(lines, i, line.match(FENCE));
        items[items.length - 1].blocks.push(fence.html);
        i = fence.next;
      } else if (/^\s*$/.test(line)) {
        let next = i + 1;
        while (next < lines.length && /^\s*$/.test(lines[next])) next += 1;
        const after = next < lines.length ? lines[next] : "";
        const afterItem = after.match(LIST_ITEM);
        const continues = afterItem ? afterItem[1].length >= indent : after.match(/^\s*/)[0].length > indent;
        if (!continues) break;
        i = next;
      } else if (items.length && (lineIndent > indent || !startsBlock(line))) {
        items[items.length - 1].text.push(line.trim()); // a continuation line of the item
        i += 1;
      } else {
        break;
      }
    }
    const tag = ordered ? "ol" : "ul";
    const number = ordered ? parseInt(first[2], 10) : 1;
    const startAttr = ordered && number !== 1 ? ` start="${number}"` : "";
    const body = items
      .map((item) => `<li>${inline(item.text.join("\n")).replace(/\n/g, "<br>")}${item.blocks.join("")}</li>`)
      .join("");
    return { html: `<${tag}${startAttr}>${body}</${tag}>`, next: i };
  }

  function readTable(lines, start) {
    const cells = (line) => line.trim().replace(/^\|/, "").replace(/\|$/, "").split("|").map((cell) => cell.trim());
    const aligns = cells(lines[start + 1]).map((rule) =>
      rule.startsWith(":") && rule.endsWith(":") ? "center" : rule.endsWith(":") ? "right" : rule.startsWith(":") ? "left" : "");
    const row = (line, tag) =>
      "<tr>" + cells(line).map((cell, k) =>
        `<${tag}${aligns[k] ? ` style="text-align:${aligns[k]}"` : ""}>${inline(cell)}</${tag}>`).join("") + "</tr>";
    let i = start + 2;
    const rows = [];
    while (i < lines.length && lines[i].includes("|") && !/^\s*$/.test(lines[i])) rows.push(row(lines[i++], "td"));
    const html = `<div class="table-wrap"><table><thead>${row(lines[start], "th")}</thead><tbody>${rows.join("")}</tbody></table></div>`;
    return { html, next: i };
  }

  /** Inline Markdown of escaped text. Code spans and links are set aside first (as \u0000n\u0000
   *  slots) so that emphasis never reaches into them. */
  function inline(text) {
    const slots = [];
    const keep = (html) => `\u0000${slots.push(html) - 1}\u0000`;
    let s = text.replace(/(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/g, (_, ticks, code) => keep(`<code>${code}</code>`));
    s = s.replace(/\[([^\]\n]+)\]\(\s*([^\s)]+)(?:\s+&quot;[^\n]*?&quot;)?\s*\)/g, (whole, label, url) =>
      /^(https?:\/\/|mailto:)/i.test(url)
        ? keep(`<a href="${url}" target="_blank" rel="noopener noreferrer">${emphasis(label)}</a>`)
        : whole);
    s = s.replace(/\bhttps?:\/\/(?:[^\s&\u0000]|&amp;)+/g, (found) => {
      const url = found.replace(/[.,;:!?)\]'*_~]+$/, ""); // trailing punctuation is the sentence's
      return keep(`<a href="${url}" target="_blank" rel="noopener noreferrer">${url}</a>`) + found.slice(url.length);
    });
    return emphasis(s).replace(/\u0000(\d+)\u0000/g, (_, n) => slots[Number(n)]);
  }

  function emphasis(s) {
    return s
      .replace(/\*\*\*(?=\S)([\s\S]*?\S)\*\*\*/g, "<strong><em>$1</em></strong>")
      .replace(/\*\*(?=\S)([\s\S]*?\S)\*\*/g, "<strong>$1</strong>")
      .replace(/(^|[^\w])__(?=\S)([\s\S]*?\S)__(?!\w)/g, "$1<strong>$2</strong>")
      .replace(/\*(?=[^\s*])([\s\S]*?[^\s*])\*/g, "<em>$1</em>")
      .replace(/(^|[^\w])_(?=[^\s_])([\s\S]*?[^\s_])_(?!\w)/g, "$1<em>$2</em>")
      .replace(/~~(?=\S)([\s\S]*?\S)~~/g, "<del>$1</del>");
  }

  // ---------------------------------------------------------------- the API

  class ApiError extends Error {}

  function authHeaders() {
    const key = $("api-key").value.trim();
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  /** The server's error.message (OpenAI error body), or the best text the response has. */
  async function errorMessage(response) {
    let message = "";
    const text = await response.text().catch(() => "");
    try {
      const body = JSON.parse(text);
      message = (body.error && (body.error.message || JSON.stringify(body.error))) ||
        (body.detail && (typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail))) || "";
    } catch {
      message = text.trim().slice(0, 500);
    }
    message = `${message || response.statusText || "request failed"} (HTTP ${response.status})`;
    if (response.status === 401) message += ". Set the API key in the settings.";
    return message;
  }

  /** The data of each server-sent event of a response body, as strings ("[DONE]" included). */
  async function* serverSentEvents(body) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    const dataOf = (block) => {
      const data = block.split(/\r\n|\r|\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, ""));
      return data.length ? data.join("\n") : null; // null: a comment or keep-alive
    };
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let boundary;
        while ((boundary = /\r\n\r\n|\n\n|\r\r/.exec(buffer))) {
          const data = dataOf(buffer.slice(0, boundary.index));
          buffer = buffer.slice(boundary.index + boundary[0].length);
          if (data !== null) yield data;
        }
      }
      const data = dataOf(buffer + decoder.decode());
      if (data !== null) yield data;
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  function numberSetting(id, parse) {
    const value = parse($(id).value);
    return Number.isFinite(value) ? value : undefined;
  }

  /** The conversation as OpenAI messages, the system prompt first when there is one. */
  function requestMessages(messages = state.messages) {
    const system = $("system-prompt").value.trim();
    const turns = messages.map(({ role, content }) => ({ role, content }));
    return system ? [{ role: "system", content: system }, ...turns] : turns;
  }

  function requestBody(model, messages) {
    const body = {
      model,
      messages: requestMessages(messages),
      stream: true,
      stream_options: { include_usage: true },
      temperature: numberSetting("temperature", parseFloat),
      top_p: numberSetting("top-p", parseFloat),
      max_tokens: numberSetting("max-tokens", (v) => parseInt(v, 10)),
    };
    const topK = numberSetting("top-k", (v) => parseInt(v, 10));
    if (topK > 0) body.top_k = topK;
    const seed = numberSetting("seed", (v) => parseInt(v, 10));
    if (seed !== undefined) body.seed = seed;
    const limit = selectedModel() && selectedModel().max_model_len;
    if (limit && body.max_tokens > limit) body.max_tokens = limit;
    return JSON.parse(JSON.stringify(body)); // drops the settings left blank (undefined)
  }

  function selectedModel() {
    return state.models.find((m) => m.id === $("model").value);
  }

  async function loadModels() {
    const select = $("model");
    try {
      const response = await fetch("/v1/models", { headers: authHeaders() });
      if (!response.ok) throw new ApiError(await errorMessage(response));
      state.models = (await response.json()).data || [];
    } catch (err) {
      state.models = [];
      showError(`Could not list the models: ${err.message}`);
    }
    const previous = select.value || readStorage(STORAGE.model);
    select.replaceChildren(...state.models.map((m) => new Option(m.id, m.id)));
    if (!state.models.length) select.append(new Option("no model", ""));
    if (state.models.some((m) => m.id === previous)) select.value = previous;
    showModelInfo();
  }

  /** Offers the knowledge base when the server has one (GET /v1/rag answers 404 when not). */
  async function loadKnowledgeBase() {
    try {
      const response = await fetch("/v1/rag", { headers: authHeaders() });
      if (!response.ok) return;
      const info = await response.json();
      $("rag-option").hidden = false;
      $("rag-option").title = `Answer from the server's knowledge base: ${info.chunks} chunks of ${info.files} ` +
        `files, embedded by ${info.encoder}. The answer cites its numbered sources.`;
    } catch {
      // no knowledge base to offer
    }
  }

  function showModelInfo() {
    const model = selectedModel();
    const limit = model && model.max_model_len;
    $("max-tokens").max = limit || "";
    $("model-info").textContent = model ? `${model.id}${limit ? `: context of ${limit} tokens` : ""}` : "";
  }

  // ---------------------------------------------------------------- the conversation

  async function send() {
    const text = $("prompt").value;
    if (state.controller || !text.trim()) return;
    const model = $("model").value;
    if (!model) {
      showError("No model to send to: the server listed none (see GET /v1/models).");
      return;
    }
    if (!$("rag-option").hidden && $("rag").checked) return askKnowledgeBase(text, model);
    const body = requestBody(model, [...state.messages, { role: "user", content: text }]);
    const { question, answer, questionView, view, controller, started } = beginTurn(text, { stats: null });
    let firstToken = null, usage = null, finish = null, chunks = 0, failure = null;
    try {
      const response = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "text/event-stream", ...authHeaders() },
        body: JSON.stringify(body),
        signal: controller.signal,
      });
      if (!response.ok) throw new ApiError(await errorMessage(response));
      for await (const data of serverSentEvents(response.body)) {
        if (data.trim() === "[DONE]") break;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(chunk.error.message || JSON.stringify(chunk.error));
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          const piece = choice.delta && choice.delta.content;
          if (piece) {
            if (firstToken === null) firstToken = performance.now();
            answer.content += piece;
            chunks += 1;
            scheduleRender(view, answer);
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    } catch (err) {
      if (err.name !== "AbortError") failure = err instanceof ApiError ? err.message : `${err.name}: ${err.message}`;
    } finally {
      const ended = performance.now();
      endTurn(view);
      if (failure !== null && !answer.content) {
        takeBack(question, questionView, view, text);
        showError(failure);
      } else {
        answer.stats = {
          prompt_tokens: usage ? usage.prompt_tokens : null,
          completion_tokens: usage ? usage.completion_tokens : null,
          chunks,
          seconds: (ended - started) / 1000, // from sending the request to the last chunk
          first_token_seconds: firstToken === null ? null : (firstToken - started) / 1000,
          finish_reason: controller.signal.aborted ? "stopped" : failure !== null ? "error" : finish,
        };
        renderAssistant(view, answer);
        if (failure !== null) showError(failure);
      }
      setBusy(false);
      updateEmptyState();
    }
  }

  /** One question answered from the knowledge base (POST /v1/rag/ask): the whole answer at once, with
   * the numbered sources it was given. The knowledge base answers each question on its own. */
  async function askKnowledgeBase(text, model) {
    const { question, answer, questionView, view, controller, started } = beginTurn(text, { sources: [] });
    try {
      const body = { question: text, model, max_tokens: numberSetting("max-tokens", (v) => parseInt(v, 10)) };
      const response = await fetch("/v1/rag/ask", {
        method: "POST",
        headers: { "Content-Type": "application/json", ...authHeaders() },
        body: JSON.stringify(body),
        signal: controller.signal,
      });
      if (!response.ok) throw new ApiError(await errorMessage(response));
      const reply = await response.json();
      answer.content = reply.answer;
      answer.sources = reply.sources || [];
      answer.stats = { rag: true, found: reply.found, sources: answer.sources.length,
                       cited: answer.sources.filter((s) => s.cited).length,
                       seconds: (performance.now() - started) / 1000 };
      renderAssistant(view, answer);
    } catch (err) {
      takeBack(question, questionView, view, text);
      if (err.name !== "AbortError") showError(err instanceof ApiError ? err.message : `${err.name}: ${err.message}`);
    } finally {
      endTurn(view);
      setBusy(false);
      updateEmptyState();
    }
  }

  /** A new turn: the question and an empty answer (with ``extra`` fields) in the conversation and on the
   * page, the message box emptied, and the page busy until endTurn. */
  function beginTurn(text, extra) {
    hideError();
    const question = { role: "user", content: text };
    const answer = { role: "assistant", content: "", stats: null, ...extra };
    state.messages.push(question, answer);
    const questionView = addMessageView(question);
    const view = addMessageView(answer);
    $("prompt").value = "";
    fitPrompt();
    const controller = new AbortController();
    state.controller = controller;
    setBusy(true);
    view.article.classList.add("streaming");
    view.article.setAttribute("aria-busy", "true"); // screen readers read the answer once, when done
    return { question, answer, questionView, view, controller, started: performance.now() };
  }

  function endTurn(view) {
    state.controller = null;
    view.article.classList.remove("streaming");
    view.article.removeAttribute("aria-busy");
  }

  /** Nothing came back: take the turn back and return the text to the message box. */
  function takeBack(question, questionView, view, text) {
    state.messages.splice(state.messages.indexOf(question), 2);
    questionView.article.remove();
    view.article.remove();
    if (!$("prompt").value) $("prompt").value = text;
  }

  function stop() {
    if (state.controller) state.controller.abort();
  }

  function newChat() {
    stop();
    state.messages = [];
    $("messages").querySelectorAll("article.message").forEach((el) => el.remove());
    hideError();
    updateEmptyState();
    $("prompt").focus();
  }

  function statsText(stats) {
    if (stats.rag) {
      const found = stats.found ? `${stats.sources} sources, ${stats.cited} cited` : "nothing relevant found";
      return `knowledge base: ${found} · ${stats.seconds.toFixed(2)} s`;
    }
    const parts = [];
    if (stats.completion_tokens != null) {
      parts.push(`${stats.prompt_tokens} prompt + ${stats.completion_tokens} completion tokens`);
      if (stats.seconds > 0) parts.push(`${(stats.completion_tokens / stats.seconds).toFixed(1)} tok/s`);
    } else {
      parts.push(`${stats.chunks} chunk${stats.chunks === 1 ? "" : "s"}`);
    }
    parts.push(`${stats.seconds.toFixed(2)} s`);
    if (stats.first_token_seconds != null) parts.push(`first token ${stats.first_token_seconds.toFixed(2)} s`);
    const endings = { stopped: "stopped", length: "hit max tokens", error: "error" };
    if (endings[stats.finish_reason]) parts.push(endings[stats.finish_reason]);
    return parts.join(" · ");
  }

  // ---------------------------------------------------------------- views

  function addMessageView(message) {
    const article = document.createElement("article");
    article.className = `message ${message.role}`;
    article.dataset.testid = "message";
    article.dataset.role = message.role;
    const role = document.createElement("div");
    role.className = "message-role";
    role.textContent = message.role === "user" ? "You" : "Assistant";
    const content = document.createElement("div");
    content.className = message.role === "user" ? "message-content plain" : "message-content markdown";
    content.dataset.testid = "message-content";
    article.append(role, content);
    const view = { article, content, stats: null, sources: null, frame: 0, id: ++state.views };
    if (message.role === "assistant") {
      view.stats = document.createElement("div");
      view.stats.className = "message-stats";
      view.stats.dataset.testid = "message-stats";
      view.stats.title = "tokens from the server's usage; tok/s: completion tokens per second, " +
        "from sending the request to the last token";
      article.append(view.stats);
      renderAssistant(view, message);
    } else {
      content.textContent = message.content;
    }
    $("messages").append(article);
    updateEmptyState();
    scrollToEnd(true);
    return view;
  }

  /** Renders at most once per animation frame, however fast the chunks come. */
  function scheduleRender(view, message) {
    if (view.frame) return;
    view.frame = requestAnimationFrame(() => {
      view.frame = 0;
      renderAssistant(view, message);
    });
  }

  function renderAssistant(view, message) {
    if (view.frame) cancelAnimationFrame(view.frame);
    view.frame = 0;
    const follow = nearEnd();
    view.content.innerHTML = renderMarkdown(message.content);
    if (message.sources && message.sources.length) {
      linkCitations(view, message.sources.length);
      renderSources(view, message.sources);
    }
    view.stats.textContent = message.stats ? statsText(message.stats) : "";
    view.stats.hidden = !message.stats;
    scrollToEnd(follow);
  }

  function nearEnd() {
    const box = $("messages");
    return box.scrollHeight - box.scrollTop - box.clientHeight < 80;
  }

  function scrollToEnd(follow) {
    if (follow) $("messages").scrollTop = $("messages").scrollHeight;
  }

  function updateEmptyState() {
    const empty = state.messages.length === 0;
    $("empty-state").hidden = !empty;
    $("export-json").disabled = empty;
    $("export-md").disabled = empty;
  }

  function setBusy(busy) {
    document.body.dataset.state = busy ? "streaming" : "idle";
    $("send").hidden = busy;
    $("send").disabled = busy;
    $("stop").hidden = !busy;
    if (!busy) $("prompt").focus();
  }

  function fitPrompt() {
    const box = $("prompt");
    box.style.height = "auto";
    box.style.height = `${box.scrollHeight + 2}px`;
  }

  async function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) return navigator.clipboard.writeText(text);
    const area = document.createElement("textarea"); // plain http on another host: no Clipboard API
    area.value = text;
    area.style.position = "fixed";
    area.style.opacity = "0";
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }

  // ---------------------------------------------------------------- export

  function conversationJSON() {
    return { model: $("model").value || null, messages: requestMessages() };
  }

  function conversationMarkdown() {
    const title = `# Conversation with ${$("model").value || "lmforge"}\n\n_${new Date().toISOString()}_\n`;
    const names = { system: "System", user: "User", assistant: "Assistant" };
    const sourcesOf = (m) => (m.sources && m.sources.length
      ? "\nSources:\n\n" + m.sources.map((s) => `${s.number}. ${s.title} (${s.source}:${s.start}-${s.end})` +
        (s.cited ? " - cited" : "")).join("\n") + "\n"
      : "");
    const system = $("system-prompt").value.trim();
    const turns = [...(system ? [{ role: "system", content: system }] : []), ...state.messages]
      .map((m) => `## ${names[m.role] || m.role}\n\n${m.content}\n${sourcesOf(m)}`);
    return [title, ...turns].join("\n");
  }

  function download(extension, type, text) {
    const stamp = new Date().toISOString().slice(0, 19).replace(/[-:]/g, "").replace("T", "-");
    const link = document.createElement("a");
    link.href = URL.createObjectURL(new Blob([text], { type }));
    link.download = `lmforge-chat-${stamp}.${extension}`;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  }

  // ---------------------------------------------------------------- settings

  function restoreSettings() {
    let saved = {};
    try {
      saved = JSON.parse(readStorage(STORAGE.settings) || "{}");
    } catch {
      saved = {};
    }
    for (const id of SETTING_IDS) if (typeof saved[id] === "string") $(id).value = saved[id];
    $("api-key").value = readStorage(STORAGE.apiKey) || "";
  }

  function saveSettings() {
    const values = Object.fromEntries(SETTING_IDS.map((id) => [id, $(id).value]));
    writeStorage(STORAGE.settings, JSON.stringify(values));
  }

  function toggleSettings() {
    const narrow = window.matchMedia("(max-width: 800px)").matches;
    const name = narrow ? "settings-open" : "settings-closed";
    document.body.classList.toggle(name);
    const open = narrow ? document.body.classList.contains(name) : !document.body.classList.contains(name);
    $("settings-toggle").setAttribute("aria-expanded", String(open));
  }

  /** Each [n] of an answer, n a source number, becomes a link to that source (text nodes only, so
   * code blocks and the markup around them stay as they are). */
  function linkCitations(view, count) {
    const walker = document.createTreeWalker(view.content, NodeFilter.SHOW_TEXT);
    const nodes = [];
    while (walker.nextNode()) if (!walker.currentNode.parentElement.closest("code")) nodes.push(walker.currentNode);
    for (const node of nodes) {
      const parts = node.textContent.split(/(\[\d+\])/);
      if (parts.length === 1) continue;
      const pieces = parts.map((part) => {
        const number = /^\[(\d+)\]$/.exec(part) && parseInt(part.slice(1, -1), 10);
        if (!number || number > count) return document.createTextNode(part);
        const link = document.createElement("a");
        link.className = "citation";
        link.href = `#source-${view.id}-${number}`;
        link.dataset.source = String(number);
        link.textContent = part;
        return link;
      });
      node.replaceWith(...pieces);
    }
  }

  /** The numbered sources under an answer: title, where in which file, whether the answer cites it,
   * and the chunk's text folded away. */
  function renderSources(view, sources) {
    if (view.sources) view.sources.remove();
    const list = document.createElement("ol");
    list.className = "sources";
    list.dataset.testid = "sources";
    for (const source of sources) {
      const item = document.createElement("li");
      item.id = `source-${view.id}-${source.number}`;
      item.dataset.testid = "source";
      item.dataset.cited = String(Boolean(source.cited));
      const details = document.createElement("details");
      const summary = document.createElement("summary");
      const where = document.createElement("span");
      where.className = "source-where";
      where.textContent = `${source.source}:${source.start}-${source.end}`;
      summary.append(`[${source.number}] ${source.title}`, where);
      if (source.cited) {
        const mark = document.createElement("span");
        mark.className = "source-cited";
        mark.textContent = "cited";
        summary.append(mark);
      }
      const text = document.createElement("div");
      text.className = "source-text";
      text.textContent = source.text;
      details.append(summary, text);
      item.append(details);
      list.append(item);
    }
    view.sources = list;
    view.content.after(list);
  }

  // ---------------------------------------------------------------- wiring

  function init() {
    restoreSettings();
    $("composer").addEventListener("submit", (event) => {
      event.preventDefault();
      send();
    });
    $("prompt").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing && event.keyCode !== 229) {
        event.preventDefault();
        send();
      }
    });
    $("settings-form").addEventListener("submit", (event) => event.preventDefault());
    $("prompt").addEventListener("input", fitPrompt);
    document.addEventListener("keydown", (event) => {
      if (event.key === "Escape" && state.controller) stop();
    });
    $("stop").addEventListener("click", stop);
    $("new-chat").addEventListener("click", newChat);
    $("export-json").addEventListener("click", () =>
      download("json", "application/json", JSON.stringify(conversationJSON(), null, 2) + "\n"));
    $("export-md").addEventListener("click", () => download("md", "text/markdown", conversationMarkdown()));
    $("settings-toggle").addEventListener("click", toggleSettings);
    $("error-close").addEventListener("click", hideError);
    $("model").addEventListener("change", () => {
      writeStorage(STORAGE.model, $("model").value);
      showModelInfo();
    });
    for (const id of SETTING_IDS) $(id).addEventListener("change", saveSettings);
    $("api-key").addEventListener("change", () => {
      writeStorage(STORAGE.apiKey, $("api-key").value.trim());
      hideError();
      loadModels();
    });
    $("messages").addEventListener("click", (event) => {
      const citation = event.target.closest("a.citation");
      if (citation) {
        event.preventDefault();
        const source = document.getElementById(citation.hash.slice(1));
        if (source) {
          source.querySelector("details").open = true;
          source.scrollIntoView({ block: "nearest" });
        }
        return;
      }
      const button = event.target.closest(".copy-code");
      if (!button) return;
      const code = button.closest(".code-block").querySelector("code").textContent;
      copyText(code).then(
        () => (button.textContent = "Copied"),
        () => (button.textContent = "Copy failed"));
      setTimeout(() => (button.textContent = "Copy"), 1500);
    });
    updateEmptyState();
    setBusy(false);
    loadModels();
    loadKnowledgeBase();
  }

  window.lmforge = { state, send, stop, newChat, renderMarkdown, conversationJSON, conversationMarkdown };
  init();
})();
