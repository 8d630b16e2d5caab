"""The server with an encoder and a knowledge base: /v1/embeddings from the encoder, /v1/rag/ask."""

from __future__ import annotations

import json
import re

import httpx
import numpy as np
import pytest

from lmforge.serve.served_model import ServedModel

MODEL = "tiny"


@pytest.fixture(scope="module")
def rag_server(tmp_path_factory, tiny_lm, start_server):
    from lmforge.embed import load
    from lmforge.rag import KnowledgeBase, index_paths

    folder = tmp_path_factory.mktemp("rag")
    (folder / "docs").mkdir()
    (folder / "docs" / "faq.jsonl").write_text(
        json.dumps({"text": "The capital of France is Paris.", "title": "geo"}) + "\n"
        + json.dumps({"text": "A kettle boils water for tea.", "title": "kitchen"}) + "\n", encoding="utf-8")
    embedder = load("all-minilm-l6-v2", device="cpu")
    index_paths([folder / "docs"], folder / "kb", encoder=embedder, progress=False)
    served = ServedModel(MODEL, tiny_lm, max_batch_size=2, context=2048)
    with start_server({MODEL: served}, embedder=embedder, knowledge_base=KnowledgeBase(folder / "kb")) as url:
        yield url, embedder


def test_embeddings_come_from_the_encoder(rag_server):
    url, embedder = rag_server
    listed = httpx.get(f"{url}/v1/models").json()["data"]
    assert [m["id"] for m in listed] == [MODEL, "all-minilm-l6-v2"] and listed[1]["kind"] == "embedding"
    texts = ["How do I boil water?", "Paris is in France."]
    body = httpx.post(f"{url}/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": texts}).json()
    vectors = np.array([d["embedding"] for d in body["data"]])
    assert body["model"] == "all-minilm-l6-v2" and vectors.shape == (2, 384)
    assert np.abs(vectors - embedder.encode(texts)).max() < 1e-6
    assert body["usage"]["prompt_tokens"] == sum(map(len, embedder.tokenize(texts)))
    one = httpx.post(f"{url}/v1/embeddings", json={"input": "no model named"}).json()  # no chat model named: encoder
    assert len(one["data"][0]["embedding"]) == 384
    chat_model = httpx.post(f"{url}/v1/embeddings", json={"model": MODEL, "input": "x"}).json()  # the decoder's
    assert len(chat_model["data"][0]["embedding"]) == 64
    bad = httpx.post(f"{url}/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": [1, 2, 3]})
    assert bad.status_code == 400 and "text" in bad.json()["error"]["message"]


def test_rag_ask_answers_with_sources_and_says_when_it_cannot(rag_server):
    url, _ = rag_server
    reply = httpx.post(f"{url}/v1/rag/ask", json={"question": "What is the capital of France?", "k": 2,
                                                  "max_tokens": 4}, timeout=60).json()
    assert reply["found"] and reply["model"] == MODEL and isinstance(reply["answer"], str)
    assert [s["number"] for s in reply["sources"]] == [1, 2] and reply["sources"][0]["title"] == "geo"
    lost = httpx.post(f"{url}/v1/rag/ask", json={"question": "Who won the 1998 cup final?", "min_score": 0.9}).json()
    assert (lost["found"], lost["sources"]) == (False, []) and "could not find" in lost["answer"]
    empty = httpx.post(f"{url}/v1/rag/ask", json={"question": "  "})
    assert empty.status_code == 400


def test_a_server_without_a_knowledge_base_says_so(live_server):
    response = httpx.post(f"{live_server}/v1/rag/ask", json={"question": "anything"})
    assert response.status_code == 404 and "--kb" in response.json()["error"]["message"]


def test_the_web_ui_shows_the_sources_of_an_answer(rag_server, browser):
    """With the knowledge-base box ticked, the chat page asks /v1/rag/ask: the answer's [n] link to its
    numbered sources, listed under it with their titles, places and texts, the cited ones marked."""
    from playwright.sync_api import expect

    url, _ = rag_server
    context = browser.new_context()
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    asked = []

    def cite_the_first(route):  # the server's own reply; its random-weight answer swapped for one that cites
        asked.append(json.loads(route.request.post_data))
        reply = route.fetch().json()
        reply["answer"] = "Paris is the capital [1]; kettles [9] are not sources. `x[1]`"
        reply["sources"][0]["cited"] = True
        route.fulfill(json=reply)

    page.route("**/v1/rag/ask", cite_the_first)
    page.goto(url + "/")
    expect(page.locator("#rag-option")).to_be_visible()
    expect(page.locator("#rag-option")).to_have_attribute("title", re.compile("2 chunks of 1 files"))
    page.check("#rag")
    page.fill("#max-tokens", "4")
    page.fill("#prompt", "What is the capital of France?")
    page.press("#prompt", "Enter")
    answer = page.locator("article[data-role=assistant]").last
    expect(answer.locator("[data-testid=source]")).to_have_count(2)
    assert asked == [{"question": "What is the capital of France?", "model": MODEL, "max_tokens": 4}]
    sources = answer.locator("[data-testid=source]")
    assert sources.nth(0).get_attribute("data-cited") == "true" and sources.nth(1).get_attribute("data-cited") == "false"
    assert "[1] geo" in sources.nth(0).locator("summary").inner_text() and "cited" in sources.nth(0).inner_text()
    links = answer.locator("a.citation")
    expect(links).to_have_count(1)  # [9] is no source and the [1] in code stays code
    expect(sources.nth(0).locator(".source-text")).to_be_hidden()
    links.first.click()
    expect(sources.nth(0).locator(".source-text")).to_have_text("The capital of France is Paris.")
    expect(answer.locator("[data-testid=message-stats]")).to_contain_text("2 sources, 1 cited")
    assert "Sources:" in page.evaluate("window.lmforge.conversationMarkdown()")
    context.close()
    assert not errors, errors


def test_the_web_ui_offers_no_knowledge_base_when_the_server_has_none(live_server, browser):
    page = browser.new_page()
    page.goto(live_server + "/")
    page.wait_for_load_state("networkidle")
    assert page.locator("#rag-option").is_hidden()
    page.close()
