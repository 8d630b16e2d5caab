"""Finding the chunks that answer a question: BM25, dense, and the two fused.

    retriever = Retriever(KnowledgeBase("runs/kb"))
    for hit in retriever.search("how does a with statement close a file?", k=5, method="hybrid"):
        print(hit.rank, hit.score, hit.chunk.title)

- ``bm25``: keyword search (:mod:`lmforge.rag.bm25`): exact words, rare ones weigh most.
- ``dense``: the question embedded by the knowledge base's encoder, chunks ranked by
  cosine similarity: searched exactly (one matrix-vector product over all vectors), or,
  when the knowledge base has an HNSW graph (large ones: :mod:`lmforge.rag.ann`),
  approximately by walking it (``exact=True`` reads every vector anyway).
- ``hybrid``: reciprocal rank fusion of the two: a chunk scores ``sum_m w_m / (k0 + rank_m)``
  over the methods that ranked it in their top ``candidates`` (Cormack et al., 2009; k0 = 60),
  so a chunk that both methods rank well beats one that only one ranks first, and the
  methods' incomparable scores never meet.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lmforge.embed import Embedder
from lmforge.errors import InputError
from lmforge.rag.bm25 import bm25_tokens
from lmforge.rag.store import KnowledgeBase, StoredChunk

METHODS = ("bm25", "dense", "hybrid")


@dataclass(frozen=True)
class Hit:
    chunk: StoredChunk
    score: float
    rank: int  # 1 for the best
    method: str


class Retriever:
    """Search one knowledge base. ``embedder``: its encoder (loaded from the knowledge base's meta when
    not given, on the first dense search). ``reranker``: reorders the best ``rerank_candidates`` of a
    search when it asks for it (:class:`lmforge.rag.rerank.LMReranker`). ``vectors``: the chunks'
    vectors by ``embedder`` when it is not the encoder that indexed ``kb`` (to compare encoders).
    ``exact``: never use the knowledge base's HNSW graph; ``ef_search``: how many candidates its walk
    keeps (more: closer to exact, slower)."""

    def __init__(self, kb: KnowledgeBase, embedder: Embedder | None = None, reranker=None,
                 rerank_candidates: int = 20, vectors: np.ndarray | None = None, exact: bool = False,
                 ef_search: int = 128):
        self.kb, self._embedder = kb, embedder
        self.reranker, self.rerank_candidates = reranker, rerank_candidates
        self.vectors = kb.vectors if vectors is None else vectors
        self.ann = None if exact or vectors is not None else kb.ann
        self.ef_search = ef_search
        self._last_query: tuple[str, np.ndarray] | None = None  # ask embeds the question twice otherwise

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            from lmforge.embed import load
            from lmforge.rag.index import encoder_fingerprint

            self._embedder = load(self.kb.meta["encoder"])
            if encoder_fingerprint(self._embedder) != self.kb.meta.get("encoder_fingerprint"):
                raise InputError(f"{self.kb.path}: the encoder {self.kb.meta['encoder']!r} found now is not the one "
                                 "that made this knowledge base's vectors; index again")
        return self._embedder

    def search(self, query: str, k: int = 5, method: str = "hybrid", weights: tuple[float, float] = (1.0, 1.0),
               candidates: int = 50, rrf_k: int = 60, rerank: bool = False) -> list[Hit]:
        """The ``k`` best chunks for ``query`` by ``method`` (bm25, dense or hybrid); with ``rerank`` the
        reranker reorders the best ``rerank_candidates`` of them (the rest follow in their order)."""
        if method not in METHODS:
            raise InputError(f"unknown retrieval method {method!r}; choose one of {', '.join(METHODS)}")
        if k < 1:
            raise InputError(f"k must be at least 1, got {k}")
        if rerank:
            if self.reranker is None:
                raise InputError("reranking needs a reranker (--rerank MODEL)")
            hits = self.search(query, max(k, self.rerank_candidates), method, weights, candidates, rrf_k)
            head = self.reranker.rerank(query, hits[:self.rerank_candidates])
            tail = [Hit(h.chunk, h.score, len(head) + i, h.method) for i, h in enumerate(hits[len(head):], 1)]
            return (head + tail)[:k]
        if method == "bm25":
            return self._hits(self.bm25_scores(query), k, method)
        if method == "dense":
            rows, scores = self.dense_top(query, k)
            return [Hit(self.kb.chunks[r], float(s), rank, method) for rank, (r, s) in enumerate(zip(rows, scores), 1)]
        fused = np.zeros(len(self.kb))
        for weight, top in zip(weights, (_top(self.bm25_scores(query), candidates), self.dense_top(query, candidates)[0])):
            fused[top] += weight / (rrf_k + np.arange(1, len(top) + 1))
        return self._hits(fused, k, method)

    def bm25_scores(self, query: str) -> np.ndarray:
        """(N,) BM25 score of every chunk (0 for a chunk without a query word)."""
        tokens = bm25_tokens(query)
        if not tokens:
            return np.zeros(len(self.kb))
        return np.asarray(self.kb.bm25.get_scores(tokens), dtype=np.float64)

    def query_vector(self, query: str) -> np.ndarray:
        """The query's unit vector by the encoder (the last one is kept: asking embeds it twice)."""
        if self._last_query is None or self._last_query[0] != query:
            self._last_query = (query, self.embedder.encode(query))
        return self._last_query[1]

    def dense_scores(self, query: str) -> np.ndarray:
        """(N,) cosine similarity of every chunk's vector with the query's (always exact)."""
        return np.asarray(self.vectors @ self.query_vector(query), dtype=np.float64)

    def dense_top(self, query: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows and cosine similarities of the ``k`` chunks nearest the query, best first: by the HNSW
        graph when the knowledge base has one (approximate), else by every vector."""
        if self.ann is not None:
            return self.ann.search(self.query_vector(query), k, self.ef_search)
        scores = self.dense_scores(query)
        top = _top(scores, k)
        return top, scores[top]

    def _hits(self, scores: np.ndarray, k: int, method: str) -> list[Hit]:
        top = [i for i in _top(scores, k) if method == "dense" or scores[i] > 0]
        return [Hit(self.kb.chunks[i], float(scores[i]), rank, method) for rank, i in enumerate(top, start=1)]


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest scores, best first (ties: the lower row first)."""
    k = min(k, len(scores))
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    part = np.argpartition(-scores, k - 1)[:k]
    return part[np.lexsort((part, -scores[part]))]
