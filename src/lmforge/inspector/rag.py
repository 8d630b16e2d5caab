"""A retrieval-augmented answer looked at: the chunks retrieved for a question with their BM25, dense and fused
scores and ranks under every method, and where each sits in the prompt the model gets.

    view = rag_view("runs/kb", "How do I open a file?", generate=lm)
    [(c.number, c.bm25_score, c.dense_score, c.fused_score, c.prompt_start) for c in view.chunks]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.errors import InputError
from lmforge.infer.constrain import token_bytes
from lmforge.inspector.plain import Plain


@dataclass
class RetrievedChunk(Plain):
    """One retrieved chunk: its scores and ranks under each method, and where it sits in the prompt."""

    number: int  # as the prompt numbers it: [number]
    row: int  # its row in the knowledge base
    id: str
    source: str
    title: str
    excerpt: str  # the text as put in the prompt (cut at max_chars)
    start: int | None  # the chunk's character span in its document
    end: int | None
    bm25_score: float
    dense_score: float  # cosine similarity with the question, exact
    fused_score: float  # reciprocal rank fusion (0: in neither method's candidates)
    bm25_rank: int | None  # over every chunk that shares a word with the question (None: none)
    dense_rank: int  # over every chunk, exact
    fused_rank: int | None  # as the retriever's hybrid search ranks it (None: fused score 0)
    message: int | None  # the prompt message that holds it (0: the system message)
    prompt_start: int | None  # messages[message]["content"][prompt_start:prompt_end] == excerpt
    prompt_end: int | None
    token_start: int | None  # the prompt tokens that cover the excerpt, [token_start, token_end)
    token_end: int | None


@dataclass
class RagView(Plain):
    """What retrieval hands the model for one question, and (given a model) what the model answers."""

    question: str
    method: str  # the search that picked the chunks (bm25, dense or hybrid)
    chunks: list[RetrievedChunk]  # the chunks in the prompt, in its order
    top: dict[str, list[int]]  # rows of the k best by each method, to compare the methods
    messages: list[dict[str, str]]  # the prompt (lmforge.rag.ask.build_messages)
    relevant: bool  # some chunk is at least min_score close in meaning: `lmforge rag ask` asks the model
    best_dense: float  # the closest chunk's cosine similarity (what ``relevant`` compares with min_score)
    prompt_ids: list[int] | None = None  # the prompt in the model's chat format (given a tokenizer)
    answer: str | None = None  # given ``generate``: the answer as `lmforge rag ask` gives it
    cited: list[int] = field(default_factory=list)  # source numbers the answer cites


def _retriever(source: Any):
    from lmforge.rag.retrieve import Retriever
    from lmforge.rag.store import KnowledgeBase

    if isinstance(source, Retriever):
        return source
    if isinstance(source, (str, Path)):
        source = KnowledgeBase(source)
    if isinstance(source, KnowledgeBase):
        return Retriever(source)
    raise InputError(f"rag_view reads a knowledge base (a path, KnowledgeBase or Retriever), got "
                     f"{type(source).__name__}")


def _ranks(scores: np.ndarray, positive: bool) -> dict[int, int]:
    """Row -> 1-based rank by score, ties by row (the retriever's order); ``positive``: only scores > 0."""
    rows = np.arange(len(scores))
    order = np.lexsort((rows, -scores))
    if positive:
        order = order[scores[order] > 0]
    return {int(row): rank for rank, row in enumerate(order, 1)}


def _locate(messages: list[dict[str, str]], number: int, title: str, excerpt: str,
            cursor: dict[int, int]) -> tuple[int, int, int] | tuple[None, None, None]:
    """(message, start, end) of source ``number``'s excerpt in the prompt, searched after the previous
    source (``cursor``: message -> where the last one ended)."""
    for index, message in enumerate(messages):
        content = message["content"]
        label = f"[{number}] {title}\n"
        at = content.find(label + excerpt, cursor.get(index, 0))
        start = at + len(label) if at >= 0 else content.find(excerpt, cursor.get(index, 0))
        if start >= 0 and excerpt:
            cursor[index] = start + len(excerpt)
            return index, start, start + len(excerpt)
    return None, None, None


def _token_spans(tokenizer: Any, messages: list[dict[str, str]], ids: list[int], vocab_size: int | None,
                 spans: list[tuple]) -> list[tuple[int | None, int | None]]:
    """The prompt tokens that cover each (message, start, end) character span: each message's content found
    in the tokens' bytes, the span's bytes within it, and the tokens that overlap them."""
    vocab = token_bytes(tokenizer, vocab_size)
    pieces = [vocab[i] if i < len(vocab) and vocab[i] is not None else b"" for i in ids]
    ends = np.cumsum([len(p) for p in pieces])
    starts = ends - np.array([len(p) for p in pieces])
    stream = b"".join(pieces)
    offsets, cursor = {}, 0
    for index, message in enumerate(messages):  # messages appear in order in the rendering
        found = stream.find(message["content"].encode("utf-8"), cursor)
        if found >= 0:
            offsets[index] = found
            cursor = found + len(message["content"].encode("utf-8"))
    out = []
    for message, start, end in spans:
        if message is None or message not in offsets:
            out.append((None, None))
            continue
        content = messages[message]["content"]
        low = offsets[message] + len(content[:start].encode("utf-8"))
        high = offsets[message] + len(content[:end].encode("utf-8"))
        covering = np.flatnonzero((ends > low) & (starts < high) & (ends > starts))
        out.append((int(covering[0]), int(covering[-1]) + 1) if len(covering) else (None, None))
    return out


def rag_view(knowledge_base_or_retriever: Any, question: str, k: int = 4, generate: Any = None,
             method: str = "hybrid", tokenizer: Any = None, min_score: float = 0.3, max_chars: int = 1500,
             max_new_tokens: int = 256) -> RagView:
    """Retrieve for ``question`` as ``lmforge rag ask`` does and show it: the ``k`` chunks ``method`` picks,
    each with its BM25, dense and fused score and rank (every method's, whichever picked it), and the prompt
    built from them (:func:`~lmforge.rag.ask.build_messages`) with each chunk's place in it: characters of
    its message and, given a ``tokenizer``, the tokens of the prompt in the model's chat format.

    ``knowledge_base_or_retriever``: a knowledge base folder, :class:`~lmforge.rag.KnowledgeBase` or
    :class:`~lmforge.rag.Retriever` (its encoder embeds the question). ``generate``: a LanguageModel, or
    ``generate(messages, max_new_tokens) -> str`` as :func:`~lmforge.rag.ask.ask` takes; given, the view holds
    the answer ``ask`` gives (the model is not asked when nothing is ``min_score`` close)."""
    from lmforge.rag.ask import ask, build_messages, local_generator, relevant
    from lmforge.tokenizer.chat import render_chat

    if not isinstance(question, str) or not question.strip():
        raise InputError("the question is empty")
    retriever = _retriever(knowledge_base_or_retriever)
    hits = retriever.search(question, k=k, method=method)  # checks k and method
    everything = len(retriever.kb)
    bm25, dense = retriever.bm25_scores(question), retriever.dense_scores(question)
    fused_hits = retriever.search(question, k=everything, method="hybrid")
    fused = {hit.chunk.row: hit for hit in fused_hits}
    bm25_rank, dense_rank = _ranks(bm25, positive=True), _ranks(dense, positive=False)
    top = {"bm25": [h.chunk.row for h in retriever.search(question, k=k, method="bm25")],
           "dense": [h.chunk.row for h in retriever.search(question, k=k, method="dense")],
           "hybrid": [h.chunk.row for h in fused_hits[:k]]}
    messages = build_messages(question, hits, max_chars)
    cursor: dict[int, int] = {}
    spans = [_locate(messages, number, hit.chunk.title, hit.chunk.text[:max_chars], cursor)
             for number, hit in enumerate(hits, 1)]
    if hasattr(generate, "chat") and hasattr(generate, "tokenizer"):  # a LanguageModel
        tokenizer = tokenizer if tokenizer is not None else generate.tokenizer
        vocab_size = generate.model.config.vocab_size
        generate = local_generator(generate)
    else:
        vocab_size = None
    prompt_ids, token_spans = None, [(None, None)] * len(hits)
    if tokenizer is not None:
        prompt_ids = render_chat(tokenizer, messages, add_generation_prompt=True).ids
        token_spans = _token_spans(tokenizer, messages, prompt_ids, vocab_size, spans)
    chunks = []
    for number, (hit, place, tokens) in enumerate(zip(hits, spans, token_spans), 1):
        chunk, row = hit.chunk, hit.chunk.row
        in_fused = fused.get(row)
        chunks.append(RetrievedChunk(
            number, row, chunk.id, chunk.source, chunk.title, chunk.text[:max_chars], chunk.start, chunk.end,
            float(bm25[row]), float(dense[row]), in_fused.score if in_fused else 0.0, bm25_rank.get(row),
            dense_rank[row], in_fused.rank if in_fused else None, *place, *tokens))
    nearest = retriever.dense_top(question, 1)[1]
    best = float(nearest[0]) if len(nearest) else math.nan
    view = RagView(question, method, chunks, top, messages, relevant(retriever, question, min_score), best,
                   prompt_ids)
    if generate is not None:
        answer = ask(retriever, question, generate, k, method, min_score, max_new_tokens)
        view.answer, view.cited = answer.text, answer.cited
    return view
