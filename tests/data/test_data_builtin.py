"""The built-in corpus: stdlib sources and the language reference of the running interpreter."""

from __future__ import annotations

import sysconfig
from pathlib import Path
from pydoc_data.topics import topics

from lmforge.data import builtin
from lmforge.data.sources import iter_documents


def test_reference_has_one_document_per_topic():
    docs = list(iter_documents("builtin:reference"))
    assert len(docs) == len(topics)
    by_source = {d.source: d.text for d in docs}
    assert by_source["pydoc_data.topics:assert"] == topics["assert"]
    assert [d.source for d in docs] == sorted(by_source)


def test_stdlib_sources_are_real_sorted_and_skip_tests_and_site_packages():
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = builtin.stdlib_source_paths()
    relative = [p.relative_to(root).as_posix() for p in paths]
    assert relative == sorted(relative)
    assert "json/decoder.py" in relative and "asyncio/tasks.py" in relative
    parts = {part for r in relative for part in r.split("/")[:-1]}
    assert not parts & {"test", "tests", "idle_test", "site-packages", "pydoc_data", "__pycache__"}
    docs = iter_documents("builtin:stdlib")
    first = next(docs)
    assert first.source == f"stdlib:{relative[0]}"
    assert first.text == paths[0].read_text(encoding="utf-8")


def test_builtin_is_stdlib_then_reference():
    sources = [d.source for d in iter_documents("builtin")]
    assert sources[0].startswith("stdlib:") and sources[-1].startswith("pydoc_data.topics:")
    assert len(sources) == len(builtin.stdlib_source_paths()) + len(topics)


def test_docstrings_with_qualified_names(monkeypatch, tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text('"""Package doc."""\n', encoding="utf-8")
    (package / "mod.py").write_text(
        '"""Module doc."""\n\n'
        "class Box:\n"
        '    """A box."""\n\n'
        "    def open(self):\n"
        '        """Open it."""\n'
        "        def helper():\n"
        '            """Not API."""\n\n'
        "async def run():\n"
        '    """Run."""\n',
        encoding="utf-8",
    )
    (tmp_path / "broken.py").write_text("def (:\n", encoding="utf-8")
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "test_x.py").write_text('"""Skipped."""\n', encoding="utf-8")
    monkeypatch.setattr(builtin, "stdlib_root", lambda: tmp_path)
    found = {d.name: (d.text, d.source) for d in builtin.stdlib_docstrings()}
    assert found == {
        "pkg": ("Package doc.", "stdlib:pkg/__init__.py:1"),
        "pkg.mod": ("Module doc.", "stdlib:pkg/mod.py:1"),
        "pkg.mod.Box": ("A box.", "stdlib:pkg/mod.py:3"),
        "pkg.mod.Box.open": ("Open it.", "stdlib:pkg/mod.py:6"),
        "pkg.mod.run": ("Run.", "stdlib:pkg/mod.py:11"),
    }


def test_docstrings_of_a_real_stdlib_module(monkeypatch):
    root = builtin.stdlib_root()
    monkeypatch.setattr(builtin, "stdlib_source_paths", lambda: [root / "json" / "decoder.py"])
    names = {d.name: d.text for d in builtin.stdlib_docstrings()}
    assert names["json.decoder.JSONDecoder.decode"].startswith("Return the Python representation")
    assert "json.decoder" in names
