"""The benchmark scripts run (their smoke modes, as a user would start them), so they cannot rot.

Their logic is theirs alone: a benchmark measures the library, it does not extend it, so the tests
start them as processes instead of importing them."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _run(*argv, env=None):
    proc = subprocess.run(
        [sys.executable, *map(str, argv)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_speed_and_step_floor_benchmarks_run_on_tiny_networks(tmp_path):
    out = _run("benchmarks/speed.py", "--smoke", "--device", "cpu", "--out", tmp_path / "speed.json")
    assert "hand-written baseline trains" in out  # the baseline minimises the same mixture ELBO
    timings = json.loads((tmp_path / "speed.json").read_text())["timings_s"]
    assert set(timings) == {
        "pyro_step",
        "hand_step",
        "deterministic_KB_step",
        "mean_field_bnn_step",
        "lenet5_tiled_step",
        "lenet5_split_step",
        "predictive_vectorized_small",
        "predictive_loop_small",
        "predictive_vectorized_large",
        "predictive_loop_large",
    }
    assert all(math.isfinite(t) and t > 0 for t in timings.values()), timings
    floor = json.loads((tmp_path / "step_floor.json").read_text())
    assert floor["steps"] and all(r["pyro/det"] > 0 and r["pyro/hand"] > 0 for r in floor["steps"])


def test_gpu_check_skips_cleanly_without_cuda():
    out = _run("benchmarks/gpu_check.py", env={"CUDA_VISIBLE_DEVICES": ""})
    assert "CUDA is not available on this machine; nothing to check (skipped)" in out


def test_quality_benchmark_help():
    assert "--quick" in _run("benchmarks/quality.py", "--help")


def test_regression_benchmark_runs_on_diabetes_and_reports_in_target_units(tmp_path):
    out = _run("benchmarks/regression.py", "--smoke", "--out", tmp_path)
    report = json.loads((tmp_path / "results.json").read_text())
    methods = ["deterministic", "subnet-laplace", "projected", "deep-ensemble"]
    methods += ["rank1-gaussian-avg", "rank1-gaussian-mix", "rank1-cauchy-avg"]
    assert list(report["summary"]) == methods and all(f"| {m} |" in out for m in methods)
    for rows in report["per_split"].values():
        assert len(rows) == 2
        for row in rows:  # the standardised metrics, mapped to the target's units (diabetes: sigma_y about 77)
            assert row["rmse"] / row["clean_rmse"] == pytest.approx(math.exp(row["nll"] - row["clean_nll"]))
            assert 60 < row["rmse"] / row["clean_rmse"] < 90 and 0 <= row["coverage95"] <= 1
    # the paired table: each method minus the deterministic net, split by split
    det, r1 = report["per_split"]["deterministic"], report["per_split"]["rank1-gaussian-avg"]
    diffs = [a["nll"] - b["nll"] for a, b in zip(r1, det)]
    mean, std = sum(diffs) / 2, abs(diffs[0] - diffs[1]) / 2**0.5
    lower = sum(d < 0 for d in diffs)
    assert "| rank1-gaussian-avg | " in out and f"| {mean:.3f} ± {std:.3f} | {lower}/2 |" in out
    # --report rebuilds the same Markdown from the JSON alone
    markdown = (tmp_path / "results.md").read_text()
    (tmp_path / "results.md").unlink()
    _run("benchmarks/regression.py", "--report", "--out", tmp_path)
    assert (tmp_path / "results.md").read_text() == markdown


def test_quality_benchmark_plans_three_seeds_for_the_main_rows_and_one_with_quick():
    full = _run("benchmarks/quality.py", "--dry-run").splitlines()[1:]
    quick = _run("benchmarks/quality.py", "--quick", "--dry-run").splitlines()[1:]
    # 8 trained models (the post-hoc posteriors run in their base's job) on seed 0, the 5 main ones on 1 and 2
    assert len(full) == 8 + 5 * 2 and len(quick) == 8
    assert "seed 0: deterministic + subnet-laplace + projected" in full and all(j.startswith("seed 0:") for j in quick)
    main = {"deterministic", "deep-ensemble", "batchensemble", "rank1-gaussian-avg", "rank1-cauchy-avg"}
    assert {j.split(": ")[1].split(" ")[0] for j in full if not j.startswith("seed 0")} == main
    same = _run("benchmarks/quality.py", "--quick", "--dry-run", "--main-seeds", "0", "1").splitlines()[1:]
    assert len(same) == 8 + 5
