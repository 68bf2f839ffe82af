"""The main job and the CLI, end to end."""

import json
import subprocess
import sys

import pytest

from rank1_pyro.cli import main


def test_demo_runs_and_writes_its_run_directory(tmp_path, capsys, monkeypatch):
    import matplotlib.pyplot as plt

    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    assert main(["demo", "--epochs", "2", "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    for method in ("deterministic", "batchensemble", "rank1-gaussian", "rank1-cauchy"):
        assert f"| {method} |" in out
    report = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(report["results"]) == {"deterministic", "batchensemble", "rank1-gaussian", "rank1-cauchy"}
    row = report["results"]["rank1-gaussian"]
    assert 0.0 <= row["rotation_ece"] <= 1.0 and row["parameters"] > report["results"]["deterministic"]["parameters"]
    # the last 200 of the 1,198 training digits are the validation set, evaluated after every epoch
    assert row["train_examples"] == 998 and [e["epoch"] for e in row["curve"]] == [1, 2]
    assert row["best_val_epoch"] in (1, 2) and "val gain" in out
    assert row["last_epochs_gain"] == pytest.approx(
        (row["curve"][0]["val_nll"] - row["curve"][1]["val_nll"]) / row["curve"][0]["val_nll"]
    )
    monkeypatch.undo()
    (fig,) = figures  # the reliability diagram: titled with the data it shows, one panel per method
    assert fig._suptitle.get_text().startswith(
        "Reliability on the rotated digits test set (rotated by 30, 45, 60 degrees"
    )
    assert [ax.get_title().split("\n")[0] for ax in fig.axes[:4]] == list(report["results"])
    close(fig)
    png = (tmp_path / "run" / "reliability.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "| method |" in (tmp_path / "run" / "results.md").read_text()


def test_bad_arguments_give_one_line_errors(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "rank1_pyro", "demo", "--epochs", "0", "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "rank1-pyro demo: error: --epochs must be >= 1, got 0"
    assert not (tmp_path / "x").exists()
    proc = subprocess.run([sys.executable, "-m", "rank1_pyro", "frobnicate"], capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr and "Traceback" not in proc.stderr


def test_help_lists_the_commands():
    proc = subprocess.run([sys.executable, "-m", "rank1_pyro", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "demo" in proc.stdout


def test_demo_objective_reaches_the_rank1_training(tmp_path, monkeypatch):
    import rank1_pyro.methods as methods
    from rank1_pyro.inference.objectives import AveragedELBO, MixtureELBO, training_objective

    seen = []
    train = methods.train

    def spy(model, guide, data, config, **kwargs):
        seen.append(type(training_objective(kwargs.get("objective", config.objective))))
        return train(model, guide, data, config, **kwargs)

    monkeypatch.setattr(methods, "train", spy)
    for flag, expected in (["--objective", "mixture"], MixtureELBO), ([], AveragedELBO):
        seen.clear()
        assert main(["demo", "--epochs", "1", *flag, "--out", str(tmp_path / str(expected)), "--no-progress"]) == 0
        # deterministic (its own default), batchensemble and the two rank-1 models (the demo's objective)
        assert seen == [AveragedELBO, expected, expected, expected]


def test_demo_refuses_a_validation_set_as_large_as_the_training_set():
    import pytest

    from rank1_pyro.commands.demo import DemoConfig, run_demo

    with pytest.raises(ValueError, match=r"val_examples must lie in \[0, 1198\), got 1198"):
        run_demo(DemoConfig(val_examples=1198))
