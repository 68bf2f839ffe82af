"""Runs that are reproducible and never lost (issue 19): every case through the API and the CLI.

Tables, one row per case, grouped as in docs/reliability.md:

* ``LOST``: a finished run must survive every command that could replace or mix it;
* ``WRONG``: cases that used to give a silently wrong result;
* ``API_ERRORS`` / ``CLI_ERRORS``: bad inputs that must give one clear line (or be accepted and
  converted), never a raw traceback;
* ``PHASES``: Ctrl-C at each phase of a run (before the first checkpoint, mid-epoch, while
  writing the checkpoint, the metrics, the manifest), of a new run and of a replacement;
* concurrent writers and a killed writer, as real processes.

Every CLI case runs ``rank1_pyro.cli.main`` on a tiny digits config (2 epochs, a 16-unit MLP).
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import rank1_pyro.runs as runs
from rank1_pyro import MixtureGuide, metrics, rank1_mlp
from rank1_pyro.cli import main
from rank1_pyro.inference.checkpoint import CheckpointError
from rank1_pyro.inference.predictive import Rank1Posterior, evaluate, predict
from rank1_pyro.inference.train import train

MANIFEST_FILE = "run.json"


def read_manifest(run):
    return runs.read_manifest(run)


def run_state(run):
    return runs.run_state(run)


TINY = """
name = "tiny"
dataset = "digits"
model = "mlp"
model_args = {{ hidden = [{hidden}] }}
num_classes = 10
ensemble_size = 2
objective = "mixture"
epochs = 2
per_core_batch_size = 256
num_cores = 1
optimizer = "adam"
base_learning_rate = 3e-3
lr_reference_batch = 128
warmup_epochs = 0
decay_epochs = []
kl_annealing_epochs = 1
l2 = 5e-5
seed = {seed}
"""
RUN_FILES = ("config.json", "checkpoint.pt", "metrics.json", "history.csv", "run.json")


def write_config(directory: Path, name="tiny.toml", hidden=16, seed=0) -> Path:
    path = directory / name
    path.write_text(TINY.format(hidden=hidden, seed=seed))
    return path


def snapshot(run: Path) -> dict:
    return {name: (run / name).read_bytes() for name in RUN_FILES if (run / name).exists()}


def weights(run: Path) -> dict:
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    return {
        **{f"model.{k}": v for k, v in ckpt["model"].items()},
        **{f"guide.{k}": v for k, v in ckpt["guide"].items()},
    }


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def one_line_error(capsys, pattern: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert pattern in err, err
    return err


def cli(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    d = tmp_path_factory.mktemp("configs")
    return {
        "tiny": write_config(d),
        "other_arch": write_config(d, "other.toml", hidden=8),
        "seed1": write_config(d, "seed1.toml", seed=1),
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory, configs):
    """A finished, uninterrupted run of the tiny config (seed 0)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    assert cli("train", "--config", configs["tiny"], "--out", run, "--no-progress") == 0
    return run


@pytest.fixture
def finished(tmp_path, reference):
    """A copy of the reference run, to be attacked."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    return run


# ------------------------------------------------------------------------------------------
# Lost data: the finished run survives, byte for byte
# ------------------------------------------------------------------------------------------
LOST = [
    (
        "train-into-finished-run",
        lambda run, c: ["train", "--config", c["tiny"], "--out", run],
        2,
        "already holds a finished run; pass --resume to continue it, --overwrite to replace it",
    ),
    (
        "resume-other-architecture",
        lambda run, c: ["train", "--config", c["other_arch"], "--out", run, "--resume"],
        2,
        "the config differs from",
    ),
    ("resume-other-seed", lambda run, c: ["train", "--config", c["seed1"], "--out", run, "--resume"], 2, "['seed']"),
    (
        "resume-fewer-epochs",
        lambda run, c: ["train", "--out", run, "--resume", "--epochs", "1"],
        2,
        "has trained 2 epochs already; --epochs 1 is fewer",
    ),
    ("resume-and-overwrite", lambda run, c: ["train", "--out", run, "--resume", "--overwrite"], 2, "give one of them"),
    ("train-without-config", lambda run, c: ["train", "--out", run], 2, "--config is required"),
]


@pytest.mark.parametrize("argv, code, message", [c[1:] for c in LOST], ids=[c[0] for c in LOST])
def test_a_finished_run_is_never_replaced_or_mixed(finished, configs, argv, code, message, capsys):
    before = snapshot(finished)
    assert cli(*argv(finished, configs)) == code
    one_line_error(capsys, message)
    assert snapshot(finished) == before
    assert not (finished.parent / f".{finished.name}.staging").exists()
    assert cli("evaluate", finished, "--samples", "2") == 0  # still a usable run


@pytest.mark.parametrize("target", ["new", "finished"])
def test_a_run_directory_locked_by_another_process_is_refused(tmp_path, finished, configs, target, capsys):
    run = tmp_path / "new-run" if target == "new" else finished
    run.mkdir(exist_ok=True)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from rank1_pyro.runs import lock_run\n"
            "with lock_run(sys.argv[1]):\n    print('locked', flush=True); time.sleep(120)",
            str(run),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(run)
        argv = ["train", "--config", configs["seed1"], "--out", run, "--no-progress"]
        assert cli(*argv, *([] if target == "new" else ["--overwrite"])) == 2
        one_line_error(capsys, f"is locked: another process (pid {holder.pid}) is training into it")
        assert snapshot(run) == before
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert (
        cli(
            "train",
            "--config",
            configs["seed1"],
            "--out",
            run,
            "--no-progress",
            *([] if target == "new" else ["--overwrite"]),
        )
        == 0
    )  # the holder is gone: so is its lock


def test_concurrent_writers_one_wins_and_the_other_is_refused(tmp_path, configs):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [
        sys.executable,
        "-m",
        "rank1_pyro",
        "train",
        "--config",
        str(configs["tiny"]),
        "--out",
        str(run),
        "--no-progress",
        "--epochs",
        "4",
    ]
    procs = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    err = next(e for code, e in results if code == 2).strip()
    assert len(err.splitlines()) == 1 and ("is locked: another process (pid" in err or "already holds" in err), err
    manifest = read_manifest(run)  # the winner's run, every file verified against the manifest
    assert manifest["epochs"] == 4 and len(json.loads((run / "metrics.json").read_text())["history"]) == 4


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "sigkill"])
def test_a_killed_writer_leaves_no_lock_and_its_run_resumes_bit_identically(tmp_path, configs, reference, sig):
    run = tmp_path / "run"
    argv = [
        sys.executable,
        "-m",
        "rank1_pyro",
        "train",
        "--config",
        str(configs["tiny"]),
        "--out",
        str(run),
        "--no-progress",
        "--checkpoint-every",
        "2",
    ]
    proc = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoint.pt").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(sig)  # mid-epoch, just after a checkpoint
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        err = proc.stderr.read().decode()
        proc.stderr.close()
    if code == 0:  # finished before the signal arrived: nothing left to resume
        pytest.skip("the run finished before the signal reached it")
    if sig == signal.SIGINT:
        assert code == 130 and err.strip().splitlines()[-1] == "rank1-pyro train: interrupted", err
    else:
        assert code == -signal.SIGKILL
    assert cli("train", "--out", run, "--resume", "--no-progress") == 0  # no stale lock; config from the run
    assert_same_weights(weights(run), weights(reference))


# ------------------------------------------------------------------------------------------
# Silently wrong results
# ------------------------------------------------------------------------------------------
def test_one_config_one_seed_gives_bit_identical_runs_and_evaluations(tmp_path, configs, reference, capsys):
    again = tmp_path / "again"
    assert cli("train", "--config", configs["tiny"], "--out", again, "--no-progress") == 0
    assert_same_weights(weights(again), weights(reference))
    assert (
        json.loads((again / "metrics.json").read_text())["test"]
        == json.loads((reference / "metrics.json").read_text())["test"]
    )
    capsys.readouterr()
    outputs = []
    for run in (reference, again, again):
        assert cli("evaluate", run, "--samples", "3") == 0
        outputs.append(capsys.readouterr().out.splitlines()[1:])  # the first line names the directory
    assert outputs[0] == outputs[1] == outputs[2]
    manifest = read_manifest(again)
    assert manifest["seed"] == 0 and {"torch", "pyro", "numpy", "python", "rank1_pyro"} <= set(manifest["versions"])


def test_another_seed_gives_another_run(tmp_path, configs, reference):
    other = tmp_path / "other"
    assert cli("train", "--config", configs["seed1"], "--out", other, "--no-progress") == 0
    assert not torch.equal(weights(other)["model.net.1.weight"], weights(reference)["model.net.1.weight"])


def test_resume_with_more_epochs_records_them_everywhere(finished):
    assert cli("train", "--out", finished, "--resume", "--epochs", "3", "--no-progress") == 0
    config = json.loads((finished / "config.json").read_text())
    history = json.loads((finished / "metrics.json").read_text())["history"]
    assert config["epochs"] == 3 and len(history) == 3 and read_manifest(finished)["epochs"] == 3
    assert [h["epoch"] for h in history] == [1, 2, 3]


def test_overwrite_replaces_a_finished_run_only_when_the_new_one_has_finished(finished, configs):
    assert cli("train", "--config", configs["seed1"], "--out", finished, "--overwrite", "--no-progress") == 0
    assert json.loads((finished / "config.json").read_text())["seed"] == 1 and read_manifest(finished)["seed"] == 1
    assert not (finished.parent / f".{finished.name}.staging").exists()


def test_a_file_changed_after_the_run_finished_is_detected(finished, configs, capsys):
    config = json.loads((finished / "config.json").read_text())
    config["model_args"] = {"hidden": [8]}  # a config of another run copied over this one
    (finished / "config.json").write_text(json.dumps(config))
    assert cli("evaluate", finished) == 2
    one_line_error(capsys, "config.json does not belong to this run")


@pytest.mark.parametrize("command", ["diagnose", "laplace", "evaluate"])
@pytest.mark.parametrize(
    "layout, missing",
    [("mistyped", "does not exist"), ("no-checkpoint", "missing checkpoint.pt"), ("no-config", "missing config.json")],
)
def test_commands_never_train_a_substitute_for_a_missing_run(tmp_path, finished, command, layout, missing, capsys):
    if layout == "mistyped":
        run = tmp_path / "runn"
    else:
        run = finished
        (run / ("checkpoint.pt" if layout == "no-checkpoint" else "config.json")).unlink()
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert cli(command, run, "--samples", "8") == 2
    one_line_error(capsys, missing)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing trained, nothing written


def test_no_command_has_a_substitute_model_flag(capsys):
    """The stand-in models are gone: a command without a run says which `train` to run instead."""
    for command, flag in (("diagnose", "--train-digits"), ("laplace", "--map-mlp")):
        with pytest.raises(SystemExit):
            main([command, "runs/none", flag])
        assert "unrecognized arguments" in capsys.readouterr().err


def tiny_model(out=2, likelihood="categorical"):
    torch.manual_seed(0)
    model = rank1_mlp(2, [4], out, ensemble_size=2, likelihood=likelihood)
    return model, MixtureGuide(model)


def toy(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    return x, (x[:, 0] > x[:, 1]).long()


def test_resume_on_other_data_of_the_same_size_is_refused(tmp_path):
    model, guide = tiny_model()
    train(model, guide, toy(seed=0), epochs=1, batch_size=16, progress=False, seed=0, checkpoint_dir=tmp_path)
    model, guide = tiny_model()
    with pytest.raises(CheckpointError, match=r"trained on other data of the same size"):
        train(
            model,
            guide,
            toy(seed=1),
            epochs=2,
            batch_size=16,
            progress=False,
            seed=0,
            checkpoint_dir=tmp_path,
            resume=True,
        )
    model, guide = tiny_model()  # the same data resumes
    train(
        model, guide, toy(seed=0), epochs=2, batch_size=16, progress=False, seed=0, checkpoint_dir=tmp_path, resume=True
    )


# ------------------------------------------------------------------------------------------
# Raw errors -> one clear error, or the input accepted and converted
# ------------------------------------------------------------------------------------------
def _train_numpy_float64():
    x, y = toy()
    model, guide = tiny_model()
    history = train(model, guide, (x.double().numpy(), y.numpy()), epochs=1, batch_size=16, progress=False)
    assert len(history.epochs) == 1 and math.isfinite(history.last["loss"])
    return evaluate(model, guide, (x.double().numpy(), y.numpy()), num_samples=2)


def _train_float64_loader():
    x, y = toy()
    model, guide = tiny_model()
    train(model, guide, DataLoader(TensorDataset(x.double(), y), batch_size=16), epochs=1, progress=False)
    return model.net[0].weight.dtype


def _predict_numpy():
    x, _ = toy()
    model, guide = tiny_model()
    post = Rank1Posterior(model, guide)
    torch.manual_seed(1)
    a = predict(post, x.double().numpy(), num_samples=2).probs
    torch.manual_seed(1)
    b = predict(post, x, num_samples=2).probs
    assert torch.allclose(a, b, atol=1e-6)
    return a.dtype


def _late_bad_label():
    x, y = toy(64)
    y = y.clone()
    y[40] = 7  # in the third batch of 16: the first batch (validated by Pyro) is fine
    model, guide = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    try:
        train(model, guide, loader, epochs=1, progress=False)
    finally:  # stopped before the bad update: the last good values, finite
        assert all(torch.isfinite(v).all() for v in model.state_dict().values())
        assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def _checkpoint_dir_is_a_file(tmp):
    f = tmp / "a-file"
    f.write_text("not a directory")
    model, guide = tiny_model()
    calls = []
    orig = guide.forward
    guide.forward = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        train(model, guide, toy(), epochs=1, batch_size=16, progress=False, checkpoint_dir=f)
    finally:
        assert not calls  # refused before the first step
        assert f.read_text() == "not a directory"


def _subnet(x, y, **kwargs):
    from rank1_pyro.laplace import SubnetLaplace

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3))
    return SubnetLaplace(net, "classification", "largest-magnitude", 20, **kwargs).fit((x, y))


def _projected(x, y, kind="loss"):
    from rank1_pyro.laplace import ProjectedPosterior

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3))
    return ProjectedPosterior(net, "categorical", kind=kind, alpha=1.0, num_iterations=2).fit((x, y))


def _with_nan(x):
    x = x.clone()
    x[5, 1] = math.nan
    return x


def _netcdf_missing_dir(tmp):
    import xarray as xr

    from rank1_pyro.diagnostics import to_netcdf

    to_netcdf(xr.DataTree(), tmp / "no" / "such" / "dir" / "t.nc")


def _marglik(delta):
    x, y = toy()
    return _subnet(x, y % 3).log_marginal_likelihood(delta)


X3, Y3 = toy()
# (id, thunk(tmp), expected): an exception type and message, or a check of the accepted result
API_ERRORS = [
    ("numpy-float64-train-and-evaluate", lambda tmp: _train_numpy_float64(), ("ok", lambda r: 0 <= r["accuracy"] <= 1)),
    ("float64-loader", lambda tmp: _train_float64_loader(), ("ok", lambda r: r == torch.float32)),
    ("numpy-predict", lambda tmp: _predict_numpy(), ("ok", lambda r: r == torch.float32)),
    (
        "numpy-pair-accepted",
        lambda tmp: train(*tiny_model(), (X3.numpy(), Y3.numpy()), epochs=1, batch_size=16, progress=False),
        ("ok", lambda r: len(r.epochs) == 1),
    ),
    (
        "numpy-object-array",
        lambda tmp: train(*tiny_model(), (np.array([object()] * 48), Y3.numpy()), epochs=1, progress=False),
        (TypeError, r"cannot use a numpy array of dtype object"),
    ),
    (
        "label-out-of-range-in-a-later-batch",
        lambda tmp: _late_bad_label(),
        (ValueError, r"labels out of range at epoch 0, step 2 \(global step 2\): expected 0\.\.1"),
    ),
    ("checkpoint-dir-is-a-file", _checkpoint_dir_is_a_file, (ValueError, r"checkpoint_dir .*a-file is a file")),
    (
        "subnet-laplace-labels-out-of-range",
        lambda tmp: _subnet(X3, Y3 + 3),
        (ValueError, r"labels out of range: expected 0\.\.2, got min 3, max 4"),
    ),
    (
        "subnet-laplace-nan-inputs",
        lambda tmp: _subnet(_with_nan(X3), Y3),
        (ValueError, r"inputs contain NaN or infinite values"),
    ),
    (
        "projected-nan-inputs",
        lambda tmp: _projected(_with_nan(X3), Y3),
        (ValueError, r"inputs contain NaN or infinite values"),
    ),
    (
        "projected-labels-out-of-range",
        lambda tmp: _projected(X3, Y3 + 3),
        (ValueError, r"labels out of range: expected 0\.\.2"),
    ),
    ("to-netcdf-missing-directory", _netcdf_missing_dir, (FileNotFoundError, r"directory .*dir does not exist")),
    ("log-marginal-likelihood-zero", lambda tmp: _marglik(0.0), (ValueError, r"prior_precision must be > 0")),
    ("log-marginal-likelihood-negative", lambda tmp: _marglik(-1.0), (ValueError, r"prior_precision must be > 0")),
    (
        "log-marginal-likelihood-positive",
        lambda tmp: _marglik(torch.tensor([0.5, 2.0])),
        ("ok", lambda r: r.shape == (2,) and bool(torch.isfinite(r).all())),
    ),
    (
        "metrics-unnormalised-probs",
        lambda tmp: metrics.nll(torch.tensor([[0.5, 0.4], [0.5, 0.5]]), Y3[:2]),
        (ValueError, r"probs rows must sum to 1 \(within 0\.001\): row 0 sums to 0\.9"),
    ),
    (
        "metrics-logits",
        lambda tmp: metrics.accuracy(torch.tensor([[-1.0, 2.0], [0.3, 0.7]]), Y3[:2]),
        (ValueError, r"probs must lie in \[0, 1\]"),
    ),
    (
        "metrics-normalised-probs",
        lambda tmp: metrics.nll(torch.softmax(torch.randn(5, 3), -1), Y3[:5] % 3),
        ("ok", lambda r: r > 0),
    ),
]


@pytest.mark.parametrize("thunk, expected", [c[1:] for c in API_ERRORS], ids=[c[0] for c in API_ERRORS])
def test_api_inputs_give_a_clear_error_or_a_correct_result(tmp_path, thunk, expected):
    kind, check = expected
    if kind == "ok":
        assert check(thunk(tmp_path))
    else:
        with pytest.raises(kind, match=check) as info:
            thunk(tmp_path)
        assert len(str(info.value).splitlines()) == 1


def test_projected_regression_loss_weights_do_not_broadcast_targets_of_shape_n_by_1():
    from rank1_pyro.laplace.projected import LOSSES

    out = torch.randn(6, 1)
    y = torch.randn(6)
    flat, column = LOSSES["normal"](out, y), LOSSES["normal"](out, y.unsqueeze(-1))
    assert flat.shape == column.shape == (6,) and torch.equal(flat, column)
    assert torch.allclose(flat, 0.5 * (out.squeeze(-1) - y) ** 2)
    weights = torch.func.grad(lambda o: LOSSES["normal"](o, y.unsqueeze(-1)).sum())(out)
    assert torch.allclose(weights, out - y.unsqueeze(-1))  # ∂ℓ/∂f per row, not summed over N targets


def _out_is_a_file(tmp):
    (tmp / "file").write_text("x")
    return ["train", "--config", "digits_mlp", "--out", tmp / "file"]


def _out_under_a_file(tmp):
    (tmp / "file").write_text("x")
    return ["train", "--config", "digits_mlp", "--out", tmp / "file" / "run"]


CLI_ERRORS = [
    ("out-is-a-file", _out_is_a_file, "is a file, not a run directory"),
    ("out-under-a-file", _out_under_a_file, "cannot be created"),
    ("evaluate-a-file", lambda tmp: (tmp / "f").write_text("x") and ["evaluate", tmp / "f"], "is a file"),
    ("diagnose-a-file", lambda tmp: (tmp / "f").write_text("x") and ["diagnose", tmp / "f"], "is a file"),
    ("resume-without-out", lambda tmp: ["train", "--config", "digits_mlp", "--resume"], "--resume needs --out"),
    (
        "resume-nothing-there-without-config",
        lambda tmp: ["train", "--resume", "--out", tmp / "none"],
        "config.json not found",
    ),
    (
        "checkpoint-every-zero",
        lambda tmp: ["train", "--config", "digits_mlp", "--out", tmp / "r", "--checkpoint-every", "0"],
        "--checkpoint-every must be >= 1",
    ),
    ("evaluate-negative-seed", lambda tmp: ["evaluate", tmp, "--seed", "-1"], "--seed must be >= 0"),
]


@pytest.mark.parametrize("argv, message", [c[1:] for c in CLI_ERRORS], ids=[c[0] for c in CLI_ERRORS])
def test_cli_inputs_give_one_line_and_write_nothing(tmp_path, argv, message, capsys):
    argv = argv(tmp_path)
    before = sorted((p.name, p.stat().st_size) for p in tmp_path.rglob("*"))
    assert cli(*argv) == 2
    one_line_error(capsys, message)
    assert sorted((p.name, p.stat().st_size) for p in tmp_path.rglob("*")) == before


# ------------------------------------------------------------------------------------------
# Ctrl-C at each phase of a run
# ------------------------------------------------------------------------------------------
def _interrupt_at_step(n):
    def patch(monkeypatch):
        original, calls = torch.optim.Adam.step, []

        def step(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == n:
                raise KeyboardInterrupt
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.optim.Adam, "step", step)

    return patch


def _interrupt_in(module_name, attr, nth=1):
    def patch(monkeypatch):
        import importlib

        module = importlib.import_module(module_name)
        original, calls = getattr(module, attr), []

        def interrupted(*args, **kwargs):
            calls.append(1)
            if len(calls) == nth:
                raise KeyboardInterrupt
            return original(*args, **kwargs)

        monkeypatch.setattr(module, attr, interrupted)

    return patch


def _interrupt_csv_log(nth):
    def patch(monkeypatch):
        from rank1_pyro.inference.progress import CsvLog

        original, calls = CsvLog.write, []

        def interrupted(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == nth:
                raise KeyboardInterrupt
            return original(self, *args, **kwargs)

        monkeypatch.setattr(CsvLog, "write", interrupted)

    return patch


# (id, patch, extra CLI arguments); the digits split gives 12 steps per epoch of 128 examples
PHASES = [
    ("before-first-checkpoint", _interrupt_at_step(3), []),
    ("mid-epoch", _interrupt_at_step(8), ["--checkpoint-every", "5"]),
    ("after-an-epoch", _interrupt_at_step(15), []),
    ("while-writing-the-first-checkpoint", _interrupt_in("rank1_pyro.inference.checkpoint", "atomic_save"), []),
    ("while-writing-a-later-checkpoint", _interrupt_in("rank1_pyro.inference.checkpoint", "atomic_save", 2), []),
    ("while-writing-the-config", _interrupt_in("rank1_pyro.runs", "write_json", 1), []),
    # write_json: 1 config.json, 2 data.json, 3 and 4 metrics.json after epochs 1 and 2, 5 the final metrics.json
    ("while-writing-the-data-description", _interrupt_in("rank1_pyro.runs", "write_json", 2), []),
    ("while-writing-the-epoch-metrics", _interrupt_in("rank1_pyro.runs", "write_json", 3), []),
    ("while-writing-the-final-metrics", _interrupt_in("rank1_pyro.runs", "write_json", 5), []),
    ("while-appending-to-the-history", _interrupt_csv_log(2), []),
    ("while-writing-the-manifest", _interrupt_in("rank1_pyro.runs", "write_manifest"), []),
    ("while-swapping-in", _interrupt_in("rank1_pyro.runs", "replace_dir"), []),
]


@pytest.mark.parametrize("patch, extra", [c[1:] for c in PHASES], ids=[c[0] for c in PHASES])
def test_ctrl_c_of_a_new_run_then_resume_is_bit_identical(
    tmp_path, configs, reference, patch, extra, monkeypatch, capsys
):
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        patch(m)
        code = cli("train", "--config", configs["tiny"], "--out", run, "--no-progress", *extra)
    if code == 0:  # the phase does not occur for a new run (a swap): nothing was interrupted
        assert read_manifest(run)
    else:
        assert code == 130
        one_line_error(capsys, "rank1-pyro train: interrupted")
        assert not (run / MANIFEST_FILE).exists()  # never marked finished
        if run_state(run) == "missing":  # stopped before its first checkpoint: no trace, not even a config
            assert not run.exists()
        else:
            assert (run / "checkpoint.pt").exists()
            assert cli("train", "--config", configs["tiny"], "--out", run, "--no-progress") == 2  # not replaced
            one_line_error(capsys, "already holds an interrupted run")
        assert cli("train", "--config", configs["tiny"], "--out", run, "--resume", "--no-progress", *extra) == 0
    assert_same_weights(weights(run), weights(reference))
    assert read_manifest(run)["files"]  # finished, and every file verified


@pytest.mark.parametrize("patch, extra", [c[1:] for c in PHASES], ids=[c[0] for c in PHASES])
def test_ctrl_c_of_a_replacement_leaves_the_old_run_intact(finished, configs, patch, extra, monkeypatch, capsys):
    before = snapshot(finished)
    with monkeypatch.context() as m:
        patch(m)
        code = cli("train", "--config", configs["seed1"], "--out", finished, "--overwrite", "--no-progress", *extra)
    assert code == 130
    one_line_error(capsys, "rank1-pyro train: interrupted")
    assert snapshot(finished) == before
    assert not (finished.parent / f".{finished.name}.staging").exists()
    assert cli("evaluate", finished, "--samples", "2") == 0


@pytest.mark.parametrize("patch, extra", [c[1:] for c in PHASES], ids=[c[0] for c in PHASES])
def test_ctrl_c_while_extending_a_finished_run_leaves_it_intact(finished, patch, extra, monkeypatch, capsys):
    before = snapshot(finished)
    with monkeypatch.context() as m:
        patch(m)
        code = cli("train", "--out", finished, "--resume", "--epochs", "4", "--no-progress", *extra)
    assert code == 130
    assert snapshot(finished) == before
    assert not (finished.parent / f".{finished.name}.staging").exists()


# ------------------------------------------------------------------------------------------
# Following a run while it trains: metrics.json and history.csv after every epoch
# ------------------------------------------------------------------------------------------
def _csv_rows(path):
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))


def test_history_is_written_after_every_epoch_and_survives_an_interruption(
    tmp_path, configs, reference, monkeypatch, capsys
):
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _interrupt_at_step(15)(m)  # in epoch 2 (12 steps per epoch)
        assert cli("train", "--config", configs["tiny"], "--out", run, "--no-progress") == 130
    capsys.readouterr()
    partial = json.loads((run / "metrics.json").read_text())
    assert [r["epoch"] for r in partial["history"]] == [1] and "test" not in partial  # readable while it trains
    rows = _csv_rows(run / "history.csv")
    assert [int(r["epoch"]) for r in rows] == [1]
    assert float(rows[0]["loss"]) == partial["history"][0]["loss"]
    assert run_state(run) == "interrupted"  # an in-progress history never marks a run finished
    assert cli("train", "--out", run, "--resume", "--no-progress") == 0
    final = json.loads((run / "metrics.json").read_text())
    assert "test" in final and [r["epoch"] for r in final["history"]] == [1, 2]
    rows = _csv_rows(run / "history.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert [float(r["loss"]) for r in rows] == [r["loss"] for r in final["history"]]
    assert (run / "history.csv").read_bytes() == (reference / "history.csv").read_bytes()  # as if never stopped
    assert "history.csv" in read_manifest(run)["files"]


def test_a_history_that_disagrees_with_the_checkpoint_is_rewritten(tmp_path):
    from rank1_pyro.inference.progress import CsvLog

    path = tmp_path / "h.csv"
    log = CsvLog(path)
    log.write([{"epoch": 1, "loss": 2.0}])
    log.write([{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.5}])
    assert path.read_text() == "epoch,loss\n1,2.0\n2,1.5\n"
    path.write_text("epoch,loss\n1,2.0\n2,1.5\n3,9.0\n")  # ahead of the checkpoint (a resumed run)
    log.write([{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.5}, {"epoch": 3, "loss": 1.25}])
    assert path.read_text() == "epoch,loss\n1,2.0\n2,1.5\n3,1.25\n"
