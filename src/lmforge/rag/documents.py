"""Files in, documents out: the readers of ``lmforge rag index``.

One reader per kind of file, each giving (text, source, kind) documents:

- text (``.txt``, ``.rst``) and Markdown (``.md``): the file's text;
- HTML (``.html``, ``.htm``): the visible text, headings turned into Markdown headings
  (``# Title``) so the chunker sees the structure, scripts and styles dropped;
- PDF: the text of each page (pypdf), pages separated by a blank line; an encrypted
  PDF is an error, not an empty document;
- source code (``.py``, ``.js``, ``.ts``, ``.c``, ``.h``, ``.cpp``, ``.java``, ``.go``, ``.rs``,
  ``.sh``): the file's text, chunked at top-level definitions;
- JSONL: one document per line, its ``text`` field (and ``title`` when given), source
  ``path:line``.

Every text goes through the corpus cleaning of ``lmforge data prepare``
(:func:`lmforge.data.clean.clean_text`: newlines, control characters, Unicode NFC). A folder
is read recursively (hidden entries skipped, unknown extensions ignored); a file named
directly must be of a known kind. Problems name the file (InputError, exit 2).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from lmforge.data.clean import clean_text
from lmforge.data.jsonl import iter_records
from lmforge.errors import InputError

TEXT = (".txt", ".rst", ".text")
MARKDOWN = (".md", ".markdown")
HTML = (".html", ".htm")
CODE = (".py", ".js", ".ts", ".c", ".h", ".cpp", ".hpp", ".java", ".go", ".rs", ".sh")
KINDS = {**dict.fromkeys(TEXT, "text"), **dict.fromkeys(MARKDOWN, "markdown"), **dict.fromkeys(HTML, "markdown"),
         ".pdf": "text", **dict.fromkeys(CODE, "code"), ".jsonl": "text"}


@dataclass(frozen=True)
class SourceDocument:
    """One document to chunk: its cleaned text, where it came from, how to cut it, and a title."""

    text: str
    source: str
    kind: str  # "text", "markdown" or "code": which structure the chunker follows
    title: str = ""


def files_under(paths: list[str | Path]) -> list[Path]:
    """The files ``paths`` name (folders read recursively, known extensions only), sorted, unique."""
    found: set[Path] = set()
    for spec in paths:
        path = Path(spec).expanduser()
        if path.is_file():
            if path.suffix.lower() not in KINDS:
                raise InputError(f"{path}: unsupported file type {path.suffix or '(none)'!r}; "
                                 f"supported: {', '.join(sorted(KINDS))}")
            found.add(path)
        elif path.is_dir():
            inside = []
            for root, dirs, names in os.walk(path):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                inside += [Path(root, n) for n in names if not n.startswith(".") and Path(n).suffix.lower() in KINDS]
            if not inside:
                raise InputError(f"{path}: no files to index in this folder (supported: {', '.join(sorted(KINDS))})")
            found.update(inside)
        else:
            raise InputError(f"{spec}: no such file or folder")
    return sorted(found)


def file_hash(path: Path) -> str:
    """SHA-256 of a file's bytes: what tells a changed file from an unchanged one."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_documents(path: Path) -> list[SourceDocument]:
    """The documents of one file (several for JSONL), cleaned; InputError naming the file on a problem."""
    suffix = path.suffix.lower()
    kind = KINDS.get(suffix)
    if kind is None:
        raise InputError(f"{path}: unsupported file type {suffix!r}")
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".pdf":
        text = _read_pdf(path)
    else:
        text = _read_utf8(path)
        if suffix in HTML:
            text = html_to_text(text)
    text = clean_text(text)
    return [SourceDocument(text, str(path), kind, path.name)] if text.strip() else []


def _read_utf8(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise InputError(f"{path}: cannot read: {err.strerror or err}") from err
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise InputError(f"{path}:{line}: invalid UTF-8 at byte {err.start}") from err


def _read_jsonl(path: Path) -> list[SourceDocument]:
    documents = []
    for record, where in iter_records(path):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise InputError(f"{where}: each line needs a string field 'text'")
        title = record.get("title")
        text = clean_text(record["text"])
        if text.strip():
            documents.append(SourceDocument(text, where, "text", title if isinstance(title, str) else path.name))
    return documents


def _read_pdf(path: Path) -> str:
    from pypdf import PdfReader

    try:
        reader = PdfReader(path)
        if reader.is_encrypted:
            raise InputError(f"{path}: the PDF is encrypted; decrypt it first (lmforge does not guess passwords)")
        return "\n\n".join((page.extract_text() or "").strip() for page in reader.pages)
    except (InputError, MemoryError):
        raise
    except Exception as err:  # pypdf meets damage as its own errors and as Python's (TypeError, KeyError, ...)
        raise InputError(f"{path}: cannot read the PDF: {type(err).__name__}: {err}") from err


class _HTMLText(HTMLParser):
    """Visible text of an HTML page; <h1>..<h6> become Markdown headings, blocks become paragraphs."""

    BLOCKS = {"p", "div", "section", "article", "li", "tr", "br", "pre", "table", "ul", "ol", "blockquote"}
    HIDDEN = {"script", "style", "head", "noscript", "template"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.hidden = 0

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag in self.HIDDEN:
            self.hidden += 1
        elif tag in {"h1", "h2", "h3", "h4", "h5", "h6"}:
            self.parts.append("\n\n" + "#" * int(tag[1]) + " ")
        elif tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.HIDDEN:
            self.hidden = max(0, self.hidden - 1)
        elif tag in self.BLOCKS or tag.startswith("h") and tag[1:].isdigit():
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if not self.hidden:
            self.parts.append(" ".join(data.split()) if data.strip() else "")


def html_to_text(html: str) -> str:
    parser = _HTMLText()
    parser.feed(html)
    parser.close()
    paragraphs = [" ".join(p.split()) for p in "".join(parser.parts).split("\n\n")]
    return "\n\n".join(p for p in paragraphs if p)
