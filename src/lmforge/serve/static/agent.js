/* The agent trace page (static/agent.html): a run of `lmforge agent --trace FILE` shown step by step.
 * Plain JavaScript, no build step; the file is read in the browser (file input or drag and drop) or, with
 * `agent.html?trace=URL`, fetched from this server (another origin is refused).
 *
 * A trace is JSON lines (src/lmforge/agent/trace.py): start, then model / tool / note / resume events,
 * then end when the run finished. The page shows the start as a header and every model turn as a card
 * (the text it wrote, its tool calls, each call's result under it); notes and resume markers are cards
 * between the turns; the end card gives the answer and the totals. All trace text goes in as text
 * (textContent), never as markup.
 *
 * Walking: every card has a position. A model turn is at its place among the turns (1..N); a note or a
 * resume marker shares the position of the turn before it (what happened after that turn, before the
 * next; those before the first turn go with it); the end is at N + 1. "Next step" / "Previous step" show
 * the cards up to a position, "Show all" shows every card (the view a trace opens in).
 *
 * Stable hooks (tests/serve/test_serve_agent_ui.py relies on these):
 *   #file                 the file input; #error (#error-text) says what is wrong with a file
 *   #question, #model, #tools, #config (a <details>)
 *   .step                 one card per model turn (class "malformed" when its call did not parse),
 *                         holding .tool-call (name(arguments)) and .tool-result.ok|.failed under it
 *   .note[data-kind], .resume
 *   #answer, #stopped     on the end card
 *   #prev, #next, #all, #position
 *   body[data-state]      "empty", "loading", "shown" or "error"; body[data-view] "all" or "step"
 *   window.lmforge        {state, load, show}
 */
"use strict";

(() => {
  const { $, showError, clearError, element } = window.lmforgePage;

  const STOPPED = {
    answer: "the model gave its answer",
    steps: "it ran out of model turns (max_steps)",
    time: "it ran out of time (max_seconds)",
    tokens: "it ran out of generated tokens (max_tokens)",
    repairs: "too many failed tool calls in a row (repairs)",
  };
  const NOTE_KINDS = {
    summary: "Summary of the earlier turns",
    plan: "Plan",
    malformed: "Repair request: the tool call did not parse",
  };
  const PLAN_MARK = "\n\nYour plan:\n"; // how loop.py puts the plan into the system prompt

  const state = {
    events: [],
    source: "", // the file name or URL shown
    last: 0, // the highest position: the number of model turns, plus one for the end
    turns: 0,
    position: 0,
    view: "all",
  };

  // ---------------------------------------------------------------- reading a trace

  /** The events of a trace's text; an Error naming the line that is wrong. */
  function parseTrace(text) {
    const events = [];
    const lines = text.split(/\r?\n/);
    for (let index = 0; index < lines.length; index++) {
      const line = lines[index];
      if (!line.trim()) continue;
      let event;
      try {
        event = JSON.parse(line);
      } catch (error) {
        throw new Error(`line ${index + 1}: not JSON (${error.message})`);
      }
      if (!event || typeof event !== "object" || Array.isArray(event) || typeof event.event !== "string") {
        throw new Error(`line ${index + 1}: an event is a JSON object with an "event" field`);
      }
      event.line = index + 1;
      events.push(event);
    }
    if (!events.length) throw new Error("the file is empty: a trace begins with a \"start\" event");
    if (events[0].event !== "start") {
      throw new Error(`line ${events[0].line}: a trace begins with a "start" event, not "${events[0].event}"`);
    }
    return events;
  }

  // ---------------------------------------------------------------- small helpers

  function badge(text, kind) {
    return element("span", `badge${kind ? ` ${kind}` : ""}`, text);
  }

  function seconds(value) {
    const number = Number(value);
    if (!Number.isFinite(number)) return "";
    return `${number < 0.1 ? number.toFixed(3) : number < 10 ? number.toFixed(2) : number.toFixed(1)} s`;
  }

  function plural(count, word) {
    return `${count} ${word}${count === 1 ? "" : "s"}`;
  }

  /** JSON as indented text; a string that is not JSON is shown as it is. */
  function pretty(value) {
    if (typeof value === "string") {
      try {
        return JSON.stringify(JSON.parse(value), null, 2);
      } catch {
        return value;
      }
    }
    return value === undefined ? "" : JSON.stringify(value, null, 2);
  }

  // ---------------------------------------------------------------- the header

  function renderHeader(start) {
    $("question").textContent = start.question ?? "";
    $("model").textContent = start.model ?? "?";
    const tools = $("tools");
    tools.replaceChildren();
    for (const name of Array.isArray(start.tools) ? start.tools : []) tools.append(element("code", "tool-name", name));
    if (!tools.childElementCount) tools.textContent = "none";
    $("started").textContent = Number.isFinite(start.time) ? new Date(start.time * 1000).toLocaleString() : "";

    const table = $("config-table");
    table.replaceChildren();
    for (const [key, value] of Object.entries(start.config && typeof start.config === "object" ? start.config : {})) {
      const row = element("tr");
      row.append(element("th", "", key), element("td", "plain", typeof value === "string" ? value : JSON.stringify(value)));
      table.append(row);
    }
    $("config").hidden = !table.childElementCount;

    const opening = $("opening-messages");
    opening.replaceChildren();
    for (const message of Array.isArray(start.messages) ? start.messages : []) {
      const block = element("div", "trace-message");
      block.append(element("div", "message-role", message && message.role), element("pre", "trace-pre", message && message.content));
      opening.append(block);
    }
    $("opening").hidden = !opening.childElementCount;
  }

  // ---------------------------------------------------------------- the cards

  function card(className, position) {
    const node = element("section", `trace-card ${className}`);
    node.dataset.position = String(position);
    return node;
  }

  function cardHeading(title, ...extras) {
    const heading = element("div", "trace-card-heading");
    heading.append(element("span", "trace-card-title", title));
    for (const extra of extras) if (extra) heading.append(extra);
    return heading;
  }

  /** A call, `name(arguments)`, in an exchange its result goes under. */
  function renderCall(id, name, argumentsValue) {
    const exchange = element("div", "tool-exchange");
    if (id) exchange.dataset.callId = id;
    const text = pretty(argumentsValue);
    const call = element("pre", "tool-call trace-pre", `${name ?? "?"}(${text === "" ? "" : text})`);
    call.dataset.name = name ?? "";
    exchange.append(call);
    return exchange;
  }

  function renderModel(event, position) {
    const node = card("step", position);
    const number = Number.isInteger(event.step) ? event.step + 1 : position;
    node.dataset.step = String(number);
    const reply = event.reply && typeof event.reply === "object" ? event.reply : {};
    const calls = Array.isArray(reply.tool_calls) ? reply.tool_calls : [];
    const facts = element("span", "trace-card-facts",
      [event.prompt_tokens !== undefined ? `${event.prompt_tokens} prompt + ${event.completion_tokens} generated tokens` : "",
        seconds(event.seconds)].filter(Boolean).join(", "));
    let flag = null;
    if (event.malformed) {
      node.classList.add("malformed");
      flag = badge("malformed: the tool call did not parse", "failed");
    } else if (!calls.length) {
      flag = badge("answer", "ok");
    }
    node.append(cardHeading(`Step ${number}`, flag, facts));
    const text = typeof event.text === "string" ? event.text : reply.content;
    node.append(element("div", "message-role", "The model wrote"));
    node.append(element("pre", "trace-pre model-text", text || "(nothing)"));
    for (const call of calls) {
      const fn = (call && call.function) || {};
      node.append(renderCall(call && call.id, fn.name, fn.arguments));
    }
    return node;
  }

  function renderResult(event) {
    const ok = event.ok === true;
    const node = element("div", `tool-result ${ok ? "ok" : "failed"}`);
    if (event.error) node.dataset.error = String(event.error);
    const status = ok
      ? badge(event.error ? `ok, ${event.error}` : "ok", event.error ? "warn" : "ok")
      : badge(event.error || "failed", "failed");
    node.append(cardHeading("Result", status, element("span", "trace-card-facts", seconds(event.seconds))));
    node.append(element("pre", "trace-pre", event.content ?? ""));
    return node;
  }

  /** Put a tool event's result under its call in the turn's card (a call the turn does not list gets its own). */
  function placeResult(event, turn) {
    let exchange = null;
    if (turn) {
      for (const candidate of turn.querySelectorAll(".tool-exchange")) {
        if (candidate.dataset.callId === String(event.id) && !candidate.querySelector(".tool-result")) {
          exchange = candidate;
          break;
        }
      }
    }
    if (!exchange) {
      exchange = renderCall(event.id, event.name, event.arguments);
      if (turn) turn.append(exchange);
    }
    exchange.append(renderResult(event));
    return turn ? null : exchange;
  }

  function renderNote(event, position) {
    const node = card("note", position);
    const kind = String(event.kind ?? "");
    node.dataset.kind = kind;
    let content = String(event.content ?? "");
    if (kind === "plan" && content.includes(PLAN_MARK)) content = content.split(PLAN_MARK).pop();
    const where = Array.isArray(event.replaces) && event.replaces.length === 2
      ? `in place of messages ${event.replaces[0]}-${event.replaces[1] - 1}`
      : event.role ? `as a ${event.role} message` : "";
    node.append(cardHeading(NOTE_KINDS[kind] || `Note${kind ? ` (${kind})` : ""}`, badge(kind || "note", "note-kind"),
      element("span", "trace-card-facts", where)));
    node.append(element("pre", "trace-pre", content));
    return node;
  }

  function renderResume(event, position) {
    const node = card("resume", position);
    const at = Number.isInteger(event.step) ? ` at step ${event.step + 1}` : "";
    node.append(cardHeading(`Resumed${at}`, element("span", "trace-card-facts",
      Number.isFinite(event.time) ? new Date(event.time * 1000).toLocaleString() : "")));
    return node;
  }

  function fact(list, name, value) {
    list.append(element("dt", "", name), element("dd", "", value));
  }

  function renderEnd(event, position, failed) {
    const node = card("trace-end", position);
    node.id = "end";
    node.append(cardHeading("End"));
    node.append(element("div", "message-role", "Answer"));
    const answer = element("div", "message-content plain trace-answer", event.answer || "(no answer)");
    answer.id = "answer";
    node.append(answer);
    const stopped = element("p", `trace-stopped ${event.stopped === "answer" ? "ok" : "failed"}`);
    stopped.id = "stopped";
    stopped.textContent = `Stopped: ${event.stopped ?? "?"}${STOPPED[event.stopped] ? ` (${STOPPED[event.stopped]})` : ""}`;
    node.append(stopped);
    const facts = element("dl", "trace-facts");
    fact(facts, "Turns", String(event.steps ?? "?"));
    fact(facts, "Tool calls", `${event.tool_calls ?? "?"}${failed ? ` (${failed} failed)` : ""}`);
    fact(facts, "Tokens", `${event.prompt_tokens ?? "?"} prompt + ${event.completion_tokens ?? "?"} generated`);
    fact(facts, "Seconds", seconds(event.seconds) || "?");
    node.append(facts);
    return node;
  }

  function renderUnfinished(position) {
    const node = card("trace-end unfinished", position);
    node.id = "end";
    node.append(cardHeading("Not ended"));
    node.append(element("p", "hint", "The trace has no end event: the run was stopped part way (or is still running). "
      + "`lmforge agent --resume FILE` continues it."));
    return node;
  }

  function renderEvents(events) {
    const timeline = $("timeline");
    timeline.replaceChildren();
    let turns = 0;
    let turn = null; // the card of the latest model turn
    let failed = 0;
    let ended = false;
    for (const event of events.slice(1)) {
      const position = Math.max(turns, 1);
      try {
        if (event.event === "model") {
          turns += 1;
          turn = renderModel(event, turns);
          timeline.append(turn);
        } else if (event.event === "tool") {
          failed += event.ok === true ? 0 : 1;
          const loose = placeResult(event, turn);
          if (loose) {
            const holder = card("loose-result", position);
            holder.append(cardHeading("Tool call outside a model turn"), loose);
            timeline.append(holder);
          }
        } else if (event.event === "note") {
          timeline.append(renderNote(event, position));
        } else if (event.event === "resume") {
          timeline.append(renderResume(event, position));
        } else if (event.event === "end") {
          timeline.append(renderEnd(event, turns + 1, failed));
          ended = true;
        } else if (event.event === "start") {
          throw new Error("a second \"start\" event: one trace a file");
        } else {
          const other = card("other", position);
          other.append(cardHeading(`Event "${event.event}"`), element("pre", "trace-pre", JSON.stringify(event, null, 2)));
          timeline.append(other);
        }
      } catch (error) {
        throw new Error(`line ${event.line}: cannot show this "${event.event}" event (${error.message})`);
      }
    }
    if (!ended) timeline.append(renderUnfinished(turns + 1));
    state.turns = turns;
    state.last = turns + 1;
  }

  // ---------------------------------------------------------------- walking

  function show(view, position) {
    state.view = view;
    state.position = view === "all" ? state.last : Math.min(Math.max(position, 1), state.last);
    document.body.dataset.view = view;
    let current = null;
    for (const node of $("timeline").children) {
      const at = Number(node.dataset.position);
      node.hidden = at > state.position;
      const isCurrent = view === "step" && at === state.position && !current;
      node.classList.toggle("current", isCurrent);
      if (isCurrent) current = node;
    }
    $("prev").disabled = state.last <= 1 || (view === "step" && state.position <= 1);
    $("next").disabled = state.last < 1 || (view === "step" && state.position >= state.last);
    $("all").disabled = view === "all";
    $("all").setAttribute("aria-pressed", String(view === "all"));
    $("position").textContent = view === "all"
      ? `all ${plural(state.turns, "step")}`
      : state.position > state.turns ? `end (after ${plural(state.turns, "step")})` : `step ${state.position} of ${state.turns}`;
    if (current && typeof current.scrollIntoView === "function") current.scrollIntoView({ block: "nearest" });
  }

  function previous() {
    if (!$("prev").disabled) show("step", state.view === "all" ? state.last - 1 : state.position - 1);
  }

  function next() {
    if (!$("next").disabled) show("step", state.view === "all" ? 1 : state.position + 1);
  }

  // ---------------------------------------------------------------- loading

  function fail(message) {
    state.events = [];
    $("run").hidden = true;
    $("intro").hidden = false;
    for (const id of ["prev", "next", "all"]) $(id).disabled = true;
    $("position").textContent = "";
    showError(message);
    document.body.dataset.state = "error";
  }

  /** Show the trace in ``text``; ``source`` names it (file name or URL). */
  function load(text, source) {
    clearError();
    state.source = source || "";
    $("source").textContent = state.source;
    let events;
    try {
      events = parseTrace(text);
      renderHeader(events[0]);
      renderEvents(events);
    } catch (error) {
      fail(`${state.source ? `${state.source}: ` : ""}${error.message}`);
      return false;
    }
    state.events = events;
    $("intro").hidden = true;
    $("run").hidden = false;
    document.body.dataset.state = "shown";
    show("all");
    return true;
  }

  async function loadFile(file) {
    if (!file) return;
    document.body.dataset.state = "loading";
    try {
      load(await file.text(), file.name);
    } catch (error) {
      fail(`${file.name}: cannot read the file (${error.message})`);
    }
  }

  async function loadUrl(address) {
    let url;
    try {
      url = new URL(address, window.location.href);
    } catch {
      fail(`${address}: not a URL`);
      return;
    }
    if (url.origin !== window.location.origin) {
      fail(`${address}: only traces on this server are opened (${window.location.origin})`);
      return;
    }
    document.body.dataset.state = "loading";
    try {
      const response = await fetch(url, { credentials: "same-origin" });
      if (!response.ok) throw new Error(`HTTP ${response.status}${response.statusText ? ` ${response.statusText}` : ""}`);
      load(await response.text(), address);
    } catch (error) {
      fail(`${address}: cannot load the trace (${error.message})`);
    }
  }

  // ---------------------------------------------------------------- wiring

  $("file").addEventListener("change", () => loadFile($("file").files[0]));
  $("prev").addEventListener("click", previous);
  $("next").addEventListener("click", next);
  $("all").addEventListener("click", () => show("all"));
  $("error-close").addEventListener("click", clearError);

  document.addEventListener("keydown", (event) => {
    if (event.altKey || event.ctrlKey || event.metaKey || !state.events.length) return;
    if (event.target.closest && event.target.closest("input, textarea, select")) return;
    if (event.key === "ArrowLeft") previous();
    else if (event.key === "ArrowRight") next();
  });

  const carriesFiles = (event) => event.dataTransfer && Array.from(event.dataTransfer.types || []).includes("Files");
  document.addEventListener("dragover", (event) => {
    if (!carriesFiles(event)) return;
    event.preventDefault();
    event.dataTransfer.dropEffect = "copy";
    document.body.classList.add("dragging");
  });
  document.addEventListener("dragleave", (event) => {
    if (!event.relatedTarget) document.body.classList.remove("dragging");
  });
  document.addEventListener("drop", (event) => {
    if (!carriesFiles(event)) return;
    event.preventDefault();
    document.body.classList.remove("dragging");
    loadFile(event.dataTransfer.files[0]);
  });

  const address = new URLSearchParams(window.location.search).get("trace");
  if (address) loadUrl(address);

  window.lmforge = { state, load, show };
})();
