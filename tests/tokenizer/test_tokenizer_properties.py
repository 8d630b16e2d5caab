"""Properties over arbitrary Unicode text (hypothesis; surrogates excluded, they have no UTF-8 form)."""

from __future__ import annotations

from pydoc_data.topics import topics

import pytest

from lmforge.tokenizer import Tokenizer, train_tokenizer

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

TOKENIZER = train_tokenizer(list(topics.values()), vocab_size=1500, progress=False)
REFERENCE = Tokenizer.from_str(TOKENIZER.to_str(), use_tiktoken=False)
LENGTHS = TOKENIZER.token_byte_lengths()

# Whole Unicode, plus a pool that makes runs of whitespace, digits, quotes and combining marks likely.
TEXT = st.text() | st.text(
    alphabet=st.sampled_from(list(" \t\n\r\u3000\u00a0'sStT019٣½e\u0301\u200d👍🏽你好.,;(){}"))
)


@settings(max_examples=300, deadline=None)
@given(TEXT)
def test_round_trip_and_byte_lengths(text: str) -> None:
    ids = TOKENIZER.encode(text)
    assert TOKENIZER.decode(ids) == text
    assert sum(LENGTHS[i] for i in ids) == len(text.encode("utf-8"))


@settings(max_examples=300, deadline=None)
@given(TEXT)
def test_tiktoken_path_equals_tokenizers_path(text: str) -> None:
    assert TOKENIZER.encode(text) == REFERENCE.encode(text)


@settings(max_examples=50, deadline=None)
@given(st.lists(TEXT, max_size=8))
def test_batch_equals_one_by_one(texts: list[str]) -> None:
    assert (
        TOKENIZER.encode_batch(texts) == [TOKENIZER.encode(t) for t in texts] == REFERENCE.encode_batch(texts)
    )
