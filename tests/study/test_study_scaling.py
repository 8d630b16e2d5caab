"""The scaling study: fits that recover known laws, and a small study end to end (resumed, refused)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lmforge.cli import main
from lmforge.study.fit import (
    LossSurface,
    bootstrap_surface,
    fit_compute_power_law,
    fit_isoflop,
    fit_loss_surface,
)

TRUE = LossSurface(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28, huber=0.0)  # Hoffmann et al.'s fit


def ladder(noise: float = 0.003, seed: int = 0):
    rng = np.random.default_rng(seed)
    n = np.repeat([1e5, 3e5, 1e6, 3e6, 1e7], 4)
    d = np.tile([1e6, 4e6, 1.6e7, 6.4e7], 5)
    loss = np.array([TRUE(a, b) for a, b in zip(n, d)]) * np.exp(rng.normal(0, noise, len(n)))
    return n, d, loss


def test_the_loss_surface_fit_recovers_known_exponents_and_its_intervals_hold_them():
    n, d, loss = ladder()
    fitted = fit_loss_surface(n, d, loss)
    assert fitted.alpha == pytest.approx(TRUE.alpha, abs=0.04) and fitted.beta == pytest.approx(TRUE.beta, abs=0.04)
    assert fitted(3e7, 2e8) == pytest.approx(TRUE(3e7, 2e8), rel=0.02)  # extrapolated past every run
    ci = bootstrap_surface(n, d, loss, fitted, samples=15, seed=1, flops=1e17)
    assert ci["alpha"][0] <= TRUE.alpha <= ci["alpha"][1] and ci["beta"][0] <= TRUE.beta <= ci["beta"][1]
    true_n, true_d = TRUE.optimal(1e17)
    assert 6 * true_n * true_d == pytest.approx(1e17)
    assert ci["tokens_per_parameter"][0] < true_d / true_n < ci["tokens_per_parameter"][1]
    with pytest.raises(ValueError, match="5 runs"):
        fit_loss_surface(n[:4], d[:4], loss[:4])


def test_isoflop_parabolas_find_each_budgets_best_size_and_the_power_law_its_slope():
    runs = []
    for flops in (1e15, 1e16, 1e17):
        best = 0.1 * flops ** 0.5  # N_opt = 0.1 C^0.5
        for factor in (0.25, 0.5, 1.0, 2.0, 4.0):
            n = best * factor
            runs.append({"flops": flops, "parameters": n, "loss": 2.0 + 0.1 * math.log(factor) ** 2})
    iso = fit_isoflop(runs)
    assert [b["n_opt"] for b in iso.budgets] == pytest.approx([0.1 * f ** 0.5 for f in (1e15, 1e16, 1e17)], rel=1e-6)
    assert iso.n_exponent == pytest.approx(0.5) and iso.d_exponent == pytest.approx(0.5)
    assert all(b["inside"] for b in iso.budgets)
    law = fit_compute_power_law([1e15, 1e16, 1e17], [5 * c ** -0.05 for c in (1e15, 1e16, 1e17)])
    assert (law.coefficient, law.exponent) == pytest.approx((5.0, 0.05))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    text = "\n\n".join(f"def function_{i}(value):\n    \"\"\"Return value times {i}.\"\"\"\n    return value * {i}\n"
                       for i in range(600))
    (root / "corpus.md").write_text(text, encoding="utf-8")
    return root


def study_args(root, *extra):
    return ["study", "scaling", "--inputs", str(root / "corpus.md"), "--out", str(root / "study"), "--sizes", "d32l1",
            "d32l2", "d64l1", "--budgets", "3e8", "1e9", "--holdout", "d64l2@2e9", "--vocab-size", "300",
            "--seq-len", "32", "--batch-size", "4", "--min-steps", "5", "--eval-tokens", "2048", "--bootstrap", "10",
            "--minutes", "5", "--progress", "false", *extra]


def test_a_small_study_runs_predicts_its_held_out_run_first_and_resumes(corpus, capsys):
    assert main(study_args(corpus)) == 0
    out = capsys.readouterr().out
    study = corpus / "study"
    results = json.loads((study / "results.json").read_text())
    assert len(results["runs"]) == 7 and [r["holdout"] for r in results["runs"]].count(True) == 1
    assert out.index("predicted final loss of d64l2@2e9") < out.index("d64l2@2e9: 106,816 parameters")
    prediction, held = results["prediction"], results["runs"][-1]
    assert prediction["actual_loss"] == held["loss"]
    assert prediction["error"] == pytest.approx(prediction["predicted_loss"] - held["loss"])
    for r in results["runs"]:  # each run trained for its budget: D = C / 6N, in whole steps of 128 tokens
        assert r["tokens"] == round(r["flops"] / (6 * r["parameters"]) / 128) * 128 and math.isfinite(r["loss"])
    assert {"compute_power_law", "isoflop", "surface"} <= set(results["fits"])
    for name in ("results.md", "loss_vs_compute.png", "isoflop.png", "surface.png"):
        assert (study / name).stat().st_size > 0
    assert "Prediction of the held-out run" in (study / "results.md").read_text()
    # a rerun reads every finished run back and keeps the prediction made before the held-out run trained
    stamps = {p: p.stat().st_mtime_ns for p in study.glob("runs/*/result.json")}
    assert main(study_args(corpus)) == 0
    assert "7 runs (7 finished)" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in study.glob("runs/*/result.json")} == stamps
    assert json.loads((study / "results.json").read_text())["prediction"] == prediction


def test_bad_studies_are_refused_with_the_reason(corpus, capsys):
    other = ["--out", str(corpus / "other")]
    assert main(study_args(corpus, *other, "--minutes", "0.0001")) == 2  # prepares the data, times, refuses
    assert "more than --minutes" in capsys.readouterr().err
    assert main(study_args(corpus, *other, "--seq-len", "16")) == 2  # the folder holds a study with --seq-len 32
    assert "seq_len 32 -> 16" in capsys.readouterr().err
    assert main(study_args(corpus, *other, "--budgets", "1e7", "1e9")) == 2  # 1e7: every size too big
    err = capsys.readouterr().err
    assert "fewer than 5 runs to fit the five parameters" in err and "train for only" in err
    assert main(study_args(corpus, *other, "--sizes", "d30l1", "d32l2", "d64l1")) == 2
    assert "multiple of 32" in capsys.readouterr().err
    assert main(study_args(corpus, *other, "--budgets", "1e9")) == 2
    assert "five runs" in capsys.readouterr().err
    assert main(study_args(corpus, *other, "--holdout", "d32l1@1e11", "--max-epochs", "2")) == 2
    assert "more than 2 x the" in capsys.readouterr().err  # the data read more than twice
