"""Instruction data -> conversations, from the record shapes instruction sets come in.

One record becomes one conversation (a list of {"role", "content"} messages):

- ``{"messages": [{"role": ..., "content": ...}, ...]}`` (chat format, multi-turn);
- ``{"instruction": ..., "input": ..., "output": ...}`` (Alpaca; ``input`` optional,
  appended to the instruction after a blank line);
- ``{"prompt": ..., "completion": ...}``;

each with an optional ``"system"`` string. Files are ``.jsonl`` (one record per
line) or ``.parquet`` (one per row); ``hf:NAME[:CONFIG]:SPLIT`` streams a Hugging
Face dataset. A malformed record raises :class:`InputError`
naming the file and line, or is counted and skipped (``ReadErrors(skip=True)``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from lmforge.data.sources import ReadErrors, iter_hf_records
from lmforge.errors import InputError
from lmforge.tokenizer.chat import check_messages

SHAPES = "messages; instruction/input/output; prompt/completion"


def record_to_messages(record: object, where: str) -> list[dict[str, str]]:
    """The conversation of one record, or InputError naming ``where`` and what is wrong."""
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise InputError(f"{where}: 'system' must be text")
    head = [{"role": "system", "content": system}] if system else []
    if "messages" in record:
        messages = record["messages"]
        if isinstance(messages, list):
            messages = [{"role": m.get("role"), "content": m.get("content")} if isinstance(m, dict) else m
                        for m in messages]
        messages = check_messages(messages, f"{where}: messages")
    elif "instruction" in record and "output" in record:
        instruction, extra, output = record["instruction"], record.get("input") or "", record["output"]
        if not all(isinstance(x, str) for x in (instruction, extra, output)):
            raise InputError(f"{where}: instruction, input and output must be text")
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    elif "prompt" in record and "completion" in record:
        if not isinstance(record["prompt"], str) or not isinstance(record["completion"], str):
            raise InputError(f"{where}: prompt and completion must be text")
        messages = [{"role": "user", "content": record["prompt"]},
                    {"role": "assistant", "content": record["completion"]}]
    else:
        raise InputError(f"{where}: no known fields (found {', '.join(sorted(record)) or 'none'}; "
                         f"expected one of: {SHAPES})")
    if not any(m["role"] == "assistant" for m in messages):
        raise InputError(f"{where}: the conversation has no assistant turn to learn from")
    return head + messages


def iter_chat_records(path: str | Path, errors: ReadErrors | None = None) -> Iterator[list[dict[str, str]]]:
    """Conversations of a ``.jsonl`` or ``.parquet`` file, or of a Hugging Face dataset
    (``hf:NAME[:CONFIG]:SPLIT``, streamed; needs ``datasets`` and a network), in order."""
    errors = errors or ReadErrors()
    if str(path).startswith("hf:"):
        rows = iter_hf_records(str(path))
    elif not Path(path).is_file():
        raise InputError(f"instruction data not found: {path}")
    elif Path(path).suffix == ".jsonl":
        rows = _jsonl_rows(Path(path), errors)
    elif Path(path).suffix == ".parquet":
        rows = _parquet_rows(Path(path))
    else:
        raise InputError(f"{path}: instruction data must be .jsonl, .parquet or hf:NAME[:CONFIG]:SPLIT")
    for where, record in rows:
        try:
            yield record_to_messages(record, where)
        except InputError as err:
            errors.report("invalid_record", str(err))


def _jsonl_rows(path: Path, errors: ReadErrors) -> Iterator[tuple[str, object]]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                errors.report("invalid_utf8", f"{where}: invalid UTF-8 at byte {err.start}")
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as err:
                errors.report("invalid_json", f"{where}: invalid JSON: {err.msg} (column {err.colno})")


def _parquet_rows(path: Path) -> Iterator[tuple[str, object]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several types for a damaged file (UnicodeDecodeError among them)
        raise InputError(f"{path}: cannot read Parquet: {err}") from err
    for number, row in enumerate(rows, start=1):
        yield f"{path}:row {number}", row
