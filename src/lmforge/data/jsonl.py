"""Reading JSONL files record by record, every problem named by ``path:line``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from lmforge.errors import InputError


def iter_records(path: str | Path, stop: int | None = None) -> Iterator[tuple[object, str]]:
    """(record, "path:line") for each non-blank line of a JSONL file (of its first ``stop`` bytes, when
    given); InputError for an unreadable file, invalid UTF-8 or invalid JSON, naming the line."""
    try:
        data = Path(path).read_bytes()[:stop]
    except OSError as err:
        raise InputError(f"{path}: cannot read: {err.strerror or err}") from err
    for number, raw in enumerate(data.splitlines(), start=1):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as err:
            raise InputError(f"{where}: invalid UTF-8 at byte {err.start} of the line") from err
        if not line.strip():
            continue
        try:
            yield json.loads(line), where
        except json.JSONDecodeError as err:
            raise InputError(f"{where}: invalid JSON: {err.msg} (column {err.colno})") from err
