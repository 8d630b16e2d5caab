"""The lmforge tokenizer: byte-level BPE with fixed special tokens, stored as ``tokenizer.json``.

:class:`Tokenizer` wraps a Hugging Face ``tokenizers.Tokenizer``, which is the
source of truth and the file format, so ``tokenizers`` and ``transformers`` load
our ``tokenizer.json`` and get the same ids. Encoding runs through a ``tiktoken``
mirror of the same vocabulary when that mirror provably gives the same ids
(see :mod:`lmforge.tokenizer.fast`); it is several times faster.

Contracts that hold for every lmforge tokenizer:

* ``decode(encode(text)) == text`` for any ``str`` without lone surrogates
  (byte-level BPE with no normalizer; lone surrogates become U+FFFD, as in tiktoken);
* special tokens have ids ``0..NUM_SPECIAL-1`` in the order of
  :data:`lmforge.tokenizer.special.SPECIAL_TOKENS`;
* :meth:`Tokenizer.encode` treats its input as plain text: ``"<|end_of_text|>"``
  typed by a user becomes ordinary tokens, never the special id.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tiktoken
import tokenizers

from lmforge.errors import InputError
from lmforge.files import remove_stale_temporaries, temp_path, writing
from lmforge.tokenizer.bytelevel import SPLIT_PATTERN, replace_surrogates, token_string_to_bytes
from lmforge.tokenizer.chat import LMFORGE_CHAT_TEMPLATE, check_messages, render_template
from lmforge.tokenizer.fast import build_encoding, byte_problem, merge_order_problem
from lmforge.tokenizer.pretrained import read_hf_tokenizer
from lmforge.tokenizer.special import (
    BEGIN_OF_TEXT,
    END_OF_TEXT,
    FORMER_NAMES,
    NUM_SPECIAL,
    PAD,
    SPECIAL_TOKENS,
)

FILE_NAME = "tokenizer.json"
"""The file a tokenizer is saved as inside a checkpoint or run directory."""


def _pipeline_problem(config: dict[str, Any]) -> str | None:
    """Why ``config`` (parsed tokenizer.json) does not split text like our tiktoken mirror, or ``None``."""
    if config.get("normalizer") is not None:
        return "it has a normalizer"
    known = {*SPECIAL_TOKENS, *FORMER_NAMES.values()}
    if any(token["content"] not in known for token in config.get("added_tokens") or []):
        return "it has added tokens besides lmforge's special tokens"
    steps = (config.get("pre_tokenizer") or {}).get("pretokenizers") or []
    if len(steps) != 2:
        return "its pre-tokenizer is not Split + ByteLevel"
    split, byte_level = steps
    if (
        split.get("type") != "Split"
        or split.get("pattern") != {"Regex": SPLIT_PATTERN}
        or split.get("behavior") != "Isolated"
        or split.get("invert")
    ):
        return "its split pattern differs from lmforge's"
    if (
        byte_level.get("type") != "ByteLevel"
        or byte_level.get("use_regex")
        or byte_level.get("add_prefix_space")
    ):
        return "its ByteLevel step is not ByteLevel(add_prefix_space=False, use_regex=False)"
    model = config["model"]
    # tiktoken first looks a whole piece up as one token; ignore_merges is the same rule.
    if not model.get("ignore_merges") or model.get("dropout") or model.get("byte_fallback"):
        return "its BPE model is not ignore_merges=True without dropout or byte fallback"
    return None


def _parse_merges(entries: list[Any]) -> list[tuple[str, str]]:
    """Merges as pairs; ``tokenizers`` writes ``[a, b]`` lists (>= 0.20) or ``"a b"`` strings (older)."""
    return [tuple(entry) if isinstance(entry, list) else tuple(entry.split(" ", 1)) for entry in entries]


@dataclass(frozen=True)
class TokenRow:
    """One token of an encoded text, as :meth:`Tokenizer.describe` shows it."""

    id: int
    """The token id."""
    text: str
    """The token shown readably: ``repr`` of its text, ``repr`` of its bytes if they are not whole
    UTF-8 characters, or the special token's name."""
    raw: bytes
    """The bytes of the input text this token stands for (empty for a special token)."""


class Tokenizer:
    """Byte-level BPE tokenizer with lmforge's special tokens at ids ``0..NUM_SPECIAL-1``.

    Build one with :func:`lmforge.tokenizer.train_tokenizer` or :meth:`from_file`.
    ``use_tiktoken=False`` forces the ``tokenizers`` path (the reference the
    tiktoken path is tested against). Instances are immutable and thread-safe to
    encode with; they pickle as their JSON (for data-loading worker processes).
    """

    def __init__(
        self, hf_tokenizer: tokenizers.Tokenizer, use_tiktoken: bool = True, source: str = "tokenizer"
    ) -> None:
        """Wrap ``hf_tokenizer``; ``source`` names it (e.g. the file) in error messages.

        Raises :class:`InputError` if it is not byte-level BPE with lmforge's special tokens.
        """
        self._json = hf_tokenizer.to_str()
        config = json.loads(self._json)
        model = config.get("model") or {}
        if model.get("type") != "BPE":
            raise InputError(f"{source}: not a BPE tokenizer (model type {model.get('type')!r})")
        vocab: dict[str, int] = model["vocab"]
        id_to_string = sorted(vocab, key=vocab.__getitem__)
        if [vocab[token] for token in id_to_string] != list(range(len(vocab))):
            raise InputError(f"{source}: token ids are not 0..{len(vocab) - 1} without gaps")
        if len(id_to_string) < NUM_SPECIAL or any(found not in (name, FORMER_NAMES.get(name))
                                                   for found, name in zip(id_to_string, SPECIAL_TOKENS)):
            raise InputError(
                f"{source}: not an lmforge tokenizer: ids 0..{NUM_SPECIAL - 1} must be the special tokens "
                f"{', '.join(SPECIAL_TOKENS[:3])}, ... in lmforge's order"
            )
        try:
            token_bytes = [b""] * NUM_SPECIAL + [token_string_to_bytes(s) for s in id_to_string[NUM_SPECIAL:]]
        except ValueError as err:
            raise InputError(f"{source}: not a byte-level tokenizer: {err}") from None

        self._hf = hf_tokenizer
        # A second copy that encodes special-token strings as plain text. The flag is not
        # saved in tokenizer.json, so the saved file keeps Hugging Face's usual behaviour
        # (specials in text become special ids, which chat templates rely on).
        self._plain = tokenizers.Tokenizer.from_str(self._json)
        self._plain.encode_special_tokens = True
        self._id_to_string: list[str] = id_to_string
        self._token_bytes: list[bytes] = token_bytes
        self._byte_lengths: tuple[int, ...] = tuple(len(data) for data in token_bytes)
        # For decoding with specials shown: a special's bytes are its own text.
        special_texts = [text.encode() for text in SPECIAL_TOKENS]
        self._display_bytes: list[bytes] = special_texts + token_bytes[NUM_SPECIAL:]
        self.special_ids: dict[str, int] = {text: index for index, text in enumerate(SPECIAL_TOKENS)}
        """Special token string -> id (the same for every lmforge tokenizer)."""
        self.bos_id: int = self.special_ids[BEGIN_OF_TEXT]
        """Id of ``<|begin_of_text|>``."""
        self.eos_id: int = self.special_ids[END_OF_TEXT]
        """Id of ``<|end_of_text|>``."""
        self.pad_id: int = self.special_ids[PAD]
        """Id of ``<|pad|>``."""

        self.fast_path_problem: str | None = None
        """Why encoding does not use tiktoken (``None`` when it does)."""
        self._encoding: tiktoken.Encoding | None = None
        if not use_tiktoken:
            self.fast_path_problem = "turned off (use_tiktoken=False)"
        else:
            ranks = {data: index for index, data in enumerate(token_bytes) if index >= NUM_SPECIAL}
            if len(ranks) != len(token_bytes) - NUM_SPECIAL:
                raise InputError(f"{source}: two tokens have the same bytes")
            try:
                merges = [
                    (token_bytes[vocab[left]], token_bytes[vocab[right]])
                    for left, right in _parse_merges(model.get("merges") or [])
                ]
            except KeyError as err:
                raise InputError(
                    f"{source}: a merge uses {err.args[0]!r}, which is not in the vocabulary"
                ) from None
            self.fast_path_problem = _pipeline_problem(config) or byte_problem(ranks) or merge_order_problem(
                ranks, merges, first_merge_id=NUM_SPECIAL + 256
            )
            if self.fast_path_problem is None:
                self._encoding = build_encoding(ranks, self.special_ids)

    # ---- files ---------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], use_tiktoken: bool = True) -> Tokenizer:
        """Load ``path`` (a ``tokenizer.json``, or a directory holding one).

        Raises :class:`InputError` naming the file if it is missing or not an lmforge tokenizer.
        """
        file = Path(path)
        if file.is_dir():
            file = file / FILE_NAME
        if not file.is_file():
            raise InputError(f"tokenizer file not found: {file}")
        return cls(read_hf_tokenizer(file), use_tiktoken=use_tiktoken, source=str(file))

    @classmethod
    def from_str(cls, text: str, use_tiktoken: bool = True) -> Tokenizer:
        """Load from the JSON text of a ``tokenizer.json``."""
        try:
            hf_tokenizer = tokenizers.Tokenizer.from_str(text)
        except Exception as err:
            raise InputError(f"cannot read tokenizer JSON: {err}") from err
        return cls(hf_tokenizer, use_tiktoken=use_tiktoken)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``tokenizer.json`` to ``path`` (a file path, or an existing directory) and return it.

        Atomic: the JSON goes to a temporary file in the same directory, which then
        replaces the target, so a crash never leaves a half-written tokenizer.
        """
        file = Path(path)
        if file.is_dir():
            file = file / FILE_NAME
        file.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(file.parent, file.name)  # a save killed before its rename left one
        temp_name = temp_path(file)
        try:
            with writing(file, "the tokenizer"), open(temp_name, "x", encoding="utf-8") as out:
                out.write(self._hf.to_str(pretty=True))
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp_name, file)
        except BaseException:
            Path(temp_name).unlink(missing_ok=True)
            raise
        return file

    def to_str(self) -> str:
        """The ``tokenizer.json`` text (compact)."""
        return self._json

    def __reduce__(self) -> tuple[Any, tuple[str, bool]]:
        # Rebuilt from JSON; a tokenizer without the tiktoken path skips the merge check.
        return (Tokenizer.from_str, (self._json, self._encoding is not None))

    def __repr__(self) -> str:
        path = "tiktoken" if self._encoding is not None else "tokenizers"
        return f"Tokenizer(vocab_size={self.vocab_size}, encode_path={path!r})"

    # ---- vocabulary ----------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids, specials included (ids are ``0..vocab_size-1``)."""
        return len(self._id_to_string)

    @property
    def hf(self) -> tokenizers.Tokenizer:
        """The wrapped ``tokenizers.Tokenizer``, exactly as saved (read it; do not modify it)."""
        return self._hf

    @property
    def tiktoken_encoding(self) -> tiktoken.Encoding | None:
        """The tiktoken mirror used for encoding, or ``None`` (see :attr:`fast_path_problem`)."""
        return self._encoding

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < len(self._id_to_string):
            raise ValueError(f"token id {token_id} is outside 0..{len(self._id_to_string) - 1}")

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary string of ``token_id`` as in ``tokenizer.json`` (``"Ġthe"`` for ``b" the"``)."""
        self._check_id(token_id)
        return self._id_to_string[token_id]

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes ``token_id`` stands for; ``b""`` for a special token."""
        self._check_id(token_id)
        return self._token_bytes[token_id]

    def token_byte_lengths(self) -> list[int]:
        """Length in bytes of every id, 0 for specials: ``sum(lengths[i] for i in encode(t)) == len(t.encode())``.

        Bits per byte of a model is its summed loss in bits divided by this sum over the targets.
        """
        return list(self._byte_lengths)

    # ---- encoding ------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of ``text``, read as plain text; optionally framed by ``bos_id`` / ``eos_id``."""
        if self._encoding is not None:
            ids = self._encoding.encode_ordinary(text)
        else:
            try:
                ids = self._plain.encode(text, add_special_tokens=False).ids
            except TypeError:
                if not isinstance(text, str):
                    raise
                ids = self._plain.encode(replace_surrogates(text), add_special_tokens=False).ids
        return self._frame(ids, add_bos, add_eos)

    def encode_batch(
        self,
        texts: Iterable[str],
        add_bos: bool = False,
        add_eos: bool = False,
        num_threads: int | None = None,
    ) -> list[list[int]]:
        """:meth:`encode` of each text, in parallel (``num_threads`` defaults to the CPU count)."""
        texts = list(texts)
        if self._encoding is not None:
            threads = num_threads or os.cpu_count() or 1
            batch = self._encoding.encode_ordinary_batch(texts, num_threads=threads)
        else:
            # tokenizers parallelises over the batch itself (RAYON_NUM_THREADS sets the width).
            try:
                encodings = self._plain.encode_batch_fast(texts, add_special_tokens=False)
            except TypeError:
                texts = [replace_surrogates(text) for text in texts]
                encodings = self._plain.encode_batch_fast(texts, add_special_tokens=False)
            batch = [encoding.ids for encoding in encodings]
        if add_bos or add_eos:
            batch = [self._frame(ids, add_bos, add_eos) for ids in batch]
        return batch

    def _frame(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos:
            ids = [self.bos_id, *ids]
        if add_eos:
            ids.append(self.eos_id)
        return ids

    # ---- decoding ------------------------------------------------------------------------

    def decode_bytes(self, ids: Iterable[int], skip_special: bool = False) -> bytes:
        """The bytes ``ids`` stand for; specials appear as their text unless ``skip_special``.

        For streaming output: a prefix of ids may end inside a UTF-8 character.
        ``ids`` are Python ints (call ``.tolist()`` on a tensor first; it works
        without, only slowly). Raises ``ValueError`` for an id outside the vocabulary.
        """
        ids = list(ids)
        if ids and (min(ids) < 0 or max(ids) >= len(self._id_to_string)):
            bad = next(i for i in ids if not 0 <= i < len(self._id_to_string))
            self._check_id(bad)
        table = self._token_bytes if skip_special else self._display_bytes
        return b"".join([table[i] for i in ids])

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of ``ids``; bytes that do not form UTF-8 become U+FFFD (as in ``tokenizers``).

        ``decode(encode(text)) == text`` always. Specials appear as their text
        (``"<|end_of_turn|>"``) unless ``skip_special``.
        """
        return self.decode_bytes(ids, skip_special).decode("utf-8", errors="replace")

    # ---- inspection ----------------------------------------------------------------------

    # ---- chat ----------------------------------------------------------------------------

    @property
    def chat_template(self) -> str:
        """lmforge's chat format as a Jinja template (:mod:`lmforge.tokenizer.chat`)."""
        return LMFORGE_CHAT_TEMPLATE

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation as text in lmforge's chat format (special tokens written out)."""
        return render_template(LMFORGE_CHAT_TEMPLATE, check_messages(messages), add_generation_prompt,
                               bos_token=BEGIN_OF_TEXT, eos_token=END_OF_TEXT)

    def readable(self, token_id: int) -> str:
        """``token_id`` shown for people: ``' the'``, ``'\\n    '``, ``b'\\xe4\\xbd'`` for a partial
        character, or a special token's own name."""
        self._check_id(token_id)
        if token_id < NUM_SPECIAL:
            return self._id_to_string[token_id]
        data = self._token_bytes[token_id]
        try:
            return repr(data.decode("utf-8"))
        except UnicodeDecodeError:
            return repr(data)

    def describe(self, text: str, add_bos: bool = False) -> list[TokenRow]:
        """One :class:`TokenRow` per token of ``encode(text, add_bos)``."""
        return [
            TokenRow(id=i, text=self.readable(i), raw=self._token_bytes[i])
            for i in self.encode(text, add_bos=add_bos)
        ]


def format_tokens(tokenizer: Tokenizer, text: str, add_bos: bool = False) -> str:
    """A table of ``text``'s tokens (index, id, byte count, token) and a count line, for printing.

    The last line reads ``"<n> tokens, <m> bytes (<m/n> bytes per token)"``.
    """
    rows = tokenizer.describe(text, add_bos=add_bos)
    id_width = max(len("id"), len(str(tokenizer.vocab_size - 1)))
    index_width = max(len("#"), len(str(len(rows) - 1)))
    lines = [f"{'#':>{index_width}}  {'id':>{id_width}}  bytes  token"]
    lines += [
        f"{n:>{index_width}}  {row.id:>{id_width}}  {len(row.raw):>5}  {row.text}"
        for n, row in enumerate(rows)
    ]
    num_bytes = len(text.encode("utf-8", errors="surrogatepass"))
    ratio = f" ({num_bytes / len(rows):.2f} bytes per token)" if rows else ""
    lines.append(f"{len(rows)} tokens, {num_bytes} bytes{ratio}")
    return "\n".join(lines)


def bytes_per_token(tokenizer: Tokenizer, texts: Iterable[str]) -> float:
    """Compression: UTF-8 bytes of ``texts`` divided by their token count (higher is better).

    Raises :class:`InputError` if the texts hold no tokens at all.
    """
    texts = list(texts)
    num_tokens = sum(len(ids) for ids in tokenizer.encode_batch(texts))
    if num_tokens == 0:
        raise InputError("cannot measure bytes per token: the texts are empty")
    return sum(len(text.encode("utf-8", errors="surrogatepass")) for text in texts) / num_tokens
