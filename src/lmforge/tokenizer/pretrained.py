"""The tokenizer of an imported model: any Hugging Face ``tokenizer.json`` with its chat template.

lmforge's own :class:`~lmforge.tokenizer.Tokenizer` fixes its special tokens at ids
0..7; a pretrained model (Llama, Qwen2, SmolLM2, GPT-2 ...) brings its own vocabulary,
its own begin/end tokens and a Jinja chat template in ``tokenizer_config.json``.
:class:`PretrainedTokenizer` keeps all of that as the model's authors wrote it, so
ids equal what ``transformers.AutoTokenizer`` gives for the same files.

It offers the interface generation needs (``encode``, ``decode``, ``bos_id``,
``eos_id``, ``vocab_size``) plus :meth:`apply_chat_template`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import tokenizers

from lmforge.errors import InputError
from lmforge.files import parse_json, read_json, read_text
from lmforge.tokenizer.chat import render_template

TOKENIZER_FILE, CONFIG_FILE, TEMPLATE_FILE = "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def read_hf_tokenizer(file: Path) -> tokenizers.Tokenizer:
    """A ``tokenizers.Tokenizer`` from a ``tokenizer.json``, its ids checked first: ``tokenizers`` sizes
    tables by the largest id, so one damaged id (4294967295) would make it allocate gigabytes and abort
    the process."""
    text = read_text(file, "tokenizer file")
    config = parse_json(text, str(file))
    vocab = (config.get("model") or {}).get("vocab") if isinstance(config, dict) else None
    added = config.get("added_tokens") if isinstance(config, dict) else None
    entries = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab))) if isinstance(vocab, list) else []
    entries += [t.get("id") for t in added if isinstance(t, dict)] if isinstance(added, list) else []
    bound = 2 * len(entries) + 1024  # ids past this are damage, not a vocabulary (real ones have few gaps)
    if any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < bound for i in entries):
        raise InputError(f"{file}: token ids must be whole numbers from 0 to about the vocabulary's size")
    try:
        return tokenizers.Tokenizer.from_str(text)
    except Exception as err:  # tokenizers raises a bare Exception for malformed JSON
        raise InputError(f"{file}: cannot read tokenizer: {err}") from err


class PretrainedTokenizer:
    """A ``tokenizers.Tokenizer`` plus the special tokens and chat template of ``tokenizer_config.json``.

    ``bos_id`` is set only when the tokenizer puts a begin token before a text by
    default (Llama does, GPT-2 and Qwen2 do not), so that a prompt framed with it
    matches what the model saw in training. Special-token strings inside a text become
    their special ids, as in ``transformers``: rendered chat templates rely on it.
    """

    def __init__(self, hf_tokenizer: tokenizers.Tokenizer, config: dict | None = None,
                 chat_template: str | None = None, source: str = "tokenizer"):
        self._hf, self.config, self.source = hf_tokenizer, dict(config or {}), source
        self.chat_template: str | None = chat_template or self.config.get("chat_template")
        if isinstance(self.chat_template, list):  # a list of named templates: take the default one
            if not all(isinstance(t, dict) and isinstance(t.get("template"), str) for t in self.chat_template):
                raise InputError(f"{source}: chat_template: a list of named templates needs a 'template' string "
                                 "in each")
            named = {t.get("name"): t.get("template") for t in self.chat_template}
            self.chat_template = named.get("default") or next(iter(named.values()), None)
        if self.chat_template is not None and not isinstance(self.chat_template, str):
            raise InputError(f"{source}: chat_template must be a string, found {type(self.chat_template).__name__}")
        self.bos_token, self.eos_token = _token_text(self.config.get("bos_token")), _token_text(self.config.get("eos_token"))
        self.eos_id: int | None = self._id_of(self.eos_token)
        self.pad_id: int | None = self._id_of(_token_text(self.config.get("pad_token")))
        with_specials = self._hf.encode("a", add_special_tokens=True).ids
        plain = self._hf.encode("a", add_special_tokens=False).ids
        added_first = with_specials[0] if len(with_specials) > len(plain) and with_specials[1:] == plain[:1] else None
        if self.config.get("add_bos_token") is False:
            added_first = None
        elif self.config.get("add_bos_token") and added_first is None:
            added_first = self._id_of(self.bos_token)
        self.bos_id: int | None = added_first

    def _id_of(self, token: str | None) -> int | None:
        if token is None:
            return None
        found = self._hf.token_to_id(token)
        if found is None:
            raise InputError(f"{self.source}: special token {token!r} is not in the vocabulary")
        return found

    # ---- files ---------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> PretrainedTokenizer:
        """Load ``tokenizer.json`` and, when present, ``tokenizer_config.json`` and ``chat_template.jinja``."""
        folder = Path(path)
        file = folder / TOKENIZER_FILE
        if not file.is_file():
            raise InputError(f"{folder}: no {TOKENIZER_FILE} (lmforge reads the fast-tokenizer file that "
                             "transformers writes; convert a sentencepiece-only tokenizer with transformers first)")
        hf_tokenizer = read_hf_tokenizer(file)
        config = read_json(folder / CONFIG_FILE) if (folder / CONFIG_FILE).is_file() else {}
        template = read_text(folder / TEMPLATE_FILE) if (folder / TEMPLATE_FILE).is_file() else None
        return cls(hf_tokenizer, config, template, source=str(folder))

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (with the chat template) into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._hf.save(str(folder / TOKENIZER_FILE))
        config = {**self.config, "tokenizer_class": self.config.get("tokenizer_class", "PreTrainedTokenizerFast")}
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return folder

    # ---- ids -----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True)

    @property
    def hf(self) -> tokenizers.Tokenizer:
        return self._hf

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self._hf.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        if add_eos and self.eos_id is not None:
            ids = [*ids, self.eos_id]
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self._hf.decode(list(ids), skip_special_tokens=skip_special)

    def id_to_token(self, token_id: int) -> str:
        token = self._hf.id_to_token(token_id)
        if token is None:
            raise ValueError(f"token id {token_id} is outside the vocabulary of {self.vocab_size}")
        return token

    # ---- chat ----------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                            **variables: Any) -> str:
        """Render ``messages`` ([{"role": ..., "content": ...}]) with the model's own Jinja template.

        The same sandboxed Jinja environment and variables transformers provides
        (``bos_token``, ``eos_token``, ``add_generation_prompt``, ``raise_exception``),
        so the text, and hence the ids, are the same.
        """
        if not self.chat_template:
            raise InputError(f"{self.source}: this tokenizer has no chat template")
        try:
            return render_template(self.chat_template, messages, add_generation_prompt,
                                   bos_token=self.bos_token or "", eos_token=self.eos_token or "", **variables)
        except InputError as err:
            raise InputError(f"{self.source}: {err}") from err
