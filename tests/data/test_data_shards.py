"""Token shards: round trip, dtype choice, streaming batches and reader errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmforge.data import shards
from lmforge.data.prepare import DataConfig, iter_prepared, prepare_data
from lmforge.data.shards import TokenShard, load_shard, token_dtype, write_shards
from lmforge.errors import InputError


class ByteTokenizer:
    """Token id = byte value (+ offset), BOS after the bytes; ``vocab_size`` picks the dtype."""

    def __init__(self, vocab_size: int = 257, offset: int = 0) -> None:
        self.vocab_size = vocab_size
        self.offset = offset
        self.bos_id = vocab_size - 1
        self.batches: list[int] = []

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        self.batches.append(len(texts))
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return bytes(int(i) - self.offset for i in ids).decode("utf-8")


def prepared(tmp_path: Path, count: int = 30, val_fraction: float = 0.2) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(count):
        (folder / f"{i:02d}.txt").write_text(f"document {i}: héllo wörld " * (i + 3), encoding="utf-8")
    out = tmp_path / "prepared"
    prepare_data([str(folder)], out, DataConfig(min_chars=10, val_fraction=val_fraction), progress=False)
    return out


def split_docs(tokens: np.ndarray, bos_id: int) -> list[np.ndarray]:
    starts = np.flatnonzero(tokens == bos_id)
    assert starts[0] == 0
    return [tokens[s + 1 : e] for s, e in zip(starts, [*starts[1:], len(tokens)])]


@pytest.mark.parametrize(
    ("vocab_size", "offset", "dtype"), [(257, 0, np.uint16), (70_000, 60_000, np.uint32)]
)
def test_round_trip_and_dtype(tmp_path, monkeypatch, vocab_size, offset, dtype):
    monkeypatch.setattr(shards, "_BATCH_DOCS", 4)  # several batches per split
    source = prepared(tmp_path)
    tokenizer = ByteTokenizer(vocab_size, offset)
    meta = write_shards(source, tokenizer, tmp_path / "shards", progress=False)
    assert meta == json.loads((tmp_path / "shards" / "meta.json").read_text())
    assert meta["dtype"] == np.dtype(dtype).name and meta["bos_id"] == vocab_size - 1
    assert len(tokenizer.batches) > 2 and max(tokenizer.batches) <= 4
    for split in ("train", "val"):
        texts = list(iter_prepared(source, split))
        tokens = load_shard(tmp_path / "shards", split)
        assert isinstance(tokens, np.memmap) and tokens.dtype == dtype
        assert [tokenizer.decode(doc) for doc in split_docs(np.asarray(tokens), tokenizer.bos_id)] == texts
        entry = meta["splits"][split]
        assert entry["num_docs"] == len(texts) > 0
        assert entry["num_bytes"] == sum(len(t.encode()) for t in texts)
        assert entry["num_tokens"] == len(tokens) == entry["num_bytes"] + len(texts)  # one id per byte + BOS
        assert (tmp_path / "shards" / f"{split}.bin").stat().st_size == len(tokens) * np.dtype(dtype).itemsize


def test_token_dtype_boundaries():
    assert token_dtype(65_536) == np.uint16
    assert token_dtype(65_537) == np.uint32
    with pytest.raises(ValueError):
        token_dtype(0)


def test_token_shard_reader(tmp_path):
    source = prepared(tmp_path)
    write_shards(source, ByteTokenizer(), tmp_path / "shards", progress=False)
    shard = TokenShard(tmp_path / "shards" / "train.bin")
    assert (shard.vocab_size, shard.bos_id, shard.dtype) == (257, 256, np.uint16)
    assert len(shard) == len(shard.tokens) and shard.tokens[0] == 256
    assert shard.num_docs == len(list(iter_prepared(source, "train")))


def test_reader_errors_are_clear(tmp_path):
    with pytest.raises(InputError, match="not a token shard folder"):
        load_shard(tmp_path, "train")
    source = prepared(tmp_path)
    out = tmp_path / "shards"
    write_shards(source, ByteTokenizer(), out, progress=False)
    with pytest.raises(InputError, match="unknown split"):
        load_shard(out, "test")
    data = (out / "train.bin").read_bytes()
    (out / "train.bin").write_bytes(data[:-2])
    with pytest.raises(InputError, match="do not match"):
        load_shard(out, "train")
    meta = json.loads((out / "meta.json").read_text())
    meta["dtype"] = "float32"
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="not a meta.json written by write_shards"):
        load_shard(out, "val")
    with pytest.raises(InputError, match="not a prepared data folder"):
        write_shards(tmp_path / "nothing", ByteTokenizer(), out, progress=False)


def test_empty_validation_split_is_an_empty_array(tmp_path):
    source = prepared(tmp_path, count=1, val_fraction=0.0)
    meta = write_shards(source, ByteTokenizer(), tmp_path / "shards", progress=False)
    assert meta["splits"]["val"] == {"num_tokens": 0, "num_docs": 0, "num_bytes": 0}
    assert load_shard(tmp_path / "shards", "val").shape == (0,)
    assert len(load_shard(tmp_path / "shards", "train")) > 0


def test_ids_outside_the_vocabulary_are_refused(tmp_path):
    source = prepared(tmp_path)
    too_small = ByteTokenizer(vocab_size=150)  # the UTF-8 bytes of "é" are 195 and 169
    with pytest.raises(ValueError, match="outside"):
        write_shards(source, too_small, tmp_path / "shards", progress=False)
    assert not (tmp_path / "shards" / "meta.json").exists()
    assert not list((tmp_path / "shards").glob(".*.tmp"))
