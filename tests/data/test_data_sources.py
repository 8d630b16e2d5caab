"""Input specs -> documents, and every kind of malformed input."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge.data.sources import Document, ReadErrors, iter_documents
from lmforge.errors import InputError


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def read(spec: str | Path, **kwargs) -> list[Document]:
    return list(iter_documents(str(spec), **kwargs))


def test_txt_and_md_are_one_document_per_file(tmp_path):
    (tmp_path / "a.txt").write_text("first paragraph\n\nsecond paragraph\n", encoding="utf-8")
    (tmp_path / "b.md").write_text("# Title\n\nbody\n", encoding="utf-8")
    assert read(tmp_path / "a.txt") == [
        Document("first paragraph\n\nsecond paragraph\n", str(tmp_path / "a.txt"))
    ]
    assert read(tmp_path / "b.md") == [Document("# Title\n\nbody\n", str(tmp_path / "b.md"))]


def test_jsonl_reads_the_configured_field_with_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"content": "one", "id": 1}\n\n{"content": "two"}\n', encoding="utf-8")
    docs = read(path, text_field="content")
    assert [d.text for d in docs] == ["one", "two"]
    assert [d.source for d in docs] == [f"{path}:1", f"{path}:3"]  # the blank line 2 is skipped


def test_parquet_reads_the_column_in_row_order(tmp_path):
    path = tmp_path / "d.parquet"
    texts = [f"row {i}" for i in range(2500)]  # more than one read batch
    pq.write_table(pa.table({"body": texts, "n": list(range(2500))}), path, row_group_size=700)
    docs = read(path, text_field="body")
    assert [d.text for d in docs] == texts
    assert docs[0].source == f"{path}:1" and docs[-1].source == f"{path}:2500"


def test_folder_is_recursive_sorted_and_ignores_other_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "z.txt").write_text("z", encoding="utf-8")
    (tmp_path / "sub" / "a.md").write_text("a", encoding="utf-8")
    write_jsonl(tmp_path / "sub" / "b.jsonl", [{"text": "b"}])
    (tmp_path / "image.png").write_bytes(b"\x89PNG\xff")
    (tmp_path / ".hidden" / "secret.txt").write_text("no", encoding="utf-8")
    assert [d.text for d in read(tmp_path)] == ["a", "b", "z"]


def test_glob_pattern(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "1.txt").write_text("one", encoding="utf-8")
    (tmp_path / "2.txt").write_text("two", encoding="utf-8")
    (tmp_path / "3.md").write_text("three", encoding="utf-8")
    assert [d.text for d in read(f"{tmp_path}/**/*.txt")] == ["two", "one"]  # sorted by path
    with pytest.raises(InputError, match="matches no files"):
        read(f"{tmp_path}/*.jsonl")


@pytest.mark.parametrize(
    ("name", "content", "kind", "expected"),
    [
        (
            "bad.txt",
            b"ok line\nbad \xff here\n",
            "invalid_utf8",
            r"bad\.txt:2: invalid UTF-8 at byte 12 \(0xff\)",
        ),
        (
            "bad.jsonl",
            b'{"text": "a"}\n{"text": "\xc3("}\n',
            "invalid_utf8",
            r"bad\.jsonl:2: invalid UTF-8 at byte 24",
        ),
        ("bad.jsonl", b'{"text": "a"}\n{"text": "b"\n', "invalid_json", r"bad\.jsonl:2: invalid JSON"),
        ("bad.jsonl", b'{"body": "a"}\n', "missing_field", r"bad\.jsonl:1: no field 'text' \(fields: body\)"),
        ("bad.jsonl", b'\n\n{"text": 3}\n', "non_string_field", r"bad\.jsonl:3: field 'text' is int"),
        ("bad.jsonl", b'["text"]\n', "invalid_record", r"bad\.jsonl:1: expected a JSON object"),
        ("bad.parquet", b"not parquet at all", "unreadable_file", r"bad\.parquet: cannot read as Parquet"),
        ("bad.csv", b"a,b\n", "unknown_extension", r"bad\.csv: unsupported file type '\.csv'"),
    ],
)
def test_malformed_input_raises_naming_file_and_line_or_is_counted(tmp_path, name, content, kind, expected):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError, match=expected):
        read(path)
    errors = ReadErrors(skip=True)
    docs = read(path, errors=errors)
    assert errors.counts == {kind: 1}
    assert errors.examples and str(path) in errors.examples[0]
    assert all(d.text == "a" for d in docs)  # only the good record of a partly bad file survives


def test_parquet_missing_column_null_row_and_wrong_type(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["a", None, "c"], "n": [1, 2, 3]}), path)
    with pytest.raises(InputError, match=r"t\.parquet: row 2: 'text' is null"):
        read(path)
    with pytest.raises(InputError, match=r"no column 'body' \(columns: text, n\)"):
        read(path, text_field="body")
    with pytest.raises(InputError, match=r"column 'n' has type int64"):
        read(path, text_field="n")
    errors = ReadErrors(skip=True)
    assert [d.text for d in read(path, errors=errors)] == ["a", "c"]
    assert errors.counts == {"non_string_field": 1}


def test_missing_path_and_unknown_builtin(tmp_path):
    with pytest.raises(InputError, match="nope.txt: no such file or folder"):
        read(tmp_path / "nope.txt")
    errors = ReadErrors(skip=True)
    assert read(tmp_path / "nope.txt", errors=errors) == []
    assert errors.counts == {"missing_file": 1}
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty: no .txt, .md, .jsonl, .parquet files"):
        read(tmp_path / "empty")
    with pytest.raises(InputError, match="unknown built-in corpus"):
        read("builtin:everything")


def test_hugging_face_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(InputError, match="pip install datasets"):
        read("hf:roneneldan/TinyStories")


def fake_datasets(load):
    module = types.ModuleType("datasets")
    module.load_dataset = load
    return module


def test_hugging_face_records_via_streaming(monkeypatch):
    calls = []

    def load(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return iter([{"text": "first"}, {"other": 1}, {"text": "third"}])

    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(load))
    with pytest.raises(InputError, match=r"hf:org/set:test:2: no field 'text'"):
        read("hf:org/set:test")
    errors = ReadErrors(skip=True)
    docs = read("hf:org/set:cfg:valid", errors=errors)
    assert [d.text for d in docs] == ["first", "third"]
    assert docs[1].source == "hf:org/set:cfg:valid:3"
    assert errors.counts == {"missing_field": 1}
    assert calls == [("org/set", None, "test", True), ("org/set", "cfg", "valid", True)]


def test_hugging_face_network_failure_is_an_input_error(monkeypatch):
    def load(*args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(load))
    with pytest.raises(InputError, match="needs a network connection.*no route to host"):
        read("hf:org/set")
    with pytest.raises(InputError, match="expected hf:NAME"):
        read("hf:a:b:c:d")
