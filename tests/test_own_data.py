"""Your own data in, predictions out (issue 20): tables, arrays and image folders through
``train`` -> ``predict``, the calibration metrics, temperature scaling and conformal sets."""

import csv
import io
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from rank1_pyro import calibration, metrics
from rank1_pyro.cli import main
from rank1_pyro.config import RunConfig
from rank1_pyro.runs import load_run

FAST = """
model = "mlp"
epochs = {epochs}
per_core_batch_size = 128
num_cores = 1
optimizer = "adam"
base_learning_rate = 1e-2
lr_reference_batch = 32
warmup_epochs = 0
decay_epochs = []
kl_annealing_epochs = 5
seed = 0
"""


def _csv_rows(text):
    return list(csv.DictReader(io.StringIO(text)))


def _truth(a, b):
    return 100 + 30 * a + 5 * b**2


@pytest.fixture(scope="module")
def houses(tmp_path_factory):
    """A regression table (train and test files), a config, and a run trained on it by the CLI."""
    import pandas as pd

    d = tmp_path_factory.mktemp("houses")
    rng = np.random.default_rng(0)

    def table(n):
        a, b = rng.uniform(-2, 2, n), rng.uniform(0, 5, n)
        return pd.DataFrame(
            {"area": a, "rooms": b, "constant": 1.0, "note": "x", "price": _truth(a, b) + rng.normal(0, 5, n)}
        )

    train, test = table(400), table(100)
    train.to_csv(d / "train.csv", index=False)
    test.to_csv(d / "test.csv", index=False)
    (d / "houses.toml").write_text(
        'name = "houses"\ndataset = "csv"\nlikelihood = "normal"\nnum_classes = 1\nmodel_args = { hidden = [32] }\n'
        'data = { path = "train.csv", test_path = "test.csv", target = "price", features = ["area", "rooms", "constant"] }\n'
        + FAST.format(epochs=40)
    )
    assert (
        main(
            [
                "train",
                "--config",
                str(d / "houses.toml"),
                "--out",
                str(d / "run"),
                "--data-root",
                str(d),
                "--no-progress",
            ]
        )
        == 0
    )
    return d, train, test


def test_csv_regression_stores_training_statistics(houses):
    d, train, _ = houses
    prep = json.loads((d / "run" / "data.json").read_text())
    assert prep["features"] == ["area", "rooms", "constant"] and prep["target"] == "price"
    np.testing.assert_allclose(prep["x_mean"], train[["area", "rooms", "constant"]].mean().to_numpy(), rtol=1e-5)
    np.testing.assert_allclose(prep["x_std"][:2], train[["area", "rooms"]].std(ddof=0).to_numpy(), rtol=1e-5)
    assert prep["x_std"][2] == 1.0  # a constant column is only centred
    assert prep["y_mean"] == pytest.approx(train["price"].mean()) and prep["y_std"] == pytest.approx(
        train["price"].std(ddof=0)
    )
    manifest = json.loads((d / "run" / "run.json").read_text())
    assert "data.json" in manifest["files"]  # hashed with the run


def test_csv_regression_predicts_through_the_cli(houses, capsys):
    d, train, test = houses
    new = test.drop(columns=["price"]).iloc[:50]
    new.to_csv(d / "new.csv", index=False)
    capsys.readouterr()
    assert main(["predict", str(d / "run"), str(d / "new.csv"), "--samples", "8"]) == 0
    rows = _csv_rows(capsys.readouterr().out)
    assert len(rows) == 50 and set(rows[0]) == {"id", "mean", "std", "total", "aleatoric", "epistemic"}
    mean = np.array([float(r["mean"]) for r in rows])
    truth = _truth(new["area"].to_numpy(), new["rooms"].to_numpy())
    rmse = np.sqrt(np.mean((mean - truth) ** 2))
    assert rmse < 0.35 * train["price"].std()  # predictions in the target's units, far better than the mean
    for r in rows:  # the split adds up, std is the total's square root
        assert float(r["total"]) == pytest.approx(float(r["aleatoric"]) + float(r["epistemic"]), rel=1e-4)
        assert float(r["std"]) == pytest.approx(math.sqrt(float(r["total"])), rel=1e-4)
    # far outside the training inputs the epistemic part grows
    far = new.iloc[:1].copy()
    far["area"] = 20.0
    far.to_csv(d / "far.csv", index=False)
    assert main(["predict", str(d / "run"), str(d / "far.csv"), "--samples", "8", "--out", str(d / "far.json")]) == 0
    far_row = json.loads((d / "far.json").read_text())[0]
    assert far_row["epistemic"] > 10 * np.median([float(r["epistemic"]) for r in rows])


def test_python_two_lines_match_the_cli(houses, capsys):
    d, _, test = houses
    test.drop(columns=["price"]).iloc[:5].to_csv(d / "five.csv", index=False)
    import pyro

    run = load_run(d / "run")
    pyro.set_rng_seed(0)  # the CLI seeds its draws after loading the run
    table = run.predict(d / "five.csv", num_samples=8)
    capsys.readouterr()
    main(["predict", str(d / "run"), str(d / "five.csv"), "--samples", "8", "--seed", "0"])
    cli = _csv_rows(capsys.readouterr().out)
    np.testing.assert_allclose(table.columns()["mean"], [float(r["mean"]) for r in cli], rtol=1e-4)
    # raw arrays work too, prepared with the stored statistics
    values = test[["area", "rooms", "constant"]].to_numpy()[:5]
    pyro.set_rng_seed(0)
    again = run.predict(values, num_samples=8).columns()["mean"]
    np.testing.assert_allclose(again, table.columns()["mean"], rtol=1e-5)


def test_laplace_on_a_regression_run_predicts_in_the_target_units(houses, capsys):
    d, train, test = houses
    run = d / "run"
    capsys.readouterr()
    assert main(["laplace", str(run), "--data-root", str(d), "--size", "60"]) == 0
    out = capsys.readouterr().out
    assert "| set | method | NLL | RMSE |" in out and "| test | subnet Laplace |" in out
    report = json.loads((run / "laplace.json").read_text())
    rmse = report["results"]["test"]["laplace"]["rmse"]
    assert rmse < 0.35 * train["price"].std()  # far better than the mean ...
    trained = json.loads((run / "metrics.json").read_text())["test"]["rmse"]  # in the target's units
    assert 0.5 < report["results"]["test"]["map"]["rmse"] / trained < 2  # ... and in the target's units
    assert abs(rmse - report["results"]["test"]["map"]["rmse"]) < 0.1 * rmse
    new = test.drop(columns=["price"]).iloc[:20].copy()
    new.loc[new.index[0], "area"] = 20.0  # far outside the training inputs
    new.to_csv(d / "new_la.csv", index=False)
    assert main(["predict", str(run), str(d / "new_la.csv"), "--posterior", "laplace"]) == 0
    rows = _csv_rows(capsys.readouterr().out)
    assert len(rows) == 20 and set(rows[0]) == {"id", "mean", "std", "total", "aleatoric", "epistemic"}
    la = load_run(run).posterior("laplace")
    prep = json.loads((run / "data.json").read_text())
    for r in rows:  # the closed-form GLM: the noise is aleatoric, the linearized variance epistemic
        assert float(r["aleatoric"]) == pytest.approx(la.sigma_noise**2 * prep["y_std"] ** 2, rel=1e-4)
        assert float(r["total"]) == pytest.approx(float(r["aleatoric"]) + float(r["epistemic"]), rel=1e-4)
    epistemic = [float(r["epistemic"]) for r in rows]
    assert epistemic[0] > 10 * np.median(epistemic[1:]) > 0


@pytest.mark.filterwarnings("error:The given NumPy array is not writable")  # pyarrow's read-only arrays are copied
def test_a_parquet_table_trains_and_predicts(tmp_path, capsys):
    import pandas as pd

    rng = np.random.default_rng(3)
    a, b = rng.uniform(-2, 2, 120), rng.uniform(-2, 2, 120)
    frame = pd.DataFrame({"a": a, "b": b, "label": np.where(a + b > 0, "up", "down")})
    frame.to_parquet(tmp_path / "table.parquet")
    (tmp_path / "t.toml").write_text(
        'name = "table"\ndataset = "parquet"\nnum_classes = 2\nmodel_args = { hidden = [8] }\n'
        'data = { path = "table.parquet", target = "label" }\n' + FAST.format(epochs=8)
    )
    argv = ["train", "--config", str(tmp_path / "t.toml"), "--out", str(tmp_path / "run"), "--data-root", str(tmp_path)]
    assert main(argv + ["--no-progress"]) == 0
    assert json.loads((tmp_path / "run" / "data.json").read_text())["dataset"] == "parquet"
    from rank1_pyro.files import _table_arrays

    x, _ = _table_arrays(pd.read_parquet(tmp_path / "table.parquet"), ["a", "b"], None, "table.parquet")
    assert x.flags.writeable  # pyarrow hands out read-only arrays: torch would warn, and may write to them
    new = pd.DataFrame({"b": [2.0, -2.0], "a": [2.0, -2.0], "label": ["?", "?"]})  # by name, any order
    new.to_parquet(tmp_path / "new.parquet")
    new.to_csv(tmp_path / "new.csv", index=False)
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "run"), str(tmp_path / "new.parquet"), "--samples", "4"]) == 0
    rows = _csv_rows(capsys.readouterr().out)
    assert [r["prediction"] for r in rows] == ["up", "down"]
    assert main(["predict", str(tmp_path / "run"), str(tmp_path / "new.csv"), "--samples", "4"]) == 0
    assert _csv_rows(capsys.readouterr().out) == rows  # the same table as CSV: the same predictions


def test_npz_classification_and_stratified_split(tmp_path, capsys):
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(-2, 1, (150, 2)), rng.normal(2, 1, (150, 2))]).astype(np.float32)
    y = np.array(["cat"] * 150 + ["dog"] * 150)
    np.savez(tmp_path / "pets.npz", features=x, label=y)
    (tmp_path / "pets.toml").write_text(
        'name = "pets"\ndataset = "npz"\nnum_classes = 2\nmodel_args = { hidden = [16] }\n'
        f'data = {{ path = "{tmp_path / "pets.npz"}", x_key = "features", y_key = "label", test_fraction = 0.25 }}\n'
        + FAST.format(epochs=15)
    )
    cfg = __import__("rank1_pyro.config", fromlist=["load_config"]).load_config(tmp_path / "pets.toml")
    train_set, test_set, prep = cfg.load_data()
    assert len(test_set) == 76 and prep.classes == ["cat", "dog"]  # 38 of each class held out
    assert torch.bincount(test_set.tensors[1]).tolist() == [38, 38]
    assert (
        main(["train", "--config", str(tmp_path / "pets.toml"), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    )
    np.save(tmp_path / "new.npy", np.array([[-3.0, -3.0], [3.0, 3.0]], dtype=np.float32))
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "run"), str(tmp_path / "new.npy"), "--samples", "4"]) == 0
    rows = _csv_rows(capsys.readouterr().out)
    assert [r["prediction"] for r in rows] == ["cat", "dog"]
    for r in rows:
        assert float(r["prob_cat"]) + float(r["prob_dog"]) == pytest.approx(1.0, abs=1e-4)
        assert float(r["total"]) == pytest.approx(float(r["aleatoric"]) + float(r["epistemic"]), abs=1e-4)


def _image_folder(root, n, rng):
    from PIL import Image

    for cls, level in (("dark", 40), ("light", 215)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            pixels = np.clip(rng.normal(level, 25, (10, 12, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i}.png")


def test_image_folder_trains_and_predicts(tmp_path, capsys):
    rng = np.random.default_rng(2)
    _image_folder(tmp_path / "photos", 20, rng)
    _image_folder(tmp_path / "new", 3, rng)
    (tmp_path / "photos.toml").write_text(
        'name = "photos"\ndataset = "image_folder"\nnum_classes = 2\nmodel_args = { hidden = [16] }\n'
        'data = { path = "photos", image_size = [8, 8], test_fraction = 0.25 }\n' + FAST.format(epochs=10)
    )
    assert (
        main(
            [
                "train",
                "--config",
                str(tmp_path / "photos.toml"),
                "--out",
                str(tmp_path / "run"),
                "--data-root",
                str(tmp_path),
                "--no-progress",
            ]
        )
        == 0
    )
    prep = json.loads((tmp_path / "run" / "data.json").read_text())
    assert prep["classes"] == ["dark", "light"] and prep["input_shape"] == [3, 8, 8]
    assert 0.1 < prep["x_mean"][0] < 0.9  # per-channel mean of the training images in [0, 1]
    assert (
        main(
            [
                "predict",
                str(tmp_path / "run"),
                str(tmp_path / "new"),
                "--samples",
                "4",
                "--out",
                str(tmp_path / "pred.json"),
            ]
        )
        == 0
    )
    rows = json.loads((tmp_path / "pred.json").read_text())
    assert len(rows) == 6
    for r in rows:  # the class is the folder each new image sits in
        assert r["prediction"] == os.path.basename(os.path.dirname(r["id"]))


def test_config_validation_of_file_data():
    base = dict(name="t", dataset="csv", model="mlp", num_classes=1, likelihood="normal", data={"path": "a.csv"})
    RunConfig.from_dict(base)
    with pytest.raises(ValueError, match="num_classes must be 1"):
        RunConfig.from_dict({**base, "num_classes": 3})
    with pytest.raises(ValueError, match="unknown data key"):
        RunConfig.from_dict({**base, "data": {"path": "a.csv", "colums": []}})
    with pytest.raises(ValueError, match="needs data.path"):
        RunConfig.from_dict({**base, "data": {}})
    with pytest.raises(ValueError, match="regression"):
        RunConfig.from_dict({**base, "dataset": "digits", "data": {}})


# ------------------------------------------------------------------------------------------
# Metrics against independent computations
# ------------------------------------------------------------------------------------------
def _random_probs(n=500, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(n, c, generator=g, dtype=torch.float64)
    labels = torch.multinomial(torch.softmax(logits * 0.7, -1), 1, generator=g).flatten()
    return torch.softmax(logits, -1), labels


def test_adaptive_ece_matches_a_hand_computation():
    probs, labels = _random_probs()
    conf = probs.max(1).values.numpy()
    correct = (probs.argmax(1) == labels).numpy().astype(float)
    order = np.argsort(conf, kind="stable")
    expected = sum(len(b) / len(conf) * abs(correct[b].mean() - conf[b].mean()) for b in np.array_split(order, 15))
    assert metrics.adaptive_ece(probs, labels) == pytest.approx(expected, abs=1e-12)
    assert metrics.adaptive_ece(probs, labels) != pytest.approx(metrics.ece(probs, labels), abs=1e-4)


def test_aurc_and_selective_accuracy_match_brute_force():
    probs, labels = _random_probs(seed=1)
    conf = probs.max(1).values.numpy()
    wrong = (probs.argmax(1) != labels).numpy()
    order = np.argsort(-conf, kind="stable")
    risks = [wrong[order[:k]].mean() for k in range(1, len(conf) + 1)]
    assert metrics.aurc(probs, labels) == pytest.approx(np.mean(risks), abs=1e-12)
    assert metrics.selective_accuracy(probs, labels, 0.8) == pytest.approx(1 - wrong[order[:400]].mean(), abs=1e-12)
    assert metrics.selective_accuracy(probs, labels, 1.0) == pytest.approx(metrics.accuracy(probs, labels))


def test_fpr_at_95_tpr_matches_scikit_learn():
    from sklearn.metrics import roc_curve

    g = torch.Generator().manual_seed(3)
    score_in = torch.randn(1000, generator=g, dtype=torch.float64) + 1.5
    score_out = torch.randn(800, generator=g, dtype=torch.float64)
    fpr, tpr, _ = roc_curve(
        np.r_[np.ones(1000), np.zeros(800)], np.r_[score_in.numpy(), score_out.numpy()], drop_intermediate=False
    )
    expected = fpr[np.searchsorted(tpr, 0.95, side="left")]
    assert metrics.fpr_at_tpr(score_in, score_out) == pytest.approx(expected, abs=1e-12)


def test_temperature_scaling_minimises_nll_like_a_grid_search():
    from sklearn.metrics import log_loss

    g = torch.Generator().manual_seed(4)
    logits = 4.0 * torch.randn(400, 4, generator=g, dtype=torch.float64)  # overconfident
    labels = torch.multinomial(torch.softmax(logits / 3.0, -1), 1, generator=g).flatten()
    t = calibration.fit_temperature(torch.log_softmax(logits, -1), labels)
    grid = np.linspace(0.5, 8, 3001)
    losses = [log_loss(labels.numpy(), torch.softmax(logits / s, -1).numpy(), labels=range(4)) for s in grid]
    assert t == pytest.approx(grid[int(np.argmin(losses))], abs=5e-3)
    assert 2.0 < t < 4.5

    class Fixed:  # any posterior with probabilities: the temperature applies to its samples
        likelihood = "categorical"

        def sample_predictions(self, x, num_samples):
            return torch.softmax(logits[x], -1)[None, None].expand(num_samples, 1, -1, -1)

    from rank1_pyro.inference import predict

    scaled = predict(calibration.TemperatureScaled(Fixed(), t), torch.arange(400), num_samples=1).probs
    torch.testing.assert_close(scaled, torch.softmax(logits / t, -1), rtol=1e-6, atol=1e-9)


def test_split_conformal_threshold_and_measured_coverage():
    probs, labels = _random_probs(n=4000, c=10, seed=5)
    alpha = 0.1
    scores = 1 - probs[torch.arange(len(labels)), labels].numpy()
    q = calibration.conformal_threshold(probs[:1000], labels[:1000], alpha)
    assert q == pytest.approx(np.quantile(scores[:1000], math.ceil(1001 * 0.9) / 1000, method="inverted_cdf"))
    coverages = []
    for seed in range(20):  # coverage over random calibration / test splits of exchangeable data
        perm = torch.randperm(4000, generator=torch.Generator().manual_seed(seed))
        cal, held = perm[:500], perm[500:]
        q = calibration.conformal_threshold(probs[cal], labels[cal], alpha)
        coverage, size = calibration.set_coverage(calibration.conformal_sets(probs[held], q), labels[held])
        coverages.append(coverage)
    mean = float(np.mean(coverages))
    assert 0.9 <= mean <= 0.9 + 2 / 501 + 0.01, mean  # 1 - alpha <= E[coverage] <= 1 - alpha + 1/(n+1)


# ------------------------------------------------------------------------------------------
# A fast CLI start
# ------------------------------------------------------------------------------------------
def test_help_imports_no_torch_and_starts_fast():
    code = (
        "import sys, time; t = time.perf_counter(); from rank1_pyro.cli import build_parser; "
        "build_parser().format_help(); print(time.perf_counter() - t); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[1] == "False"  # nothing heavy imported to build the parser
    assert float(out[0]) < 1.0
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "rank1_pyro", "--help"], capture_output=True, check=True)
    assert time.perf_counter() - start < 3.0  # the interpreter start included, on a loaded 2-core machine


def test_static_cli_choices_match_the_library():
    from rank1_pyro.commands import laplace as cmd
    from rank1_pyro.commands import predict as predict_cmd
    from rank1_pyro.commands import project as project_cmd
    from rank1_pyro.laplace import projected
    from rank1_pyro.laplace.subnetwork import PREDICTIVES, SUBNETWORK_STRATEGIES
    from rank1_pyro.runs import POSTERIORS

    assert cmd.SUBNETWORK_STRATEGIES == tuple(SUBNETWORK_STRATEGIES) and cmd.PREDICTIVES == tuple(PREDICTIVES)
    assert project_cmd.KINDS == projected.KINDS and project_cmd.PREDICTIVES == projected.PREDICTIVES
    assert project_cmd.SOLVERS == projected.SOLVERS and predict_cmd.POSTERIORS == tuple(POSTERIORS)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_index_is_reported_as_requested():
    from rank1_pyro.inference.distributed import resolve_device

    with pytest.raises(ValueError, match="device='cuda:1' was requested"):
        resolve_device("cuda:1")


def test_params_takes_every_config_model_and_a_run_directory(houses, capsys):
    from rank1_pyro.commands import params as cmd
    from rank1_pyro.models.zoo import ZOO

    assert cmd.NETWORKS == tuple(ZOO)  # spelled out for a fast --help, checked against the one registry
    expected = 64 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10  # digits_mlp's deterministic 64-128-128-10
    for model in ("mlp", "digits_mlp"):
        assert main(["params", model]) == 0
        assert f"{expected:,}" in capsys.readouterr().out
    d, _, _ = houses
    assert main(["params", str(d / "run")]) == 0
    assert f"{3 * 32 + 32 + 32 + 1:,}" in capsys.readouterr().out  # 3 features, hidden 32, one output


# ------------------------------------------------------------------------------------------
# Laplace: the default subnetwork skips weights the data says nothing about
# ------------------------------------------------------------------------------------------
def test_largest_variance_skips_zero_curvature_weights_of_constant_inputs():
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from rank1_pyro.laplace import SubnetLaplace
    from rank1_pyro.laplace.functional import FlatFunctional
    from rank1_pyro.laplace.subnetwork import select_subnetwork

    torch.manual_seed(0)
    x = torch.randn(120, 8, dtype=torch.float64)
    x[:, :3] = 0.0  # three always-zero inputs, like digits' blank corner pixels
    y = (x[:, 3] + x[:, 4] > 0).long()
    net = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    loader = DataLoader(TensorDataset(x, y), batch_size=40)
    f = FlatFunctional(net)
    idx = select_subnetwork("largest-variance", f, 20, {"data": loader})
    # the first layer's weight is θ[:48], row-major (6 outputs × 8 inputs): input j of output i at 8 i + j
    dead = {8 * i + j for i in range(6) for j in range(3)}
    assert not dead & set(idx.tolist())  # none of the 18 zero-curvature weights is chosen
    la = SubnetLaplace(net, "classification", "largest-variance", subnetwork_size=10)
    la.fit(loader)
    la.optimize_prior_precision()  # "H is zero on the subnetwork" before the fix
    assert float(la.posterior_precision.diagonal().min()) > la.prior_precision


# ------------------------------------------------------------------------------------------
# The how-to's printed outputs are what its examples print
# ------------------------------------------------------------------------------------------
def _outputs_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "docs" / "howto" / "_own_data_outputs.py"
    spec = importlib.util.spec_from_file_location("own_data_outputs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # runs the page's examples (training included), if with one epoch each: about 15 s
def test_the_own_data_page_shows_outputs_of_the_form_its_examples_print(tmp_path, monkeypatch):
    """The examples run with one epoch each (seconds): what they print must have the form the page
    shows (lines, CSV columns, table rows, keys; numbers masked). Regenerate the page's outputs with
    ``python docs/howto/_own_data_outputs.py``."""
    script = _outputs_script()
    text = script.PAGE.read_text()
    monkeypatch.chdir(tmp_path)
    printed = script.run_examples(text, quick=True)
    assert script.mismatches(text, printed) == [], "docs/howto/own-data.md: run docs/howto/_own_data_outputs.py"
    layout = script.layout(text)
    assert sum(region is not None for _, region in layout) == 6
    for out, (_, region) in zip(printed, layout):  # an example prints exactly when the page shows its output
        assert bool(out.strip()) == (region is not None)


def test_the_form_of_printed_outputs_masks_numbers_and_csv_rows():
    form = _outputs_script().form
    text = (
        "houses: test rmse 5.4478, test nll 3.2683\nid,mean,std\n0,106.2,8.23\n1,-3e-05,nan\n\n| test | MAP | 0.5 |\n"
    )
    assert form(text) == [
        "houses: test rmse #, test nll #",
        "id,mean,std",
        "<CSV row of 3 fields>",
        "<CSV row of 3 fields>",
        "| test | MAP | # |",
    ]
    assert form("id,mean,std\n0,1,2,3") != form("id,mean,std\n0,1,2")  # a row with a new column
