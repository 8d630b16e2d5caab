"""Evaluation metrics against hand-computed values, naive reference implementations written
here, and outside implementations (rouge-score, scikit-learn, fairlearn)."""

from __future__ import annotations

import math
import random
import statistics

import numpy as np
import pytest

from lmforge.eval.metrics import (
    attack_success_rate,
    aurc,
    bleu,
    bootstrap_stderr,
    brier_score,
    chrf,
    demographic_parity_difference,
    equalized_odds_difference,
    exact_match,
    expected_calibration_error,
    lcs_length,
    mean_stderr,
    normalize_answer,
    performance_drop_rate,
    reliability_bins,
    rouge,
    rouge_tokens,
    selective_auc,
    selective_curve,
    token_f1,
)

# --- answer matching --------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("The  Cat's hat!", "cats hat"),
    ("  an Apple, a pear and THE plum. ", "apple pear and plum"),
    ("U.S.A.", "usa"),
    ("theory anthem", "theory anthem"),  # articles only as whole words
    ("我喜欢猫。", "我喜欢猫"),  # Unicode punctuation is removed too
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_takes_the_best_reference():
    assert exact_match("The Eiffel Tower!", "eiffel tower") == 1.0
    assert exact_match("Paris", ["London", "paris."]) == 1.0
    assert exact_match("Paris, France", ["Paris"]) == 0.0
    assert exact_match("我 喜欢", "我喜欢") == 1.0  # spaces between CJK characters do not matter


def test_token_f1_hand_values():
    # prediction tokens {cat, sat}, reference {cat, sat, down}: P = 1, R = 2/3 -> F1 = 0.8
    assert token_f1("The cat sat.", "a cat sat down") == pytest.approx(0.8)
    assert token_f1("cat cat", "cat") == pytest.approx(2 * 0.5 * 1 / 1.5)  # multiset overlap
    assert token_f1("dog", ["cat", "a dog"]) == 1.0  # best reference
    assert token_f1("bird", "cat") == 0.0
    assert token_f1("the", "a") == 1.0  # both empty after normalization (SQuAD 2.0 rule)
    assert token_f1("the", "cat") == 0.0


def test_token_f1_scores_chinese_per_character():
    # 我 喜 欢 猫 vs 我 喜 欢 狗: 3 of 4 characters shared -> P = R = F1 = 0.75
    assert token_f1("我喜欢猫", "我喜欢狗") == pytest.approx(0.75)
    # 3 shared of 4 predicted and 6 reference characters: 2 * 0.75 * 0.5 / 1.25 = 0.6
    assert token_f1("东京大学", "我在东京学习") == pytest.approx(0.6)
    assert token_f1("ひらがな", "ひらがな") == 1.0
    assert token_f1("한국어", "한국") == pytest.approx(0.8)  # Hangul syllables too
    assert token_f1("gpt4模型", "gpt4 模型") == 1.0  # Latin runs stay whole words


def test_answer_metrics_reject_empty_references():
    with pytest.raises(ValueError, match="references"):
        exact_match("a", [])
    with pytest.raises(ValueError, match="references"):
        token_f1("a", [])


# --- ROUGE --------------------------------------------------------------------------------

WORDS = ("the cat dog sat on mat a an of in quick brown fox jumps over lazy Dog's "
         "end-to-end 42 3.14 model models running ran Run, fast. slow! (yes) no? x_y").split()


def random_sentence(rng: random.Random) -> str:
    """A sentence of 0-15 words from WORDS with random case."""
    words = [rng.choice(WORDS) for _ in range(rng.randint(0, 15))]
    return " ".join(w.upper() if rng.random() < 0.1 else w for w in words)


def test_lcs_length():
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # the CLRS example
    assert lcs_length(list("abc"), list("abc")) == 3
    assert lcs_length(list("abc"), []) == 0
    assert lcs_length(list("abc"), list("xyz")) == 0


def test_rouge_matches_rouge_score_on_english():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    kinds = ["rouge1", "rouge2", "rouge3", "rougeL"]
    scorer = rouge_scorer.RougeScorer(kinds, use_stemmer=False)
    rng = random.Random(0)
    for _ in range(200):
        prediction, reference = random_sentence(rng), random_sentence(rng)
        if rng.random() < 0.3:  # make some pairs overlap heavily
            reference = prediction + " " + random_sentence(rng)
        expected = scorer.score(reference, prediction)  # rouge-score takes (target, prediction)
        for measure in ("fmeasure", "precision", "recall"):
            ours = rouge(prediction, reference, kinds, measure=measure)
            for kind in kinds:
                assert ours[kind] == pytest.approx(getattr(expected[kind], measure), abs=1e-9), (
                    prediction, reference, kind, measure)


def test_rouge_scores_chinese_where_rouge_score_gives_zero():
    # 我 喜 欢 猫 vs 我 喜 欢 狗: unigrams 3/4, bigrams {我喜, 喜欢} 2/3, LCS 我喜欢 = 3/4
    scores = rouge("我喜欢猫", "我喜欢狗")
    assert scores == pytest.approx({"rouge1": 0.75, "rouge2": 2 / 3, "rougeL": 0.75})
    # 7 predicted characters, 4 reference ones, all 4 shared: P = 4/7, R = 1, F = 8/11
    assert rouge("我爱北京天安门", "我爱北京", ["rouge1"])["rouge1"] == pytest.approx(8 / 11)
    assert rouge("我爱北京天安门", "我爱北京", ["rouge1"], measure="recall")["rouge1"] == 1.0
    # rouge-score keeps only [a-z0-9], so Chinese text has no tokens and scores 0
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    theirs = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False).score("我喜欢狗", "我喜欢猫")
    assert theirs["rouge1"].fmeasure == 0.0


def test_rouge_scores_cyrillic_and_greek():
    # 3 of 4 words shared, in order
    assert rouge("кошка сидит на ковре", "кошка спит на ковре")["rouge1"] == pytest.approx(0.75)
    assert rouge("Η γάτα κάθεται", "η γάτα κοιμάται")["rougeL"] == pytest.approx(2 / 3)
    assert rouge_tokens("Café_au-lait, हिन्दी 東京") == ["café", "au", "lait", "हिन्दी", "東", "京"]


def test_rouge_edge_cases():
    assert rouge("", "the cat") == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    assert rouge("The cat.", "the CAT")["rouge1"] == 1.0
    with pytest.raises(ValueError, match="ROUGE kind"):
        rouge("a", "b", ["rougeX"])
    with pytest.raises(ValueError, match="measure"):
        rouge("a", "b", measure="f1")


# --- BLEU and chrF ------------------------------------------------------------------------


def test_bleu_known_value_and_identity():
    pytest.importorskip("sacrebleu")
    # "the cat is on the mat" vs "the cat sat on the mat": clipped precisions 5/6, 3/5, 1/4,
    # 0/3 (exp smoothing: 1 / (2 * 3)), brevity penalty 1 -> geometric mean of the four
    expected = 100 * (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25
    assert bleu(["the cat is on the mat"], ["the cat sat on the mat"]) == pytest.approx(expected)
    texts = ["the cat sat on the mat", "a quick brown fox jumps over the lazy dog"]
    assert bleu(texts, texts) == pytest.approx(100.0)
    assert bleu(texts, [["x y z", texts[0]], ["p q r", texts[1]]]) == pytest.approx(100.0)  # any reference may match


def test_chrf_known_value_and_identity():
    pytest.importorskip("sacrebleu")
    # "abc" vs "abd": char 1-grams P = R = 2/3, 2-grams 1/2, 3-grams 0; orders 4-6 absent on
    # both sides, so P = R = (2/3 + 1/2 + 0) / 3 = 7/18 and chrF2 = 7/18
    assert chrf(["abc"], ["abd"]) == pytest.approx(100 * 7 / 18)
    texts = ["我喜欢猫", "the cat sat on the mat"]
    assert chrf(texts, texts) == pytest.approx(100.0)


def test_corpus_metrics_check_inputs():
    with pytest.raises(ValueError, match="predictions"):
        bleu(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="empty"):
        chrf([], [])
    with pytest.raises(ValueError, match="list of strings"):
        bleu("a cat", ["a cat"])
    with pytest.raises(ValueError, match="same number"):
        bleu(["a", "b"], [["a"], ["b", "c"]])


# --- calibration --------------------------------------------------------------------------


def naive_ece(confidences, correct, bins):
    """ECE with equal-width bins [lo, hi), the last one closed, by explicit loops."""
    total, n = 0.0, len(confidences)
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = [i for i, c in enumerate(confidences) if lo <= c < hi or (b == bins - 1 and c == 1.0)]
        if members:
            accuracy = sum(correct[i] for i in members) / len(members)
            confidence = sum(confidences[i] for i in members) / len(members)
            total += len(members) / n * abs(accuracy - confidence)
    return total


def naive_quantile_ece(confidences, correct, bins):
    """ECE with bins of consecutive sorted predictions of near-equal size."""
    order = sorted(range(len(confidences)), key=lambda i: confidences[i])
    size, extra = divmod(len(order), bins)
    total, start = 0.0, 0
    for b in range(bins):
        members = order[start : start + size + (1 if b < extra else 0)]
        start += len(members)
        if members:
            gap = sum(correct[i] - confidences[i] for i in members) / len(members)
            total += len(members) / len(order) * abs(gap)
    return total


def random_calibration_case(rng: np.random.Generator, n: int):
    confidences = rng.uniform(0, 1, n)
    correct = (rng.uniform(0, 1, n) < confidences ** 2).astype(int)
    return confidences, correct


def test_ece_matches_naive_reference():
    rng = np.random.default_rng(0)
    for case in range(30):
        confidences, correct = random_calibration_case(rng, int(rng.integers(1, 200)))
        bins = int(rng.integers(1, 20))
        assert expected_calibration_error(confidences, correct, bins) == pytest.approx(
            naive_ece(list(confidences), list(correct), bins), abs=1e-12), case
        assert expected_calibration_error(confidences, correct, bins, "quantile") == pytest.approx(
            naive_quantile_ece(list(confidences), list(correct), bins), abs=1e-12), case


def test_ece_bin_edges_and_hand_values():
    table = reliability_bins([0.0, 0.5, 1.0, 0.25], [1, 0, 1, 1], bins=4)
    assert table.count.tolist() == [1, 1, 1, 1]  # 0.25 and 0.5 go to the bin above the edge; 1.0 to the last
    assert table.lower.tolist() == [0.0, 0.25, 0.5, 0.75]
    assert table.upper.tolist() == [0.25, 0.5, 0.75, 1.0]
    table = reliability_bins([0.05, 0.15, 0.95], [1, 0, 1], bins=10)
    assert table.count.sum() == 3 and np.isnan(table.accuracy[5]) and np.isnan(table.confidence[5])
    # perfectly calibrated in each bin -> 0; always 0.9 confident and always wrong -> 0.9
    assert expected_calibration_error([0.75] * 4, [1, 1, 1, 0]) == pytest.approx(0.0)
    assert expected_calibration_error([0.9] * 5, [0] * 5) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="strategy"):
        expected_calibration_error([0.5], [1], strategy="log")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error([1.5], [1])


def test_brier_binary_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    for _ in range(20):
        probabilities, correct = random_calibration_case(rng, int(rng.integers(1, 100)))
        assert brier_score(probabilities, correct) == pytest.approx(
            metrics.brier_score_loss(correct, probabilities, pos_label=1), abs=1e-12)
    assert brier_score([0.2, 0.6], [False, True]) == pytest.approx((0.04 + 0.16) / 2)


def test_brier_multiclass_matches_naive_and_sklearn():
    rng = np.random.default_rng(2)
    for _ in range(20):
        n, k = int(rng.integers(1, 50)), int(rng.integers(3, 6))
        probabilities = rng.dirichlet(np.ones(k), n)
        labels = rng.integers(0, k, n)
        naive = sum(sum((probabilities[i][j] - (j == labels[i])) ** 2 for j in range(k)) for i in range(n)) / n
        assert brier_score(probabilities, labels) == pytest.approx(naive, abs=1e-12)
    metrics = pytest.importorskip("sklearn.metrics")
    probabilities = rng.dirichlet(np.ones(4), 30)
    labels = np.arange(30) % 4  # every class present, as sklearn infers the classes from labels
    assert brier_score(probabilities, labels) == pytest.approx(metrics.brier_score_loss(labels, probabilities))
    with pytest.raises(ValueError, match="labels"):
        brier_score([[0.5, 0.5]], [2])


# --- selective prediction -----------------------------------------------------------------


def naive_selective(confidences, correct):
    """One point per distinct threshold t: accept every prediction with confidence >= t."""
    points = []
    for t in sorted(set(confidences), reverse=True):
        accepted = [ok for c, ok in zip(confidences, correct) if c >= t]
        points.append((len(accepted) / len(confidences), sum(accepted) / len(accepted)))
    area, previous = 0.0, 0.0
    for coverage, accuracy in points:
        area += (coverage - previous) * accuracy
        previous = coverage
    return points, area


def test_selective_curve_matches_naive_reference():
    rng = np.random.default_rng(3)
    for _ in range(30):
        n = int(rng.integers(1, 60))
        confidences = np.round(rng.uniform(0, 1, n), int(rng.integers(1, 3)))  # rounding makes ties
        correct = rng.integers(0, 2, n)
        coverages, accuracies = selective_curve(confidences, correct)
        points, area = naive_selective(list(confidences), list(correct))
        assert np.allclose(coverages, [p[0] for p in points]) and np.allclose(accuracies, [p[1] for p in points])
        assert selective_auc(confidences, correct) == pytest.approx(area, abs=1e-12)
        assert aurc(confidences, correct) == pytest.approx(1 - area, abs=1e-12)


def test_selective_auc_reference_points():
    rng = np.random.default_rng(4)
    n, m = 20, 7
    correct = np.array([1] * m + [0] * (n - m))
    perfect = np.linspace(1, 0.01, n)  # every correct answer more confident than every wrong one
    # top k all right for k <= m, then m/k: area = (1/N) (m + sum_{k>m} m/k)
    oracle = (m + sum(m / k for k in range(m + 1, n + 1))) / n
    assert selective_auc(perfect, correct) == pytest.approx(oracle)
    for _ in range(10):  # no ranking beats the oracle
        assert selective_auc(rng.permutation(perfect), correct) <= oracle + 1e-12
    # uninformative confidence (all tied): one point at full coverage, area = accuracy
    assert selective_auc([0.5] * n, correct) == pytest.approx(m / n)
    assert selective_curve([0.5] * n, correct)[0].tolist() == [1.0]
    assert selective_auc(perfect, np.ones(n)) == 1.0 and aurc(perfect, np.zeros(n)) == 1.0


# --- fairness -----------------------------------------------------------------------------


def test_fairness_matches_fairlearn():
    fairlearn_metrics = pytest.importorskip("fairlearn.metrics")
    rng = np.random.default_rng(5)
    for case in range(50):
        n_groups = int(rng.integers(1, 5))
        n = int(rng.integers(4 * n_groups, 80))
        groups = rng.integers(0, n_groups, n)
        y_true, y_pred = rng.integers(0, 2, n), rng.integers(0, 2, n)
        for g in range(n_groups):  # every group holds both labels, so every rate is defined
            members = np.flatnonzero(groups == g)
            if len(members) < 2:
                groups[:2] = g
                members = np.flatnonzero(groups == g)
            y_true[members[0]], y_true[members[1]] = 1, 0
        expected_dp = fairlearn_metrics.demographic_parity_difference(y_true, y_pred, sensitive_features=groups)
        expected_eo = fairlearn_metrics.equalized_odds_difference(y_true, y_pred, sensitive_features=groups)
        assert demographic_parity_difference(y_pred, groups) == pytest.approx(expected_dp, abs=1e-12), case
        assert equalized_odds_difference(y_true, y_pred, groups) == pytest.approx(expected_eo, abs=1e-12), case
        # the same case with string labels and group names
        names = [f"group{g}" for g in groups]
        true_text = ["yes" if y else "no" for y in y_true]
        pred_text = ["yes" if y else "no" for y in y_pred]
        assert demographic_parity_difference(pred_text, names, positive="yes") == pytest.approx(expected_dp)
        assert equalized_odds_difference(true_text, pred_text, names, positive="yes") == pytest.approx(expected_eo)


def test_fairness_hand_values_and_undefined_rates():
    # selection rates: a 2/3, b 0/3
    assert demographic_parity_difference([1, 1, 0, 0, 0, 0], list("aaabbb")) == pytest.approx(2 / 3)
    assert demographic_parity_difference([1, 0], ["a", "a"]) == 0.0  # one group
    # group b has no actual positive: no TPR; TPR spread over {a} is 0, FPR a = 1, b = 1/3
    y_true, y_pred = [1, 1, 0, 0, 0, 0], [1, 0, 1, 0, 0, 1]
    assert equalized_odds_difference(y_true, y_pred, list("aaabbb")) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="length"):
        demographic_parity_difference([1, 0], ["a"])


# --- robustness ---------------------------------------------------------------------------


def test_attack_success_rate():
    # clean right on items 0, 1, 2, 3; of those, 1 and 3 flip to wrong; item 4 (clean wrong,
    # attacked right) is excluded
    assert attack_success_rate([1, 1, 1, 1, 0], [1, 0, 1, 0, 1]) == pytest.approx(0.5)
    assert attack_success_rate([0, 0], [1, 0]) == 0.0  # 0/0
    assert attack_success_rate([True, True], [True, True]) == 0.0


def test_performance_drop_rate():
    assert performance_drop_rate(0.8, 0.6) == pytest.approx(0.25)
    assert performance_drop_rate(0.5, 0.6) == pytest.approx(-0.2)  # the perturbation helped
    assert performance_drop_rate(0.0, 0.3) == 0.0
    assert performance_drop_rate([1, 1, 0, 1], [1, 0, 0, 1]) == pytest.approx(1 - 2 / 3)
    assert performance_drop_rate(np.float32(0.5), np.int64(0)) == 1.0
    with pytest.raises(ValueError, match="length"):
        performance_drop_rate([1, 1], [1])


# --- standard errors ----------------------------------------------------------------------


def test_mean_stderr():
    values = [0.1, 0.5, 0.9, 1.0, 0.0, 0.3]
    assert mean_stderr(values) == pytest.approx(statistics.stdev(values) / math.sqrt(len(values)))
    assert math.isnan(mean_stderr([1.0]))


def test_bootstrap_stderr():
    values = np.random.default_rng(6).integers(0, 2, 400).astype(float)
    first = bootstrap_stderr(values, seed=1)
    assert first == bootstrap_stderr(values, seed=1)  # fixed by the seed
    assert first != bootstrap_stderr(values, seed=2)
    # for a mean the bootstrap error approaches the plug-in value sigma / sqrt(n)
    assert first == pytest.approx(np.std(values) / math.sqrt(len(values)), rel=0.15)
    assert bootstrap_stderr([3.0] * 10, metric=np.median) == 0.0
    with pytest.raises(ValueError, match="iterations"):
        bootstrap_stderr(values, iterations=1)


@pytest.mark.parametrize("call", [
    lambda: expected_calibration_error([], []),
    lambda: expected_calibration_error([0.5, 0.5], [1]),
    lambda: brier_score([0.5], [1, 0]),
    lambda: selective_curve([0.5], [1, 1]),
    lambda: attack_success_rate([], []),
    lambda: attack_success_rate([1], [1, 0]),
    lambda: equalized_odds_difference([1, 0], [1], ["a", "b"]),
    lambda: demographic_parity_difference([], []),
    lambda: mean_stderr([]),
    lambda: bootstrap_stderr([]),
    lambda: reliability_bins([0.5], [2]),
])
def test_empty_and_mismatched_inputs_raise(call):
    with pytest.raises(ValueError):
        call()


def test_wilson_interval_matches_scipy():
    from scipy.stats import binomtest

    from lmforge.eval import metrics as M

    rng = random.Random(7)
    for n in [1, 2, 5, 20, 137]:
        for k in {0, n, rng.randint(0, n), rng.randint(0, n)}:
            expected = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
            low, high = M.wilson_interval(k, n)
            assert (low, high) == pytest.approx((expected.low, expected.high), abs=1e-6)
    assert M.wilson_interval(0, 20) == pytest.approx((0.0, 0.16113), abs=1e-4)
    assert all(math.isnan(v) for v in M.wilson_interval(0, 0))
    with pytest.raises(ValueError):
        M.wilson_interval(3, 2)
