"""``lmforge rag eval``: how well each retriever finds the chunks that answer a question.

Questions come from a JSONL file, one ``{"question": ..., "sources": [...]}`` per line:
a source names what answers the question: a chunk id, a chunk's ``source`` (``path`` or
``path:line`` for JSONL) or a file (its path, or the path's end, e.g. ``with.md``). Every
chunk of a named source is relevant. Without a file, questions are drawn from the
knowledge base itself (:func:`sampled_questions`): a fixed-seed sample of chunks, each
asked with a few words of one of its sentences; relevant is every chunk of the same
file. Those questions share words with their answers, so they flatter BM25; they check
that retrieval works, not how it compares on real questions.

For each method (bm25, dense, hybrid; ``hybrid+rerank`` when the retriever has a reranker), over the
questions:

- ``recall@k`` (k = 1, 5, 10): the fraction of a question's relevant sources with at least
  one chunk in the top k, averaged over questions;
- ``mrr``: the mean of 1 / the rank of the first relevant chunk (0 when none is in the top 100);
- ``ndcg@10``: DCG = sum over the top 10 of rel_i / log2(i + 1) (rel 1 for a relevant chunk),
  divided by the DCG of the best possible ranking.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.data.jsonl import iter_records
from lmforge.errors import InputError
from lmforge.rag.retrieve import METHODS, Retriever
from lmforge.rag.store import KnowledgeBase, StoredChunk

CUTOFFS = (1, 5, 10)
DEPTH = 100  # how far down the ranking the first relevant chunk is looked for


@dataclass(frozen=True)
class Question:
    text: str
    sources: tuple[str, ...]


def read_questions(path: str | Path) -> list[Question]:
    questions = []
    for record, where in iter_records(path):
        if not isinstance(record, dict) or not isinstance(record.get("question"), str) or not record["question"].strip():
            raise InputError(f"{where}: each line needs a non-empty string field 'question'")
        sources = record.get("sources")
        if not isinstance(sources, list) or not sources or not all(isinstance(s, str) and s for s in sources):
            raise InputError(f"{where}: 'sources' must be a non-empty list of chunk ids, sources or file names")
        questions.append(Question(record["question"], tuple(sources)))
    if not questions:
        raise InputError(f"{path}: no questions")
    return questions


def sampled_questions(kb: KnowledgeBase, count: int = 100, words: int = 6, seed: int = 0) -> list[Question]:
    """``count`` questions from the knowledge base's own chunks (see the module docstring)."""
    return [question for question, _ in draw_questions(kb, count, words, seed)]


def draw_questions(kb: KnowledgeBase, count: int, words: int = 6, seed: int = 0, per_chunk: int = 1
                   ) -> list[tuple[Question, int]]:
    """Up to ``count`` (question, chunk row) pairs: chunks in a fixed-seed order, ``per_chunk`` questions
    from each (``words`` consecutive words of one of its sentences), the chunk's file as the source."""
    rng = np.random.default_rng(seed)
    drawn = []
    for row in rng.permutation(len(kb)):
        chunk = kb.chunks[row]
        sentences = [s.split() for s in chunk.text.replace("\n", " ").split(". ") if len(s.split()) >= words + 2]
        for _ in range(per_chunk if sentences else 0):
            sentence = sentences[int(rng.integers(len(sentences)))]
            start = int(rng.integers(len(sentence) - words + 1))
            drawn.append((Question(" ".join(sentence[start:start + words]), (chunk.file,)), int(row)))
        if len(drawn) >= count:
            break
    if not drawn:
        raise InputError(f"{kb.path}: no chunk has a sentence long enough to ask about")
    return drawn[:count]


def _matches(chunk: StoredChunk, source: str) -> bool:
    return source in (chunk.id, chunk.source, chunk.file) or chunk.file.endswith("/" + source)


def evaluate_retrieval(retriever: Retriever, questions: list[Question], methods: tuple[str, ...] = METHODS,
                       weights: tuple[float, float] = (1.0, 1.0)) -> dict:
    """{method: {"recall@1", "recall@5", "recall@10", "mrr", "ndcg@10"}} over ``questions``; ``weights``:
    hybrid's (bm25, dense) weights in the fusion."""
    chunks = retriever.kb.chunks
    relevant = []
    for question in questions:
        rows = {c.row for c in chunks if any(_matches(c, s) for s in question.sources)}
        if not rows:
            raise InputError(f"question {question.text!r}: none of its sources {list(question.sources)} is in "
                             f"{retriever.kb.path}")
        relevant.append(rows)
    results = {}
    for method in methods:
        totals = dict.fromkeys([*(f"recall@{k}" for k in CUTOFFS), "mrr", "ndcg@10"], 0.0)
        base, _, rerank = method.partition("+")
        for question, rows in zip(questions, relevant):
            ranked = [hit.chunk for hit in retriever.search(question.text, k=DEPTH, method=base, rerank=bool(rerank),
                                                            weights=weights)]
            for k in CUTOFFS:
                found = sum(any(_matches(c, s) for c in ranked[:k]) for s in question.sources)
                totals[f"recall@{k}"] += found / len(question.sources)
            first = next((i for i, c in enumerate(ranked, 1) if c.row in rows), None)
            totals["mrr"] += 1 / first if first else 0.0
            dcg = sum(1 / math.log2(i + 1) for i, c in enumerate(ranked[:10], 1) if c.row in rows)
            ideal = sum(1 / math.log2(i + 1) for i in range(1, min(10, len(rows)) + 1))
            totals["ndcg@10"] += dcg / ideal
        results[method] = {name: value / len(questions) for name, value in totals.items()}
    return results


def format_table(results: dict, count: int) -> str:
    names = list(next(iter(results.values())))
    lines = [f"{count} questions", "", "| method | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for method, figures in results.items():
        lines.append(f"| {method} | " + " | ".join(f"{figures[n]:.3f}" for n in names) + " |")
    return "\n".join(lines)
