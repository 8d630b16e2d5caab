"""Files, read and written so that nothing breaks on a bad one and nothing is lost in a crash
(docs/RELIABILITY.md).

Reading: the small text files beside the tensors (configs, manifests, states; :func:`read_json`,
:func:`read_text`) and SQLite stores (:func:`database_errors`), each problem an
:class:`~lmforge.errors.InputError` that names the file and says what is wrong.
Writing: one output folder per run (:func:`output_lock`, :func:`holds_output`), files and folders replaced
whole (:func:`write_text_atomic`, :func:`new_file`, :func:`new_folder`), a write the disk refuses as one clear error
(:func:`writing`), and names from files that stay in their folder (:func:`safe_file_name`)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import inspect
import json
import os
import re
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmforge.errors import InputError


def read_text(path: str | Path, what: str = "file") -> str:
    """The UTF-8 text of ``path``; ``what`` names the file in the not-found message."""
    try:
        return Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError as err:
        raise InputError(f"{what} not found: {path}") from err
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text (byte {err.start}): {err.reason}") from err
    except OSError as err:
        raise InputError(f"{path}: cannot read it ({err.strerror or err})") from err


def parse_json(text: str, where: str) -> Any:
    """``text`` as JSON; ``where`` (a file, or ``file:line``) starts the message of any error."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{where}:{err.lineno}: invalid JSON: {err.msg} (column {err.colno})") from err
    except RecursionError as err:
        raise InputError(f"{where}: JSON nested too deeply") from err


def read_json(path: str | Path, what: str = "file", kind: type = dict) -> Any:
    """The JSON value of ``path``, which must be of type ``kind`` (a JSON object by default)."""
    value = parse_json(read_text(path, what), str(path))
    if kind is not None and not isinstance(value, kind):
        expected = {dict: "a JSON object", list: "a JSON array"}.get(kind, kind.__name__)
        raise InputError(f"{path}: expected {expected}, found {type(value).__name__}")
    return value


@contextlib.contextmanager
def database_errors(path: str | Path, what: str = "database") -> Iterator[None]:
    """SQLite errors of a damaged or unreachable file as an InputError naming it. A constraint violation
    (``IntegrityError``) is the program's own business and passes through."""
    try:
        yield
    except sqlite3.IntegrityError:
        raise
    except sqlite3.DatabaseError as err:
        raise InputError(f"{path}: cannot use this {what} ({err})") from err
    except UnicodeDecodeError as err:  # a TEXT value that is not UTF-8
        raise InputError(f"{path}: this {what} holds text that is not UTF-8 ({err.reason})") from err


_held: dict[Path, tuple[int, int]] = {}  # folder -> (open descriptor, how many holders in this process)
_held_guard = threading.Lock()


@contextlib.contextmanager
def output_lock(folder: str | Path) -> Iterator[Path]:
    """Hold ``folder`` as this process's output while the block runs: a second run that
    asks for it, in another process, gets an InputError naming the process that holds it, instead of two
    runs writing into one folder in turn. The lock is the kernel's (``flock`` on ``.NAME.lock`` beside the
    folder, so that it outlives a folder replaced whole, as checkpoints are): it goes with the process,
    however that ends (SIGKILL included), so there is no stale lock to clear. Taken again inside the same
    process (a speedrun's pretraining inside the speedrun), it nests."""
    folder = Path(folder).resolve()
    if int(os.environ.get("RANK", "0")) != 0:  # the other ranks of a torchrun job: rank 0 writes, and holds
        with writing(folder, "into it"):
            yield folder
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _held_guard:
        if folder in _held:
            descriptor, count = _held[folder]
            _held[folder] = (descriptor, count + 1)
        else:
            descriptor = _acquire(folder)
            _held[folder] = (descriptor, 1)
    try:
        with writing(folder, "into it (what was there before is kept)"):
            yield folder
    finally:
        with _held_guard:
            descriptor, count = _held.pop(folder)
            if count > 1:
                _held[folder] = (descriptor, count - 1)
            else:
                os.close(descriptor)  # closing the last descriptor releases the lock


def _acquire(folder: Path) -> int:
    path = folder.parent / f".{folder.name}.lock"
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise InputError(f"{folder}: cannot write here ({err.strerror or err})") from err
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(descriptor, 200, 0).decode("utf-8", "replace").strip() or "another process"
        os.close(descriptor)
        raise InputError(f"{folder} is in use by another lmforge run ({holder}); wait for it to finish or "
                         "write somewhere else") from None
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, f"pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
    if folder.is_dir():
        remove_stale_temporaries(folder)  # the folder is ours now: what an earlier, killed run left goes
    return descriptor


def holds_output(argument: str):
    """Decorator: the function holds the folder given as its argument ``argument`` (:func:`output_lock`)
    while it runs; ``"train_config.out_dir"`` names an attribute of an argument."""
    name, *attributes = argument.split(".")

    def decorate(function):
        signature = inspect.signature(function)

        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            folder = functools.reduce(getattr, attributes, bound.arguments[name])
            with output_lock(folder):
                return function(*args, **kwargs)
        return wrapper
    return decorate


# -- writing ------------------------------------------------------------------------------------------------------

def write_failure(err: BaseException) -> str | None:
    """Why a write failed, when ``err`` says the disk or the folder refused it (full, over a size limit,
    read-only, not allowed), as libraries say it (OSError, safetensors' error, SQLite's); else None."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS,
                                                  errno.EACCES, errno.EPERM):
        return err.strerror
    text = str(err)
    for reason in ("No space left on device", "File too large", "Disk quota exceeded", "Read-only file system",
                   "Permission denied", "database or disk is full", "attempt to write a readonly database"):
        if reason in text:
            return reason
    if isinstance(err, OSError) and "requested and" in text and "written" in text:  # numpy's short write
        return "the disk took only part of it (full?)"
    return None


@contextlib.contextmanager
def writing(path: str | Path, what: str = "it") -> Iterator[None]:
    """A write the disk refuses (full, over a size limit, read-only) as an InputError naming ``path``; any
    other error passes through unchanged."""
    try:
        yield
    except InputError:
        raise
    except Exception as err:
        reason = write_failure(err)
        if reason is None:
            raise
        raise InputError(f"{path}: cannot write {what}: {reason}") from err


def replace_folder(temporary: Path, path: Path) -> None:
    """Put the finished folder ``temporary`` in the place of ``path`` so that a crash at any moment leaves
    the old folder or the new one findable: the old one is moved to ``NAME.old`` first and deleted last;
    :func:`recover_folder` puts it back if the process died between the two renames."""
    old = path.with_name(path.name + ".old")
    recover_folder(path)
    if old.exists():
        shutil.rmtree(old)
    if path.exists():
        os.replace(path, old)
    os.replace(temporary, path)
    if old.exists():
        shutil.rmtree(old)


@contextlib.contextmanager
def new_folder(path: str | Path, what: str = "it", marker: str | None = None) -> Iterator[Path]:
    """A folder to fill in place of ``path``: yields ``NAME.tmp`` beside it, which takes ``path``'s place
    whole (:func:`replace_folder`) when the block ends without an error; otherwise it is removed and the
    old folder, if any, stays as it was. A write the disk refuses is an InputError (:func:`writing`).
    ``marker``: a file every earlier output holds; a folder with other files and not this one is someone
    else's and is refused rather than replaced."""
    path = Path(path)
    if marker and path.is_dir() and not (path / marker).exists() and any(path.iterdir()):
        raise InputError(f"{path}: the folder holds other files and no {marker}: it is not an earlier output, "
                         f"so it is not replaced; write {what} to a new folder")
    temporary = path.with_name(path.name + ".tmp")
    if temporary.exists():
        shutil.rmtree(temporary)  # a killed writer's: nothing runs in it (the output folder's lock says so)
    try:
        with writing(path, what):
            temporary.mkdir(parents=True)
            yield temporary
            replace_folder(temporary, path)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


@contextlib.contextmanager
def new_file(path: str | Path, what: str = "it") -> Iterator[Path]:
    """A file name to write in place of ``path`` (binary writers: GGUF, ``.npy``): yields a
    :func:`temp_path`, renamed onto ``path`` when the block ends without an error and removed otherwise."""
    path = Path(path)
    with writing(path, what):
        path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, path.name)
    temporary = temp_path(path)
    try:
        with writing(path, what):
            yield temporary
            os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def recover_folder(path: Path) -> None:
    """Undo what a crash inside :func:`replace_folder` left: ``NAME.old`` without ``NAME`` goes back to
    ``NAME``; ``NAME.old`` beside ``NAME`` (the new one landed) is deleted."""
    old = path.with_name(path.name + ".old")
    if old.exists() and not path.exists():
        os.replace(old, path)
    elif old.exists():
        shutil.rmtree(old, ignore_errors=True)


def safe_file_name(name: str, limit: int = 120) -> str:
    """``name`` (a task's, a model's: text from a file) as one file name that stays in its folder: every
    character but letters, digits, ``.``, ``_`` and ``-`` becomes ``-``, and no leading dot, so no ``/``,
    ``..`` or hidden name can come of it."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "-", name)[:limit].lstrip(".")
    return cleaned or "unnamed"


def temp_path(path: Path) -> Path:
    """A fresh hidden name next to ``path`` (``.NAME.PID.RANDOM.tmp``): the same filesystem, so
    ``os.replace`` onto ``path`` is atomic; the writer's pid in it, so :func:`remove_stale_temporaries` can
    tell a dead writer's leftover from a live one's."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


def remove_stale_temporaries(folder: Path, name: str | None = None) -> list[Path]:
    """Delete the :func:`temp_path` files in ``folder`` (of ``name`` only, when given) whose writer is no
    longer running: what a process killed mid-write (SIGKILL runs no clean-up) left behind."""
    removed = []
    for path in Path(folder).glob(f".{name}.*.tmp" if name else ".*.tmp"):
        match = TEMPORARY.match(path.name)
        if match is None or (name is not None and match["name"] != name) or _running(int(match["pid"])):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process's own leftovers, from a write that failed before
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename: a reader, or a crash, never meets
    half a file; the temporary file is removed if the write fails."""
    path = Path(path)
    remove_stale_temporaries(path.parent, path.name)
    temporary = temp_path(path)
    try:
        with temporary.open("x", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """``data`` as indented JSON (what JSON has no type for, such as a path, as its text), through
    :func:`write_text_atomic`."""
    return write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
