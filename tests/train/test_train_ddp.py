"""Data parallelism: 2 CPU processes on gloo equal 1 process with the same global batch."""

import socket
import subprocess
import sys
import textwrap

import pytest

from lmforge.train.metrics import read_metrics

SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import torch
    from lmforge.model import DecoderLM, preset
    from lmforge.train import PretrainStage, TrainConfig, fit

    out_dir, batch_size, grad_accum = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.manual_seed(0)
    model = DecoderLM(preset("tiny", vocab_size=64))
    tokens = np.tile(np.arange(50), 400).astype(np.uint16)
    stage = PretrainStage(tokens, 16, 0, val_tokens=tokens[:2000], token_bytes=[1] * 64)
    fit(model, stage, TrainConfig(out_dir=out_dir, batch_size=batch_size, grad_accum=grad_accum, seq_len=16,
        max_steps=6, warmup_steps=2, eval_every=6, eval_tokens=256, save_every=6, log_every=1,
        progress=False, dtype="fp32", device="cpu"))
""")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    subprocess.run([sys.executable, str(script), str(single), "4", "2"], check=True, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                    str(script), str(ddp), "4", "1"], check=True, timeout=300)

    def losses(path):
        return [r["loss"] for r in read_metrics(path / "metrics.jsonl") if r["kind"] == "train"]

    assert len(losses(single)) == 6
    assert losses(ddp) == pytest.approx(losses(single), rel=1e-5)
