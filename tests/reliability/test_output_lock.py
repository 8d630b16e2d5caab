"""Two runs, one folder (issue 17, point 4): a second run writing into an output folder in use is refused
with a clear message; the lock goes with its process, SIGKILL included."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lmforge.cli import main
from lmforge.errors import InputError
from lmforge.files import output_lock

HOLD = """
import sys, time
from lmforge.files import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def held(tmp_path):
    """A folder held by another process (``held.pid``) until the test kills it."""
    folder = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE)
    assert process.stdout.readline() == b"held\n"
    yield folder, process
    process.kill()
    process.wait()


def test_a_second_run_into_a_folder_in_use_is_refused_until_the_first_dies(held):
    folder, process = held
    with pytest.raises(InputError, match=rf"out is in use by another lmforge run \(pid {process.pid}, since"):
        with output_lock(folder):
            pass
    process.kill()  # SIGKILL: no clean-up runs, the kernel drops the lock with the process
    process.wait()
    with output_lock(folder):
        pass


def test_the_commands_that_write_refuse_a_folder_in_use(held, tmp_path, capsys):
    folder, process = held
    (tmp_path / "a.txt").write_text("Some text long enough to keep. " * 10)
    assert main(["data", "prepare", str(tmp_path / "a.txt"), "--out", str(folder)]) == 2
    assert f"is in use by another lmforge run (pid {process.pid}" in capsys.readouterr().err
    assert not folder.exists()  # nothing was written into it


def test_the_lock_nests_within_one_process_and_outlives_a_replaced_folder(tmp_path):
    import os

    folder = tmp_path / "ckpt"
    with output_lock(folder):
        with output_lock(folder):  # the speedrun holds its folder, its pretraining takes it again
            folder.mkdir()
            os.rename(folder, tmp_path / "old")  # a checkpoint is replaced whole ...
            folder.mkdir()
        probe = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(120)", "pass"), str(folder)],
                               capture_output=True, text=True)
        assert probe.returncode != 0 and "is in use by another lmforge run" in probe.stderr  # ... and stays held
    probe = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(120)", "pass"), str(folder)],
                           capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
