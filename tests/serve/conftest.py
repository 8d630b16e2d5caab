"""A live `lmforge serve` for the tests: the tiny random-weight model of tests/conftest.py
(``tiny_lm``) behind a real uvicorn server, in a thread on a free loopback port."""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmforge.serve.served_model import ServedModel
from lmforge.serve.server import background_server

MODEL = "tiny"
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


running_server = background_server


@pytest.fixture(scope="session")
def served(tiny_lm) -> ServedModel:
    return ServedModel(MODEL, tiny_lm, max_batch_size=4, context=2048)


@pytest.fixture(scope="session")
def live_server(served) -> Iterator[str]:
    with running_server({MODEL: served}) as url:
        yield url


@pytest.fixture(scope="session")
def start_server():
    """``start_server(models, **create_app options)``: a context manager yielding another server's URL."""
    return running_server


@pytest.fixture
def port() -> int:
    """A free loopback port (for a server the test starts as a subprocess)."""
    return free_port()


def find_chromium(playwright) -> str | None:
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    bundled = playwright.chromium.executable_path  # where `playwright install chromium` puts it
    return bundled if bundled and Path(bundled).exists() else None


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through Playwright: Debian's `chromium` (scripts/test.sh installs it) or
    Playwright's own; the test is skipped without either."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        executable = find_chromium(playwright)
        if executable is None:
            pytest.skip("no Chromium: neither `chromium` on PATH nor a `playwright install chromium` browser")
        browser = playwright.chromium.launch(executable_path=executable)
        yield browser
        browser.close()


def watch(page, allowed) -> list[str]:
    """The problems of ``page`` as they happen: script errors, and requests whose URL ``allowed(url)`` refuses
    (a string: a URL prefix, beside data: URLs). A test asserts the list is empty at its end."""
    if isinstance(allowed, str):
        origin = allowed
        allowed = lambda url: url.startswith((origin, "data:"))  # noqa: E731
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"script error: {error}"))
    page.on("request", lambda request: None if allowed(request.url)
            else problems.append(f"request outside the server: {request.url}"))
    return problems


@pytest.fixture(scope="session")
def watch_page():
    """``watch_page(page, allowed)``: :func:`watch`, for a test that opens its own page."""
    return watch


@pytest.fixture
def page(browser, live_server):
    """A page on the live server; the test fails on a script error or a request off the server."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    problems = watch(page, live_server)
    yield page
    context.close()
    assert not problems, problems
