"""The Tokenizer class: round trip, special tokens, files, Hugging Face parity, inspection."""

from __future__ import annotations

import inspect
import json
import pickle
import random
from pydoc_data.topics import topics

import pytest
import tokenizers

from lmforge.errors import InputError
from lmforge.tokenizer import (
    BEGIN_OF_TEXT,
    END_OF_TEXT,
    END_OF_TURN,
    NUM_SPECIAL,
    PAD,
    SPECIAL_TOKENS,
    Tokenizer,
    bytes_per_token,
    format_tokens,
    train_tokenizer,
)

MIXED_TEXTS = [
    "Hello, world! It's a test; we'll see what THEY'RE doing.",
    "def f(x):\n\tif x >= 10:\n\t\treturn [x ** 2 for _ in range(3)]  # comment\r\n",
    "价格是 1234567 元。我们明天见！日本語のテキスト、한국어 텍스트.",
    "emoji 👩‍👩‍👧‍👦 🇫🇷 👍🏽 🙂🙂🙂 done",
    "spaces:     four\t\ttabs\n\n\n\nnewlines  \u3000ideographic\u00a0nbsp\u2028ls \r\n\r\n",
    "combining: e\u0301 a\u0308 n\u0303 \u0915\u094d\u0937 \u0627\u0644\u0639\u0631\u0628\u064a\u0629",
    "odd: 'ſ 'K 'S \x00 nul \ufeff bom \U0010ffff last \ufffd",
    "user text with <|end_of_text|> and <|pad|><|user|> inside",
    "",
    " ",
    "a" * 300 + "=" * 80,
]


def corpus() -> list[str]:
    """About 600 KB of real text that every Python ships: language reference topics and sources."""
    import collections
    import json as json_module
    import textwrap

    sources = [inspect.getsource(module) for module in (collections, json_module.decoder, textwrap, inspect)]
    return list(topics.values()) + sources + MIXED_TEXTS


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_tokenizer(corpus(), vocab_size=2048, progress=False)


def random_unicode(rng: random.Random, length: int) -> str:
    """Code points from every plane (surrogates excluded: they have no UTF-8 form), mixed with ASCII."""
    chars = []
    for _ in range(length):
        if rng.random() < 0.5:
            chars.append(chr(rng.randrange(0x20, 0x7F)))
        else:
            code_point = rng.randrange(0x110000)
            chars.append("?" if 0xD800 <= code_point < 0xE000 else chr(code_point))
    return "".join(chars)


def test_round_trip_is_exact(tokenizer: Tokenizer) -> None:
    rng = random.Random(0)
    texts = MIXED_TEXTS + [random_unicode(rng, rng.randrange(1, 200)) for _ in range(300)]
    for text in texts:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert tokenizer.decode_bytes(ids) == text.encode("utf-8")
    assert [tokenizer.decode(ids) for ids in tokenizer.encode_batch(texts)] == texts


def test_special_ids_are_fixed(tokenizer: Tokenizer) -> None:
    assert tokenizer.special_ids == {text: index for index, text in enumerate(SPECIAL_TOKENS)}
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 2)
    assert tokenizer.special_ids[BEGIN_OF_TEXT] == tokenizer.bos_id
    assert tokenizer.special_ids[END_OF_TEXT] == tokenizer.eos_id
    assert tokenizer.special_ids[PAD] == tokenizer.pad_id
    for index, text in enumerate(SPECIAL_TOKENS):
        assert tokenizer.id_to_token(index) == text
        assert tokenizer.token_bytes(index) == b""


def test_special_strings_in_text_stay_text(tokenizer: Tokenizer) -> None:
    for text in SPECIAL_TOKENS:
        ids = tokenizer.encode(f"a {text} b")
        assert not set(ids) & set(range(NUM_SPECIAL)), text
        assert tokenizer.decode(ids) == f"a {text} b"
    assert tokenizer.encode_batch([END_OF_TEXT])[0] == tokenizer.encode(END_OF_TEXT) != [tokenizer.eos_id]


def test_bos_eos_framing(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("hello")
    assert tokenizer.encode("hello", add_bos=True) == [tokenizer.bos_id, *ids]
    assert tokenizer.encode("hello", add_bos=True, add_eos=True) == [tokenizer.bos_id, *ids, tokenizer.eos_id]
    assert tokenizer.encode_batch(["hello"], add_eos=True) == [[*ids, tokenizer.eos_id]]
    framed = tokenizer.encode("hi", add_bos=True, add_eos=True)
    assert tokenizer.decode(framed) == f"{BEGIN_OF_TEXT}hi{END_OF_TEXT}"
    assert tokenizer.decode(framed, skip_special=True) == "hi"


def test_token_byte_lengths_sum_to_text_bytes(tokenizer: Tokenizer) -> None:
    lengths = tokenizer.token_byte_lengths()
    assert len(lengths) == tokenizer.vocab_size
    assert lengths[:NUM_SPECIAL] == [0] * NUM_SPECIAL
    assert all(length >= 1 for length in lengths[NUM_SPECIAL:])
    for text in MIXED_TEXTS + corpus()[:20]:
        ids = tokenizer.encode(text, add_bos=True, add_eos=True)
        assert sum(lengths[i] for i in ids) == len(text.encode("utf-8"))
        assert b"".join(tokenizer.token_bytes(i) for i in ids) == text.encode("utf-8")


def test_save_and_load(tokenizer: Tokenizer, tmp_path) -> None:
    path = tokenizer.save(tmp_path / "run" / "tokenizer.json")
    assert path.is_file() and list(path.parent.iterdir()) == [path]  # no temporary left behind
    assert tokenizer.save(tmp_path / "run") == path  # a directory gets tokenizer.json inside
    for loaded in (
        Tokenizer.from_file(path),
        Tokenizer.from_file(path.parent),
        pickle.loads(pickle.dumps(tokenizer)),
    ):
        assert loaded.vocab_size == tokenizer.vocab_size
        assert loaded.encode_batch(MIXED_TEXTS) == tokenizer.encode_batch(MIXED_TEXTS)
        assert loaded.tiktoken_encoding is not None


def test_bad_files_raise_input_error(tmp_path) -> None:
    with pytest.raises(InputError, match="not found"):
        Tokenizer.from_file(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json", encoding="utf-8")
    with pytest.raises(InputError, match="broken.json"):
        Tokenizer.from_file(broken)
    # A byte-level BPE tokenizer without lmforge's special tokens (GPT-2 style).
    foreign = tokenizers.Tokenizer(tokenizers.models.BPE())
    foreign.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel()
    foreign.train_from_iterator(
        ["some text"] * 5, tokenizers.trainers.BpeTrainer(vocab_size=300, show_progress=False)
    )
    foreign.save(str(tmp_path / "foreign.json"))
    with pytest.raises(InputError, match="not an lmforge tokenizer"):
        Tokenizer.from_file(tmp_path / "foreign.json")


def test_hugging_face_tokenizers_gives_same_ids(tokenizer: Tokenizer, tmp_path) -> None:
    path = tokenizer.save(tmp_path / "tokenizer.json")
    hf = tokenizers.Tokenizer.from_file(str(path))
    rng = random.Random(1)
    texts = [t for t in MIXED_TEXTS if "<|" not in t] + [random_unicode(rng, 100) for _ in range(100)]
    assert [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)] == tokenizer.encode_batch(texts)
    for ids in tokenizer.encode_batch(texts):
        assert hf.decode(ids, skip_special_tokens=False) == tokenizer.decode(ids)
    # Documented difference: Hugging Face turns special strings in text into special ids
    # (chat templates rely on it); lmforge's encode reads them as plain text.
    assert hf.encode(END_OF_TEXT, add_special_tokens=False).ids == [tokenizer.eos_id]


def test_transformers_gives_same_ids(tokenizer: Tokenizer, tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    path = tokenizer.save(tmp_path / "tokenizer.json")
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(path), bos_token=BEGIN_OF_TEXT, eos_token=END_OF_TEXT, pad_token=PAD
    )
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    assert hf.convert_tokens_to_ids(END_OF_TURN) == tokenizer.special_ids[END_OF_TURN]
    assert len(hf) == tokenizer.vocab_size
    for text in [t for t in MIXED_TEXTS if "<|" not in t]:
        ids = tokenizer.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids
        assert hf.decode(ids, clean_up_tokenization_spaces=False) == text


def test_decode_of_arbitrary_ids_matches_tokenizers(tokenizer: Tokenizer) -> None:
    # Random ids split UTF-8 characters; both must replace the broken bytes the same way.
    rng = random.Random(2)
    for _ in range(200):
        ids = [rng.randrange(NUM_SPECIAL, tokenizer.vocab_size) for _ in range(rng.randrange(1, 20))]
        assert tokenizer.decode(ids) == tokenizer.hf.decode(ids)
    with pytest.raises(ValueError, match="outside"):
        tokenizer.decode([tokenizer.vocab_size])
    with pytest.raises(ValueError, match="outside"):
        tokenizer.decode([-1])


def test_describe_and_format_tokens(tokenizer: Tokenizer) -> None:
    text = "def add(a, b):\n    return a + b  # 你好 🙂"
    rows = tokenizer.describe(text)
    assert [row.id for row in rows] == tokenizer.encode(text)
    assert b"".join(row.raw for row in rows) == text.encode()
    assert rows[0].text == "'def'"
    table = format_tokens(tokenizer, text)
    assert table.splitlines()[0].split() == ["#", "id", "bytes", "token"]
    assert table.splitlines()[-1].startswith(f"{len(rows)} tokens, {len(text.encode())} bytes")
    assert len(table.splitlines()) == len(rows) + 2
    with_bos = format_tokens(tokenizer, "hi", add_bos=True)
    assert BEGIN_OF_TEXT in with_bos and with_bos.endswith("bytes per token)")
    assert format_tokens(tokenizer, "").splitlines()[-1] == "0 tokens, 0 bytes"


def test_bytes_per_token(tokenizer: Tokenizer) -> None:
    texts = corpus()[:30]
    expected = sum(len(t.encode()) for t in texts) / sum(len(tokenizer.encode(t)) for t in texts)
    assert bytes_per_token(tokenizer, texts) == pytest.approx(expected)
    assert bytes_per_token(tokenizer, texts) > 2.0  # merges compress English and code
    with pytest.raises(InputError):
        bytes_per_token(tokenizer, ["", ""])


def test_lone_surrogates_become_replacement_characters(tokenizer: Tokenizer) -> None:
    text = "a\udc80b \ud83d\ude00"  # a lone low surrogate, then a surrogate pair spelled out
    for reference in (tokenizer, Tokenizer.from_str(tokenizer.to_str(), use_tiktoken=False)):
        assert reference.decode(reference.encode(text)) == "a\ufffdb \U0001f600"
        assert reference.encode_batch([text]) == [reference.encode(text)]


def test_saved_json_is_plain_tokenizers_format(tokenizer: Tokenizer, tmp_path) -> None:
    config = json.loads(tokenizer.save(tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    assert config["normalizer"] is None
    assert config["model"]["type"] == "BPE" and config["model"]["ignore_merges"] is True
    assert [t["content"] for t in config["added_tokens"]] == list(SPECIAL_TOKENS)
    assert all(t["special"] for t in config["added_tokens"])


def test_a_tokenizer_trained_before_the_mask_token_still_loads(tokenizer: Tokenizer) -> None:
    """The mask token took reserved slot 8: a tokenizer file that still names it <|reserved_0|> loads,
    encodes the same, and id 8 still means the mask."""
    from lmforge.tokenizer.special import MASK

    assert tokenizer.id_to_token(8) == MASK
    older = Tokenizer.from_str(tokenizer.to_str().replace(MASK, "<|reserved_0|>"))
    assert older.id_to_token(8) == "<|reserved_0|>" and older.special_ids[MASK] == 8
    assert older.encode("hello <|mask|> world") == tokenizer.encode("hello <|mask|> world")
    with pytest.raises(InputError, match="not an lmforge tokenizer"):
        Tokenizer.from_str(tokenizer.to_str().replace(MASK, "<|other|>"))
