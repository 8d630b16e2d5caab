"""The chat page of `lmforge serve` in headless Chromium, against a live server.

`live_server` (tests/serve/conftest.py) is the base URL of a server with a tiny random-weight
model whose answers run to max_tokens. The browser is the system's `chromium` (scripts/test.sh
installs Debian's where it can), else one that `playwright install` put in place; without either,
the tests are skipped and say so. The hooks used here are listed at the top of static/app.js.
"""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

# Answer lengths, capped at 1/4 and 1/2 of the model's context: the first long enough to arrive
# over several frames, the second long enough to press Stop while it streams.
FIRST_MAX_TOKENS = 192
LONG_MAX_TOKENS = 1024
STATS = re.compile(r"(\d+) prompt \+ (\d+) completion tokens · ([\d.]+) tok/s")

# Every mutation of #messages records the last answer's rendered text, so that the test sees
# what the page showed while an answer streamed, however fast the model is.
RECORD_ANSWER = """() => {
  window.answerTexts = [];
  const record = () => {
    const answers = document.querySelectorAll('article[data-role=assistant] [data-testid=message-content]');
    const text = answers.length ? answers[answers.length - 1].textContent : '';
    if (window.answerTexts[window.answerTexts.length - 1] !== text) window.answerTexts.push(text);
  };
  new MutationObserver(record).observe(document.getElementById('messages'),
                                       {childList: true, subtree: true, characterData: true});
}"""
LAST_ANSWER = """() => {
  const answers = document.querySelectorAll('article[data-role=assistant] [data-testid=message-content]');
  return answers.length ? answers[answers.length - 1].textContent : null;
}"""

# Markdown with what a model may write: markup of its own, a javascript: link, and a code
# block left open (as while an answer streams).
MARKDOWN = """# Title
Some **bold**, *italic* and `x < y` code; see [docs](https://example.com/a?b=1&c=2).

```python
print('<b>hi</b>')
```

- one
  - nested
2. two

<script>alert(1)</script> <img src=x onerror="alert(1)"> [bad](javascript:alert(1))
```html
<iframe src=x></iframe>"""


@pytest.fixture
def model(live_server) -> dict:
    """The server's first model, as GET /v1/models lists it."""
    with urllib.request.urlopen(live_server + "/v1/models", timeout=10) as response:
        return json.load(response)["data"][0]


@pytest.fixture
def page(browser, live_server, model):
    """A fresh page on the chat UI, whose model picker has listed the server's first model.
    Fails the test on a script error or on any request that leaves the server."""
    context = browser.new_context(accept_downloads=True, viewport={"width": 1200, "height": 800})
    page = context.new_page()
    problems: list[str] = []

    def check_request(request):
        if not request.url.startswith((live_server, "blob:", "data:")):
            problems.append(f"request outside the server: {request.url}")

    page.on("pageerror", lambda error: problems.append(f"script error: {error}"))
    page.on("request", check_request)
    page.goto(live_server + "/")
    expect(page.locator("#model")).to_have_value(model["id"])
    yield page
    context.close()
    assert not problems, problems


def send(page: Page, text: str, max_tokens: int) -> None:
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def run_to_max_tokens(route):
    """Adds the server's `ignore_eos` extension to the page's request: a random-weight model
    samples its end-of-turn token early at random, and these answers must run to max_tokens."""
    body = json.loads(route.request.post_data)
    route.continue_(post_data=json.dumps({**body, "ignore_eos": True}))


def throttle(page: Page, bytes_per_second: int) -> None:
    """Chromium's network throttling: a stream then arrives over many reads, however busy the
    machine, where a fast server's whole answer could otherwise land in one read."""
    devtools = page.context.new_cdp_session(page)
    devtools.send("Network.enable")
    devtools.send(
        "Network.emulateNetworkConditions",
        {"offline": False, "latency": 0, "downloadThroughput": bytes_per_second, "uploadThroughput": -1},
    )


def test_chat_streams_stops_and_exports(page, model):
    page.route("**/v1/chat/completions", run_to_max_tokens)
    throttle(page, 32 * 1024)  # about 150 chunks a second
    page.fill("#system-prompt", "You are a test.")
    page.evaluate(RECORD_ANSWER)

    # 1. An answer streams in: the page shows it growing, then its token counts and speed.
    context_len = model.get("max_model_len", 4 * LONG_MAX_TOKENS)
    first_max_tokens = min(FIRST_MAX_TOKENS, context_len // 4)
    send(page, "Hello there", first_max_tokens)
    expect(page.locator("body")).to_have_attribute("data-state", "idle", timeout=15_000)
    texts = page.evaluate("window.answerTexts")
    final = page.evaluate(LAST_ANSWER)
    assert final, "the first answer is empty"
    shown_before_end = {text for text in texts if text and text != final}
    assert len(shown_before_end) >= 2, f"the answer did not stream: the page showed {texts!r}"
    stats = page.locator("article[data-role=assistant] [data-testid=message-stats]").first
    expect(stats).to_have_text(STATS)
    prompt_tokens, completion_tokens, rate = STATS.search(stats.text_content()).groups()
    assert int(prompt_tokens) > 0 and 0 < int(completion_tokens) <= first_max_tokens and float(rate) > 0

    # 2. A long answer, stopped while it streams: what came stays, and the page is usable again.
    send(page, "Tell me more", min(LONG_MAX_TOKENS, context_len // 2))
    page.wait_for_function(f"() => ({LAST_ANSWER})()?.length > 0", timeout=15_000)
    try:
        page.click("#stop", timeout=2_000)
    except PlaywrightTimeoutError:
        pytest.fail("the answer ended before Stop could be pressed: live_server's model must answer longer")
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    expect(page.locator("#stop")).to_be_hidden()
    expect(page.locator("#send")).to_be_enabled()
    stopped = page.evaluate(LAST_ANSWER)
    page.wait_for_timeout(400)
    assert page.evaluate(LAST_ANSWER) == stopped, "the answer kept growing after Stop"
    assert stopped, "the stopped answer lost what had arrived"
    second_stats = page.locator("article[data-role=assistant] [data-testid=message-stats]").nth(1)
    expect(second_stats).to_contain_text("stopped")  # not "finished before Stop was pressed"
    roles = page.locator("#messages article[data-testid=message]").evaluate_all(
        "els => els.map(e => e.dataset.role)"
    )
    assert roles == ["user", "assistant", "user", "assistant"]
    expect(page.locator("#error")).to_be_hidden()

    # 3. The server still answers after the aborted stream.
    send(page, "And now?", 4)
    expect(page.locator("article[data-testid=message]")).to_have_count(6)
    expect(page.locator("body")).to_have_attribute("data-state", "idle", timeout=15_000)
    expect(page.locator("[data-testid=message-stats]").nth(2)).to_have_text(STATS)

    # 4. Export: OpenAI messages as JSON, the system prompt first, the stopped answer as shown.
    with page.expect_download() as download:
        page.click("#export-json")
    exported = json.loads(Path(download.value.path()).read_text())
    assert exported["model"] == model["id"]
    assert [m["role"] for m in exported["messages"]] == ["system"] + ["user", "assistant"] * 3
    assert exported["messages"][0]["content"] == "You are a test."
    assert exported["messages"][1]["content"] == "Hello there"
    answers = page.evaluate(
        "window.lmforge.state.messages.filter(m => m.role === 'assistant').map(m => m.content)"
    )
    assert [m["content"] for m in exported["messages"][2::2]] == answers
    with page.expect_download() as download:
        page.click("#export-md")
    markdown = Path(download.value.path()).read_text()
    assert "## User\n\nTell me more" in markdown and "## Assistant" in markdown

    # 5. New chat empties the conversation.
    page.click("#new-chat")
    expect(page.locator("article[data-testid=message]")).to_have_count(0)
    expect(page.locator("#export-json")).to_be_disabled()


def test_server_error_is_shown(page, live_server):
    """A request the server refuses: its error.message is shown and the message returns to the box."""
    refused = page.request.post(
        live_server + "/v1/chat/completions",
        data={"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}], "stream": True},
    )
    assert 400 <= refused.status < 500, f"the server accepted an unknown model (HTTP {refused.status})"
    message = refused.json()["error"]["message"]
    page.evaluate(
        "() => { const s = document.getElementById('model'); s.add(new Option('no-such-model')); "
        "s.value = 'no-such-model'; }"
    )
    send(page, "hi", 8)
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error-text")).to_contain_text(message)
    expect(page.locator("article[data-testid=message]")).to_have_count(0)
    expect(page.locator("#prompt")).to_have_value("hi")


def test_markdown_is_rendered_and_never_injects_markup(page):
    html = page.evaluate("markdown => window.lmforge.renderMarkdown(markdown)", MARKDOWN)
    page.evaluate(
        "html => { const d = document.createElement('div'); d.id = 'probe'; d.innerHTML = html; "
        "document.body.append(d); }",
        html,
    )
    probe = page.locator("#probe")
    expect(probe.locator("h1")).to_have_text("Title")
    expect(probe.locator("p strong")).to_have_text("bold")
    expect(probe.locator("p em")).to_have_text("italic")
    expect(probe.locator("p > code")).to_have_text("x < y")
    expect(probe.locator("a")).to_have_attribute("href", "https://example.com/a?b=1&c=2")
    expect(probe.locator(".code-lang").first).to_have_text("python")
    expect(probe.locator("pre code").first).to_have_text("print('<b>hi</b>')")
    expect(probe.locator("[data-testid=copy-code]")).to_have_count(2)
    expect(probe.locator("ul li")).to_have_count(1 + 1)  # "one" and its nested item
    assert probe.locator("script, img, iframe, b, [onerror]").count() == 0
    assert probe.locator("a[href^=javascript]").count() == 0
    expect(probe).to_contain_text('<script>alert(1)</script> <img src=x onerror="alert(1)">')
