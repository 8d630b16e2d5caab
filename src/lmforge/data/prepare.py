"""Inputs -> cleaned, filtered, deduplicated train/validation JSONL with a manifest.

Pipeline, streamed one document at a time (memory: one MinHash signature per
kept document, not the texts):

    read -> clean -> drop too_short / junk -> drop exact / near duplicates
         -> (stop at max_bytes) -> split into <= max_chars chunks
         -> each chunk to train or val by a hash of its text and the seed

Output folder: ``train.jsonl`` and ``val.jsonl`` (one ``{"text", "source"}``
per line) and ``manifest.json``. Each file is written to a temporary name and
renamed; the manifest is written last, so a folder with a manifest is complete.

Manifest invariants: ``documents_read == sum(dropped.values()) + documents_kept``;
``splits.train.records + splits.val.records`` is the number of chunks of the
kept documents. Malformed records skipped under ``skip_errors`` are counted in
``errors`` and are not documents.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tqdm import tqdm

from lmforge.data.clean import clean_text, drop_reason, split_into_chunks
from lmforge.data.dedup import Deduplicator
from lmforge.data.sources import Document, ReadErrors, iter_documents
from lmforge.errors import InputError
from lmforge.files import holds_output, read_json, temp_path, write_json_atomic
from lmforge.settings import field

SPLITS = ("train", "val")
MANIFEST = "manifest.json"
_FORMAT = "lmforge-prepared-text"
_MAX_EXAMPLES = 10  # near-duplicate pairs and error messages kept in the manifest


@dataclass
class DataConfig:
    """How raw inputs become training text."""

    text_field: str = field("text", "JSONL/Parquet/Hugging Face field that holds the text")
    min_chars: int = field(64, "drop documents shorter than this many characters after cleaning")
    max_chars: int = field(20_000, "split longer documents into chunks of at most this many characters")
    max_junk_ratio: float = field(0.2, "drop documents whose share of non-text characters is above this")
    dedup: bool = field(True, "drop exact and near-duplicate documents, keeping the first")
    dedup_threshold: float = field(
        0.8, "estimated Jaccard similarity at or above which documents are near duplicates"
    )
    num_perm: int = field(128, "MinHash permutations (more: finer similarity estimates, slower)")
    shingle_size: int = field(5, "words per shingle for near-duplicate detection")
    val_fraction: float = field(0.03, "share of chunks that go to the validation split")
    seed: int = field(0, "seed for MinHash and the train/validation split")
    skip_errors: bool = field(
        False, "skip malformed files and records (counted in the manifest) instead of failing"
    )
    max_bytes: int | None = field(None, "stop after keeping this many UTF-8 bytes of text (None: everything)")

    def __post_init__(self) -> None:
        checks = [
            (self.min_chars >= 0, "min_chars must be >= 0"),
            (self.max_chars > 0, "max_chars must be > 0"),
            (0.0 <= self.max_junk_ratio <= 1.0, "max_junk_ratio must be in [0, 1]"),
            (0.0 < self.dedup_threshold < 1.0, "dedup_threshold must be in (0, 1)"),
            (self.num_perm >= 1, "num_perm must be >= 1"),
            (self.shingle_size >= 1, "shingle_size must be >= 1"),
            (0.0 <= self.val_fraction < 1.0, "val_fraction must be in [0, 1)"),
            (self.max_bytes is None or self.max_bytes > 0, "max_bytes must be > 0 or None"),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise InputError(f"invalid DataConfig: {'; '.join(problems)}")


def split_of(text: str, seed: int, val_fraction: float) -> str:
    """``val`` or ``train`` for a chunk: a hash of its text and the seed, so independent of order."""
    return "val" if _unit_hash(text, seed) < val_fraction else "train"


def _unit_hash(text: str, seed: int) -> float:
    """A stable pseudo-random number in [0, 1) from ``text`` and ``seed``."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "little") / 2**64


def _temp_file(path: Path) -> tuple[IO[str], Path]:
    """A new text file at :func:`temp_path` of ``path`` (normal permissions, unlike ``mkstemp``'s 0600)."""
    temp = temp_path(path)
    return temp.open("x", encoding="utf-8"), temp


class _SplitWriter:
    """One split's temporary JSONL file and its counts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle, self.temp = _temp_file(path)
        self.records = self.bytes = self.chars = 0

    def write(self, text: str, source: str) -> None:
        self.handle.write(json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n")
        self.records += 1
        self.bytes += len(text.encode("utf-8"))
        self.chars += len(text)

    def counts(self) -> dict[str, int]:
        return {"records": self.records, "bytes": self.bytes, "chars": self.chars}


@holds_output("out_dir")
def prepare_data(
    inputs: list[str], out_dir: Path, config: DataConfig | None = None, progress: bool = True
) -> dict:
    """Read ``inputs`` (specs, see :mod:`lmforge.data.sources`), write a prepared folder, return its manifest.

    Raises :class:`InputError` on malformed input unless ``config.skip_errors``.
    Output: ``out_dir/{train,val}.jsonl`` and ``out_dir/manifest.json``.
    """
    config = config or DataConfig()
    if not inputs:
        raise InputError("no inputs given: name files, folders, globs, builtin or hf:NAME")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    writers = {split: _SplitWriter(out_dir / f"{split}.jsonl") for split in SPLITS}
    try:
        manifest = _run(inputs, config, writers, progress)
        # The old manifest goes first: until the new one lands the folder reads as incomplete.
        (out_dir / MANIFEST).unlink(missing_ok=True)
        for writer in writers.values():
            writer.handle.close()
            os.replace(writer.temp, writer.path)
    finally:
        for writer in writers.values():
            writer.handle.close()
            writer.temp.unlink(missing_ok=True)
    manifest["elapsed_seconds"] = round(time.perf_counter() - start, 2)
    write_json_atomic(out_dir / MANIFEST, manifest)
    return manifest


class _Pipeline:
    """Clean, filter, dedup, chunk and route one document at a time; keeps the counts."""

    def __init__(self, config: DataConfig, writers: dict[str, _SplitWriter]) -> None:
        self.config = config
        self.writers = writers
        self.dedup = Deduplicator(config.dedup_threshold, config.num_perm, config.shingle_size, config.seed)
        self.dropped = dict.fromkeys(("too_short", "junk", "exact_duplicate", "near_duplicate"), 0)
        self.near_examples: list[dict] = []
        self.read = self.kept = self.chunked = self.kept_bytes = 0

    def add(self, document: Document) -> bool:
        """Process one document; True if it was kept."""
        config = self.config
        self.read += 1
        text = clean_text(document.text)
        reason = drop_reason(text, config.min_chars, config.max_junk_ratio)
        if reason is None and config.dedup:
            duplicate = self.dedup.add(text, document.source)
            if duplicate is not None:
                reason = duplicate.reason
                if reason == "near_duplicate" and len(self.near_examples) < _MAX_EXAMPLES:
                    self.near_examples.append(
                        {
                            "dropped": document.source,
                            "kept": duplicate.original,
                            "similarity": round(duplicate.similarity, 3),
                        }
                    )
        if reason is not None:
            self.dropped[reason] += 1
            return False
        self.kept += 1
        self.kept_bytes += len(text.encode("utf-8"))
        chunks = split_into_chunks(text, config.max_chars)
        self.chunked += len(chunks) > 1
        for index, chunk in enumerate(chunks):
            # path:line#k names the k-th chunk of a split document.
            source = document.source if len(chunks) == 1 else f"{document.source}#{index + 1}"
            self.writers[split_of(chunk, config.seed, config.val_fraction)].write(chunk, source)
        return True

    def full(self) -> bool:
        """True once ``max_bytes`` of text has been kept."""
        return self.config.max_bytes is not None and self.kept_bytes >= self.config.max_bytes


def _run(inputs: list[str], config: DataConfig, writers: dict[str, _SplitWriter], progress: bool) -> dict:
    """The pipeline over all inputs; fills the writers and returns the manifest (without elapsed time)."""
    pipeline = _Pipeline(config, writers)
    per_input: list[dict] = []
    all_errors = ReadErrors(skip=config.skip_errors)
    bar = tqdm(desc="prepare", unit="doc", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    with bar:
        for spec in inputs:
            if pipeline.full():
                break
            errors = ReadErrors(skip=config.skip_errors)
            read_before, kept_before = pipeline.read, pipeline.kept
            for document in iter_documents(spec, config.text_field, errors):
                pipeline.add(document)
                bar.update()
                if pipeline.kept % 200 == 0:
                    bar.set_postfix(kept=pipeline.kept, MB=f"{pipeline.kept_bytes / 1e6:.1f}", refresh=False)
                if pipeline.full():
                    break
            per_input.append(
                {
                    "spec": spec,
                    "documents": pipeline.read - read_before,
                    "kept": pipeline.kept - kept_before,
                    "errors": errors.counts,
                }
            )
            for kind, count in errors.counts.items():
                all_errors.counts[kind] = all_errors.counts.get(kind, 0) + count
            all_errors.examples.extend(errors.examples[: _MAX_EXAMPLES - len(all_errors.examples)])
    warnings = _ensure_validation(writers, config) if config.val_fraction > 0 else []
    return {
        "format": _FORMAT,
        "config": dataclasses.asdict(config),
        "inputs": per_input,
        "documents_read": pipeline.read,
        "dropped": pipeline.dropped,
        "documents_kept": pipeline.kept,
        "documents_chunked": pipeline.chunked,
        "splits": {split: writer.counts() for split, writer in writers.items()},
        "errors": all_errors.counts,
        "error_examples": all_errors.examples,
        "near_duplicate_examples": pipeline.near_examples,
        "truncated_at_max_bytes": pipeline.full(),
        "warnings": warnings,
    }


def _ensure_validation(writers: dict[str, _SplitWriter], config: DataConfig) -> list[str]:
    """Move one train chunk to val if val came out empty (tiny corpora); return warnings.

    The chunk moved is the one with the smallest split hash, so the choice still does
    not depend on input order.
    """
    train, val = writers["train"], writers["val"]
    if val.records > 0:
        return []
    if train.records < 2:
        return ["the validation split is empty: too little data"]
    train.handle.close()
    lines = _read_lines(train.temp)
    pick = min(range(len(lines)), key=lambda i: _unit_hash(json.loads(lines[i])["text"], config.seed))
    train.handle, train.temp = _rewrite(train, lines[:pick] + lines[pick + 1 :])
    record = json.loads(lines[pick])
    train.records -= 1
    train.bytes -= len(record["text"].encode("utf-8"))
    train.chars -= len(record["text"])
    val.write(record["text"], record["source"])
    return [
        "the validation split came out empty; moved one chunk from train (add data or raise val_fraction)"
    ]


def _read_lines(path: Path) -> list[str]:
    # Only reached when val is empty, i.e. train has fewer than ~1/val_fraction chunks.
    with path.open(encoding="utf-8") as handle:
        return handle.readlines()


def _rewrite(writer: _SplitWriter, lines: list[str]) -> tuple[IO[str], Path]:
    handle, temp = _temp_file(writer.path)
    handle.writelines(lines)
    writer.temp.unlink()
    return handle, temp


def iter_prepared(out_dir: Path, split: str) -> Iterator[str]:
    """Yield the texts of one split (``train`` or ``val``) of a folder written by :func:`prepare_data`."""
    for text, _source in iter_prepared_records(out_dir, split):
        yield text


def iter_prepared_records(out_dir: Path, split: str) -> Iterator[tuple[str, str]]:
    """Yield ``(text, source)`` pairs of one split of a prepared folder; InputError names a bad line."""
    path = prepared_split_path(out_dir, split)
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            try:
                record = json.loads(line)
                yield record["text"], record["source"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise InputError(f"{path}:{lineno}: not a prepared record ({err})") from err


def prepared_split_path(out_dir: Path, split: str) -> Path:
    """The JSONL path of ``split`` in a prepared folder; InputError if it is not one."""
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    out_dir = Path(out_dir)
    manifest = out_dir / MANIFEST
    path = out_dir / f"{split}.jsonl"
    if not manifest.is_file() or not path.is_file():
        raise InputError(
            f"{out_dir}: not a prepared data folder (needs {MANIFEST} and {split}.jsonl); "
            "run data preparation (lmforge.data.prepare_data) on it first"
        )
    return path


def read_manifest(out_dir: Path) -> dict:
    """The manifest of a prepared folder; InputError if missing or not JSON."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise InputError(f"{out_dir}: not a prepared data folder (no {MANIFEST})")
    manifest = read_json(path)
    if manifest.get("format") != _FORMAT:
        raise InputError(f"{path}: not a manifest written by prepare_data")
    return manifest
