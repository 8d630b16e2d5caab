"""The Python language reference as a folder of documents: a knowledge base every machine can build.

The standard library ships the reference's topics as text (``pydoc_data.topics``, what
``help("with")`` shows). :func:`write_topics` writes each as a Markdown file named after
the topic (``with.md``, ``context-managers.md``, ...), titled by the topic: the files the
built-in question set (``lmforge rag eval KB langref``) names as its sources.
"""

from __future__ import annotations

from pathlib import Path


def write_topics(folder: str | Path) -> list[Path]:
    """Write every topic to ``folder/<topic>.md``; returns the files written."""
    from lmforge.data.builtin import iter_language_reference

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for document in iter_language_reference():
        name = document.source.rpartition(":")[2]
        path = out / f"{name}.md"
        path.write_text(f"# {name}\n\n{document.text}", encoding="utf-8")
        written.append(path)
    return written
