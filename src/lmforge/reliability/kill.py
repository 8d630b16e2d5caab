"""Killing writers at random moments (SIGKILL) and checking that nothing is lost.

A :class:`Writer` is one lmforge command that writes an output: ``setup`` makes its inputs in a folder and
returns the command's arguments; ``fingerprint`` reads the output back (raising if it is broken) and returns
what identifies its content. :func:`kill_writer` runs the command once to the end (the reference), then
again and again over that finished output, each time killed with SIGKILL after a random delay (drawn
uniformly between the moment the timed uninterrupted run first wrote and its end), and checks after every
kill that

- the output still reads (the last good version is intact: the reference, or the run's own last
  checkpoint for a training run),
- a rerun (``--resume`` for training) finishes with the reference's fingerprint: the same bytes, or the
  same final loss,
- the rerun leaves no temporary file or ``.old`` folder behind.
"""

from __future__ import annotations

import functools
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

import numpy as np
import torch

RUNNER = "import sys\nfrom lmforge.cli import main\nsys.exit(main(sys.argv[1:]))\n"


@dataclass(frozen=True)
class Writer:
    name: str
    what: str
    setup: Callable[[Path], list[str]]  # inputs made under the folder; the command's arguments, output at OUT
    fingerprint: Callable[[Path], str]  # the output read back; raises when it is broken
    output: str = "out"  # the output's name under the folder (OUT in the arguments)
    resume: tuple[str, ...] = ()  # arguments added to a rerun after a kill
    fresh: bool = False  # killed while writing a new output (the earlier one removed first), not replacing it:
    # for writers that skip work when the output is current (a knowledge base is updated, not rebuilt)

    @property
    def starts_afresh(self) -> bool:
        return bool(self.resume) or self.fresh


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
    first_write_seconds: float = 0.0  # the kills fall between this and reference_seconds
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> dict:
        return {"writer": self.writer, "what": self.what, "kills": self.kills, "old_kept": self.old_kept,
                "new_done": self.new_done, "intermediate": self.intermediate, "nothing_yet": self.nothing_yet,
                "reference_seconds": round(self.reference_seconds, 1),
                "first_write_seconds": round(self.first_write_seconds, 1), "problems": self.problems}


def _environment() -> dict[str, str]:
    """The children's environment: one thread each unless OMP_NUM_THREADS says otherwise."""
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def _run(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUNNER, *args], capture_output=True, text=True, timeout=timeout,
                          env=_environment())


def _remove(out: Path) -> None:
    if out.is_dir():
        shutil.rmtree(out)
    else:
        out.unlink(missing_ok=True)


def _timed_run(command: list[str], out: Path) -> tuple[int, float, float]:
    """(exit code, seconds, seconds until its first write): when something temporary appeared beside or
    inside ``out``, or ``out`` itself where there was none. Until then a writer starts Python, imports and
    reads its inputs: a kill there tests nothing, so the kills are drawn after it."""
    existed = out.exists()
    start, first = time.perf_counter(), None
    process = subprocess.Popen([sys.executable, "-c", RUNNER, *command], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=_environment())
    while process.poll() is None:
        if first is None and (_leftovers(out) or (not existed and out.exists())):
            first = time.perf_counter() - start
        time.sleep(0.01)
    seconds = time.perf_counter() - start
    return process.returncode, seconds, min(first if first is not None else 0.0, seconds)


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
    if writer.starts_afresh:
        _remove(out)
    # Timed again, warm (the first run also filled the page cache), watching for its first write.
    returncode, report.reference_seconds, report.first_write_seconds = _timed_run(command, out)
    if returncode != 0 or writer.fingerprint(out) != reference:
        raise RuntimeError(f"{writer.name}: two uninterrupted runs do not give the same output")
    rng = random.Random(f"{writer.name}/{seed}")
    for number in range(kills):
        if writer.starts_afresh:  # a training run (killed from the start, then resumed) or a new output
            _remove(out)
        before = _stamp(out)
        delay = rng.uniform(report.first_write_seconds, report.reference_seconds)
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
            if not writer.starts_afresh or (out / "checkpoint").exists() or (writer.fresh and out.exists()):
                report.problems.append(f"{where}: the output does not read: {type(err).__name__}: {err}")
        if state is not None and state == reference:
            if _stamp(out) == before:
                report.old_kept += 1
            else:
                report.new_done += 1
        elif state is not None and writer.resume:
            report.intermediate += 1  # a checkpoint from before the kill: --resume goes on from it
        elif writer.starts_afresh:
            report.nothing_yet += 1  # killed before its first checkpoint, or before the new output landed
        elif state is not None:
            report.problems.append(f"{where}: the output reads as neither the old nor the new one")
        try:
            rerun = _run(command + list(writer.resume) if state is not None else command)
        except subprocess.TimeoutExpired:
            report.problems.append(f"{where}: the rerun did not finish in 600 s (a hang)")
            continue
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
    """The last checkpoint reads; its step and the losses logged up to it; and the finished outputs a
    fine-tuning or alignment run writes after its loop (``model/``, ``adapter/``: their bytes; the summary
    must read), where they are."""
    from lmforge.checkpoint import load_model, read_checkpoint, read_trainer_state
    from lmforge.files import read_json
    from lmforge.peft.lora import read_adapter
    from lmforge.train.metrics import read_metrics

    _, weights = read_checkpoint(out / "checkpoint")  # a LoRA run's holds the adapters beside the base weights
    for tensor in weights.values():
        tensor.sum()  # every byte read
    state, _ = read_trainer_state(out / "checkpoint")
    losses = [round(r["loss"], 5) for r in read_metrics(out / "metrics.jsonl") if r.get("kind") == "train"
              and r["step"] <= state["step"]]
    finished = {}
    if (out / "model").exists():
        load_model(out / "model")
        finished["model"] = _hash_files(out / "model", ["model.safetensors", "config.json"])
    if (out / "adapter").exists():
        read_adapter(out / "adapter")
        finished["adapter"] = _hash_files(out / "adapter", ["adapter_model.safetensors"])
    for name in ("summary.json", "sft_summary.json"):
        if (out / name).exists():
            read_json(out / name)
    return json.dumps({"step": state["step"], "losses": losses, **finished})


def _chat_base(folder: Path) -> Path:
    """A tiny random chat model (lmforge's tokenizer, its chat template) to fine-tune and align."""
    from lmforge.checkpoint import save_checkpoint
    from lmforge.model import DecoderLM, preset
    from lmforge.reliability.targets import tokenizer

    torch.manual_seed(0)
    save_checkpoint(folder / "base", DecoderLM(preset("tiny", vocab_size=tokenizer().vocab_size, max_seq_len=128)),
                    tokenizer())
    return folder / "base"


TUNING = ["--batch-size", 4, "--seq-len", 64, "--eval-every", 0, "--save-every", 5, "--progress", "false",
          "--device", "cpu", "--dtype", "fp32"]


def _sft_setup(folder: Path) -> list:
    questions = [(f"What is {a} plus {b}?", str(a + b)) for a in range(12) for b in range(5)]
    (folder / "data.jsonl").write_text("".join(json.dumps({"prompt": q, "completion": c}) + "\n"
                                               for q, c in questions), encoding="utf-8")
    return ["sft", "--model", _chat_base(folder), "--data", folder / "data.jsonl", "--method", "lora",
            "--val-fraction", 0, "--out-dir", "OUT", "--max-steps", 60, *TUNING]


def _dpo_setup(folder: Path) -> list:
    from lmforge.data.preferences import builtin_preferences, write_preferences

    write_preferences(builtin_preferences(60, seed=1), folder / "pairs.jsonl")
    return ["dpo", "--model", _chat_base(folder), "--data", folder / "pairs.jsonl", "--eval-tasks", 0,
            "--val-fraction", 0, "--out-dir", "OUT", "--max-steps", 40, *TUNING]


def _rm_setup(folder: Path) -> list:
    from lmforge.data.preferences import builtin_preferences, write_preferences

    write_preferences(builtin_preferences(60, seed=2), folder / "pairs.jsonl")
    return ["rm", "--model", _chat_base(folder), "--data", folder / "pairs.jsonl", "--method", "full",
            "--val-fraction", 0.2, "--out-dir", "OUT", "--max-steps", 40, *TUNING]


def _rl_setup(command: str, folder: Path) -> list:
    """GRPO and PPO on built-in addition tasks, rewarded by checking the answer (PPO's rollouts come in
    cycles: its checkpoints fall at a cycle's start)."""
    kind = ["--group-size", 4] if command == "grpo" else ["--ppo-epochs", 2]
    return [command, "--model", _chat_base(folder), "--tasks", 20, "--kinds", "add", "--eval-tasks", 0,
            "--out-dir", "OUT", "--max-steps", 24, "--save-every", 4, "--batch-size", 2, "--max-new-tokens", 8,
            *kind, "--progress", "false", "--device", "cpu", "--dtype", "fp32"]


def _small_model(folder: Path) -> Path:
    from lmforge.checkpoint import save_checkpoint
    from lmforge.model import DecoderLM, preset
    from lmforge.reliability.targets import tokenizer

    torch.manual_seed(0)
    save_checkpoint(folder / "model", DecoderLM(preset("cpu-small", vocab_size=tokenizer().vocab_size)), tokenizer())
    return folder / "model"


def _export_hf_setup(folder: Path) -> list:
    return ["export", _small_model(folder), "OUT", "--format", "hf"]


def _export_hf_fingerprint(out: Path) -> str:
    from lmforge.checkpoint import load_model

    load_model(out)
    return _hash_files(out, sorted(p.name for p in out.iterdir()))


def _export_gguf_setup(folder: Path) -> list:
    return ["export", _small_model(folder), "OUT", "--format", "gguf", "--gguf-type", "q8_0"]


def _export_gguf_fingerprint(out: Path) -> str:
    from lmforge.checkpoint import load_model

    load_model(out)
    return hashlib.sha256(out.read_bytes()).hexdigest()


def _encoder(folder: Path) -> Path:
    from lmforge.checkpoint import save_checkpoint
    from lmforge.model import DecoderLM, preset
    from lmforge.reliability.targets import tokenizer

    torch.manual_seed(0)
    save_checkpoint(folder / "encoder", DecoderLM(preset("bert-tiny", vocab_size=tokenizer().vocab_size,
                                                         head="hidden")), tokenizer())
    return folder / "encoder"


def _rag_setup(folder: Path) -> list:
    from lmforge.reliability.targets import TEXT

    (folder / "docs").mkdir()
    for i in range(150):
        (folder / "docs" / f"note{i:03d}.md").write_text(f"# Note {i}\n\n{TEXT[i % 89:]}\n\n{TEXT[: i % 61]} {i * 7919}\n",
                                                          encoding="utf-8")
    return ["rag", "index", folder / "docs", "--out", "OUT", "--encoder", _encoder(folder), "--max-tokens", 48,
            "--overlap", 8, "--quiet"]


def _rag_fingerprint(out: Path) -> str:
    from lmforge.rag import KnowledgeBase

    kb = KnowledgeBase(out)
    rows = [(c.id, c.source, c.start, c.end, c.text) for c in kb.chunks]
    return hashlib.sha256(json.dumps(rows).encode() + np.asarray(kb.vectors, dtype=np.float32).tobytes()).hexdigest()


def _eval_setup(folder: Path) -> list:
    return ["eval", _chat_base(folder), "--tasks", "pyref_mc,verifiable", "--limit", 12, "--out", "OUT",
            "--leaderboard", folder / "leaderboard.sqlite", "--device", "cpu", "--dtype", "fp32", "--bootstrap", 100]


def _eval_fingerprint(out: Path) -> str:
    """results.json's scores (not its timings), every per-sample log; report.md and the leaderboard database
    read, and the database holds the run's tasks."""
    from lmforge.eval import leaderboard
    from lmforge.files import read_json

    results = read_json(out / "results.json")
    scores = {task: {how: entry["metrics"] for how, entry in strategies.items()}
              for task, strategies in results["tasks"].items()}
    rows = leaderboard.latest(out.parent / "leaderboard.sqlite")
    if not {task for task in scores} <= {row["task"] for row in rows}:
        raise RuntimeError("the leaderboard lacks a task of the finished run")
    samples = sorted(p.name for p in (out / "samples").iterdir())
    (out / "report.md").read_text(encoding="utf-8")  # read, not compared: it states the speed of the run
    return json.dumps(scores, sort_keys=True) + _hash_files(out / "samples", samples)


def _embed_setup(folder: Path) -> list:
    from lmforge.reliability.targets import TEXT

    lines = [TEXT[i % 89: i % 89 + 200].replace("\n", " ") for i in range(1500)]
    (folder / "texts.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return ["embed", _encoder(folder), "--input", folder / "texts.txt", "--out", "OUT", "--batch-size", 64]


def _embed_fingerprint(out: Path) -> str:
    np.load(out, allow_pickle=False)
    return hashlib.sha256(out.read_bytes()).hexdigest()


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
    Writer("sft", "lmforge sft --method lora: 60 steps, then adapter/, model/ (merged), sft_summary.json; --resume",
           _sft_setup, _pretrain_fingerprint, resume=("--resume",)),
    Writer("dpo", "lmforge dpo (LoRA): 40 steps, then adapter/, model/, summary.json; --resume", _dpo_setup,
           _pretrain_fingerprint, resume=("--resume",)),
    Writer("rm", "lmforge rm (full): 40 steps, then model/ (a reward model), summary.json; --resume", _rm_setup,
           _pretrain_fingerprint, resume=("--resume",)),
    Writer("grpo", "lmforge grpo (LoRA): 24 steps of sampled groups, then adapter/, model/, summary.json; --resume",
           functools.partial(_rl_setup, "grpo"), _pretrain_fingerprint, resume=("--resume",)),
    Writer("ppo", "lmforge ppo (LoRA, a value head): 24 steps in rollout cycles, then adapter/, model/; --resume",
           functools.partial(_rl_setup, "ppo"), _pretrain_fingerprint, resume=("--resume",)),
    Writer("export-hf", "lmforge export --format hf: config.json, model.safetensors, tokenizer files",
           _export_hf_setup, _export_hf_fingerprint),
    Writer("export-gguf", "lmforge export --format gguf --gguf-type q8_0: one GGUF file", _export_gguf_setup,
           _export_gguf_fingerprint, output="out.gguf"),
    Writer("rag-index", "lmforge rag index: a new knowledge base (SQLite rows, vectors, BM25 index)", _rag_setup,
           _rag_fingerprint, fresh=True),
    Writer("eval", "lmforge eval: results.json, samples/, report.md, and a run added to the leaderboard database",
           _eval_setup, _eval_fingerprint),
    Writer("embed", "lmforge embed --out: 1,500 vectors (.npy)", _embed_setup, _embed_fingerprint, output="out.npy"),
]


def format_table(reports: list[KillReport]) -> str:
    """A Markdown table of the reports, one row per writer, then each problem."""
    rows = ["| writer | what is written | kills between (s) | kills | old output untouched | new output complete | "
            "a checkpoint to resume | before any checkpoint | problems |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    rows += [f"| {r.writer} | {r.what} | {r.first_write_seconds:.1f}-{r.reference_seconds:.1f} | {r.kills} | "
             f"{r.old_kept} | {r.new_done} | {r.intermediate} | {r.nothing_yet} | {len(r.problems)} |"
             for r in reports]
    rows += [f"\n{r.writer}: {problem}" for r in reports for problem in r.problems]
    return "\n".join(rows)


def by_name(names: list[str] | None) -> list[Writer]:
    """The writers named (all for None); InputError for an unknown name."""
    from lmforge.reliability.fuzz import pick

    return pick(WRITERS, names, "writer")
