"""Training: vocabulary size, id layout and input errors."""

from __future__ import annotations

import json
import warnings
from pydoc_data.topics import topics

import pytest

from lmforge.errors import InputError
from lmforge.tokenizer import MIN_VOCAB_SIZE, NUM_SPECIAL, SPECIAL_TOKENS, train_tokenizer
from lmforge.tokenizer.bytelevel import BYTE_TO_CHAR

TEXTS = list(topics.values())  # about 470 KB of the language reference


@pytest.mark.parametrize("vocab_size", [MIN_VOCAB_SIZE, MIN_VOCAB_SIZE + 1, 1000, 3000])
def test_vocab_size_is_honoured(vocab_size: int) -> None:
    tokenizer = train_tokenizer(TEXTS, vocab_size=vocab_size, progress=False)
    assert tokenizer.vocab_size == vocab_size
    assert tokenizer.tiktoken_encoding is not None, tokenizer.fast_path_problem
    text = "a sample, with 12345 numbers and ünïcödé ✓"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_id_layout_specials_then_bytes_then_merges() -> None:
    tokenizer = train_tokenizer(TEXTS, vocab_size=600, progress=False)
    assert [tokenizer.id_to_token(i) for i in range(NUM_SPECIAL)] == list(SPECIAL_TOKENS)
    byte_ids = range(NUM_SPECIAL, NUM_SPECIAL + 256)
    assert sorted(tokenizer.token_bytes(i) for i in byte_ids) == [bytes([b]) for b in range(256)]
    assert sorted(tokenizer.id_to_token(i) for i in byte_ids) == sorted(BYTE_TO_CHAR.values())
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    assert len(merges) == 600 - NUM_SPECIAL - 256
    for index, (left, right) in enumerate(merges):  # merge i made id NUM_SPECIAL + 256 + i
        assert tokenizer.id_to_token(NUM_SPECIAL + 256 + index) == left + right


def test_generator_input_and_progress_flag() -> None:
    tokenizer = train_tokenizer((text for text in TEXTS[:20]), vocab_size=400, progress=False)
    assert tokenizer.vocab_size == 400


@pytest.mark.parametrize("vocab_size", [MIN_VOCAB_SIZE - 1, 0, -5, 100.0, True])
def test_too_small_or_wrong_vocab_size_raises(vocab_size: object) -> None:
    with pytest.raises(InputError, match=str(MIN_VOCAB_SIZE)):
        train_tokenizer(TEXTS[:2], vocab_size=vocab_size, progress=False)  # type: ignore[arg-type]


def test_bad_corpus_raises() -> None:
    with pytest.raises(InputError, match="no text"):
        train_tokenizer([], vocab_size=300, progress=False)
    with pytest.raises(InputError, match="no text"):
        train_tokenizer(["", ""], vocab_size=300, progress=False)
    with pytest.raises(InputError, match="text 1 is a bytes"):
        train_tokenizer(["fine", b"bytes"], vocab_size=300, progress=False)  # type: ignore[list-item]


def test_small_corpus_gives_smaller_vocab_with_warning() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokenizer = train_tokenizer(["abc abc abd"], vocab_size=5000, progress=False)
    assert tokenizer.vocab_size < 5000
    assert any("ran out of pairs" in str(w.message) for w in caught)
    assert tokenizer.decode(tokenizer.encode("xyz abd")) == "xyz abd"


def test_surrogates_in_training_text_are_replaced() -> None:
    tokenizer = train_tokenizer(["bad \udc80 byte", "ok text"], vocab_size=MIN_VOCAB_SIZE + 5, progress=False)
    assert tokenizer.decode(tokenizer.encode("bad \udc80")) == "bad \ufffd"
