"""Human evaluation (lmforge.eval.human): the rating store, blinding, the report's numbers, the export.

Krippendorff's alpha is checked against Krippendorff's own worked example (2011) and against the
`krippendorff` package on random data with missing values; the t quantiles against the tables.
"""

from __future__ import annotations

import json
import math
import statistics
import threading

import numpy as np
import pytest

from lmforge.errors import InputError
from lmforge.eval.human import (
    CRITERIA,
    AlreadyRated,
    RatingStore,
    UnknownAssignment,
    export_preferences,
    format_report,
    human_report,
    krippendorff_alpha,
    read_prompts,
    t_quantile,
)


def uniform(score: int) -> dict[str, int]:
    return dict.fromkeys(CRITERIA, score)


def rate_stored(store: RatingStore, rater: str, plan: dict[int, tuple]) -> None:
    """Rate every item of ``plan`` ({item id: (score of a, score of b or None, preference a/b/tie/None)})
    as ``rater``, through the blinded interface: positions are mapped from what the store showed."""
    for _ in plan:
        shown = store.next_item(rater)
        score_a, score_b, preference = plan[shown.item.id]
        by_side = {"a": score_a, "b": score_b}
        scores = {"left": uniform(by_side[shown.side("left")])}
        if shown.item.is_pair:
            scores["right"] = uniform(by_side[shown.side("right")])
        position = {shown.side("left"): "left", shown.side("right"): "right", "tie": "tie"}.get(preference)
        store.rate(shown.token, scores, position, rater=rater)
    assert store.next_item(rater) is None


# ---- the store ------------------------------------------------------------------------------------

def test_store_round_trip(tmp_path):
    path = tmp_path / "ratings.sqlite"
    store = RatingStore(path)
    pair = store.add_item("What is 2+2?", "4", "5", model_a="sft", model_b="base")
    single = store.add_item("Say hi", "hi", model_a="sft")
    lines = [{"prompt": "p1", "answer_a": "x", "answer_b": "y", "model_a": "m1", "model_b": "m2"},
             {"prompt": "p2", "answers": ["only"], "models": ["m1"]},
             {"prompt": "p3", "answers": ["u", "v"], "models": ["m2", "m1"]},
             {"prompt": "p4", "answer": "w"}]
    (tmp_path / "items.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    assert store.import_jsonl(tmp_path / "items.jsonl") == 4
    assert store.import_jsonl(tmp_path / "items.jsonl") == 0  # given again (a server restart): nothing new
    shown = store.next_item("ann")
    store.rate(shown.token, {p: uniform(3) for p in shown.blinded()["answers"]},
               "tie" if shown.item.is_pair else None, comment="fine")
    store.close()

    again = RatingStore(path)
    items = again.items()
    assert [(i.prompt, i.answer_a, i.answer_b, i.model_a, i.model_b) for i in items] == [
        ("What is 2+2?", "4", "5", "sft", "base"), ("Say hi", "hi", None, "sft", None),
        ("p1", "x", "y", "m1", "m2"), ("p2", "only", None, "m1", None), ("p3", "u", "v", "m2", "m1"),
        ("p4", "w", None, "unknown", None)]
    assert [i.id for i in items][:2] == [pair, single]
    (rating,) = again.ratings()
    assert rating.rater == "ann" and rating.comment == "fine" and rating.item.id == shown.item.id
    assert rating.scores["a"] == uniform(3)
    assert again.summary() == {"items": 6, "pairs": 3, "singles": 3, "ratings": 1, "raters": 1,
                               "ratings_per_rater": {"ann": 1}}
    assert again.progress("ann") == (1, 6)
    again.close()


def test_next_item_is_blind_and_rate_unblinds(store):
    for k in range(10):
        store.add_item(f"prompt {k}", f"answer a{k}", f"answer b{k}", model_a="model-a", model_b="model-b")
    orders, lefts = {}, []
    for rater in ("ann", "bob"):
        seen = []
        while (shown := store.next_item(rater)) is not None:
            assert store.next_item(rater).token == shown.token  # the same item until it is rated
            blinded = shown.blinded()
            assert set(blinded) == {"assignment", "kind", "prompt", "answers"} and blinded["kind"] == "pair"
            assert "model" not in json.dumps(blinded)
            assert blinded["answers"]["left"] == f"answer {shown.left}{shown.item.prompt[-1]}"
            lefts.append(shown.left)
            # the left answer is better on every criterion, and preferred
            store.rate(shown.token, {"left": uniform(5), "right": uniform(1)}, "left", rater=rater)
            seen.append(shown.item.id)
        orders[rater] = seen
    assert sorted(orders["ann"]) == sorted(orders["bob"]) == list(range(1, 11))
    assert orders["ann"] != orders["bob"], "each rater gets an order of their own"
    assert 0 < lefts.count("a") < len(lefts), "pairs are shown both ways round"
    for rating in store.ratings():  # stored un-blinded: the answer shown left won and got the 5s
        assert rating.preference == rating.left
        assert rating.scores[rating.left] == uniform(5)
        assert rating.scores["b" if rating.left == "a" else "a"] == uniform(1)


def test_concurrent_raters_all_land(store):
    for k in range(6):
        store.add_item(f"p{k}", "x", "y", model_a="m1", model_b="m2")
    errors = []

    def work(rater):
        try:
            rate_stored(store, rater, {i: (4, 2, "a") for i in range(1, 7)})
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(f"r{n}",)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert store.summary()["ratings"] == 24


@pytest.mark.parametrize(("scores", "preference", "message"), [
    ({"left": uniform(3) | {"accuracy": 0}, "right": uniform(3)}, "left", "scores.left.accuracy: 0 is not an integer from 1 to 5"),
    ({"left": uniform(3), "right": uniform(3) | {"safety": 6}}, "left", "scores.right.safety: 6"),
    ({"left": uniform(3) | {"fluency": 3.5}, "right": uniform(3)}, "tie", "scores.left.fluency: 3.5"),
    ({"left": uniform(3) | {"fluency": True}, "right": uniform(3)}, "tie", "scores.left.fluency: True"),
    ({"left": uniform(3) | {"fluency": "4"}, "right": uniform(3)}, "tie", "scores.left.fluency: '4'"),
    ({"left": uniform(3) | {"humour": 3}, "right": uniform(3)}, "tie", "unknown criterion 'humour'; the criteria are accuracy"),
    ({"left": {c: 3 for c in CRITERIA[:4]}, "right": uniform(3)}, "tie", "scores.left: missing safety, human_alignment"),
    ({"left": uniform(3)}, "tie", "scores.right: missing"),
    ({"left": uniform(3), "right": uniform(3), "middle": uniform(3)}, "tie", "unexpected answer 'middle'"),
    ({"left": uniform(3), "right": uniform(3)}, None, "preference: None is not one of left, right, tie"),
    ({"left": uniform(3), "right": uniform(3)}, "both", "preference: 'both'"),
    ("great", "tie", "scores: give an object"),
])
def test_rate_rejects_bad_ratings(store, scores, preference, message):
    store.add_item("p", "x", "y", model_a="m1", model_b="m2")
    shown = store.next_item("ann")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.").replace("?", r"\?")):
        store.rate(shown.token, scores, preference)
    assert store.ratings() == []


def test_rate_rejects_wrong_use(store, tmp_path):
    store.add_item("single", "x", model_a="m1")
    shown = store.next_item("ann")
    with pytest.raises(ValueError, match="unexpected answer 'right'"):
        store.rate(shown.token, {"left": uniform(3), "right": uniform(3)})
    with pytest.raises(ValueError, match="a single answer takes no preference"):
        store.rate(shown.token, {"left": uniform(3)}, "left")
    with pytest.raises(ValueError, match="another rater"):
        store.rate(shown.token, {"left": uniform(3)}, rater="bob")
    with pytest.raises(UnknownAssignment, match="no assignment 'nope'"):
        store.rate("nope", {"left": uniform(3)})
    store.rate(shown.token, {"left": uniform(3)}, rater="ann")
    with pytest.raises(AlreadyRated, match="'ann' has rated this item already"):
        store.rate(shown.token, {"left": uniform(4)})
    with pytest.raises(ValueError, match="rater: give a rater id"):
        store.next_item("  ")
    with pytest.raises(ValueError, match="prompt: must be a non-empty string"):
        store.add_item("", "x")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "p", "answer": "a"}\n{"prompt": "p", "answers": []}\n')
    with pytest.raises(InputError, match=r"bad\.jsonl:2: answers: must be a list of one or two"):
        store.import_jsonl(tmp_path / "bad.jsonl")
    assert len(store.items()) == 1  # all or nothing


# ---- the report -----------------------------------------------------------------------------------

# Three pairs (a: sft, b: base) rated by ann and bob, and one single answer rated by ann only.
ANN = {1: (5, 2, "a"), 2: (4, 2, "a"), 3: (3, 3, "tie"), 4: (4, None, None)}
BOB = {1: (5, 1, "a"), 2: (4, 3, "b"), 3: (4, 3, "a")}


@pytest.fixture
def rated(store) -> RatingStore:
    for k in range(3):
        store.add_item(f"prompt {k + 1}", f"sft answer {k + 1}", f"base answer {k + 1}", model_a="sft", model_b="base")
    rate_stored(store, "bob", BOB)
    store.add_item("prompt 4", "sft alone", model_a="sft")  # after bob is done: ann alone rates it
    rate_stored(store, "ann", ANN)
    return store


def test_report_numbers(rated):
    report = human_report(rated)
    assert (report["ratings"], report["raters"], report["items"], report["rated_items"]) == (7, 2, 4, 4)
    assert report["ratings_per_rater"] == {"ann": 4, "bob": 3}

    sft = [5, 4, 3, 4, 5, 4, 4]  # ann's four (the single answer too), then bob's three
    base = [2, 2, 3, 1, 3, 3]
    for model, values, t in (("sft", sft, 2.446912), ("base", base, 2.570582)):  # t(0.975; 6), t(0.975; 5)
        for criterion in CRITERIA:
            s = report["scores"][model][criterion]
            half = t * statistics.stdev(values) / math.sqrt(len(values))
            assert s["n"] == len(values)
            assert s["mean"] == pytest.approx(statistics.mean(values))
            assert (s["ci_low"], s["ci_high"]) == pytest.approx((s["mean"] - half, s["mean"] + half), abs=1e-5)

    # base against sft: base won bob's item 2; lost ann's 1, 2 and bob's 1, 3; ann's 3 a tie.
    assert report["win_rates"] == [{"model": "base", "opponent": "sft", "wins": 1, "losses": 4, "ties": 1,
                                    "n": 6, "win_rate": pytest.approx(1.5 / 6)}]

    agreement = report["agreement"]
    # preference, nominal, by hand: o_aa = 2, o_ab = o_ba = o_at = o_ta = 1; n_a, n_b, n_tie = 4, 1, 1;
    # D_o = 4/6, D_e = (36 - 16 - 1 - 1) / 30; alpha = 1 - D_o / D_e = -1/9
    assert agreement["preference"] == {"alpha": pytest.approx(-1 / 9), "units": 3}
    units = [[5, 5], [4, 4], [3, 4], [2, 1], [2, 3], [3, 3]]  # (item, answer): ann's and bob's score
    for criterion in CRITERIA:
        assert agreement[criterion] == {"alpha": pytest.approx(krippendorff_alpha(units, "ordinal")), "units": 6}
    assert agreement["all_criteria"]["units"] == 6 * len(CRITERIA)
    assert (report["multi_rater_items"], report["single_rater_items"]) == (3, 1)

    markdown = format_report(report)
    assert "7 ratings by 2 raters of 4 of 4 items (3 pairs)." in markdown
    assert f"| sft | 7 | {statistics.mean(sft):.2f} [" in markdown
    assert "| base | sft | 1 | 4 | 1 | 6 | 0.250 |" in markdown
    assert "| preference (nominal) | -0.111 | 3 |" in markdown
    assert "1 have one and do not count towards agreement" in markdown
    json.dumps(report)  # JSON-ready


def test_report_without_ratings_or_second_rater(store):
    store.add_item("p", "x", "y", model_a="m1", model_b="m2")
    empty = human_report(store)
    assert empty["ratings"] == 0 and empty["scores"] == {} and empty["win_rates"] == []
    assert "Agreement is undefined" in format_report(empty)
    rate_stored(store, "ann", {1: (4, 4, "tie")})
    one = human_report(store)
    assert one["scores"]["m1"]["accuracy"] == {"mean": 4, "n": 1, "sd": None, "ci_low": None, "ci_high": None}
    assert one["agreement"]["accuracy"] == {"alpha": None, "units": 0}
    assert one["win_rates"][0]["win_rate"] == 0.5
    assert "| m1 | 1 | 4.00 |" in format_report(one)


def test_export_preferences(rated, tmp_path):
    path = tmp_path / "prefs.jsonl"
    assert export_preferences(rated, path) == 5  # one line per non-tie preference
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    by_rater = {(x["rater"], x["item"]): x for x in lines}
    assert set(by_rater) == {("ann", 1), ("ann", 2), ("bob", 1), ("bob", 2), ("bob", 3)}
    bob_2 = by_rater[("bob", 2)]
    assert (bob_2["prompt"], bob_2["chosen"], bob_2["rejected"]) == ("prompt 2", "base answer 2", "sft answer 2")
    assert (bob_2["chosen_model"], bob_2["rejected_model"]) == ("base", "sft")
    assert bob_2["criteria"] == {"chosen": uniform(3), "rejected": uniform(4)}

    assert export_preferences(rated, path, majority=True) == 2  # item 2 is a 1-1 split
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [(x["item"], x["chosen"], x["votes"]) for x in lines] == [
        (1, "sft answer 1", {"a": 2, "b": 0, "tie": 0}), (3, "sft answer 3", {"a": 1, "b": 0, "tie": 1})]
    assert lines[0]["raters"] == ["ann", "bob"] and lines[0]["criteria"]["chosen"]["accuracy"] == 5


# ---- statistics -----------------------------------------------------------------------------------

# Krippendorff (2011), "Computing Krippendorff's alpha-reliability", section C: 4 observers, 12 units.
TEXTBOOK = [[1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
            [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
            [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
            [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None]]


def test_krippendorff_textbook_example():
    units = [[row[j] for row in TEXTBOOK if row[j] is not None] for j in range(12)]
    assert krippendorff_alpha(units, "nominal") == pytest.approx(0.743, abs=5e-4)
    assert krippendorff_alpha(units, "ordinal") == pytest.approx(0.815, abs=5e-4)
    assert krippendorff_alpha(units, "interval") == pytest.approx(0.849, abs=5e-4)


def test_krippendorff_edge_cases():
    assert krippendorff_alpha([[3, 3], [1, 1], [5, 5, 5]]) == 1.0
    assert math.isnan(krippendorff_alpha([[3], [4]]))  # nothing pairable
    assert math.isnan(krippendorff_alpha([[3, 3], [3, 3]]))  # no variation: undefined
    assert krippendorff_alpha([["a", "b"], ["b", "a"]], "nominal") < 0
    with pytest.raises(ValueError, match="level must be"):
        krippendorff_alpha([[1, 2]], "ratio")


@pytest.mark.parametrize("level", ["nominal", "ordinal", "interval"])
def test_krippendorff_matches_package(level):
    krippendorff = pytest.importorskip("krippendorff")
    rng = np.random.default_rng(0)
    for trial in range(20):
        raters, units = rng.integers(2, 7), rng.integers(3, 40)
        data = rng.integers(1, 6, size=(raters, units)).astype(float)
        if trial % 2:  # agreement above chance: raters near a per-unit truth
            data = np.clip(rng.integers(1, 6, size=units) + rng.integers(-1, 2, size=(raters, units)), 1, 5).astype(float)
        data[rng.random(data.shape) < 0.35] = np.nan
        per_unit = [[v for v in data[:, j] if not np.isnan(v)] for j in range(units)]
        if sum(len(u) >= 2 for u in per_unit) == 0 or len({v for u in per_unit if len(u) >= 2 for v in u}) < 2:
            continue
        expected = krippendorff.alpha(reliability_data=data, level_of_measurement=level)
        assert krippendorff_alpha(per_unit, level) == pytest.approx(expected, abs=1e-10)


def test_t_quantile_matches_tables():
    table = {1: 12.7062, 2: 4.3027, 5: 2.5706, 10: 2.2281, 30: 2.0423, 120: 1.9799}
    for df, value in table.items():
        assert t_quantile(0.95, df) == pytest.approx(value, abs=1e-4)
    assert t_quantile(0.99, 10) == pytest.approx(3.1693, abs=1e-4)
    assert t_quantile(0.95, 1000) == pytest.approx(t_quantile(0.95, 1001), abs=1e-5)  # the two methods meet
    assert t_quantile(0.95, 10**6) == pytest.approx(1.95997, abs=1e-5)


def test_rating_prompts_are_read_as_text_lines_or_jsonl_and_bad_ones_named(tmp_path):
    (tmp_path / "p.txt").write_text("Name a capital.\n\n数字?\n", encoding="utf-8")
    assert read_prompts(tmp_path / "p.txt") == ["Name a capital.", "数字?"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"prompt": 5}\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"p.jsonl:2: .* string 'prompt'"):
        read_prompts(tmp_path / "p.jsonl")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(InputError, match="bad.txt"):
        read_prompts(tmp_path / "bad.txt")
