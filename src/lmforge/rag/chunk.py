"""Cutting documents into knowledge pieces (chunks) that follow their structure.

A chunk is a contiguous span of its document: ``document.text[start:end] == chunk.text``,
so a chunk can always be shown in place. The cut follows the document's own units:

1. **Sections.** In Markdown (and HTML, read as Markdown) a heading starts a section;
   chunks never cross a section, and carry the heading path as their title
   (``Guide > Install > On Linux``). In source code each top-level definition (a line at
   column 0 after a blank line: ``def``, ``class``, a function in C or Go) starts one,
   titled by its first line. Plain text is one section titled by the file.
2. **Blocks** inside a section: paragraphs (split at blank lines) and fenced code blocks
   (kept whole where they fit).
3. A block longer than the token budget is cut into **sentences** (after ``. ! ?`` and
   after Chinese ``。！？；``, which need no space), and a sentence still too long into
   pieces of the budget's length.

Blocks are then packed into chunks of at most ``max_tokens`` tokens (counted with the
encoder's tokenizer), and each chunk after the first of a section begins with the last
blocks of the one before, up to ``overlap`` tokens, so a fact cut at a boundary is
whole in one of the two.

A chunk's id is a hash of its source and text (and of how many equal texts came before
it in that source): a chunk whose text did not change keeps its id when the file around
it changes, which is what lets an index update re-embed only what changed.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass

from lmforge.rag.documents import SourceDocument

_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$")
_FENCE = re.compile(r"^(```|~~~)")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)|(?<=[。！？；])")
_DEFINITION = re.compile(r"^\S")  # a line at column 0 (after a blank line) starts a definition in code


@dataclass(frozen=True)
class Chunk:
    id: str
    source: str
    title: str
    start: int
    end: int
    text: str
    tokens: int


@dataclass
class _Unit:
    start: int
    end: int
    tokens: int


def chunk_document(document: SourceDocument, count_tokens: Callable[[str], int], max_tokens: int = 256,
                   overlap: int = 32) -> list[Chunk]:
    """The chunks of ``document``, in order (see the module docstring)."""
    if max_tokens < 8:
        raise ValueError(f"max_tokens must be at least 8, got {max_tokens}")
    if not 0 <= overlap < max_tokens:
        raise ValueError(f"overlap must be in [0, max_tokens), got {overlap}")
    text, chunks, seen = document.text, [], {}
    for title, start, end in _sections(document):
        units = []
        for block_start, block_end in _blocks(text, start, end, document.kind):
            units += _fit(text, block_start, block_end, count_tokens, max_tokens)
        for first, last in _pack(units, max_tokens, overlap):
            span = text[units[first].start:units[last].end]
            key = f"{document.source}\0{span}"
            seen[key] = seen.get(key, -1) + 1
            digest = hashlib.sha256(f"{key}\0{seen[key]}".encode()).hexdigest()[:20]
            chunks.append(Chunk(digest, document.source, title, units[first].start, units[last].end, span,
                                count_tokens(span)))
    return chunks


def _sections(document: SourceDocument) -> list[tuple[str, int, int]]:
    """(title, start, end) of each section of the document."""
    text, base = document.text, document.title or document.source
    starts: list[tuple[int, str]] = [(0, base)]
    offset, path, fenced, previous_blank = 0, [], False, True
    for line in text.splitlines(keepends=True):
        stripped = line.rstrip("\n")
        if document.kind == "markdown":
            if _FENCE.match(stripped):
                fenced = not fenced
            heading = None if fenced else _HEADING.match(stripped)
            if heading:
                level = len(heading.group(1))
                path = path[:level - 1] + [""] * max(0, level - 1 - len(path)) + [heading.group(2).strip()]
                starts.append((offset, " > ".join([base, *filter(None, path)])))
        elif document.kind == "code" and previous_blank and _DEFINITION.match(stripped) and offset > 0:
            starts.append((offset, f"{base} > {stripped.strip()[:80]}"))
        previous_blank = not stripped.strip()
        offset += len(line)
    sections = []
    for (start, title), (end, _) in zip(starts, starts[1:] + [(len(text), "")]):
        if text[start:end].strip():
            sections.append((title, start, end))
    return sections


def _blocks(text: str, start: int, end: int, kind: str) -> list[tuple[int, int]]:
    """Paragraphs and fenced code blocks of text[start:end] as (start, end) spans, blank lines left out."""
    blocks, offset, block_start, fenced = [], start, None, False
    for line in text[start:end].splitlines(keepends=True):
        stripped = line.strip()
        if kind == "markdown" and _FENCE.match(stripped):
            fenced = not fenced
        if not stripped and not fenced:
            if block_start is not None:
                blocks.append((block_start, offset))
                block_start = None
        elif block_start is None:
            block_start = offset
        offset += len(line)
    if block_start is not None:
        blocks.append((block_start, offset))
    return [(a, a + len(text[a:b].rstrip())) for a, b in blocks]


def _fit(text: str, start: int, end: int, count_tokens: Callable[[str], int], max_tokens: int) -> list[_Unit]:
    """text[start:end] as units of at most ``max_tokens`` tokens: whole, else by sentences, else by length."""
    tokens = count_tokens(text[start:end])
    if tokens <= max_tokens:
        return [_Unit(start, end, tokens)]
    cuts = [m.end() for m in _SENTENCE_END.finditer(text, start, end) if start < m.end() < end]
    if cuts:
        units, previous = [], start
        for cut in [*cuts, end]:
            piece_end = previous + len(text[previous:cut].rstrip())
            if piece_end > previous:
                units += _fit(text, previous, piece_end, count_tokens, max_tokens)
            previous = cut
        return units
    # one sentence longer than the budget: pieces of about the budget's length, cut at a space where one is near
    length = max(1, (end - start) * max_tokens // tokens)
    units, position = [], start
    while position < end:
        stop = min(end, position + length)
        space = text.rfind(" ", position + length // 2, stop) if stop < end else -1
        stop = space + 1 if space > 0 else stop
        units.append(_Unit(position, stop, count_tokens(text[position:stop])))
        position = stop
    return units


def _pack(units: list[_Unit], max_tokens: int, overlap: int) -> list[tuple[int, int]]:
    """(first, last) unit indices of each chunk: as many units as fit, the next chunk starting with the
    previous one's last units up to ``overlap`` tokens."""
    spans, first = [], 0
    while first < len(units):
        last, total = first, units[first].tokens
        while last + 1 < len(units) and total + units[last + 1].tokens <= max_tokens:
            last += 1
            total += units[last].tokens
        spans.append((first, last))
        if last + 1 >= len(units):
            break
        nxt, carried, room = last + 1, 0, max_tokens - units[last + 1].tokens  # the carried units leave room for a new one
        while nxt - 1 > first and carried + units[nxt - 1].tokens <= min(overlap, room):
            nxt -= 1
            carried += units[nxt].tokens
        first = nxt
    return spans
