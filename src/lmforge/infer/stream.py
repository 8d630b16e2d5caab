"""Token ids to text pieces, one token at a time, for streaming output.

Two problems sit between "a new token id" and "text to show":

- A byte-level token may end in the middle of a UTF-8 character; decoding it alone
  gives U+FFFD. :class:`TextStream` holds such tokens back until the character is
  complete (the offset scheme of Hugging Face's ``TextStreamer`` and vLLM).
- A stop string may arrive split over several pieces. :class:`StopStrings` holds
  back any tail of the text that could be the start of a stop string and cuts the
  text before the first stop string.
"""

from __future__ import annotations

from collections.abc import Callable

REPLACEMENT = "\ufffd"  # what a decoder gives for an incomplete UTF-8 sequence


class TextStream:
    """Incremental detokenizer: ``push(token_id) -> new complete text`` ("" while incomplete).

    The concatenation of every ``push`` result and the final ``flush()`` equals
    ``decode(all ids)`` for decoders that map byte sequences to text.
    """

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the window decoded for context
        self.read_offset = 0  # ids before this have been emitted as text

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        emitted = self.decode(self.ids[self.prefix_offset:self.read_offset])
        text = self.decode(self.ids[self.prefix_offset:])
        if text.endswith(REPLACEMENT) or len(text) <= len(emitted):
            return ""  # a character is still incomplete
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(emitted):]

    def flush(self) -> str:
        """The text of any held-back ids (incomplete characters come out as U+FFFD)."""
        emitted = self.decode(self.ids[self.prefix_offset:self.read_offset])
        text = self.decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(emitted):]


class StopStrings:
    """Cuts streamed text before the first stop string.

    ``push(piece) -> (text safe to emit, stopped)``. Text that could still grow into a
    stop string is held back until the next piece decides it; ``flush()`` releases it
    at the end. The emitted text never contains a stop string, and its concatenation
    equals ``cut_at_stop(full text, stops)``.
    """

    def __init__(self, stops: list[str]):
        self.stops = list(stops)
        self.pending = ""

    def push(self, piece: str) -> tuple[str, bool]:
        self.pending += piece
        cut = find_stop(self.pending, self.stops)
        if cut is not None:
            text, self.pending = self.pending[:cut], ""
            return text, True
        hold = self._held_back_from()
        text, self.pending = self.pending[:hold], self.pending[hold:]
        return text, False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text

    def _held_back_from(self) -> int:
        """Index of the earliest suffix of ``pending`` that is a proper prefix of a stop string."""
        for start in range(max(0, len(self.pending) - max(map(len, self.stops), default=0) + 1),
                           len(self.pending)):
            tail = self.pending[start:]
            if any(stop.startswith(tail) for stop in self.stops):
                return start
        return len(self.pending)


def find_stop(text: str, stops: list[str]) -> int | None:
    """Index where the earliest stop string in ``text`` begins, or None."""
    found = [i for i in (text.find(stop) for stop in stops) if i >= 0]
    return min(found) if found else None


def cut_at_stop(text: str, stops: list[str]) -> str:
    """``text`` up to (not including) its first stop string."""
    cut = find_stop(text, stops)
    return text if cut is None else text[:cut]
