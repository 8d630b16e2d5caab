"""``POST /v1/inspect`` on the live server: the inspector's views as the Inspect page gets them, the same
numbers as the Python API, what the server's prefix cache holds of the text, and 400s for bad input."""

from __future__ import annotations

import httpx
import numpy as np

from lmforge.inspector import inspect_text
from lmforge.inspector.terminal import attention_array

TEXT = "Paris is the capital of France. The quick brown fox"


def inspect(url: str, **body) -> httpx.Response:
    return httpx.post(url + "/v1/inspect", json={"text": TEXT, **body}, timeout=60)


def test_the_views_match_the_python_api(live_server, tiny_lm):
    answer = inspect(live_server, layer=1, head=2, position=4, temperature=0.5, top_k=3, kv_steps=2)
    assert answer.status_code == 200, answer.text
    data = answer.json()
    seen = inspect_text(tiny_lm, TEXT)
    np.testing.assert_allclose(attention_array(data), seen.attention, atol=1 / 65535)
    assert data["query_keys"]["position"] == 4 and len(data["query_keys"]["keys"]) == len(seen.ids)
    view = seen.next_token(4, temperature=0.5, top_k=3)
    assert data["next"]["kept"] == 3
    assert [c["id"] for c in data["next"]["candidates"]] == [c.id for c in view.candidates]
    assert {c["id"] for c in data["next"]["candidates"] if c["kept"]} == set(view.kept_ids.tolist())
    only_next = inspect(live_server, views=["next"], temperature=0).json()
    assert "attention" not in only_next and only_next["next"]["kept"] == 1


def test_it_says_what_the_prefix_cache_holds_of_the_text(live_server):
    before = inspect(live_server, views=["tokens"]).json()
    tokens = before["count"]["tokens"]
    reply = httpx.post(live_server + "/v1/completions", json={"prompt": TEXT, "max_tokens": 2, "temperature": 0},
                       timeout=60)
    assert reply.status_code == 200
    after = inspect(live_server, views=["tokens"]).json()["server"]
    assert after["text_cached_tokens"] == tokens - 1  # a request with this prompt computes only its last token
    assert after["prompt_tokens"] >= tokens


def test_bad_requests_get_a_400_that_says_why(live_server):
    for body, message in [({"layer": 5}, "layer 5 does not exist"), ({"position": 500}, "position 500 is past"),
                          ({"views": ["colours"]}, "unknown view"), ({"top_p": 0}, "top_p"),
                          ({"text": "word " * 600}, "at most 512")]:
        answer = inspect(live_server, **body)
        assert answer.status_code == 400, (body, answer.text)
        assert message in answer.json()["error"]["message"]
    assert inspect(live_server, views=["tokens"]).status_code == 200  # and it keeps serving
