"""`rank1-pyro train --config` and `rank1-pyro evaluate`: a declarative run, end to end."""

import json
import subprocess
import sys

import pytest

from rank1_pyro.cli import main
from rank1_pyro.config import RunConfig, load_config


def test_train_then_evaluate_a_shipped_config(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--config", "digits_mlp", "--epochs", "2", "--out", str(run), "--no-progress"]) == 0
    assert {p.name for p in run.iterdir()} >= {"config.json", "checkpoint.pt", "metrics.json"}
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(metrics["history"]) == 2 and 0.5 < metrics["test"]["accuracy"] <= 1.0
    assert RunConfig.from_dict(json.loads((run / "config.json").read_text())).epochs == 2
    capsys.readouterr()
    assert main(["evaluate", str(run), "--samples", "2"]) == 0
    out = capsys.readouterr().out
    assert "| test |" in out and "| rotated 45 |" in out


def test_a_config_file_is_validated_before_anything_is_written(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\ndataset = "digits"\nmodel = "mlp"\nnum_classes = 10\nlearning_rate = 0.1\n')
    proc = subprocess.run(
        [sys.executable, "-m", "rank1_pyro", "train", "--config", str(bad), "--out", str(tmp_path / "run")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "unknown config key(s) ['learning_rate']; valid keys:" in proc.stderr and "base_learning_rate" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "argv, match",
    [
        (["train", "--config", "no_such_config"], "no config 'no_such_config'"),
        (["evaluate", "/nonexistent/run"], "is not a rank1-pyro run directory"),
        (["evaluate", "/tmp", "--samples", "0"], "--samples must be >= 1"),
    ],
)
def test_cli_user_errors(argv, match, capsys):
    assert main(argv) == 2
    assert match in capsys.readouterr().err


def test_mlp_config_builds_a_model_whose_sites_match_the_guide():
    cfg = load_config("digits_mlp")
    model, guide = cfg.build(num_data=100, input_shape=(1, 8, 8))
    import pyro.poutine as poutine
    import torch

    x = torch.rand(3, 1, 8, 8)
    model_sites = {n for n, s in poutine.trace(model).get_trace(x).nodes.items() if n.endswith((".r", ".s"))}
    assert model_sites == {s.name for s in guide.sites} and len(model_sites) == 6
