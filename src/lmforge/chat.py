"""``lmforge chat``: a multi-turn conversation in the terminal, streamed as the model writes.

The whole conversation is sent to the model at every turn (a chat model has no
memory but its context). When it no longer fits the context window with room for
the reply, the oldest turns are dropped (the system prompt stays) and the session
says so. Commands: ``/reset`` forgets the conversation, ``/tokens`` shows how many
tokens it takes, ``/system TEXT`` sets the system prompt, ``/quit`` ends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TextIO

from lmforge.api import LanguageModel

HELP = "commands: /reset  /tokens  /system TEXT  /quit"


@dataclass
class ChatSession:
    """History and settings of one conversation with ``lm``."""

    lm: LanguageModel
    system: str = ""
    sampling: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, str]] = field(default_factory=list)  # user and assistant turns

    def messages(self, turns: list[dict[str, str]] | None = None) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + (self.history if turns is None else turns)

    def prompt_tokens(self, turns: list[dict[str, str]] | None = None) -> int:
        messages = self.messages(turns)
        return len(self.lm.chat_prompt(messages)) if messages else 0

    def fit_history(self, user: str) -> int:
        """Add ``user``'s turn, dropping the oldest turns until the prompt leaves room for the reply.

        Returns how many turns were dropped. A single message too long for the context
        raises ValueError.
        """
        limit = self.lm.model.config.max_seq_len - self.sampling.get("max_new_tokens", 256)
        turns = [*self.history, {"role": "user", "content": user}]
        dropped = 0
        while self.prompt_tokens(turns) > limit:
            if len(turns) == 1:
                raise ValueError(f"the message takes {self.prompt_tokens(turns)} tokens; at most {limit} fit "
                                 "with room for the reply (lower --max-new-tokens or write less)")
            turns = turns[2:] if turns[0]["role"] == "user" and len(turns) > 2 else turns[1:]
            dropped += 1
        self.history = turns
        return dropped

    def reply(self, user: str) -> Iterable[str]:
        """Stream the assistant's answer to ``user`` and keep both turns."""
        dropped = self.fit_history(user)
        if dropped:
            yield f"[dropped the {dropped} oldest turn{'s' * (dropped > 1)} to fit the context window]\n"
        pieces = []
        for piece in self.lm.stream_chat(self.messages(), **self.sampling):
            pieces.append(piece)
            yield piece
        self.history.append({"role": "assistant", "content": "".join(pieces).strip()})

    def command(self, line: str) -> str | None:
        """Run a /command; returns what to print, or None to quit."""
        name, _, argument = line.partition(" ")
        if name == "/quit":
            return None
        if name == "/reset":
            self.history = []
            return "[conversation cleared]"
        if name == "/tokens":
            limit = self.lm.model.config.max_seq_len
            return f"[{len(self.history)} turns, {self.prompt_tokens()} tokens of {limit} in the context window]"
        if name == "/system":
            self.system = argument.strip()
            return f"[system prompt: {self.system!r}]"
        return f"[unknown command {name}; {HELP}]"


def run_chat(session: ChatSession, read: Callable[[str], str], out: TextIO) -> None:
    """The terminal loop: ``read(prompt)`` returns the user's line (EOFError ends the session)."""
    out.write(f"lmforge chat ({HELP})\n")
    while True:
        try:
            line = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return
        if not line:
            continue
        if line.startswith("/"):
            message = session.command(line)
            if message is None:
                return
            out.write(message + "\n")
            continue
        out.write("assistant> ")
        try:
            for piece in session.reply(line):
                out.write(piece)
                out.flush()
        except ValueError as err:
            out.write(f"[{err}]")
        out.write("\n")
