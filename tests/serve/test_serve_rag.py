"""The server with an encoder and a knowledge base: /v1/embeddings from the encoder, /v1/rag/ask."""

from __future__ import annotations

import json

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
