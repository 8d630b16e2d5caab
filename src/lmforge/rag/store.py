"""The knowledge base on disk: chunks and metadata in SQLite, vectors beside them, a BM25 index.

A knowledge base is a folder:

- ``kb.sqlite``: ``meta`` (the encoder that made the vectors and the chunking settings),
  ``files`` (each indexed file and the SHA-256 of its bytes), ``chunks`` (row, id, file,
  source, title, start, end, text, tokens), rows numbered 0..N-1 in (file, start) order;
- ``vectors.npy``: (N, dim) float32 unit vectors, row i the vector of chunk row i;
- ``bm25/``: the BM25 index of the chunk texts (bm25s), in the same row order;
- ``vectors.hnsw``, for a large knowledge base: an HNSW graph over the vectors
  (:mod:`lmforge.rag.ann`), which dense search then walks instead of reading every vector.

It is written whole into a sibling folder and then renamed into place, so a run that
fails leaves the previous knowledge base as it was.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.errors import InputError
from lmforge.files import database_errors, new_folder, parse_json
from lmforge.rag.chunk import Chunk

DATABASE, VECTORS, BM25_FOLDER = "kb.sqlite", "vectors.npy", "bm25"
FORMAT = 1


@dataclass(frozen=True)
class StoredChunk(Chunk):
    file: str = ""
    row: int = 0


def is_knowledge_base(path: str | Path) -> bool:
    return (Path(path) / DATABASE).is_file() and (Path(path) / VECTORS).is_file()


class KnowledgeBase:
    """A knowledge base opened for reading: its chunks, vectors, BM25 index and metadata."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        old = self.path.with_name(self.path.name + ".old")
        if not is_knowledge_base(self.path) and is_knowledge_base(old):  # an update killed between its renames
            self.path = old
        if not is_knowledge_base(self.path):
            raise InputError(f"{self.path}: not a knowledge base (make one with `lmforge rag index PATHS --out "
                             f"{self.path}`)")
        database = self.path / DATABASE
        with database_errors(database, "knowledge base"), contextlib.closing(sqlite3.connect(database)) as db:
            self.meta = {key: parse_json(value, f"{database}: meta {key!r}") if isinstance(value, str) else value
                         for key, value in db.execute("SELECT key, value FROM meta")}
            if self.meta.get("format") != FORMAT:
                raise InputError(f"{self.path}: knowledge base format {self.meta.get('format')}, this lmforge reads "
                                 f"{FORMAT}; index again")
            self.files = dict(db.execute("SELECT path, hash FROM files"))
            rows = db.execute("SELECT row, id, file, source, title, start, end_, text, tokens FROM chunks ORDER BY row")
            self.chunks = [StoredChunk(id=r[1], source=r[3], title=r[4], start=r[5], end=r[6], text=r[7], tokens=r[8],
                                       file=r[2], row=r[0]) for r in rows]
        if [c.row for c in self.chunks] != list(range(len(self.chunks))) or not all(
                isinstance(c.start, int) and isinstance(c.end, int) and isinstance(c.tokens, int)
                and all(isinstance(v, str) for v in (c.id, c.file, c.source, c.title, c.text)) for c in self.chunks):
            raise InputError(f"{database}: chunk rows are not numbered 0..n-1 or hold values of the wrong type; "
                             "index again")
        try:
            self.vectors = np.load(self.path / VECTORS, mmap_mode="r", allow_pickle=False)
        except Exception as err:  # noqa: BLE001 (numpy's header parser raises ValueError, TokenError, EOFError ...)
            raise InputError(f"{self.path / VECTORS}: not a readable .npy array ({str(err)[:200]})") from err
        if self.vectors.ndim != 2 or self.vectors.dtype != np.float32 or len(self.vectors) != len(self.chunks):
            raise InputError(f"{self.path / VECTORS}: expected {len(self.chunks)} float32 vectors (one per chunk), "
                             f"found a {self.vectors.dtype} array of shape {self.vectors.shape}; index again")
        self._bm25 = None
        self._ann = False  # not looked for yet

    @property
    def ann(self):
        """The approximate vector index (:class:`lmforge.rag.ann.HNSWIndex`), or None when the knowledge
        base has none; loaded on first use."""
        if self._ann is False:
            from lmforge.rag.ann import ANN_FILE, HNSWIndex

            path = self.path / ANN_FILE
            self._ann = HNSWIndex.load(path) if path.is_file() else None
            if self._ann is not None and (len(self._ann) != len(self.chunks) or self._ann.index.d != self.vectors.shape[1]):
                raise InputError(f"{path}: {len(self._ann)} vectors of width {self._ann.index.d} for {len(self.chunks)} "
                                 f"chunks of width {self.vectors.shape[1]}; index again")
        return self._ann

    def __len__(self) -> int:
        return len(self.chunks)

    @property
    def bm25(self):
        """The BM25 index (bm25s), loaded on first use."""
        if self._bm25 is None:
            import bm25s

            folder = self.path / BM25_FOLDER
            try:
                self._bm25 = bm25s.BM25.load(str(folder))
            except Exception as err:  # noqa: BLE001 (bm25s's JSON and numpy readers raise many kinds)
                raise InputError(f"{folder}: not a readable BM25 index ({type(err).__name__}: {str(err)[:200]}); "
                                 "index again") from err
            words = len(self._bm25.scores["indptr"]) - 1  # score columns; bm25s gives "" the id past them
            vocab = self._bm25.vocab_dict
            if not all(type(i) is int and (0 <= i < words or word == "" and i == words) for word, i in vocab.items()) \
                    or len(set(vocab.values())) != len(vocab):
                self._bm25 = None
                raise InputError(f"{folder}: the BM25 vocabulary's ids do not match its {words} score columns; "
                                 "index again")
        return self._bm25

    def chunks_of(self, file: str) -> list[StoredChunk]:
        return [c for c in self.chunks if c.file == file]


def write_knowledge_base(path: str | Path, meta: dict, files: dict[str, str], chunks: Iterable[tuple[str, Chunk]],
                         vectors: np.ndarray, ann: bool = False) -> None:
    """Write a knowledge base at ``path`` atomically: rows in the order of ``chunks`` ((file, chunk) pairs);
    with ``ann``, an HNSW graph over the vectors too."""
    from lmforge.rag.bm25 import build_bm25

    path = Path(path)
    chunks = list(chunks)
    if len(chunks) != len(vectors):
        raise ValueError(f"{len(chunks)} chunks but {len(vectors)} vectors")
    with new_folder(path, "the knowledge base (the previous one, if any, is kept)") as tmp:
        with sqlite3.connect(tmp / DATABASE) as db:
            db.executescript("""
                CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                CREATE TABLE files (path TEXT PRIMARY KEY, hash TEXT NOT NULL);
                CREATE TABLE chunks (row INTEGER PRIMARY KEY, id TEXT UNIQUE NOT NULL, file TEXT NOT NULL,
                                     source TEXT NOT NULL, title TEXT NOT NULL, start INTEGER NOT NULL,
                                     end_ INTEGER NOT NULL, text TEXT NOT NULL, tokens INTEGER NOT NULL);
                CREATE INDEX chunks_file ON chunks (file);
            """)
            db.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in {**meta, "format": FORMAT}.items()])
            db.executemany("INSERT INTO files VALUES (?, ?)", sorted(files.items()))
            db.executemany("INSERT INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           [(row, c.id, file, c.source, c.title, c.start, c.end, c.text, c.tokens)
                            for row, (file, c) in enumerate(chunks)])
        db.close()
        np.save(tmp / VECTORS, np.ascontiguousarray(vectors, dtype=np.float32))
        build_bm25([c.text for _, c in chunks]).save(str(tmp / BM25_FOLDER))
        if ann:
            from lmforge.rag.ann import ANN_FILE, HNSWIndex

            HNSWIndex.build(vectors).save(tmp / ANN_FILE)

