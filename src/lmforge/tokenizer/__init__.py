"""Byte-level BPE tokenizer with fixed special tokens: train, save/load, encode, decode, inspect."""

from lmforge.tokenizer.special import (
    ASSISTANT,
    BEGIN_OF_TEXT,
    END_OF_TEXT,
    END_OF_TURN,
    NUM_SPECIAL,
    PAD,
    SPECIAL_IDS,
    SPECIAL_TOKENS,
    SYSTEM,
    TOOL,
    USER,
)
from lmforge.tokenizer.tokenizer import FILE_NAME, Tokenizer, TokenRow, bytes_per_token, format_tokens
from lmforge.tokenizer.train import MIN_VOCAB_SIZE, train_tokenizer

__all__ = [
    "ASSISTANT",
    "BEGIN_OF_TEXT",
    "END_OF_TEXT",
    "END_OF_TURN",
    "FILE_NAME",
    "MIN_VOCAB_SIZE",
    "NUM_SPECIAL",
    "PAD",
    "SPECIAL_IDS",
    "SPECIAL_TOKENS",
    "SYSTEM",
    "TOOL",
    "USER",
    "TokenRow",
    "Tokenizer",
    "bytes_per_token",
    "format_tokens",
    "train_tokenizer",
]
