"""Prepared text -> packed token shards that training reads through a memory map.

Layout of a shard folder:

- ``train.bin``, ``val.bin``: flat arrays of token ids, native little-endian,
  ``uint16`` when ``vocab_size <= 65536`` else ``uint32``; each document is
  ``[bos_id] + tokenizer.encode(text)``, documents back to back.
- ``meta.json``: ``{format, dtype, vocab_size, bos_id, splits: {split: {num_tokens,
  num_docs, num_bytes}}}``; ``num_bytes`` counts the UTF-8 bytes of the texts,
  for bits-per-byte.

The tokenizer needs ``vocab_size``, ``bos_id`` and ``encode_batch(texts) ->
list[list[int]]``. Encoding streams in batches; ids never sit in memory as one
Python list. Files are written under temporary names and renamed; ``meta.json``
comes last.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm import tqdm

from lmforge.data.prepare import SPLITS, iter_prepared, read_manifest
from lmforge.errors import InputError
from lmforge.files import holds_output, read_json, temp_path, write_json_atomic

META = "meta.json"
_FORMAT = "lmforge-token-shards"
_BATCH_CHARS = 1_000_000  # text per encode_batch call: big enough to parallelise, small enough for RAM
_BATCH_DOCS = 1024


class ShardTokenizer(Protocol):
    """What :func:`write_shards` needs from a tokenizer."""

    vocab_size: int
    bos_id: int

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` if every id in ``[0, vocab_size)`` fits, else ``uint32``."""
    if not 0 < vocab_size <= 2**32:
        raise ValueError(f"vocab_size must be in [1, 2**32], got {vocab_size}")
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def _batches(texts: Iterator[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if chars >= _BATCH_CHARS or len(batch) >= _BATCH_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _write_split(prepared_dir: Path, split: str, tokenizer: ShardTokenizer, temp: Path, bar: tqdm) -> dict:
    """Encode one split into the new file ``temp``; return its meta entry."""
    dtype = token_dtype(tokenizer.vocab_size)
    num_tokens = num_docs = num_bytes = 0
    with temp.open("xb") as handle:
        for batch in _batches(iter_prepared(prepared_dir, split)):
            encoded = tokenizer.encode_batch(batch)
            lengths = [len(ids) + 1 for ids in encoded]
            flat = np.empty(sum(lengths), dtype=np.int64)  # (batch tokens,), checked before narrowing
            starts = np.cumsum([0, *lengths[:-1]])
            flat[starts] = tokenizer.bos_id
            for start, ids in zip(starts, encoded):
                flat[start + 1 : start + 1 + len(ids)] = ids
            if flat.size and (flat.min() < 0 or flat.max() >= tokenizer.vocab_size):
                raise ValueError(f"tokenizer produced ids outside [0, {tokenizer.vocab_size})")
            handle.write(flat.astype(dtype).tobytes())
            batch_bytes = sum(len(text.encode("utf-8")) for text in batch)
            num_tokens += flat.size
            num_docs += len(batch)
            num_bytes += batch_bytes
            bar.update(batch_bytes)
    return {"num_tokens": num_tokens, "num_docs": num_docs, "num_bytes": num_bytes}


@holds_output("out_dir")
def write_shards(prepared_dir: Path, tokenizer: ShardTokenizer, out_dir: Path, progress: bool = True) -> dict:
    """Tokenize both splits of a prepared folder into ``out_dir``; return the meta dict written to meta.json."""
    prepared_dir, out_dir = Path(prepared_dir), Path(out_dir)
    manifest = read_manifest(prepared_dir)
    total_bytes = sum(manifest["splits"][split]["bytes"] for split in SPLITS)
    dtype = token_dtype(tokenizer.vocab_size)
    if not 0 <= tokenizer.bos_id < tokenizer.vocab_size:
        raise ValueError(f"bos_id {tokenizer.bos_id} is outside the vocabulary [0, {tokenizer.vocab_size})")
    out_dir.mkdir(parents=True, exist_ok=True)
    temps = {split: temp_path(out_dir / f"{split}.bin") for split in SPLITS}
    bar = tqdm(
        desc="tokenize", total=total_bytes, unit="B", unit_scale=True, disable=not progress, file=sys.stderr
    )
    try:
        with bar:  # the new splits go to temporary files: until both are whole, the old shards stay as they were
            splits = {split: _write_split(prepared_dir, split, tokenizer, temps[split], bar) for split in SPLITS}
        (out_dir / META).unlink(missing_ok=True)  # until the new meta lands, the folder reads as incomplete
        for split in SPLITS:
            os.replace(temps[split], out_dir / f"{split}.bin")
    finally:
        for temp in temps.values():
            temp.unlink(missing_ok=True)
    meta = {
        "format": _FORMAT,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "splits": splits,
    }
    write_json_atomic(out_dir / META, meta)
    return meta


def read_meta(out_dir: Path) -> dict:
    """The meta.json of a shard folder; InputError if missing or invalid."""
    path = Path(out_dir) / META
    if not path.is_file():
        raise InputError(f"{out_dir}: not a token shard folder (no {META}); run write_shards first")
    meta = read_json(path)
    if meta.get("format") != _FORMAT or meta.get("dtype") not in ("uint16", "uint32"):
        raise InputError(f"{path}: not a meta.json written by write_shards")
    splits = meta.get("splits")
    counts = [meta.get("vocab_size"), meta.get("bos_id")] + [
        entry.get(key) if isinstance(entry, dict) else None
        for entry in (splits.values() if isinstance(splits, dict) else [None])
        for key in ("num_tokens", "num_docs", "num_bytes")]
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts) \
            or not 0 <= meta["bos_id"] < meta["vocab_size"] <= np.iinfo(meta["dtype"]).max + 1:
        raise InputError(f"{path}: vocab_size, bos_id and each split's num_tokens, num_docs and num_bytes must be "
                         f"whole numbers (bos_id below vocab_size, vocab_size within {meta['dtype']})")
    return meta


CHECK_SPAN = 1 << 24  # token ids checked against the vocabulary per step


class TokenShard:
    """A read-only view of one ``SPLIT.bin``: ``tokens`` is a (num_tokens,) memory map.

    The dtype comes from the ``meta.json`` next to the file; the file size must match it.
    """

    def __init__(self, path: Path) -> None:
        path = Path(path)
        self.path = path
        self.meta = read_meta(path.parent)
        self.split = path.stem
        self.dtype = np.dtype(self.meta["dtype"])
        self.vocab_size: int = self.meta["vocab_size"]
        self.bos_id: int = self.meta["bos_id"]
        entry = self.meta["splits"].get(self.split)
        if entry is None:
            raise InputError(f"{path}: {META} has no split {self.split!r}")
        if not path.is_file():
            raise InputError(f"{path}: missing shard file")
        size = path.stat().st_size
        expected = entry["num_tokens"] * self.dtype.itemsize
        if size != expected:
            raise InputError(
                f"{path}: {size} bytes, but {META} says {entry['num_tokens']} {self.dtype.name} tokens "
                f"({expected} bytes); the shard and its meta do not match"
            )
        self.num_docs: int = entry["num_docs"]
        self.num_bytes: int = entry["num_bytes"]
        # numpy cannot map an empty file; an empty split is an empty array.
        self.tokens = np.memmap(path, dtype=self.dtype, mode="r") if size else np.zeros(0, dtype=self.dtype)
        top = max((int(self.tokens[i:i + CHECK_SPAN].max()) for i in range(0, len(self.tokens), CHECK_SPAN)),
                  default=-1)  # one pass over the file, a span at a time (about 1 GB/s)
        if top >= self.vocab_size:
            raise InputError(f"{path}: token id {top} is past the vocabulary of {self.vocab_size} in {META}; "
                             "the shard is damaged or was written with another tokenizer")

    def __len__(self) -> int:
        return len(self.tokens)


def load_shard(out_dir: Path, split: str) -> np.ndarray:
    """The (num_tokens,) token ids of ``split`` in a shard folder, memory-mapped read-only."""
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return TokenShard(Path(out_dir) / f"{split}.bin").tokens
