"""Freed activations go back to the system (lmforge.runtime.return_freed_memory, which fit calls with
TrainConfig.release_memory)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# Round 1 allocates and frees big blocks (glibc then raises its mmap threshold past their size); round 2
# allocates them again between small blocks that stay, as a training step's activations sit between the
# tensors it keeps, and frees them. Prints the share of round 2's memory that resident memory gave back.
PATTERN = r"""
import sys, torch
from lmforge.runtime import return_freed_memory
if sys.argv[1] == "on":
    assert return_freed_memory()
def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
big = 3 << 19  # 1.5 MiB: an activation of a small model's step
blocks = [torch.ones(big // 4) for _ in range(50)]
blocks.clear()
kept = []
for _ in range(100):
    blocks.append(torch.ones(big // 4))
    kept.append(torch.ones(1024))
before = rss()
blocks.clear()
print((before - rss()) / (100 * big))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_freed_activations_leave_resident_memory():
    def returned(setting):
        out = subprocess.run([sys.executable, "-c", PATTERN, setting], check=True, capture_output=True, text=True)
        return float(out.stdout.strip())

    assert returned("off") < 0.2  # glibc's default: the heap keeps the freed blocks
    assert returned("on") > 0.9
