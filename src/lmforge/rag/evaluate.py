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

With a model, :func:`evaluate_answers` also asks every question (each line then carries
``"answer"``: one acceptable short answer or a list of them) and scores the replies: exact
match, F1, whether the reply contains an answer, whether it cites its sources and whether
the cited chunks support its claims (:mod:`lmforge.rag.support`).

``langref`` names the built-in question set: 100 questions written by hand over the
language reference (``pydoc_data.topics``), each with the topics that answer it and a
short answer; ``lmforge rag langref DIR`` writes the topics as the files they name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.data.jsonl import iter_records
from lmforge.errors import InputError
from lmforge.eval.metrics import answer_tokens, exact_match, mean_stderr, token_f1
from lmforge.rag.retrieve import METHODS, Retriever
from lmforge.rag.store import KnowledgeBase, StoredChunk

CUTOFFS = (1, 5, 10)
ANSWER_METRICS = ("exact_match", "f1", "contains", "source_found", "cited", "supported", "grounded", "not_found")
DEPTH = 100  # how far down the ranking the first relevant chunk is looked for


@dataclass(frozen=True)
class Question:
    text: str
    sources: tuple[str, ...]
    answers: tuple[str, ...] = ()  # acceptable short answers, for answer evaluation


BUILTIN = {"langref": Path(__file__).with_name("langref_questions.jsonl")}  # name -> packaged question file


def read_questions(path: str | Path) -> list[Question]:
    """Questions from a JSONL file, or a built-in set by name (``langref``: questions written by hand over
    the language reference, see :func:`lmforge.rag.langref.write_topics`)."""
    if str(path) in BUILTIN and not Path(path).exists():
        path = BUILTIN[str(path)]
    questions = []
    for record, where in iter_records(path):
        if not isinstance(record, dict) or not isinstance(record.get("question"), str) or not record["question"].strip():
            raise InputError(f"{where}: each line needs a non-empty string field 'question'")
        sources = record.get("sources")
        if not isinstance(sources, list) or not sources or not all(isinstance(s, str) and s for s in sources):
            raise InputError(f"{where}: 'sources' must be a non-empty list of chunk ids, sources or file names")
        answers = record.get("answer", [])
        answers = [answers] if isinstance(answers, str) else answers
        if not isinstance(answers, list) or not all(isinstance(a, str) and a.strip() for a in answers):
            raise InputError(f"{where}: 'answer' must be a string or a list of non-empty strings")
        questions.append(Question(record["question"], tuple(sources), tuple(answers)))
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


def contains_answer(reply: str, answers: tuple[str, ...]) -> float:
    """1.0 when some acceptable answer's words occur in the reply, in order and whole (after SQuAD
    normalization): a long reply rarely equals a short answer, but it can contain it."""
    padded = f" {' '.join(answer_tokens(reply))} "
    return float(any(f" {' '.join(answer_tokens(a))} " in padded for a in answers if answer_tokens(a)))


def evaluate_answers(retriever: Retriever, questions: list[Question], generate, judge=None, k: int = 4,
                     method: str = "hybrid", min_score: float = 0.3, max_new_tokens: int = 128,
                     rerank: bool = False, batch: int = 16, progress: bool = True) -> tuple[dict, list[dict]]:
    """Ask the questions through :func:`lmforge.rag.ask.ask_many`, ``batch`` at a time (``generate`` is
    the model), and score the replies against each question's acceptable answers and sources. Per reply:

    - ``exact_match``, ``f1``: SQuAD exact match and token F1 with the best acceptable answer;
    - ``contains``: :func:`contains_answer`;
    - ``source_found``: a relevant chunk is among the ``k`` the model was shown;
    - ``cited``: the reply cites at least one of them;
    - ``supported``: the fraction of the reply's claims that the chunks they cite support
      (:func:`lmforge.rag.support.check_claims` with ``judge``); replies without claims are left out;
    - ``grounded``: the same against all the chunks the model was shown, cited or not (a reply that
      keeps to its sources but forgets to cite scores here and not above);
    - ``not_found``: nothing relevant was retrieved, so the reply says so without asking the model
      (it then scores 0 on the answer metrics).

    Returns ({metric: {"mean", "stderr", "n"}}, one record per question with the reply, its sources
    and claims).
    """
    from tqdm import tqdm

    from lmforge.rag.ask import ask_many
    from lmforge.rag.support import check_claims, strip_citations

    missing = [q.text for q in questions if not q.answers]
    if missing:
        raise InputError(f"answer evaluation needs an 'answer' for every question; {len(missing)} have none, "
                         f"e.g. {missing[0]!r}")
    values: dict[str, list[float]] = {name: [] for name in ANSWER_METRICS}
    records = []
    with tqdm(total=len(questions), desc="answering", unit="question", disable=not progress) as bar:
        for start in range(0, len(questions), batch):  # a batch of questions answered together
            group = questions[start:start + batch]
            answers = ask_many(retriever, [q.text for q in group], generate, k=k, method=method, min_score=min_score,
                               max_new_tokens=max_new_tokens, rerank=rerank)
            for question, answer in zip(group, answers):
                reply = strip_citations(answer.text) if answer.found else ""
                claims = check_claims(answer.text, answer.sources, judge) if answer.found else []
                scored = {"exact_match": exact_match(reply, question.answers),
                          "f1": token_f1(reply, question.answers), "contains": contains_answer(reply, question.answers),
                          "source_found": float(any(_matches(h.chunk, s) for h in answer.sources
                                                    for s in question.sources)),
                          "cited": float(bool(answer.cited)), "not_found": float(not answer.found)}
                if claims:
                    scored["supported"] = sum(c.supported for c in claims) / len(claims)
                    grounded = check_claims(answer.text, answer.sources, judge, cited_only=False)
                    scored["grounded"] = sum(c.supported for c in grounded) / len(grounded)
                for name, value in scored.items():
                    values[name].append(value)
                records.append({"question": question.text, "answers": list(question.answers), "reply": answer.text,
                                "sources": [h.chunk.source for h in answer.sources], "cited": answer.cited,
                                "claims": [{"text": c.text, "cites": list(c.cites), "supported": c.supported,
                                            "score": round(c.score, 4)} for c in claims], **scored})
            bar.update(len(group))
    summary = {name: {"mean": float(np.mean(v)) if v else float("nan"), "stderr": mean_stderr(v) if len(v) > 1
                      else float("nan"), "n": len(v)} for name, v in values.items()}
    return summary, records


def format_answer_table(summary: dict) -> str:
    lines = ["| answer metric | mean | stderr | replies |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {s['mean']:.3f} | {s['stderr']:.3f} | {s['n']} |" for name, s in summary.items()]
    return "\n".join(lines)


def format_table(results: dict, count: int) -> str:
    names = list(next(iter(results.values())))
    lines = [f"{count} questions", "", "| method | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for method, figures in results.items():
        lines.append(f"| {method} | " + " | ".join(f"{figures[n]:.3f}" for n in names) + " |")
    return "\n".join(lines)
