"""ArviZ diagnostics: DataTree contents against independent computations, VI k-hat on a conjugate model, CLI."""

import math

import arviz_stats
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
import xarray as xr

from rank1_pyro import diagnostics as D
from rank1_pyro import plots
from rank1_pyro.cli import main
from rank1_pyro.commands.diagnose import diagnose
from rank1_pyro.inference import DeltaGuide, MixtureGuide, Rank1Posterior
from rank1_pyro.models import rank1_mlp
from rank1_pyro.priors import Gaussian, HalfCauchy

K, S, N = 3, 6, 13
SITES = ["net.0.r", "net.0.s", "net.2.r", "net.2.s"]


def _model_and_guide(prior, init_loc_std=0.3):
    model = rank1_mlp(5, [7], 3, ensemble_size=K, prior=prior, num_data=100)
    guide = MixtureGuide(model, init_sign_prob=None, init_loc_std=init_loc_std, init_scale=0.2)
    return model, guide


def _data():
    return torch.randn(N, 5), torch.randint(0, 3, (N,))


def _independent_log_likelihood(model, tree, x, y):
    """log p(y_n | x_n, theta_ks) by a hand-written forward pass and torch.distributions: (K, S, N)."""
    post = tree["posterior"]
    lin0, lin2 = model.net[0], model.net[2]
    out = torch.empty(K, S, N, dtype=torch.float64)
    with torch.no_grad():
        _forward_all(out, post, lin0, lin2, x, y)
    return out


def _forward_all(out, post, lin0, lin2, x, y):
    for k in range(K):
        for s in range(S):
            r0, s0, r2, s2 = (torch.as_tensor(post[name].values[k, s]) for name in SITES)
            h = torch.relu(((x * r0) @ lin0.weight.T) * s0 + lin0.bias[k])
            logits = ((h * r2) @ lin2.weight.T) * s2 + lin2.bias[k]
            out[k, s] = torch.distributions.Categorical(logits=logits.double()).log_prob(y)


@pytest.mark.parametrize("hierarchical", [False, True])
def test_datatree_matches_independent_likelihood_prior_and_mixture_density(hierarchical):
    prior = Gaussian(1.0, HalfCauchy(0.1)) if hierarchical else Gaussian(1.0, 0.1)
    model, guide = _model_and_guide(prior, init_loc_std=0.05)  # overlapping components: every mixture term counts
    x, y = _data()
    tree = D.to_datatree(model, Rank1Posterior(model, guide), (x, y), S, batch_size=5)  # 3 minibatches

    assert set(tree.children) == {
        "posterior",
        "posterior_predictive",
        "log_likelihood",
        "observed_data",
        "sample_stats",
    }
    scales = [f"{n}_scale" for n in SITES] if hierarchical else []
    assert set(tree["posterior"].data_vars) == set(SITES + scales)
    sizes = {"net.0.r": 5, "net.0.s": 7, "net.2.r": 7, "net.2.s": 3}
    for name, size in sizes.items():
        assert tree["posterior"][name].dims == ("chain", "draw", f"{name}_dim")
        assert tree["posterior"][name].shape == (K, S, size)
    for name in scales:  # global: one draw per sample, repeated across the components
        da = tree["posterior"][name]
        assert da.dims == ("chain", "draw") and da.attrs["shared_by_components"] == 1
        assert (da.values == da.values[:1]).all() and np.unique(da.values[0]).size == S
    for group in ("log_likelihood", "posterior_predictive"):
        assert tree[group]["obs"].dims == ("chain", "draw", "obs_id") and tree[group]["obs"].shape == (K, S, N)
    pp = tree["posterior_predictive"]["obs"].values
    assert pp.dtype.kind == "i" and pp.min() >= 0 and pp.max() < 3
    np.testing.assert_array_equal(tree["observed_data"]["obs"].values, y.numpy())
    assert model.num_data == 100 and model.training  # restored

    # per-observation log-likelihood, and its sum over the data, against a hand-written forward pass
    expected = _independent_log_likelihood(model, tree, x, y).numpy()
    np.testing.assert_allclose(tree["log_likelihood"]["obs"].values, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tree["log_likelihood"]["obs"].sum("obs_id").values, expected.sum(-1), rtol=1e-5)

    # lp = log prior + log-likelihood; log_q = log of the equal-weight mixture (shared scales: their own factor)
    post = tree["posterior"]
    theta = torch.cat([torch.as_tensor(post[n].values, dtype=torch.float64) for n in SITES], -1)  # (K, S, 22)
    locs = torch.cat([guide.loc[n.replace(".", "__")].detach().squeeze(1) for n in SITES], -1).double()
    stds = torch.cat(
        [F.softplus(guide.raw_scale[n.replace(".", "__")]).detach().squeeze(1) for n in SITES], -1
    ).double()
    mixture = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(torch.ones(K, dtype=torch.float64)),
        torch.distributions.Independent(torch.distributions.Normal(locs, stds), 1),
    )
    log_q = mixture.log_prob(theta)
    if hierarchical:
        log_prior = torch.zeros(K, S, dtype=torch.float64)
        for n in SITES:
            sigma = torch.as_tensor(post[f"{n}_scale"].values, dtype=torch.float64)
            key = n.replace(".", "__")
            q_sigma = torch.distributions.LogNormal(
                guide.hyper_loc[key].double(), F.softplus(guide.hyper_raw_scale[key]).double()
            )
            log_q = log_q + q_sigma.log_prob(sigma).detach()
            log_prior += torch.distributions.HalfCauchy(0.1).log_prob(sigma)
            factor = torch.as_tensor(post[n].values, dtype=torch.float64)
            log_prior += torch.distributions.Normal(1.0, sigma[..., None]).log_prob(factor).sum(-1)
    else:
        log_prior = torch.distributions.Normal(1.0, 0.1).log_prob(theta).sum(-1)
    np.testing.assert_allclose(tree["sample_stats"]["log_q"].values, log_q.numpy(), rtol=1e-5, atol=1e-4)
    lp = log_prior.numpy() + expected.sum(-1)
    np.testing.assert_allclose(tree["sample_stats"]["lp"].values, lp, rtol=1e-5, atol=1e-3)

    # ArviZ's summary runs on the tree; ours has one row per factor entry
    table = arviz_stats.summary(tree, kind="stats")
    assert len(table) == sum(sizes.values()) + len(scales)
    assert len(D.summary(tree)) == len(table)


def test_mixture_density_equals_the_component_density_when_components_coincide():
    model, guide = _model_and_guide(Gaussian(1.0, 0.1))
    with torch.no_grad():
        for p in guide.loc.values():
            p.copy_(p[:1].expand_as(p))  # all components identical: q = q_k, so log q = log q_k exactly
    x, y = _data()
    tree = D.to_datatree(model, guide, (x, y), S)
    post = tree["posterior"]
    theta = torch.cat([torch.as_tensor(post[n].values, dtype=torch.float64) for n in SITES], -1)
    locs = torch.cat([guide.loc[n.replace(".", "__")].detach()[0, 0] for n in SITES]).double()
    stds = torch.cat([F.softplus(guide.raw_scale[n.replace(".", "__")]).detach()[0, 0] for n in SITES]).double()
    component = torch.distributions.Independent(torch.distributions.Normal(locs, stds), 1)
    np.testing.assert_allclose(tree["sample_stats"]["log_q"].values, component.log_prob(theta).numpy(), rtol=1e-5)
    ds = D.log_density_ratios(model, guide, (x, y), S)  # the same quantities for fresh draws
    assert ds["lp"].dims == ("chain", "draw") and ds["log_q"].shape == (K, S)


def test_component_separation_rhat_measures_how_far_apart_the_components_are():
    model, guide = _model_and_guide(Gaussian(1.0, 0.1))
    x, y = _data()
    with torch.no_grad():
        for p in guide.raw_scale.values():
            p.fill_(-3.0)  # stddev ~0.05
        for p in guide.loc.values():
            p.copy_(p[:1].expand_as(p))
    together = D.summary(D.to_datatree(model, guide, (x, y), 50))["component_separation_rhat"]
    with torch.no_grad():
        for p in guide.loc.values():
            p.copy_(torch.linspace(-1.0, 1.0, K).view(K, 1, 1).expand_as(p))
    apart_tree = D.to_datatree(model, guide, (x, y), 50)
    apart = D.summary(apart_tree)["component_separation_rhat"]
    assert together.max() < 1.1
    assert apart.min() > 2.0  # rank-normalised R-hat saturates near 2.4 for 3 x 50 non-overlapping draws
    per_site = D.site_summary(apart_tree)
    assert list(per_site.index) == SITES and (per_site["component_separation_rhat_median"] > 2.0).all()
    assert (per_site["size"].values == [5, 7, 7, 3]).all()
    assert per_site["within_component_sd"].max() < 0.1 < per_site["sd"].min()


def test_netcdf_round_trip(tmp_path):
    model, guide = _model_and_guide(Gaussian(1.0, HalfCauchy(0.1)))
    tree = D.to_datatree(None, Rank1Posterior(model, guide), _data(), S)
    path = D.to_netcdf(tree, tmp_path / "tree.nc")
    loaded = D.from_netcdf(path)
    xr.testing.assert_identical(loaded, tree)
    assert loaded["posterior"]["net.0.r_scale"].attrs["shared_by_components"] == 1
    with pytest.raises(FileNotFoundError):
        D.from_netcdf(tmp_path / "missing.nc")


# --------------------------------------------------------------------- VI k-hat on a conjugate model

DIM, SIGMA, ALPHA = 2, 0.5, 1.0


def _conjugate_problem():
    """Bayesian linear regression with known noise, in the library's plate layout, and its exact posterior."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, DIM, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0], dtype=torch.float64) + SIGMA * torch.randn(40, generator=g, dtype=torch.float64)
    precision = ALPHA * torch.eye(DIM, dtype=torch.float64) + x.T @ x / SIGMA**2
    cov = torch.linalg.inv(precision)
    mean = cov @ x.T @ y / SIGMA**2

    def model(x, y):
        with pyro.plate("members", 1, dim=-2):
            w = pyro.sample("w", dist.Normal(torch.zeros(DIM, dtype=torch.float64), ALPHA**-0.5).to_event(1))
        with pyro.plate("members_obs", 1, dim=-2), pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("obs", dist.Normal((x * w).sum(-1), SIGMA), obs=y)

    return model, (x, y), mean, cov


def _gaussian_guide(loc, cov):
    def guide(x, y):
        with pyro.plate("members", 1, dim=-2):
            pyro.sample("w", dist.MultivariateNormal(loc, cov))

    return guide


def test_khat_small_for_the_exact_posterior_and_large_for_a_mismatched_guide():
    model, data, mean, cov = _conjugate_problem()
    x, y = data
    exact = D.log_density_ratios(model, _gaussian_guide(mean, cov), data, 1000)
    # q = posterior: every ratio p(theta, D) / q(theta) equals the evidence p(D) = N(y; 0, X X^T / alpha + sigma^2 I)
    evidence = torch.distributions.MultivariateNormal(
        torch.zeros(len(y), dtype=torch.float64), x @ x.T / ALPHA + SIGMA**2 * torch.eye(len(y), dtype=torch.float64)
    ).log_prob(y)
    np.testing.assert_allclose((exact["lp"] - exact["log_q"]).values, evidence.item(), rtol=1e-9)
    assert D.vi_khat(exact) < D.KHAT_GOOD

    wider = D.log_density_ratios(model, _gaussian_guide(mean, 1.5**2 * cov), data, 1000)  # bounded ratios
    k_wider = D.vi_khat(wider)
    assert math.isfinite(k_wider) and k_wider < D.KHAT_GOOD and D.khat_label(k_wider) == "good"

    shift = torch.linalg.cholesky(cov) @ torch.full((DIM,), 3.0, dtype=torch.float64)  # 3 posterior sds per axis
    bad = D.log_density_ratios(model, _gaussian_guide(mean + shift, 0.3**2 * cov), data, 1000)
    k_bad = D.vi_khat(bad)
    assert k_bad > D.KHAT_USABLE and "unreliable" in D.khat_verdict(k_bad)


def test_point_mass_guides_have_no_density_ratio():
    model = rank1_mlp(5, [7], 3, ensemble_size=K)
    guide = DeltaGuide(model)
    tree = D.to_datatree(model, guide, _data(), 4)
    assert "sample_stats" not in tree.children and "posterior" in tree.children
    with pytest.raises(ValueError, match="point masses"):
        D.log_density_ratios(model, guide, _data(), 4)
    with pytest.raises(ValueError, match="sample_stats"):
        D.vi_khat(tree)


# --------------------------------------------------------------------- generic posteriors


class _SoftmaxDraws:
    """A posterior given by fixed weight draws of a linear softmax classifier (K = 1), like a Laplace sample."""

    likelihood = "categorical"

    def __init__(self, weights):
        self.weights = weights  # (S, D, C)

    def sample_predictions(self, x, num_samples):
        return torch.softmax(torch.einsum("bd,sdc->sbc", x, self.weights[:num_samples]), -1).unsqueeze(1)


def test_generic_posterior_fills_the_predictive_groups_and_optional_draws():
    x, y = _data()
    weights = torch.randn(S, 5, 3)
    tree = D.to_datatree(
        None, _SoftmaxDraws(weights), (x, y), S, draws={"W": weights.unsqueeze(0).numpy()}, batch_size=4
    )
    assert tree.attrs["num_components"] == 1 and tree["posterior"]["W"].shape == (1, S, 5, 3)
    expected = torch.distributions.Categorical(logits=torch.einsum("bd,sdc->sbc", x, weights)).log_prob(y)
    np.testing.assert_allclose(tree["log_likelihood"]["obs"].values[0], expected.numpy(), rtol=1e-5, atol=1e-6)
    assert D.summary(tree)["component_separation_rhat"].isna().all()
    with pytest.raises(ValueError, match="chain=1, draw=6"):
        D.to_datatree(None, _SoftmaxDraws(weights), (x, y), S, draws={"W": weights.numpy()})
    with pytest.raises(TypeError, match="posterior must be"):
        D.to_datatree(None, object(), (x, y), S)
    with pytest.raises(TypeError, match="pair of tensors"):
        D.to_datatree(None, _SoftmaxDraws(weights), x, S)
    with pytest.raises(ValueError, match="num_samples"):
        D.to_datatree(None, _SoftmaxDraws(weights), (x, y), 0)


# --------------------------------------------------------------------- figures and the command


def test_plots_render(tmp_path):
    model, guide = _model_and_guide(Gaussian(1.0, HalfCauchy(0.1)))
    x, y = _data()
    tree = D.to_datatree(model, guide, (x, y), 10)  # 30 draws: enough for the Pareto fits
    paths = [
        plots.factor_forest(tree, tmp_path / "forest.png", max_entries=6),  # net.2.s has 3 < 6 entries
        plots.reliability_diagram(torch.softmax(torch.randn(N, 3), -1), y, tmp_path / "reliability.png"),
        plots.pit_check(tree, tmp_path / "pit.png"),
        plots.khat_plot(D.loo(tree), tmp_path / "khat.png", vi_khat=D.vi_khat(tree)),
    ]
    for path in paths:
        png = path.read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000


def test_diagnose_of_a_point_mass_guide_skips_what_needs_a_density(tmp_path):
    model = rank1_mlp(5, [7], 3, ensemble_size=K)
    x, y = _data()
    with pytest.raises(ValueError, match="at least 25"):
        diagnose(model, MixtureGuide(model), (x, y), (x, y), tmp_path / "few", num_samples=2)  # 6 draws
    report = diagnose(model, DeltaGuide(model), (x, y), (x, y), tmp_path / "delta", num_samples=9)
    assert "VI quality: undefined" in report and "PSIS-LOO: skipped" in report
    assert (tmp_path / "delta" / "forest.png").is_file() and not (tmp_path / "delta" / "khat.png").exists()


def test_diagnose_of_a_regression_model(tmp_path):
    model = rank1_mlp(3, [8], 1, ensemble_size=2, likelihood="normal")
    x = torch.randn(40, 3)
    y = x.sum(-1) + 0.1 * torch.randn(40)
    report = diagnose(model, MixtureGuide(model), (x, y), (x[:20], y[:20]), tmp_path, num_samples=16)
    assert "rmse" in report and "k-hat" in report
    assert (tmp_path / "pit.png").is_file() and not (tmp_path / "reliability.png").exists()
    tree = D.from_netcdf(tmp_path / "test.nc")
    assert tree["posterior_predictive"]["obs"].dtype.kind == "f" and tree["log_likelihood"]["obs"].shape == (2, 16, 20)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A run of the shipped digits config (1 epoch) written by ``rank1-pyro train``."""
    run_dir = tmp_path_factory.mktemp("diagnose") / "run"
    assert main(["train", "--config", "digits_mlp", "--epochs", "1", "--out", str(run_dir), "--no-progress"]) == 0
    return run_dir


def test_diagnose_command_loads_a_run_and_writes_report_and_figures(digits_run, capsys):
    capsys.readouterr()
    assert main(["diagnose", str(digits_run), "--samples", "8"]) == 0
    out = capsys.readouterr().out
    assert "loaded run 'digits_mlp'" in out
    report = (digits_run / "diagnostics" / "report.txt").read_text()
    assert report in out and "k-hat" in report and "component_separation_rhat" in report
    for name in ("forest.png", "reliability.png", "pit.png", "khat.png"):
        png = (digits_run / "diagnostics" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    tree = D.from_netcdf(digits_run / "diagnostics" / "train.nc")
    # the config's MLP (hidden 128, 128, K = 4) behind a flatten layer
    assert tree["posterior"]["net.3.r"].shape == (4, 8, 128)
    assert math.isfinite(D.vi_khat(tree))


def test_diagnose_command_refuses_too_few_draws(digits_run, capsys):
    assert main(["diagnose", str(digits_run), "--samples", "0"]) == 2
    assert main(["diagnose", str(digits_run), "--samples", "6"]) == 2  # 24 draws: too few
    assert "at least 25" in capsys.readouterr().err


@pytest.mark.parametrize(
    "layout, command",
    [
        ("missing", "rank1-pyro train --config digits_mlp --out {run}"),
        ("empty", "rank1-pyro train --config digits_mlp --out {run}"),
        ("config-only", "rank1-pyro train --resume --out {run}"),
    ],
)
def test_diagnose_without_a_run_names_the_train_command_and_trains_nothing(tmp_path, layout, command, capsys):
    run = tmp_path / "my run"  # a space: the command is quoted for the shell
    if layout != "missing":
        run.mkdir()
    if layout == "config-only":
        (run / "config.json").write_text("{}")
    before = sorted(tmp_path.rglob("*"))
    assert main(["diagnose", str(run), "--samples", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("rank1-pyro diagnose: error:")
    assert command.format(run=f"'{run}'") in err, err
    assert sorted(tmp_path.rglob("*")) == before  # nothing trained, nothing written


def test_diagnose_has_no_stand_in_model():
    with pytest.raises(SystemExit) as e:  # argparse: an unknown option
        main(["diagnose", "runs/none", "--train-digits"])
    assert e.value.code == 2


def _figure_texts(fig) -> dict:
    """Every text a reader sees: the figure's and axes' titles, the axis labels and the legend entries."""
    axes = [ax for ax in fig.axes if ax.get_visible()]
    legends = [*fig.legends, *(ax.get_legend() for ax in axes if ax.get_legend() is not None)]
    return {
        "title": " ".join(
            t for t in [fig._suptitle.get_text() if fig._suptitle else "", *(ax.get_title() for ax in axes)] if t
        ),
        "panel_titles": [ax.get_title() for ax in axes],
        "xlabels": [ax.get_xlabel() for ax in axes if ax.get_xlabel()],
        "ylabels": [ax.get_ylabel() for ax in axes if ax.get_ylabel()],
        "yticks": [t.get_text() for ax in axes for t in ax.get_yticklabels()],
        "legend": [t.get_text() for lg in legends for t in lg.get_texts()],
        "size": tuple(fig.get_size_inches()),
    }


@pytest.fixture
def rendered(monkeypatch):
    """The figures the plots write, kept open (matplotlib Agg) so their texts can be read."""
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    yield figures
    monkeypatch.undo()
    for fig in figures:
        plt.close(fig)


def test_every_figure_is_readable_on_its_own(tmp_path, rendered):
    model, guide = _model_and_guide(Gaussian(1.0, HalfCauchy(0.1)))
    x, y = _data()
    tree = D.to_datatree(model, guide, (x, y), 10)

    plots.factor_forest(tree, tmp_path / "forest.png", max_entries=2)
    forest = _figure_texts(rendered[-1])
    assert forest["xlabels"] == ["factor value (dot: posterior mean; thick / thin bar: 50% / 89% interval)"]
    assert forest["ylabels"] == ["site[entry]"]  # one label column: no empty "variable" column
    sites = ["net.0.r", "net.0.s", "net.2.r", "net.2.s"]
    assert forest["yticks"] == [f"{s}[{i}]" for s in sites for i in range(2)]  # site and index, 2 per site
    assert forest["legend"] == [f"component {k + 1}" for k in range(K)]
    assert "first 2 entries" in forest["title"]
    plots.factor_forest(tree, tmp_path / "forest6.png", max_entries=6)
    assert _figure_texts(rendered[-1])["size"][1] > forest["size"][1]  # the height fits the rows

    l = D.loo(tree)
    plots.khat_plot(l, tmp_path / "khat.png", vi_khat=D.vi_khat(tree))
    khat = _figure_texts(rendered[-1])
    assert khat["legend"] == ["k-hat = 0.5: below, PSIS estimate reliable", "k-hat = 0.7: above, unreliable"]
    assert khat["xlabels"] == ["training example (index)"] and "Pareto k-hat" in khat["ylabels"][0]
    assert f"of {N} above 0.7" in khat["title"] and "30 posterior draws" in khat["title"]
    assert "θ: the factors, D: the training data, q: the guide" in khat["title"]
    assert " S" not in khat["title"] + " ".join(khat["ylabels"])  # no undefined symbol

    plots.pit_check(tree, tmp_path / "pit.png", data="test set")
    pit = _figure_texts(rendered[-1])
    assert "on the test set" in pit["title"] and "obs" not in " ".join(pit["panel_titles"])
    assert pit["panel_titles"] == ["class label"]
    assert pit["xlabels"] == ["PIT value u (uniform when calibrated)"] and pit["ylabels"] == ["Δ-ECDF: ECDF(u) − u"]

    probs = {"a": torch.softmax(torch.randn(N, 3), -1), "b": torch.softmax(torch.randn(N, 3), -1)}
    plots.reliability_diagram(probs, y, tmp_path / "rel.png", suptitle="Reliability on the rotated test set")
    rel = _figure_texts(rendered[-1])
    assert rel["title"].startswith("Reliability on the rotated test set")
    assert sorted(rel["legend"]) == ["accuracy in bin", "mean confidence in bin", "perfect calibration"]
    assert rel["xlabels"] == ["confidence (max predicted probability)"] * 2 and rel["ylabels"] == ["accuracy", "count"]
    for path in tmp_path.glob("*.png"):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _module_level_imports(module) -> set[str]:
    """The rank1_pyro modules ``module`` imports at module level (not inside functions)."""
    import ast
    import importlib

    path = importlib.import_module(module).__file__
    names = set()
    for node in ast.parse(open(path).read()).body:
        if isinstance(node, ast.ImportFrom):
            base = (node.module or "").lstrip(".")
            names |= {f"{base}.{a.name}".strip(".") if not base else base for a in node.names}
            if not base:  # from . import a, b
                names |= {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    return {n.removeprefix("rank1_pyro.") for n in names}


def test_the_diagnostics_import_no_figures_and_the_figures_no_pyro_evaluation():
    """diagnostics (numbers) and plots (figures) do not import each other in a cycle; the report joins them."""
    assert "plots" not in _module_level_imports("rank1_pyro.diagnostics")
    assert "plots" not in _module_level_imports("rank1_pyro.diagnostics_stats")
    assert "diagnostics" not in _module_level_imports("rank1_pyro.plots")
    assert not hasattr(D, "diagnose")
