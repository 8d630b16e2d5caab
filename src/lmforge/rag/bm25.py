"""BM25 keyword search, with a tokenization that works for Chinese as well as English.

BM25 scores a chunk by the query words it contains, each weighted by how rare it is in
the collection (IDF) and saturated by how often it appears, normalized by the chunk's
length (k1 = 1.5, b = 0.75, Lucene's IDF). The scoring is bm25s's; the words are
lmforge's: lowercased runs of letters, digits and underscores, and, since Chinese
writes no spaces between words, every CJK character on its own and every pair of
neighbouring CJK characters (a bigram catches most two-character words without a
dictionary). 机器学习 -> 机, 器, 学, 习, 机器, 器学, 学习.
"""

from __future__ import annotations

import re

_WORD = re.compile(r"[^\W\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]+|[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]+")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")


def bm25_tokens(text: str) -> list[str]:
    """The words BM25 counts in ``text`` (see the module docstring)."""
    tokens = []
    for run in _WORD.findall(text.lower()):
        if _CJK.match(run):
            tokens += list(run) + [run[i:i + 2] for i in range(len(run) - 1)]
        else:
            tokens.append(run)
    return tokens


def build_bm25(texts: list[str]):
    """A bm25s index of ``texts`` (row i = text i)."""
    import bm25s

    index = bm25s.BM25(k1=1.5, b=0.75, method="lucene")
    index.index([bm25_tokens(t) or [""] for t in texts], show_progress=False)
    return index
