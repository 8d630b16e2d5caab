"""Typed dataclass configs turned into command-line flags and back.

Each config field carries a one-line ``help`` in its metadata; that line is the
flag's ``--help``. Precedence: dataclass default < ``--config file.json`` < flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from lmforge.errors import InputError
from lmforge.files import read_json

T = TypeVar("T")


def field(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with a help line (used by :func:`add_arguments`)."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def _base_type(tp: Any) -> Any:
    """``int | None`` -> ``int``; other types unchanged."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _parse_json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({err.msg})") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser, cls: type, prefix: str = "", skip: tuple[str, ...] = ()) -> None:
    """Add one ``--flag`` per field of dataclass ``cls``; unset flags stay ``None``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = _base_type(hints[f.name])
        flag = "--" + (prefix + f.name).replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        dest = prefix + f.name
        if tp is bool:
            parser.add_argument(flag, type=_parse_bool, nargs="?", const=True, default=None, dest=dest, help=help_text)
        elif typing.get_origin(tp) in (list, tuple):
            inner = typing.get_args(tp)[0] if typing.get_args(tp) else str
            parser.add_argument(flag, type=inner, nargs="+", default=None, dest=dest, help=help_text)
        elif tp is dict or typing.get_origin(tp) is dict:
            parser.add_argument(flag, type=_parse_json_object, default=None, dest=dest, help=help_text)
        elif tp in (int, float, str):
            parser.add_argument(flag, type=tp, default=None, dest=dest, help=help_text)
        else:
            parser.add_argument(flag, type=str, default=None, dest=dest, help=help_text)


def build(cls: type[T], args: argparse.Namespace | None = None, prefix: str = "", base: dict | None = None) -> T:
    """Make ``cls`` from defaults, then ``base`` (e.g. a config file), then set flags."""
    values: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in (base or {}).items():
        if key not in names:
            raise InputError(f"unknown {cls.__name__} field {key!r}; known: {', '.join(sorted(names))}")
        values[key] = value
    if args is not None:
        for name in names:
            value = getattr(args, prefix + name, None)
            if value is not None:
                values[name] = value
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise InputError(f"invalid {cls.__name__}: {err}") from err


def load_json(path: str | Path) -> dict:
    """Read a JSON config file (an object) with a clear error."""
    return read_json(path, "config file")


def to_dict(config: Any) -> dict:
    """A dataclass as a plain JSON-able dict."""
    return dataclasses.asdict(config)
