"""Byte-mutation fuzzing of lmforge's readers.

A :class:`Target` is one reader as a user reaches it: ``seed`` writes a valid input into a folder and
returns the file to damage; ``read`` reads that file (or the folder around it) the way a command does.
:func:`fuzz` damages the file again and again (:func:`mutate`: bytes overwritten, inserted, deleted,
cut short; numbers made huge or negative; JSON punctuation swapped) and sorts each run:

- ``accepted``: the reader gave a result;
- ``refused``: it raised lmforge's :class:`~lmforge.errors.InputError` naming the file;
- a failure: any other exception, an input error that does not name the file, a run over ``timeout``
  seconds (a hang), or a ``MemoryError`` (with :func:`memory_limit` on, an allocation the input asked
  for beyond the bound).

Inputs are drawn from ``random.Random(seed)``: a run is repeatable, and every failure keeps the bytes
that caused it.
"""

from __future__ import annotations

import contextlib
import random
import resource
import shutil
import signal
import struct
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.errors import InputError


@dataclass(frozen=True)
class Target:
    """One reader under fuzzing. ``read`` must raise :class:`InputError` (naming the file, when
    ``names_file``) or return; anything else is a defect of the reader."""

    name: str
    what: str
    seed: Callable[[Path], Path]
    read: Callable[[Path], object]
    names_file: bool = True


@dataclass
class Failure:
    target: str
    iteration: int
    kind: str  # "exception", "unnamed", "hang", "memory"
    detail: str
    data: bytes = field(repr=False)

    @property
    def signature(self) -> str:
        """What tells two failures apart: the kind, the exception type and the place it was raised."""
        kind, _, rest = self.detail.partition(":")
        place = rest.rpartition(" @ ")[2] if " @ " in rest else ""
        return f"{self.kind}: {kind} @ {place}" if self.kind == "exception" else f"{self.kind}: {self.detail[:120]}"


@dataclass
class Report:
    target: str
    what: str
    iterations: int = 0
    accepted: int = 0
    refused: int = 0
    seconds: float = 0.0
    failures: list[Failure] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def distinct(self) -> dict[str, tuple[int, str]]:
        """Each distinct failure: how many inputs caused it, and the first one's detail."""
        out: dict[str, tuple[int, str]] = {}
        for failure in self.failures:
            count, detail = out.get(failure.signature, (0, failure.detail))
            out[failure.signature] = (count + 1, detail)
        return out

    def summary(self) -> dict:
        return {"target": self.target, "what": self.what, "iterations": self.iterations, "accepted": self.accepted,
                "refused": self.refused, "failures": len(self.failures), "seconds": round(self.seconds, 2),
                "distinct_failures": [{"signature": signature, "inputs": count, "example": detail}
                                      for signature, (count, detail) in self.distinct().items()]}


# -- mutations ------------------------------------------------------------------------------------------------

# Integers that break size and count fields: zero, one, the edges of signed/unsigned 8/16/32/64-bit
# ranges, and sizes no machine has.
INTERESTING = (0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 2**40, 2**60, 2**63 - 1, 2**64 - 1)
NUMBER_TEXTS = (b"0", b"-1", b"1e400", b"-1e400", b"99999999999999999999", b"4294967297", b"NaN", b"0.5", b"1e-400",
                b"Infinity", b"2147483648", b"-9223372036854775809")
SNIPPETS = (b"null", b"true", b"[]", b"{}", b'""', b'"\\ud800"', b"\\u0000", b"[[[[[[[[", b"{{", b"\x00", b"\xff\xfe",
            b"\r\n", b"\n", b"{%", b"{{ x.__class__ }}", b"{% for x in range(99999999) %}")
PUNCTUATION = b'{}[]":,'


def _overwrite(data: bytearray, rng: random.Random) -> None:
    for _ in range(rng.randint(1, 8)):
        data[rng.randrange(len(data))] = rng.randrange(256)


def _integer(data: bytearray, rng: random.Random) -> None:
    """A size-breaking integer written over a little-endian 4- or 8-byte field (often aligned)."""
    width = rng.choice((4, 8))
    value = rng.choice(INTERESTING) & ((1 << (8 * width)) - 1)
    at = rng.randrange(max(1, len(data) - width + 1))
    if rng.random() < 0.5:
        at -= at % width
    data[at:at + width] = struct.pack("<I" if width == 4 else "<Q", value)


def _number(data: bytearray, rng: random.Random) -> None:
    """A run of ASCII digits replaced by a number that breaks ranges (huge, negative, NaN, not an integer)."""
    starts = [i for i in range(len(data)) if 48 <= data[i] <= 57 and (i == 0 or not 48 <= data[i - 1] <= 57)]
    if not starts:
        return _overwrite(data, rng)
    start = rng.choice(starts)
    end = start
    while end < len(data) and 48 <= data[end] <= 57:
        end += 1
    data[start:end] = rng.choice(NUMBER_TEXTS)


def _punctuation(data: bytearray, rng: random.Random) -> None:
    places = [i for i in range(len(data)) if data[i] in PUNCTUATION]
    if not places:
        return _overwrite(data, rng)
    at = rng.choice(places)
    if rng.random() < 0.3:
        del data[at]
    else:
        data[at] = rng.choice(PUNCTUATION)


def _insert(data: bytearray, rng: random.Random) -> None:
    at = rng.randrange(len(data) + 1)
    if rng.random() < 0.5:
        piece = rng.choice(SNIPPETS)
    else:
        start = rng.randrange(len(data))
        piece = bytes(data[start:start + rng.randint(1, 64)])  # a copy of the file's own bytes
    data[at:at] = piece


def _delete(data: bytearray, rng: random.Random) -> None:
    start = rng.randrange(len(data))
    del data[start:start + rng.randint(1, max(1, min(64, len(data) // 4)))]


def _truncate(data: bytearray, rng: random.Random) -> None:
    del data[rng.randrange(len(data)):]


MUTATIONS = (_overwrite, _integer, _number, _punctuation, _insert, _delete, _truncate)


def mutate(data: bytes, rng: random.Random) -> bytes:
    """``data`` damaged by one to three mutations drawn from :data:`MUTATIONS`."""
    out = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        if not out:
            out.extend(rng.choice(SNIPPETS))
        rng.choice(MUTATIONS)(out, rng)
    return bytes(out)


# -- running --------------------------------------------------------------------------------------------------

class Hang(BaseException):
    """Raised by the alarm when one read runs past its time (a BaseException: readers that catch
    ``Exception`` cannot swallow it)."""


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Raise :class:`Hang` in this thread after ``seconds`` (only the main thread can take signals: in
    another thread there is no deadline)."""
    if threading.current_thread() is not threading.main_thread() or seconds <= 0:
        yield
        return

    def alarm(signum, frame):
        raise Hang

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _address_space() -> int:
    """This process's virtual memory size in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmSize in /proc/self/status")


@contextlib.contextmanager
def memory_limit(extra_bytes: int) -> Iterator[None]:
    """Cap this process's address space at its present size plus ``extra_bytes`` (RLIMIT_AS): an input
    that makes a reader allocate more fails with MemoryError instead of taking the machine's memory."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _address_space() + extra_bytes
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _where(err: BaseException) -> str:
    """``Type: message @ file:line`` of the innermost frame that raised it."""
    frames = traceback.extract_tb(err.__traceback__)
    place = f" @ {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return f"{type(err).__name__}: {str(err)[:200]}{place}"


def run_one(target: Target, path: Path, timeout: float) -> tuple[str, str]:
    """Read ``path`` with ``target``: ("accepted" | "refused" | a failure kind, detail)."""
    try:
        with _deadline(timeout), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # overflow in a damaged tensor's arithmetic and the like: not failures
            target.read(path)
    except Hang:
        return "hang", f"no answer in {timeout:g} s"
    except InputError as err:
        if target.names_file and path.name not in str(err) and str(path.parent) not in str(err):
            return "unnamed", f"InputError without the file's name: {str(err)[:200]}"
        return "refused", str(err)
    except MemoryError as err:
        return "memory", _where(err)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # noqa: BLE001 (anything else is what the fuzzing looks for, Rust panics included)
        return "exception", _where(err)
    return "accepted", ""


def fuzz(target: Target, folder: Path, iterations: int | None = None, seconds: float | None = None, seed: int = 0,
         timeout: float = 10.0, on_input: Callable[[int], None] | None = None) -> Report:
    """Damage ``target``'s seed file ``iterations`` times (or for ``seconds``) and read each; the seed
    folder is rebuilt from a pristine copy before every read, so a reader that writes cannot carry
    damage from one input to the next."""
    if iterations is None and seconds is None:
        raise ValueError("give iterations or seconds")
    folder = Path(folder)
    pristine = folder / "pristine"
    work = folder / "work"
    path = target.seed(pristine)
    relative = path.relative_to(pristine)
    original = path.read_bytes()
    kind, detail = run_one(target, path, timeout)
    if kind != "accepted":  # a target whose valid input fails tests nothing
        raise RuntimeError(f"fuzz target {target.name}: its valid seed input is not read ({kind}: {detail})")
    report = Report(target.name, target.what)
    rng = random.Random(f"{target.name}/{seed}")
    start = time.perf_counter()
    while True:
        elapsed = time.perf_counter() - start
        if (iterations is not None and report.iterations >= iterations) or (seconds is not None and elapsed >= seconds):
            break
        data = mutate(original, rng)
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(pristine, work)
        (work / relative).write_bytes(data)
        kind, detail = run_one(target, work / relative, timeout)
        if kind == "accepted":
            report.accepted += 1
        elif kind == "refused":
            report.refused += 1
        else:
            report.failures.append(Failure(target.name, report.iterations, kind, detail, data))
        report.iterations += 1
        if on_input:
            on_input(report.iterations)
    report.seconds = time.perf_counter() - start
    shutil.rmtree(work, ignore_errors=True)
    return report


def save_failures(report: Report, out: Path, limit: int = 5) -> list[Path]:
    """Up to ``limit`` inputs per distinct failure, as files to replay (``<target>-<n>.bin``)."""
    out.mkdir(parents=True, exist_ok=True)
    written, seen = [], {}
    for failure in report.failures:
        if seen.get(failure.signature, 0) >= limit:
            continue
        seen[failure.signature] = seen.get(failure.signature, 0) + 1
        path = out / f"{failure.target}-{failure.iteration}.bin"
        path.write_bytes(failure.data)
        written.append(path)
    return written


def fuzz_many(targets: list[Target], iterations: int | None = None, seconds: float | None = None, seed: int = 0,
              timeout: float = 10.0, memory_gib: float = 4.0, out: Path | None = None,
              progress: bool = True) -> list[Report]:
    """:func:`fuzz` each target in a scratch folder, under :func:`memory_limit` (``memory_gib`` beyond the
    present size; 0: no limit) and with a progress bar; failing inputs saved under ``out``."""
    import tempfile

    from tqdm.auto import tqdm

    reports = []
    with tempfile.TemporaryDirectory(prefix="lmforge-fuzz-") as scratch, \
            memory_limit(int(memory_gib * 2**30)) if memory_gib else contextlib.nullcontext():
        for target in targets:
            total = iterations if iterations is not None else None
            with tqdm(total=total, desc=target.name, unit="input", disable=not progress, leave=False) as bar:
                report = fuzz(target, Path(scratch) / target.name, iterations, seconds, seed, timeout,
                              on_input=lambda _: bar.update(1))
            if out is not None and report.failures:
                save_failures(report, out)
            reports.append(report)
            if progress:
                tqdm.write(format_row(report))
    return reports


def format_row(report: Report) -> str:
    line = (f"{report.target:20} {report.iterations:>7,} inputs  {report.accepted:>6,} read  {report.refused:>7,} "
            f"refused  {len(report.failures):>4} failed  {report.seconds:7.1f} s")
    return line + "".join(f"\n    {count} x {signature}\n      e.g. {detail[:160]}"
                          for signature, (count, detail) in report.distinct().items())


def format_table(reports: list[Report]) -> str:
    """A Markdown table of the reports, one row per target."""
    rows = ["| reader | what is read | inputs | read | refused | failures | seconds |", "|---|---|---:|---:|---:|---:|---:|"]
    rows += [f"| {r.target} | {r.what} | {r.iterations:,} | {r.accepted:,} | {r.refused:,} | {len(r.failures)} | "
             f"{r.seconds:.0f} |" for r in reports]
    total = sum(r.iterations for r in reports)
    rows.append(f"| **all** | {len(reports)} readers | {total:,} | {sum(r.accepted for r in reports):,} | "
                f"{sum(r.refused for r in reports):,} | {sum(len(r.failures) for r in reports)} | "
                f"{sum(r.seconds for r in reports):.0f} |")
    return "\n".join(rows)


def pick(known: list, names: list[str] | None, what: str) -> list:
    """The items of ``known`` (each with a ``name``) that ``names`` names, in that order; all for none.
    InputError for a name not there, listing the known ones."""
    by_name = {item.name: item for item in known}
    unknown = [name for name in names or [] if name not in by_name]
    if unknown:
        raise InputError(f"unknown {what} {', '.join(unknown)}; known: {', '.join(by_name)}")
    return [by_name[name] for name in names] if names else list(known)
