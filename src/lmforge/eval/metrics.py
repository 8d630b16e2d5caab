"""Evaluation metrics: answer matching, overlap (ROUGE, BLEU, chrF), calibration,
selective prediction, fairness, robustness and the standard errors reports print.

Every metric is a plain function of predictions and references (Python lists or numpy
arrays; no torch), with its formula in the docstring. Each raises ``ValueError`` with a
clear message on empty input or on inputs of different lengths.

Text metrics handle text beyond Latin script on purpose. Chinese, Japanese and Korean
(CJK) characters are scored one character per token, because these scripts do not put
spaces between words and a whole sentence would otherwise be a single "word" (the
mixed segmentation MLQA uses for Chinese). Other scripts (Cyrillic, Greek, Arabic...)
are split into words at non-letters, like English. Scripts without spaces that are not
CJK (Thai, Khmer, Lao...) are left out: a whole run of them is one token, because
splitting them into words needs a dictionary-based segmenter.
"""

from __future__ import annotations

import math
import numbers
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Hashable, Sequence, Sized
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

# ---------------------------------------------------------------------------------------
# Tokenization shared by the text metrics
# ---------------------------------------------------------------------------------------

# Code point ranges whose characters are one token each: CJK ideographs (with extensions
# and compatibility forms), the ideographic iteration/zero marks, Japanese kana and Korean
# Hangul (syllables and jamo).
_CJK_RANGES: tuple[tuple[int, int], ...] = (
    (0x1100, 0x11FF),  # Hangul Jamo
    (0x3005, 0x3007),  # 々 〆 〇
    (0x3040, 0x309F),  # Hiragana
    (0x30A0, 0x30FF),  # Katakana
    (0x3130, 0x318F),  # Hangul Compatibility Jamo
    (0x31F0, 0x31FF),  # Katakana Phonetic Extensions
    (0x3400, 0x4DBF),  # CJK Unified Ideographs Extension A
    (0x4E00, 0x9FFF),  # CJK Unified Ideographs
    (0xAC00, 0xD7AF),  # Hangul Syllables
    (0xF900, 0xFAFF),  # CJK Compatibility Ideographs
    (0xFF66, 0xFF9F),  # Halfwidth Katakana
    (0x20000, 0x323AF),  # CJK Unified Ideographs Extensions B-H
    (0x2F800, 0x2FA1F),  # CJK Compatibility Ideographs Supplement
)


def is_cjk(char: str) -> bool:
    """Whether ``char`` is a Chinese ideograph, Japanese kana or Korean Hangul character:
    the characters that text metrics score one per token."""
    code = ord(char)
    return any(lo <= code <= hi for lo, hi in _CJK_RANGES)


def _split_cjk(word: str) -> list[str]:
    """Split ``word`` into runs of non-CJK characters and single CJK characters:
    ``"gpt4模型"`` -> ``["gpt4", "模", "型"]``."""
    pieces: list[str] = []
    run: list[str] = []
    for char in word:
        if is_cjk(char):
            if run:
                pieces.append("".join(run))
                run = []
            pieces.append(char)
        else:
            run.append(char)
    if run:
        pieces.append("".join(run))
    return pieces


def rouge_tokens(text: str) -> list[str]:
    """The tokens ROUGE counts: lowercase ``text``, then each CJK character is a token and
    each maximal run of letters, digits and combining marks (of any script) is a token;
    everything else (spaces, punctuation, symbols, ``_``) separates tokens.

    On ASCII text this is exactly Google ``rouge-score``'s tokenizer (lowercase, replace
    every character outside ``[a-z0-9]`` by a space, split). It differs on purpose on other
    text, which ``rouge-score`` deletes: ``"猫"``, ``"кошка"`` or ``"café"`` are tokens here,
    while ``rouge-score`` finds no token in the first two and reads the last as ``"caf"``.
    """
    tokens: list[str] = []
    word: list[str] = []
    for char in text.lower():
        if is_cjk(char):
            if word:
                tokens.append("".join(word))
                word = []
            tokens.append(char)
        elif char.isalnum() or unicodedata.category(char).startswith("M"):
            word.append(char)
        elif word:
            tokens.append("".join(word))
            word = []
    if word:
        tokens.append("".join(word))
    return tokens


# ---------------------------------------------------------------------------------------
# Answer matching (SQuAD)
# ---------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ASCII_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD answer normalization: lowercase, delete punctuation, replace the English
    articles ``a``/``an``/``the`` by spaces, and collapse runs of whitespace to one space.

    Punctuation is ASCII ``string.punctuation`` (as in the SQuAD script) plus every Unicode
    punctuation character (category ``P*``, e.g. ``，。「」``), so that Chinese answers are
    not penalised for a trailing ``。``. Characters are deleted, not replaced by spaces:
    ``"U.S."`` -> ``"us"``.
    """
    lowered = text.lower()
    kept = "".join(
        char
        for char in lowered
        if char not in _ASCII_PUNCTUATION and not unicodedata.category(char).startswith("P")
    )
    return " ".join(_ARTICLES.sub(" ", kept).split())


def answer_tokens(text: str) -> list[str]:
    """The tokens SQuAD metrics compare: :func:`normalize_answer`, split on whitespace, and
    each CJK character split off as its own token (so ``"我喜欢猫"`` has 4 tokens)."""
    return [piece for word in normalize_answer(text).split() for piece in _split_cjk(word)]


def _references(references: str | Sequence[str]) -> list[str]:
    """One reference string or a non-empty sequence of them, as a list."""
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("references is empty: give at least one reference answer")
    return refs


def exact_match(prediction: str, references: str | Sequence[str]) -> float:
    """1.0 if ``prediction`` equals any reference after normalization, else 0.0.

    EM = max over references r of [answer_tokens(prediction) == answer_tokens(r)].
    Comparing token lists equals SQuAD's comparison of normalized strings for text with
    spaces, and also ignores spaces between CJK characters (``"我 喜欢"`` == ``"我喜欢"``).
    """
    predicted = answer_tokens(prediction)
    return max(float(predicted == answer_tokens(ref)) for ref in _references(references))


def _f1_tokens(predicted: list[str], gold: list[str]) -> float:
    """Bag-of-tokens F1 of two token lists; two empty lists score 1.0, one empty list 0.0."""
    if not predicted or not gold:
        return float(predicted == gold)
    same = sum((Counter(predicted) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, references: str | Sequence[str]) -> float:
    """SQuAD token-overlap F1, the best over references.

    With P and G the :func:`answer_tokens` of the prediction and a reference, and
    ``common`` the size of their multiset intersection: precision = common / |P|,
    recall = common / |G|, F1 = 2 * precision * recall / (precision + recall). CJK
    characters are single tokens, so ``"我喜欢猫"`` vs ``"我喜欢狗"`` scores 0.75 rather
    than 0. If either side has no tokens (e.g. the answer was only ``"the"``), F1 is 1.0
    when both are empty and 0.0 otherwise (the SQuAD 2.0 rule).
    """
    predicted = answer_tokens(prediction)
    return max(_f1_tokens(predicted, answer_tokens(ref)) for ref in _references(references))


# ---------------------------------------------------------------------------------------
# ROUGE, BLEU, chrF
# ---------------------------------------------------------------------------------------

_ROUGE_N = re.compile(r"rouge([1-9])")


def _ngrams(tokens: list[str], n: int) -> Counter[tuple[str, ...]]:
    """Counts of the n-grams of ``tokens``."""
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of ``a`` and ``b`` by dynamic programming:
    L[i][j] = L[i-1][j-1] + 1 if a[i] == b[j] else max(L[i-1][j], L[i][j-1]), keeping one
    row at a time (O(len(a) * len(b)) time, O(len(b)) memory)."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def _precision_recall_f(overlap: int, predicted: int, reference: int) -> dict[str, float]:
    """precision = overlap / predicted, recall = overlap / reference (0 when a count is
    0), fmeasure = their harmonic mean (0 when both are 0)."""
    precision = overlap / predicted if predicted else 0.0
    recall = overlap / reference if reference else 0.0
    total = precision + recall
    fmeasure = 2 * precision * recall / total if total > 0 else 0.0
    return {"precision": precision, "recall": recall, "fmeasure": fmeasure}


def rouge(
    prediction: str,
    reference: str,
    kinds: Sequence[str] = ("rouge1", "rouge2", "rougeL"),
    measure: Literal["fmeasure", "precision", "recall"] = "fmeasure",
) -> dict[str, float]:
    """ROUGE scores of ``prediction`` against one ``reference``: ``{kind: value}``.

    Both texts are tokenized by :func:`rouge_tokens` (no stemming). For ``rougeN``
    (N = 1..9) the overlap is the clipped n-gram match count sum_g min(count_pred(g),
    count_ref(g)); for ``rougeL`` it is the longest common subsequence length. Then
    precision = overlap / (n-grams in prediction), recall = overlap / (n-grams in
    reference), fmeasure = 2PR / (P + R); ``measure`` picks which one is returned. An empty
    side scores 0. On ASCII text the numbers equal ``rouge_score.rouge_scorer.RougeScorer(
    kinds, use_stemmer=False)``; unlike it, Chinese or Cyrillic text is scored, not 0.
    ``rougeLsum`` (newline-split summaries) is not provided.
    """
    if measure not in ("fmeasure", "precision", "recall"):
        raise ValueError(f"measure must be 'fmeasure', 'precision' or 'recall', not {measure!r}")
    predicted, gold = rouge_tokens(prediction), rouge_tokens(reference)
    scores: dict[str, float] = {}
    for kind in kinds:
        if kind == "rougeL":
            overlap = lcs_length(gold, predicted) if predicted and gold else 0
            counts = _precision_recall_f(overlap, len(predicted), len(gold))
        elif match := _ROUGE_N.fullmatch(kind):
            n = int(match.group(1))
            pred_ngrams, gold_ngrams = _ngrams(predicted, n), _ngrams(gold, n)
            overlap = sum((pred_ngrams & gold_ngrams).values())
            counts = _precision_recall_f(overlap, sum(pred_ngrams.values()), sum(gold_ngrams.values()))
        else:
            raise ValueError(f"unknown ROUGE kind {kind!r}: use 'rouge1'..'rouge9' or 'rougeL'")
        scores[kind] = counts[measure]
    return scores


def _corpus(
    predictions: Sequence[str], references: Sequence[str | Sequence[str]]
) -> tuple[list[str], list[list[str]]]:
    """Check a corpus and turn per-prediction references into sacrebleu's reference
    streams: stream j holds the j-th reference of every prediction."""
    if isinstance(predictions, str):
        raise ValueError("predictions must be a list of strings, not one string")
    preds = list(predictions)
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    if not preds:
        raise ValueError("predictions is empty")
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references")
    count = len(refs[0])
    if count == 0 or any(len(r) != count for r in refs):
        raise ValueError("every prediction needs the same number (at least one) of references")
    return preds, [[r[j] for r in refs] for j in range(count)]


def bleu(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    tokenize: str = "13a",
    lowercase: bool = False,
) -> float:
    """Corpus BLEU in [0, 100], computed by ``sacrebleu.corpus_bleu``.

    BLEU = BP * exp(mean_{n=1..4} log p_n), where p_n is the corpus clipped n-gram
    precision and BP = min(1, exp(1 - ref_len / hyp_len)) the brevity penalty. Settings
    are sacrebleu's defaults: 4-gram, ``exp`` smoothing (a zero-match order k counts as
    1 / (2^k * total)), case-sensitive, tokenizer ``13a`` (use ``"zh"`` for Chinese,
    ``"char"`` for other unsegmented text). ``references[i]`` is one string or a list of
    alternatives; every prediction must have the same number of them.
    """
    import sacrebleu

    preds, streams = _corpus(predictions, references)
    return float(sacrebleu.corpus_bleu(preds, streams, tokenize=tokenize, lowercase=lowercase).score)


def chrf(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    word_order: int = 0,
) -> float:
    """Corpus chrF in [0, 100], computed by ``sacrebleu.corpus_chrf``.

    Character n-grams of orders 1..6 (whitespace removed) are counted over the corpus;
    the precisions and recalls of the orders that occur on both sides are averaged into P
    and R, and chrF = (1 + beta^2) P R / (beta^2 P + R) with beta = 2 (recall weighs
    more). ``word_order=2`` adds word uni- and bigrams (chrF++). Case-sensitive. Because it
    needs no word segmentation, chrF suits Chinese and other scripts as it is.
    """
    import sacrebleu

    preds, streams = _corpus(predictions, references)
    return float(sacrebleu.corpus_chrf(preds, streams, word_order=word_order).score)


# ---------------------------------------------------------------------------------------
# Input checks for the numeric metrics
# ---------------------------------------------------------------------------------------


def _vector(values: ArrayLike, name: str) -> np.ndarray:
    """``values`` as a non-empty 1-D float array."""
    array = np.asarray(values, dtype=float)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    if np.isnan(array).any():
        raise ValueError(f"{name} contains NaN")
    return array


def _probabilities(values: ArrayLike, name: str) -> np.ndarray:
    """``values`` as a non-empty 1-D float array inside [0, 1]."""
    array = _vector(values, name)
    if array.min() < 0 or array.max() > 1:
        raise ValueError(f"{name} must lie in [0, 1]")
    return array


def _booleans(values: ArrayLike, name: str) -> np.ndarray:
    """``values`` (booleans or 0/1) as a non-empty 1-D bool array."""
    array = _vector(values, name)
    if not np.isin(array, (0.0, 1.0)).all():
        raise ValueError(f"{name} must hold only booleans or 0/1")
    return array.astype(bool)


def _same_length(**arrays: Sized) -> None:
    """Raise unless all arrays have the same length."""
    lengths = {name: len(array) for name, array in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError("inputs differ in length: " + ", ".join(f"{k}={v}" for k, v in lengths.items()))


# ---------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin statistics of a reliability diagram; every array has shape (bins,)."""

    lower: np.ndarray
    """Lower edge of each bin (uniform) or smallest confidence in it (quantile; NaN if empty)."""
    upper: np.ndarray
    """Upper edge of each bin (uniform) or largest confidence in it (quantile; NaN if empty)."""
    count: np.ndarray
    """Number of predictions in each bin."""
    accuracy: np.ndarray
    """Fraction correct in each bin (NaN for an empty bin)."""
    confidence: np.ndarray
    """Mean confidence in each bin (NaN for an empty bin)."""


def _bin_index(confidence: np.ndarray, bins: int, strategy: str) -> np.ndarray:
    """The bin of each confidence: ``floor(c * bins)`` capped at ``bins - 1`` (uniform),
    or the position in ascending confidence order cut into ``bins`` near-equal parts
    (quantile; ``np.array_split`` sizes, ties broken by input order)."""
    if strategy == "uniform":
        return np.minimum(np.floor(confidence * bins).astype(int), bins - 1)
    if strategy == "quantile":
        index = np.empty(confidence.size, dtype=int)
        for b, part in enumerate(np.array_split(np.argsort(confidence, kind="stable"), bins)):
            index[part] = b
        return index
    raise ValueError(f"strategy must be 'uniform' or 'quantile', not {strategy!r}")


def reliability_bins(
    confidences: ArrayLike, correct: ArrayLike, bins: int = 10, strategy: str = "uniform"
) -> ReliabilityBins:
    """Group predictions by confidence and report each bin's count, accuracy and mean
    confidence, for reliability diagrams and :func:`expected_calibration_error`.

    ``uniform``: ``bins`` equal-width bins over [0, 1]; bin b holds b/B <= c < (b+1)/B,
    so a value on an inner edge goes to the bin above it, and 1.0 goes to the last bin.
    ``quantile``: bins of (near) equal counts in ascending confidence order, so ties may
    be split across two bins.
    """
    confidence = _probabilities(confidences, "confidences")
    hits = _booleans(correct, "correct")
    _same_length(confidences=confidence, correct=hits)
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    index = _bin_index(confidence, bins, strategy)
    count = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.bincount(index, weights=hits, minlength=bins) / count
        mean_confidence = np.bincount(index, weights=confidence, minlength=bins) / count
    if strategy == "uniform":
        lower, upper = np.arange(bins) / bins, np.arange(1, bins + 1) / bins
    else:
        lower = np.array([confidence[index == b].min() if count[b] else np.nan for b in range(bins)])
        upper = np.array([confidence[index == b].max() if count[b] else np.nan for b in range(bins)])
    return ReliabilityBins(lower, upper, count, accuracy, mean_confidence)


def expected_calibration_error(
    confidences: ArrayLike, correct: ArrayLike, bins: int = 10, strategy: str = "uniform"
) -> float:
    """Expected calibration error (Naeini et al. 2015; Guo et al. 2017,
    https://arxiv.org/abs/1706.04599).

    ECE = sum_b (n_b / N) * |acc_b - conf_b| over non-empty bins b, where acc_b is the
    fraction correct and conf_b the mean confidence of the n_b predictions in bin b. With
    the default ``uniform`` strategy the bins are ``bins`` equal-width intervals
    [b/B, (b+1)/B) of [0, 1]: a confidence on an inner edge falls in the bin above it and
    1.0 falls in the last bin. ``quantile`` uses equal-count bins (adaptive ECE).
    """
    table = reliability_bins(confidences, correct, bins, strategy)
    filled = table.count > 0
    gaps = np.abs(table.accuracy[filled] - table.confidence[filled])
    return float(np.sum(table.count[filled] / table.count.sum() * gaps))


def brier_score(probabilities: ArrayLike, correct: ArrayLike) -> float:
    """Brier score (Brier 1950): mean squared error of probabilistic predictions.

    Binary form, ``probabilities`` of shape (N,) and ``correct`` in {0, 1}:
    BS = (1/N) sum_i (p_i - y_i)^2 (as ``sklearn.metrics.brier_score_loss``).
    Multi-class form, ``probabilities`` of shape (N, K) and integer labels y_i in [0, K):
    BS = (1/N) sum_i sum_k (p_ik - [k == y_i])^2, in [0, 2]. With K = 2 the multi-class
    form is twice the binary one (sklearn halves it in that case).
    """
    p = np.asarray(probabilities, dtype=float)
    if p.ndim == 1:
        p = _probabilities(p, "probabilities")
        y = _booleans(correct, "correct")
        _same_length(probabilities=p, correct=y)
        return float(np.mean((p - y) ** 2))
    if p.ndim != 2 or p.size == 0:
        raise ValueError(f"probabilities must be (N,) or a non-empty (N, K) array, got shape {p.shape}")
    if np.isnan(p).any() or p.min() < 0 or p.max() > 1:
        raise ValueError("probabilities must lie in [0, 1]")
    labels = _vector(correct, "correct (labels)")
    _same_length(probabilities=p, labels=labels)
    if not np.all(labels == np.round(labels)) or labels.min() < 0 or labels.max() >= p.shape[1]:
        raise ValueError(f"labels must be integers in [0, {p.shape[1]})")
    one_hot = np.eye(p.shape[1])[labels.astype(int)]
    return float(np.mean(np.sum((p - one_hot) ** 2, axis=1)))


# ---------------------------------------------------------------------------------------
# Selective prediction
# ---------------------------------------------------------------------------------------


def selective_curve(confidences: ArrayLike, correct: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy-coverage curve of answering only the most confident predictions.

    Predictions are sorted by confidence, highest first; accepting the top k gives
    coverage k/N and accuracy (correct among the top k)/k. Predictions with equal
    confidence cannot be separated by a threshold, so they are accepted together: the
    curve has one point per distinct confidence value, at the end of its tie group (no
    point depends on how ties happen to be ordered). Returns (coverages, accuracies),
    coverage increasing and ending at 1.0.
    """
    confidence = _vector(confidences, "confidences")
    hits = _booleans(correct, "correct")
    _same_length(confidences=confidence, correct=hits)
    order = np.argsort(-confidence, kind="stable")
    sorted_confidence = confidence[order]
    cumulative = np.cumsum(hits[order])
    group_ends = np.flatnonzero(np.append(sorted_confidence[1:] != sorted_confidence[:-1], True))
    accepted = group_ends + 1
    return accepted / confidence.size, cumulative[group_ends] / accepted


def selective_auc(confidences: ArrayLike, correct: ArrayLike) -> float:
    """Area under the accuracy-coverage curve of :func:`selective_curve` (higher is better).

    Step (right-endpoint) rule from coverage 0: area = sum_i (c_i - c_{i-1}) * a_i with
    c_0 = 0, i.e. each tie group's slice of coverage counts at the accuracy reached once
    the whole group is accepted. Without ties this is (1/N) sum_{k=1..N} acc(top k).
    Confidence that carries no information (all equal) gives the plain accuracy; a
    perfect ranking with m of N correct gives m/N * (1 + sum_{k=m+1..N} 1/k).
    """
    coverages, accuracies = selective_curve(confidences, correct)
    widths = np.diff(coverages, prepend=0.0)
    return float(np.sum(widths * accuracies))


def aurc(confidences: ArrayLike, correct: ArrayLike) -> float:
    """Area under the risk-coverage curve (Geifman et al. 2019,
    https://arxiv.org/abs/1805.08206), risk = 1 - accuracy; lower is better.

    With the same step rule as :func:`selective_auc`, AURC = 1 - selective_auc.
    """
    return 1.0 - selective_auc(confidences, correct)


# ---------------------------------------------------------------------------------------
# Fairness
# ---------------------------------------------------------------------------------------


def _is_positive(labels: Sequence[Hashable], positive: Hashable, name: str) -> np.ndarray:
    """Whether each label equals ``positive`` (labels may be ints, bools or strings; any
    label other than ``positive`` is negative)."""
    flags = np.array([label == positive for label in labels], dtype=bool)
    if flags.size == 0:
        raise ValueError(f"{name} is empty")
    return flags


def _group_members(groups: Sequence[Hashable]) -> list[np.ndarray]:
    """Indices of each distinct group, in order of first appearance."""
    members: dict[Hashable, list[int]] = {}
    for i, group in enumerate(groups):
        members.setdefault(group, []).append(i)
    return [np.array(indices) for indices in members.values()]


def _spread(rates: list[float]) -> float:
    """max - min of the rates, 0.0 when fewer than two are given."""
    return max(rates) - min(rates) if len(rates) > 1 else 0.0


def demographic_parity_difference(
    y_pred: Sequence[Hashable], groups: Sequence[Hashable], positive: Hashable = 1
) -> float:
    """Demographic parity difference: max_g P(pred = positive | g) - min_g P(pred = positive | g),
    over the groups g present in ``groups`` (0.0 for one group). Same value as
    ``fairlearn.metrics.demographic_parity_difference``.
    """
    predicted = _is_positive(y_pred, positive, "y_pred")
    group_list = list(groups)
    _same_length(y_pred=predicted, groups=group_list)
    return _spread([float(predicted[idx].mean()) for idx in _group_members(group_list)])


def equalized_odds_difference(
    y_true: Sequence[Hashable],
    y_pred: Sequence[Hashable],
    groups: Sequence[Hashable],
    positive: Hashable = 1,
) -> float:
    """Equalized odds difference (Hardt et al. 2016): the larger of the spread of true
    positive rates and the spread of false positive rates across groups,
    max(max_g TPR_g - min_g TPR_g, max_g FPR_g - min_g FPR_g), where
    TPR_g = P(pred = positive | true = positive, g) and FPR_g = P(pred = positive | true != positive, g).

    A group without actual positives has no TPR (without actual negatives, no FPR) and is
    left out of that spread; a spread over fewer than two groups is 0. fairlearn instead
    counts such an undefined rate as 0, so the two agree whenever every group holds both
    labels.
    """
    actual = _is_positive(y_true, positive, "y_true")
    predicted = _is_positive(y_pred, positive, "y_pred")
    group_list = list(groups)
    _same_length(y_true=actual, y_pred=predicted, groups=group_list)
    tprs, fprs = [], []
    for idx in _group_members(group_list):
        truth, guess = actual[idx], predicted[idx]
        if truth.any():
            tprs.append(float(guess[truth].mean()))
        if not truth.all():
            fprs.append(float(guess[~truth].mean()))
    return max(_spread(tprs), _spread(fprs))


# ---------------------------------------------------------------------------------------
# Robustness
# ---------------------------------------------------------------------------------------


def attack_success_rate(clean_correct: ArrayLike, attacked_correct: ArrayLike) -> float:
    """Share of the items answered correctly on clean input that are answered wrongly
    after perturbation: ASR = #(clean right and attacked wrong) / #(clean right).

    Items the model already gets wrong on clean input are excluded (an attack cannot
    "succeed" on them, and a wrong-to-right flip does not count against it). With no
    clean-correct item the rate is 0/0, returned as 0.0.
    """
    clean = _booleans(clean_correct, "clean_correct")
    attacked = _booleans(attacked_correct, "attacked_correct")
    _same_length(clean_correct=clean, attacked_correct=attacked)
    if not clean.any():
        return 0.0
    return float(np.mean(~attacked[clean]))


def performance_drop_rate(
    clean_score: float | Sequence[float], attacked_score: float | Sequence[float]
) -> float:
    """Performance drop rate as PromptBench defines it (Zhu et al. 2023,
    https://arxiv.org/abs/2306.04528): PDR = 1 - attacked / clean.

    Scores are aggregate scores (e.g. accuracy), or per-item scores whose sums are used
    (then both need the same length). PDR is negative when the perturbation helps. A clean
    score of 0 leaves nothing to drop and gives 0.0.
    """
    clean_is_number = isinstance(clean_score, numbers.Real)
    if clean_is_number != isinstance(attacked_score, numbers.Real):
        raise ValueError("give clean_score and attacked_score both as numbers or both as sequences")
    if clean_is_number:
        clean, attacked = float(clean_score), float(attacked_score)
    else:
        clean_items = _vector(clean_score, "clean_score")
        attacked_items = _vector(attacked_score, "attacked_score")
        _same_length(clean_score=clean_items, attacked_score=attacked_items)
        clean, attacked = float(clean_items.sum()), float(attacked_items.sum())
    return 0.0 if clean == 0 else 1.0 - attacked / clean


# ---------------------------------------------------------------------------------------
# Standard errors of aggregates
# ---------------------------------------------------------------------------------------


def mean_stderr(values: ArrayLike) -> float:
    """Standard error of the mean: s / sqrt(n), with s the sample standard deviation
    (divisor n - 1). NaN for a single value, whose spread cannot be estimated."""
    array = _vector(values, "values")
    if array.size == 1:
        return math.nan
    return float(np.std(array, ddof=1) / math.sqrt(array.size))


def bootstrap_stderr(
    values: ArrayLike,
    metric: Callable[[np.ndarray], float] = np.mean,
    iterations: int = 1000,
    seed: int = 0,
) -> float:
    """Bootstrap standard error of ``metric(values)`` (Efron 1979).

    Draws ``iterations`` resamples of the n values with replacement (indices from
    ``np.random.default_rng(seed)``, one resample after another, so the result is fixed
    by ``seed``), applies ``metric`` to each, and returns the sample standard deviation
    (divisor iterations - 1) of those replicates. Use it for metrics without a closed-form
    error (F1, ECE, medians); for a mean, :func:`mean_stderr` is exact and cheaper.
    """
    array = _vector(values, "values")
    if iterations < 2:
        raise ValueError(f"iterations must be >= 2, got {iterations}")
    rng = np.random.default_rng(seed)
    replicates = [float(metric(array[rng.integers(0, array.size, size=array.size)])) for _ in range(iterations)]
    return float(np.std(replicates, ddof=1))


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a success rate (95% for the default z): the p where
    ``|p_hat - p| = z * sqrt(p (1 - p) / n)``, i.e. centre ``(p_hat + z²/2n) / (1 + z²/n)`` and
    half-width ``z / (1 + z²/n) * sqrt(p_hat (1 - p_hat) / n + z² / 4n²)``. Unlike the normal
    interval it stays inside [0, 1] and is not empty at 0 or n successes: 0 of 20 gives
    (0, 0.161). (nan, nan) when n is 0."""
    if n < 0 or not 0 <= successes <= max(n, 0):
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    scale = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / scale
    half = z / scale * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)
