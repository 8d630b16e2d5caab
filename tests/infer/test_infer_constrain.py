"""JSON constrained decoding: the byte automaton, the schema subset, the token masks and the budget guarantee."""

from __future__ import annotations

import json
import random
from pydoc_data.topics import topics

import pytest
import tokenizers
import torch
from tokenizers import decoders, models, pre_tokenizers

from lmforge.errors import InputError
from lmforge.infer.constrain import JsonConstraint, token_bytes
from lmforge.model import KVCache
from lmforge.tokenizer import train_tokenizer
from lmforge.tokenizer.pretrained import PretrainedTokenizer

BYTES = [bytes([i]) for i in range(256)] + [None, None]  # the ByteTokenizer's vocabulary (256 BOS, 257 EOS)
BOS, EOS = 256, 257

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 8},
    "age": {"type": "integer"},
    "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6}, "zip": {"type": "string"}},
                "required": ["city"]},
    "active": {"type": "boolean"}}, "required": ["name", "address"]}
ENUMS = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue", 1, 12, None, True, "é"]},
                                          "size": {"const": "XL"}}, "required": ["color", "size"]}
LIST = {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4}
CHOICE = {"type": "object", "properties": {"value": {"anyOf": [
    {"type": "number"}, {"type": "string", "maxLength": 3}, {"type": "null"},
    {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}]}}, "required": ["value"]}
NUMBERS = {"type": "object", "properties": {"i": {"type": "integer"}, "x": {"type": "number"},
                                            "n": {"type": ["integer", "null"]}}, "required": ["i", "x", "n"]}
TREE = {"$defs": {"node": {"type": "object", "properties": {
    "v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}},
    "required": ["v"]}}, "$ref": "#/$defs/node"}
UNION = {"anyOf": [  # two objects that agree on a prefix: two threads inside the same string
    {"type": "object", "properties": {"a": {"type": "string", "maxLength": 4}}, "required": ["a"]},
    {"type": "object", "properties": {"a": {"type": "string", "minLength": 2}, "b": {"type": "integer"}},
     "required": ["a", "b"]}]}
SCHEMAS = {"person": PERSON, "enums": ENUMS, "list": LIST, "choice": CHOICE, "numbers": NUMBERS, "tree": TREE,
           "union": UNION, "object": None}


# ---- helpers --------------------------------------------------------------------------------


def feed(text: str | bytes, schema: dict | None = None, max_whitespace: int = 20) -> JsonConstraint | None:
    """The constraint after ``text`` byte by byte, or None if a byte was refused."""
    constraint = JsonConstraint(BYTES, schema, stop_ids=[EOS], max_whitespace=max_whitespace)
    try:
        for byte in text.encode() if isinstance(text, str) else text:
            constraint.advance(byte)
    except ValueError:
        return None
    return constraint


def accepts(text: str | bytes, schema: dict | None = None, max_whitespace: int = 20) -> bool:
    constraint = feed(text, schema, max_whitespace)
    return constraint is not None and constraint.done


def validate(value, schema, root=None, path="$") -> None:
    """Assert that ``value`` matches ``schema`` (the subset lmforge supports; oneOf as anyOf)."""
    root = schema if root is None else root
    if schema is True or schema is None:
        return
    if "$ref" in schema:
        target = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            target = target[part] if part else target
        return validate(value, target, root, path)
    for key in ("anyOf", "oneOf"):
        if key in schema:
            errors = []
            for option in schema[key]:
                try:
                    return validate(value, option, root, path)
                except AssertionError as err:
                    errors.append(str(err))
            raise AssertionError(f"{path}: no alternative matches: {errors}")
    if "enum" in schema or "const" in schema:
        options = schema.get("enum", [schema.get("const")])
        assert json.dumps(value) in [json.dumps(o) for o in options], f"{path}: {value!r} not in {options}"
    if "type" in schema:
        kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        kind = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object",
                type(None): "null"}[type(value)]
        assert kind in kinds or (kind == "integer" and "number" in kinds), f"{path}: {value!r} is not {kinds}"
    if isinstance(value, dict) and "properties" in schema:
        assert set(value) <= set(schema["properties"]), f"{path}: extra keys {set(value)}"
        assert set(schema.get("required", [])) <= set(value), f"{path}: missing keys in {value}"
        for key, item in value.items():
            validate(item, schema["properties"][key], root, f"{path}.{key}")
    if isinstance(value, list):
        assert schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", 1 << 30), f"{path}: length"
        for i, item in enumerate(value):
            validate(item, schema.get("items", True), root, f"{path}[{i}]")
    if isinstance(value, str):
        assert schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", 1 << 30), f"{path}: length"


def strict_json(data: bytes):
    """json.loads that refuses what JSON refuses: NaN/Infinity, invalid UTF-8, lone surrogates."""
    value = json.loads(data.decode("utf-8"), parse_constant=lambda name: 1 / 0)
    json.dumps(value, ensure_ascii=False).encode("utf-8")  # raises on a lone surrogate
    return value


@pytest.fixture(scope="module")
def bpe_tokenizer():
    people = [{"name": name, "age": i, "city": city, "tags": ["a", "b"], "ok": i % 2 == 0, "x": None}
              for i, (name, city) in enumerate(zip(["Ann", "Bob", "Chloé", "Dmitri"] * 5, ["Paris", "Oslo"] * 10))]
    texts = [json.dumps(people, indent=2), json.dumps(people), *list(topics.values())[:20]]
    return train_tokenizer(texts, vocab_size=600, progress=False)


def sample_documents(model, vocab, schema, seeds, max_new_tokens, bos, stop_ids) -> list[str]:
    """Sample one document per seed at temperature 1 under the mask (rows decode together with a KV cache)."""
    rows = len(seeds)
    constraints = [JsonConstraint(vocab, schema, stop_ids) for _ in seeds]
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    outputs: list[list[int]] = [[] for _ in seeds]
    finished = [False] * rows
    cache = KVCache.for_model(model, rows, 1 + max_new_tokens)
    tokens = torch.full((rows, 1), bos)
    with torch.inference_mode():
        for step in range(max_new_tokens):
            logits = model(tokens, cache)[:, -1].float()  # (B, V)
            for row, constraint in enumerate(constraints):
                if finished[row]:
                    continue
                scores = logits[row].masked_fill(~constraint.allowed(max_new_tokens - step), float("-inf"))
                token = int(torch.multinomial(torch.softmax(scores, -1), 1, generator=generators[row]))
                tokens[row, 0] = token
                if token in stop_ids:
                    finished[row] = True
                else:
                    constraint.advance(token)
                    outputs[row].append(token)
            if all(finished):
                break
    return [b"".join(vocab[t] for t in out).decode("utf-8") for out in outputs]


# ---- the automaton on bytes -----------------------------------------------------------------

VALID_OBJECTS = [
    '{}', ' {"a": 1}', '{"a":{"b":[1,-2.5e-3,0,-0,1E+9,0.0,true,false,null,"",[],{}]}}',
    '{"s": "tab\\t quote\\" slash\\/ \\\\ \\u00e9 \\ud83d\\ude00 é 日本 😀"}', '{"a":1,"a":2}',
    '{\n  "a" : [ 1 , 2 ] ,\r\n\t"b" : { }\n}', '{"\\"k\\"": "\\u0000"}',
]
INVALID_OBJECTS = [
    '[]', '"x"', '1', '{"a":01}', '{"a":1,}', '{"a":.5}', '{"a":1.}', '{"a":-}', '{"a":+1}', '{"a":1e}',
    '{"a":"\\x"}', '{"a":"\\ud800"}', '{"a":"\\udc00"}', '{"a":"\\ud800\\u0041"}', '{"a":"\n"}', '{a:1}',
    "{'a':1}", '{"a":1}}', '{"a":1} ', '{"a":tru}', '{"a":NaN}', '{"a":1', '{"a" 1}', '{,}', '{"a":[1,]}',
    '{"a":"\\u12"}', b'{"a":"\xc0\x80"}', b'{"a":"\xed\xa0\x80"}', b'{"a":"\xf4\x90\x80\x80"}', b'{"a":"\x80"}',
    b'{"a":"\xe6\x97"}',
]


@pytest.mark.parametrize("text", VALID_OBJECTS)
def test_valid_objects_are_accepted(text):
    assert accepts(text), text


@pytest.mark.parametrize("text", INVALID_OBJECTS)
def test_invalid_objects_are_refused(text):
    assert not accepts(text), text


def random_value(rng: random.Random, depth: int = 0):
    choice = rng.randrange(7 if depth < 3 else 4)
    if choice == 0:
        return rng.choice([0, -7, 12345, 3.25, -1e-7, 6.02e23])
    if choice == 1:
        return "".join(rng.choice('ab"\\/\n\té😀日') for _ in range(rng.randrange(5)))
    if choice == 2:
        return rng.choice([True, False, None])
    if choice == 3:
        return ""
    if choice == 4:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(3))]
    return {f"k{i}": random_value(rng, depth + 1) for i in range(rng.randrange(3))}


def test_automaton_agrees_with_json_loads_on_mutated_documents():
    """Whole documents are accepted exactly when Python's json parses them into an object."""
    rng = random.Random(0)
    for _ in range(400):
        value = {"root": random_value(rng), "x": random_value(rng)}
        text = json.dumps(value, indent=rng.choice([None, 1]), ensure_ascii=rng.random() < 0.5).encode()
        position = rng.randrange(len(text))
        edit = rng.choice(["delete", "insert", "replace", "none"])
        byte = bytes([rng.choice(b'{}[]":,\\ 0-.eE1tfnu\xc3\xa9\x80')])
        if edit == "delete":
            text = text[:position] + text[position + 1:]
        elif edit == "insert":
            text = text[:position] + byte + text[position:]
        elif edit == "replace":
            text = text[:position] + byte + text[position + 1:]
        try:
            expected = isinstance(strict_json(text), dict) and not text[-1:].isspace()
        except (ValueError, ZeroDivisionError, UnicodeError):
            expected = False
        assert accepts(text, max_whitespace=100) == expected, text


def test_whitespace_runs_are_bounded():
    assert accepts('{' + ' ' * 3 + '"a"' + '\n' * 3 + ':' + '\t' * 3 + '1' + ' ' * 3 + '}', max_whitespace=3)
    assert not accepts('{    "a":1}', max_whitespace=3)
    assert not accepts('{"a": 1}', max_whitespace=0)
    assert accepts('{"a":"  many   spaces in a string    "}', max_whitespace=0)
    constraint = feed('{   ', max_whitespace=3)
    assert not constraint.allowed()[ord(" ")] and constraint.allowed()[ord('"')]


# ---- schemas --------------------------------------------------------------------------------


@pytest.mark.parametrize(("schema", "good", "bad"), [
    (PERSON, ['{"name":"Ann","address":{"city":"Oslo"}}', '{"name":"é😀","age":-3,"address":{"city":"","zip":"1"},'
              '"active":true}'],
     ['{"address":{"city":"Oslo"},"name":"Ann"}', '{"name":"","address":{"city":"x"}}', '{"name":"Ann"}',
      '{"name":"Ann","address":{"city":"Oslo"},"extra":1}', '{"name":"123456789","address":{"city":""}}',
      '{"name":"A","age":1.5,"address":{"city":""}}', '{"name":"A","address":{"city":"","zip":null}}']),
    (ENUMS, ['{"color":"red","size":"XL"}', '{"color":1,"size":"XL"}', '{"color":12,"size":"XL"}',
             '{"color":null,"size":"XL"}', '{"color":true,"size":"XL"}', '{"color":"é","size":"XL"}'],
     ['{"color":"pink","size":"XL"}', '{"color":123,"size":"XL"}', '{"color":false,"size":"XL"}',
      '{"color":"red","size":"L"}', '{"color": "\\u0072ed","size":"XL"}']),
    (LIST, ['[1,2]', '[ 1 , -2 , 3 , 4 ]'], ['[]', '[1]', '[1,2,3,4,5]', '[1,2.0]', '{}']),
    (CHOICE, ['{"value":1.5}', '{"value":"abc"}', '{"value":null}', '{"value":[true,false]}', '{"value":[]}'],
     ['{"value":"abcd"}', '{"value":[true,false,true]}', '{"value":{}}', '{"value":true}']),
    (TREE, ['{"v":1}', '{"v":1,"kids":[{"v":2,"kids":[]},{"v":3,"kids":[{"v":4}]}]}'],
     ['{"v":1,"kids":[{}]}', '{"kids":[]}', '{"v":1,"kids":[{"v":1},{"v":2},{"v":3}]}']),
    ({"type": "string", "minLength": 2, "maxLength": 3}, ['"ab"', '"\\n\\u00e9😀"', '"日本"'], ['"a"', '"abcd"']),
    ({"type": "object", "additionalProperties": {"type": "integer"}}, ['{}', '{"a":1,"b":2}'], ['{"a":"x"}']),
    ({"type": "object", "additionalProperties": False}, ['{}'], ['{"a":1}']),
    ({"type": ["integer", "boolean"]}, ['12', 'true'], ['1.5', 'null', '"1"']),
])
def test_schema_documents(schema, good, bad):
    for text in good:
        assert accepts(text, schema), text
        validate(json.loads(text), schema)
    for text in bad:
        assert not accepts(text, schema), text


def test_a_root_number_is_complete_and_may_still_grow():
    constraint = feed("12", {"type": "integer"})
    assert constraint.done
    mask = constraint.allowed()
    assert mask[EOS] and mask[ord("3")] and not mask[ord(".")] and not mask[ord(" ")]


def test_min_remaining_is_the_shortest_document():
    shortest = {"person": '{"name":"x","address":{"city":""}}', "enums": '{"color":1,"size":"XL"}', "list": "[0,0]",
                "choice": '{"value":0}', "numbers": '{"i":0,"x":0,"n":0}', "tree": '{"v":0}', "union": '{"a":""}',
                "object": "{}"}
    for name, schema in SCHEMAS.items():
        assert JsonConstraint(BYTES, schema).min_remaining == len(shortest[name]), name
    constraint = feed('{"name":"ab', PERSON)
    assert constraint.min_remaining == len('","address":{"city":""}}')


@pytest.mark.parametrize(("schema", "word"), [
    ({"type": "string", "pattern": "a+"}, "pattern"), ({"type": "string", "format": "date"}, "format"),
    ({"type": "integer", "minimum": 0}, "minimum"), ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"allOf": [{"type": "string"}, {"maxLength": 2}]}, "allOf"), ({"not": {"type": "string"}}, "not"),
    ({"$ref": "http://example.com/s.json"}, "local"), ({"$ref": "#/$defs/missing"}, "points to nothing"),
    ({"type": "array", "items": [{"type": "string"}]}, "list-form"), ({"type": "date"}, "unknown type"),
    ({"type": "object", "required": ["a"]}, "not in 'properties'"), ({"enum": [1], "maxLength": 2}, "enum"),
    ({"type": "string", "enum": [1, 2]}, "no 'enum'"), ({"type": "string", "anyOf": [{}]}, "together"),
    ({"type": "string", "maxLength": -1}, "non-negative"), ({"type": "array", "minItems": 2, "maxItems": 1}, "no finite"),
    ({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}, "refers back"),
    ({"$defs": {"n": {"type": "object", "properties": {"n": {"$ref": "#/$defs/n"}}, "required": ["n"]}},
      "$ref": "#/$defs/n"}, "no finite"),
])
def test_unsupported_or_impossible_schemas_raise_input_error(schema, word):
    with pytest.raises(InputError, match=word):
        JsonConstraint(BYTES, schema)


def test_advance_refuses_what_allowed_forbids():
    constraint = JsonConstraint(BYTES, PERSON, stop_ids=[EOS])
    assert not constraint.allowed()[ord("[")]
    with pytest.raises(ValueError, match="does not continue"):
        constraint.advance(ord("["))
    with pytest.raises(ValueError, match="no bytes"):
        constraint.advance(BOS)
    with pytest.raises(ValueError, match="before the JSON document is complete"):
        constraint.advance(EOS)
    for byte in b'{"name":"A","address":{"city":""}}':
        assert constraint.allowed()[byte] and not constraint.allowed()[EOS]
        constraint.advance(byte)
    assert constraint.done and constraint.allowed().nonzero().flatten().tolist() == [EOS]
    with pytest.raises(ValueError):
        constraint.advance(ord(" "))
    constraint.advance(EOS)  # a stop token after a complete document is fine


# ---- masks against a token-by-token reference ----------------------------------------------


@pytest.mark.parametrize("name", ["person", "choice", "union", "object", "tree"])
def test_mask_matches_advancing_each_token(name, bpe_tokenizer):
    """allowed(remaining) == {t: advance(t) succeeds and the rest fits in remaining - 1} along random walks."""
    vocab = token_bytes(bpe_tokenizer)
    schema, stop = SCHEMAS[name], bpe_tokenizer.eos_id
    rng = random.Random(1)
    for _ in range(3):
        history: list[int] = []
        constraint = JsonConstraint(vocab, schema, [stop])
        for remaining in range(constraint.min_remaining + 12, 0, -1):
            mask = constraint.allowed(remaining)
            expected = torch.zeros_like(mask)
            for token in range(len(vocab)):
                after = constraint.copy()
                try:
                    after.advance(token)
                except ValueError:
                    continue
                expected[token] = token == stop or after.min_remaining <= remaining - 1
            assert torch.equal(mask, expected), (name, b"".join(vocab[t] for t in history))
            choices = mask.nonzero().flatten().tolist()
            token = rng.choice(choices)
            if token == stop:
                break
            constraint.advance(token)
            history.append(token)
        assert constraint.done


# ---- sampling from a model under the mask ---------------------------------------------------


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_sampled_documents_always_parse_and_validate(name, make_model, bpe_tokenizer):
    schema = SCHEMAS[name]
    vocab = token_bytes(bpe_tokenizer)
    for vocabulary, bos, eos in ((BYTES, BOS, EOS), (vocab, bpe_tokenizer.bos_id, bpe_tokenizer.eos_id)):
        model = make_model(vocab_size=len(vocabulary))
        for text in sample_documents(model, vocabulary, schema, range(8), 64, bos, [eos]):
            validate(strict_json(text.encode()), schema if schema is not None else {"type": "object"})


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_the_tightest_budget_still_ends_in_a_complete_document(name, make_model):
    schema = SCHEMAS[name]
    budget = JsonConstraint(BYTES, schema).min_remaining  # one byte per token: exactly the shortest document
    model = make_model(vocab_size=len(BYTES), seed=1)
    for text in sample_documents(model, BYTES, schema, range(8), budget, BOS, [EOS]):
        assert len(text.encode()) == budget
        validate(strict_json(text.encode()), schema if schema is not None else {"type": "object"})


# ---- token bytes ----------------------------------------------------------------------------


def test_token_bytes_of_each_tokenizer_kind(byte_tokenizer, bpe_tokenizer):
    never_in_utf8 = {0xC0, 0xC1, *range(0xF5, 0x100)}
    expected = [None if i in never_in_utf8 else piece for i, piece in enumerate(BYTES)]
    assert token_bytes(byte_tokenizer, vocab_size=258) == expected  # via decode, and a probe for bytes >= 0x80
    ours = token_bytes(bpe_tokenizer, vocab_size=bpe_tokenizer.vocab_size + 3)
    assert ours[:8] == [None] * 8 and ours[-3:] == [None] * 3
    text = '{"name": "Chloé", "tags": ["日本", 12]}'
    assert b"".join(ours[i] for i in bpe_tokenizer.encode(text)) == text.encode()

    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer, hf.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False,
                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator([text * 5], trainer=trainer)
    pretrained = PretrainedTokenizer(hf, {"eos_token": "</s>"})
    pieces = token_bytes(pretrained)
    assert pieces[hf.token_to_id("<s>")] is None and pieces[pretrained.eos_id] is None
    assert b"".join(pieces[i] for i in pretrained.encode(text)) == text.encode()

    vocab = {f"<0x{b:02X}>": b for b in range(256)} | {"\u2581": 256, "a": 257, "\u2581a": 258}
    spm = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    spm.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    pieces = token_bytes(PretrainedTokenizer(spm))
    assert pieces[0x41] == b"A" and pieces[256] == b" " and pieces[258] == b" a"
