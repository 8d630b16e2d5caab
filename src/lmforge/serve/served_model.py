"""One model behind the server: the loaded model, its engine thread, and what requests need of it."""

from __future__ import annotations

import functools
import time

import torch

from lmforge.api import LanguageModel
from lmforge.errors import InputError
from lmforge.infer.engine import Engine
from lmforge.infer.request import Request
from lmforge.serve.protocol import APIError
from lmforge.serve.worker import EngineWorker
from lmforge.tokenizer.chat import end_of_turn_ids, render_chat


class ServedModel:
    def __init__(self, name: str, lm: LanguageModel, max_batch_size: int = 8, context: int | None = None):
        self.name, self.lm, self.tokenizer = name, lm, lm.tokenizer
        self.engine = Engine(lm.model, lm.runtime, max_batch_size=max_batch_size, context=context,
                             decode_step=lm.decode_step, vocab_limit=getattr(lm.tokenizer, "vocab_size", None))
        self.worker = EngineWorker(self.engine, name)
        self.created = int(time.time())
        template = getattr(self.tokenizer, "chat_template", None) or ""
        self.template_takes_tools = "tools" in template

    @property
    def context(self) -> int:
        return self.engine.context

    def card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "lmforge",
                "max_model_len": self.context}

    # ---- tokens ---------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """A completion prompt's ids (with the BOS token when the tokenizer adds one)."""
        return self.lm.encode_prompt(text)

    def encode_plain(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        try:
            return render_chat(self.tokenizer, messages, add_generation_prompt=True).ids
        except InputError as err:
            raise APIError(400, str(err), "messages") from err

    def request(self, prompt_ids: list[int], config, **fields) -> Request:
        """An engine request; speculative when the model was loaded with a drafter and the settings allow."""
        return self.lm.request(prompt_ids, config, **fields)

    def end_of_turn(self) -> list[int]:
        return end_of_turn_ids(self.tokenizer)

    def end_of_text(self) -> list[int]:
        eos = getattr(self.tokenizer, "eos_id", None)
        return [eos] if eos is not None else []

    def decode(self, ids: list[int]) -> str:
        """Reply text, as the Python API gives it (special tokens left out)."""
        return self.lm.reply_text(ids)

    @functools.cached_property
    def vocab_bytes(self) -> list[bytes | None]:
        """Each token id's bytes (None for special tokens): for token strings and constrained decoding."""
        from lmforge.infer.constrain import token_bytes

        return token_bytes(self.tokenizer, self.lm.model.config.vocab_size)

    def token_text(self, token_id: int) -> str:
        """A token as OpenAI shows it: its text, or ``bytes:\\xNN..`` when it is part of a character."""
        raw = self.vocab_bytes[token_id] if token_id < len(self.vocab_bytes) else None
        if raw is None:  # a special token: its own text, e.g. "<|im_end|>"
            return self.tokenizer.decode([token_id])
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def token_byte_list(self, token_id: int) -> list[int]:
        raw = self.vocab_bytes[token_id] if token_id < len(self.vocab_bytes) else None
        return list(raw if raw is not None else b"")

    def tokenizer_info(self) -> dict:
        """What lm-evaluation-harness's remote tokenizer reads: special tokens, chat template, context."""
        from lmforge.tokenizer.chat import LMFORGE_CHAT_TEMPLATE

        def text(token_id: int | None) -> str | None:
            return None if token_id is None else self.tokenizer.decode([token_id])
        return {"model": self.name, "eos_token": text(getattr(self.tokenizer, "eos_id", None)),
                "bos_token": text(getattr(self.tokenizer, "bos_id", None)),
                "pad_token": text(getattr(self.tokenizer, "pad_id", None)),
                "chat_template": getattr(self.tokenizer, "chat_template", None) or LMFORGE_CHAT_TEMPLATE,
                "model_max_length": self.context}

    # ---- embeddings -----------------------------------------------------------------------------

    def embed(self, batch: list[list[int]]) -> list[list[float]]:
        """Mean of the final hidden states over each input's tokens, L2-normalised (run on the engine's thread)."""
        model, out = self.lm.model, []
        device = next(model.parameters()).device
        with torch.inference_mode():
            for ids in batch:
                hidden = model(torch.tensor([ids], device=device), return_hidden=True)[0].float()  # (T, dim)
                out.append(torch.nn.functional.normalize(hidden.mean(dim=0), dim=0).tolist())
        return out
