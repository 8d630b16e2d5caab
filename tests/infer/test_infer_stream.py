"""Incremental detokenization, stop strings, and the text API (generate/stream/load)."""

from __future__ import annotations

import pytest
import torch

import lmforge
from lmforge.api import LanguageModel
from lmforge.checkpoint import save_checkpoint
from lmforge.errors import InputError
from lmforge.infer import CompiledDecodeStep
from lmforge.infer.stream import StopStrings, TextStream, cut_at_stop
from lmforge.runtime import Runtime

TEXT = "héllo wörld ✓\n\n日本語 END"
AFTER_EOS = "never shown"


@pytest.fixture
def scripted(scripted_lm, byte_tokenizer):
    """A LanguageModel whose greedy output after the prompt "hi" is TEXT, then EOS, then AFTER_EOS."""
    script = byte_tokenizer.encode(TEXT) + [byte_tokenizer.eos_id] + byte_tokenizer.encode(AFTER_EOS)
    model = scripted_lm(script, prompt_len=len(byte_tokenizer.encode("hi", add_bos=True)))
    return LanguageModel(model, byte_tokenizer, Runtime.resolve("cpu", "fp32"))


def greedy(**settings):
    return {"temperature": 0, "max_new_tokens": 60, **settings}


def test_text_stream_holds_back_incomplete_characters(byte_tokenizer):
    stream = TextStream(byte_tokenizer.decode)
    first, second = "é".encode()
    assert stream.push(ord("a")) == "a"
    assert stream.push(first) == ""  # half of "é"
    assert stream.push(second) == "é"
    pieces = [stream.push(b) for b in "日本 ✓x".encode()]
    assert "".join(pieces) == "日本 ✓x"
    assert all("\ufffd" not in piece for piece in pieces)
    assert stream.push("語".encode()[0]) == ""
    assert stream.flush() == "\ufffd"  # the stream ended inside a character


def test_stop_strings_hold_back_possible_starts():
    stops = StopStrings(["\nEND", "xyz"])
    assert stops.push("Hel") == ("Hel", False)
    assert stops.push("lo\n") == ("lo", False)  # "\n" may start "\nEND"
    assert stops.push("EN") == ("", False)
    assert stops.push("D and more") == ("", True)  # the stop string and everything after are cut
    stops = StopStrings(["\nEND"])
    assert stops.push("a\nE") == ("a", False)
    assert stops.push("NX?") == ("\nENX?", False)  # not the stop string after all: released
    assert stops.push("x\nE") == ("x", False)
    assert stops.flush() == "\nE"
    assert cut_at_stop("one two three", ["three", "two"]) == "one "


def test_generate_stops_at_end_of_text(scripted):
    assert scripted.generate("hi", **greedy()) == TEXT


def test_stream_pieces_are_complete_and_concatenate_to_generate(scripted):
    pieces = list(scripted.stream("hi", **greedy()))
    assert "".join(pieces) == TEXT
    assert len(pieces) > 10
    assert all("\ufffd" not in piece for piece in pieces)


@pytest.mark.parametrize("stop, expected", [
    (["\n\n"], "héllo wörld ✓"),
    (["日本"], "héllo wörld ✓\n\n"),  # a multi-byte stop string
    (["wörld", "llo"], "hé"),  # the earliest stop string wins
    (["END!"], TEXT),  # a prefix of a stop string at the end is released
])
def test_stop_strings_are_cut_in_generate_and_stream(scripted, stop, expected):
    assert scripted.generate("hi", **greedy(stop=stop)) == expected
    assert "".join(scripted.stream("hi", **greedy(stop=stop))) == expected


def test_stop_string_ends_decoding_early(scripted):
    scripted.generate("hi", **greedy(stop=["\n\n"]))
    assert scripted.model.calls <= len("héllo wörld ✓\n\n".encode()) + 1  # prefill + one step per token


def test_max_new_tokens_inside_a_character(scripted):
    cut = len("héllo wörld ✓\n\n".encode()) + 1  # one byte into "日"
    text = scripted.generate("hi", **greedy(max_new_tokens=cut))
    assert text == "héllo wörld ✓\n\n\ufffd"
    assert "".join(scripted.stream("hi", **greedy(max_new_tokens=cut))) == text


def test_unknown_sampling_setting_raises(scripted):
    with pytest.raises(ValueError, match="unknown sampling setting"):
        scripted.generate("hi", temprature=0.5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_stream_matches_generate_on_a_random_model(make_model, byte_tokenizer, seed):
    lm = LanguageModel(make_model(vocab_size=258, init_std=0.1), byte_tokenizer, Runtime.resolve("cpu", "fp32"))
    settings = dict(temperature=1.0, top_k=200, max_new_tokens=40, seed=seed, stop=["\x07\x08"])
    text = lm.generate("héllo", **settings)
    assert "".join(lm.stream("héllo", **settings)) == text
    assert len(text) > 0


def test_beam_search_through_the_api(scripted):
    assert scripted.generate("hi", **greedy(num_beams=2, stop=["\n\n"])) == "héllo wörld ✓"


@pytest.fixture
def trained_tokenizer():
    tokenizer_module = pytest.importorskip("lmforge.tokenizer")
    if not hasattr(tokenizer_module, "train_tokenizer"):
        pytest.skip("lmforge.tokenizer.train_tokenizer is not written yet")
    texts = ["héllo wörld, a naïve café", "the cat sat on the mat", "déjà vu and ümlauts"] * 20
    return tokenizer_module.train_tokenizer(texts, tokenizer_module.MIN_VOCAB_SIZE + 40, progress=False)


def test_stream_with_a_trained_tokenizer(trained_tokenizer, scripted_lm):
    tokenizer = trained_tokenizer
    text = "the café 中文 🎉 déjà ok"
    script = tokenizer.encode(text) + [tokenizer.eos_id]
    partial = [i for i in script if not _is_utf8(tokenizer.token_bytes(i))]
    assert partial  # some tokens end inside a character (the unseen CJK and emoji are split into bytes)
    prompt_len = len(tokenizer.encode("hi", add_bos=True))
    lm = LanguageModel(scripted_lm(script, prompt_len, tokenizer.vocab_size), tokenizer, Runtime.resolve("cpu", "fp32"))
    pieces = list(lm.stream("hi", **greedy()))
    assert "".join(pieces) == lm.generate("hi", **greedy()) == text
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(lm.stream("hi", **greedy(stop=["🎉"]))) == "the café 中文 "


@pytest.mark.parametrize("seed", [0, 1])
def test_sampled_stream_matches_generate_with_a_trained_tokenizer(trained_tokenizer, make_model, seed):
    model = make_model(vocab_size=trained_tokenizer.vocab_size, init_std=0.1)
    lm = LanguageModel(model, trained_tokenizer, Runtime.resolve("cpu", "fp32"))
    settings = dict(temperature=1.0, max_new_tokens=30, seed=seed, stop=["e"])
    assert "".join(lm.stream("déjà", **settings)) == lm.generate("déjà", **settings)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_load_a_checkpoint_in_bf16(make_model, byte_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr("lmforge.api.load_tokenizer", lambda path: byte_tokenizer)
    model = make_model(vocab_size=258)
    save_checkpoint(tmp_path / "ckpt", model)
    lm = lmforge.load(tmp_path / "ckpt", device="cpu", dtype="bf16")
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    assert lm.runtime.dtype == torch.bfloat16
    assert isinstance(lm.generate("hi", max_new_tokens=5, seed=0), str)
    lm32 = lmforge.load(tmp_path / "ckpt" / "config.json", device="cpu", dtype="fp32")  # a file inside works too
    assert next(lm32.model.parameters()).dtype == torch.float32
    assert lm32.decode_step is None
    compiled = lmforge.load(tmp_path / "ckpt", device="cpu", compile=True).decode_step
    assert isinstance(compiled, CompiledDecodeStep) and not compiled.prefill  # the packed pass stays eager
    assert lmforge.load(tmp_path / "ckpt", device="cpu", compile=True, compile_prefill=True).decode_step.prefill
    with pytest.raises(InputError, match="needs compile"):
        lmforge.load(tmp_path / "ckpt", device="cpu", compile_prefill=True)
    assert lmforge.load(tmp_path / "ckpt", device="cpu", compile=True, compile_cpp=True).decode_step.cpp_wrapper
    assert not compiled.cpp_wrapper
    assert lm32.engine(1).prefix_caching and not lm32.engine(1, prefix_caching=False).prefix_caching
    with pytest.raises(InputError, match="needs compile"):
        lmforge.load(tmp_path / "ckpt", device="cpu", compile_cpp=True)
    assert lm32.generate("hi", **greedy(max_new_tokens=8)) == LanguageModel(
        model, byte_tokenizer, lm32.runtime).generate("hi", **greedy(max_new_tokens=8))
