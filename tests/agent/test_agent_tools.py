"""Tools for agents: schemas from signatures, argument checks, calls that never crash, the built-in tools."""

from __future__ import annotations

import enum
import json
import math
import os
import random
import time
from typing import Literal, Optional

import numpy as np
import pytest

from lmforge.agent.builtin import (
    BUILTIN_TOOLS,
    builtin_tools,
    calculator,
    file_tools,
    now,
    python_tool,
    search_tool,
)
from lmforge.agent.tools import Tool, Toolbox, ToolError, ToolResult, load_tools, tool, validate_arguments
from lmforge.errors import InputError


class Unit(enum.Enum):
    CELSIUS = "celsius"
    FAHRENHEIT = "fahrenheit"


def everything(text: str, count: int, ratio: float, flag: bool, numbers: list[int], scores: dict[str, float],
               mode: Literal["fast", "slow"], unit: Unit, limit: int | None, tags: Optional[list[str]] = None,  # noqa: UP045
               k: int = 3, unit2: Unit = Unit.CELSIUS) -> dict:
    """Use every kind of parameter.

    Only the first paragraph describes the tool.

    Args:
        text: some text.
        count (int): how many,
            on two lines.
        unit: the unit.

    Returns:
        what it was given.
    """
    return {"text": text, "count": count, "unit": unit, "limit": limit, "tags": tags, "k": k, "unit2": unit2}


# ---------------------------------------------------------------------------------------------------------
# Schemas


def test_schema_of_every_supported_type():
    made = tool(everything)
    assert made.schema() == {"type": "function", "function": {
        "name": "everything",
        "description": "Use every kind of parameter.",
        "parameters": {
            "type": "object",
            "properties": {
                "text": {"type": "string", "description": "some text."},
                "count": {"type": "integer", "description": "how many, on two lines."},
                "ratio": {"type": "number"},
                "flag": {"type": "boolean"},
                "numbers": {"type": "array", "items": {"type": "integer"}},
                "scores": {"type": "object", "additionalProperties": {"type": "number"}},
                "mode": {"type": "string", "enum": ["fast", "slow"]},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "the unit."},
                "limit": {"type": ["integer", "null"]},
                "tags": {"type": ["array", "null"], "items": {"type": "string"}},
                "k": {"type": "integer", "default": 3},
                "unit2": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
            },
            "required": ["text", "count", "ratio", "flag", "numbers", "scores", "mode", "unit"],
            "additionalProperties": False,
        }}}


def test_decorator_forms_and_what_the_function_receives():
    @tool
    def plain(x: int) -> int:
        """Double x."""
        return 2 * x

    @tool(name="renamed", description="Told here.", timeout=2.0)
    def other(x: int) -> int:
        return x

    assert isinstance(plain, Tool) and plain.name == "plain" and plain.description == "Double x."
    assert plain(x=4) == 8
    assert (other.name, other.description, other.timeout) == ("renamed", "Told here.", 2.0)
    assert tool(lambda: 1, name="constant").parameters["required"] == []
    # enum values arrive as members; a left-out X | None parameter arrives as None
    result = Toolbox([tool(everything)]).call("everything", {
        "text": "t", "count": 1, "ratio": 0.5, "flag": True, "numbers": [], "scores": {}, "mode": "fast",
        "unit": "fahrenheit"})
    assert result.ok and json.loads(result.content) == {
        "text": "t", "count": 1, "unit": "Unit.FAHRENHEIT", "limit": None, "tags": None, "k": 3,
        "unit2": "Unit.CELSIUS"}


def test_unsupported_parameters_raise_type_error_naming_them():
    def no_annotation(x):
        return x

    def a_set(items: set[int]):
        return items

    def a_union(x: int | str):
        return x

    def star_args(*numbers: int):
        return numbers

    def int_keys(table: dict[int, str]):
        return table

    for function, parameter in [(no_annotation, "x"), (a_set, "items"), (a_union, "x"), (star_args, "numbers"),
                                (int_keys, "table")]:
        with pytest.raises(TypeError, match=rf"{function.__name__}.*'{parameter}'"):
            tool(function)
    with pytest.raises(ValueError, match="tool name"):
        tool(lambda: 1, name="has spaces")


# ---------------------------------------------------------------------------------------------------------
# Validation

SCHEMA = tool(everything).parameters
GOOD = {"text": "t", "count": 1, "ratio": 0.5, "flag": True, "numbers": [1, 2], "scores": {"a": 1.5},
        "mode": "fast", "unit": "celsius"}


@pytest.mark.parametrize("change, message", [
    ({"text": None}, "argument 'text': expected a string, got null"),
    ({"count": "three"}, "argument 'count': expected an integer, got 'three'"),
    ({"count": True}, "argument 'count': expected an integer, got true"),
    ({"count": 2.5}, "argument 'count': expected an integer, got 2.5"),
    ({"ratio": "1"}, "argument 'ratio': expected a number, got '1'"),
    ({"flag": 1}, "argument 'flag': expected a boolean (true or false), got 1"),
    ({"numbers": [1, "x"]}, "argument 'numbers[1]': expected an integer, got 'x'"),
    ({"numbers": 5}, "argument 'numbers': expected a list, got 5"),
    ({"scores": {"a": "high"}}, "argument 'scores.a': expected a number, got 'high'"),
    ({"mode": "medium"}, 'argument \'mode\': expected one of "fast", "slow", got \'medium\''),
    ({"limit": "ten"}, "argument 'limit': expected an integer or null, got 'ten'"),
    ({"tags": [1]}, "argument 'tags[0]': expected a string, got 1"),
    ({"extra": 1}, "unknown argument 'extra'; the arguments are: 'text', 'count'"),
])
def test_validation_names_the_field_and_what_was_expected(change, message):
    with pytest.raises(ToolError) as raised:
        validate_arguments(SCHEMA, {**GOOD, **change})
    assert str(raised.value).startswith(message)


def test_validation_accepts_good_arguments_and_integral_floats():
    checked = validate_arguments(SCHEMA, {**GOOD, "count": 3.0, "numbers": [1.0, 2], "limit": None, "k": 4})
    assert checked["count"] == 3 and type(checked["count"]) is int
    assert [type(n) for n in checked["numbers"]] == [int, int]
    assert "unit2" not in checked  # defaults are left to Python
    with pytest.raises(ToolError, match=r"missing required arguments 'mode' \(one of \"fast\", \"slow\"\), "
                                        r"'unit'"):
        validate_arguments(SCHEMA, {k: v for k, v in GOOD.items() if k not in ("mode", "unit")})
    with pytest.raises(ToolError, match="must be a JSON object"):
        validate_arguments(SCHEMA, [1, 2])


# ---------------------------------------------------------------------------------------------------------
# Toolbox.call


@tool
def add(a: int, b: int = 1) -> int:
    """Add two integers."""
    return a + b


@tool
def refuse(reason: str) -> str:
    """Always refuses."""
    raise ToolError(f"cannot do that: {reason}")


@tool
def crash() -> str:
    """Always crashes."""
    return {}["missing"]


@tool(timeout=0.2)
def hang() -> str:
    """Never finishes in time."""
    time.sleep(5)
    return "late"


@tool
def chatty(n: int) -> str:
    """Says a lot."""
    return "x" * n


@pytest.fixture
def toolbox():
    return Toolbox([add, refuse, crash, hang, chatty], max_output=100)


def test_toolbox_lists_its_tools(toolbox):
    assert toolbox.names == ["add", "refuse", "crash", "hang", "chatty"] and len(toolbox) == 5
    assert "add" in toolbox and "nope" not in toolbox and [t.name for t in toolbox] == toolbox.names
    assert toolbox.schemas()[0] == add.schema()
    with pytest.raises(ValueError, match="'add'"):
        Toolbox([add, add])


def test_call_success_with_text_or_dict_arguments(toolbox):
    result = toolbox.call("add", '{"a": 2, "b": 3}')
    assert (result.ok, result.content, result.error, result.arguments) == (True, "5", None, {"a": 2, "b": 3})
    assert toolbox.call("add", {"a": 2}).content == "3"
    assert isinstance(result, ToolResult) and result.seconds >= 0 and not result.truncated


def test_call_failures_are_results_the_model_can_read(toolbox):
    unknown = toolbox.call("multiply", "{}")
    assert (unknown.ok, unknown.error) == (False, "unknown_tool")
    assert "multiply" in unknown.content and "add, refuse, crash, hang, chatty" in unknown.content

    bad_json = toolbox.call("add", '{"a": 2,')
    assert (bad_json.error, bad_json.arguments) == ("bad_arguments", None)
    assert "not valid JSON" in bad_json.content and "line 1 column" in bad_json.content

    bad = toolbox.call("add", '{"a": "two"}')
    assert bad.error == "bad_arguments" and bad.arguments == {"a": "two"}
    assert bad.content == "error: argument 'a': expected an integer, got 'two'. Usage: add(a: integer, b?: integer)"
    assert toolbox.call("add", "[1, 2]").error == "bad_arguments"

    refused = toolbox.call("refuse", {"reason": "too hard"})
    assert (refused.error, refused.content) == ("tool_error", "error: cannot do that: too hard")

    crashed = toolbox.call("crash", None)
    assert (crashed.error, crashed.content) == ("exception", "error: KeyError: 'missing'")
    long_refusal = toolbox.call("refuse", {"reason": "r" * 500})  # a tool's own message is cut too
    assert long_refusal.truncated and long_refusal.content.endswith("[output cut: 423 more characters left out]")


def test_a_hanging_tool_times_out(toolbox):
    start = time.perf_counter()
    result = toolbox.call("hang", {})
    assert time.perf_counter() - start < 1.0
    assert (result.ok, result.error) == (False, "timeout") and "0.2 s" in result.content


def test_long_output_is_cut_with_a_note(toolbox):
    result = toolbox.call("chatty", {"n": 250})
    assert result.ok and result.truncated
    assert result.content == "x" * 100 + "\n[output cut: 150 more characters left out]"
    assert not toolbox.call("chatty", {"n": 100}).truncated


# ---------------------------------------------------------------------------------------------------------
# Calculator


def random_expression(rng: random.Random, depth: int) -> str:
    """An arithmetic expression string of small numbers, all binary operators, unary minus, parentheses."""
    if depth == 0 or rng.random() < 0.25:
        return str(rng.randint(0, 12)) if rng.random() < 0.7 else str(round(rng.uniform(0, 10), 2))
    roll = rng.random()
    if roll < 0.1:
        return f"-({random_expression(rng, depth - 1)})"
    if roll < 0.2:
        return f"({random_expression(rng, depth - 1)})**{rng.randint(0, 3)}"
    op = rng.choice(["+", "-", "*", "/", "//", "%"])
    return f"({random_expression(rng, depth - 1)}) {op} ({random_expression(rng, depth - 1)})"


def test_calculator_agrees_with_python_arithmetic():
    rng = random.Random(0)
    checked = refused = 0
    for _ in range(600):
        expression = random_expression(rng, 4)
        try:
            expected = eval(expression)  # the reference, in the test only
        except ZeroDivisionError:
            with pytest.raises(ToolError, match="division by zero|not defined"):
                calculator(expression)
            refused += 1
            continue
        text = calculator(expression)
        got = float(text) if any(c in text for c in ".en") else int(text)
        if isinstance(expected, int):
            assert got == expected and isinstance(got, int), expression
        else:
            assert math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-9), expression
        checked += 1
    assert checked > 400 and refused > 0


def test_calculator_functions_and_exact_integers():
    assert calculator("12*(3+4)") == "84"
    assert calculator("2**200") == str(2**200)
    assert calculator("factorial(30) // factorial(28)") == "870"
    assert calculator("10**30 / 10**10") == str(10**20)  # exact, not 1e+20
    assert calculator("(10**20 + 1) - 10**20") == "1"
    assert calculator("factorial(1000)") == str(math.factorial(1000))
    assert calculator("7 / 2") == "3.5" and calculator("sqrt(16)") == "4" and calculator("0.1 + 0.2") == "0.30000000000000004"
    assert calculator("sqrt(2)") == repr(math.sqrt(2))
    assert calculator("log(8, 2)") == "3" and calculator("log10(1000)") == "3" and calculator("log(e)") == "1"
    assert calculator("round(2.567, 2)") == "2.57" and calculator("round(2.5)") == "2"
    assert calculator("max(3, -1, 7.5) + min(4, 2)") == "9.5"
    assert calculator("gcd(12, 18) + abs(-3) + floor(2.7) + ceil(2.1)") == "14"
    assert calculator("sin(pi/2) + cos(0) + tan(0) + asin(1)*2/pi + exp(0)") == "4"
    assert calculator("-2**2") == "-4" and calculator("1_000 * 3") == "3000"
    assert calculator("+".join(["1"] * 400)) == "400"  # a long chain is not deep nesting


@pytest.mark.parametrize("expression, message", [
    ("__import__('os')", "unknown function '__import__'"),
    ("(1).__class__", "attribute access"),
    ("2**10**10", "more than 4000 digits"),
    ("factorial(1000) * factorial(1000)", "more than 4000 digits"),
    ("factorial(1001)", "limited to n <= 1000"),
    ("x + 1", "unknown name 'x'"),
    ("lambda: 1", "lambda is not allowed"),
    ("1/0", "division by zero"),
    ("5 % 0", "division by zero"),
    ("1" * 1001, "the limit is 1000"),
    ("-" * 60 + "1", "nested more than 50 levels"),
    ("2 ^ 3", "use \\*\\* for powers"),
    ("'a' * 3", "only numbers"),
    ("sqrt(-1)", "sqrt\\(-1\\) is not defined"),
    ("(-8) ** 0.5", "not a real number"),
    ("1e308 * 10", "too large"),
    ("2.0 ** 5000", "too large"),
    ("1,000", "without thousands separators"),
    ("sqrt(1, 2)", "sqrt takes 1 argument, got 2"),
    ("2 +", "cannot read"),
    ("", "empty"),
])
def test_calculator_refusals(expression, message):
    with pytest.raises(ToolError, match=message):
        calculator(expression)


def test_calculator_as_a_tool_never_crashes_the_toolbox():
    box = Toolbox(builtin_tools(["calculator"]))
    assert box.call("calculator", {"expression": "6*7"}).content == "42"
    result = box.call("calculator", {"expression": "open('x')"})
    assert result.error == "tool_error" and "unknown function 'open'" in result.content


# ---------------------------------------------------------------------------------------------------------
# Date and time


def test_now_in_a_time_zone():
    import re
    from datetime import datetime

    text = now("Asia/Tokyo")
    match = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+09:00) \((\w+day), Asia/Tokyo\)", text)
    assert match, text
    moment = datetime.fromisoformat(match.group(1))
    assert moment.strftime("%A") == match.group(2)
    assert abs(moment.timestamp() - time.time()) < 5
    utc = now()
    assert "+00:00 (" in utc and utc.endswith(", UTC)")
    for bad in ("Mars/Olympus", "../../etc/passwd", ""):
        with pytest.raises(ToolError, match="unknown time zone"):
            now(bad)


# ---------------------------------------------------------------------------------------------------------
# Files


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "root"
    (root / "notes").mkdir(parents=True)
    (root / "notes" / "todo.md").write_text("".join(f"line {i}\n" for i in range(1, 301)), encoding="utf-8")
    (root / "a.txt").write_text("alpha\nbeta\n", encoding="utf-8")
    (root / "image.bin").write_bytes(b"\x89PNG\x00\x01\x02")
    (tmp_path / "secret.txt").write_text("do not read", encoding="utf-8")
    os.symlink(tmp_path / "secret.txt", root / "escape.txt")
    os.symlink(root / "a.txt", root / "alias.txt")
    return root


def test_read_file_shows_numbered_lines(folder):
    read_file, list_files = file_tools(folder)
    assert read_file(path="a.txt") == "1: alpha\n2: beta"
    assert read_file(path="alias.txt") == "1: alpha\n2: beta"  # a symlink that stays inside is fine
    page = read_file(path="notes/todo.md", start_line=199, max_lines=3)
    assert page == "199: line 199\n200: line 200\n201: line 201\n[lines 199-201 of 300; read_file with start_line=202 for more]"
    assert read_file(path=str(folder / "notes/../a.txt")).startswith("1: alpha")  # absolute, inside
    assert list_files() == "a.txt\nalias.txt\nescape.txt\nimage.bin\nnotes/"
    assert list_files(path="notes") == "notes/todo.md"


def test_file_tools_refuse_everything_outside_their_folder(folder):
    read_file, list_files = file_tools(folder)
    outside = [str(folder.parent / "secret.txt"), "../secret.txt", "notes/../../secret.txt", "escape.txt", "/etc/passwd"]
    for path in outside:
        with pytest.raises(ToolError, match="outside the allowed folder"):
            read_file(path=path)
    for path in ("..", "/", "notes/../.."):
        with pytest.raises(ToolError, match="outside the allowed folder"):
            list_files(path=path)
    with pytest.raises(ToolError, match="binary"):
        read_file(path="image.bin")
    with pytest.raises(ToolError, match="no file"):
        read_file(path="missing.txt")
    with pytest.raises(ToolError, match="is a folder"):
        read_file(path="notes")
    with pytest.raises(ToolError, match="has only 2 lines"):
        read_file(path="a.txt", start_line=5)
    box = Toolbox(file_tools(folder))
    result = box.call("read_file", {"path": "../secret.txt"})
    assert result.error == "tool_error" and "do not read" not in result.content


# ---------------------------------------------------------------------------------------------------------
# Knowledge-base search


@pytest.fixture
def knowledge_base(tmp_path):
    """A tiny knowledge base with BM25 only (its vectors are zeros: no encoder is needed)."""
    from lmforge.rag.chunk import Chunk
    from lmforge.rag.store import write_knowledge_base

    texts = {"kettle.md": ("Kettles", "A kettle boils water for tea in about three minutes."),
             "rust.md": ("Rust", "Rust has no garbage collector; ownership frees memory."),
             "paris.md": ("Geography", "Paris is the capital of France, on the river Seine.")}
    chunks = [(file, Chunk(id=file, source=file, title=title, start=0, end=len(text), text=text,
                           tokens=len(text.split())))
              for file, (title, text) in texts.items()]
    path = tmp_path / "kb"
    write_knowledge_base(path, {"encoder": "none"}, {file: "0" for file in texts}, chunks, np.zeros((3, 4)))
    return path


def test_search_finds_the_right_document(knowledge_base):
    from lmforge.rag import KnowledgeBase, Retriever

    search = search_tool(Retriever(KnowledgeBase(knowledge_base)), method="bm25")
    assert search.parameters["properties"]["k"]["default"] == 3
    text = search(query="capital of France")
    assert text.startswith("[1] Geography (paris.md)\nParis is the capital of France")
    assert "Kettles" not in text  # no shared word: not a hit
    assert search(query="kettle tea", k=1) == "[1] Kettles (kettle.md)\nA kettle boils water for tea in about three minutes."
    assert "no passages found" in search(query="zzzz")
    box = Toolbox([search_tool(knowledge_base, method="bm25")])  # a path works too
    assert "Rust" in box.call("search", {"query": "garbage collector"}).content
    assert box.call("search", {"query": "tea", "k": 50}).error == "tool_error"


# ---------------------------------------------------------------------------------------------------------
# Python


def test_python_tool_runs_code_in_the_sandbox():
    pytest.importorskip("lmforge.agent.sandbox")
    box = Toolbox([python_tool(timeout=5.0)])
    result = box.call("python", {"code": "print(6 * 7)"})
    assert result.ok and "42" in result.content
    failed = box.call("python", {"code": "1/0"})
    assert failed.ok and "ZeroDivisionError" in failed.content  # the model reads the traceback


def test_python_tool_passes_its_limits_and_reports_a_timeout(monkeypatch):
    """The tool's own logic, with a stand-in sandbox that records its call."""
    import sys
    import types

    calls = []

    class Result:
        ok, stdout, stderr, timed_out = False, "", "", True

        def summary(self):
            return "no output"

    def run_python(code, **limits):
        calls.append((code, limits))
        return Result()

    monkeypatch.setitem(sys.modules, "lmforge.agent.sandbox", types.SimpleNamespace(run_python=run_python))
    made = python_tool(folder="work", timeout=3.0, memory_mb=256)
    assert made.timeout > 3.0  # the sandbox stops the code first; the toolbox's timeout is a backstop
    result = Toolbox([made]).call("python", {"code": "while True: pass"})
    assert result.ok and result.content == "no output\n(stopped: the code ran past the 3 s time limit)"
    assert calls == [("while True: pass", {"timeout": 3.0, "cpu_seconds": 3, "memory_mb": 256, "folder": "work"})]


# ---------------------------------------------------------------------------------------------------------
# Built-in tools by name


def test_builtin_tools_by_name(folder, knowledge_base):
    tools = builtin_tools(["now", "calculator", "list_files"], root=folder)
    assert [t.name for t in tools] == ["now", "calculator", "list_files"]
    assert [t.name for t in builtin_tools("calculator, now")] == ["calculator", "now"]
    everything_named = builtin_tools(BUILTIN_TOOLS, root=folder, retriever=knowledge_base)
    assert [t.name for t in everything_named] == list(BUILTIN_TOOLS)
    assert all(len(t.description) < 120 for t in everything_named)  # short enough for a small model
    with pytest.raises(InputError, match="unknown built-in tool 'web'; choose from calculator, python"):
        builtin_tools(["calculator", "web"])
    with pytest.raises(InputError, match="need a folder"):
        builtin_tools(["read_file"])
    with pytest.raises(InputError, match="needs a knowledge base"):
        builtin_tools(["search"])
    with pytest.raises(InputError, match="not a folder"):
        builtin_tools(["list_files"], root=folder / "a.txt")


# ---------------------------------------------------------------------------------------------------------
# User tools

USER_TOOLS = '''
from lmforge.agent.tools import tool


@tool
def shout(text: str) -> str:
    """Say it loudly."""
    return text.upper()


@tool
def whisper(text: str) -> str:
    """Say it softly."""
    return text.lower()


def plain(n: int) -> int:
    """Square n."""
    return n * n


NOT_A_FUNCTION = 3
'''


def test_load_tools_from_a_module_and_a_file(tmp_path, monkeypatch):
    (tmp_path / "agent_user_tools_sample.py").write_text(USER_TOOLS, encoding="utf-8")
    (tmp_path / "listed_tools.py").write_text(USER_TOOLS + "\nTOOLS = [plain, shout]\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert [t.name for t in load_tools("agent_user_tools_sample")] == ["shout", "whisper"]
    (square,) = load_tools("agent_user_tools_sample:plain")
    assert isinstance(square, Tool) and square(n=5) == 25 and square.description == "Square n."
    assert [t.name for t in load_tools(str(tmp_path / "listed_tools.py"))] == ["plain", "shout"]
    (shout,) = load_tools(f"{tmp_path / 'listed_tools.py'}:shout")
    assert Toolbox([shout]).call("shout", {"text": "hi"}).content == "HI"


def test_load_tools_errors(tmp_path, monkeypatch):
    (tmp_path / "agent_empty_tools.py").write_text("X = 1\n", encoding="utf-8")
    (tmp_path / "agent_broken_tools.py").write_text("import not_a_module_anywhere\n", encoding="utf-8")
    (tmp_path / "agent_some_tools.py").write_text(USER_TOOLS, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    cases = [("no_such_module_here", "cannot import module 'no_such_module_here'"),
             ("agent_broken_tools", "ModuleNotFoundError"),
             ("agent_empty_tools", "no tools found"),
             ("agent_some_tools:missing", "has no attribute 'missing'"),
             ("agent_some_tools:NOT_A_FUNCTION", "neither a Tool nor a function"),
             (str(tmp_path / "nowhere.py"), "no such file"),
             (str(tmp_path / "agent_broken_tools.py"), "cannot import"),
             (f"{tmp_path / 'agent_some_tools.py'}:missing", "has no attribute 'missing'")]
    for spec, message in cases:
        with pytest.raises(InputError, match=message):
            load_tools(spec)
