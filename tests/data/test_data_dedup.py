"""MinHash signatures, LSH banding and the streaming deduplicator."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest

from lmforge.data.dedup import Deduplicator, MinHasher, lsh_bands

VOCAB = [f"w{i}" for i in range(3000)]


def long_doc(seed: int, words: int = 400) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(VOCAB) for _ in range(words))


def edit_words(text: str, count: int, seed: int = 0) -> str:
    """Replace ``count`` evenly spaced words with words outside VOCAB."""
    words = text.split()
    for k, i in enumerate(range(0, len(words), len(words) // count)):
        words[i] = f"edited{seed}_{k}"
    return " ".join(words)


def jaccard(a: str, b: str, k: int = 5) -> float:
    def shingles(t):
        w = re.findall(r"\w+", t.lower())
        return {tuple(w[i : i + k]) for i in range(len(w) - k + 1)}

    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def test_lsh_bands_fit_the_signature_and_follow_the_threshold():
    for threshold in (0.5, 0.7, 0.8, 0.9):
        bands, rows = lsh_bands(threshold, 128)
        assert bands * rows <= 128
        # The S-curve 1 - (1 - s^r)^b crosses 1/2 near the threshold.
        midpoint = (1 - 0.5 ** (1 / bands)) ** (1 / rows)
        assert abs(midpoint - threshold) < 0.1
    assert lsh_bands(0.9, 128)[1] > lsh_bands(0.5, 128)[1]
    with pytest.raises(ValueError):
        lsh_bands(1.0, 128)


def test_signatures_are_deterministic_per_seed_and_estimate_jaccard():
    a = long_doc(1)
    b = edit_words(a, 20)
    sig = MinHasher(num_perm=256, seed=3).signature
    assert sig(a).dtype == np.uint32 and sig(a).shape == (256,)
    assert np.array_equal(sig(a), MinHasher(num_perm=256, seed=3).signature(a))
    assert not np.array_equal(sig(a), MinHasher(num_perm=256, seed=4).signature(a))
    estimate = float((sig(a) == sig(b)).mean())
    assert estimate == pytest.approx(jaccard(a, b), abs=0.08)
    assert float((sig(a) == sig(long_doc(2))).mean()) < 0.05


def test_text_without_words_still_gets_a_signature():
    hasher = MinHasher(num_perm=16)
    assert np.array_equal(hasher.signature("!!! ???"), hasher.signature("!!! ???"))
    assert not np.array_equal(hasher.signature("!!! ???"), hasher.signature("### ..."))


def test_exact_and_near_duplicates_are_dropped_distinct_kept():
    dedup = Deduplicator(threshold=0.8, seed=0)
    original = long_doc(10)
    near = edit_words(original, 4)
    assert jaccard(original, near) > 0.85
    assert dedup.add(original, "a") is None
    assert dedup.add(long_doc(11), "b") is None
    exact = dedup.add(original, "c")
    assert (exact.reason, exact.original, exact.similarity) == ("exact_duplicate", "a", 1.0)
    found = dedup.add(near, "d")
    assert (found.reason, found.original) == ("near_duplicate", "a")
    assert found.similarity > 0.8
    assert dedup.add(long_doc(12), "e") is None
    # Dropped documents are not remembered: an exact copy of "d" matches "a", not "d".
    assert dedup.add(near, "f").original == "a"


def test_threshold_is_configurable():
    original = long_doc(20)
    edited = edit_words(original, 25)
    similarity = jaccard(original, edited)
    assert 0.35 < similarity < 0.65
    for threshold, dropped in ((similarity - 0.2, True), (similarity + 0.2, False)):
        dedup = Deduplicator(threshold=threshold, seed=0)
        dedup.add(original, "a")
        assert (dedup.add(edited, "b") is not None) == dropped


def test_near_false_checks_exact_duplicates_only():
    dedup = Deduplicator(near=False)
    original = long_doc(30)
    assert dedup.add(original, "a") is None
    assert dedup.add(edit_words(original, 2), "b") is None
    assert dedup.add(original, "c").reason == "exact_duplicate"


def test_many_documents_grow_the_signature_store():
    dedup = Deduplicator(num_perm=32)
    kept = sum(dedup.add(long_doc(i, words=30), str(i)) is None for i in range(1500))
    assert kept == 1500
    assert dedup.add(long_doc(1499, words=30), "again").original == "1499"
