"""A pushdown automaton over bytes that accepts the JSON documents a schema allows.

A *thread* is a stack of frames, root first, as a tuple: each frame is one value being
written and where inside it we are. A frame below the top records the place it will be
in once the value above it is done (an object "after a value", an array with one item
more), so finishing a value is just dropping the top frame. Numbers, and enum literals
that another literal extends (``1`` and ``12``), have no closing byte: they end when a
byte that cannot continue them arrives, which then goes to the frame below.

``anyOf`` makes the automaton nondeterministic; :meth:`JsonGrammar.step` returns every
thread a byte leads to, and the caller keeps a set of them (a document is accepted when
one thread accepts). Frames are frozen dataclasses, so threads hash and compare by
value and a caller can intern states and memoise transitions.

:meth:`JsonGrammar.cost` is the fewest bytes that finish a thread: the sum over its frames
of what each still needs (schema nodes carry the cost of a whole value). It is exact, so a
thread of finite cost can always be finished and one of cost ``INF`` is a dead end.

What the automaton accepts beyond plain JSON rules: at most ``max_whitespace`` whitespace
bytes in a row (before and after values and keys, and before the first byte; none after
the document), strings that are valid UTF-8 with escapes that are whole (a ``\\uD800``
high surrogate must be followed by a low one).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from lmforge.infer.json_schema import INF, Node, array_open_cost

WHITESPACE = frozenset(b" \t\n\r")
DIGITS = frozenset(b"0123456789")
QUOTE, BACKSLASH, COLON, COMMA, MINUS = 0x22, 0x5C, 0x3A, 0x2C, 0x2D
LBRACE, RBRACE, LBRACKET, RBRACKET = 0x7B, 0x7D, 0x5B, 0x5D


@dataclass(frozen=True, slots=True)
class ValueFrame:
    """Before a value of ``node``, after ``ws`` whitespace bytes."""

    node: Node
    ws: int = 0


OPEN, KEY, AFTER_KEY, AFTER_VALUE, AFTER_COMMA = range(5)  # places in an object


@dataclass(frozen=True, slots=True)
class ObjectFrame:
    """Inside an object. ``next``: properties before this index are written or skipped.

    At ``KEY``, ``key`` holds the bytes of the key so far (from its opening quote); at
    ``AFTER_KEY`` the key of property ``next - 1`` is done (free keys: a key is done).
    """

    node: Node
    place: int
    next: int = 0
    key: bytes = b""
    ws: int = 0


@dataclass(frozen=True, slots=True)
class ArrayFrame:
    """Inside an array: ``count`` items started (saturated where the limits stop mattering)."""

    node: Node
    count: int = 0
    opened: bool = True  # right after "[", no item yet
    ws: int = 0


# Escape progress in a string: after "\", after "\u", after "\ud", hex digits left,
# a high surrogate's hex digits left, then the "\udc00"-"\udfff" that must follow it.
PLAIN, ESCAPE, U4, UD, HEX3, HEX2, HEX1, HIGH2, HIGH1, LOW_BACKSLASH, LOW_U, LOW_D, LOW_C = range(13)
_HEX = b"0123456789abcdefABCDEF"
_ESCAPE_NEXT: dict[int, dict[int, int]] = {
    ESCAPE: {**{c: PLAIN for c in b'"\\/bfnrt'}, ord("u"): U4},
    U4: {**{c: HEX3 for c in _HEX}, ord("d"): UD, ord("D"): UD},
    UD: {**{c: HEX2 for c in b"01234567"}, **{c: HIGH2 for c in b"89abAB"}},  # c-f: a lone low surrogate
    HEX3: {c: HEX2 for c in _HEX}, HEX2: {c: HEX1 for c in _HEX}, HEX1: {c: PLAIN for c in _HEX},
    HIGH2: {c: HIGH1 for c in _HEX}, HIGH1: {c: LOW_BACKSLASH for c in _HEX},
    LOW_BACKSLASH: {BACKSLASH: LOW_U}, LOW_U: {ord("u"): LOW_D}, LOW_D: {ord("d"): LOW_C, ord("D"): LOW_C},
    LOW_C: {c: HEX2 for c in b"cdefCDEF"},
}
_ESCAPE_COST = {PLAIN: 0, ESCAPE: 1, U4: 4, UD: 3, HEX3: 3, HEX2: 2, HEX1: 1, HIGH2: 8, HIGH1: 7,
                LOW_BACKSLASH: 6, LOW_U: 5, LOW_D: 4, LOW_C: 3}
# UTF-8 lead byte -> (continuation bytes, range of the first one); the ranges rule out
# overlong forms, surrogates and code points past U+10FFFF (as Python's strict decoder).
_UTF8_LEAD: dict[int, tuple[int, int, int]] = {
    **{b: (1, 0x80, 0xBF) for b in range(0xC2, 0xE0)},
    0xE0: (2, 0xA0, 0xBF), **{b: (2, 0x80, 0xBF) for b in range(0xE1, 0xF0)}, 0xED: (2, 0x80, 0x9F),
    0xF0: (3, 0x90, 0xBF), **{b: (3, 0x80, 0xBF) for b in range(0xF1, 0xF4)}, 0xF4: (3, 0x80, 0x8F),
}


@dataclass(frozen=True, slots=True)
class StringFrame:
    """Inside a string (after its opening quote): ``count`` characters started (saturated)."""

    node: Node
    count: int = 0
    escape: int = PLAIN
    utf8: tuple[int, int, int] | None = None  # continuation bytes left, range of the next one


START, SIGN, ZERO, INT, DOT, FRAC, EXP, EXP_SIGN, EXP_DIGITS = range(9)  # places in a number
_NUMBER_ENDS = frozenset({ZERO, INT, FRAC, EXP_DIGITS})
_NUMBER_COST = {START: 1, SIGN: 1, ZERO: 0, INT: 0, DOT: 1, FRAC: 0, EXP: 1, EXP_SIGN: 1, EXP_DIGITS: 0}


@dataclass(frozen=True, slots=True)
class NumberFrame:
    """Inside a number; ``integer``: no fraction or exponent."""

    integer: bool
    phase: int = START


@dataclass(frozen=True, slots=True)
class LiteralFrame:
    """Matching one of ``node.literals`` (enum/const values, true/false/null); ``prefix`` so far."""

    node: Node
    prefix: bytes = b""


Frame = ValueFrame | ObjectFrame | ArrayFrame | StringFrame | NumberFrame | LiteralFrame
Thread = tuple[Frame, ...]


class JsonGrammar:
    """The automaton for one compiled schema (see :func:`lmforge.infer.json_schema.compile_schema`)."""

    def __init__(self, root: Node, key_node: Node, max_whitespace: int):
        """``key_node``: a string node for keys of objects without ``properties``."""
        self.root, self.key_node, self.max_whitespace = root, key_node, max_whitespace

    def start(self) -> Thread:
        return (ValueFrame(self.root),)

    # ---- transitions ---------------------------------------------------------------------

    def step(self, thread: Thread, byte: int) -> list[Thread]:
        """Every thread that ``byte`` leads to from ``thread`` (none: the byte is not allowed)."""
        if not thread:
            return []  # the document is complete; nothing may follow
        top, rest = thread[-1], thread[:-1]
        kind = type(top)
        if kind is StringFrame:
            return self._string(rest, top, byte)
        if kind is ValueFrame:
            return self._whitespace(rest, top) if byte in WHITESPACE else self._start(rest, top.node, byte)
        if kind is ObjectFrame:
            return self._object(rest, top, byte)
        if kind is ArrayFrame:
            return self._array(rest, top, byte)
        if kind is NumberFrame:
            return self._number(rest, top, byte)
        return self._literal(rest, top, byte)

    def _start(self, rest: Thread, node: Node, byte: int) -> list[Thread]:
        """The threads of a value of ``node`` that begins with ``byte`` (not whitespace)."""
        if node.alternatives:
            return [thread for alt in node.alternatives for thread in self._start(rest, alt, byte)]
        if node.cost >= INF:
            return []
        if node.literals is not None:
            return self._literal(rest, LiteralFrame(node), byte)
        kinds = node.kinds
        if byte == LBRACE and "object" in kinds:
            return [rest + (ObjectFrame(node, OPEN),)]
        if byte == LBRACKET and "array" in kinds:
            return [rest + (ArrayFrame(node),)]
        if byte == QUOTE and "string" in kinds:
            return [rest + (StringFrame(node),)]
        if (byte == MINUS or byte in DIGITS) and ("number" in kinds or "integer" in kinds):
            return self._number(rest, NumberFrame("number" not in kinds), byte)
        if node.keywords is not None:
            return self._literal(rest, LiteralFrame(node.keywords), byte)
        return []

    def _whitespace(self, rest: Thread, frame: ValueFrame | ObjectFrame | ArrayFrame) -> list[Thread]:
        return [rest + (replace(frame, ws=frame.ws + 1),)] if frame.ws < self.max_whitespace else []

    def _object(self, rest: Thread, frame: ObjectFrame, byte: int) -> list[Thread]:
        node, place = frame.node, frame.place
        free = node.properties is None
        if place == KEY:
            return self._key(rest, frame, byte)
        if byte in WHITESPACE:
            return self._whitespace(rest, frame)
        if place == AFTER_KEY:
            if byte != COLON:
                return []
            value = node.values if free else node.properties[frame.next - 1].node
            return [rest + (ObjectFrame(node, AFTER_VALUE, frame.next), ValueFrame(value))]
        if byte == RBRACE and place != AFTER_COMMA:
            return [rest] if free or node.can_close[frame.next] else []
        if place == AFTER_VALUE:
            if byte == COMMA and (free or node.candidates[frame.next]):
                return [rest + (ObjectFrame(node, AFTER_COMMA, frame.next),)]
            return []
        if byte != QUOTE:  # OPEN or AFTER_COMMA: a key
            return []
        if free:
            return [rest + (ObjectFrame(node, AFTER_KEY), StringFrame(self.key_node))]
        return [rest + (ObjectFrame(node, KEY, frame.next, b'"'),)] if node.candidates[frame.next] else []

    def _key(self, rest: Thread, frame: ObjectFrame, byte: int) -> list[Thread]:
        """A key of an object with ``properties``: one of the keys that may come next, byte by byte."""
        prefix = frame.key + bytes((byte,))
        props = frame.node.properties
        matches = [j for j in frame.node.candidates[frame.next] if props[j].key.startswith(prefix)]
        for j in matches:
            if props[j].key == prefix:  # a whole key is never the prefix of another: it ends in '"'
                return [rest + (ObjectFrame(frame.node, AFTER_KEY, j + 1),)]
        return [rest + (replace(frame, key=prefix),)] if matches else []

    def _array(self, rest: Thread, frame: ArrayFrame, byte: int) -> list[Thread]:
        node = frame.node
        if byte in WHITESPACE:
            return self._whitespace(rest, frame)
        if byte == RBRACKET:
            return [rest] if frame.count >= node.min_items else []
        more = node.max_items is None or frame.count < node.max_items
        cap = node.max_items if node.max_items is not None else node.min_items  # counts past it look alike
        after = ArrayFrame(node, min(frame.count + 1, cap), opened=False)
        if frame.opened:
            return self._start(rest + (after,), node.items, byte) if more else []
        if byte == COMMA and more:
            return [rest + (after, ValueFrame(node.items))]
        return []

    def _string(self, rest: Thread, frame: StringFrame, byte: int) -> list[Thread]:
        node = frame.node
        if frame.utf8 is not None:
            left, low, high = frame.utf8
            if not low <= byte <= high:
                return []
            return [rest + (replace(frame, utf8=(left - 1, 0x80, 0xBF) if left > 1 else None),)]
        if frame.escape != PLAIN:
            escape = _ESCAPE_NEXT[frame.escape].get(byte)
            return [] if escape is None else [rest + (replace(frame, escape=escape),)]
        if byte == QUOTE:
            return [rest] if frame.count >= node.min_length else []
        if byte < 0x20 or (node.max_length is not None and frame.count >= node.max_length):
            return []
        # A character starts; count it now, so that maxLength is checked before its bytes.
        cap = node.max_length if node.max_length is not None else node.min_length
        count = min(frame.count + 1, cap)
        if byte == BACKSLASH:
            return [rest + (StringFrame(node, count, ESCAPE),)]
        if byte < 0x80:
            return [rest + (StringFrame(node, count),)]
        lead = _UTF8_LEAD.get(byte)
        return [] if lead is None else [rest + (StringFrame(node, count, PLAIN, lead),)]

    def _number(self, rest: Thread, frame: NumberFrame, byte: int) -> list[Thread]:
        phase, digit = frame.phase, byte in DIGITS
        following = None
        if phase in (START, SIGN) and digit:
            following = ZERO if byte == 0x30 else INT
        elif phase == START and byte == MINUS:
            following = SIGN
        elif phase in (INT, DOT, FRAC, EXP, EXP_SIGN, EXP_DIGITS) and digit:
            following = {INT: INT, DOT: FRAC, FRAC: FRAC}.get(phase, EXP_DIGITS)
        elif phase in (ZERO, INT) and byte == 0x2E and not frame.integer:
            following = DOT
        elif phase in (ZERO, INT, FRAC) and byte in b"eE" and not frame.integer:
            following = EXP
        elif phase == EXP and byte in b"+-":
            following = EXP_SIGN
        if following is not None:
            return [rest + (NumberFrame(frame.integer, following),)]
        return self.step(rest, byte) if phase in _NUMBER_ENDS else []  # the byte after the number

    def _literal(self, rest: Thread, frame: LiteralFrame, byte: int) -> list[Thread]:
        prefix = frame.prefix + bytes((byte,))
        options = [data for data in frame.node.literals if data.startswith(prefix)]
        if options == [prefix]:
            return [rest]
        if options:
            return [rest + (LiteralFrame(frame.node, prefix),)]
        return self.step(rest, byte) if frame.prefix in frame.node.literals else []

    # ---- costs ---------------------------------------------------------------------------

    def cost(self, thread: Thread) -> int:
        """Fewest bytes that complete the document from ``thread`` (``INF``: impossible)."""
        return min(INF, sum(self.frame_cost(frame) for frame in thread))

    def frame_cost(self, frame: Frame) -> int:
        """Fewest bytes to finish ``frame``'s value, once the frames above it are done."""
        kind = type(frame)
        if kind is StringFrame:
            pending = frame.utf8[0] if frame.utf8 is not None else _ESCAPE_COST[frame.escape]
            return pending + max(0, frame.node.min_length - frame.count) + 1
        if kind is ValueFrame:
            return frame.node.cost
        if kind is NumberFrame:
            return _NUMBER_COST[frame.phase]
        if kind is LiteralFrame:
            return min(len(data) for data in frame.node.literals if data.startswith(frame.prefix)) - len(frame.prefix)
        node = frame.node
        if kind is ArrayFrame:
            if frame.opened:
                return array_open_cost(node)
            return 1 + max(0, node.min_items - frame.count) * (1 + node.items.cost)
        return self._object_cost(frame)

    def _object_cost(self, frame: ObjectFrame) -> int:
        node, place, index = frame.node, frame.place, frame.next
        if node.properties is None:  # free keys: '}' or, after ',', '"":' and the cheapest value and '}'
            value = node.values.cost
            return {OPEN: 1, AFTER_VALUE: 1, AFTER_COMMA: 4 + value, AFTER_KEY: 2 + value}[place]
        if place == OPEN:
            return node.open_cost
        if place == AFTER_VALUE:
            return node.after_cost[index]
        if place == AFTER_COMMA:
            return node.comma_cost[index]
        props = node.properties
        if place == AFTER_KEY:
            return 1 + props[index - 1].node.cost + node.after_cost[index]
        return min(len(props[j].key) - len(frame.key) + 1 + props[j].node.cost + node.after_cost[j + 1]
                   for j in node.candidates[index] if props[j].key.startswith(frame.key))

    def accepting(self, thread: Thread) -> bool:
        """Whether the bytes so far are a whole document (a root number may still grow: ``12`` -> ``123``)."""
        if not thread:
            return True
        if len(thread) > 1:
            return False
        frame = thread[0]
        if type(frame) is NumberFrame:
            return frame.phase in _NUMBER_ENDS
        return type(frame) is LiteralFrame and frame.prefix in frame.node.literals

    def open_string(self, thread: Thread) -> StringFrame | None:
        """The top frame when it is a string between characters (where plain text may follow), else None."""
        top = thread[-1] if thread else None
        if type(top) is StringFrame and top.escape == PLAIN and top.utf8 is None:
            return top
        return None
