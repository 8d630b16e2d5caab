"""JSON Schema -> a graph of :class:`Node`: the subset that constrained decoding enforces exactly.

Supported keywords (anything else raises :class:`InputError` naming the keyword and where it is):

- ``type``: one name or a list of ``object``, ``array``, ``string``, ``number``, ``integer``,
  ``boolean``, ``null``. Without ``type`` it is inferred from the other keywords
  (``properties`` -> object, ``items`` -> array, ``maxLength`` -> string ...), else any value.
- ``properties``, ``required``, ``additionalProperties``; ``items``, ``minItems``, ``maxItems``;
  ``minLength``, ``maxLength`` (in characters, an escape or a UTF-8 sequence counts as one).
- ``enum``, ``const`` (``type`` may sit beside them and filters the values).
- ``anyOf``, ``oneOf`` as alternatives (``oneOf``'s "exactly one" is not checked: branches
  that overlap can both match); ``allOf`` with a single subschema.
- ``$ref`` to a local JSON pointer (``#``, ``#/$defs/name``, ``#/definitions/name`` ...),
  so recursive schemas work; ``$defs`` / ``definitions`` and annotations (``title``,
  ``description``, ``default``, ``examples`` ...) are read but change nothing.

Rejected: ``pattern``, ``format``, ``minimum``/``maximum``/``exclusive*``, ``multipleOf``,
``uniqueItems``, ``contains``, ``prefixItems`` and list-form ``items``, ``patternProperties``,
``propertyNames``, ``min``/``maxProperties``, ``dependent*``, ``if``/``then``/``else``, ``not``,
``allOf`` of several schemas, remote ``$ref``, and unknown keywords.

What is generated is a subset of what the schema allows, so every output validates:
an object with ``properties`` gets exactly those keys, in the schema's order (required ones
always, optional ones when the model writes them), never additional keys; ``enum``/``const``
values are written compactly (``json.dumps(value, separators=(",", ":"))``); ``integer``
means digits only (no fraction, no exponent).

Every node gets ``cost``: the fewest bytes of a value that matches it (the grammar adds
up such costs to tell how soon a half-written document can be finished). ``INF`` marks a
node no finite document satisfies (a required property of type ``false``, recursion with
no way out); such branches are never entered.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from lmforge.errors import InputError

INF = 1 << 30
"""Cost of what cannot be finished; any cost >= INF is infinite."""

KINDS = ("object", "array", "string", "number", "integer", "boolean", "null")
ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$id", "$comment",
                         "deprecated", "readOnly", "writeOnly", "$defs", "definitions"})
VALIDATING = frozenset({"type", "properties", "required", "additionalProperties", "items", "minItems",
                        "maxItems", "minLength", "maxLength", "enum", "const", "anyOf", "oneOf", "allOf", "$ref"})
_IMPLIED_KIND = {"properties": "object", "required": "object", "additionalProperties": "object",
                 "items": "array", "minItems": "array", "maxItems": "array",
                 "minLength": "string", "maxLength": "string"}
_COMBINATORS = ("$ref", "allOf", "anyOf", "oneOf")


def compact(value: Any) -> bytes:
    """The bytes a JSON value is written as inside the grammar (keys, enum and const values)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


@dataclass(eq=False)
class Property:
    """One entry of ``properties``: its key as JSON text (quotes included) and its value's node."""

    key: bytes
    node: Node
    required: bool


@dataclass(eq=False, repr=False)  # compared and hashed by identity: grammar states hold nodes
class Node:
    """What one JSON value may be. Either ``alternatives``, or ``literals``, or ``kinds`` with limits."""

    kinds: frozenset[str] = frozenset()
    alternatives: tuple[Node, ...] = ()
    literals: tuple[bytes, ...] | None = None  # enum/const (or true/false/null): exactly these bytes
    keywords: Node | None = None  # for kinds boolean/null: the node of their literals
    properties: tuple[Property, ...] | None = None  # None: any keys, each value a ``values``
    values: Node | None = None
    items: Node | None = None
    min_items: int = 0
    max_items: int | None = None
    min_length: int = 0
    max_length: int | None = None
    cost: int = INF
    # Objects with properties, index i = "properties before i are written or skipped":
    candidates: list[tuple[int, ...]] = field(default_factory=list)  # which may come next
    can_close: list[bool] = field(default_factory=list)  # no required property left
    after_cost: list[int] = field(default_factory=list)  # fewest bytes to finish from "}" or ", key"
    comma_cost: list[int] = field(default_factory=list)  # ... right after a ","
    open_cost: int = INF  # fewest bytes to finish right after "{"

    def __repr__(self) -> str:  # short: nodes form cycles and sit inside every grammar state
        what = (f"anyOf x{len(self.alternatives)}" if self.alternatives else
                f"literals={list(self.literals)}" if self.literals is not None else "/".join(sorted(self.kinds)))
        return f"Node({what}, cost={self.cost})"


_KEYWORD_NODES = {
    kinds: Node(literals=tuple(data for kind, data in (("boolean", b"true"), ("boolean", b"false"),
                                                       ("null", b"null")) if kind in kinds))
    for kinds in (frozenset({"boolean"}), frozenset({"null"}), frozenset({"boolean", "null"}))
}


def compile_schema(schema: dict | bool | None) -> Node:
    """The root node of ``schema``; ``None`` means any JSON object (``response_format`` json_object).

    Raises :class:`InputError` for an unsupported keyword, a malformed value or a schema that
    no finite document satisfies.
    """
    compiler = _Compiler(schema)
    if schema is None:
        root = compiler.new(kinds=frozenset({"object"}), values=compiler.any_value)
    else:
        root = compiler.node(schema, "#")
    _solve_costs(compiler.nodes)
    if root.cost >= INF:
        raise InputError("schema: no finite JSON document satisfies it")
    return root


class _Compiler:
    def __init__(self, document: Any):
        self.document = document
        self.nodes: list[Node] = []
        self.done: dict[int, Node] = {}  # id(schema dict) -> its node, so that $ref cycles close
        self.following: set[str] = set()  # $refs being followed to a schema that is not compiled yet
        self.any_value = self.new(kinds=frozenset(KINDS))
        self.any_value.values = self.any_value.items = self.any_value

    def new(self, **fields: Any) -> Node:
        node = Node(**fields)
        kinds = node.kinds & {"boolean", "null"}
        node.keywords = _KEYWORD_NODES.get(kinds)
        self.nodes.append(node)
        return node

    def node(self, schema: Any, path: str) -> Node:
        if schema is True:
            return self.any_value
        if schema is False:
            return self.new()  # no kinds: cost INF, never entered
        if not isinstance(schema, dict):
            raise InputError(f"schema {path}: expected an object or a boolean, got {type(schema).__name__}")
        if id(schema) in self.done:
            return self.done[id(schema)]
        unknown = [key for key in schema if key not in VALIDATING and key not in ANNOTATIONS]
        if unknown:
            raise InputError(f"schema {path}: unsupported keyword {unknown[0]!r} (constrained decoding supports "
                             f"{', '.join(sorted(VALIDATING))} and annotations)")
        validating = [key for key in schema if key in VALIDATING]
        for combinator in _COMBINATORS:
            if combinator in schema and validating != [combinator]:
                other = next(key for key in validating if key != combinator)
                raise InputError(f"schema {path}: {combinator!r} together with {other!r} is not supported")
        if "$ref" in schema:
            return self.reference(schema["$ref"], path)
        if "allOf" in schema:
            parts = schema["allOf"]
            if not isinstance(parts, list) or len(parts) != 1:
                raise InputError(f"schema {path}: 'allOf' is supported with exactly one subschema")
            return self.node(parts[0], f"{path}/allOf/0")
        node = self.new()
        self.done[id(schema)] = node
        for combinator in ("anyOf", "oneOf"):
            if combinator in schema:
                parts = schema[combinator]
                if not isinstance(parts, list) or not parts:
                    raise InputError(f"schema {path}: {combinator!r} must be a non-empty list")
                node.alternatives = tuple(self.node(part, f"{path}/{combinator}/{i}") for i, part in enumerate(parts))
                return node
        node.kinds = self.kinds(schema, path)
        node.keywords = _KEYWORD_NODES.get(node.kinds & {"boolean", "null"})
        if "enum" in schema or "const" in schema:
            node.literals = self.literals(schema, node.kinds, path)
            return node
        self.fill(node, schema, path)
        return node

    def kinds(self, schema: dict, path: str) -> frozenset[str]:
        if "type" not in schema:
            implied = {_IMPLIED_KIND[key] for key in schema if key in _IMPLIED_KIND}
            return frozenset(implied or KINDS)
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        for name in names:
            if name not in KINDS:
                raise InputError(f"schema {path}: unknown type {name!r} (one of {', '.join(KINDS)})")
        return frozenset(names)

    def literals(self, schema: dict, kinds: frozenset[str], path: str) -> tuple[bytes, ...]:
        extra = [key for key in schema if key in VALIDATING and key not in ("type", "enum", "const")]
        if extra:
            raise InputError(f"schema {path}: 'enum'/'const' together with {extra[0]!r} is not supported")
        if "enum" in schema and not isinstance(schema["enum"], list):
            raise InputError(f"schema {path}: 'enum' must be a list")
        values = list(schema["enum"]) if "enum" in schema else [schema["const"]]
        try:
            encoded = [compact(value) for value in values]
            if "const" in schema:
                encoded = [data for data in encoded if data == compact(schema["const"])]
        except (TypeError, ValueError) as err:
            raise InputError(f"schema {path}: an enum/const value is not JSON: {err}") from None
        kept = tuple(dict.fromkeys(data for data, value in zip(encoded, values) if _has_kind(value, kinds)))
        if not kept:
            raise InputError(f"schema {path}: no 'enum'/'const' value matches the schema's type")
        return kept

    def fill(self, node: Node, schema: dict, path: str) -> None:
        """Read the per-kind keywords into ``node``."""
        for key in ("minItems", "maxItems", "minLength", "maxLength"):
            value = schema.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise InputError(f"schema {path}: {key!r} must be a non-negative integer, got {value!r}")
        node.min_items, node.max_items = schema.get("minItems", 0), schema.get("maxItems")
        node.min_length, node.max_length = schema.get("minLength", 0), schema.get("maxLength")
        items = schema.get("items", True)
        if isinstance(items, list):
            raise InputError(f"schema {path}: list-form 'items' (tuple validation) is not supported")
        node.items = self.node(items, f"{path}/items")
        properties, required = schema.get("properties"), schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(key, str) for key in required):
            raise InputError(f"schema {path}: 'required' must be a list of strings")
        extra = schema.get("additionalProperties", True)
        if properties is None:
            if required:
                raise InputError(f"schema {path}: required key {required[0]!r} is not in 'properties' "
                                 "(keys outside 'properties' are never generated)")
            node.values = self.node(extra, f"{path}/additionalProperties")
            if extra is False:
                node.properties = ()
            return
        if not isinstance(properties, dict):
            raise InputError(f"schema {path}: 'properties' must be an object")
        missing = [key for key in required if key not in properties]
        if missing:
            raise InputError(f"schema {path}: required key {missing[0]!r} is not in 'properties' "
                             "(keys outside 'properties' are never generated)")
        node.properties = tuple(
            Property(compact(key), self.node(sub, f"{path}/properties/{key}"), key in required)
            for key, sub in properties.items()
        )

    def reference(self, ref: Any, path: str) -> Node:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise InputError(f"schema {path}: only local '$ref' (starting with '#') is supported, got {ref!r}")
        target = self.document
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            elif isinstance(target, dict) and part in target:
                target = target[part]
            else:
                raise InputError(f"schema {path}: '$ref' {ref!r} points to nothing")
        if id(target) in self.done:
            return self.done[id(target)]
        if ref in self.following:
            raise InputError(f"schema {path}: '$ref' {ref!r} refers back to itself without a schema between")
        self.following.add(ref)
        try:
            return self.node(target, ref)
        finally:
            self.following.discard(ref)


def _has_kind(value: Any, kinds: frozenset[str]) -> bool:
    """Whether a JSON value is of one of ``kinds`` (JSON Schema's meaning: 1.0 is an integer)."""
    if isinstance(value, bool):
        return "boolean" in kinds
    if value is None:
        return "null" in kinds
    if isinstance(value, int):
        return bool(kinds & {"integer", "number"})
    if isinstance(value, float):
        return "number" in kinds or ("integer" in kinds and math.isfinite(value) and value.is_integer())
    kind = {str: "string", list: "array", dict: "object"}.get(type(value))
    return kind in kinds


def _solve_costs(nodes: list[Node]) -> None:
    """Fewest bytes per node, by relaxing until nothing changes (recursive schemas form cycles)."""
    changed = True
    while changed:
        changed = False
        for node in nodes:
            cost = _node_cost(node)
            if cost < node.cost:
                node.cost, changed = cost, True
    for node in nodes:
        _node_cost(node)  # leaves the final tables of objects and arrays on the node


def _node_cost(node: Node) -> int:
    if node.alternatives:
        return min(alt.cost for alt in node.alternatives)
    if node.literals is not None:
        return min(len(data) for data in node.literals)
    costs = [INF]
    if node.keywords is not None:
        costs.append(min(len(data) for data in node.keywords.literals or ()))
    if node.kinds & {"number", "integer"}:
        costs.append(1)
    if "string" in node.kinds and (node.max_length is None or node.max_length >= node.min_length):
        costs.append(2 + node.min_length)
    if "array" in node.kinds:
        costs.append(1 + array_open_cost(node))
    if "object" in node.kinds:
        _object_tables(node)
        costs.append(1 + node.open_cost)
    return min(costs)


def array_open_cost(node: Node) -> int:
    """Fewest bytes after "[": the minimum number of items (each the cheapest item) and "]"."""
    if node.max_items is not None and node.max_items < node.min_items:
        return INF
    if node.min_items == 0:
        return 1
    return min(INF, 1 + node.min_items * node.items.cost + node.min_items - 1)


def _object_tables(node: Node) -> None:
    """Fill the per-index tables of an object node from its properties' current costs."""
    if node.properties is None:  # free keys: '}' closes at once; after ',' comes '"":' and a value
        node.open_cost = 1
        return
    props = node.properties
    entry = [len(p.key) + 1 + p.node.cost for p in props]  # key, ':', value
    count = len(props)
    node.after_cost, node.comma_cost = [INF] * (count + 1), [INF] * (count + 1)
    node.candidates, node.can_close = [()] * (count + 1), [True] * (count + 1)
    node.after_cost[count] = 1
    for i in range(count - 1, -1, -1):
        node.can_close[i] = node.can_close[i + 1] and not props[i].required
        # Optional properties may be skipped up to and including the next required one.
        last = next((j for j in range(i, count) if props[j].required), count - 1)
        node.candidates[i] = tuple(j for j in range(i, last + 1) if entry[j] < INF)
        node.comma_cost[i] = min([INF] + [entry[j] + node.after_cost[j + 1] for j in node.candidates[i]])
        close = 1 if node.can_close[i] else INF
        node.after_cost[i] = min(INF, close, 1 + node.comma_cost[i])
    node.open_cost = min(INF, 1 if node.can_close[0] else INF, node.comma_cost[0])
