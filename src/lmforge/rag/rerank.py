"""Reranking: the language model reads each candidate and judges whether it answers the question.

Retrieval is fast because it compares vectors or words; it never reads a chunk together
with the question. A reranker does, for the few best candidates only: here the language
model is asked, for each candidate chunk, whether the passage helps answer the question,
and the chunk's score is log P("yes") - log P("no") of its reply. Both answers of all
candidates are scored in one batch on the engine (a question's two answers are branches
of one row: the passage is read once). The candidates then come back in the order of
that score.

The judge is any model ``lmforge eval`` scores: a local model (``LocalModel``, in its chat
format) or an OpenAI-compatible server that returns prompt log-probabilities.
"""

from __future__ import annotations

from lmforge.rag.retrieve import Hit

JUDGE = ("Passage:\n{passage}\n\nQuestion: {question}\n\n"
         "Does the passage contain the answer to the question? Answer yes or no.")


def yes_no_scores(model, prompts: list[str], desc: str) -> list[float]:
    """log P(" yes") - log P(" no") as the reply to each prompt, in one batch on ``model``."""
    scored = model.loglikelihood([(prompt, answer) for prompt in prompts for answer in (" yes", " no")], desc=desc)
    return [scored[2 * i].logprob - scored[2 * i + 1].logprob for i in range(len(prompts))]


class LMReranker:
    """``model``: an evaluation model (``lmforge.eval.harness.LocalModel`` or ``EndpointModel``)."""

    def __init__(self, model, max_chars: int = 1500):
        self.model, self.max_chars = model, max_chars

    def scores(self, question: str, hits: list[Hit]) -> list[float]:
        """log P(yes) - log P(no) of each candidate."""
        prompts = [JUDGE.format(passage=hit.chunk.text[:self.max_chars], question=question) for hit in hits]
        return yes_no_scores(self.model, prompts, desc="reranking")

    def rerank(self, question: str, hits: list[Hit], k: int | None = None) -> list[Hit]:
        """``hits`` in the order of the model's judgement (the best ``k``), scores and ranks replaced."""
        scores = self.scores(question, hits)
        order = sorted(range(len(hits)), key=lambda i: (-scores[i], hits[i].rank))[:k]
        return [Hit(hits[i].chunk, scores[i], rank, hits[i].method + "+rerank") for rank, i in enumerate(order, 1)]
