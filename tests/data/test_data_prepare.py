"""prepare_data end to end on small corpora, and the built-in corpus (slow)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from pathlib import Path

import pytest

from lmforge import settings
from lmforge.data.prepare import DataConfig, iter_prepared, iter_prepared_records, prepare_data, read_manifest
from lmforge.errors import InputError

VOCAB = [f"w{i}" for i in range(5000)]


def paragraph(seed: int, words: int = 120) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(VOCAB) for _ in range(words))


def make_corpus(root: Path) -> list[str]:
    """A small corpus with one of each thing the pipeline drops; returns the input specs."""
    root.mkdir(parents=True, exist_ok=True)
    docs = [paragraph(i, words=300) for i in range(40)]
    near = docs[0].split()
    near[10], near[150], near[250] = "changed", "words", "here"  # about 0.9 Jaccard
    records = [{"text": t} for t in docs[:30]]
    records += [{"text": docs[1]}, {"text": " ".join(near)}, {"text": "too short"}, {"text": "\ufffd" * 100}]
    (root / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    (root / "b").mkdir(exist_ok=True)
    for i, text in enumerate(docs[30:]):
        (root / "b" / f"{i}.txt").write_text(text + "  \r\n", encoding="utf-8")
    return [str(root / "a.jsonl"), str(root / "b")]


def records(out: Path, split: str) -> list[tuple[str, str]]:
    return list(iter_prepared_records(out, split))


def test_prepare_counts_add_up_and_outputs_are_clean(tmp_path):
    inputs = make_corpus(tmp_path / "in")
    out = tmp_path / "out"
    manifest = prepare_data(inputs, out, DataConfig(val_fraction=0.2), progress=False)
    assert manifest == read_manifest(out)
    assert manifest["documents_read"] == 44
    assert manifest["dropped"] == {"too_short": 1, "junk": 1, "exact_duplicate": 1, "near_duplicate": 1}
    assert manifest["documents_kept"] == 40
    assert manifest["documents_read"] == sum(manifest["dropped"].values()) + manifest["documents_kept"]
    assert [(i["documents"], i["kept"]) for i in manifest["inputs"]] == [(34, 30), (10, 10)]
    assert manifest["near_duplicate_examples"][0]["dropped"].endswith("a.jsonl:32")
    assert manifest["near_duplicate_examples"][0]["kept"].endswith("a.jsonl:1")
    train, val = records(out, "train"), records(out, "val")
    assert len(train) + len(val) == 40 and len(val) > 0
    for split, rows in (("train", train), ("val", val)):
        stats = manifest["splits"][split]
        assert stats["records"] == len(rows)
        assert stats["bytes"] == sum(len(t.encode()) for t, _ in rows)
    texts = [t for t, _ in train + val]
    assert all(not t.endswith((" ", "\r", "\n")) for t in texts)
    assert list(iter_prepared(out, "train")) == [t for t, _ in train]
    assert json.loads((out / "manifest.json").read_text())["config"]["val_fraction"] == 0.2
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train.jsonl", "val.jsonl"]


def test_split_is_deterministic_and_independent_of_input_order(tmp_path):
    inputs = make_corpus(tmp_path / "in")
    config = DataConfig(val_fraction=0.3, dedup=False)
    prepare_data(inputs, tmp_path / "one", config, progress=False)
    prepare_data(inputs, tmp_path / "two", config, progress=False)
    prepare_data(inputs[::-1], tmp_path / "three", config, progress=False)
    for split in ("train", "val"):
        one = (tmp_path / "one" / f"{split}.jsonl").read_bytes()
        assert one == (tmp_path / "two" / f"{split}.jsonl").read_bytes()
        assert sorted(iter_prepared(tmp_path / "one", split)) == sorted(
            iter_prepared(tmp_path / "three", split)
        )
    other_seed = prepare_data(inputs, tmp_path / "four", dataclasses.replace(config, seed=1), progress=False)
    assert set(iter_prepared(tmp_path / "four", "val")) != set(iter_prepared(tmp_path / "one", "val"))
    assert other_seed["documents_kept"] == 42  # dedup off: the two duplicates stay


def test_long_documents_are_chunked_not_dropped(tmp_path):
    text = "\n\n".join(paragraph(i, words=50) for i in range(30))
    (tmp_path / "long.md").write_text(text, encoding="utf-8")
    manifest = prepare_data(
        [str(tmp_path / "long.md")], tmp_path / "out", DataConfig(max_chars=1000), progress=False
    )
    rows = records(tmp_path / "out", "train") + records(tmp_path / "out", "val")
    assert manifest["documents_kept"] == 1 and manifest["documents_chunked"] == 1
    assert len(rows) >= 5 and all(len(t) <= 1000 for t, _ in rows)
    rows.sort(key=lambda row: int(row[1].rpartition("#")[2]))
    assert [s for _, s in rows] == [f"{tmp_path / 'long.md'}#{i}" for i in range(1, len(rows) + 1)]
    assert "\n\n".join(t for t, _ in rows) == text  # cuts only at paragraph breaks


def test_malformed_input_fails_without_writing_or_is_counted(tmp_path):
    inputs = make_corpus(tmp_path / "in")
    with (tmp_path / "in" / "a.jsonl").open("a", encoding="utf-8") as handle:
        handle.write('{"text": broken\n{"title": "no text"}\n')
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"a\.jsonl:35: invalid JSON"):
        prepare_data(inputs, out, DataConfig(), progress=False)
    assert list(out.iterdir()) == []  # no half-written files, no leftovers
    manifest = prepare_data(inputs, out, DataConfig(skip_errors=True), progress=False)
    assert manifest["errors"] == {"invalid_json": 1, "missing_field": 1}
    assert manifest["inputs"][0]["errors"] == {"invalid_json": 1, "missing_field": 1}
    assert manifest["inputs"][1]["errors"] == {}
    assert any("a.jsonl:36" in e for e in manifest["error_examples"])
    assert manifest["documents_kept"] == 40


def test_rerun_replaces_the_folder_contents(tmp_path):
    inputs = make_corpus(tmp_path / "in")
    out = tmp_path / "out"
    prepare_data(inputs, out, DataConfig(), progress=False)
    manifest = prepare_data(inputs[1:], out, DataConfig(), progress=False)
    assert manifest["documents_read"] == 10 and read_manifest(out)["documents_read"] == 10
    assert len(records(out, "train")) + len(records(out, "val")) == 10


def test_max_bytes_stops_early(tmp_path):
    inputs = make_corpus(tmp_path / "in")
    manifest = prepare_data(inputs, tmp_path / "out", DataConfig(max_bytes=3000), progress=False)
    assert manifest["truncated_at_max_bytes"]
    kept_bytes = sum(s["bytes"] for s in manifest["splits"].values())
    assert 3000 <= kept_bytes < 3000 + 2500
    assert len(manifest["inputs"]) == 1  # the second input was never read


def test_tiny_corpus_still_gets_a_validation_record(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text(paragraph(100 + i), encoding="utf-8")
    manifest = prepare_data([str(tmp_path)], tmp_path / "out", DataConfig(val_fraction=0.001), progress=False)
    assert manifest["splits"]["val"]["records"] == 1 and manifest["splits"]["train"]["records"] == 2
    assert manifest["warnings"]
    val = list(iter_prepared(tmp_path / "out", "val"))
    # The same chunk moves whatever the input order.
    files = [str(tmp_path / f"{i}.txt") for i in (2, 0, 1)]
    prepare_data(files, tmp_path / "again", DataConfig(val_fraction=0.001), progress=False)
    assert list(iter_prepared(tmp_path / "again", "val")) == val


def test_reading_a_folder_that_is_not_prepared(tmp_path):
    with pytest.raises(InputError, match="not a prepared data folder"):
        list(iter_prepared(tmp_path, "train"))
    with pytest.raises(InputError, match="unknown split 'test'"):
        list(iter_prepared(tmp_path, "test"))
    with pytest.raises(InputError, match="no inputs"):
        prepare_data([], tmp_path / "out", progress=False)


def test_config_validation_and_cli_flags():
    with pytest.raises(InputError, match="dedup_threshold"):
        DataConfig(dedup_threshold=1.5)
    with pytest.raises(InputError, match="val_fraction"):
        DataConfig(val_fraction=1.0)
    assert all(f.metadata.get("help") for f in dataclasses.fields(DataConfig))
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser, DataConfig)
    args = parser.parse_args(["--min-chars", "10", "--skip-errors", "--max-bytes", "5"])
    config = settings.build(DataConfig, args)
    assert (config.min_chars, config.skip_errors, config.max_bytes, config.dedup) == (10, True, 5, True)


@pytest.mark.slow
def test_builtin_corpus_with_default_config(tmp_path):
    start = time.perf_counter()
    manifest = prepare_data(["builtin"], tmp_path / "out", DataConfig(), progress=False)
    assert time.perf_counter() - start < 60
    assert manifest["documents_kept"] > 700
    assert manifest["dropped"]["near_duplicate"] > 0  # the encodings/cp*.py tables are near copies
    train_mb = manifest["splits"]["train"]["bytes"] / 1e6
    val_kb = manifest["splits"]["val"]["bytes"] / 1e3
    assert train_mb > 5 and 100 < val_kb < 2000
    sources = [s for _, s in records(tmp_path / "out", "train") + records(tmp_path / "out", "val")]
    assert any(s.startswith("pydoc_data.topics:") for s in sources)
    assert any(s.startswith("stdlib:json/") for s in sources)
