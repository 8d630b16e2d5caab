"""``lmforge rag ask``: an answer from the knowledge base, citing the chunks it used.

1. Retrieve the ``k`` best chunks for the question (hybrid by default).
2. If none is relevant enough (no chunk's cosine similarity to the question reaches
   ``min_score``, 0.3 by default: unrelated texts score about 0 to 0.2 with
   all-MiniLM-L6-v2), say so and stop: the model is not asked, so it cannot guess.
3. Otherwise ask the model in its chat format, the chunks numbered in the system message:
   answer from these sources only, cite them as [1], [2], and say when they do not hold
   the answer.
4. Return the answer, the sources as shown to the model, and which of them it cited.

The model is anything ``lmforge.load`` loads (a local checkpoint, a HF directory, a
GGUF file, ``smollm2-135m-instruct``); with ``base_url`` it is any OpenAI-compatible
server (``lmforge serve``, llama.cpp, vLLM) through its chat completions route.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from lmforge.rag.retrieve import Hit, Retriever

NOT_FOUND = "I could not find this in the knowledge base."
INSTRUCTIONS = ("Answer the question using only the numbered sources below. Cite the sources you use with their "
                "numbers in square brackets, like [1] or [2]. If the sources do not contain the answer, say that "
                "you do not know.")
_CITATION = re.compile(r"\[(\d+)\]")


@dataclass
class Answer:
    question: str
    text: str
    sources: list[Hit] = field(default_factory=list)  # as numbered in the prompt: sources[0] is [1]
    found: bool = True  # False: nothing relevant was retrieved, and the model was not asked
    cited: list[int] = field(default_factory=list)  # source numbers the answer cites (1-based, valid ones)


def build_messages(question: str, sources: list[Hit], max_chars: int = 1500) -> list[dict[str, str]]:
    """The chat messages that ask ``question`` over numbered ``sources``."""
    numbered = "\n\n".join(f"[{i}] {hit.chunk.title}\n{hit.chunk.text[:max_chars]}" for i, hit in enumerate(sources, 1))
    return [{"role": "system", "content": f"{INSTRUCTIONS}\n\nSources:\n\n{numbered}"},
            {"role": "user", "content": question}]


def relevant(retriever: Retriever, question: str, min_score: float) -> bool:
    """Whether anything in the knowledge base bears on ``question``: some chunk at least ``min_score``
    close to it in meaning (cosine similarity of the encoder's vectors). Shared words alone do not
    count: every text shares "the" with every question."""
    _, scores = retriever.dense_top(question, 1)
    return len(scores) > 0 and float(scores[0]) >= min_score


def ask(retriever: Retriever, question: str, generate, k: int = 4, method: str = "hybrid",
        min_score: float = 0.3, max_new_tokens: int = 256, rerank: bool = False) -> Answer:
    """Answer ``question`` from the knowledge base. ``generate(messages, max_new_tokens) -> str`` is the
    model (:func:`local_generator` or :func:`endpoint_generator`)."""
    return ask_many(retriever, [question], generate, k, method, min_score, max_new_tokens, rerank)[0]


def ask_many(retriever: Retriever, questions: list[str], generate, k: int = 4, method: str = "hybrid",
             min_score: float = 0.3, max_new_tokens: int = 256, rerank: bool = False) -> list[Answer]:
    """:func:`ask` for many questions: each retrieves on its own, then the model answers all that found
    sources together (``generate.batch`` when it has one: a batch on the engine, or concurrent requests)."""
    if not all(q.strip() for q in questions):
        raise ValueError("the question is empty")
    found = [retriever.search(q, k=k, method=method, rerank=rerank) if relevant(retriever, q, min_score) else []
             for q in questions]  # relevance is checked before any search or reranking
    asked = [(q, hits) for q, hits in zip(questions, found) if hits]
    conversations = [build_messages(q, hits) for q, hits in asked]
    batch = getattr(generate, "batch", None)
    texts = iter(batch(conversations, max_new_tokens) if batch else
                 [generate(messages, max_new_tokens) for messages in conversations])
    answers = []
    for question, hits in zip(questions, found):
        if not hits:  # nothing close enough, or no chunk shares a word (bm25): the model is not asked
            answers.append(Answer(question, NOT_FOUND, [], found=False))
            continue
        text = next(texts).strip()
        cited = sorted({int(n) for n in _CITATION.findall(text) if 1 <= int(n) <= len(hits)})
        answers.append(Answer(question, text, hits, True, cited))
    return answers


def local_generator(lm, max_batch_size: int = 8):
    """``generate`` for :func:`ask` from a loaded :class:`lmforge.api.LanguageModel` (greedy); its
    ``batch`` answers many conversations together on the batched engine."""
    def generate(messages: list[dict[str, str]], max_new_tokens: int) -> str:
        return lm.chat(messages, temperature=0.0, max_new_tokens=max_new_tokens)

    def batch(conversations: list[list[dict[str, str]]], max_new_tokens: int) -> list[str]:
        completions = lm.generate_batch([{"messages": m} for m in conversations], max_batch_size=max_batch_size,
                                        temperature=0.0, max_new_tokens=max_new_tokens)
        return [c.text for c in completions]

    generate.batch = batch
    return generate


def endpoint_generator(base_url: str, model: str | None = None, api_key: str | None = None, concurrency: int = 8):
    """``generate`` for :func:`ask` from an OpenAI-compatible server's ``/v1/chat/completions`` (greedy); its
    ``batch`` sends up to ``concurrency`` requests at a time (a batching server answers them together)."""
    from concurrent.futures import ThreadPoolExecutor

    from lmforge.eval.harness import EndpointModel

    endpoint = EndpointModel(base_url, model=model, api_key=api_key, chat=True)

    def generate(messages: list[dict[str, str]], max_new_tokens: int) -> str:
        body = {"messages": messages, "temperature": 0.0, "max_tokens": max_new_tokens}
        return endpoint.post("/chat/completions", body)["choices"][0]["message"]["content"] or ""

    def batch(conversations: list[list[dict[str, str]]], max_new_tokens: int) -> list[str]:
        with ThreadPoolExecutor(concurrency) as pool:
            return list(pool.map(lambda messages: generate(messages, max_new_tokens), conversations))

    generate.batch = batch
    return generate
