"""Saved post-hoc posteriors (issue 20): SubnetLaplace and ProjectedPosterior state dicts round trip
exactly, the shared batch reader and atomic writer, and the ``laplace`` / ``project`` commands
saving into a run that ``predict --posterior`` and ``load_run(...).posterior(kind)`` read back."""

import csv
import io
import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from rank1_pyro import DeltaGuide, rank1_mlp
from rank1_pyro.cli import main
from rank1_pyro.inference import predict
from rank1_pyro.laplace import ProjectedPosterior, SubnetLaplace, load_posterior, rank1_point_network
from rank1_pyro.laplace.base import FORMAT, batches
from rank1_pyro.runs import RunError, load_run


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _classifier(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 10), nn.Tanh(), nn.Linear(10, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=g)
    return net, (x, y), torch.randn(7, 4, generator=g, dtype=torch.float64)


def _same_network(net):
    """A fresh module holding the same weights (as a run loaded again)."""
    twin = nn.Sequential(nn.Linear(4, 10), nn.Tanh(), nn.Linear(10, 3)).double()
    twin.load_state_dict(net.state_dict())
    return twin


# ------------------------------------------------------------------------------------------
# Round trips
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("predictive", ["glm", "glm-mc", "nn"])
def test_subnet_laplace_round_trip_predicts_identically(tmp_path, predictive):
    net, data, x_new = _classifier()
    la = SubnetLaplace(net, "classification", "largest-variance", 25, predictive=predictive).fit(data)
    before = la.sample_predictions(x_new, 6)  # draws cached for the sampled predictives
    la.save(tmp_path / "la.pt")
    state = torch.load(tmp_path / "la.pt", weights_only=True)  # plain data: no code in the file
    assert state["format"] == FORMAT and state["kind"] == "laplace" and state["state"]["H"].shape == (25, 25)
    loaded = SubnetLaplace.load(tmp_path / "la.pt", _same_network(net))
    assert torch.equal(loaded.sample_predictions(x_new, 6), before)
    assert torch.equal(loaded.subnetwork_indices, la.subnetwork_indices)
    assert loaded.prior_precision == la.prior_precision and loaded.dtype == la.dtype
    assert torch.equal(loaded.log_marginal_likelihood(), la.log_marginal_likelihood())
    assert torch.equal(loaded.posterior_covariance, la.posterior_covariance)
    # the same through load_posterior (the kind is read from the file) and predict()
    again = load_posterior(tmp_path / "la.pt", _same_network(net))
    assert type(again) is SubnetLaplace
    assert torch.equal(predict(again, x_new, num_samples=6).probs, predict(la, x_new, num_samples=6).probs)


def test_subnet_laplace_regression_round_trip_keeps_sigma_and_prior_mean(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    x = torch.randn(30, 3, dtype=torch.float64)
    y = torch.sin(x[:, 0]) + 0.1 * torch.randn(30, dtype=torch.float64)
    prior_mean = torch.linspace(0, 1, sum(p.numel() for p in net.parameters()), dtype=torch.float64)
    la = SubnetLaplace(net, "regression", "random", 20, sigma_noise=0.3, prior_mean=prior_mean, dtype=torch.float32)
    la.fit((x, y))
    la.save(tmp_path / "la.pt")
    loaded = SubnetLaplace.load(tmp_path / "la.pt", net)
    assert loaded.sigma_noise == 0.3 and loaded.dtype == torch.float32
    assert torch.equal(loaded.prior_mean, la.prior_mean)
    assert torch.equal(loaded.sample_predictions(x[:5], 1), la.sample_predictions(x[:5], 1))
    # a saved setting can be overridden when loading
    assert SubnetLaplace.load(tmp_path / "la.pt", net, predictive="nn").predictive == "nn"


def test_projected_round_trip_with_and_without_micro_batches(tmp_path):
    net, (x, y), x_new = _classifier()
    post = ProjectedPosterior(net, "categorical", num_iterations=30, micro_batch_size=16).fit((x, y))
    before = post.sample_predictions(x_new, 5)
    post.save(tmp_path / "full.pt")
    post.save(tmp_path / "draws.pt", micro_batches=False)
    assert (tmp_path / "draws.pt").stat().st_size < (tmp_path / "full.pt").stat().st_size

    full = ProjectedPosterior.load(tmp_path / "full.pt", _same_network(net))
    assert torch.equal(full.sample_predictions(x_new, 5), before)
    assert full.alpha == post.alpha and full.max_samples is None
    v = torch.randn(2, post.num_params, dtype=torch.float64)
    assert torch.equal(full.project(v), post.project(v))  # the micro-batches came back exactly
    assert full.sample_predictions(x_new, 8).shape[0] == 8  # and it can draw more

    draws = load_posterior(tmp_path / "draws.pt", _same_network(net))
    assert type(draws) is ProjectedPosterior and draws.max_samples == 5
    assert repr(draws).endswith("5 saved draws)")
    assert torch.equal(draws.sample_predictions(x_new, 5), before)
    assert torch.equal(draws.sample_predictions(x_new, 3), before[:3])
    with pytest.raises(RuntimeError, match="holds 5 saved draws"):
        draws.sample_predictions(x_new, 6)
    with pytest.raises(
        RuntimeError,
        match=r"^this projected posterior was loaded without its micro-batches: it predicts with its 5 saved draws "
        r"and cannot project; call fit\(train_data\) to project again$",
    ):
        draws.project(v)
    draws.save(tmp_path / "again.pt")  # a draws-only posterior saves again
    assert torch.equal(ProjectedPosterior.load(tmp_path / "again.pt", net).sample_predictions(x_new, 5), before)


def test_projected_rank1_point_network_with_a_given_monitor_round_trips(tmp_path):
    torch.manual_seed(0)
    model = rank1_mlp(3, [6], 2, ensemble_size=2)
    net = rank1_point_network(model, DeltaGuide(model)).eval()
    x = torch.randn(20, 3)
    y = (x[:, 0] > 0).long()
    post = ProjectedPosterior(net, "categorical", kind="loss", num_iterations=10, micro_batch_size=8)
    post.fit((x, y), monitor=(x[:4], y[:4]))
    before = post.sample_predictions(x[:6], 4)
    assert before.shape == (4, 2, 6, 2)
    post.save(tmp_path / "p.pt")
    loaded = ProjectedPosterior.load(tmp_path / "p.pt", net)
    assert torch.equal(loaded.sample_predictions(x[:6], 4), before)
    assert loaded.kind == "loss" and len(loaded._monitor) == 1 and loaded._monitor[0] is not loaded._blocks[0]


def test_loading_refuses_another_network_another_kind_and_foreign_files(tmp_path):
    net, data, _ = _classifier()
    SubnetLaplace(net, "classification", "largest-magnitude", 10).fit(data).save(tmp_path / "la.pt")
    other, _, _ = _classifier(seed=1)
    with pytest.raises(ValueError, match="fitted on another network"):
        SubnetLaplace.load(tmp_path / "la.pt", other)
    with pytest.raises(ValueError, match="is a 'laplace' posterior, not 'projected'"):
        ProjectedPosterior.load(tmp_path / "la.pt", net)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="no 'rank1-pyro-posthoc-posterior' marker"):
        load_posterior(tmp_path / "foreign.pt", net)
    (tmp_path / "torn.pt").write_bytes((tmp_path / "la.pt").read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_posterior(tmp_path / "torn.pt", net)
    with pytest.raises(RuntimeError, match="fit"):
        SubnetLaplace(net, "classification", torch.tensor([1, 2])).state_dict()


def test_a_custom_projected_loss_must_be_passed_again_to_load(tmp_path):
    net, (x, y), _ = _classifier()

    def loss(out, target):
        return torch.nn.functional.cross_entropy(out, target, reduction="none")

    post = ProjectedPosterior(net, kind="loss", loss_fn=loss, alpha=1.0, num_iterations=5).fit((x, y))
    post.save(tmp_path / "p.pt")
    with pytest.raises(
        ValueError, match=r"^this projected posterior was fitted with a custom loss_fn: pass loss_fn= to load it$"
    ):
        ProjectedPosterior.load(tmp_path / "p.pt", net)
    assert ProjectedPosterior.load(tmp_path / "p.pt", net, loss_fn=loss).loss_fn is loss


def test_projected_regression_round_trip_keeps_the_noise_scale(tmp_path):
    """A regression posterior on a plain network (where noise_scale is required) saves its noise_scale:
    the loaded one has noise_scale 0.3 and predicts the same (mean, variance) pairs, variance 0.3²."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    post = ProjectedPosterior(net, "normal", noise_scale=0.3, alpha=2.0, micro_batch_size=4, num_iterations=10)
    before = post.fit(x).sample_predictions(x[:3], 4)
    post.save(tmp_path / "p.pt")
    loaded = ProjectedPosterior.load(tmp_path / "p.pt", net)
    assert loaded.noise_scale == 0.3 and loaded.likelihood == "normal"
    assert torch.equal(loaded.sample_predictions(x[:3], 4), before)
    assert torch.equal(before[..., 1], torch.full((4, 1, 3), 0.3**2, dtype=torch.float64))


def test_projected_default_monitor_round_trips_as_the_first_micro_batch(tmp_path):
    """With the default monitor (the first training micro-batch) the file names that micro-batch
    instead of storing its inputs twice; loaded, the monitor is again the first micro-batch (alone),
    the saved convergence record comes back, and a new projection records the same convergence as
    the fitted posterior's."""
    net, (x, y), _ = _classifier()
    post = ProjectedPosterior(net, num_iterations=10, micro_batch_size=16, num_trace_probes=4).fit((x, y))
    state = post.state_dict()
    assert state["state"]["monitor"] == "first" and len(state["state"]["micro_batches"]) == 3
    post.save(tmp_path / "p.pt")
    loaded = ProjectedPosterior.load(tmp_path / "p.pt", _same_network(net))
    assert len(loaded._monitor) == 1 and loaded._monitor[0] is loaded._blocks[0]
    assert post.convergence.shape == (11,) and torch.equal(loaded.convergence, post.convergence)
    v = torch.randn(2, post.num_params, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert torch.equal(loaded.project(v), post.project(v))
    assert torch.equal(loaded.convergence, post.convergence)


def test_projected_loss_kind_round_trip_projects_identically(tmp_path):
    """A loss-projected posterior comes back with its loss weights ∂ℓ/∂f: the loaded posterior projects
    exactly as the fitted one (onto the null space of the per-example loss gradients)."""
    net, (x, y), _ = _classifier()
    post = ProjectedPosterior(net, kind="loss", alpha=1.0, num_iterations=10, micro_batch_size=16).fit((x, y))
    post.save(tmp_path / "p.pt")
    loaded = ProjectedPosterior.load(tmp_path / "p.pt", _same_network(net))
    assert all(torch.equal(a.weights, b.weights) for a, b in zip(loaded._blocks, post._blocks))
    v = torch.randn(3, post.num_params, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert torch.equal(loaded.project(v), post.project(v))


def test_projected_from_state_dict_refuses_a_foreign_dict():
    """A dict that is not a saved posterior (no "state" entry) is refused by ProjectedPosterior.from_state_dict
    with the missing-marker message, before the custom-loss check looks into it."""
    net, _, _ = _classifier()
    with pytest.raises(
        ValueError,
        match=r"^not a saved post-hoc posterior of rank1-pyro \(no 'rank1-pyro-posthoc-posterior' marker; "
        r"got a dict with keys \['weights'\]\)$",
    ):
        ProjectedPosterior.from_state_dict(net, {"weights": torch.zeros(2)})


# ------------------------------------------------------------------------------------------
# The one batch reader, the one atomic writer
# ------------------------------------------------------------------------------------------
def test_one_batch_reader_for_both_posteriors():
    x, y = torch.randn(10, 2), torch.arange(10)
    assert [(a.shape[0], b.shape[0]) for a, b in batches((x, y), size=4)] == [(4, 4), (4, 4), (2, 2)]
    assert [b for _, b in batches(x, size=6)] == [None, None]
    assert len(list(batches([x, y]))) == 1  # a list pair is one batch for the Laplace ...
    assert len(list(batches([x, x], pairs=(tuple,)))) == 2  # ... and two batches of inputs for the projection
    loader = DataLoader(TensorDataset(x, y), batch_size=3)
    assert sum(b.shape[0] for b, _ in batches(loader, size=2)) == 10
    with pytest.raises(ValueError, match="train_data: the inputs contain NaN"):
        list(batches(torch.full((2, 2), float("nan")), name="train_data"))
    with pytest.raises(ValueError, match="data: targets must be a tensor with 10 rows"):
        list(batches((x, y[:3])))
    # through the posteriors: a list of two input batches is two batches for the projection
    net, _, _ = _classifier()
    x1, x2 = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    post = ProjectedPosterior(net, alpha=1.0, num_iterations=1, micro_batch_size=3).fit([x1, x2])
    assert [b.x.shape[0] for b in post._blocks] == [3, 2, 3, 2]
    with pytest.raises(ValueError, match="train_data: every batch must hold a non-empty tensor"):
        post.fit([torch.zeros(0, 4)])


def test_write_json_and_saved_posteriors_use_the_one_atomic_writer(tmp_path, monkeypatch):
    from rank1_pyro import atomic, runs
    from rank1_pyro.inference.checkpoint import atomic_save

    calls = []
    real = atomic.atomic_write
    monkeypatch.setattr(atomic, "atomic_write", lambda path, content: calls.append(path) or real(path, content))
    runs.write_json({"a": 1}, tmp_path / "a.json")
    net, data, _ = _classifier()
    SubnetLaplace(net, "classification", "largest-magnitude", 5).fit(data).save(tmp_path / "la.pt")
    atomic_save({"x": 1}, tmp_path / "c.pt")
    assert calls == [tmp_path / "a.json", tmp_path / "la.pt", tmp_path / "c.pt"]
    (tmp_path / "c.pt").unlink()
    assert json.loads((tmp_path / "a.json").read_text()) == {"a": 1}

    def torn(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        real(tmp_path / "a.json", torn)
    assert json.loads((tmp_path / "a.json").read_text()) == {"a": 1}  # the previous file, intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "la.pt"]  # no temporary left behind


# ------------------------------------------------------------------------------------------
# The commands, on a tiny image run
# ------------------------------------------------------------------------------------------
FAST = """
name = "photos"
dataset = "image_folder"
num_classes = 2
data = {{ path = "photos", image_size = [8, 8], test_fraction = 0.25 }}
model = "mlp"
model_args = {{ hidden = [16] }}
epochs = {epochs}
per_core_batch_size = 64
num_cores = 1
optimizer = "adam"
base_learning_rate = 1e-2
lr_reference_batch = 16
warmup_epochs = 0
decay_epochs = []
kl_annealing_epochs = 2
seed = {seed}
"""


def _images(root, n, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, level in (("dark", 40), ("light", 215)):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = np.clip(rng.normal(level, 25, (10, 10, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def _train(d, out, epochs=4, seed=0):
    (d / "photos.toml").write_text(FAST.format(epochs=epochs, seed=seed))
    argv = ["train", "--config", str(d / "photos.toml"), "--out", str(out), "--data-root", str(d), "--no-progress"]
    assert main(argv + (["--overwrite"] if out.exists() else [])) == 0


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    _images(d / "photos", 12, seed=0)
    _images(d / "new", 2, seed=1)
    _train(d, d / "run")
    return d


def _rows(text):
    return list(csv.DictReader(io.StringIO(text)))


def test_laplace_saves_and_predict_reads_it(photos, capsys):
    run = photos / "run"
    capsys.readouterr()
    assert main(["predict", str(run), str(photos / "new"), "--posterior", "laplace"]) == 2
    err = capsys.readouterr().err
    assert "holds no laplace posterior" in err and f"run `rank1-pyro laplace {run}` first" in err
    with pytest.raises(RunError, match=rf"run `rank1-pyro laplace {run}` first"):
        load_run(run).posterior("laplace")

    argv = ["laplace", str(run), "--subnetwork", "largest-magnitude", "--size", "200", "--rotate", "45"]
    argv += ["--data-root", str(photos)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| rotated 45 | subnet Laplace |" in out and "| test | MAP |" in out
    report = json.loads((run / "laplace.json").read_text())
    assert report["subnetwork_size"] == 200 and set(report["results"]) == {"test", "rotated 45"}
    info = json.loads((run / "laplace" / "posterior.json").read_text())
    assert info["kind"] == "laplace" and info["subnetwork_size"] == 200 and "posterior.pt" in info["files"]

    assert main(["predict", str(run), str(photos / "new"), "--posterior", "laplace"]) == 0
    cli = _rows(capsys.readouterr().out)
    assert [r["prediction"] for r in cli] == ["dark", "dark", "light", "light"]
    loaded = load_run(run)
    table = loaded.predict(photos / "new", posterior="laplace").columns()
    np.testing.assert_allclose([float(r["prob_dark"]) for r in cli], table["prob_dark"], rtol=1e-5)
    # the loaded posterior is the one the command fitted: same subnetwork, same predictions
    la = loaded.posterior("laplace")
    assert isinstance(la, SubnetLaplace) and la.num_params == 200 and la.prior_precision == report["prior_precision"]
    # by-name needs --pattern
    assert main(["laplace", str(run), "--subnetwork", "by-name", "--data-root", str(photos)]) == 2


def test_project_saves_its_draws_and_predict_reads_them(photos, capsys):
    run = photos / "run"
    capsys.readouterr()
    assert main(["predict", str(run), str(photos / "new"), "--posterior", "projected"]) == 2
    assert "run `rank1-pyro project" in capsys.readouterr().err
    argv = ["project", str(run), "--samples", "6", "--iterations", "20", "--rotate", "--data-root", str(photos)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "projected posterior on photos" in out and "| test | projected |" in out
    report = json.loads((run / "projected.json").read_text())
    assert report["samples"] == 6 and report["alpha"] > 0 and set(report["results"]) == {"test"}
    assert json.loads((run / "projected" / "posterior.json").read_text())["saved_draws"] == 6

    assert main(["predict", str(run), str(photos / "new"), "--posterior", "projected", "--samples", "6"]) == 0
    first = _rows(capsys.readouterr().out)
    assert main(["predict", str(run), str(photos / "new"), "--posterior", "projected", "--samples", "6"]) == 0
    assert _rows(capsys.readouterr().out) == first  # the saved draws: the same predictions every time
    assert main(["predict", str(run), str(photos / "new"), "--posterior", "projected"]) == 2  # 32 > 6 draws
    assert f"run `rank1-pyro project {run} --samples 32`" in capsys.readouterr().err
    post = load_run(run).posterior("projected")
    assert isinstance(post, ProjectedPosterior) and post.max_samples == 6


def test_a_changed_posterior_file_or_a_retrained_run_is_refused(tmp_path, capsys):
    _images(tmp_path / "photos", 6, seed=0)
    run = tmp_path / "run"
    _train(tmp_path, run, epochs=1)
    assert main(["laplace", str(run), "--subnetwork", "random", "--size", "30", "--data-root", str(tmp_path)]) == 0
    state = run / "laplace" / "posterior.pt"
    good = state.read_bytes()
    state.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(RunError, match="changed after it was saved"):
        load_run(run).posterior("laplace")
    state.write_bytes(good)
    (run / "laplace" / "posterior.json").unlink()
    with pytest.raises(RunError, match="saving it was interrupted"):
        load_run(run).posterior("laplace")
    assert main(["laplace", str(run), "--subnetwork", "random", "--size", "30", "--data-root", str(tmp_path)]) == 0
    saved = {p.name: p.read_bytes() for p in (run / "laplace").iterdir()}
    _train(tmp_path, run, epochs=1, seed=1)  # another run in the same directory: other weights
    assert not (run / "laplace").exists()  # --overwrite replaced the whole directory ...
    (run / "laplace").mkdir()
    for name, content in saved.items():  # ... so put the old posterior back
        (run / "laplace" / name).write_bytes(content)
    with pytest.raises(RunError, match="fitted on other weights than this run's"):
        load_run(run).posterior("laplace")
    with pytest.raises(ValueError, match=r"posterior: unknown name 'swag'; valid: \['rank1', 'laplace', 'projected'\]"):
        load_run(run).posterior("swag")


@pytest.mark.parametrize("command", ["laplace", "project"])
def test_without_a_run_the_commands_name_the_train_command_and_write_nothing(tmp_path, command, capsys):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    for run, missing in ((tmp_path / "none", "does not exist"), (tmp_path / "half", "missing checkpoint.pt")):
        assert main([command, str(run)]) == 2
        err = capsys.readouterr().err
        assert missing in err and f"rank1-pyro train --config digits_mlp --out {run}" in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    with pytest.raises(SystemExit):  # the stand-in MLP is gone
        main(["laplace", str(tmp_path / "none"), "--map-mlp"])
