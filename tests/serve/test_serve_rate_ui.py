"""The rating routes (serve/ratings.py) over HTTP, and the rating page (static/rate.html) in headless
Chromium, against a live server with a RatingStore: blinded items, validation errors in OpenAI's
error shape, and ratings submitted in the browser that the report then counts.

The browser is found as in test_serve_ui.py: the system's `chromium`, else Playwright's own; without
either the browser test is skipped and says so.
"""

from __future__ import annotations

import httpx
import pytest

from lmforge.eval.human import CRITERIA, human_report
from lmforge.serve.served_model import ServedModel

MODEL = "tiny"


def scores(value: int) -> dict[str, int]:
    return dict.fromkeys(CRITERIA, value)


@pytest.fixture
def rating_server(tiny_lm, start_server, store):
    """A live server with the rating routes over ``store``; yields its base URL."""
    with start_server({MODEL: ServedModel(MODEL, tiny_lm, max_batch_size=1)}, ratings=store) as url:
        yield url


def assert_error(response: httpx.Response, status: int, message: str, param: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert message in error["message"], error
    if param is not None:
        assert error["param"] == param, error


def test_rating_routes(rating_server, store):
    with httpx.Client(base_url=rating_server, timeout=10) as http:
        pair = http.post("/v1/ratings/items", json={"prompt": "Capital of France?", "answer_a": "Paris",
                                                    "answer_b": "Lyon", "model_a": "model-x", "model_b": "model-y"})
        assert pair.status_code == 200 and pair.json() == {"object": "rating.item", "id": 1}
        single = http.post("/v1/ratings/items", json={"prompt": "Say hi", "answers": ["hi"], "models": [MODEL]})
        assert single.json()["id"] == 2
        assert_error(http.post("/v1/ratings/items", json={"answer": "x"}), 400, "prompt: must be a non-empty string",
                     "prompt")
        assert_error(http.post("/v1/ratings/items", json=["x"]), 400, "body")
        assert http.get("/v1/ratings/summary").json() == {
            "object": "rating.summary", "items": 2, "pairs": 1, "singles": 1, "ratings": 0, "raters": 0,
            "ratings_per_rater": {}}

        assert_error(http.get("/v1/ratings/next"), 400, "give a rater id", "rater")
        seen = {}
        for _ in range(2):
            shown = http.get("/v1/ratings/next", params={"rater": "ann"}).json()
            assert shown["criteria"] == list(CRITERIA) and shown["scale"] == [1, 5]
            assert "model" not in str(shown["answers"]) and "model-x" not in str(shown) and "id" not in shown
            token = shown["assignment"]
            if shown["kind"] == "pair":
                assert set(shown["answers"].values()) == {"Paris", "Lyon"}
                bad = {"left": scores(3) | {"accuracy": 9}, "right": scores(3)}
                assert_error(http.post("/v1/ratings", json={"rater": "ann", "assignment": token, "scores": bad,
                                                            "preference": "left"}),
                             400, "9 is not an integer from 1 to 5", "scores.left.accuracy")
                assert_error(http.post("/v1/ratings", json={"rater": "ann", "assignment": token,
                                                            "scores": {"left": scores(3), "right": scores(3)}}),
                             400, "preference: None is not one of left, right, tie", "preference")
                paris = "left" if shown["answers"]["left"] == "Paris" else "right"
                body = {"rater": "ann", "assignment": token, "preference": paris, "comment": "Lyon is wrong",
                        "scores": {paris: scores(5), "right" if paris == "left" else "left": scores(1)}}
            else:
                assert shown["answers"] == {"left": "hi"}
                body = {"rater": "ann", "assignment": token, "scores": {"left": scores(4)}}
            assert_error(http.post("/v1/ratings", json={**body, "rater": "bob"}), 400, "another rater", "rater")
            rated = http.post("/v1/ratings", json=body)
            assert rated.status_code == 200, rated.text
            seen[shown["kind"]] = token
            assert rated.json()["rated"] == len(seen) and rated.json()["total"] == 2
            assert_error(http.post("/v1/ratings", json=body), 409, "has rated this item already", "assignment")
        done = http.get("/v1/ratings/next", params={"rater": "ann"}).json()
        assert done["assignment"] is None and (done["rated"], done["total"]) == (2, 2)

        assert_error(http.post("/v1/ratings", json={"rater": "ann", "assignment": "nope", "scores": {}}), 404,
                     "no assignment 'nope'", "assignment")
        assert_error(http.post("/v1/ratings", content=b"{not json", headers={"Content-Type": "application/json"}),
                     400, "not valid JSON")
        summary = http.get("/v1/ratings/summary").json()
        assert (summary["ratings"], summary["raters"], summary["ratings_per_rater"]) == (2, 1, {"ann": 2})

    pair_rating = next(r for r in store.ratings() if r.item.is_pair)
    assert pair_rating.preference == "a" and pair_rating.scores["a"] == scores(5)  # Paris, un-blinded
    assert pair_rating.comment == "Lyon is wrong"
    assert human_report(store)["win_rates"][0]["wins"] == 1  # model-x over model-y


def test_rating_routes_need_the_store_and_the_key(tiny_lm, start_server, store):
    with start_server({MODEL: ServedModel(MODEL, tiny_lm, max_batch_size=1)}) as url:
        assert_error(httpx.get(url + "/v1/ratings/next", params={"rater": "ann"}), 404, "Not Found")
    with start_server({MODEL: ServedModel(MODEL, tiny_lm, max_batch_size=1)}, api_key="secret", ratings=store) as url:
        assert_error(httpx.get(url + "/v1/ratings/summary"), 401, "API key")
        assert httpx.get(url + "/v1/ratings/summary", headers={"Authorization": "Bearer secret"}).status_code == 200


# ---- the page in a browser --------------------------------------------------------------------------

def test_rating_page_submits_ratings_the_report_counts(browser, rating_server, store, watch_page):
    from playwright.sync_api import expect

    store.add_item("Capital of France?", "Paris", "Lyon", model_a="model-x", model_b="model-y")
    store.add_item("Say hi", "hi <b>there</b>", model_a="model-x")
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    problems = watch_page(page, rating_server)

    page.goto(rating_server + "/static/rate.html")
    expect(page.locator("body")).to_have_attribute("data-state", "no-rater")
    page.fill("#rater", "carol")
    page.click("#start")
    for number in (1, 2):
        expect(page.locator("body")).to_have_attribute("data-state", "rating")
        expect(page.locator("#progress")).to_have_text(f"{number - 1} of 2 rated")
        cards = page.locator("#answers article")
        positions = cards.evaluate_all("cards => cards.map(c => c.dataset.position)")
        assert "model-x" not in page.inner_text("body") and "model-y" not in page.inner_text("body")
        expect(page.locator("#submit")).to_be_disabled()
        for position in positions:
            for criterion in CRITERIA:
                page.check(f'input[name="{position}-{criterion}"][value="4"]')
        if positions == ["left", "right"]:
            expect(page.locator("#answers article .message-role")).to_have_text(["Answer 1", "Answer 2"])
            expect(page.locator("#submit")).to_be_disabled()  # the preference is still missing
            page.check('input[name="left-accuracy"][value="5"]')
            page.click('[data-preference="left"]')
            expect(page.locator('[data-preference="left"]')).to_have_attribute("aria-pressed", "true")
            left_answer = page.inner_text('#answers article[data-position="left"] .answer-text')
        else:
            assert positions == ["left"]
            expect(page.locator("#preference")).to_be_hidden()
            expect(page.locator(".answer-text")).to_have_text("hi <b>there</b>")  # text, not markup
            page.fill("#comment", "friendly")
        page.click("#submit")
    expect(page.locator("body")).to_have_attribute("data-state", "done")
    expect(page.locator("#done")).to_be_visible()
    expect(page.locator("#progress")).to_have_text("2 of 2 rated")

    page.reload()  # the rater id is remembered
    expect(page.locator("#rater")).to_have_value("carol")
    expect(page.locator("body")).to_have_attribute("data-state", "done")
    context.close()
    assert not problems, problems

    report = human_report(store)
    assert report["ratings"] == 2 and report["raters"] == 1 and report["ratings_per_rater"] == {"carol": 2}
    pair = next(r for r in store.ratings() if r.item.is_pair)
    assert pair.item.answer(pair.preference) == left_answer  # the answer shown left was preferred
    assert pair.scores[pair.preference]["accuracy"] == 5
    assert report["scores"]["model-x"]["fluency"]["n"] == 2
    single = next(r for r in store.ratings() if not r.item.is_pair)
    assert single.comment == "friendly" and single.scores == {"a": scores(4)}
