"""The built-in tools: a calculator, the date and time, files in one folder, knowledge-base search, Python.

    tools = builtin_tools(["calculator", "now", "read_file"], root="notes/")

Each tool's docstring opens with what a small model reads (one or two short, concrete
sentences); the rest is for people. Every refusal is a :class:`ToolError` whose message says
what to do instead.

- ``calculator`` walks the expression's syntax tree (``ast``) and evaluates only numbers,
  arithmetic and a short list of math functions; it never calls ``eval``. Integers stay exact
  (Python ints, and ``/`` of two integers that divide is an integer); an integral float below
  2**53 prints without ".0" (``sqrt(16)`` gives 4), other floats print with ``repr`` (shortest
  round-trip form: 0.1+0.2 gives 0.30000000000000004). Results are capped at 4,000 digits
  (Python's own int-to-text limit is 4,300): a power is refused from its size estimate
  ``|exponent| * log10(|base|)`` before it is computed, a product from its operands' lengths.
- ``read_file`` and ``list_files`` resolve every path (``..`` and symlinks included) and refuse
  whatever lands outside their folder.
- ``python`` runs code in :mod:`lmforge.agent.sandbox` (its own process, time and memory
  limits); the folder given to ``builtin_tools`` is not shared with it (pass one to
  :func:`python_tool` to do that).
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from lmforge.agent.tools import Tool, ToolError, tool
from lmforge.errors import InputError

BUILTIN_TOOLS = ("calculator", "python", "read_file", "list_files", "search", "now")

MAX_EXPRESSION = 1000  # characters
MAX_DEPTH = 50  # nesting levels of the expression (a long chain like 1+2+3+... counts as one)
MAX_DIGITS = 4000  # digits of an integer result
MAX_FACTORIAL = 1000
_LOG10_2 = math.log10(2)


# ---------------------------------------------------------------------------------------------------------
# Calculator


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression such as 12*(3+4) or sqrt(2). Returns the number.

    Args:
        expression: numbers with + - * / // % ** and parentheses; functions sqrt, log, exp, sin, cos,
            tan, floor, ceil, abs, round, min, max, factorial, gcd; constants pi and e.
    """
    expression = expression.strip()
    if not expression:
        raise ToolError("the expression is empty; write one such as 2*(3+4)")
    if len(expression) > MAX_EXPRESSION:
        raise ToolError(f"the expression is {len(expression)} characters long; the limit is {MAX_EXPRESSION}")
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as error:
        raise ToolError(f"cannot read {expression!r} as arithmetic ({error.msg}); "
                        "write it like 2*(3+4) or sqrt(2)") from None
    except (RecursionError, MemoryError, ValueError):
        raise ToolError("the expression is nested too deeply; split it into smaller steps") from None
    return format_number(_evaluate(tree.body, 0))


def format_number(value: int | float) -> str:
    """How the calculator writes a result: ints exactly, integral floats below 2**53 without ".0", other
    floats by ``repr``."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


_BINARY: dict[type, tuple[str, Callable]] = {
    ast.Add: ("+", operator.add), ast.Sub: ("-", operator.sub), ast.Mult: ("*", operator.mul),
    ast.Div: ("/", operator.truediv), ast.FloorDiv: ("//", operator.floordiv), ast.Mod: ("%", operator.mod),
    ast.Pow: ("**", operator.pow),
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau}
_REFUSED_OPERATORS = {ast.BitXor: "^ (use ** for powers)", ast.BitAnd: "&", ast.BitOr: "|", ast.LShift: "<<",
                      ast.RShift: ">>", ast.MatMult: "@", ast.Invert: "~", ast.Not: "not"}


def _evaluate(node: ast.AST, depth: int) -> int | float:
    """The value of one node of the expression's tree (only numbers, arithmetic and known functions)."""
    if depth > MAX_DEPTH:
        raise ToolError(f"the expression is nested more than {MAX_DEPTH} levels deep; split it into smaller steps")
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise ToolError(f"only numbers are allowed, not {node.value!r}")
        return _checked(node.value)
    if isinstance(node, ast.BinOp):
        return _evaluate_chain(node, depth)
    if isinstance(node, ast.UnaryOp):
        if type(node.op) not in _UNARY:
            raise ToolError(f"the operator {_REFUSED_OPERATORS.get(type(node.op), '?')} is not supported")
        return _UNARY[type(node.op)](_evaluate(node.operand, depth + 1))
    if isinstance(node, ast.Name):
        if node.id in _CONSTANTS:
            return _CONSTANTS[node.id]
        hint = " (call it with parentheses)" if node.id in _FUNCTIONS else ""
        raise ToolError(f"unknown name {node.id!r}{hint}; the constants are {', '.join(_CONSTANTS)}")
    if isinstance(node, ast.Call):
        return _call(node, depth)
    if isinstance(node, ast.Attribute):
        raise ToolError("attribute access (a.b) is not allowed; use numbers, operators and the listed functions")
    if isinstance(node, ast.Tuple):
        raise ToolError("a comma is not allowed here: write numbers without thousands separators (1000, not 1,000)")
    if isinstance(node, ast.Compare):
        raise ToolError("comparisons are not supported; compute each side and compare them yourself")
    raise ToolError(f"{type(node).__name__.lower()} is not allowed in an expression; use numbers, + - * / // % ** "
                    "and the listed functions")


def _evaluate_chain(node: ast.BinOp, depth: int) -> int | float:
    """A left-leaning chain of binary operations (1+2+3+...) evaluated in a loop, so that a long sum is
    not counted as deep nesting."""
    chain = []
    while isinstance(node, ast.BinOp):
        chain.append(node)
        node = node.left
    value = _evaluate(node, depth + 1)
    for binary in reversed(chain):
        if type(binary.op) not in _BINARY:
            raise ToolError(f"the operator {_REFUSED_OPERATORS.get(type(binary.op), '?')} is not supported")
        value = _apply(type(binary.op), value, _evaluate(binary.right, depth + 1))
    return value


def _apply(op: type, left: int | float, right: int | float) -> int | float:
    """``left op right`` with the size guards: products and powers too large are refused unevaluated."""
    symbol, function = _BINARY[op]
    if op is ast.Pow:
        _guard_power(left, right)
    if op is ast.Mult and isinstance(left, int) and isinstance(right, int):
        if (left.bit_length() + right.bit_length()) * _LOG10_2 > MAX_DIGITS + 1:
            raise ToolError(f"the result would have more than {MAX_DIGITS} digits")
    if op is ast.Div and isinstance(left, int) and isinstance(right, int) and right != 0 and left % right == 0:
        return left // right  # keep exact integers exact
    try:
        return _checked(function(left, right))
    except ZeroDivisionError:
        raise ToolError(f"division by zero in {format_number(left)} {symbol} {format_number(right)}") from None
    except OverflowError:
        raise ToolError("the result is too large for a floating-point number") from None


def _guard_power(base: int | float, exponent: int | float) -> None:
    """Refuse an integer ``base ** exponent`` whose result would have more than MAX_DIGITS digits, from
    the estimate ``exponent * log10(|base|)``, before computing it (a float power raises OverflowError
    by itself)."""
    if not (isinstance(base, int) and isinstance(exponent, int)) or abs(base) <= 1 or exponent <= 0:
        return
    digits = exponent * math.log10(abs(base)) if exponent.bit_length() < 64 else math.inf
    if digits > MAX_DIGITS:
        raise ToolError(f"the result would have more than {MAX_DIGITS} digits (about {digits:.3g})")


def _checked(value) -> int | float:
    """``value`` if it is a finite real number of at most MAX_DIGITS digits; otherwise a ToolError."""
    if isinstance(value, complex):
        raise ToolError("the result is not a real number (a fractional power of a negative number)")
    if isinstance(value, float) and math.isinf(value):
        raise ToolError("the result is too large for a floating-point number")
    if isinstance(value, float) and math.isnan(value):
        raise ToolError("the result is not a number (NaN)")
    if isinstance(value, int) and value.bit_length() * _LOG10_2 > MAX_DIGITS:
        raise ToolError(f"the result would have more than {MAX_DIGITS} digits")
    return value


def _log(x, base=None):
    return math.log(x) if base is None else math.log(x, base)


def _round(x, digits=None):
    if digits is not None and (not isinstance(digits, int) or abs(digits) > MAX_DIGITS):
        raise ToolError(f"round: the number of digits must be a whole number from -{MAX_DIGITS} to {MAX_DIGITS}")
    return round(x) if digits is None else round(x, digits)


def _factorial(n):
    if isinstance(n, float) and n.is_integer():
        n = int(n)
    if not isinstance(n, int) or n < 0:
        raise ToolError(f"factorial needs a whole number 0 or more, got {format_number(n)}")
    if n > MAX_FACTORIAL:
        raise ToolError(f"factorial is limited to n <= {MAX_FACTORIAL}, got {n}")
    return math.factorial(n)


def _gcd(*numbers):
    numbers = [int(n) if isinstance(n, float) and n.is_integer() else n for n in numbers]
    if not all(isinstance(n, int) for n in numbers):
        raise ToolError("gcd needs whole numbers")
    return math.gcd(*numbers)


def _abbreviated(text: str, limit: int = 30) -> str:
    return text if len(text) <= limit else f"{text[:12]}...{text[-12:]} ({len(text)} characters)"


# name: (function, fewest arguments, most arguments or None for any number)
_FUNCTIONS: dict[str, tuple[Callable, int, int | None]] = {
    "sqrt": (math.sqrt, 1, 1), "log": (_log, 1, 2), "log10": (math.log10, 1, 1), "log2": (math.log2, 1, 1),
    "exp": (math.exp, 1, 1), "sin": (math.sin, 1, 1), "cos": (math.cos, 1, 1), "tan": (math.tan, 1, 1),
    "asin": (math.asin, 1, 1), "acos": (math.acos, 1, 1), "atan": (math.atan, 1, 1),
    "floor": (math.floor, 1, 1), "ceil": (math.ceil, 1, 1), "abs": (abs, 1, 1), "round": (_round, 1, 2),
    "min": (min, 1, None), "max": (max, 1, None), "factorial": (_factorial, 1, 1), "gcd": (_gcd, 1, None),
}


def _call(node: ast.Call, depth: int) -> int | float:
    """A call of one of the known math functions, with its argument count checked."""
    if not isinstance(node.func, ast.Name):
        raise ToolError("only the listed functions can be called, by name: sqrt(2), log(8, 2), ...")
    name = node.func.id
    if name not in _FUNCTIONS:
        raise ToolError(f"unknown function {name!r}; the functions are {', '.join(_FUNCTIONS)}")
    if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
        raise ToolError(f"{name}: give its arguments plainly, without names or *")
    function, fewest, most = _FUNCTIONS[name]
    if len(node.args) < fewest or (most is not None and len(node.args) > most):
        expected = f"{fewest}" if fewest == most else f"{fewest} or {most}" if most else f"at least {fewest}"
        word = "argument" if expected.endswith("1") else "arguments"
        raise ToolError(f"{name} takes {expected} {word}, got {len(node.args)}")
    args = [_evaluate(a, depth + 1) for a in node.args]
    try:
        return _checked(function(*args))
    except ToolError:
        raise
    except (ValueError, OverflowError, TypeError, ZeroDivisionError) as error:
        shown = ", ".join(_abbreviated(format_number(a)) for a in args)
        raise ToolError(f"{name}({shown}) is not defined ({error})") from None


# ---------------------------------------------------------------------------------------------------------
# Date and time


def now(timezone: str = "UTC") -> str:
    """The current date, time and weekday.

    Args:
        timezone: an IANA time zone such as UTC, Europe/Paris or America/New_York.
    """
    try:
        zone = ZoneInfo(timezone.strip())
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ToolError(f"unknown time zone {timezone!r}; use an IANA name such as UTC, Europe/Paris or "
                        "America/New_York") from None
    moment = datetime.now(zone)
    return f"{moment.isoformat(timespec='seconds')} ({moment.strftime('%A')}, {zone.key})"


# ---------------------------------------------------------------------------------------------------------
# Files inside one folder

MAX_LINES = 2000  # the most lines one read_file call returns
MAX_ENTRIES = 500  # the most entries one list_files call returns


def file_tools(root: str | Path) -> list[Tool]:
    """``read_file`` and ``list_files`` confined to the folder ``root``."""
    base = Path(root).expanduser().resolve()
    if not base.is_dir():
        raise InputError(f"{root}: not a folder; the file tools need an existing folder")

    def inside(path: str) -> Path:
        """``path`` (relative to the folder, or absolute) resolved, symlinks and '..' included, and
        refused unless it lies inside the folder."""
        try:
            resolved = (base / path.strip()).resolve()
        except (OSError, RuntimeError, ValueError) as error:  # a symlink loop, a NUL byte
            raise ToolError(f"cannot use the path {path!r} ({error})") from None
        if resolved != base and base not in resolved.parents:
            raise ToolError(f"{path!r} is outside the allowed folder; use paths inside it, such as those "
                            "list_files shows")
        return resolved

    def shown(path: Path) -> str:
        return "." if path == base else path.relative_to(base).as_posix()

    def read_file(path: str, start_line: int = 1, max_lines: int = 200) -> str:
        """Read a text file. Returns its lines with line numbers.

        Args:
            path: the file's path, such as notes/todo.md.
            start_line: the first line to show (1 is the top).
            max_lines: how many lines to show.
        """
        file = inside(path)
        if file.is_dir():
            raise ToolError(f"{path!r} is a folder; use list_files to see what it holds")
        if not file.is_file():
            raise ToolError(f"there is no file {path!r}; use list_files to see the files")
        if start_line < 1 or max_lines < 1:
            raise ToolError("start_line and max_lines must be 1 or more")
        max_lines = min(max_lines, MAX_LINES)
        with open(file, "rb") as handle:
            if b"\0" in handle.read(8192):
                raise ToolError(f"{path!r} is a binary file, not text")
        lines, total = [], 0
        try:
            with open(file, encoding="utf-8") as handle:
                for total, line in enumerate(handle, start=1):
                    if start_line <= total < start_line + max_lines:
                        lines.append(f"{total}: {line.rstrip(chr(10)).rstrip(chr(13))}")
        except UnicodeDecodeError:
            raise ToolError(f"{path!r} is not a UTF-8 text file") from None
        if total == 0:
            return f"{shown(file)} is empty"
        if start_line > total:
            raise ToolError(f"{path!r} has only {total} lines; start_line must be at most {total}")
        last = start_line + len(lines) - 1
        if last < total:
            lines.append(f"[lines {start_line}-{last} of {total}; read_file with start_line={last + 1} for more]")
        return "\n".join(lines)

    def list_files(path: str = ".") -> str:
        """List the files and folders in a folder. Folders end with /.

        Args:
            path: the folder, such as . (the top) or notes.
        """
        folder = inside(path)
        if folder.is_file():
            raise ToolError(f"{path!r} is a file; use read_file to read it")
        if not folder.is_dir():
            raise ToolError(f"there is no folder {path!r}")
        prefix = "" if folder == base else shown(folder) + "/"
        entries = sorted(folder.iterdir(), key=lambda p: p.name)
        lines = [f"{prefix}{p.name}/" if p.is_dir() else f"{prefix}{p.name}" for p in entries[:MAX_ENTRIES]]
        if len(entries) > MAX_ENTRIES:
            lines.append(f"[{len(entries) - MAX_ENTRIES} more entries not shown]")
        return "\n".join(lines) if lines else f"{shown(folder)} is empty"

    return [tool(read_file), tool(list_files)]


# ---------------------------------------------------------------------------------------------------------
# Knowledge-base search

MAX_HIT_CHARS = 800  # characters of each passage shown


def search_tool(retriever, k: int = 3, method: str = "hybrid") -> Tool:
    """A ``search`` tool over a knowledge base: ``retriever`` is a :class:`lmforge.rag.Retriever`, a
    :class:`lmforge.rag.KnowledgeBase`, or the path of one. ``method``: bm25, dense or hybrid."""
    from lmforge.rag import KnowledgeBase, Retriever

    if isinstance(retriever, str | Path):
        retriever = KnowledgeBase(retriever)
    if isinstance(retriever, KnowledgeBase):
        retriever = Retriever(retriever)
    default_k = k

    def search(query: str, k: int = default_k) -> str:
        """Search the knowledge base. Returns the best passages with their sources.

        Args:
            query: what to look for, in a few words.
            k: how many passages to return.
        """
        if not query.strip():
            raise ToolError("the query is empty; say what to look for")
        if not 1 <= k <= 10:
            raise ToolError(f"k must be between 1 and 10, got {k}")
        try:
            hits = retriever.search(query, k=k, method=method)
        except InputError as error:
            raise ToolError(str(error)) from None
        if not hits:
            return f"no passages found for {query!r}; try other words"
        blocks = []
        for hit in hits:
            text = hit.chunk.text.strip()
            if len(text) > MAX_HIT_CHARS:
                text = text[:MAX_HIT_CHARS].rstrip() + " ..."
            title = hit.chunk.title or hit.chunk.source
            source = f" ({hit.chunk.source})" if hit.chunk.source and hit.chunk.source != title else ""
            blocks.append(f"[{hit.rank}] {title}{source}\n{text}")
        return "\n\n".join(blocks)

    return tool(search)


# ---------------------------------------------------------------------------------------------------------
# Python in a sandbox


def python_tool(folder: str | Path | None = None, timeout: float = 10.0, memory_mb: int = 512) -> Tool:
    """A ``python`` tool that runs code in :mod:`lmforge.agent.sandbox` (a separate process with time and
    memory limits, killed when it runs over). ``folder``: the files the code may see."""

    def python(code: str) -> str:
        """Run Python code. Returns what it prints, or the error. Use print() to show results.

        Args:
            code: the Python program to run.
        """
        try:
            from lmforge.agent.sandbox import run_python
        except ImportError as error:
            raise ToolError(f"python execution is not available here ({error})") from None
        result = run_python(code, timeout=timeout, cpu_seconds=max(1, math.ceil(timeout)), memory_mb=memory_mb,
                            folder=folder)
        summary = result.summary()
        if result.timed_out and "time" not in summary.lower():
            summary = f"{summary}\n(stopped: the code ran past the {timeout:g} s time limit)".strip()
        return summary

    # the sandbox stops the code itself; the toolbox's own timeout is only a backstop
    return tool(python, timeout=timeout + 10.0)


# ---------------------------------------------------------------------------------------------------------
# By name


def builtin_tools(names: Iterable[str] | str, *, root: str | Path | None = None, retriever=None,
                  python_timeout: float = 10.0) -> list[Tool]:
    """The built-in tools named (a list, or one comma-separated string), in that order. ``root``: the folder
    of read_file and list_files; ``retriever``: what search searches (see :func:`search_tool`)."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = list(dict.fromkeys(names))
    unknown = [n for n in names if n not in BUILTIN_TOOLS]
    if unknown:
        raise InputError(f"unknown built-in tool{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                         f"choose from {', '.join(BUILTIN_TOOLS)}")
    files = None
    if {"read_file", "list_files"} & set(names):
        if root is None:
            raise InputError("read_file and list_files need a folder to read from (root)")
        files = {t.name: t for t in file_tools(root)}
    if "search" in names and retriever is None:
        raise InputError("the search tool needs a knowledge base (retriever)")
    tools = []
    for name in names:
        if name == "calculator":
            tools.append(tool(calculator))
        elif name == "now":
            tools.append(tool(now))
        elif name == "python":
            tools.append(python_tool(timeout=python_timeout))
        elif name == "search":
            tools.append(search_tool(retriever))
        else:
            tools.append(files[name])
    return tools
