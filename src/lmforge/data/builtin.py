"""The built-in corpus: text every Python installation carries, read at run time.

- ``stdlib``: the standard library's ``.py`` sources, one document per file, in
  sorted path order, named ``stdlib:json/decoder.py``.
- ``reference``: the language reference bundled for ``help()``
  (``pydoc_data.topics.topics``), one document per topic, named
  ``pydoc_data.topics:assert``.

What is left out of ``stdlib`` and why:

- ``site-packages``: third-party code, differs per machine.
- test suites (``test/``, ``tests/``, ``idle_test/``): more than half of the
  bytes (19 of 31 MB in CPython 3.11), much of it fixtures, generated data and
  deliberately broken files (bad encodings, syntax errors); the library code is
  the better teacher.
- ``pydoc_data/``: it is the ``reference`` part, as text rather than a Python dict.
- ``config-*/`` and ``_sysconfigdata_*``: build configuration of this machine.

Files that do not decode (none in CPython's own library) are skipped.
:func:`stdlib_docstrings` offers the docstrings with qualified names, for
retrieval; they are already inside the ``stdlib`` sources for pretraining.
"""

from __future__ import annotations

import ast
import os
import sysconfig
import tokenize
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lmforge.data.sources import Document

BUILTIN_PARTS = ("all", "stdlib", "reference")
_SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "pydoc_data"}


@dataclass(frozen=True, slots=True)
class Docstring:
    """A docstring with the qualified name of what it documents (``json.decoder.JSONDecoder.decode``)."""

    name: str
    text: str
    source: str  # stdlib:PATH:LINE of the documented definition


def stdlib_root() -> Path:
    """The running interpreter's standard library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_source_paths() -> list[Path]:
    """The standard library's ``.py`` files that the corpus uses, sorted (see the module docstring)."""
    root = stdlib_root()
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIPPED_DIRS and not d.startswith((".", "config-"))]
        found.extend(
            Path(folder, name)
            for name in names
            if name.endswith(".py") and not name.startswith("_sysconfigdata")
        )
    return sorted(found, key=lambda path: path.relative_to(root).as_posix())


def _read_source(path: Path) -> str | None:
    """A Python file's text, honouring its ``# coding:`` line; None if it does not decode."""
    try:
        with tokenize.open(path) as handle:
            return handle.read()
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None


def iter_stdlib_sources() -> Iterator[Document]:
    """One document per standard library source file, named ``stdlib:RELATIVE/PATH.py``."""
    root = stdlib_root()
    for path in stdlib_source_paths():
        text = _read_source(path)
        if text is not None:
            yield Document(text, f"stdlib:{path.relative_to(root).as_posix()}")


def iter_language_reference() -> Iterator[Document]:
    """One document per ``help()`` topic of the language reference, sorted by topic name."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data; the stdlib part still works
        return
    for name in sorted(topics):
        yield Document(topics[name], f"pydoc_data.topics:{name}")


def iter_builtin(part: str = "all") -> Iterator[Document]:
    """The built-in corpus: ``all`` (sources, then reference), ``stdlib`` or ``reference``."""
    if part not in BUILTIN_PARTS:
        raise ValueError(f"part must be one of {BUILTIN_PARTS}, got {part!r}")
    if part in ("all", "stdlib"):
        yield from iter_stdlib_sources()
    if part in ("all", "reference"):
        yield from iter_language_reference()


def _module_name(relative: str) -> str:
    """``json/decoder.py`` -> ``json.decoder``; ``json/__init__.py`` -> ``json``."""
    name = relative.removesuffix(".py").replace("/", ".")
    return name.removesuffix(".__init__")


def _docstrings_of(node: ast.AST, prefix: str, path: str) -> Iterator[Docstring]:
    """Docstrings of the classes and functions directly in ``node``'s body, and of class members."""
    for child in getattr(node, "body", []):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            name = f"{prefix}.{child.name}"
            text = ast.get_docstring(child)
            if text:
                yield Docstring(name, text, f"stdlib:{path}:{child.lineno}")
            # Functions nested in functions are implementation details; methods are API.
            if isinstance(child, ast.ClassDef):
                yield from _docstrings_of(child, name, path)


def stdlib_docstrings() -> Iterator[Docstring]:
    """Every module, class, method and function docstring of the stdlib sources, in file order.

    Files that do not parse with this interpreter's grammar are skipped.
    """
    root = stdlib_root()
    for path in stdlib_source_paths():
        text = _read_source(path)
        relative = path.relative_to(root).as_posix()
        try:
            tree = ast.parse(text or "", filename=relative)
        except (SyntaxError, ValueError):
            continue
        module = _module_name(relative)
        module_doc = ast.get_docstring(tree)
        if module_doc:
            yield Docstring(module, module_doc, f"stdlib:{relative}:1")
        yield from _docstrings_of(tree, module, relative)
