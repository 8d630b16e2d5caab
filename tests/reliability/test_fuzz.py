"""Every reader fuzzed (issue 17, point 1): the smoke of ``lmforge fuzz`` (a few dozen damaged inputs per
reader, the same ones every run), the harness's own verdicts, and the defects the fuzzing found, each
pinned by a hand-made input."""

from __future__ import annotations

import json
import struct
import time

import numpy as np
import pytest
import torch

from lmforge.cli import main
from lmforge.errors import InputError
from lmforge.reliability.fuzz import Target, fuzz, memory_limit, mutate, save_failures
from lmforge.reliability.targets import _shard_seed, _trainer_read, _trainer_seed, targets, tokenizer

SMOKE_INPUTS = 50


@pytest.mark.parametrize("target", targets(), ids=lambda t: t.name)
def test_every_reader_answers_or_refuses_damaged_input(target, tmp_path):
    """Each reader, given its valid input damaged 50 ways: a result or lmforge's input error naming the file;
    no other exception, no hang past 10 s, no allocation past 4 GiB more than the process holds."""
    with memory_limit(4 << 30):
        report = fuzz(target, tmp_path, iterations=SMOKE_INPUTS, timeout=10)
    assert report.iterations == SMOKE_INPUTS and report.accepted + report.refused == SMOKE_INPUTS, \
        {signature: detail for signature, (count, detail) in report.distinct().items()}


# -- the harness ----------------------------------------------------------------------------------------------

def _one_file(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.json").write_text('{"size": 12, "name": "ok"}')
    return folder / "data.json"


def _strict(path):
    data = json.loads(path.read_text())  # no InputError: every damage is a failure
    return data["size"]


def test_the_harness_reports_what_escapes_and_keeps_the_input(tmp_path):
    report = fuzz(Target("strict", "a reader with no error handling", _one_file, _strict), tmp_path, iterations=40)
    assert report.failures and report.accepted + report.refused + len(report.failures) == 40
    assert all(f.kind == "exception" for f in report.failures)
    assert any("JSONDecodeError" in signature or "UnicodeDecodeError" in signature for signature in report.distinct())
    saved = save_failures(report, tmp_path / "crashes")
    assert saved and saved[0].read_bytes() == report.failures[0].data  # the input that failed, to replay


def test_hangs_unnamed_errors_and_memory_are_failures(tmp_path):
    def hang(path):
        if path.read_bytes() != b'{"size": 12, "name": "ok"}':
            time.sleep(5)

    def unnamed(path):
        if path.read_bytes() != b'{"size": 12, "name": "ok"}':
            raise InputError("something is wrong")  # but where?

    def greedy(path):
        if path.read_bytes() != b'{"size": 12, "name": "ok"}':
            np.empty(2**31, dtype=np.uint8)  # 2 GiB of address space, past the 1 GiB limit below

    start = time.perf_counter()
    assert {f.kind for f in fuzz(Target("hang", "", _one_file, hang), tmp_path / "a", 2, timeout=0.2).failures} == {"hang"}
    assert time.perf_counter() - start < 3
    assert {f.kind for f in fuzz(Target("unnamed", "", _one_file, unnamed), tmp_path / "b", 3).failures} == {"unnamed"}
    with memory_limit(1 << 30):
        assert {f.kind for f in fuzz(Target("greedy", "", _one_file, greedy), tmp_path / "c", 2).failures} == {"memory"}
    np.empty(2**31, dtype=np.uint8)  # and the limit is lifted after


def test_a_target_whose_valid_input_fails_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="valid seed input is not read"):
        fuzz(Target("broken", "", _one_file, lambda path: 1 / 0), tmp_path, iterations=3)


def test_mutations_are_repeatable_and_change_the_input():
    import random

    data = b'{"vocab_size": 300, "dim": 64, "name": "tiny"}' * 3
    assert mutate(data, random.Random(7)) == mutate(data, random.Random(7))
    assert mutate(data, random.Random(7)) != mutate(data, random.Random(8))
    rng = random.Random(0)
    assert sum(mutate(data, rng) != data for _ in range(200)) >= 190


def test_the_cli_fuzzes_the_readers_named(capsys):
    assert main(["fuzz", "safetensors", "questions", "--iterations", "15", "--json"]) == 0
    reports = json.loads(capsys.readouterr().out)
    assert [r["target"] for r in reports] == ["safetensors", "questions"]
    assert all(r["iterations"] == 15 and r["failures"] == 0 and r["accepted"] + r["refused"] == 15 for r in reports)
    assert main(["fuzz", "--list"]) == 0 and "knowledge-ann" in capsys.readouterr().out
    assert main(["fuzz", "no-such-reader"]) == 2 and "unknown fuzz target" in capsys.readouterr().err


# -- what the fuzzing found --------------------------------------------------------------------------------------

def test_a_tokenizer_id_of_four_billion_is_refused_before_tokenizers_allocates(tmp_path):
    """tokenizers sizes a table by the largest id: 4294967295 made it ask for 4 GiB and abort the process."""
    from lmforge.tokenizer import Tokenizer

    config = json.loads(tokenizer().to_str())
    first = next(iter(config["model"]["vocab"]))
    config["model"]["vocab"][first] = 2**32 - 1
    (tmp_path / "tokenizer.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="tokenizer.json: token ids must be whole numbers"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")


def test_a_vocabulary_without_a_byte_does_not_panic_tiktoken(tmp_path):
    """tiktoken starts from single bytes and panicked (a Rust panic, not an Exception) on one it lacked."""
    from lmforge.tokenizer import Tokenizer

    config = json.loads(tokenizer().to_str())
    vocab = config["model"]["vocab"]
    byte_a = next(token for token, index in vocab.items() if token == "a")
    vocab["\u0101\u0101\u0101"] = vocab.pop(byte_a)  # the byte "a" renamed to a token no merge makes
    config["model"]["merges"] = [m for m in config["model"]["merges"]
                                 if "a" not in (m.split(" ") if isinstance(m, str) else m)]
    (tmp_path / "tokenizer.json").write_text(json.dumps(config))
    try:
        tok = Tokenizer.from_file(tmp_path / "tokenizer.json")
    except InputError as err:
        assert "tokenizer.json" in str(err)
        return
    assert tok.fast_path_problem and "is not a token of its own" in tok.fast_path_problem
    tok.encode("a banana")  # the tokenizers path: no panic


def test_a_resume_with_damaged_optimizer_or_trainer_state_is_an_input_error(tmp_path):
    from safetensors.torch import load_file, save_file

    optimizer = _trainer_seed(tmp_path, "optimizer.safetensors")
    tensors = load_file(optimizer)
    moment = next(key for key in tensors if key.endswith("exp_avg"))
    save_file({**tensors, moment: torch.zeros(3, 3)}, optimizer)
    with pytest.raises(InputError, match=f"optimizer.safetensors: {moment}: expected a floating-point tensor"):
        _trainer_read(optimizer)
    save_file({**tensors, "rng.cpu": torch.zeros(5, dtype=torch.uint8)}, optimizer)
    with pytest.raises(InputError, match="rng.cpu: not a random generator state"):
        _trainer_read(optimizer)
    state = optimizer.parent / "trainer_state.json"
    state.write_text(json.dumps({"step": "3", "max_steps": 10}))
    with pytest.raises(InputError, match="trainer_state.json: needs whole numbers 'step' and 'max_steps'"):
        _trainer_read(state)


def test_a_shard_with_an_id_past_its_vocabulary_is_refused(tmp_path):
    from lmforge.data.shards import load_shard, read_meta

    shard = _shard_seed(tmp_path, "train.bin")
    vocab = read_meta(shard.parent)["vocab_size"]
    data = bytearray(shard.read_bytes())
    data[:2] = struct.pack("<H", vocab)
    shard.write_bytes(bytes(data))
    with pytest.raises(InputError, match=f"train.bin: token id {vocab} is past the vocabulary of {vocab}"):
        load_shard(shard.parent, "train")


def test_a_quantization_spec_naming_a_layer_the_model_lacks_is_refused(tmp_path):
    from lmforge.checkpoint import load_model
    from lmforge.reliability.targets import _quantized_seed

    spec_file = _quantized_seed(tmp_path)
    spec = json.loads(spec_file.read_text())
    spec["layers"][0] = "blocks.99.attn.q_proj"
    spec_file.write_text(json.dumps(spec))
    with pytest.raises(InputError, match="no quantizable layer 'blocks.99.attn.q_proj'"):
        load_model(spec_file.parent)


def test_a_ratings_database_with_a_broken_link_is_refused(tmp_path):
    import sqlite3

    from lmforge.eval.human import RatingStore
    from lmforge.reliability.targets import _rating_store_seed

    path = _rating_store_seed(tmp_path)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE ratings SET item_id = 99")
    db.close()
    with pytest.raises(InputError, match="ratings database is damaged: .*points at a missing items row"):
        RatingStore(path)
