/* What every page of lmforge's web UI shares (index.html, rate.html, agent.html, inspect.html load it first):
 * an element by id, the error banner (#error holding #error-text and a #error-close button), a new element,
 * the browser's storage (which may be switched off), and requests to the server's API with the chat page's
 * API key. Plain JavaScript, no build step.
 */
"use strict";

window.lmforgePage = (() => {
  const $ = (id) => document.getElementById(id);
  const API_KEY = "lmforge.apiKey"; // set in the chat page's settings

  function showError(message) {
    $("error-text").textContent = message;
    $("error").hidden = false;
  }

  function clearError() {
    $("error").hidden = true;
    $("error-text").textContent = "";
  }

  /** A new element with a class and text (either may be empty). */
  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function readStorage(key) {
    try {
      return localStorage.getItem(key);
    } catch {
      return null; // storage switched off: settings last for this page only
    }
  }

  /** Keep ``value`` under ``key``; an empty value removes it. */
  function writeStorage(key, value) {
    try {
      if (value) localStorage.setItem(key, value);
      else localStorage.removeItem(key);
    } catch {
      /* storage switched off */
    }
  }

  /** JSON request headers, with the API key when one is set. */
  function headers() {
    const key = (readStorage(API_KEY) || "").trim();
    const result = { "Content-Type": "application/json" };
    if (key) result.Authorization = `Bearer ${key}`;
    return result;
  }

  /** The JSON answer of a request, or an Error carrying the server's error.message and the HTTP status;
   * ``explain(status, message)`` may add a page's own advice to the message. */
  async function api(path, options = {}, explain = null) {
    const response = await fetch(path, { ...options, headers: headers(), credentials: "same-origin" });
    const text = await response.text();
    let body = null;
    try {
      body = JSON.parse(text);
    } catch {
      /* not JSON: the text says what happened */
    }
    if (!response.ok) {
      let message = (body && body.error && (body.error.message || JSON.stringify(body.error))) ||
        text.trim().slice(0, 500) || response.statusText;
      if (explain) message = explain(response.status, message);
      if (response.status === 401) message += ". Set the API key in the chat page's settings.";
      throw new Error(`${message} (HTTP ${response.status})`);
    }
    return body;
  }

  return { $, showError, clearError, element, readStorage, writeStorage, headers, api };
})();
