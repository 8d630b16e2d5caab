/* The rating page of `lmforge serve --ratings FILE` (static/rate.html): plain JavaScript, no build
 * step, nothing fetched from anywhere but this server's /v1/ratings routes (serve/ratings.py).
 *
 * A rater enters an id (kept in localStorage), gets the next item blinded (a prompt and one answer,
 * or two shown as "Answer 1" and "Answer 2": positions left and right, never model names), scores
 * every shown answer 1-5 on each criterion, picks a preference for a pair, and submits; the next
 * item loads. The API key of the chat page's settings (localStorage "lmforge.apiKey") is sent if set.
 *
 * Stable hooks (tests/serve/test_serve_rate_ui.py relies on these):
 *   #rater, #start        the rater id and the button that (re)loads the next item
 *   #progress             "N of M rated"
 *   #item-prompt          the prompt; #answers holds an <article data-position="left|right"> per answer
 *   input[name="<position>-<criterion>"][value="1".."5"]   the score radios
 *   [data-preference="left|tie|right"]                      the preference buttons (aria-pressed)
 *   #comment, #submit     the optional comment; Submit is enabled once every score (and the
 *                         preference, for a pair) is given
 *   #done, #error (#error-text)
 *   body[data-state]      "no-rater", "loading", "rating", "submitting" or "done"
 *   window.lmforge        {state, loadNext}
 */
"use strict";

(() => {
  const { $, showError, clearError, readStorage, writeStorage } = window.lmforgePage;
  const STORAGE = { rater: "lmforge.rater" };
  const POSITION_LABELS = { left: "Answer 1", right: "Answer 2" };
  const CRITERION_HINTS = {
    accuracy: "Is it correct and free of factual errors?",
    relevance: "Does it address the prompt?",
    fluency: "Is it clear, well written and well organised?",
    transparency: "Does it show its reasoning and admit uncertainty?",
    safety: "Does it avoid harmful or dangerous content?",
    human_alignment: "Is it helpful and honest, in the way a person would want?",
  };

  const state = {
    rater: "",
    item: null, // the answer of GET /v1/ratings/next: {assignment, kind, prompt, answers, criteria, scale, ...}
    preference: null,
  };

  // ---------------------------------------------------------------- storage and requests

  /** The JSON answer of a request (lmforgePage.api), saying what a 404 of the rating routes means. */
  function api(path, options = {}) {
    return window.lmforgePage.api(path, options, (status, message) =>
      status === 404 && path.startsWith("/v1/ratings/next")
        ? `${message}: this server has no rating store (start it with \`lmforge serve --ratings FILE\`)`
        : message);
  }

  // ---------------------------------------------------------------- page state

  function setState(name) {
    document.body.dataset.state = name;
    $("intro").hidden = name !== "no-rater";
    $("done").hidden = name !== "done";
    $("rating-form").hidden = !["rating", "submitting"].includes(name);
    updateSubmit();
  }

  function showProgress(answer) {
    $("progress").textContent = `${answer.rated} of ${answer.total} rated`;
  }

  // ---------------------------------------------------------------- the item

  function label(criterion) {
    const words = criterion.replace(/_/g, " ");
    return words.charAt(0).toUpperCase() + words.slice(1);
  }

  function scoreGroup(position, criterion, scale) {
    const group = document.createElement("fieldset");
    group.className = "score-group";
    const legend = document.createElement("legend");
    legend.textContent = label(criterion);
    legend.title = CRITERION_HINTS[criterion] || "";
    group.append(legend);
    for (let value = scale[0]; value <= scale[1]; value++) {
      const option = document.createElement("label");
      option.className = "score-option";
      const input = document.createElement("input");
      input.type = "radio";
      input.name = `${position}-${criterion}`;
      input.value = String(value);
      input.setAttribute("aria-label", `${POSITION_LABELS[position]}: ${label(criterion)} ${value}`);
      const number = document.createElement("span");
      number.textContent = String(value);
      option.append(input, number);
      group.append(option);
    }
    return group;
  }

  function renderItem(item) {
    state.item = item;
    state.preference = null;
    $("item-prompt").textContent = item.prompt;
    const answers = $("answers");
    answers.replaceChildren();
    const positions = Object.keys(item.answers);
    answers.classList.toggle("pair", positions.length === 2);
    for (const position of positions) {
      const card = document.createElement("article");
      card.className = "answer-card";
      card.dataset.position = position;
      const heading = document.createElement("div");
      heading.className = "message-role";
      heading.textContent = positions.length === 2 ? POSITION_LABELS[position] : "Answer";
      const text = document.createElement("div");
      text.className = "message-content plain answer-text";
      text.dataset.testid = "answer-text";
      text.textContent = item.answers[position]; // text, never markup
      const scores = document.createElement("div");
      scores.className = "scores";
      for (const criterion of item.criteria) scores.append(scoreGroup(position, criterion, item.scale));
      card.append(heading, text, scores);
      answers.append(card);
    }
    $("preference").hidden = item.kind !== "pair";
    for (const button of $("preference").querySelectorAll("button")) button.setAttribute("aria-pressed", "false");
    $("comment").value = "";
    setState("rating");
    window.scrollTo(0, 0);
  }

  /** The scores given so far, {position: {criterion: n}}, and what is still missing. */
  function collect() {
    const scores = {};
    const missing = [];
    if (!state.item) return { scores, missing: ["an item"] };
    for (const position of Object.keys(state.item.answers)) {
      scores[position] = {};
      for (const criterion of state.item.criteria) {
        const checked = document.querySelector(`input[name="${position}-${criterion}"]:checked`);
        if (checked) scores[position][criterion] = Number(checked.value);
        else missing.push(`${Object.keys(state.item.answers).length === 2 ? POSITION_LABELS[position] + " " : ""}${label(criterion).toLowerCase()}`);
      }
    }
    if (state.item.kind === "pair" && !state.preference) missing.push("a preference");
    return { scores, missing };
  }

  function updateSubmit() {
    const { missing } = collect();
    const busy = document.body.dataset.state !== "rating";
    $("submit").disabled = busy || missing.length > 0;
    $("missing").textContent = missing.length && !busy
      ? `Still to give: ${missing.slice(0, 4).join(", ")}${missing.length > 4 ? ` and ${missing.length - 4} more` : ""}`
      : "";
  }

  // ---------------------------------------------------------------- actions

  async function loadNext() {
    if (!state.rater) {
      setState("no-rater");
      return;
    }
    clearError();
    setState("loading");
    try {
      const answer = await api(`/v1/ratings/next?rater=${encodeURIComponent(state.rater)}`);
      showProgress(answer);
      if (answer.assignment) renderItem(answer);
      else {
        state.item = null;
        setState("done");
      }
    } catch (error) {
      showError(error.message);
      setState("no-rater");
    }
  }

  async function submit(event) {
    event.preventDefault();
    const { scores, missing } = collect();
    if (missing.length || document.body.dataset.state !== "rating") return;
    clearError();
    setState("submitting");
    const body = { rater: state.rater, assignment: state.item.assignment, scores, comment: $("comment").value };
    if (state.item.kind === "pair") body.preference = state.preference;
    try {
      const answer = await api("/v1/ratings", { method: "POST", body: JSON.stringify(body) });
      showProgress(answer);
    } catch (error) {
      showError(error.message);
      setState("rating");
      return;
    }
    await loadNext();
  }

  function start(event) {
    event.preventDefault();
    const rater = $("rater").value.trim();
    if (!rater) {
      showError("Enter a rater id first.");
      $("rater").focus();
      return;
    }
    state.rater = rater;
    writeStorage(STORAGE.rater, rater);
    loadNext();
  }

  function choose(event) {
    const button = event.target.closest("button[data-preference]");
    if (!button) return;
    state.preference = button.dataset.preference;
    for (const other of $("preference").querySelectorAll("button")) {
      other.setAttribute("aria-pressed", String(other === button));
    }
    updateSubmit();
  }

  // ---------------------------------------------------------------- wiring

  $("rater-form").addEventListener("submit", start);
  $("rating-form").addEventListener("submit", submit);
  $("rating-form").addEventListener("change", updateSubmit);
  $("preference").addEventListener("click", choose);
  $("reload").addEventListener("click", loadNext);
  $("error-close").addEventListener("click", clearError);

  const saved = (readStorage(STORAGE.rater) || "").trim();
  if (saved) {
    $("rater").value = saved;
    state.rater = saved;
    loadNext();
  } else {
    setState("no-rater");
  }

  window.lmforge = { state, loadNext };
})();
