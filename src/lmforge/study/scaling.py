"""``lmforge study scaling``: train a ladder of model sizes at several compute budgets and fit the laws.

    lmforge study scaling                                  # the default ladder: about 30 minutes on 2 CPU cores
    lmforge study scaling --sizes d64l2 d128l4 --budgets 1e11 3e11 --minutes 10 --out runs/small-study

Every (size, budget) pair is one run of the normal pretraining recipe (``lmforge pretrain``:
the same stage, loop, schedule and checkpoints) for D = budget / (6 N) tokens, where N is the
model's parameters without embeddings; its final validation loss is measured on the same
held-out tokens for every run. Then :mod:`lmforge.study.fit` reads the ladder three ways
(compute frontier, IsoFLOP parabolas, the L(N, D) surface with bootstrap intervals), and the
surface predicts the final loss of a larger held-out run before that run is trained; the
prediction's error is reported. Everything lands in ``--out``: the data, tokenizer and
shards, one folder per run, ``results.json``, ``results.md`` and the plots. A study that
stops resumes where it stopped: finished runs are read back, an interrupted one continues
from its last checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from lmforge.files import read_json, write_json_atomic
from lmforge.runtime import Runtime
from lmforge.settings import field, to_dict
from lmforge.study.fit import (
    LossSurface,
    bootstrap_surface,
    fit_compute_power_law,
    fit_isoflop,
    fit_loss_surface,
)
from lmforge.study.ladder import (
    SAME_LADDER,
    LadderConfig,
    check_same_study,
    check_time,
    frontier,
    parse_holdout,
    parse_size,
    plan,
    run_one,
)
from lmforge.train import PretrainStage


@dataclass
class ScalingConfig(LadderConfig):
    """A scaling study: the ladder, its data, the held-out run and the bootstrap."""

    out: str = field("runs/study-scaling", "folder of the study (data, runs, results); rerun to resume")
    inputs: list[str] = field(["builtin"], "training text (files, folders, globs, builtin, hf:NAME)")
    holdout: str = field("d256l6@1.2e13", "the larger run the fits predict before it is trained: SIZE@FLOPS ('' skips)")
    max_bytes: int = field(0, "cap on the prepared corpus in bytes (0: all of it)")
    bootstrap: int = field(100, "resamples for the confidence intervals of the loss surface")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.holdout:
            parse_size(parse_holdout(self.holdout)[0])
        if len(self.sizes) * len(self.budgets) < 5:
            raise ValueError(f"{len(self.sizes)} sizes x {len(self.budgets)} budgets: the L(N, D) fit has five "
                             "parameters and needs five runs at least")


SAME_STUDY = (*SAME_LADDER, "inputs", "max_bytes")


def prepare(config: ScalingConfig, out: Path):
    """The study's data, tokenizer and shards (made once, then read back); returns the tokenizer."""
    from lmforge.data import DataConfig, iter_prepared, prepare_data, write_shards
    from lmforge.tokenizer import Tokenizer, train_tokenizer

    if not (out / "data" / "manifest.json").is_file():
        prepare_data(config.inputs, out / "data", DataConfig(seed=config.seed, max_bytes=config.max_bytes or None),
                     progress=config.progress)
    if not (out / "tokenizer.json").is_file():
        tokenizer = train_tokenizer(iter_prepared(out / "data", "train"), config.vocab_size, progress=config.progress)
        tokenizer.save(out / "tokenizer.json")
    tokenizer = Tokenizer.from_file(out / "tokenizer.json")
    if not (out / "shards" / "meta.json").is_file():
        write_shards(out / "data", tokenizer, out / "shards", progress=config.progress)
    return tokenizer


def fits(rows: list[dict], bootstrap: int, seed: int, at_flops: float) -> dict:
    """The three readings of the ladder (held-out run excluded)."""
    ladder = [r for r in rows if not r["holdout"]]
    best = frontier(ladder)
    out: dict = {}
    if len(best) >= 2:
        law = fit_compute_power_law([b["flops"] for b in best], [b["loss"] for b in best])
        out["compute_power_law"] = {"coefficient": law.coefficient, "exponent": law.exponent, "points": law.points}
    iso = fit_isoflop(ladder)
    out["isoflop"] = {"budgets": iso.budgets, "n_exponent": iso.n_exponent, "d_exponent": iso.d_exponent}
    n, d, loss = ([r[k] for r in ladder] for k in ("parameters", "tokens", "loss"))
    surface = fit_loss_surface(n, d, loss)
    n_opt, d_opt = surface.optimal(at_flops)
    out["surface"] = {**surface.to_dict(), "ci95": bootstrap_surface(n, d, loss, surface, bootstrap, seed, at_flops),
                      "at_flops": at_flops, "n_opt": n_opt, "d_opt": d_opt, "tokens_per_parameter": d_opt / n_opt,
                      "bootstrap": bootstrap}
    return out


def scaling_study(config: ScalingConfig) -> Path:
    """Run (or resume) the study; returns the path of results.md."""
    from lmforge.data.shards import load_shard

    out = Path(config.out)
    check_same_study(config, out, SAME_STUDY)
    tokenizer = prepare(config, out)
    train_tokens = load_shard(out / "shards", "train")
    runs, skipped = plan(config, tokenizer.vocab_size, len(train_tokens), config.holdout, minimum=5,
                         why_minimum=" to fit the five parameters of L(N, D)")
    for why in skipped:
        print(f"[study] left out {why}", flush=True)
    stage = PretrainStage(train_tokens, config.seq_len, config.seed, val_tokens=load_shard(out / "shards", "val"),
                          token_bytes=tokenizer.token_byte_lengths())
    check_time(config, runs, stage, tokenizer.vocab_size, out)
    rows = []
    results: dict = {"config": to_dict(config), "runtime": Runtime.resolve(config.device, config.dtype).describe(),
                     "data_tokens": len(train_tokens), "skipped": skipped}
    earlier = read_json(out / "results.json", "a study result") if (out / "results.json").is_file() else {}
    prediction = earlier.get("prediction")  # made before the held-out run first trained: kept as it was
    if prediction is not None and prediction.get("run") == next((r.name for r in runs if r.holdout), None):
        results.update(fits=earlier["fits"], prediction=prediction)
    else:
        prediction = None
    for run in runs:
        if run.holdout and prediction is None:  # fit the ladder and write the prediction down before training
            ladder_fits = fits(rows, config.bootstrap, config.seed, run.flops)
            predicted = LossSurface.from_dict(ladder_fits["surface"])(run.parameters, run.tokens)
            prediction = {"run": run.name, "predicted_loss": predicted, "made_before_training": time.time()}
            results.update(fits=ladder_fits, prediction=prediction)
            write_json_atomic(out / "results.json", results)
            print(f"[study] predicted final loss of {run.name}: {predicted:.4f}", flush=True)
        print(f"[study] {run.name}: {run.parameters:,} parameters, {run.tokens:,} tokens, {run.steps} steps",
              flush=True)
        rows.append(run_one(config, run, stage, tokenizer, out))
    if prediction is None:
        results["fits"] = fits(rows, config.bootstrap, config.seed, max(config.budgets))
    else:
        actual = next(r for r in rows if r["holdout"])["loss"]
        prediction.update(actual_loss=actual, error=prediction["predicted_loss"] - actual,
                          relative_error=(prediction["predicted_loss"] - actual) / actual)
    results["runs"] = rows
    write_json_atomic(out / "results.json", results)
    from lmforge.study.report import write_scaling_report

    return write_scaling_report(out, results)
