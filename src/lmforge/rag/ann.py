"""Approximate nearest neighbours for large knowledge bases: an HNSW graph over the chunk vectors.

Exact dense search compares the question with every chunk: one (N, dim) matrix-vector
product, fine for thousands of chunks, linear in N beyond. HNSW (hierarchical navigable
small world graphs; Malkov and Yashunin, 2016) links every vector to about ``m`` near
neighbours, in layers that thin out going up like a skip list. A search enters at the top
layer, walks greedily towards the query, drops a layer, and at the bottom keeps the
``ef_search`` best candidates met: it reads a few thousand vectors instead of all of them.
The answer is approximate: a true neighbour the walk never reaches is missed. A larger
``ef_search`` (or ``m``) finds more of them at more cost; ``benchmarks/rag.py --only
latency`` measures both sides against exact search.

FAISS does the graph (``IndexHNSWFlat`` with inner products, which on unit vectors are
the cosine similarities that exact search ranks by). The index is a file of the knowledge
base (``vectors.hnsw``), written with it and rebuilt whole when it is updated (an HNSW
graph cannot forget a vector).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lmforge.errors import InputError

ANN_FILE = "vectors.hnsw"
AUTO_CHUNKS = 50_000  # `--ann auto` builds the graph from this many chunks on
M, EF_CONSTRUCTION, EF_SEARCH = 32, 128, 128


class HNSWIndex:
    """An HNSW graph over unit vectors; :meth:`search` returns rows and cosine similarities."""

    def __init__(self, index):
        self.index = index

    @classmethod
    def build(cls, vectors: np.ndarray, m: int = M, ef_construction: int = EF_CONSTRUCTION) -> HNSWIndex:
        import faiss

        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        index = faiss.IndexHNSWFlat(vectors.shape[1], m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.add(vectors)
        return cls(index)

    @classmethod
    def load(cls, path: str | Path) -> HNSWIndex:
        import faiss

        # No array in the file can be longer than the file: faiss refuses one that claims more before allocating
        limit = faiss.get_deserialization_vector_byte_limit()
        faiss.set_deserialization_vector_byte_limit(Path(path).stat().st_size)
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as err:  # faiss checks what it reads and says what does not hold
            raise InputError(f"{path}: not a readable HNSW index ({str(err).splitlines()[0][:300]})") from err
        finally:
            faiss.set_deserialization_vector_byte_limit(limit)
        if not isinstance(index, faiss.IndexHNSWFlat) or index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise InputError(f"{path}: not an inner-product HNSW index (found {type(index).__name__})")
        return cls(index)

    def save(self, path: str | Path) -> None:
        import faiss

        faiss.write_index(self.index, str(path))

    def __len__(self) -> int:
        return self.index.ntotal

    def search(self, query: np.ndarray, k: int, ef_search: int = EF_SEARCH) -> tuple[np.ndarray, np.ndarray]:
        """The (up to) ``k`` rows nearest ``query`` and their similarities, best first; the walk keeps
        ``max(ef_search, k)`` candidates."""
        import faiss

        params = faiss.SearchParametersHNSW(efSearch=max(ef_search, k))
        scores, rows = self.index.search(np.asarray(query, dtype=np.float32).reshape(1, -1), k, params=params)
        keep = rows[0] >= 0  # fewer than k reached
        return rows[0][keep].astype(np.int64), scores[0][keep].astype(np.float64)
