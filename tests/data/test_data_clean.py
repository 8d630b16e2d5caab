"""Normalisation, filters and chunking."""

from __future__ import annotations

import pytest

from lmforge.data.clean import clean_text, drop_reason, junk_ratio, split_into_chunks


def test_clean_text_normalises_unicode_controls_and_whitespace():
    raw = "\ufeffCafe\u0301 \x00bell\x07\r\nnext\tline   \rthird\x1b\x9b\n\n\n\n\n\nend  \n\n"
    assert clean_text(raw) == "Caf\u00e9 bell\nnext\tline\nthird\n\n\nend"


def test_clean_text_is_idempotent_and_keeps_two_blank_lines():
    text = "a\n\n\nb\n\nc"
    assert clean_text(text) == text
    messy = "x\u0065\x00\u0301  \r\n\r\n\r\n\r\n\r\ny"
    assert clean_text(clean_text(messy)) == clean_text(messy) == "x\u00e9\n\n\ny"


def test_junk_ratio():
    assert junk_ratio("def f(x): return {'a': x[0] ** 2}  # code is text") == 0.0
    assert junk_ratio("数据清洗 — «quotes», naïve café") == 0.0
    assert junk_ratio("\ufffd\ufffd\ufffdab") == pytest.approx(3 / 5)
    assert junk_ratio("\u2588\u2588 \U0001f600x") == pytest.approx(3 / 5)  # block chars and an emoji


def test_drop_reason():
    assert drop_reason("short", min_chars=10, max_junk_ratio=0.2) == "too_short"
    assert drop_reason("\ufffd" * 20, min_chars=10, max_junk_ratio=0.2) == "junk"
    assert drop_reason("plain enough text", min_chars=10, max_junk_ratio=0.2) is None


def test_short_text_is_one_chunk():
    assert split_into_chunks("abc\n\ndef", 100) == ["abc\n\ndef"]


def test_chunks_cut_at_paragraphs_and_stay_under_the_limit():
    paragraphs = [f"paragraph {i} " + "word " * (i % 7 + 3) for i in range(60)]
    text = "\n\n".join(p.strip() for p in paragraphs)
    chunks = split_into_chunks(text, 200)
    assert len(chunks) > 1
    assert all(len(c) <= 200 for c in chunks)
    # Every cut falls on a paragraph boundary: rejoining restores the text.
    assert "\n\n".join(chunks) == text
    assert all(c.startswith("paragraph") for c in chunks)


def test_paragraph_longer_than_limit_is_cut_at_lines_then_hard():
    lines = "\n".join(f"line {i:03d}" for i in range(50))  # one paragraph of 50 * 9 chars
    chunks = split_into_chunks(lines, 100)
    assert all(len(c) <= 100 for c in chunks) and "\n".join(chunks) == lines
    long_line = "x" * 250
    assert split_into_chunks(long_line, 100) == ["x" * 100, "x" * 100, "x" * 50]
    with pytest.raises(ValueError):
        split_into_chunks("abc", 0)
