"""Killing writers at random moments (SIGKILL) and checking that nothing is lost.

A :class:`Writer` is one lmforge command that writes an output: ``setup`` makes its inputs in a folder and
returns the command's arguments; ``fingerprint`` reads the output back (raising if it is broken) and returns
what identifies its content. :func:`kill_writer` runs the command once to the end (the reference), then
again and again over that finished output, each time killed with SIGKILL after a random delay, and checks
after every kill that

- the output still reads (the last good version is intact: the reference, or the run's own last
  checkpoint for a training run),
- a rerun (``--resume`` for training) finishes with the reference's fingerprint: the same bytes, or the
  same final loss,
- the rerun leaves no temporary file or ``.old`` folder behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

RUNNER = "import sys\nfrom lmforge.cli import main\nsys.exit(main(sys.argv[1:]))\n"


@dataclass(frozen=True)
class Writer:
    name: str
    what: str
    setup: Callable[[Path], list[str]]  # inputs made under the folder; the command's arguments, output at OUT
    fingerprint: Callable[[Path], str]  # the output read back; raises when it is broken
    output: str = "out"  # the output's name under the folder (OUT in the arguments)
    resume: tuple[str, ...] = ()  # arguments added to a rerun after a kill


@dataclass
class KillReport:
    writer: str
    what: str
    kills: int = 0
    old_kept: int = 0  # kills after which the output was the earlier, finished one, untouched
    new_done: int = 0  # kills after which the output was a new one, complete
    intermediate: int = 0  # kills that left a readable intermediate state (a training checkpoint)
    nothing_yet: int = 0  # training kills before the first checkpoint (the rerun starts afresh)
    reference_seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> dict:
        return {"writer": self.writer, "what": self.what, "kills": self.kills, "old_kept": self.old_kept,
                "new_done": self.new_done, "intermediate": self.intermediate, "nothing_yet": self.nothing_yet,
                "reference_seconds": round(self.reference_seconds, 1), "problems": self.problems}


def _environment() -> dict[str, str]:
    """The children's environment: one thread each unless OMP_NUM_THREADS says otherwise."""
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def _run(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUNNER, *args], capture_output=True, text=True, timeout=timeout,
                          env=_environment())


def _leftovers(out: Path) -> list[str]:
    """Temporary files and folders under or beside ``out``: what a finished run must not leave."""
    places = list(out.parent.glob(f"{out.name}.*")) + list(out.parent.glob(f".{out.name}.*")) + \
        (list(out.rglob("*")) if out.is_dir() else [])
    return sorted(str(p.relative_to(out.parent)) for p in places
                  if (".tmp" in p.name or p.name.endswith(".old")) and not p.name.endswith(".lock"))


def _stamp(out: Path) -> tuple:
    """When each file of ``out`` last changed, and its inode: unchanged means nothing was written over it."""
    files = sorted(out.rglob("*")) if out.is_dir() else [out] if out.exists() else []
    return tuple((str(p), p.stat().st_ino, p.stat().st_mtime_ns) for p in files if p.is_file())


def kill_writer(writer: Writer, folder: Path, kills: int, seed: int = 0,
                on_kill: Callable[[int], None] | None = None) -> KillReport:
    """Run ``writer`` once to the end, then ``kills`` times killed at a random moment (see the module doc)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    args = [str(a) for a in writer.setup(folder)]
    out = folder / writer.output
    command = [a.replace("OUT", str(out)) for a in args]
    report = KillReport(writer.name, writer.what)
    first = _run(command)
    if first.returncode != 0:
        raise RuntimeError(f"{writer.name}: the uninterrupted run failed: {first.stderr[-1500:]}")
    reference = writer.fingerprint(out)
    if writer.resume:
        shutil.rmtree(out)
    start = time.perf_counter()  # timed again, warm (the first run also filled the page cache)
    if _run(command).returncode != 0 or writer.fingerprint(out) != reference:
        raise RuntimeError(f"{writer.name}: two uninterrupted runs do not give the same output")
    report.reference_seconds = time.perf_counter() - start
    rng = random.Random(f"{writer.name}/{seed}")
    for number in range(kills):
        if writer.resume:  # a training run: killed from the start, then resumed
            shutil.rmtree(out, ignore_errors=True)
        before = _stamp(out)
        delay = rng.uniform(0.0, report.reference_seconds)
        process = subprocess.Popen([sys.executable, "-c", RUNNER, *command], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, env=_environment())
        try:
            process.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
        process.wait()
        report.kills += 1
        where = f"kill {number} after {delay:.2f} s"
        try:
            state = writer.fingerprint(out)
        except Exception as err:  # noqa: BLE001 (what the kill left is what is being tested)
            state = None
            if not writer.resume or (out / "checkpoint").exists():
                report.problems.append(f"{where}: the output does not read: {type(err).__name__}: {err}")
        if state is not None and state == reference:
            if _stamp(out) == before:
                report.old_kept += 1
            else:
                report.new_done += 1
        elif state is not None and writer.resume:
            report.intermediate += 1  # a checkpoint from before the kill: --resume goes on from it
        elif writer.resume:
            report.nothing_yet += 1  # killed before its first checkpoint: nothing to resume, a fresh run
        elif state is not None:
            report.problems.append(f"{where}: the output reads as neither the old nor the new one")
        rerun = _run(command + list(writer.resume) if state is not None else command)
        if rerun.returncode != 0:
            report.problems.append(f"{where}: the rerun failed: {rerun.stderr[-600:]}")
        elif writer.fingerprint(out) != reference:
            report.problems.append(f"{where}: the rerun's output differs from the uninterrupted run's")
        left = _leftovers(out)
        if left:
            report.problems.append(f"{where}: left behind {', '.join(left[:4])}")
        if on_kill:
            on_kill(number + 1)
    return report


# -- the writers -------------------------------------------------------------------------------------------------

def _hash_files(folder: Path, names: list[str]) -> str:
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode() + b"\0" + (folder / name).read_bytes())
    return digest.hexdigest()


def _corpus(folder: Path, paragraphs: int = 400) -> Path:
    from lmforge.reliability.targets import TEXT

    path = folder / "corpus.txt"
    path.write_text("\n\n".join(f"Paragraph {i}: {TEXT[i % 97:]}{i * 7919}" for i in range(paragraphs)),
                    encoding="utf-8")
    return path


def _prepared(folder: Path) -> Path:
    from lmforge.data.prepare import DataConfig, prepare_data

    prepare_data([str(_corpus(folder))], folder / "prepared", DataConfig(min_chars=8, val_fraction=0.1),
                 progress=False)
    return folder / "prepared"


def _tokenizer_file(folder: Path) -> Path:
    from lmforge.reliability.targets import tokenizer

    return tokenizer().save(folder / "tokenizer.json")


def _prepare_setup(folder: Path) -> list:
    return ["data", "prepare", _corpus(folder, 3000), "--out", "OUT", "--quiet"]


def _prepare_fingerprint(out: Path) -> str:
    from lmforge.data.prepare import read_manifest

    manifest = read_manifest(out)
    return json.dumps(manifest["splits"], sort_keys=True) + _hash_files(out, ["train.jsonl", "val.jsonl"])


def _tokenizer_setup(folder: Path) -> list:
    return ["tokenizer", "train", "--data", _prepared(folder), "--vocab-size", 2000, "--out", "OUT", "--quiet"]


def _tokenizer_fingerprint(out: Path) -> str:
    from lmforge.tokenizer import Tokenizer

    Tokenizer.from_file(out).encode("read back")
    return hashlib.sha256(out.read_bytes()).hexdigest()


def _shard_setup(folder: Path) -> list:
    return ["data", "shard", "--data", _prepared(folder), "--tokenizer", _tokenizer_file(folder), "--out", "OUT", "--quiet"]


def _shard_fingerprint(out: Path) -> str:
    from lmforge.data.shards import load_shard, read_meta

    for split in ("train", "val"):
        load_shard(out, split)
    return json.dumps(read_meta(out), sort_keys=True) + _hash_files(out, ["train.bin", "val.bin"])


def _quantize_setup(folder: Path) -> list:
    from lmforge.checkpoint import save_checkpoint
    from lmforge.model import DecoderLM, preset
    from lmforge.reliability.targets import tokenizer

    save_checkpoint(folder / "model", DecoderLM(preset("cpu-small", vocab_size=tokenizer().vocab_size)), tokenizer())
    return ["quantize", folder / "model", "--out", "OUT", "--bits", 4, "--granularity", "group", "--group-size", 32,
            "--eval-chars", 0, "--eval-items", 0]


def _checkpoint_fingerprint(out: Path) -> str:
    from lmforge.checkpoint import load_model

    load_model(out)
    return _hash_files(out, ["model.safetensors", "config.json"])


def _pretrain_setup(folder: Path) -> list:
    from lmforge.data.shards import write_shards
    from lmforge.reliability.targets import tokenizer

    write_shards(_prepared(folder), tokenizer(), folder / "shards", progress=False)
    return ["pretrain", "--shards", folder / "shards", "--tokenizer", _tokenizer_file(folder), "--preset", "tiny",
            "--out-dir", "OUT", "--max-steps", 150, "--save-every", 5, "--batch-size", 4, "--seq-len", 64,
            "--eval-every", 0, "--sample-every", 0, "--progress", "false", "--device", "cpu"]


def _pretrain_fingerprint(out: Path) -> str:
    """The last checkpoint loads; its step and the losses logged up to it."""
    from lmforge.checkpoint import load_model, read_trainer_state
    from lmforge.train.metrics import read_metrics

    load_model(out / "checkpoint")
    state, _ = read_trainer_state(out / "checkpoint")
    losses = [round(r["loss"], 5) for r in read_metrics(out / "metrics.jsonl") if r.get("kind") == "train"
              and r["step"] <= state["step"]]
    return json.dumps({"step": state["step"], "losses": losses})


WRITERS = [
    Writer("data-prepare", "lmforge data prepare: train.jsonl, val.jsonl, manifest.json", _prepare_setup,
           _prepare_fingerprint),
    Writer("tokenizer", "lmforge tokenizer train: tokenizer.json", _tokenizer_setup, _tokenizer_fingerprint,
           output="tokenizer.json"),
    Writer("shards", "lmforge data shard: train.bin, val.bin, meta.json", _shard_setup, _shard_fingerprint),
    Writer("quantize", "lmforge quantize: an int4 checkpoint (a checkpoint replaced whole)", _quantize_setup,
           _checkpoint_fingerprint),
    Writer("pretrain", "lmforge pretrain: 150 steps, a checkpoint every 5, metrics.jsonl; --resume after each kill",
           _pretrain_setup, _pretrain_fingerprint, resume=("--resume",)),
]


def format_table(reports: list[KillReport]) -> str:
    """A Markdown table of the reports, one row per writer, then each problem."""
    rows = ["| writer | what is written | kills | old output untouched | new output complete | "
            "a checkpoint to resume | before any checkpoint | problems |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    rows += [f"| {r.writer} | {r.what} | {r.kills} | {r.old_kept} | {r.new_done} | {r.intermediate} | "
             f"{r.nothing_yet} | {len(r.problems)} |" for r in reports]
    rows += [f"\n{r.writer}: {problem}" for r in reports for problem in r.problems]
    return "\n".join(rows)


def by_name(names: list[str] | None) -> list[Writer]:
    """The writers named (all for None); InputError for an unknown name."""
    from lmforge.reliability.fuzz import pick

    return pick(WRITERS, names, "writer")
