"""Long-term memory: facts kept on disk across sessions and recalled by relevance.

A :class:`Memory` is one SQLite file with a table of facts (text, when, where from, and an
embedding when an encoder is given). An agent with a memory:

- starts each run by recalling the facts most relevant to the question and putting them in
  its system prompt ("Remembered from earlier sessions: ...");
- can call ``remember(fact)`` to store something for later, and ``recall(query)`` to search;
- stores each answered question with its answer when the run ends.

Relevance is the cosine similarity of sentence embeddings (``lmforge.embed``, e.g.
all-MiniLM-L6-v2) when the memory has an encoder (a fact below ``min_score``, 0.3 by default,
is not recalled), else BM25 over the facts' words (the knowledge bases' tokenization,
docs/RAG.md) with the query's common words left out: a fact that shares no other word with
the question is not recalled.

    memory = Memory("runs/memory.sqlite", encoder="all-minilm-l6-v2")
    memory.remember("The user's dog is called Rex.")
    memory.recall("what is my dog's name?")   # [Fact(text="The user's dog is called Rex.", score=0.71, ...)]
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.agent.tools import Tool, ToolError, tool
from lmforge.errors import InputError

# Words too common to make a fact relevant (BM25 recall): a question's "what is the ..." would
# otherwise match every fact that has "is" or "the" in it.
STOP_WORDS = frozenset("""a an and are as at be by can could did do does for from had has have how i if in
into is it its me my of on or our please s she so than that the their them then there these they this to
us was we were what when where which who whom why will with would you your""".split())

SCHEMA = """CREATE TABLE IF NOT EXISTS facts (
    id INTEGER PRIMARY KEY, text TEXT NOT NULL UNIQUE, source TEXT NOT NULL, created REAL NOT NULL,
    embedding BLOB)"""


@dataclass
class Fact:
    text: str
    score: float
    source: str
    created: float


class Memory:
    """Facts in a SQLite file (made when missing); ``encoder``: a sentence-embedding model's path or
    name for dense recall (None: BM25)."""

    def __init__(self, path: str | Path, encoder: str | None = None, min_score: float | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, check_same_thread=False)
            self.db.execute(SCHEMA)
        except sqlite3.DatabaseError as err:
            raise InputError(f"{self.path}: not a memory database ({err})") from None
        self.embedder = None
        if encoder:
            from lmforge.embed import load

            self.embedder = load(encoder)
        self.min_score = min_score if min_score is not None else (0.3 if self.embedder else 1e-9)

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM facts").fetchone()[0]

    def _vector(self, text: str) -> np.ndarray:
        return self.embedder.encode([text])[0].astype(np.float32)

    def remember(self, text: str, source: str = "agent") -> bool:
        """Store ``text``; False when the same text is already there."""
        text = " ".join(text.split())
        if not text:
            raise ValueError("an empty fact")
        blob = self._vector(text).tobytes() if self.embedder else None
        with self.db:
            cursor = self.db.execute("INSERT OR IGNORE INTO facts (text, source, created, embedding) "
                                     "VALUES (?, ?, ?, ?)", (text, source, time.time(), blob))
        return cursor.rowcount == 1

    def recall(self, query: str, k: int = 3) -> list[Fact]:
        """The ``k`` facts most relevant to ``query`` (at least ``min_score``), best first."""
        rows = self.db.execute("SELECT text, source, created, embedding FROM facts ORDER BY id").fetchall()
        if not rows or not query.strip():
            return []
        if self.embedder is not None:
            missing = [i for i, row in enumerate(rows) if row[3] is None]  # stored without an encoder
            vectors = np.stack([np.frombuffer(row[3], dtype=np.float32) if row[3] is not None
                                else self._vector(row[0]) for row in rows])
            if missing:
                with self.db:
                    self.db.executemany("UPDATE facts SET embedding = ? WHERE text = ?",
                                        [(vectors[i].tobytes(), rows[i][0]) for i in missing])
            query_vector = self._vector(query)
            norms = np.linalg.norm(vectors, axis=1) * np.linalg.norm(query_vector)
            scores = vectors @ query_vector / np.maximum(norms, 1e-12)
        else:
            from lmforge.rag.bm25 import bm25_tokens, build_bm25

            words = [w for w in bm25_tokens(query) if w not in STOP_WORDS]
            if not words:
                return []
            scores = build_bm25([row[0] for row in rows]).get_scores(words)
        order = np.argsort(-scores, kind="stable")[:k]
        return [Fact(rows[i][0], float(scores[i]), rows[i][1], rows[i][2]) for i in order
                if scores[i] >= self.min_score]

    def context(self, question: str, k: int = 3) -> str:
        """The system-prompt lines recalled for ``question`` ('' when nothing is relevant)."""
        facts = self.recall(question, k)
        return "" if not facts else "Remembered from earlier sessions:\n" + "\n".join(f"- {f.text}" for f in facts)

    def tools(self) -> list[Tool]:
        """``remember(fact)`` and ``recall(query)`` for the model."""
        def remember(fact: str) -> str:
            """Store a fact in long-term memory for later sessions.

            Args:
                fact: one short sentence to keep.
            """
            try:
                return "stored" if self.remember(fact) else "already known"
            except ValueError as err:
                raise ToolError(str(err)) from None

        def recall(query: str) -> str:
            """Search long-term memory for facts from earlier sessions.

            Args:
                query: what to look for, in a few words.
            """
            facts = self.recall(query, 5)
            return "\n".join(f"- {f.text}" for f in facts) if facts else "nothing remembered about that"

        return [tool(remember), tool(recall)]

    def close(self) -> None:
        self.db.close()
