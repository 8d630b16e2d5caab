"""Tools an agent can call: typed Python functions, their JSON schemas, and calls that never crash the agent.

    @tool
    def weather(city: str, days: int = 1) -> str:
        \"\"\"The weather forecast for a city.

        Args:
            city: the city's name, such as Paris.
            days: how many days ahead (1-7).
        \"\"\"

    toolbox = Toolbox([weather])
    toolbox.schemas()                                   # OpenAI "tools" entries, for the prompt
    toolbox.call("weather", '{"city": "Paris"}')        # ToolResult(content=..., ok=True, ...)

A tool's JSON schema comes from its signature (types) and docstring (the first paragraph
describes the tool; a Google-style ``Args:`` section describes each parameter).
``Toolbox.call`` turns every way a call can go wrong into a :class:`ToolResult` whose
``content`` tells the model what happened, so it can repair the call: an unknown tool,
arguments that are not JSON or do not fit the schema, a tool that raises, a tool that runs
past its timeout, an output too long for the context.

Left out on purpose: unions other than ``X | None`` (a small model fills ``anyOf`` poorly),
and coercing strings to numbers (``"3"`` for an integer is refused with a message the
model can act on; only ``3.0`` is taken as ``3``, since JSON does not tell the two apart).
"""

from __future__ import annotations

import enum
import functools
import importlib
import importlib.util
import inspect
import json
import re
import sys
import threading
import time
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lmforge.errors import InputError

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # what the OpenAI API accepts as a function name
_SECTION = re.compile(r"^\s*(Args|Arguments|Parameters|Returns|Return|Yields|Raises|Examples?|Notes?)\s*:\s*$")
_ARG_LINE = re.compile(r"^\*{0,2}(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")
_TYPE_NAMES = {"string": "a string", "integer": "an integer", "number": "a number", "boolean": "a boolean (true or false)",
               "array": "a list", "object": "an object", "null": "null"}


class ToolError(Exception):
    """Raised by a tool to tell the model what went wrong; the message is shown to it as is."""


@dataclass
class Tool:
    """A function the model can call, with the JSON schema of its arguments object."""

    name: str
    description: str
    parameters: dict  # JSON schema of the arguments object
    function: Callable[..., Any]
    timeout: float = 30.0  # seconds a call may run before the model is told it timed out

    def __post_init__(self):
        if not _NAME.match(self.name):
            raise ValueError(f"tool name {self.name!r}: use 1-64 letters, digits, '_' or '-'")
        if not self.timeout > 0:
            raise ValueError(f"tool {self.name!r}: timeout must be positive, got {self.timeout}")

    def schema(self) -> dict:
        """The OpenAI ``tools`` entry of this tool."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}

    def __call__(self, **arguments):
        return self.function(**arguments)


@dataclass
class ToolResult:
    """What came of one call: ``content`` is what the model sees next."""

    name: str
    arguments: dict | None  # the parsed arguments (None when they did not parse)
    content: str  # the output, or "error: ..." text that helps the model repair the call
    ok: bool
    error: str | None  # "unknown_tool", "bad_arguments", "tool_error", "exception", "timeout", or None
    seconds: float
    truncated: bool = False  # the output was longer than the toolbox's max_output and was cut


# ---------------------------------------------------------------------------------------------------------
# From a signature and a docstring to a Tool


def tool(function: Callable | None = None, *, name: str | None = None, description: str | None = None,
         timeout: float = 30.0):
    """Make a :class:`Tool` of ``function``: ``@tool``, ``@tool(name=...)`` or ``tool(function)``.

    Parameter types: str, int, float, bool, list[X], dict[str, X], Literal[...], Enum subclasses, and
    X | None (not required; None when left out). A parameter with a default is not required. The
    description is the docstring's first paragraph unless given. Raises TypeError for a parameter
    without a supported annotation, and for *args, **kwargs or positional-only parameters."""
    if function is None:
        return lambda f: tool(f, name=name, description=description, timeout=timeout)
    if isinstance(function, Tool):
        raise TypeError(f"{function.name} is already a Tool")
    label = getattr(function, "__qualname__", repr(function))
    try:
        hints = typing.get_type_hints(function)
    except Exception as error:  # a name in an annotation that does not resolve
        raise TypeError(f"{label}: cannot read its annotations ({type(error).__name__}: {error})") from None
    summary, arg_docs = parse_docstring(inspect.getdoc(function) or "")
    properties, required, converters, fill_none = {}, [], {}, []
    for parameter in inspect.signature(function).parameters.values():
        where = f"{label}: parameter {parameter.name!r}"
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            raise TypeError(f"{where}: *args and **kwargs cannot be tool parameters; name each argument")
        if parameter.kind is parameter.POSITIONAL_ONLY:
            raise TypeError(f"{where}: positional-only parameters cannot be tool parameters")
        if parameter.name not in hints:
            raise TypeError(f"{where} has no type annotation; tools need one (str, int, float, bool, list[X], ...)")
        prop, nullable = _annotation_schema(hints[parameter.name], where)
        if parameter.name in arg_docs:
            prop = {**prop, "description": arg_docs[parameter.name]}
        has_default = parameter.default is not parameter.empty
        if has_default and parameter.default is not None:
            default = parameter.default.value if isinstance(parameter.default, enum.Enum) else parameter.default
            if _is_json(default):
                prop["default"] = default
        properties[parameter.name] = prop
        if not has_default and not nullable:
            required.append(parameter.name)
        elif not has_default:
            fill_none.append(parameter.name)
        convert = _converter(hints[parameter.name])
        if convert is not None:
            converters[parameter.name] = convert
    schema = {"type": "object", "properties": properties, "required": required, "additionalProperties": False}
    call = function
    if converters or fill_none:
        call = _adapted(function, converters, fill_none)
    return Tool(name or function.__name__, summary if description is None else description, schema, call, timeout)


def parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """The first paragraph (joined into one line) and the ``Args:`` section's description of each parameter."""
    lines = doc.expandtabs().splitlines()
    summary = []
    for line in lines:
        if not line.strip() or _SECTION.match(line):
            break
        summary.append(line.strip())
    args, current, indent, in_args = {}, None, None, False
    for line in lines:
        section = _SECTION.match(line)
        if section:
            in_args, current, indent = section.group(1) in ("Args", "Arguments", "Parameters"), None, None
            continue
        if not in_args or not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        if indent is None:
            indent = depth
        if depth < indent or depth == 0:  # the section ended
            in_args = False
        elif depth == indent and _ARG_LINE.match(line.strip()):
            current, text = _ARG_LINE.match(line.strip()).groups()
            args[current] = text.strip()
        elif current is not None:  # a continuation line
            args[current] = f"{args[current]} {line.strip()}".strip()
    return " ".join(summary), args


def _annotation_schema(annotation, where: str) -> tuple[dict, bool]:
    """The JSON schema of one parameter's annotation, and whether it admits None (X | None)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1 or len(rest) == len(args):
            raise TypeError(f"{where}: the only unions tools accept are X | None, got {annotation}")
        inner = _schema(rest[0], where)
        if isinstance(inner.get("type"), str) and "enum" not in inner:
            return {**inner, "type": [inner["type"], "null"]}, True
        return {"anyOf": [inner, {"type": "null"}]}, True
    return _schema(annotation, where), False


def _schema(annotation, where: str) -> dict:
    simple = {str: "string", int: "integer", float: "number", bool: "boolean"}
    if annotation in simple:
        return {"type": simple[annotation]}
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is list or (origin is list and not args):
        return {"type": "array"}
    if origin is list:
        return {"type": "array", "items": _schema(args[0], where)}
    if annotation is dict or (origin is dict and not args):
        return {"type": "object"}
    if origin is dict:
        if args[0] is not str:
            raise TypeError(f"{where}: dictionary keys must be str (JSON object keys), got {annotation}")
        return {"type": "object", "additionalProperties": _schema(args[1], where)}
    if origin is Literal:
        return _enum_schema(list(args))
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return _enum_schema([member.value for member in annotation])
    raise TypeError(f"{where}: unsupported annotation {annotation!r}; use str, int, float, bool, list[X], "
                    "dict[str, X], Literal[...], an Enum, or X | None")


def _enum_schema(values: list) -> dict:
    kinds = {"string" if isinstance(v, str) else "boolean" if isinstance(v, bool) else "integer"
             if isinstance(v, int) else "number" if isinstance(v, float) else "other" for v in values}
    if len(kinds) == 1 and "other" not in kinds:
        return {"type": kinds.pop(), "enum": values}
    return {"enum": values}


def _converter(annotation) -> Callable[[Any], Any] | None:
    """A function turning a validated JSON value into what the annotation asks for (enum members), or None."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return annotation
    if origin in (typing.Union, types.UnionType):
        inner = _converter(next(a for a in args if a is not type(None)))
        return None if inner is None else (lambda value: None if value is None else inner(value))
    if origin is list and args and (inner := _converter(args[0])) is not None:
        return lambda value: [inner(v) for v in value]
    if origin is dict and len(args) == 2 and (inner := _converter(args[1])) is not None:
        return lambda value: {k: inner(v) for k, v in value.items()}
    return None


def _adapted(function: Callable, converters: dict[str, Callable], fill_none: list[str]) -> Callable:
    """``function`` called with enum values made members and left-out optional parameters given None."""

    @functools.wraps(function)
    def call(**arguments):
        arguments = {k: converters[k](v) if k in converters else v for k, v in arguments.items()}
        return function(**{**dict.fromkeys(fill_none), **arguments})

    return call


def _is_json(value) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


# ---------------------------------------------------------------------------------------------------------
# Checking arguments against a schema


def validate_arguments(schema: dict, arguments: dict) -> dict:
    """``arguments`` checked against the subset of JSON schema that :func:`tool` writes, with integral
    floats for integers made ints (defaults are not filled in: the Python defaults apply). Raises
    ToolError naming the field and what it expected: "argument 'k': expected an integer, got 'three'"."""
    if not isinstance(arguments, dict):
        raise ToolError(f"the arguments must be a JSON object such as {{\"name\": value}}, got {_show(arguments)}")
    return _check(schema, arguments, "")


def _check(schema: dict, value, path: str):
    """``value`` checked against ``schema`` (``path`` names it in messages); returns it, 3.0 made 3."""
    if "anyOf" in schema:
        if value is None and any(_admits_null(s) for s in schema["anyOf"]):
            return None
        options = [s for s in schema["anyOf"] if not _admits_null(s)] or schema["anyOf"]
        errors = []
        for option in options:
            try:
                return _check(option, value, path)
            except ToolError as error:
                errors.append(str(error))
        if len(errors) == 1:
            raise ToolError(errors[0])
        raise ToolError(f"{_where(path)}matches none of the allowed forms, got {_show(value)}")
    kinds = schema.get("type")
    kinds = [kinds] if isinstance(kinds, str) else list(kinds or [])
    if "enum" in schema and not _in_enum(value, schema["enum"]):
        choices = ", ".join(json.dumps(v, ensure_ascii=False) for v in schema["enum"])
        raise ToolError(f"{_where(path)}expected one of {choices}, got {_show(value)}")
    if kinds:
        matched = next((kind for kind in kinds if _is_kind(value, kind)), None)
        if matched is None:
            expected = " or ".join(_TYPE_NAMES.get(k, k) for k in kinds)
            raise ToolError(f"{_where(path)}expected {expected}, got {_show(value)}")
        if matched == "integer":
            return int(value)
    if isinstance(value, list) and "items" in schema:
        return [_check(schema["items"], item, f"{path}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, dict):
        return _check_object(schema, value, path)
    return value


def _check_object(schema: dict, value: dict, path: str) -> dict:
    properties = schema.get("properties", {})
    missing = [name for name in schema.get("required", []) if name not in value]
    if missing:
        expected = ", ".join(f"'{_join(path, m)}' ({_describe(properties.get(m, {}))})" for m in missing)
        raise ToolError(f"missing required argument{'s' if len(missing) > 1 else ''} {expected}")
    extra = schema.get("additionalProperties", True)
    checked = {}
    for key, item in value.items():
        if key in properties:
            checked[key] = _check(properties[key], item, _join(path, key))
        elif extra is False:
            known = ", ".join(f"'{k}'" for k in properties) or "none"
            raise ToolError(f"unknown argument '{_join(path, key)}'; the arguments are: {known}")
        elif isinstance(extra, dict):
            checked[key] = _check(extra, item, _join(path, key))
        else:
            checked[key] = item
    return checked


def _in_enum(value, choices: list) -> bool:
    """``value`` is one of ``choices``, with true never taken for 1 (Python's True == 1)."""
    return any(value == c and isinstance(value, bool) == isinstance(c, bool) for c in choices)


def _is_kind(value, kind: str) -> bool:
    """``value`` (parsed JSON) is of JSON schema type ``kind``; bools are not numbers, 3.0 is an integer."""
    if isinstance(value, bool):
        return kind == "boolean"
    if kind == "integer":
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if kind == "number":
        return isinstance(value, int | float)
    python_type = {"string": str, "boolean": bool, "array": list, "object": dict, "null": type(None)}.get(kind)
    return python_type is None or isinstance(value, python_type)


def _admits_null(schema: dict) -> bool:
    kinds = schema.get("type")
    return kinds == "null" or (isinstance(kinds, list) and "null" in kinds)


def _describe(schema: dict) -> str:
    if "enum" in schema:
        return "one of " + ", ".join(json.dumps(v, ensure_ascii=False) for v in schema["enum"])
    kinds = schema.get("type")
    kinds = [kinds] if isinstance(kinds, str) else list(kinds or [])
    return " or ".join(_TYPE_NAMES.get(k, k) for k in kinds) or "any value"


def _short_type(schema: dict) -> str:
    """A parameter's type in a usage line: string, integer, list[string], "a"|"b", integer|null."""
    if "anyOf" in schema:
        return "|".join(_short_type(option) for option in schema["anyOf"])
    if "enum" in schema:
        return "|".join(json.dumps(v, ensure_ascii=False) for v in schema["enum"])
    kinds = schema.get("type")
    kinds = [kinds] if isinstance(kinds, str) else list(kinds or [])
    names = [f"list[{_short_type(schema['items'])}]" if k == "array" and "items" in schema else
             {"array": "list", "object": "object"}.get(k, k) for k in kinds]
    return "|".join(names) or "any"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _where(path: str) -> str:
    return f"argument '{path}': " if path else ""


def _show(value, limit: int = 60) -> str:
    """A short JSON-like rendering of a value for an error message ('three', 3.5, true, [1, 2])."""
    text = repr(value) if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------------------------------------------------
# Calling tools


def to_text(value) -> str:
    """A tool's return value as the model reads it: a string as is, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)


class Toolbox:
    """The tools an agent may call, by name. ``max_output``: longer outputs are cut (with a note)."""

    def __init__(self, tools: Iterable[Tool | Callable], max_output: int = 4000):
        self.max_output = max_output
        self._tools: dict[str, Tool] = {}
        for item in tools:
            item = item if isinstance(item, Tool) else tool(item)
            if item.name in self._tools:
                raise ValueError(f"two tools are named {item.name!r}; tool names must be unique")
            self._tools[item.name] = item

    def __contains__(self, name) -> bool:
        return name in self._tools

    def __iter__(self):
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)

    def __getitem__(self, name: str) -> Tool:
        return self._tools[name]

    @property
    def names(self) -> list[str]:
        return list(self._tools)

    def schemas(self) -> list[dict]:
        """The OpenAI ``tools`` list for a chat request."""
        return [t.schema() for t in self._tools.values()]

    def call(self, name: str, arguments: str | dict | None) -> ToolResult:
        """Call tool ``name`` with ``arguments`` (a JSON object, as text or parsed). Never raises
        (KeyboardInterrupt and SystemExit pass through): every failure is a result the model can read."""
        start = time.perf_counter()

        def failed(kind: str, message: str, parsed: dict | None = None) -> ToolResult:
            # the toolbox's own messages are short and whole; a tool's may be anything, and are cut
            content, truncated = f"error: {message}", False
            if kind in ("tool_error", "exception"):
                content, truncated = self._cut(content)
            return ToolResult(name, parsed, content, False, kind, time.perf_counter() - start, truncated)

        if name not in self._tools:
            return failed("unknown_tool", f"there is no tool {name!r}; the tools are: {', '.join(self.names) or 'none'}")
        chosen = self._tools[name]
        if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
            arguments = {}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as error:
                return failed("bad_arguments", f"the arguments are not valid JSON ({error}); send one JSON object, "
                                               f"for example {self._example(chosen)}")
        try:
            arguments = validate_arguments(chosen.parameters, arguments)
        except ToolError as error:
            parsed = arguments if isinstance(arguments, dict) else None
            return failed("bad_arguments", f"{error}. Usage: {self.usage(chosen)}", parsed)
        try:
            value = _run_with_timeout(chosen.function, arguments, chosen.timeout)
            text = to_text(value)
        except TimeoutError:
            return failed("timeout", f"{name} did not finish within {chosen.timeout:g} s and was abandoned; "
                                     "try a smaller or simpler call", arguments)
        except ToolError as error:
            return failed("tool_error", str(error), arguments)
        except Exception as error:
            return failed("exception", f"{type(error).__name__}: {error}", arguments)
        content, truncated = self._cut(text)
        return ToolResult(name, arguments, content, True, None, time.perf_counter() - start, truncated)

    @staticmethod
    def usage(chosen: Tool) -> str:
        """A one-line reminder of a tool's arguments: ``search(query: string, k?: integer)``."""
        properties = chosen.parameters.get("properties", {})
        required = set(chosen.parameters.get("required", []))
        parts = [f"{key}{'' if key in required else '?'}: {_short_type(prop)}" for key, prop in properties.items()]
        return f"{chosen.name}({', '.join(parts)})"

    @staticmethod
    def _example(chosen: Tool) -> str:
        names = chosen.parameters.get("required") or list(chosen.parameters.get("properties", {}))[:1]
        return json.dumps({key: "..." for key in names})

    def _cut(self, text: str) -> tuple[str, bool]:
        """``text`` cut to ``max_output`` characters, with a note of how many were left out."""
        if len(text) <= self.max_output:
            return text, False
        left_out = len(text) - self.max_output
        return f"{text[:self.max_output]}\n[output cut: {left_out} more characters left out]", True


def _run_with_timeout(function: Callable, arguments: dict, timeout: float):
    """``function(**arguments)`` in a worker thread; raises TimeoutError when it runs past ``timeout``.

    A Python thread cannot be killed: a tool that hangs keeps running in its (daemon) thread after the
    model is told it timed out, and ends with the process at the latest. Tools that can run away (the
    sandboxed python tool) enforce their own limits and kill their own processes."""
    outcome: dict[str, Any] = {}

    def work():
        try:
            outcome["value"] = function(**arguments)
        except BaseException as error:  # noqa: BLE001 - handed to the caller, which decides
            outcome["error"] = error

    worker = threading.Thread(target=work, name="lmforge-tool", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise TimeoutError
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


# ---------------------------------------------------------------------------------------------------------
# User tools by module path


def load_tools(spec: str) -> list[Tool]:
    """User tools: ``package.module:function`` (that function, made a Tool unless it is one),
    ``package.module`` (the module's ``TOOLS`` list if it has one, else every Tool at module level),
    or a file: ``path/to/file.py`` or ``path/to/file.py:function``. Raises InputError when the module
    does not import, the attribute is missing or not a function, or the module holds no tools."""
    target, attribute = spec, None
    if not spec.endswith(".py") and ":" in spec:
        target, attribute = spec.rsplit(":", 1)
    module = _import_file(target, spec) if target.endswith(".py") else _import_module(target, spec)
    if attribute is not None:
        if not hasattr(module, attribute):
            raise InputError(f"{spec}: {target} has no attribute {attribute!r}")
        return [_as_tool(getattr(module, attribute), spec)]
    if hasattr(module, "TOOLS"):
        found = [_as_tool(item, f"{spec} (TOOLS)") for item in module.TOOLS]
    else:
        found = list({id(v): v for v in vars(module).values() if isinstance(v, Tool)}.values())
    if not found:
        raise InputError(f"{spec}: no tools found; define Tool objects (with @tool) or a TOOLS list, "
                         f"or name one function as {target}:function")
    return found


def _import_module(name: str, spec: str):
    try:
        return importlib.import_module(name)
    except Exception as error:
        raise InputError(f"{spec}: cannot import module {name!r} ({type(error).__name__}: {error})") from None


def _import_file(path: str, spec: str):
    file = Path(path)
    if not file.is_file():
        raise InputError(f"{spec}: no such file {path!r}")
    stem = re.sub(r"\W", "_", file.stem)
    module_name = f"lmforge_user_tools_{stem}_{abs(hash(str(file.resolve())))}"
    loader_spec = importlib.util.spec_from_file_location(module_name, file)
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up here
    try:
        loader_spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[module_name]
        raise InputError(f"{spec}: cannot import {path!r} ({type(error).__name__}: {error})") from None
    return module


def _as_tool(item, where: str) -> Tool:
    if isinstance(item, Tool):
        return item
    if not callable(item):
        raise InputError(f"{where}: {item!r} is neither a Tool nor a function")
    try:
        return tool(item)
    except (TypeError, ValueError) as error:
        raise InputError(f"{where}: cannot make a tool of it: {error}") from None
