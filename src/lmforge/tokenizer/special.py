"""The special tokens every lmforge tokenizer shares, with fixed ids.

Special tokens are control symbols, not text: they get ids ``0..n-1`` in every
tokenizer lmforge trains, in the order of :data:`SPECIAL_TOKENS`, so a model,
a data shard or a chat template can name them without looking at the
vocabulary. Their strings never come out of encoding user text (see
:meth:`lmforge.tokenizer.Tokenizer.encode`); code that needs one asks for its id.

Changing this tuple changes the ids of every token after it, so tokenizers
trained before and after would disagree. That is why a few ``reserved`` slots
exist: a later feature takes one of those names' places only in tokenizers
trained after it, while the ids of everything else stay put.
"""

from __future__ import annotations

BEGIN_OF_TEXT = "<|begin_of_text|>"
"""Starts a document; the model is trained to predict its first token from here."""

END_OF_TEXT = "<|end_of_text|>"
"""Ends a document; generation of plain text stops here."""

PAD = "<|pad|>"
"""Fills a batch row after its sequence ends; losses ignore its positions."""

SYSTEM = "<|system|>"
"""Opens the system turn of a chat (instructions for the assistant)."""

USER = "<|user|>"
"""Opens a user turn of a chat."""

ASSISTANT = "<|assistant|>"
"""Opens an assistant turn of a chat; the model writes what follows."""

TOOL = "<|tool|>"
"""Opens a tool-result turn of a chat (what a called tool returned)."""

END_OF_TURN = "<|end_of_turn|>"
"""Closes any chat turn; a chat model's generation stops here."""

MASK = "<|mask|>"
"""Stands for a hidden token in masked-language-model training (an encoder, BERT's [MASK])."""

NUM_RESERVED = 7
"""Spare slots kept so that new special tokens do not move the ids of old ones."""

SPECIAL_TOKENS: tuple[str, ...] = (
    BEGIN_OF_TEXT,
    END_OF_TEXT,
    PAD,
    SYSTEM,
    USER,
    ASSISTANT,
    TOOL,
    END_OF_TURN,
    MASK,
) + tuple(f"<|reserved_{index}|>" for index in range(1, NUM_RESERVED + 1))
"""All special tokens; the token at position ``i`` has id ``i`` in every lmforge tokenizer."""

FORMER_NAMES: dict[str, str] = {MASK: "<|reserved_0|>"}
"""The reserved name a special token's slot had before the token took it: tokenizers trained
earlier hold that name there, and still load (the id means the same)."""

SPECIAL_IDS: dict[str, int] = {text: index for index, text in enumerate(SPECIAL_TOKENS)}
"""Special token string -> its fixed id."""

NUM_SPECIAL = len(SPECIAL_TOKENS)
"""How many ids the special tokens take (ids ``0..NUM_SPECIAL-1``)."""
