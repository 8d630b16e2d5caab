"""The memory-mapped safetensors reader (lmforge.interop.hf.mmap_safetensors) on damaged files: every input
gives the tensors or lmforge's input error naming the file, never another exception, and a header that
claims more bytes than the file has is refused before anything that size is read or allocated."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from lmforge.checkpoint import save_checkpoint
from lmforge.cli import main
from lmforge.errors import InputError
from lmforge.interop.hf import mmap_safetensors
from lmforge.model import DecoderLM, preset


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("st") / "ok.safetensors"
    save_file({"a": torch.arange(6, dtype=torch.float32).view(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}, path)
    return path.read_bytes()


def header_of(data: bytes) -> dict:
    length = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + length])


def with_header(data: bytes, header: dict) -> bytes:
    """The file's data bytes behind another header."""
    old = struct.unpack("<Q", data[:8])[0]
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data[8 + old:]


def test_a_damaged_model_file_is_an_input_error_in_the_cli(tmp_path, capsys):
    """A new user's case: the first bytes of model.safetensors damaged (lmforge generate died with a
    MemoryError and a traceback)."""
    save_checkpoint(tmp_path / "ckpt", DecoderLM(preset("tiny", vocab_size=64)), None)
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(b"\xff" * 8 + weights.read_bytes()[8:])
    assert main(["generate", str(tmp_path / "ckpt"), "hi", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors: not a safetensors file: its header claims" in err and "Traceback" not in err


def test_lies_in_the_header_are_refused(valid, tmp_path):
    path = tmp_path / "bad.safetensors"
    header = header_of(valid)
    cases = {
        "claims 1,152,921,504,606,846,976 bytes": struct.pack("<Q", 2**60) + valid[8:],
        "is not a JSON object": with_header(valid, [1, 2]),  # type: ignore[arg-type]
        "do not lie in the file": with_header(valid, {**header, "a": {**header["a"], "data_offsets": [0, 10**12]}}),
        "do not hold a F32 tensor of shape [3, 3]": with_header(valid, {**header, "a": {**header["a"],
                                                                                      "shape": [3, 3]}}),
        "is not a list of sizes": with_header(valid, {**header, "a": {**header["a"], "shape": [-1, 6]}}),
        "dtype 'Q9'": with_header(valid, {**header, "b": {**header["b"], "dtype": "Q9"}}),
        "not a readable safetensors file": valid[:5],
    }
    for message, data in cases.items():
        path.write_bytes(data)
        with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
            mmap_safetensors(path)
    path.write_bytes(valid)
    tensors = mmap_safetensors(path)
    assert tensors["a"].tolist() == [[0, 1, 2], [3, 4, 5]] and tensors["b"].dtype == torch.bfloat16


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6),
       st.integers(0, 10**6))
def test_any_damage_gives_tensors_or_an_input_error(valid, tmp_path, flips, cut):
    """Bytes overwritten anywhere (header or data) and the file cut short: the reader answers or refuses."""
    data = bytearray(valid)
    for at, value in flips:
        data[at % len(data)] = value
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(bytes(data[:max(1, len(data) - cut % len(data))]))
    try:
        tensors = mmap_safetensors(path)
    except InputError as err:
        assert str(path) in str(err)
        return
    for tensor in tensors.values():
        tensor.float().sum()  # every tensor the reader gives lies inside the file

