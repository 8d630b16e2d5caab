"""Text normalisation, quality filters and chunking of long documents.

Contracts:

- :func:`clean_text` is idempotent: ``clean_text(clean_text(t)) == clean_text(t)``.
- A filter returns a drop reason (a short snake_case string used as a manifest
  key) or None to keep the document.
- :func:`split_into_chunks` returns pieces of at most ``max_chars`` characters
  whose concatenation is the input up to the newlines at the cut points.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterator

# C0 and C1 control characters except \t and \n (\r is handled before this runs).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_TRAILING_SPACE = re.compile(r"[^\S\n]+$", re.MULTILINE)
_MANY_BLANK_LINES = re.compile(r"\n{4,}")  # 4 newlines = 3 blank lines
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
# Unicode categories that count as text: letters, marks, numbers, punctuation, separators.
_TEXT_CATEGORIES = ("L", "M", "N", "P", "Z")

# Cut points for long documents, tried in order: after a blank line, after any line.
_CUT_POINTS = (re.compile(r"(?<=\n\n)(?=[^\n])"), re.compile(r"(?<=\n)"))


def clean_text(text: str) -> str:
    """Normalise one document.

    ``\\r\\n`` and ``\\r`` -> ``\\n``; control characters other than ``\\n``/``\\t``
    removed (with a leading byte-order mark); Unicode NFC; trailing whitespace
    stripped from every line; runs of 3+ blank lines collapsed to 2; blank lines
    at the start and end removed.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n").removeprefix("\ufeff")
    text = _CONTROL.sub("", text)
    # NFC after removing controls: a removed control can leave a composable pair behind.
    if not text.isascii() and not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    text = _TRAILING_SPACE.sub("", text)
    text = _MANY_BLANK_LINES.sub("\n\n\n", text)
    return text.strip("\n")


def junk_ratio(text: str) -> float:
    """Fraction of characters that are not letters, digits, whitespace or punctuation.

    All printable ASCII counts as text (code is mostly symbols); outside ASCII,
    symbols, private-use, unassigned characters and U+FFFD (a decoding failure)
    count as junk. Mojibake, binary data and symbol spam score high.
    """
    if not text or text.isascii():
        return 0.0
    counts = Counter(_NON_ASCII.findall(text))  # the per-char work stays in C
    junk = sum(n for ch, n in counts.items() if not unicodedata.category(ch).startswith(_TEXT_CATEGORIES))
    return junk / len(text)


def drop_reason(text: str, min_chars: int, max_junk_ratio: float) -> str | None:
    """``too_short`` or ``junk`` for a cleaned document that should be dropped; None to keep it."""
    if len(text) < min_chars:
        return "too_short"
    if junk_ratio(text) > max_junk_ratio:
        return "junk"
    return None


def split_into_chunks(text: str, max_chars: int) -> list[str]:
    """Split ``text`` into chunks of at most ``max_chars``, cutting at paragraph, then line boundaries.

    Paragraphs are packed greedily, so chunks are close to ``max_chars``; a single
    line longer than ``max_chars`` is cut hard. Newlines at cut points are dropped.
    """
    if max_chars <= 0:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    if len(text) <= max_chars:
        return [text]
    chunks: list[str] = []
    current = ""
    for piece in _pieces(text, max_chars, level=0):
        if current and len(current) + len(piece) > max_chars:
            chunks.append(current)
            current = ""
        current += piece
    chunks.append(current)
    return [stripped for chunk in chunks if (stripped := chunk.strip("\n"))]


def _pieces(text: str, max_chars: int, level: int) -> Iterator[str]:
    """Consecutive pieces of ``text``, each at most ``max_chars``, cut at the coarsest level that fits."""
    if len(text) <= max_chars:
        yield text
    elif level == len(_CUT_POINTS):
        yield from (text[start : start + max_chars] for start in range(0, len(text), max_chars))
    else:
        for part in _CUT_POINTS[level].split(text):
            yield from _pieces(part, max_chars, level + 1)
