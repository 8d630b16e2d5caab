"""Is an answer backed by the sources it cites? Claims checked one by one.

An answer from ``rag ask`` is cut into claims, its sentences (at ``. ! ?`` followed by a
space, and after ``。！？``). A claim is checked against the chunks it cites itself
(``... closes the file [2].``); a claim without a citation mark is checked against every
chunk the answer cites anywhere; an answer that cites nothing has nothing to support its
claims, so all of them fail. A sentence with fewer than two content words ("See [1].")
is not a claim.

Two judges say whether the cited text supports a claim:

- :class:`LexicalJudge` (the default, needs no model): the claim's coverage, the fraction
  of its content words (:func:`lmforge.eval.metrics.answer_tokens` without common
  function words; a CJK character is one word) that occur in the cited chunks; supported
  when coverage >= ``threshold`` (0.75). It catches names, numbers and terms that the
  sources never mention; it cannot see a claim that rearranges the sources' own words
  into something false ("__exit__ is never called" over a text that says it always is).
- :class:`ModelJudge`: a language model reads the cited chunks and the claim and is
  asked whether the passage supports it; supported when log P("yes") > log P("no"),
  the same yes/no scoring as the reranker (:mod:`lmforge.rag.rerank`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lmforge.eval.metrics import answer_tokens
from lmforge.rag.retrieve import Hit

# Words that carry no claim of their own: a claim is not supported by a source because both say "the".
FUNCTION_WORDS = frozenset("""
a an and are as at be been being but by can could did do does for from had has have how if in into is it its
may might must no not of on or so such than that the their them then there these they this those to too use
used uses using was were what when where which while who will with would you your also only one can't cannot
的 了 是 在 和 与 或 也 就 都 而 及 着 个 这 那 之 为 以 于 把 被 它 他 她 们 我 你 中
""".split())
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])")
_CITATION = re.compile(r"\[(\d+)\]")
JUDGE = ("Passage:\n{passage}\n\nClaim: {claim}\n\n"
         "Is the claim supported by the passage? Answer yes or no.")


@dataclass(frozen=True)
class Claim:
    text: str  # the sentence, citation marks removed
    cites: tuple[int, ...]  # the source numbers it is checked against (1-based)
    supported: bool
    score: float  # the judge's: coverage (lexical) or log P(yes) - log P(no) (model)


def strip_citations(text: str) -> str:
    """``text`` without its citation marks: ``"Paris [1]."`` -> ``"Paris."``."""
    return " ".join(_CITATION.sub(" ", text).split()).replace(" .", ".")


def content_words(text: str) -> list[str]:
    return [word for word in answer_tokens(text) if word not in FUNCTION_WORDS]


def split_claims(answer: str, valid: int) -> list[tuple[str, tuple[int, ...]]]:
    """(claim, the source numbers it cites) for each sentence of ``answer`` with at least two content
    words; a claim with no citation of its own gets the answer's. ``valid``: how many sources there are."""
    cited_anywhere = tuple(sorted({int(n) for n in _CITATION.findall(answer) if 1 <= int(n) <= valid}))
    claims = []
    for sentence in _SENTENCE_END.split(answer.strip()):
        text = strip_citations(sentence)
        if len(content_words(text)) < 2:
            continue
        own = tuple(sorted({int(n) for n in _CITATION.findall(sentence) if 1 <= int(n) <= valid}))
        claims.append((text, own or cited_anywhere))
    return claims


class LexicalJudge:
    """Supported when at least ``threshold`` of the claim's content words occur in the cited text."""

    def __init__(self, threshold: float = 0.75):
        self.threshold = threshold

    def scores(self, pairs: list[tuple[str, str]]) -> list[float]:
        """Coverage of each (claim, passage) pair."""
        coverage = []
        for claim, passage in pairs:
            words, seen = content_words(claim), set(answer_tokens(passage))
            coverage.append(sum(word in seen for word in words) / len(words) if words else 0.0)
        return coverage

    def supported(self, score: float) -> bool:
        return score >= self.threshold


class ModelJudge:
    """A language model asked whether the passage supports the claim. ``model``: an evaluation model
    (``lmforge.eval.harness.LocalModel`` or ``EndpointModel``)."""

    def __init__(self, model, max_chars: int = 3000):
        self.model, self.max_chars = model, max_chars

    def scores(self, pairs: list[tuple[str, str]]) -> list[float]:
        from lmforge.rag.rerank import yes_no_scores

        prompts = [JUDGE.format(passage=passage[:self.max_chars], claim=claim) for claim, passage in pairs]
        return yes_no_scores(self.model, prompts, desc="judging claims")

    def supported(self, score: float) -> bool:
        return score > 0


def check_claims(answer: str, sources: list[Hit], judge=None, cited_only: bool = True) -> list[Claim]:
    """Each claim of ``answer`` (written over the numbered ``sources``: sources[0] is [1]) with whether
    the chunks it cites support it (``judge``: :class:`LexicalJudge` by default). With ``cited_only``
    False, every claim is checked against all the sources, cited or not: whether the answer keeps to
    what it was shown, whatever it cites."""
    judge = judge or LexicalJudge()
    claims = split_claims(answer, len(sources))
    if not cited_only:
        claims = [(text, tuple(range(1, len(sources) + 1))) for text, _ in claims]
    checked = [(text, cites) for text, cites in claims if cites]
    scores = iter(judge.scores([(text, "\n\n".join(sources[n - 1].chunk.text for n in cites))
                                for text, cites in checked]))
    result = []
    for text, cites in claims:
        score = next(scores) if cites else 0.0
        result.append(Claim(text, cites, bool(cites) and judge.supported(score), score))
    return result
