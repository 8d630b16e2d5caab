"""How text becomes byte-level pieces before BPE: the split pattern and the byte alphabet.

Byte-level BPE works on UTF-8 bytes, so any string can be encoded and nothing
is ever unknown. Two things happen before merges are applied:

1. The text is split into pieces with :data:`SPLIT_PATTERN`; merges never cross
   a piece boundary, so a token never glues a word to the punctuation after it.
2. Each byte of a piece is shown as one printable character (GPT-2's table,
   :func:`bytes_to_unicode`), because ``tokenizers`` stores its vocabulary as
   strings. ``"Ġthe"`` in ``tokenizer.json`` is the bytes ``b" the"``.

Both Hugging Face ``tokenizers`` (Oniguruma regex) and ``tiktoken``
(fancy-regex) run the same pattern string; the tests check that they cut text
into the same pieces.
"""

from __future__ import annotations

from tokenizers import Regex, decoders, pre_tokenizers

# GPT-4's (cl100k) split pattern, alternatives tried left to right:
#   (?i:'s|'t|'re|'ve|'m|'ll|'d)  English contractions stay one piece ("'ll").
#   [^\r\n\p{L}\p{N}]?\p{L}+      a word, with at most one leading non-letter (" the", "_name").
#   \p{N}{1,3}                    numbers in groups of up to 3 digits, so "2024" is "202"+"4"
#                                 and the vocabulary does not fill with arbitrary numbers.
#   " ?[^\s\p{L}\p{N}]+[\r\n]*"   a punctuation run with an optional leading space (" ({").
#   \s*[\r\n]+                    whitespace ending in newlines (indentation before a line break).
#   \s+(?!\S)                     a whitespace run, leaving its last space for the next word,
#                                 so "    return" becomes "   " + " return" (code indentation).
#   \s+                           any other whitespace run.
# Every character is a letter, a number, whitespace or other, so the pieces cover
# the whole text: splitting loses nothing and decoding is exact.
# tiktoken's own cl100k now uses possessive quantifiers (``?+``, ``++``) for speed;
# they give the same pieces, but here the plain form measured as fast or faster and
# Oniguruma and every ``tokenizers`` version read it the same way.
SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
"""The regex that cuts text into pieces; BPE merges stay inside a piece."""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (256 entries, one character each).

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls,
    space, soft hyphen, ...) are moved to code points 256 and up, in byte order.
    So byte 32 (space) is ``"Ġ"`` (U+0120) and byte 10 (newline) is ``"Ċ"``.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {byte: chr(byte) for byte in printable}
    next_code_point = 256
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(next_code_point)
            next_code_point += 1
    return table


BYTE_TO_CHAR: dict[int, str] = bytes_to_unicode()
"""Byte value -> the character that stands for it in ``tokenizer.json``."""

CHAR_TO_BYTE: dict[str, int] = {char: byte for byte, char in BYTE_TO_CHAR.items()}
"""Inverse of :data:`BYTE_TO_CHAR`."""


# str.translate table: each alphabet character -> the code point equal to its byte, so that
# latin-1 then gives the bytes in one C-level pass. Code points below 256 that are not in
# the alphabet (e.g. a raw space) map to U+FFFF, which latin-1 rejects.
_TO_LATIN1: dict[int, int] = {code_point: 0xFFFF for code_point in range(256)}
_TO_LATIN1.update({ord(char): byte for char, byte in CHAR_TO_BYTE.items()})


def token_string_to_bytes(token: str) -> bytes:
    """The raw bytes a byte-level vocabulary string stands for (``"Ġthe"`` -> ``b" the"``).

    Raises ``ValueError`` if ``token`` holds a character outside the byte alphabet
    (e.g. a special token's string, which stands for no bytes).
    """
    try:
        return token.translate(_TO_LATIN1).encode("latin-1")
    except UnicodeEncodeError:
        bad = next(char for char in token if char not in CHAR_TO_BYTE)
        raise ValueError(f"character {bad!r} of token {token!r} is not in the byte-level alphabet") from None


def replace_surrogates(text: str) -> str:
    """Pair up surrogate halves and turn lone ones into U+FFFD, exactly as tiktoken does.

    A Python ``str`` may hold lone surrogates (e.g. from ``errors="surrogateescape"``);
    they have no UTF-8 form, so they cannot be encoded as bytes as they are.
    """
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def make_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Split with :data:`SPLIT_PATTERN`, then map bytes to characters.

    ``use_regex=False`` because the split already happened (ByteLevel's own regex
    is GPT-2's); ``add_prefix_space=False`` so that decoding gives back the text
    exactly, with no space added in front.
    """
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def make_decoder() -> decoders.Decoder:
    """Map characters back to bytes and read them as UTF-8 (invalid bytes become U+FFFD)."""
    return decoders.ByteLevel()
