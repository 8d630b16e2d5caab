"""Exact and near-duplicate detection: a content hash, and MinHash + LSH banding.

MinHash (Broder 1997, "On the resemblance and containment of documents"): for
a random hash function h, P[min h(A) == min h(B)] = |A ∩ B| / |A ∪ B|, the
Jaccard similarity of the shingle sets A and B. A signature is the minimum
under ``num_perm`` hash functions; the fraction of equal entries estimates
the Jaccard similarity.

LSH banding (Leskovec, Rajaraman, Ullman, "Mining of Massive Datasets", ch. 3):
cut the signature into ``bands`` bands of ``rows`` rows; two documents are
candidates when any band matches exactly, which happens with probability
1 - (1 - s^rows)^bands, an S-curve around the threshold. Candidates are then
checked against the threshold on the full signature.

Shingles are ``shingle_size`` consecutive lower-cased words (``\\w+``); word
hashes are CRC-32 (stable across runs, unlike ``hash``), combined per shingle
and mixed in numpy. The hash functions are (a*x + b) mod p with p < 2^32, so
every product fits in uint64.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from dataclasses import dataclass

import numpy as np

_PRIME = np.uint64(4294967291)  # largest prime below 2**32: a*x + b < 2**64 for a, x, b < 2**32
_WORD = re.compile(r"\w+")
_COMBINE = np.uint64(0x100000001B3)  # FNV-64 prime: shingle hash = h*C + next word hash (mod 2**64)
_BLOCK = 8192  # shingles per numpy block: bounds the (num_perm, block) temporary
_MAX_CACHED_WORDS = 1_000_000


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """``(bands, rows)`` with ``bands * rows <= num_perm`` that minimise false positives + false negatives.

    Errors are the areas between the S-curve 1 - (1 - s^rows)^bands and the ideal step at
    ``threshold``, integrated over similarity s in [0, 1].
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    similarity = np.linspace(0.0, 1.0, 2001)
    below = similarity < threshold
    best, best_error = (1, num_perm), float("inf")
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        candidate = 1.0 - (1.0 - similarity**rows) ** bands
        error = candidate[below].sum() + (1.0 - candidate[~below]).sum()
        if error < best_error:
            best, best_error = (bands, rows), error
    return best


class MinHasher:
    """MinHash signatures of texts: ``signature(text) -> (num_perm,) uint32``; same seed, same signature."""

    def __init__(self, num_perm: int = 128, shingle_size: int = 5, seed: int = 0) -> None:
        if num_perm < 1 or shingle_size < 1:
            raise ValueError("num_perm and shingle_size must be positive")
        rng = np.random.default_rng(seed)
        self.num_perm = num_perm
        self.shingle_size = shingle_size
        self._a = rng.integers(1, int(_PRIME), size=(num_perm, 1), dtype=np.uint64)
        self._b = rng.integers(0, int(_PRIME), size=(num_perm, 1), dtype=np.uint64)
        self._word_hashes: dict[str, int] = {}  # most words repeat; hash each once

    def _hash_word(self, word: str) -> int:
        if len(self._word_hashes) >= _MAX_CACHED_WORDS:
            self._word_hashes.clear()
        value = self._word_hashes[word] = zlib.crc32(word.encode("utf-8"))
        return value

    def shingles(self, text: str) -> np.ndarray:
        """The distinct shingle hashes of ``text``: (n,) uint64, each below 2^32."""
        cache = self._word_hashes
        words = _WORD.findall(text.lower())
        hashes = np.array([cache[w] if w in cache else self._hash_word(w) for w in words], dtype=np.uint64)
        k = min(self.shingle_size, len(hashes))
        if k == 0:  # no words at all: the whole text is the one shingle
            hashes, k = np.array([zlib.crc32(text.encode("utf-8"))], dtype=np.uint64), 1
        count = len(hashes) - k + 1
        combined = hashes[:count].copy()
        for offset in range(1, k):  # (count,) uint64, wraps mod 2**64 on purpose
            combined = combined * _COMBINE + hashes[offset : offset + count]
        # splitmix64 finaliser: spreads every input bit over the top 32 bits we keep.
        combined ^= combined >> np.uint64(30)
        combined *= np.uint64(0xBF58476D1CE4E5B9)
        combined ^= combined >> np.uint64(27)
        combined *= np.uint64(0x94D049BB133111EB)
        combined ^= combined >> np.uint64(31)
        return np.unique(combined >> np.uint64(32))

    def signature(self, text: str) -> np.ndarray:
        """(num_perm,) uint32: the minimum of (a*x + b) mod p over the shingles x, per hash function."""
        shingles = self.shingles(text)
        signature = np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        for start in range(0, len(shingles), _BLOCK):
            block = shingles[None, start : start + _BLOCK]  # (1, B)
            values = (self._a * block + self._b) % _PRIME  # (num_perm, B)
            np.minimum(signature, values.min(axis=1), out=signature)
        return signature.astype(np.uint32)


@dataclass(frozen=True, slots=True)
class Duplicate:
    """Why a document was dropped: ``reason`` is ``exact_duplicate`` or ``near_duplicate``."""

    reason: str
    original: str  # source of the kept document it duplicates
    similarity: float  # estimated Jaccard similarity; 1.0 for exact duplicates


class Deduplicator:
    """Streaming deduplication that keeps the first occurrence.

    ``add(text, source)`` returns None and remembers the text when it is new, or the
    :class:`Duplicate` it matches (and forgets it). Results depend only on the order
    of calls and the seed. ``near=False`` checks exact duplicates only.
    """

    def __init__(
        self,
        threshold: float = 0.8,
        num_perm: int = 128,
        shingle_size: int = 5,
        seed: int = 0,
        near: bool = True,
    ) -> None:
        self.threshold = threshold
        self.near = near
        self.bands, self.rows = lsh_bands(threshold, num_perm)
        self.hasher = MinHasher(num_perm, shingle_size, seed)
        self._exact: dict[bytes, str] = {}
        self._sources: list[str] = []
        self._signatures = np.empty((1024, num_perm), dtype=np.uint32)  # grows by doubling
        self._buckets: list[dict[bytes, list[int]]] = [{} for _ in range(self.bands)]

    def add(self, text: str, source: str) -> Duplicate | None:
        """Check ``text`` against the documents kept so far; remember it if it is new."""
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
        if digest in self._exact:
            return Duplicate("exact_duplicate", self._exact[digest], 1.0)
        if self.near:
            signature = self.hasher.signature(text)
            keys = [signature[b * self.rows : (b + 1) * self.rows].tobytes() for b in range(self.bands)]
            match = self._best_candidate(signature, keys)
            if match is not None:
                return match
            self._remember(signature, keys, source)
        self._exact[digest] = source
        return None

    def _best_candidate(self, signature: np.ndarray, keys: list[bytes]) -> Duplicate | None:
        """The most similar kept document at or above the threshold among the LSH candidates."""
        candidates = sorted({i for band, key in zip(self._buckets, keys) for i in band.get(key, ())})
        if not candidates:
            return None
        similarity = (self._signatures[candidates] == signature).mean(axis=1)  # (num_candidates,)
        best = int(np.argmax(similarity))
        if similarity[best] < self.threshold:
            return None
        return Duplicate("near_duplicate", self._sources[candidates[best]], float(similarity[best]))

    def _remember(self, signature: np.ndarray, keys: list[bytes], source: str) -> None:
        index = len(self._sources)
        if index == len(self._signatures):
            self._signatures = np.concatenate([self._signatures, np.empty_like(self._signatures)])
        self._signatures[index] = signature
        self._sources.append(source)
        for band, key in zip(self._buckets, keys):
            band.setdefault(key, []).append(index)
