import json
import math

import pytest
import torch

from lmforge.checkpoint import load_model
from lmforge.model import DecoderLM, preset
from lmforge.train import TrainConfig, TrainingDiverged, fit
from lmforge.train.metrics import read_metrics
from lmforge.train.schedule import learning_rate


def tiny_model(seed: int = 0, **overrides) -> DecoderLM:
    torch.manual_seed(seed)
    return DecoderLM(preset("tiny", vocab_size=64, **overrides))


def config(tmp_path, **overrides) -> TrainConfig:
    values = dict(out_dir=str(tmp_path), batch_size=4, seq_len=16, max_steps=12, warmup_steps=2, lr=3e-3,
                  eval_every=6, eval_tokens=256, save_every=6, log_every=1, progress=False, dtype="fp32")
    return TrainConfig(**{**values, **overrides})


def train_losses(path) -> list[float]:
    return [row["loss"] for row in read_metrics(path / "metrics.jsonl") if row["kind"] == "train"]


def test_loss_falls_and_checkpoint_loads(tmp_path, pattern_stage):
    model = tiny_model()
    result = fit(model, pattern_stage(), config(tmp_path, max_steps=30, eval_every=30, save_every=30))
    losses = train_losses(tmp_path)
    assert losses[-1] < losses[0] - 1.0, losses
    assert result.final["val_loss"] < math.log(64) - 1.0
    assert (tmp_path / "loss.png").stat().st_size > 1000
    reloaded = load_model(result.checkpoint)
    ids = torch.randint(0, 50, (1, 10))
    model.eval()
    torch.testing.assert_close(reloaded(ids), model(ids))


def test_resume_reproduces_the_uninterrupted_run(tmp_path, pattern_stage):
    overrides = dict(dropout=0.1)  # dropout makes the RNG state part of what must be restored
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    fit(tiny_model(**overrides), pattern_stage(), config(full_dir))
    # The same run, stopped after step 6 (its checkpoint), then resumed in a fresh process state.
    cut_config = config(cut_dir)
    _run_until(tiny_model(**overrides), pattern_stage(), cut_config, stop_at=6)
    torch.manual_seed(12345)  # a different global RNG state: resume must restore its own
    fit(tiny_model(seed=99, **overrides), pattern_stage(), cut_config, resume=True)
    full, resumed = train_losses(full_dir), train_losses(cut_dir)
    assert len(full) == len(resumed) == 12
    assert full == pytest.approx(resumed, rel=1e-6, abs=1e-6)


def test_measuring_the_matmul_peak_leaves_the_random_state_alone():
    """The loop measures the peak (for MFU) on its first call per device and dtype: drawing its matrices from
    the global generator made a run's dropout depend on whether an earlier run in the process had measured."""
    from lmforge.runtime import measure_matmul_peak

    measure_matmul_peak.cache_clear()
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    assert measure_matmul_peak("cpu", torch.float32, max_size=256) > 0
    assert torch.equal(torch.rand(4), expected)


def _run_until(model, stage, cfg: TrainConfig, stop_at: int) -> None:
    """Run ``cfg`` but crash right after the checkpoint at ``stop_at``."""
    original = stage.batch

    def batch(step, *args, **kwargs):
        if step == stop_at:
            raise KeyboardInterrupt
        return original(step, *args, **kwargs)

    stage.batch = batch
    with pytest.raises(KeyboardInterrupt):
        fit(model, stage, cfg)


def test_gradient_accumulation_equals_a_bigger_batch(tmp_path, pattern_stage):
    fit(tiny_model(), pattern_stage(), config(tmp_path / "big", batch_size=8, grad_accum=1, max_steps=5))
    fit(tiny_model(), pattern_stage(), config(tmp_path / "acc", batch_size=4, grad_accum=2, max_steps=5))
    assert train_losses(tmp_path / "big") == pytest.approx(train_losses(tmp_path / "acc"), rel=1e-5)


def test_nan_loss_stops_with_clear_message_and_keeps_last_checkpoint(tmp_path, pattern_stage):
    stage = pattern_stage()
    original_loss = stage.loss

    def loss(model, batch):
        value = original_loss(model, batch)
        return value * float("nan") if batch.get("poison") else value

    original_batch = stage.batch

    def batch(step, *args, **kwargs):
        out = original_batch(step, *args, **kwargs)
        out["poison"] = step == 8
        return out

    stage.loss, stage.batch = loss, batch
    with pytest.raises(TrainingDiverged, match="step 8"):
        fit(tiny_model(), stage, config(tmp_path))
    state = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 6
    assert all(torch.isfinite(p).all() for p in load_model(tmp_path / "checkpoint").parameters())


def test_bf16_autocast_trains(tmp_path, pattern_stage):
    result = fit(tiny_model(), pattern_stage(), config(tmp_path, dtype="bf16", max_steps=20, eval_every=20))
    losses = train_losses(tmp_path)
    assert losses[-1] < losses[0] - 0.5
    assert math.isfinite(result.final["val_loss"])


def test_schedule_warms_up_then_decays_to_the_floor():
    lrs = [learning_rate(s, 1.0, 10, 110, 0.1) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[110] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)
    assert lrs[60] == pytest.approx(0.55)


def test_weight_decay_skips_vectors():
    from lmforge.train.optim import build_optimizer

    model = tiny_model()
    decay, no_decay = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95)).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("release", [False, True])
def test_release_memory_sets_the_allocator_only_when_asked(tmp_path, pattern_stage, monkeypatch, release):
    calls = []
    monkeypatch.setattr("lmforge.train.loop.return_freed_memory", lambda: calls.append(1))
    fit(tiny_model(), pattern_stage(), config(tmp_path, max_steps=1, eval_every=0, device="cpu",
                                              release_memory=release))
    assert len(calls) == int(release)
