"""Every writer, killed (issue 17, point 2): the smoke of ``lmforge killtest`` (a training run killed twice
and resumed: the same losses as a run never killed), and each crash window of the folder swap, the
metrics log and a resume, forced by hand."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from lmforge.errors import InputError
from lmforge.files import recover_folder, replace_folder
from lmforge.reliability.kill import WRITERS, kill_writer
from lmforge.train.metrics import MetricsLog, read_metrics


def test_a_training_run_killed_at_random_resumes_to_the_same_losses(tmp_path):
    pretrain = next(w for w in WRITERS if w.name == "pretrain")

    def shorter(folder):
        args = pretrain.setup(folder)
        args[args.index("--max-steps") + 1] = 30
        return args

    report = kill_writer(dataclasses.replace(pretrain, setup=shorter), tmp_path, kills=2, seed=1)
    assert report.kills == 2 and report.ok, report.problems


def _folder(path, text):
    path.mkdir()
    (path / "weights").write_text(text)
    return path


def test_a_folder_swap_killed_between_its_renames_gives_the_old_folder_back(tmp_path):
    path = _folder(tmp_path / "ckpt", "old")
    os.replace(path, tmp_path / "ckpt.old")  # the first rename done, then the process died
    recover_folder(path)
    assert (path / "weights").read_text() == "old" and not (tmp_path / "ckpt.old").exists()
    os.replace(path, tmp_path / "ckpt.old")
    replace_folder(_folder(tmp_path / "ckpt.tmp", "new"), path)  # the next save recovers first, then swaps
    assert (path / "weights").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_stale_old_folder_does_not_block_the_next_save(tmp_path):
    """Killed after the new folder landed but before the old one was deleted: the next swap must not fail
    on the leftover (os.replace onto a non-empty folder does)."""
    path = _folder(tmp_path / "ckpt", "new")
    _folder(tmp_path / "ckpt.old", "old")
    replace_folder(_folder(tmp_path / "ckpt.tmp", "newer"), path)
    assert (path / "weights").read_text() == "newer" and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_metrics_line_cut_short_by_a_kill_is_dropped_on_resume(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in (1, 2, 3):
        log.write(kind="train", step=step, loss=1.0 / step)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 4, "lo')  # the kill
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    MetricsLog(tmp_path / "metrics.jsonl", keep_until_step=2)  # --resume from the checkpoint at step 2
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert not list(tmp_path.glob(".*tmp"))


def test_resume_without_a_checkpoint_says_so(tmp_path):
    from lmforge.model import DecoderLM, preset
    from lmforge.train import fit
    from lmforge.train.config import TrainConfig

    with pytest.raises(InputError, match="--resume: no checkpoint in"):
        fit(DecoderLM(preset("tiny", vocab_size=64)), None, TrainConfig(out_dir=str(tmp_path / "run")), resume=True)


def test_the_cli_names_its_writers_and_refuses_bad_counts(capsys):
    from lmforge.cli import main

    assert main(["killtest", "--list"]) == 0
    assert {"data-prepare", "tokenizer", "shards", "quantize", "pretrain"} <= {
        line.split()[0] for line in capsys.readouterr().out.splitlines()}
    assert main(["killtest", "shards", "--kills", "0"]) == 2 and "--kills must be at least 1" in capsys.readouterr().err
    assert main(["killtest", "nothing"]) == 2 and "unknown writer" in capsys.readouterr().err


def test_what_a_killed_writer_left_is_removed_when_the_folder_is_taken_again(tmp_path):
    """SIGKILL runs no clean-up: the temporary files of a writer that died stay until the next run that
    holds the folder removes them (a live writer's are left alone)."""
    import subprocess
    import sys

    from lmforge.files import output_lock, temp_path

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    folder = tmp_path / "prepared"
    folder.mkdir()
    stale = folder / f".train.jsonl.{dead.stdout.strip()}.0123abcd.tmp"
    running = folder / f".train.jsonl.{live.pid}.4567cdef.tmp"
    stale.write_text("half a split")
    running.write_text("being written")
    try:
        with output_lock(folder):
            assert not stale.exists() and running.exists()
            assert temp_path(folder / "val.jsonl").name.startswith(".val.jsonl.")
    finally:
        live.kill()
        live.wait()


def test_a_new_knowledge_base_killed_at_random_is_absent_or_whole_and_the_rerun_builds_it(tmp_path):
    """A writer that skips work when its output is current (``fresh``): killed while building a new
    output, then run again."""
    rag = next(w for w in WRITERS if w.name == "rag-index")

    def fewer(folder):
        args = rag.setup(folder)
        for extra in sorted((folder / "docs").iterdir())[12:]:
            extra.unlink()
        return args

    report = kill_writer(dataclasses.replace(rag, setup=fewer), tmp_path, kills=2, seed=3)
    assert report.kills == 2 and report.ok, report.problems
    assert report.old_kept == 0  # each kill met no earlier knowledge base


def test_new_folder_and_new_file_keep_the_old_output_when_the_write_fails(tmp_path):
    from lmforge.files import new_file, new_folder

    out = _folder(tmp_path / "model", "old")
    with pytest.raises(RuntimeError), new_folder(out, "the model") as tmp:
        (tmp / "weights").write_text("half")
        raise RuntimeError("killed")
    assert (out / "weights").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with new_folder(out, "the model") as tmp:
        (tmp / "weights").write_text("new")
    assert (out / "weights").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]

    path = tmp_path / "m.gguf"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), new_file(path) as temporary:
        temporary.write_bytes(b"ha")
        raise RuntimeError("killed")
    assert path.read_bytes() == b"old"
    with new_file(path) as temporary:
        temporary.write_bytes(b"new")
    assert path.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "model"]


def test_a_folder_that_is_not_an_earlier_output_is_not_replaced(tmp_path):
    """An export or an evaluation into a folder of someone else's files is refused: replacing the folder
    whole would delete them."""
    from lmforge.eval.run import write_outputs
    from lmforge.files import new_folder

    mine = tmp_path / "documents"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(InputError, match="holds other files and no config.json"), \
            new_folder(mine, "the model", marker="config.json"):
        pass
    with pytest.raises(InputError, match="no results.json"):
        write_outputs({"samples": {}, "tasks": {}}, mine)
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]


def test_an_export_that_fails_part_way_keeps_the_earlier_file(tmp_path, monkeypatch):
    from lmforge.interop import gguf
    from lmforge.reliability.targets import _model, tokenizer

    model = _model()
    path = gguf.save_gguf(tmp_path / "m.gguf", model.config, dict(model.state_dict()), tokenizer(), "q8_0")
    before = path.read_bytes()

    def cut(writer, *args):
        writer.write_header_to_file()  # some bytes on disk, then the process "dies"
        raise OSError("killed")

    monkeypatch.setattr(gguf, "_write_gguf", cut)
    with pytest.raises(OSError):
        gguf.save_gguf(path, model.config, dict(model.state_dict()), tokenizer(), "f32")
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_damaged_traces_and_metrics_are_refused_with_the_line(tmp_path):
    from lmforge.agent.trace import read_events

    trace = tmp_path / "t.jsonl"
    trace.write_text(json.dumps({"event": "start", "question": "Q", "config": {}, "messages": []}) + "\n"
                     + json.dumps({"event": "model", "step": "1", "reply": {}}) + "\n")
    with pytest.raises(InputError, match=r"t.jsonl:2: a 'model' event needs 'step'"):
        read_events(trace)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(InputError, match=r"metrics.jsonl:2: invalid JSON"):
        read_metrics(metrics)
