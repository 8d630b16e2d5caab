"""Training a byte-level BPE tokenizer with Hugging Face ``tokenizers``.

BPE starts from the 256 byte values and repeatedly adds the most frequent
adjacent pair of tokens in the corpus as a new token, until the vocabulary has
the requested size (Sennrich et al. 2016, https://arxiv.org/abs/1508.07909;
byte-level as in GPT-2). Pairs are counted inside the pieces that
:data:`lmforge.tokenizer.bytelevel.SPLIT_PATTERN` cuts, never across them.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sized

import tokenizers
from tokenizers import models, pre_tokenizers, trainers

from lmforge.errors import InputError
from lmforge.tokenizer.bytelevel import make_decoder, make_pre_tokenizer, replace_surrogates
from lmforge.tokenizer.special import NUM_SPECIAL, SPECIAL_TOKENS
from lmforge.tokenizer.tokenizer import Tokenizer

MIN_VOCAB_SIZE = NUM_SPECIAL + 256
"""The smallest vocabulary: the special tokens plus one token per byte value (no merges)."""


def train_tokenizer(texts: Iterable[str], vocab_size: int, progress: bool = True) -> Tokenizer:
    """Train byte-level BPE on ``texts`` with ``vocab_size`` ids in all (specials and 256 bytes included).

    Ids: the special tokens ``0..NUM_SPECIAL-1``, then the 256 byte tokens, then
    one token per merge in the order learned. ``texts`` is read once, as a
    stream (a generator over files is fine). The vocabulary has exactly
    ``vocab_size`` ids unless the corpus runs out of pairs to merge first, in
    which case it is smaller and a warning says so. ``progress`` shows
    ``tokenizers``' progress bars on stderr.

    Raises :class:`InputError` if ``vocab_size`` is below :data:`MIN_VOCAB_SIZE`,
    if an item is not a ``str``, or if there is no text at all.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise InputError(
            f"vocab_size must be an integer of at least {MIN_VOCAB_SIZE} "
            f"({NUM_SPECIAL} special tokens + 256 byte tokens), got {vocab_size!r}"
        )
    hf_tokenizer = tokenizers.Tokenizer(models.BPE(ignore_merges=True))
    # No normalizer: any normalization (NFC, lowercasing, ...) would break the exact round trip.
    hf_tokenizer.pre_tokenizer = make_pre_tokenizer()
    hf_tokenizer.decoder = make_decoder()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),  # added first, so they get ids 0..NUM_SPECIAL-1
        # All 256 byte symbols, even those the corpus lacks, so no input is ever unknown.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    num_chars = 0

    def stream() -> Iterator[str]:
        nonlocal num_chars
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise InputError(f"tokenizer training text {index} is a {type(text).__name__}, not a str")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                text = replace_surrogates(text)
            num_chars += len(text)
            yield text

    length = len(texts) if isinstance(texts, Sized) else None
    hf_tokenizer.train_from_iterator(stream(), trainer=trainer, length=length)
    if num_chars == 0:
        raise InputError("no text to train the tokenizer on")
    tokenizer = Tokenizer(hf_tokenizer, source="trained tokenizer")
    if tokenizer.vocab_size < vocab_size:
        warnings.warn(
            f"the corpus ran out of pairs to merge: the vocabulary has {tokenizer.vocab_size} ids, "
            f"not the {vocab_size} asked for; use more text or a smaller vocab_size",
            stacklevel=2,
        )
    return tokenizer
