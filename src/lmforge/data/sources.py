"""Input specs -> a stream of :class:`Document`.

An input spec is one of:

- a file: ``.txt`` / ``.md`` (the whole file is one document), ``.jsonl`` (one
  record per line, text in ``text_field``), ``.parquet`` (column ``text_field``);
- a folder: every file with one of those extensions under it, recursively, in
  sorted order; hidden files and folders and other extensions are ignored;
- a glob pattern (``data/**/*.jsonl``): the matching files, sorted;
- ``builtin`` (the Python standard library + language reference, see
  :mod:`lmforge.data.builtin`), ``builtin:stdlib`` or ``builtin:reference``;
- ``hf:NAME[:SPLIT]`` or ``hf:NAME:CONFIG:SPLIT``: a Hugging Face dataset,
  streamed (needs ``pip install datasets`` and a network).

Why a ``.txt``/``.md`` file is one document: cutting at blank lines would break
stories, chapters and code listings into fragments, and the model should learn
from long context. Documents longer than ``max_chars`` are split later
(:func:`lmforge.data.clean.split_into_chunks`) at paragraph boundaries.

Malformed input (invalid UTF-8, a broken JSON line, a missing or non-string
field, an unreadable file, an unknown extension) goes to :class:`ReadErrors`:
it raises :class:`InputError` naming the file and line, or, when skipping,
counts the problem by kind and goes on.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.errors import InputError

TEXT_EXTENSIONS = (".txt", ".md")
EXTENSIONS = (*TEXT_EXTENSIONS, ".jsonl", ".parquet")
_GLOB_CHARS = set("*?[")
_MAX_EXAMPLES = 10
_PARQUET_BATCH_ROWS = 1024


@dataclass(frozen=True, slots=True)
class Document:
    """One text and where it came from (``path``, ``path:line``, ``stdlib:json/decoder.py``, ...)."""

    text: str
    source: str


@dataclass
class ReadErrors:
    """What to do with malformed input: raise (``skip=False``) or count by kind and go on.

    Kinds: ``missing_file``, ``unreadable_file``, ``unknown_extension``, ``invalid_utf8``,
    ``invalid_json``, ``invalid_record``, ``missing_field``, ``non_string_field``.
    """

    skip: bool = False
    counts: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def report(self, kind: str, message: str) -> None:
        """Raise ``InputError(message)``, or record it when skipping (the caller then skips the item)."""
        if not self.skip:
            raise InputError(message)
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(message)


def iter_documents(
    spec: str, text_field: str = "text", errors: ReadErrors | None = None
) -> Iterator[Document]:
    """Yield the documents of one input spec (see the module docstring), in a fixed order.

    ``errors`` decides between raising and skipping; by default every problem raises
    :class:`InputError`. Documents are yielded as read (not cleaned, not filtered).
    """
    errors = errors if errors is not None else ReadErrors()
    if spec == "builtin" or spec.startswith("builtin:"):
        yield from _builtin(spec)
    elif spec.startswith("hf:"):
        yield from _hugging_face(spec, text_field, errors)
    else:
        for path in _resolve_paths(spec, errors):
            yield from _read_file(path, text_field, errors)


def _builtin(spec: str) -> Iterator[Document]:
    # Imported here: builtin.py imports Document from this module.
    from lmforge.data.builtin import BUILTIN_PARTS, iter_builtin

    part = spec.partition(":")[2] or "all"
    if part not in BUILTIN_PARTS:
        raise InputError(
            f"unknown built-in corpus {spec!r}; choose builtin, builtin:stdlib or builtin:reference"
        )
    yield from iter_builtin(part)


def _resolve_paths(spec: str, errors: ReadErrors) -> list[Path]:
    """The files a path, folder or glob names; a missing path is reported and yields nothing."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = _files_under(path)
        if not files:
            errors.report("missing_file", f"{spec}: no {', '.join(EXTENSIONS)} files in this folder")
        return files
    if _GLOB_CHARS & set(spec):
        matches = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
        files: list[Path] = []
        for match in map(Path, matches):
            files.extend(_files_under(match) if match.is_dir() else [match])
        if not files:
            errors.report("missing_file", f"{spec}: the pattern matches no files")
        return files
    errors.report("missing_file", f"{spec}: no such file or folder (nor builtin / hf:NAME)")
    return []


def _files_under(folder: Path) -> list[Path]:
    """Files with a known extension under ``folder``, sorted; hidden entries skipped."""
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(Path(root, n) for n in names if not n.startswith(".") and n.lower().endswith(EXTENSIONS))
    return sorted(found)


def _read_file(path: Path, text_field: str, errors: ReadErrors) -> Iterator[Document]:
    suffix = path.suffix.lower()
    if suffix in TEXT_EXTENSIONS:
        yield from _read_text(path, errors)
    elif suffix == ".jsonl":
        yield from _read_jsonl(path, text_field, errors)
    elif suffix == ".parquet":
        yield from _read_parquet(path, text_field, errors)
    else:
        errors.report(
            "unknown_extension",
            f"{path}: unsupported file type {suffix or '(none)'!r}; supported: {', '.join(EXTENSIONS)}",
        )


def _utf8_error_message(path: Path, data: bytes, err: UnicodeDecodeError, line: int, base: int = 0) -> str:
    """``path:LINE: invalid UTF-8 at byte OFFSET (0xNN)``; ``base`` = file offset of ``data``."""
    bad = data[err.start : err.start + 1].hex()
    return f"{path}:{line}: invalid UTF-8 at byte {base + err.start} (0x{bad})"


def _read_text(path: Path, errors: ReadErrors) -> Iterator[Document]:
    try:
        data = path.read_bytes()
    except OSError as err:
        errors.report("unreadable_file", f"{path}: cannot read: {err.strerror or err}")
        return
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        errors.report("invalid_utf8", _utf8_error_message(path, data, err, line))
        return
    yield Document(text, str(path))


def _read_jsonl(path: Path, text_field: str, errors: ReadErrors) -> Iterator[Document]:
    try:
        handle = path.open("rb")
    except OSError as err:
        errors.report("unreadable_file", f"{path}: cannot read: {err.strerror or err}")
        return
    with handle:
        offset = 0  # file offset of the current line, for UTF-8 error messages
        for lineno, raw in enumerate(handle, start=1):
            line_offset, offset = offset, offset + len(raw)
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                errors.report("invalid_utf8", _utf8_error_message(path, raw, err, lineno, line_offset))
                continue
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                errors.report("invalid_json", f"{where}: invalid JSON: {err.msg} (column {err.colno})")
                continue
            text = _field_text(record, text_field, where, errors)
            if text is not None:
                yield Document(text, where)


def _field_text(record: object, text_field: str, where: str, errors: ReadErrors) -> str | None:
    """``record[text_field]`` if it is a string; otherwise report and return None."""
    if not isinstance(record, dict):
        errors.report("invalid_record", f"{where}: expected a JSON object, got {type(record).__name__}")
        return None
    if text_field not in record:
        keys = ", ".join(sorted(map(str, record))[:8]) or "none"
        errors.report("missing_field", f"{where}: no field {text_field!r} (fields: {keys}); set text_field")
        return None
    value = record[text_field]
    if not isinstance(value, str):
        errors.report(
            "non_string_field", f"{where}: field {text_field!r} is {type(value).__name__}, not a string"
        )
        return None
    return value


def _read_parquet(path: Path, text_field: str, errors: ReadErrors) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (OSError, UnicodeDecodeError, pa.ArrowException) as err:  # invalid UTF-8 in a string column: UnicodeDecodeError
        errors.report("unreadable_file", f"{path}: cannot read as Parquet: {err}")
        return
    names = parquet.schema_arrow.names
    if text_field not in names:
        errors.report(
            "missing_field", f"{path}: no column {text_field!r} (columns: {', '.join(names)}); set text_field"
        )
        return
    column_type = parquet.schema_arrow.field(text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        errors.report("non_string_field", f"{path}: column {text_field!r} has type {column_type}, not string")
        return
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[text_field]):
            for value in batch.column(0).to_pylist():
                row += 1
                if value is None:
                    errors.report("non_string_field", f"{path}: row {row}: {text_field!r} is null")
                    continue
                yield Document(value, f"{path}:{row}")
    except (OSError, UnicodeDecodeError, pa.ArrowException) as err:  # invalid UTF-8 in a string column: UnicodeDecodeError
        errors.report("unreadable_file", f"{path}: row {row + 1}: cannot read Parquet data: {err}")


def _hugging_face(spec: str, text_field: str, errors: ReadErrors) -> Iterator[Document]:
    for where, record in iter_hf_records(spec):
        text = _field_text(record, text_field, where, errors)
        if text is not None:
            yield Document(text, where)


def iter_hf_records(spec: str) -> Iterator[tuple[str, object]]:
    """(``spec:row``, record) of a Hugging Face dataset named ``hf:NAME[:CONFIG]:SPLIT``, streamed."""
    parts = spec[len("hf:") :].split(":")
    if not parts[0] or len(parts) > 3:
        raise InputError(f"{spec!r}: expected hf:NAME, hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT")
    name = parts[0]
    config = parts[1] if len(parts) == 3 else None
    split = parts[-1] if len(parts) > 1 else "train"
    try:
        import datasets  # optional dependency, imported only when asked for
    except ImportError as err:
        raise InputError(f"{spec}: reading Hugging Face datasets needs `pip install datasets`") from err
    try:
        # Streaming reads records as they arrive instead of downloading the whole set first.
        dataset = datasets.load_dataset(name, config, split=split, streaming=True)
        records = iter(dataset)
    except Exception as err:  # datasets raises many types (network, hub, bad config name)
        raise InputError(_hf_failure(spec, name, split, err)) from err
    row = 0
    while True:
        try:
            record = next(records)
        except StopIteration:
            return
        except Exception as err:  # a streamed dataset can fail mid-way (network, hub)
            raise InputError(_hf_failure(spec, name, split, err)) from err
        row += 1
        yield f"{spec}:{row}", record


def _hf_failure(spec: str, name: str, split: str, err: Exception) -> str:
    return (
        f"{spec}: cannot load Hugging Face dataset {name!r} (split {split!r}); "
        f"this needs a network connection and a valid name: {type(err).__name__}: {err}"
    )
