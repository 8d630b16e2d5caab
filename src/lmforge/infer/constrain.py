"""Constrained decoding to JSON: which tokens keep the output a valid document, step by step.

For ``response_format`` ``json_object`` (any JSON object) and ``json_schema`` (the subset in
:mod:`lmforge.infer.json_schema`), so that the output always parses and validates::

    vocab = token_bytes(tokenizer, model.config.vocab_size)      # once per model
    constraint = JsonConstraint(vocab, schema, stop_ids=[tokenizer.eos_id])
    # each step: mask every token not in constraint.allowed(remaining), sample, then
    constraint.advance(token)                                    # (not for a stop token)

Everything works on bytes: :mod:`lmforge.infer.json_grammar` is a pushdown automaton over
bytes, and a token is allowed when its bytes take the automaton to a state from which the
document can still be finished. Finding them every step for a 49k vocabulary:

- a byte trie of the vocabulary is walked together with the automaton, so a subtree whose
  prefix is rejected (most of them, outside strings) is never entered;
- inside a string, where most tokens are allowed, the tokens that are plain string text
  (whole UTF-8 characters, no quote, backslash or control byte) all do the same thing:
  they are handled at once as one vector operation, and only the others are walked;
- automaton states are interned and their transitions memoised, and each state's answer
  (a (V,) array of completion costs) is cached, so a state seen before costs one lookup.
  States, transitions and answers are shared by every constraint with the same vocabulary,
  schema and whitespace limit (a server answering many requests with one schema).

Measured during SmolLM2-135M-Instruct generations (49,152 tokens, one CPU thread): about
0.6 ms per :meth:`JsonConstraint.allowed` on average, 0.2 ms median, under 20 ms for the
first visit of a state; building the tries for a new vocabulary takes about 0.5 s, once.

Completion within the token budget: each state knows the fewest bytes that finish the
document, and a byte-level vocabulary has a one-byte token for every byte, so that many
tokens always suffice. With ``remaining`` tokens left, a token is allowed only if the
document can be finished in ``remaining - 1`` more; hence with ``max_tokens`` at least the
shortest document's length, generation always ends in a complete document (possibly by
reaching the limit exactly when it closes). Strings and arrays may be as long as the model
likes until the budget forces them shut. Constraints may be built on any thread; their
``allowed``/``advance`` calls share caches and belong on one thread (the engine's).
"""

from __future__ import annotations

import gc
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import tokenizers
import torch

from lmforge.errors import InputError
from lmforge.infer.json_grammar import JsonGrammar, Thread
from lmforge.infer.json_schema import INF, Node, compile_schema
from lmforge.tokenizer.bytelevel import token_string_to_bytes

MAX_WHITESPACE = 20
"""Default limit on whitespace bytes in a row: room for pretty-printing, none for looping on spaces."""

_CACHE_BYTES = 64 << 20  # per (vocabulary, schema): cached cost arrays, about 340 of them for a 49k vocabulary
_MAX_STATES = 500_000  # past this many interned states a machine is retired (it lives on with its constraints)


# ---- token bytes ----------------------------------------------------------------------------


def token_bytes(tokenizer: Any, vocab_size: int | None = None) -> list[bytes | None]:
    """Raw bytes of every token id (index = id); None for special tokens (never allowed in JSON).

    ``vocab_size`` is the model's number of logits (default: the tokenizer's); ids past the
    tokenizer's vocabulary are None. The bytes are read, in this order of preference, from:

    1. ``tokenizer.token_bytes(id)`` (lmforge's :class:`~lmforge.tokenizer.Tokenizer`;
       ``b""`` means a special token);
    2. ``tokenizer.hf``, a Hugging Face ``tokenizers.Tokenizer`` (``PretrainedTokenizer``):
       a ByteLevel vocabulary through GPT-2's byte table, or a SentencePiece-style one
       (``▁`` for a space, ``<0x0A>`` byte-fallback tokens); added special tokens are None;
    3. ``tokenizer.decode([id])`` for any other tokenizer (e.g. a byte tokenizer in tests).
       An id that decodes to U+FFFD alone is a piece of a character; its byte is found by
       encoding characters that cover every UTF-8 byte, which recovers byte tokens (one id
       per byte) and leaves other partial tokens None (as are the bytes that UTF-8 never
       uses: C0, C1, F5-FF).

    In every case ids named by ``special_ids``, ``bos_id``, ``eos_id`` or ``pad_id`` are None.
    """
    if vocab_size is None:
        vocab_size = getattr(tokenizer, "vocab_size", None)
        if vocab_size is None:
            raise TypeError("token_bytes: this tokenizer has no vocab_size; pass vocab_size (the model's)")
    own_size = min(vocab_size, getattr(tokenizer, "vocab_size", vocab_size))
    if callable(getattr(tokenizer, "token_bytes", None)):
        pieces: list[bytes | None] = [tokenizer.token_bytes(i) for i in range(own_size)]
    elif isinstance(getattr(tokenizer, "hf", None), tokenizers.Tokenizer):
        pieces = _hf_token_bytes(tokenizer.hf, own_size)
    elif callable(getattr(tokenizer, "decode", None)):
        pieces = _decoded_token_bytes(tokenizer, own_size)
    else:
        raise TypeError(f"token_bytes: cannot read token bytes from a {type(tokenizer).__name__} "
                        "(needs token_bytes(id), an hf tokenizer or decode)")
    specials = _special_ids(tokenizer)
    pieces += [None] * (vocab_size - len(pieces))
    return [piece if piece and i not in specials else None for i, piece in enumerate(pieces)]


def _special_ids(tokenizer: Any) -> set[int]:
    named = getattr(tokenizer, "special_ids", None) or ()
    ids = set(named.values() if isinstance(named, dict) else named)
    ids.update(getattr(tokenizer, name, None) for name in ("bos_id", "eos_id", "pad_id"))
    return {i for i in ids if isinstance(i, int)}


def _hf_token_bytes(hf: tokenizers.Tokenizer, size: int) -> list[bytes | None]:
    decoder = json.loads(hf.to_str()).get("decoder") or {}
    types = {step.get("type") for step in decoder.get("decoders", [decoder])}
    added = hf.get_added_tokens_decoder()
    pieces: list[bytes | None] = [None] * size
    for text, index in hf.get_vocab(with_added_tokens=True).items():
        if index >= size:
            continue
        if index in added:
            pieces[index] = None if added[index].special else added[index].content.encode()
        elif "ByteLevel" in types:
            try:
                pieces[index] = token_string_to_bytes(text)
            except ValueError:
                pieces[index] = None
        elif types & {"ByteFallback", "Metaspace", "Replace"}:
            byte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", text)
            pieces[index] = bytes([int(byte.group(1), 16)]) if byte else text.replace("\u2581", " ").encode()
        else:
            raise InputError(f"constrained decoding needs a byte-level tokenizer; this one's decoder is {types}")
    return pieces


def _decoded_token_bytes(tokenizer: Any, size: int) -> list[bytes | None]:
    pieces: list[bytes | None] = []
    partial = set()
    for index in range(size):
        text = tokenizer.decode([index])
        if "\ufffd" in text:
            partial.add(index)
        pieces.append(text.encode() if text and index not in partial else None)
    # Characters whose UTF-8 covers every lead and continuation byte that valid text can hold.
    probe = [chr(0x80 + i) for i in range(64)] + [chr(k << 6) for k in range(2, 32)]
    probe += [chr(0x800)] + [chr(k << 12) for k in range(1, 16)] + [chr(0x10000)]
    probe += [chr(k << 18) for k in range(1, 5)]
    for char in probe:
        data, ids = char.encode(), tokenizer.encode(char)
        if len(ids) == len(data) and all(i in partial for i in ids):
            for index, byte in zip(ids, data):
                pieces[index] = bytes([byte])
    return pieces


# ---- the vocabulary as a trie ---------------------------------------------------------------


class _TrieNode:
    __slots__ = ("children", "tokens")

    def __init__(self) -> None:
        self.children: dict[int, _TrieNode] = {}
        self.tokens: list[int] = []  # ids whose bytes end here


_NOT_PLAIN = re.compile(r'["\\\x00-\x1f]')


class _Vocabulary:
    """The tries and per-token facts the mask needs, built once per vocabulary."""

    def __init__(self, pieces: tuple[bytes | None, ...]):
        self.pieces, self.size = pieces, len(pieces)
        self.trie, self.rest_trie = _TrieNode(), _TrieNode()  # every token; those that are not plain text
        collecting = gc.isenabled()
        gc.disable()  # ~100k trie nodes for a 49k vocabulary: collections while building would triple the time
        try:
            chars = self._build(pieces)
        finally:
            if collecting:
                gc.enable()
        self.plain_chars = np.array(chars, dtype=np.int32)  # (V,) characters of plain-text tokens, else -1
        self.one_byte = {data[0] for data in pieces if data and len(data) == 1}
        self.machines: OrderedDict[tuple[str, int], _Machine] = OrderedDict()

    def _build(self, pieces: tuple[bytes | None, ...]) -> list[int]:
        chars = [-1] * self.size
        for index, data in enumerate(pieces):
            if not data:
                continue
            try:
                text = data.decode("utf-8")
                chars[index] = -1 if _NOT_PLAIN.search(text) else len(text)
            except UnicodeDecodeError:
                pass
            for root in (self.trie, self.rest_trie) if chars[index] < 0 else (self.trie,):
                node = root
                for byte in data:
                    child = node.children.get(byte)
                    if child is None:
                        child = node.children[byte] = _TrieNode()
                    node = child
                node.tokens.append(index)
        return chars

    def machine(self, schema: dict | None, max_whitespace: int) -> _Machine:
        """The (cached) automaton for ``schema``; raises InputError for an unsupported schema."""
        try:
            key = (json.dumps(schema), max_whitespace)
        except (TypeError, ValueError) as err:
            raise InputError(f"schema is not JSON: {err}") from None
        machine = self.machines.get(key)
        if machine is None or machine.retired:
            root = compile_schema(schema)
            missing = sorted((_bytes_needed(root) | set(range(0x20, 0x7F))) - self.one_byte)
            if missing:
                raise ValueError(f"the vocabulary has no one-byte token for byte(s) {bytes(missing)!r}, "
                                 "so finishing a document in time cannot be guaranteed")
            grammar = JsonGrammar(root, Node(kinds=frozenset({"string"})), max_whitespace)
            machine = self.machines[key] = _Machine(grammar, self)
        self.machines.move_to_end(key)
        while len(self.machines) > 32:
            self.machines.popitem(last=False)
        return machine


def _bytes_needed(root: Node) -> set[int]:
    """Bytes of every key and enum/const value reachable from ``root``."""
    seen, todo, found = set(), [root], set()
    while todo:
        node = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        found.update(b for data in node.literals or () for b in data)
        found.update(b for prop in node.properties or () for b in prop.key)
        todo += [*node.alternatives, *(p.node for p in node.properties or ())]
        todo += [n for n in (node.values, node.items) if n is not None]
    return found


_VOCABULARIES: OrderedDict[tuple[bytes | None, ...], _Vocabulary] = OrderedDict()
_CACHE_LOCK = threading.Lock()  # constraints may be built on a server's request threads


def _machine_for(vocab: Sequence[bytes | None], schema: dict | None, max_whitespace: int) -> _Machine:
    """The shared machine of (vocabulary, schema, whitespace limit), built on first use."""
    key = tuple(vocab)
    with _CACHE_LOCK:
        vocabulary = _VOCABULARIES.get(key)
        if vocabulary is None:
            vocabulary = _VOCABULARIES[key] = _Vocabulary(key)
            while len(_VOCABULARIES) > 4:
                _VOCABULARIES.popitem(last=False)
        _VOCABULARIES.move_to_end(key)
        return vocabulary.machine(schema, max_whitespace)


# ---- states and masks -----------------------------------------------------------------------


class _State:
    """A set of automaton threads, interned: ``next`` memoises its transitions by byte."""

    __slots__ = ("threads", "cost", "done", "next")

    def __init__(self, threads: frozenset[Thread], cost: int, done: bool):
        self.threads, self.cost, self.done = threads, cost, done
        self.next: dict[int, _State] = {}


_DEAD = _State(frozenset(), INF, False)  # no thread left: the bytes are not a prefix of a valid document


class _Machine:
    """A grammar over a vocabulary: interned states and each state's cost per token."""

    def __init__(self, grammar: JsonGrammar, vocabulary: _Vocabulary):
        self.grammar, self.vocabulary = grammar, vocabulary
        self.states: dict[frozenset[Thread], _State] = {}
        self.retired = False
        self.cache: OrderedDict[_State, np.ndarray] = OrderedDict()
        self.cache_size = max(16, _CACHE_BYTES // (4 * max(1, vocabulary.size)))
        self.start = self.intern([grammar.start()])

    def intern(self, threads: Any) -> _State:
        """The state of ``threads`` without its dead ends; ``_DEAD`` when none is left."""
        costs = {thread: self.grammar.cost(thread) for thread in threads}
        alive = frozenset(thread for thread, cost in costs.items() if cost < INF)
        if not alive:
            return _DEAD
        state = self.states.get(alive)
        if state is None:
            done = any(self.grammar.accepting(thread) for thread in alive)
            state = self.states[alive] = _State(alive, min(costs[thread] for thread in alive), done)
            self.retired = len(self.states) > _MAX_STATES
        return state

    def transition(self, state: _State, byte: int) -> _State:
        threads = [after for thread in state.threads for after in self.grammar.step(thread, byte)]
        state.next[byte] = target = self.intern(threads)
        return target

    def token_costs(self, state: _State) -> np.ndarray:
        """(V,) int32: per token, the fewest bytes that finish the document after it (``INF``: not allowed).

        NumPy, not torch: these few vector operations on one thread beat a thread pool's
        handoff, which costs milliseconds per operation on a busy CPU.
        """
        costs = self.cache.get(state)
        if costs is not None:
            self.cache.move_to_end(state)
            return costs
        if len(state.threads) > 1:  # tokens from a union of threads: the best thread for each token
            parts = [self.token_costs(self.intern([thread])) for thread in state.threads]
            costs = parts[0]
            for part in parts[1:]:
                costs = np.minimum(costs, part)
        else:
            costs = self._single_thread_costs(state)
        self.cache[state] = costs
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return costs

    def _single_thread_costs(self, state: _State) -> np.ndarray:
        vocabulary = self.vocabulary
        (thread,) = state.threads
        string = self.grammar.open_string(thread)
        if string is None:
            costs, trie = np.full(vocabulary.size, INF, dtype=np.int32), vocabulary.trie
        else:  # plain-text tokens add characters and keep the string open; walk only the others
            node, chars = string.node, vocabulary.plain_chars
            short = max(0, node.min_length - string.count)  # characters still owed to minLength
            costs = (state.cost - short) + np.maximum(short - chars, 0)
            fits = chars > 0
            if node.max_length is not None:
                fits &= chars <= node.max_length - string.count
            costs = np.where(fits, costs, INF).astype(np.int32)
            trie = vocabulary.rest_trie
        ids, values = self._walk(trie, state)
        if ids:
            costs[ids] = values
        return costs

    def _walk(self, root: _TrieNode, state: _State) -> tuple[list[int], list[int]]:
        """Every token under ``root`` whose bytes the automaton takes from ``state``, and the cost after it."""
        ids: list[int] = []
        values: list[int] = []
        stack = [(root, state)]
        while stack:
            node, current = stack.pop()
            follow = current.next
            for byte, child in node.children.items():
                target = follow.get(byte)
                if target is None:
                    target = self.transition(current, byte)
                if target is _DEAD:
                    continue
                if child.tokens:
                    ids += child.tokens
                    values += [target.cost] * len(child.tokens)
                if child.children:
                    stack.append((child, target))
        return ids, values


# ---- the constraint -------------------------------------------------------------------------


class JsonConstraint:
    """Keeps one request's output a prefix of a JSON document (any object, or one matching ``schema``).

    The engine calls :meth:`allowed` before sampling each token and :meth:`advance` with the
    token it sampled (except a stop token, which ends the request).
    """

    def __init__(self, vocab: Sequence[bytes | None], schema: dict | None = None, stop_ids: Sequence[int] = (),
                 max_whitespace: int = MAX_WHITESPACE):
        """``vocab``: :func:`token_bytes` of the tokenizer (its length is the number of logits).
        ``schema`` None = any JSON object (``json_object`` mode). ``stop_ids``: tokens that end the
        request, allowed exactly when the document is complete. ``max_whitespace``: most whitespace
        bytes in a row (0 = compact JSON).

        Raises :class:`InputError` naming an unsupported schema keyword or feature, and ValueError
        for a bad stop id or a vocabulary without a one-byte token for every printable ASCII byte.
        """
        if max_whitespace < 0:
            raise ValueError(f"max_whitespace must be >= 0, got {max_whitespace}")
        self._machine = _machine_for(vocab, schema, max_whitespace)
        size = self._machine.vocabulary.size
        bad = [i for i in stop_ids if not 0 <= i < size]
        if bad:
            raise ValueError(f"stop id {bad[0]} is outside the vocabulary of {size}")
        self._stop_set = frozenset(stop_ids)
        self._stop_ids = sorted(self._stop_set)
        self._state = self._machine.start

    def copy(self) -> JsonConstraint:
        """An independent constraint at the same place (for beam search or speculative drafts); O(1)."""
        twin = object.__new__(JsonConstraint)
        twin.__dict__.update(self.__dict__)
        return twin

    @property
    def done(self) -> bool:
        """The JSON document is complete (a root number may still grow: ``12`` -> ``123``)."""
        return self._state.done

    @property
    def min_remaining(self) -> int:
        """The fewest more tokens that surely finish the document (its missing bytes; 0 when done)."""
        return self._state.cost

    def allowed(self, remaining: int | None = None) -> torch.Tensor:
        """(V,) bool on the CPU: the tokens that keep the output a prefix of a valid document.

        Once the document is complete only ``stop_ids`` are allowed (and digits that extend a
        root number). With ``remaining`` (tokens the request may still generate, this one
        included) a token is allowed only if the document can be finished within
        ``remaining - 1`` more tokens. If even that is impossible (``remaining`` below
        :attr:`min_remaining`), the tokens that get closest to the end are allowed. When the
        document is complete and there are no stop ids, nothing may be allowed: the caller
        ends the request.
        """
        costs = self._machine.token_costs(self._state)
        if remaining is None:
            mask = costs < INF
        else:
            mask = costs <= remaining - 1
            if not self._state.done and not mask.any():
                best = int(costs.min())
                mask = costs == best if best < INF else mask
        if self._stop_ids:
            mask[self._stop_ids] = self._state.done
        return torch.from_numpy(mask)

    def advance(self, token_id: int) -> None:
        """Take the sampled token. Raises ValueError for a token :meth:`allowed` would forbid
        (the budget aside); a stop token is accepted only once the document is complete."""
        if token_id in self._stop_set:
            if not self._state.done:
                raise ValueError(f"stop token {token_id} before the JSON document is complete")
            return
        pieces = self._machine.vocabulary.pieces
        data = pieces[token_id] if 0 <= token_id < len(pieces) else None
        if data is None:
            raise ValueError(f"token {token_id} has no bytes (a special token or outside the vocabulary)")
        state = self._state
        for byte in data:
            state = state.next.get(byte) or self._machine.transition(state, byte)
            if state is _DEAD:
                raise ValueError(f"token {token_id} ({data!r}) does not continue the JSON document here")
        self._state = state
