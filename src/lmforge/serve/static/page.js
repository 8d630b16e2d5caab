/* What every page of lmforge's web UI shares (index.html, rate.html, agent.html load it first):
 * an element by id, and the error banner (#error holding #error-text and a #error-close button).
 * Plain JavaScript, no build step.
 */
"use strict";

window.lmforgePage = (() => {
  const $ = (id) => document.getElementById(id);

  function showError(message) {
    $("error-text").textContent = message;
    $("error").hidden = false;
  }

  function clearError() {
    $("error").hidden = true;
    $("error-text").textContent = "";
  }

  return { $, showError, clearError };
})();
