"""`lmforge chat`: streaming turns, history within the context window, commands."""

from __future__ import annotations

import io

import pytest
import torch

from lmforge.api import LanguageModel
from lmforge.chat import ChatSession, run_chat
from lmforge.model import DecoderLM, preset
from lmforge.runtime import Runtime
from lmforge.tokenizer import END_OF_TURN, SPECIAL_IDS, train_tokenizer


@pytest.fixture(scope="module")
def lm():
    tokenizer = train_tokenizer(["hello there, how are you? I am fine, thanks. " * 40], 300)
    torch.manual_seed(0)
    model = DecoderLM(preset("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=96)).eval()
    return LanguageModel(model, tokenizer, Runtime.resolve("cpu", "fp32"))


def session(lm, **sampling) -> ChatSession:
    return ChatSession(lm, system="Be kind.", sampling={"temperature": 0, "max_new_tokens": 8, **sampling})


def test_reply_streams_the_same_text_as_chat_and_keeps_history(lm):
    chat = session(lm)
    streamed = "".join(chat.reply("hello there"))
    expected = lm.chat([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hello there"}],
                       temperature=0, max_new_tokens=8)
    assert streamed == expected
    assert [m["role"] for m in chat.messages()] == ["system", "user", "assistant"]


def test_chat_stops_at_the_end_of_the_turn(lm):
    # A model that always says "hi" then closes its turn: the reply is "hi", nothing after.
    tokenizer = lm.tokenizer
    hi, eot = tokenizer.encode("hi"), SPECIAL_IDS[END_OF_TURN]

    class Scripted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config, self.anchor = lm.model.config, torch.nn.Parameter(torch.zeros(1))

        def forward(self, ids, cache=None):
            start = cache.length if cache is not None else 0
            if cache is not None:
                cache.advance(ids.shape[1])
            logits = torch.zeros(ids.shape[0], ids.shape[1], self.config.vocab_size)
            script = hi + [eot] + hi * 10
            written = start + ids.shape[1] - self.prompt_len
            logits[:, -1, script[min(written, len(script) - 1)]] = 10.0
            return logits

    scripted = Scripted()
    model_lm = LanguageModel(scripted, tokenizer, lm.runtime)
    messages = [{"role": "user", "content": "hey"}]
    scripted.prompt_len = len(model_lm.chat_prompt(messages))
    assert model_lm.chat(messages, temperature=0, max_new_tokens=8) == "hi"


def test_old_turns_are_dropped_to_fit_and_the_session_says_so(lm):
    chat = session(lm, max_new_tokens=40)
    for _ in range(3):
        list(chat.reply("how are you? " * 3))
    before = len(chat.history)
    pieces = list(chat.reply("how are you? " * 3))
    assert pieces[0].startswith("[dropped the")
    assert len(chat.history) <= before
    assert chat.messages()[0]["role"] == "system"  # the system prompt stays
    # the prompt the last reply was written after left room for max_new_tokens
    assert chat.prompt_tokens(chat.history[:-1]) + 40 <= lm.model.config.max_seq_len
    with pytest.raises(ValueError, match="at most"):
        chat.fit_history("hello " * 200)


def test_terminal_loop_commands(lm):
    lines = iter(["hello there", "/tokens", "/system Be terse.", "/reset", "/tokens", "/nope", "/quit"])
    out = io.StringIO()
    chat = session(lm)
    run_chat(chat, lambda prompt: next(lines), out)
    text = out.getvalue()
    assert "assistant> " in text and "[2 turns," in text and "[0 turns," in text
    assert "[system prompt: 'Be terse.']" in text and "[unknown command /nope;" in text
    assert chat.system == "Be terse." and chat.history == []
