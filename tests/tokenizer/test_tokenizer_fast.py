"""The tiktoken path against the tokenizers path (the reference), and the check that guards it."""

from __future__ import annotations

import json
import random
import sysconfig
from pathlib import Path
from pydoc_data.topics import topics

import pytest
import tiktoken
from tokenizers import models

from lmforge.tokenizer import MIN_VOCAB_SIZE, NUM_SPECIAL, Tokenizer, train_tokenizer
from lmforge.tokenizer.bytelevel import SPLIT_PATTERN
from lmforge.tokenizer.fast import merge_order_problem

STDLIB = Path(sysconfig.get_paths()["stdlib"])

TRICKY = [
    "It's I'M you'LL we'Ve they're 'ſ 'K 'st don't",  # contractions, case folding (ſ folds to s)
    "numbers 1 12 123 1234 12345678901 ٣٤٥ ²³ ½ Ⅻ ０１２",  # \p{N} beyond ASCII digits
    "x  y   z\t\t\tw\n\n\n  \n \r\n\r\n\u3000\u3000\u00a0\u2028\u2029\u0085\x0b\x0c end   ",
    "    return x\n        pass\n\t\tif y:\n",
    "价格是一千二百元。東京都 한국어 ภาษาไทย हिन्दी العربية עברית",
    "👩‍💻👨🏿‍🚀🏳️‍🌈🇯🇵 e\u0301\u0301 \u200d\u200c \ufeff \U000e0041",
    "a.b,c;d:e!f?g(h)i[j]k{l}m<n>o/p\\q|r@s#t$u%v^w&x*y-z_+=~`",
]


def read_sources(limit_bytes: int, pattern: str = "*.py", folder: Path = STDLIB) -> list[str]:
    texts, total = [], 0
    for path in sorted(folder.glob(pattern)):
        texts.append(path.read_text(encoding="utf-8", errors="replace"))
        total += len(texts[-1])
        if total > limit_bytes:
            break
    return texts


@pytest.fixture(scope="module")
def pair() -> tuple[Tokenizer, Tokenizer]:
    """A tokenizer on the tiktoken path and the same vocabulary on the tokenizers path."""
    fast = train_tokenizer(list(topics.values()) + read_sources(600_000), vocab_size=4096, progress=False)
    assert fast.tiktoken_encoding is not None, fast.fast_path_problem
    return fast, Tokenizer.from_str(fast.to_str(), use_tiktoken=False)


def random_text(rng: random.Random, length: int) -> str:
    pools = [
        (0x20, 0x7F), (0x09, 0x0E), (0xA0, 0x250), (0x300, 0x370), (0x4E00, 0x9FFF),
        (0x1F300, 0x1FAFF), (0x2000, 0x2070), (0x10000, 0x110000),
    ]  # fmt: skip
    chars = []
    for _ in range(length):
        low, high = rng.choice(pools)
        code_point = rng.randrange(low, high)
        chars.append(" " if 0xD800 <= code_point < 0xE000 else chr(code_point))
    return "".join(chars)


def test_tiktoken_equals_tokenizers_on_mixed_text(pair: tuple[Tokenizer, Tokenizer]) -> None:
    fast, reference = pair
    rng = random.Random(0)
    texts = TRICKY + [random_text(rng, rng.randrange(1, 300)) for _ in range(3000)]
    assert fast.encode_batch(texts) == reference.encode_batch(texts)
    assert [fast.encode(t) for t in TRICKY] == [reference.encode(t) for t in TRICKY]


def test_tiktoken_equals_tokenizers_on_a_larger_sample(pair: tuple[Tokenizer, Tokenizer]) -> None:
    fast, reference = pair
    texts = read_sources(1_500_000, "*.py", STDLIB / "email") + read_sources(1_500_000)[-40:]
    # Python's own tests of Unicode handling, where present (some distributions strip Lib/test).
    for name in ("test_unicode.py", "test_codecs.py", "test_re.py", "test_ucn.py", "test_unicodedata.py"):
        if (STDLIB / "test" / name).is_file():
            texts.append((STDLIB / "test" / name).read_text(encoding="utf-8", errors="replace"))
    assert sum(map(len, texts)) > 500_000
    assert fast.encode_batch(texts) == reference.encode_batch(texts)


def test_tiktoken_encoding_is_usable_directly(pair: tuple[Tokenizer, Tokenizer]) -> None:
    fast, _ = pair
    encoding = fast.tiktoken_encoding
    assert encoding is not None and encoding.n_vocab == fast.vocab_size
    assert encoding.encode("<|end_of_text|>", allowed_special="all") == [fast.eos_id]
    assert encoding.decode(fast.encode("naïve café")) == "naïve café"


def test_merge_order_problem_spots_a_vocabulary_tiktoken_would_read_differently() -> None:
    # Merges in priority order: b+c, then a+b, then ab+c. tiktoken ranks tokens, not pairs:
    # on "abcd" it merges b+c (rank 4), then a+bc because "abc" is a token (rank 6),
    # while the merge list never merges a with bc and stops at [a, bc, d].
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"d": 3, b"bc": 4, b"ab": 5, b"abc": 6}
    merges = [(b"b", b"c"), (b"a", b"b"), (b"ab", b"c")]
    assert "merge 2" in (merge_order_problem(ranks, merges, first_merge_id=4) or "")
    assert merge_order_problem(ranks, merges[:2], first_merge_id=4) is None

    bpe = models.BPE(
        vocab={token.decode(): rank for token, rank in ranks.items()},
        merges=[(left.decode(), right.decode()) for left, right in merges],
        ignore_merges=True,
    )
    encoding = tiktoken.Encoding("demo", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={})
    assert [token.id for token in bpe.tokenize("abcd")] == [0, 4, 3]
    assert encoding.encode_ordinary("abcd") == [6, 3]


def test_tokenizer_keeps_tokenizers_path_when_the_check_fails() -> None:
    config = json.loads(train_tokenizer(["x"], vocab_size=MIN_VOCAB_SIZE, progress=False).to_str())
    vocab = config["model"]["vocab"]
    for token in ("bc", "ab", "abc"):
        vocab[token] = len(vocab)
    config["model"]["merges"] = [["b", "c"], ["a", "b"], ["ab", "c"]]
    tokenizer = Tokenizer.from_str(json.dumps(config))
    assert tokenizer.tiktoken_encoding is None
    assert "merge 2" in (tokenizer.fast_path_problem or "")
    assert tokenizer.encode("abcd") == [vocab["a"], vocab["bc"], vocab["d"]]  # the merge list's answer
    assert tokenizer.decode(tokenizer.encode("abcd abc")) == "abcd abc"


def test_a_different_pipeline_keeps_tokenizers_path() -> None:
    config = json.loads(train_tokenizer(list(topics.values())[:5], vocab_size=400, progress=False).to_str())
    config["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\S+|\s+"
    tokenizer = Tokenizer.from_str(json.dumps(config))
    assert tokenizer.tiktoken_encoding is None and "split pattern" in (tokenizer.fast_path_problem or "")
    assert tokenizer.decode(tokenizer.encode("two  words")) == "two  words"
    assert len(tokenizer.encode("ab")) >= 1 and tokenizer.vocab_size == 400 and NUM_SPECIAL < 400
