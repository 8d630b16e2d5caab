"""Disk full and read-only (issue 17, point 3): a command whose writes the disk refuses stops with one clear
line (exit code 2, no traceback), and what it wrote before is byte for byte what it was, with no temporary
files left beside it.

Three refusals: a file-size limit (``ulimit -f``: every write past it fails with "File too large"), a full
filesystem (a small tmpfs) and a read-only one (a read-only bind mount). The last two need a private mount
namespace (``unshare -m``, as root); where there is none they are skipped."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.checkpoint import save_checkpoint
from lmforge.cli import main
from lmforge.data.prepare import DataConfig, prepare_data
from lmforge.reliability.targets import TEXT, _model, tokenizer

# Runs `lmforge ARGS` with writes capped at $LIMIT bytes per file when LIMIT is set.
RUNNER = """
import os, resource, sys
if os.environ.get("LIMIT"):
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(os.environ["LIMIT"]), resource.RLIM_INFINITY))
from lmforge.cli import main
sys.exit(main(sys.argv[1:]))
"""


def lmforge(args: list, limit: int | None = None, wrap: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {"LIMIT": str(limit)} if limit else {}
    command = [*(wrap or []), sys.executable, "-c", RUNNER, *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env}, timeout=300)


def digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (and temporaries beside it) with a hash of its bytes."""
    files = [p for p in folder.rglob("*") if p.is_file()] + [p for p in folder.parent.glob(f"{folder.name}.*")]
    return {str(p.relative_to(folder.parent)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(files) if not p.name.endswith(".lock")}


# Each writer: how to make what it reads, and the command that writes OUT from it.
def _prepare(tmp: Path) -> list:
    (tmp / "big.txt").write_text("\n\n".join(f"Paragraph {i}. " + TEXT for i in range(40)), encoding="utf-8")
    return ["data", "prepare", tmp / "big.txt", "--out", "OUT", "--quiet"]


def _tokenizer(tmp: Path) -> list:
    (tmp / "big.txt").write_text(TEXT * 4, encoding="utf-8")
    prepare_data([str(tmp / "big.txt")], tmp / "prepared", DataConfig(min_chars=8), progress=False)
    return ["tokenizer", "train", "--data", tmp / "prepared", "--vocab-size", 300, "--out", "OUT/tokenizer.json",
            "--quiet"]


def _shards(tmp: Path) -> list:
    (tmp / "big.txt").write_text("\n\n".join(f"Paragraph {i}. " + TEXT for i in range(40)), encoding="utf-8")
    prepare_data([str(tmp / "big.txt")], tmp / "prepared", DataConfig(min_chars=8), progress=False)
    tokenizer().save(tmp / "tokenizer.json")
    return ["data", "shard", "--data", tmp / "prepared", "--tokenizer", tmp / "tokenizer.json", "--out", "OUT", "--quiet"]


def _quantize(tmp: Path) -> list:
    save_checkpoint(tmp / "model", _model(), tokenizer())
    return ["quantize", tmp / "model", "--out", "OUT", "--eval-chars", 0, "--eval-items", 0]


def _export(tmp: Path) -> list:
    save_checkpoint(tmp / "model", _model(), tokenizer())
    return ["export", tmp / "model", "OUT/m.gguf", "--format", "gguf"]


WRITERS = {"data prepare": _prepare, "tokenizer train": _tokenizer, "data shard": _shards, "quantize": _quantize,
           "export gguf": _export}


def written(tmp: Path, writer: str) -> tuple[list, Path]:
    """The writer's command and its output folder, written once already (the earlier output to keep)."""
    args = WRITERS[writer](tmp)
    out = tmp / "out"
    args = [str(a).replace("OUT", str(out)) for a in args]
    assert main(args) == 0  # in this process: only the refused runs need one of their own
    return args, out


def refused_cleanly(answer: subprocess.CompletedProcess, reason: str) -> None:
    assert answer.returncode == 2, answer.stderr[-2000:]
    assert "Traceback" not in answer.stderr, answer.stderr[-2000:]
    assert answer.stderr.strip().splitlines()[-1].startswith("lmforge: error: "), answer.stderr[-500:]
    assert reason in answer.stderr and "cannot write" in answer.stderr, answer.stderr[-500:]


@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_file_size_limit_stops_the_writer_and_keeps_the_earlier_output(tmp_path, writer):
    args, out = written(tmp_path, writer)
    before = digest(out)
    refused_cleanly(lmforge(args, limit=4096), "File too large")
    assert digest(out) == before
    assert main(args) == 0  # and with room again, the same command succeeds, leaving no temporaries
    assert not [name for name in digest(out) if ".tmp" in name or name.endswith(".old")]


def _namespaces() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


needs_mounts = pytest.mark.skipif(not _namespaces(), reason="no private mount namespace (unshare -m as root)")


@needs_mounts
@pytest.mark.parametrize("writer", ["data prepare", "quantize"])
def test_a_read_only_folder_is_refused_and_left_as_it_was(tmp_path, writer):
    args, out = written(tmp_path, writer)
    before = digest(out)
    read_only = ["unshare", "-m", "sh", "-c", 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"',
                 str(tmp_path)]
    refused_cleanly(lmforge(args, wrap=read_only), "Read-only file system")
    assert digest(out) == before


FULL = """
import hashlib, json, os, shutil, subprocess, sys
from pathlib import Path
out, size, saved = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(out.parent)], check=True)
shutil.copytree(saved, out)   # the earlier output, on a filesystem with little room left
before = {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.parent.rglob("*")) if p.is_file()}
answer = subprocess.run([sys.executable, "-c", os.environ["RUNNER"], *sys.argv[4:]], capture_output=True, text=True)
after = {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.parent.rglob("*")) if p.is_file()
         and not p.name.endswith(".lock")}
print(json.dumps({"returncode": answer.returncode, "stderr": answer.stderr, "kept": before == after}))
"""


@needs_mounts
def test_a_full_disk_stops_the_checkpoint_writer_and_keeps_the_earlier_checkpoint(tmp_path):
    args, out = written(tmp_path, "quantize")
    saved = tmp_path / "saved"
    shutil.copytree(out, saved)
    size = sum(p.stat().st_size for p in saved.rglob("*") if p.is_file()) + 64 * 1024  # room for the old, not a new
    mounted = tmp_path / "disk" / "out"
    mounted.parent.mkdir()
    args = [a.replace(str(out), str(mounted)) for a in args]
    run = subprocess.run(["unshare", "-m", sys.executable, "-c", FULL, str(mounted), str(size), str(saved), *args],
                         capture_output=True, text=True, env={**os.environ, "RUNNER": RUNNER}, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout)
    refused_cleanly(subprocess.CompletedProcess(args, result["returncode"], "", result["stderr"]),
                    "No space left on device")
    assert result["kept"]
