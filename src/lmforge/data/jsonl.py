"""Reading JSONL files record by record, every problem named by ``path:line``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from lmforge.errors import InputError


def finished_length(data: bytes) -> int:
    """How many bytes of an appended JSONL log are whole lines: a last line without its newline was cut
    short by a kill mid-write (every line its writer finishes ends with one)."""
    return len(data) if not data or data.endswith(b"\n") else data.rfind(b"\n") + 1


def iter_records(path: str | Path, finished_only: bool = False) -> Iterator[tuple[object, str]]:
    """(record, "path:line") for each non-blank line of a JSONL file (with ``finished_only``, a log: a last
    line cut short is left out, :func:`finished_length`); InputError for an unreadable file, invalid UTF-8
    or invalid JSON, naming the line."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise InputError(f"{path}: cannot read: {err.strerror or err}") from err
    if finished_only:
        data = data[:finished_length(data)]
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
