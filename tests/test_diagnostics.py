"""ArviZ diagnostics: DataTree contents against independent computations, VI k-hat on a conjugate model, CLI."""

import math
import re
import warnings

import arviz_stats
import numpy as np
import pandas as pd
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


def test_to_netcdf_refuses_a_dataset_and_a_directory(tmp_path):
    """to_netcdf writes DataTrees only, and never over a directory (which stays as it was)."""
    tree = xr.DataTree.from_dict({"log_likelihood": xr.Dataset({"obs": ("obs_id", np.zeros(3))})})
    with pytest.raises(TypeError, match="^tree must be an xarray.DataTree, got Dataset$"):
        D.to_netcdf(tree["log_likelihood"].to_dataset(), tmp_path / "tree.nc")
    (tmp_path / "out.nc").mkdir()
    with pytest.raises(
        IsADirectoryError, match="^" + re.escape(f"cannot write {tmp_path / 'out.nc'}: it is a directory")
    ):
        D.to_netcdf(tree, tmp_path / "out.nc")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nc"] and not any((tmp_path / "out.nc").iterdir())


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
    # q = posterior: every ratio p(theta, D) / q(theta) equals the evidence p(D)
    np.testing.assert_allclose((exact["lp"] - exact["log_q"]).values, _evidence(x, y), rtol=1e-9)
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


def _evidence(x, y) -> float:
    """log p(D) of the conjugate problem: N(y; 0, X X^T / alpha + sigma^2 I)."""
    eye = torch.eye(len(y), dtype=torch.float64)
    return (
        torch.distributions.MultivariateNormal(torch.zeros_like(y), x @ x.T / ALPHA + SIGMA**2 * eye).log_prob(y).item()
    )


def test_log_density_ratios_of_a_rank1_posterior_evaluate_its_model_and_guide():
    """A Rank1Posterior passed as the guide brings its own model: for the exact posterior lp - log_q = log p(D)."""
    model, data, mean, cov = _conjugate_problem()
    model.likelihood = "normal"  # what Rank1Posterior reads of a model
    ds = D.log_density_ratios(None, Rank1Posterior(model, _gaussian_guide(mean, cov)), data, 40)
    assert ds["lp"].shape == (1, 40) and np.unique(ds["lp"].values).size == 40  # 40 distinct draws
    np.testing.assert_allclose((ds["lp"] - ds["log_q"]).values, _evidence(*data), rtol=1e-9)


def _two_observations_model(x, y):
    """No latent sites; y observed twice, under a normal and a Laplace density."""
    with pyro.plate("data", x.shape[0], dim=-1):
        pyro.sample("obs_a", dist.Normal(x[:, 0], 1.0), obs=y)
        pyro.sample("obs_b", dist.Laplace(x[:, 1], 2.0), obs=y)


def test_model_without_latents_with_two_observation_sites():
    """No latent sites: no posterior or sample_stats group; two observation sites: one log_likelihood variable each
    (each against scipy's density) and no observed_data group, which could name only one of them."""
    from scipy.stats import laplace, norm

    from rank1_pyro.inference.predictive import empty_guide

    x, y = torch.randn(N, 2), torch.randn(N)
    tree = D.to_datatree(_two_observations_model, empty_guide, (x, y), S, batch_size=5)
    assert set(tree.children) == {"log_likelihood", "posterior_predictive"}
    assert tree.attrs["num_components"] == 1 and tree.attrs["num_samples"] == S
    ll = tree["log_likelihood"]
    assert ll["obs_a"].dims == ("chain", "draw", "obs_id") and ll["obs_a"].shape == (1, S, N)
    xn, yn = x.numpy().astype(np.float64), y.numpy().astype(np.float64)
    np.testing.assert_allclose(
        ll["obs_a"].values, np.broadcast_to(norm.logpdf(yn, xn[:, 0], 1.0), (1, S, N)), rtol=1e-5
    )
    np.testing.assert_allclose(
        ll["obs_b"].values, np.broadcast_to(laplace.logpdf(yn, xn[:, 1], 2.0), (1, S, N)), rtol=1e-5
    )


def _four_dim_batch():
    """A latent site with a batch dim left of the samples plate: batch (2, S, 1, 1)."""

    def model(x, y):
        pyro.sample("z", dist.Normal(torch.zeros(2, 1, 1, 1), 1.0))
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("obs", dist.Normal(x[:, 0], 1.0), obs=y)

    def guide(x, y):
        pyro.sample("z", dist.Normal(torch.zeros(2, 1, 1, 1), 1.0))

    return model, guide


def _latent_in_the_data_dim():
    """A global latent site with 3 batch entries at dim -1 (the data dim) instead of an event dim."""

    def model(x, y):
        pyro.sample("z", dist.Normal(torch.zeros(3), 1.0))
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("obs", dist.Normal(x[:, 0], 1.0), obs=y)

    def guide(x, y):
        pyro.sample("z", dist.Normal(torch.zeros(3), 1.0))

    return model, guide


def _nothing_observed():
    """A model that never observes y."""

    def model(x, y):
        pyro.sample("z", dist.Normal(0.0, 1.0))

    def guide(x, y):
        pyro.sample("z", dist.Normal(0.0, 1.0))

    return model, guide


def _guide_of_another_ensemble_size():
    """An AutoDiagonalNormal built on a one-member model, used with the same network of three members."""
    from pyro.infer.autoguide import AutoDiagonalNormal

    one = rank1_mlp(2, [4], 3, ensemble_size=1, prior=Gaussian(1.0, 0.1))
    guide = AutoDiagonalNormal(one)
    guide(torch.randn(N, 2), torch.randint(0, 3, (N,)))  # its prototype trace: members plate of size 1
    return rank1_mlp(2, [4], 3, ensemble_size=3, prior=Gaussian(1.0, 0.1)), guide


@pytest.mark.parametrize(
    "build, message",
    [
        (_four_dim_batch, "site 'z': batch shape (2, 6, 1, 1) has more dims than (samples, members, data)"),
        (
            _latent_in_the_data_dim,
            "latent site 'z' has batch shape (6, 1, 3); expected (samples, members|1, 1), i.e. sampled in the "
            "members plate (dim -2) or outside every plate",
        ),
        (_nothing_observed, "the model has no observed sites: it must observe y when called as model(x, y)"),
        (_guide_of_another_ensemble_size, "guide site '_AutoDiagonalNormal_latent' holds 1 members, the model 3"),
    ],
)
def test_models_and_guides_outside_the_plate_layout_are_refused(build, message):
    """Each departure from the layout to_datatree reads (latents at dims -3/-2, observations at -1, K members
    in model and guide alike) is a ValueError that names the site and the shapes."""
    model, guide = build()
    x = torch.randn(N, 2)
    y = torch.randint(0, 3, (N,)) if build is _guide_of_another_ensemble_size else torch.randn(N)
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        D.to_datatree(model, guide, (x, y), S)


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


class _GaussianDraws:
    """A regression posterior given by fixed draws (w, v) (K = 1): mean x @ w, variance exp(x @ v)."""

    likelihood = "normal"

    def __init__(self, w, v):
        self.w, self.v = w, v  # (S, D)

    def sample_predictions(self, x, num_samples):
        mean, var = x @ self.w[:num_samples].T, (x @ self.v[:num_samples].T).exp()  # (B, S)
        return torch.stack([mean.T, var.T], -1).unsqueeze(1)  # (S, 1, B, 2): (mean, variance) pairs


def test_generic_regression_posterior_scores_the_normal_density_with_the_variance():
    """likelihood "normal": log_likelihood is N(y; mean, sqrt(variance)) per draw (scipy), the predictive draws
    standardise to mean 0 and sd 1, and without draws there is no posterior group."""
    from scipy.stats import norm

    x, y = torch.randn(N, 5), torch.randn(N)
    w, v = torch.randn(200, 5), 0.5 * torch.randn(200, 5)
    tree = D.to_datatree(None, _GaussianDraws(w, v), (x, y), 200, batch_size=4)
    assert set(tree.children) == {"log_likelihood", "posterior_predictive", "observed_data"}
    assert tree.attrs["likelihood"] == "normal" and tree["log_likelihood"]["obs"].shape == (1, 200, N)
    mean, sd = (x @ w.T).T.double().numpy(), (x @ v.T).T.double().exp().sqrt().numpy()  # (S, N)
    np.testing.assert_allclose(
        tree["log_likelihood"]["obs"].values[0], norm.logpdf(y.double().numpy(), mean, sd), rtol=1e-5
    )
    z = (tree["posterior_predictive"]["obs"].values[0] - mean) / sd
    assert abs(z.mean()) < 0.1 and abs(z.std() - 1.0) < 0.1


def test_generic_posterior_of_an_unknown_likelihood_is_refused():
    """Only "categorical" and "normal" observation densities exist; another name is a ValueError naming both."""

    class Poisson(_SoftmaxDraws):
        likelihood = "poisson"

    message = "posterior.likelihood: unknown name 'poisson'; valid: ['categorical', 'normal']"
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        D.to_datatree(None, Poisson(torch.randn(S, 5, 3)), _data(), S)


def test_to_datatree_refuses_draws_and_models_that_do_not_belong():
    """draws: a dict, and for generic posteriors only; a Rank1Posterior's model may not be replaced by another."""
    x, y = _data()
    weights = torch.randn(S, 5, 3)
    message = "draws must be a dict of arrays (chain, draw, ...), got ndarray"
    with pytest.raises(TypeError, match="^" + re.escape(message) + "$"):
        D.to_datatree(None, _SoftmaxDraws(weights), (x, y), S, draws=weights.unsqueeze(0).numpy())
    model, guide = _model_and_guide(Gaussian(1.0, 0.1))
    other, _ = _model_and_guide(Gaussian(1.0, 0.1))
    message = "model: not the model of the Rank1Posterior (pass None or that model)"
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        D.to_datatree(other, Rank1Posterior(model, guide), (x, y), S)
    message = "draws: only for generic posteriors; a guide supplies its own draws"
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        D.to_datatree(model, guide, (x, y), S, draws={"W": np.zeros((K, S, 2))})
    assert D.to_datatree(model, Rank1Posterior(model, guide), (x, y), S).attrs["num_components"] == K  # its own model


@pytest.mark.parametrize(
    "data, message",
    [
        (
            (torch.zeros(0, 5), torch.zeros(0, dtype=torch.long)),
            "data: x must be a non-empty batch (N, ...), got shape (0, 5)",
        ),
        ((torch.tensor(1.0), torch.tensor(1)), "data: x must be a non-empty batch (N, ...), got shape ()"),
        ((torch.zeros(4, 5), torch.zeros(4, 1)), "data: y must have shape (4,) to match x, got (4, 1)"),
        ((torch.zeros(4, 5), torch.zeros(3)), "data: y must have shape (4,) to match x, got (3,)"),
    ],
)
def test_data_must_be_a_non_empty_batch_with_one_label_per_example(data, message):
    """x needs a batch dim with at least one example, and y exactly one entry per example."""
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        D.to_datatree(None, _SoftmaxDraws(torch.randn(S, 5, 3)), data, S)


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
    with pytest.raises(ValueError, match="at least 30"):
        diagnose(model, MixtureGuide(model), (x, y), (x, y), tmp_path / "few", num_samples=2)  # 6 draws
    report = diagnose(model, DeltaGuide(model), (x, y), (x, y), tmp_path / "delta", num_samples=10)
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
    assert main(["diagnose", str(digits_run), "--samples", "7"]) == 2  # 28 draws: too few for a Pareto fit
    assert "at least 30" in capsys.readouterr().err


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


# --------------------------------------------------------------------- reading a tree (diagnostics_stats)
# Mutation-testing pass (issue #21): summaries against numpy, k-hat and LOO against closed forms and ArviZ.


def _stats_tree(K=3, S=40, seed=0):
    """A synthetic tree: factor ``a`` (4 entries of different scales, components apart), a shared scale ``sigma``
    and a factor ``b`` without the attribute."""
    from arviz_base import from_dict

    rng = np.random.default_rng(seed)
    posterior = {
        "a": rng.normal(size=(K, S, 4)) * np.array([0.1, 1.0, 2.0, 5.0]) + np.arange(K)[:, None, None],
        "sigma": np.repeat(rng.gamma(2.0, size=(1, S)), K, 0),
        "b": rng.normal(size=(K, S, 2, 3)),
    }
    tree = from_dict({"posterior": posterior}, dims={"a": ["a_dim"], "b": ["b_dim_0", "b_dim_1"]})
    tree["posterior"]["a"].attrs["shared_by_components"] = 0
    tree["posterior"]["sigma"].attrs["shared_by_components"] = 1
    return tree, posterior


def test_summary_columns_against_numpy_and_arviz_rhat():
    tree, post = _stats_tree()
    df = D.summary(tree)
    assert list(df.columns) == ["mean", "sd", "eti89_lb", "eti89_ub", "component_separation_rhat"]
    a = post["a"]
    np.testing.assert_allclose(df.loc[[f"a[{i}]" for i in range(4)], "mean"], a.mean((0, 1)), rtol=1e-12)
    np.testing.assert_allclose(df.loc[[f"a[{i}]" for i in range(4)], "sd"], a.std((0, 1), ddof=1), rtol=1e-12)
    q = np.quantile(a.reshape(-1, 4), [0.055, 0.945], axis=0)  # the equal-tailed 89 % interval, unrounded
    np.testing.assert_allclose(df.loc[[f"a[{i}]" for i in range(4)], ["eti89_lb", "eti89_ub"]].T, q, rtol=1e-12)
    rhat = arviz_stats.rhat(tree["posterior"].to_dataset())
    np.testing.assert_allclose(df.loc[[f"a[{i}]" for i in range(4)], "component_separation_rhat"], rhat["a"].values)
    assert df.loc["a[0]", "component_separation_rhat"] > 2.0  # components 1 apart, sd 0.1
    # a plain table at full precision for the report (not ArviZ's display-rounded SummaryDataFrame)
    assert type(df) is pd.DataFrame and f"{df.loc['a[1]', 'mean']:.6f}" in df.to_string()


def test_summary_passes_var_names_and_the_credible_interval_on():
    tree, post = _stats_tree()
    only = D.summary(tree, var_names=["a"])
    assert list(only.index) == [f"a[{i}]" for i in range(4)]
    eti = D.summary(tree, var_names=["a"], ci_prob=0.5)
    q = np.quantile(post["a"].reshape(-1, 4), [0.25, 0.75], axis=0)
    np.testing.assert_allclose(eti[["eti50_lb", "eti50_ub"]].T, q, rtol=1e-12)
    hdi = D.summary(tree, var_names=["a"], ci_prob=0.5, ci_kind="hdi")
    assert list(hdi.columns) == ["mean", "sd", "hdi50_lb", "hdi50_ub", "component_separation_rhat"]
    for i in range(4):  # the shortest interval holding half of the sorted draws
        s = np.sort(post["a"][..., i].ravel())
        m = len(s) // 2
        j = int(np.argmin(s[m:] - s[: len(s) - m]))
        np.testing.assert_allclose(hdi.loc[f"a[{i}]", ["hdi50_lb", "hdi50_ub"]].tolist(), [s[j], s[j + m]])


def test_component_separation_needs_two_components():
    tree, _ = _stats_tree(K=1)
    assert D.summary(tree)["component_separation_rhat"].isna().all()
    assert D.site_summary(tree)["component_separation_rhat_median"].isna().all()
    two, post = _stats_tree(K=2)
    rhat = arviz_stats.rhat(two["posterior"].to_dataset())
    np.testing.assert_allclose(D.summary(two, var_names=["a"])["component_separation_rhat"], rhat["a"].values)
    assert D.site_summary(two).loc["a", "component_separation_rhat_max"] == pytest.approx(rhat["a"].values.max())


def test_site_summary_against_numpy():
    tree, post = _stats_tree()
    df = D.site_summary(tree)
    assert list(df.columns) == [
        "size",
        "mean",
        "sd",
        "within_component_sd",
        "component_separation_rhat_median",
        "component_separation_rhat_max",
    ]
    assert list(df.index) == ["a", "sigma", "b"] and df["size"].tolist() == [4, 1, 6]
    rhat = arviz_stats.rhat(tree["posterior"].to_dataset())
    for name, values in post.items():
        flat = values.reshape(values.shape[0], values.shape[1], -1)
        assert df.loc[name, "mean"] == pytest.approx(values.mean())
        assert df.loc[name, "sd"] == pytest.approx(flat.reshape(-1, flat.shape[-1]).std(0).mean())  # per entry
        assert df.loc[name, "within_component_sd"] == pytest.approx(flat.std(1).mean())
    for name in ("a", "b"):  # b has no shared_by_components attribute: a member site
        assert df.loc[name, "component_separation_rhat_median"] == pytest.approx(np.median(rhat[name].values))
        assert df.loc[name, "component_separation_rhat_max"] == pytest.approx(np.max(rhat[name].values))
    assert np.isnan(df.loc["sigma", "component_separation_rhat_median"])  # shared by all components
    assert np.isnan(df.loc["sigma", "component_separation_rhat_max"])


def test_point_mass_components_give_infinite_rhat_without_numpy_warnings():
    from arviz_base import from_dict

    # each component constant (zero spread within) and the components apart: R-hat is inf by definition;
    # all components equal: 0 / 0
    tree = from_dict({"posterior": {"c": np.repeat(np.array([0.0, 1.0])[:, None], 20, 1), "d": np.ones((2, 20))}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        df = D.summary(tree)
        sites = D.site_summary(tree)
    assert df.loc["c", "component_separation_rhat"] == np.inf
    assert sites.loc["c", "component_separation_rhat_max"] == np.inf


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: D.summary({"posterior": 1}), TypeError, "tree must be an xarray.DataTree, got dict"),
        (lambda: D.site_summary(xr.DataTree()), ValueError, "tree has no posterior group (a generic posterior needs "),
        (
            lambda: D.vi_khat(xr.DataTree()),
            ValueError,
            "data has no sample_stats group: build it with a guide that has",
        ),
        (
            lambda: D.vi_khat({"lp": 1}),
            TypeError,
            "data must be a DataTree with sample_stats or a Dataset with variables",
        ),
        (
            lambda: D.vi_khat(xr.Dataset({"lp": ("draw", np.zeros(30))})),
            TypeError,
            "data must be a DataTree with sample_stats or a Dataset with variables lp and log_q",
        ),
        (
            lambda: D.vi_khat(_ratios(D.MIN_PARETO_DRAWS - 1)),
            ValueError,
            f"vi_khat needs at least {D.MIN_PARETO_DRAWS} draws for the Pareto tail fit, got {D.MIN_PARETO_DRAWS - 1}",
        ),
        (
            lambda: D.vi_khat(
                xr.Dataset({"lp": ("draw", np.r_[np.zeros(29), -np.inf]), "log_q": ("draw", np.zeros(30))})
            ),
            ValueError,
            "the log importance ratios are not all finite (q or p vanishes at some draws)",
        ),
        (
            lambda: D.loo(xr.Dataset()),
            ValueError,
            "tree must be a DataTree with a log_likelihood group (see to_datatree)",
        ),
        (
            lambda: D.loo(xr.DataTree()),
            ValueError,
            "tree must be a DataTree with a log_likelihood group (see to_datatree)",
        ),
    ],
)
def test_reading_messages(call, error, message):
    import re

    with pytest.raises(error, match="^" + re.escape(message)):
        call()


def test_vi_khat_recovers_the_tail_of_pareto_ratios_from_either_input():
    """Ratios w = p/q drawn from a Pareto distribution with tail index 1/k have k-hat near k (Yao et al., 2018)."""
    rng = np.random.default_rng(2)
    for k in (0.3, 0.9):
        log_w = k * np.log(1.0 / rng.uniform(size=(2, 2000)))  # P(w > t) = t^(-1/k)
        ds = xr.Dataset({"lp": (("chain", "draw"), log_w + 5.0), "log_q": (("chain", "draw"), np.full((2, 2000), 5.0))})
        khat = D.vi_khat(ds)
        assert abs(khat - k) < 0.1, (k, khat)
        tree = xr.DataTree.from_dict({"sample_stats": ds})
        assert D.vi_khat(tree) == khat
        pooled = xr.Dataset({"lp": ("draw", ds["lp"].values.ravel()), "log_q": ("draw", ds["log_q"].values.ravel())})
        assert D.vi_khat(pooled) == pytest.approx(khat)  # pooled over whatever dims the draws have


def _ratios(n, k=0.5, seed=0):
    """n log importance ratios with a Pareto tail of shape k, as a Dataset over draws."""
    log_w = k * np.log(1.0 / np.random.default_rng(seed).uniform(size=n))
    return xr.Dataset({"lp": ("draw", log_w), "log_q": ("draw", np.zeros(n))})


def test_vi_khat_accepts_the_fewest_draws_it_names():
    D.vi_khat(_ratios(D.MIN_PARETO_DRAWS))  # no ValueError at the minimum


def test_vi_khat_is_finite_at_the_fewest_draws_it_accepts():
    """ArviZ's PSIS returns k-hat NaN below 30 draws: the minimum the library accepts must give a number."""
    assert all(math.isfinite(D.vi_khat(_ratios(D.MIN_PARETO_DRAWS, seed=seed))) for seed in range(5))


def test_vi_khat_of_equal_weights_is_minus_infinity():
    lp = np.zeros(30)
    ds = xr.Dataset({"lp": ("draw", lp + 1e-9 * np.arange(30) / 30), "log_q": ("draw", np.zeros(30))})
    assert D.vi_khat(ds) == float("-inf")  # spread below 1e-8: equal weights to rounding
    lp[3] = 1e-8  # a spread of exactly 1e-8 is fitted, not declared constant
    assert D.vi_khat(xr.Dataset({"lp": ("draw", lp), "log_q": ("draw", np.zeros(30))})) != float("-inf")


def test_khat_labels_and_verdicts_at_the_thresholds():
    assert [D.khat_label(k) for k in (-np.inf, 0.49, 0.5, 0.6, 0.69, 0.7, 1.5)] == [
        "good",
        "good",
        "usable",
        "usable",
        "usable",
        "unreliable",
        "unreliable",
    ]
    assert D.khat_verdict(0.3) == "k-hat = 0.30 < 0.5: good, q is close to the posterior"
    assert D.khat_verdict(0.6) == "k-hat = 0.60 in [0.5, 0.7): usable, q is a rough approximation of the posterior"
    assert D.khat_verdict(0.9) == (
        "k-hat = 0.90 >= 0.7: unreliable, q is far from the posterior and its summaries are not the Bayesian "
        "posterior's (usual for mean-field families in hundreds of dimensions; judge the predictive by held-out "
        "metrics)"
    )


def _loo_tree(exact_q=False):
    """Autocorrelated draws (an AR(1) walk per chain: ArviZ's default relative efficiency would be far below 1) of
    a normal mean, their per-observation log-likelihoods, and lp / log_q."""
    from arviz_base import from_dict
    from scipy.stats import norm

    rng = np.random.default_rng(1)
    K, S, N = 3, 200, 8
    theta = np.zeros((K, S))
    for c in range(K):
        t = 0.0
        for s in range(S):
            t = 0.97 * t + 0.1 * rng.normal()
            theta[c, s] = t
    y = rng.normal(size=N)
    ll = norm.logpdf(y[None, None, :], loc=theta[..., None])
    lp = norm.logpdf(theta, 0, 1) + ll.sum(-1)
    log_q = lp + 3.0 if exact_q else norm.logpdf(theta, 0, 0.5)
    groups = {
        "posterior": {"theta": theta},
        "log_likelihood": {"obs": ll},
        "observed_data": {"obs": y},
        "sample_stats": {"lp": lp, "log_q": log_q},
    }
    return from_dict(groups, dims={"obs": ["obs_id"]}), ll


@pytest.mark.filterwarnings("ignore:Estimated shape parameter")
def test_loo_is_pointwise_psis_with_relative_efficiency_one():
    from arviz_base import rc_context
    from scipy.special import logsumexp

    tree, ll = _loo_tree()
    with rc_context({"stats.ic_pointwise": False}):  # pointwise whatever the user's ArviZ settings
        result = D.loo(tree)
        approx = D.loo(tree, approximate_posterior=True)
    assert result.elpd_i is not None and approx.elpd_i is not None
    # importance sampling LOO by hand: p(y_i | y_-i) ~ 1 / mean_s(1 / p(y_i | theta_s)); PSIS smooths only the tail
    by_hand = -logsumexp(-ll.reshape(-1, ll.shape[-1]), axis=0) + np.log(ll.shape[0] * ll.shape[1])
    np.testing.assert_allclose(result.elpd_i.values, by_hand, atol=0.02)
    reference = arviz_stats.loo(tree, pointwise=True, reff=1.0)
    np.testing.assert_allclose(result.pareto_k.values, reference.pareto_k.values)
    for other in (None, 2.0):  # the data tell the relative efficiency apart
        assert not np.allclose(arviz_stats.loo(tree, pointwise=True, reff=other).pareto_k.values, reference.pareto_k)
    stats = tree["sample_stats"]
    expected = arviz_stats.loo_approximate_posterior(tree, log_p=stats["lp"], log_q=stats["log_q"], pointwise=True)
    np.testing.assert_allclose(approx.elpd_i.values, expected.elpd_i.values)
    assert abs(approx.elpd - result.elpd) > 1.0  # q is not the posterior here: the correction matters


@pytest.mark.filterwarnings("ignore:Estimated shape parameter")
def test_loo_corrected_for_an_exact_q_equals_plain_loo():
    tree, _ = _loo_tree(exact_q=True)  # log q = log p(theta, D) + const: q is the posterior
    plain, approx = D.loo(tree), D.loo(tree, approximate_posterior=True)
    np.testing.assert_allclose(approx.elpd_i.values, plain.elpd_i.values, rtol=1e-10)
    without = xr.DataTree.from_dict({"log_likelihood": tree["log_likelihood"].to_dataset()})
    with pytest.raises(ValueError, match=r"^approximate_posterior=True needs the sample_stats group \(lp, log_q\)$"):
        D.loo(without, approximate_posterior=True)


# --------------------------------------------------------------------- mutation pass: the mixture density of autoguides,
# shared sites, the evaluation context, generic posteriors and files


def _autoguide(kind, model, x, y):
    """An autoguide of ``model`` (called once, parameters moved off their init): ``"normal"`` (AutoNormal),
    ``"diagonal"`` (AutoDiagonalNormal), ``"joints"``: an AutoGuideList of two AutoDiagonalNormal (the first layer's
    factors, every other site), or ``"mixed"``: AutoNormal for the first layer and AutoDiagonalNormal for the rest."""
    from pyro.infer.autoguide import AutoDiagonalNormal, AutoGuideList, AutoNormal, init_to_sample

    first = ["net.0.r", "net.0.s"]
    if kind == "normal":
        guide = AutoNormal(model, init_loc_fn=init_to_sample, init_scale=0.05)
    elif kind == "diagonal":
        guide = AutoDiagonalNormal(model, init_loc_fn=init_to_sample, init_scale=0.05)
    else:
        guide = AutoGuideList(model)
        head = AutoNormal if kind == "mixed" else AutoDiagonalNormal
        guide.append(head(pyro.poutine.block(model, expose=first), init_loc_fn=init_to_sample, init_scale=0.05))
        guide.append(
            AutoDiagonalNormal(pyro.poutine.block(model, hide=first), init_loc_fn=init_to_sample, init_scale=0.05)
        )
    guide(x, y)
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in guide.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return guide


def _hand_log_q_of_autoguide(guide, post) -> torch.Tensor:
    """log q(theta_ks) of the tree's draws from the guide's own parameters (plain torch): components j of the member
    factors, log (1/K) sum_j prod_sites N(theta_k; mu_j, sigma_j), times the shared scales' density in constrained
    space, N(log sigma; mu, s) / sigma. (K, S)."""
    from pyro.infer.autoguide import AutoNormal

    per = torch.zeros(K, K, S, dtype=torch.float64)  # [j, k, s]
    shared = torch.zeros(K, S, dtype=torch.float64)
    for part in list(guide) if isinstance(guide, pyro.infer.autoguide.AutoGuideList) else [guide]:
        if isinstance(part, AutoNormal):
            params = {n: part._get_loc_and_scale(n) for n in part._event_dims}
        else:  # AutoDiagonalNormal: each site's slice of the joint latent's mean and stddev
            index = {
                s["name"]: v.long() for s, v in part._unpack_latent(torch.arange(part.latent_dim, dtype=torch.float64))
            }
            loc, sd = part.loc, part.get_posterior().base_dist.scale
            params = {n: (loc[i], sd[i]) for n, i in index.items()}
        for name, (loc, scale) in params.items():
            loc, scale = loc.detach().double(), scale.detach().double()
            value = torch.as_tensor(post[name].values, dtype=torch.float64)
            if name.endswith("_scale"):  # a global positive site: u = log sigma, |d sigma / d u| = sigma
                u = value.log()
                shared += torch.distributions.Normal(loc, scale).log_prob(u) - u
                continue
            for j in range(K):
                per[j] += torch.distributions.Normal(loc[j, 0], scale[j, 0]).log_prob(value).sum(-1)
    return shared + torch.logsumexp(per, 0) - math.log(K)


@pytest.mark.parametrize(
    "kind",
    [
        "normal",
        "diagonal",
        "joints",
        "mixed",  # member sites and a joint latent: both parts must score member k under the same component
    ],
)
@pytest.mark.parametrize("hierarchical", [False, True])
def test_mixture_density_of_autoguides_against_a_hand_computation(kind, hierarchical):
    """For AutoNormal (auxiliary unconstrained sites and Delta sites), AutoDiagonalNormal (one joint latent) and an
    AutoGuideList of both, sample_stats.log_q is the equal-weight mixture over the K components of the member
    factors' Gaussian densities, plus each shared scale's log-normal density (the Delta sites' log-Jacobians)."""
    prior = Gaussian(1.0, HalfCauchy(0.1)) if hierarchical else Gaussian(1.0, 0.1)
    model = rank1_mlp(5, [7], 3, ensemble_size=K, prior=prior)
    x, y = _data()
    guide = _autoguide(kind, model, x, y)
    tree = D.to_datatree(model, guide, (x, y), S)
    scales = [f"{n}_scale" for n in SITES] if hierarchical else []
    assert set(tree["posterior"].data_vars) == set(SITES + scales)  # no auxiliary sites
    expected = _hand_log_q_of_autoguide(guide, tree["posterior"])
    np.testing.assert_allclose(tree["sample_stats"]["log_q"].values, expected.numpy(), rtol=1e-6, atol=1e-5)


def test_per_draw_sums_the_data_dim_and_broadcasts_samples_and_members():
    """A site's log density of batch (S|1, K|1, B|1), or fewer dims (left-padded with 1s), becomes one value per
    draw (S, K): the sum over the data dim, repeated where a dim has size 1."""
    lp = torch.tensor([[1.0, 2.0, 4.0], [8.0, 16.0, 32.0]])  # (K=2, B=3): no samples dim
    expected = torch.tensor([[7.0, 56.0]]).expand(4, 2)
    torch.testing.assert_close(D._per_draw(lp, 4, 2, "z"), expected)
    torch.testing.assert_close(D._per_draw(torch.tensor([3.0]), 2, 3, "z"), torch.full((2, 3), 3.0))
    torch.testing.assert_close(D._per_draw(torch.tensor(5.0), 2, 1, "z"), torch.full((2, 1), 5.0))


def _guide_with_a_four_dim_site(where):
    """A guide whose extra site (not in the model) has batch (2, S, 1|K, 1): outside every plate, in the members
    plate, or a Delta site next to an auxiliary site."""

    def model(x, y):
        with pyro.plate("members", K, dim=-2):
            pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("obs", dist.Normal(x[:, 0], 1.0), obs=y)

    def guide(x, y):
        with pyro.plate("members", K, dim=-2):
            pyro.sample("z", dist.Normal(0.0, 1.0))
            if where == "members":
                pyro.sample("extra", dist.Normal(torch.zeros(2, 1, 1, 1), 1.0))
        if where == "shared":
            pyro.sample("extra", dist.Normal(torch.zeros(2, 1, 1, 1), 1.0))
        elif where == "delta":
            pyro.sample("aux", dist.Normal(0.0, 1.0), infer={"is_auxiliary": True})
            pyro.sample("extra", dist.Delta(torch.zeros(2, 1, 1, 1)))

    return model, guide


@pytest.mark.parametrize("where", ["shared", "members", "delta"])
def test_a_guide_site_with_too_many_batch_dims_is_named_in_the_error(where):
    """The guide's density reduces every site to one value per draw: a guide-only site with a fourth batch dim is a
    ValueError naming it (a shared site, a member site and a Delta log-Jacobian alike)."""
    model, guide = _guide_with_a_four_dim_site(where)
    shape = (2, S, K if where == "members" else 1, 1)
    message = f"site 'extra': batch shape {shape} has more dims than (samples, members, data)"
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        D.log_density_ratios(model, guide, (torch.randn(N, 2), torch.randn(N)), S)


def test_the_accumulators_live_on_the_models_device_not_the_default_device():
    """With torch's default device set elsewhere (here "meta"), a model and guide on the CPU give the same lp and
    log_q as without: every accumulator is created on the model's device."""
    model, guide = _model_and_guide(Gaussian(1.0, 0.1))
    x, y = _data()
    pyro.set_rng_seed(5)
    reference = D.log_density_ratios(model, guide, (x, y), 4)
    pyro.set_rng_seed(5)
    with torch.device("meta"):
        other = D.log_density_ratios(model, guide, (x, y), 4)
    xr.testing.assert_identical(other, reference)
    assert np.isfinite(reference["log_q"].values).all()


def test_log_q_of_a_shared_site_is_exact_in_double_precision():
    """A guide site outside the members plate (a shared factor) enters log q at float64 precision: the exact
    posterior's log density of the tree's draws (torch's MultivariateNormal) to 1e-12."""
    model, data, mean, cov = _conjugate_problem()

    def guide(x, y):  # w outside every plate: one shared site, K = 1
        pyro.sample("w", dist.MultivariateNormal(mean, cov))

    tree = D.to_datatree(model, guide, data, 20)
    w = torch.as_tensor(tree["posterior"]["w"].values)  # (1, 20, 2)
    assert tree["posterior"]["w"].attrs["shared_by_components"] == 1
    expected = torch.distributions.MultivariateNormal(mean, cov).log_prob(w)
    np.testing.assert_allclose(tree["sample_stats"]["log_q"].values, expected.numpy(), rtol=1e-12)
    evidence = (tree["sample_stats"]["lp"] - tree["sample_stats"]["log_q"]).values
    np.testing.assert_allclose(evidence, _evidence(*data), rtol=1e-9)


class _Recording(torch.nn.Module):
    """A model or guide (``fn``) as an nn.Module that records its mode and num_data at every call."""

    def __init__(self, fn, num_data=None):
        super().__init__()
        self.fn, self.num_data, self.calls = fn, num_data, []
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, y):
        self.calls.append((self.training, self.num_data))
        return self.fn(x, y)


def test_model_and_guide_are_evaluated_in_eval_mode_with_unscaled_likelihoods_and_restored():
    """During the evaluation both modules are in eval mode and the model's num_data is None (a num_data below the
    batch size is then no error); afterwards both are back in training mode and num_data is restored."""
    conj, data, mean, cov = _conjugate_problem()
    model = _Recording(conj, num_data=5)  # fewer than the 40 examples of a batch
    guide = _Recording(_gaussian_guide(mean, cov))
    ds = D.log_density_ratios(model, guide, data, 8, batch_size=40)
    np.testing.assert_allclose((ds["lp"] - ds["log_q"]).values, _evidence(*data), rtol=1e-9)
    assert model.calls == [(False, None)] and guide.calls == [(False, None)]
    assert model.training and guide.training and model.num_data == 5


def test_a_latent_site_with_four_batch_dims_is_refused_even_when_the_model_scores_it():
    """A guide site of batch (S, 1, 1, 1) that the model reads with one more event dim has a model log density of
    batch (S, 1, 1) but is still no (samples, members, 1) site: a ValueError naming the shape (log_density=False:
    the guide's own density, of four batch dims, is not asked for)."""

    def model(x, y):
        pyro.sample("z", dist.Normal(torch.zeros(1), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("obs", dist.Normal(x[:, 0], 1.0), obs=y)

    def guide(x, y):
        pyro.sample("z", dist.Normal(torch.zeros(1, 1, 1, 1), 1.0))

    message = (
        "latent site 'z' has batch shape (1, 1, 1, 1); expected (samples, members|1, 1), i.e. sampled in the "
        "members plate (dim -2) or outside every plate"
    )
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        D.to_datatree(model, guide, (torch.randn(N, 2), torch.randn(N)), 1, log_density=False)


class _RecordingGaussianDraws(_GaussianDraws):
    """_GaussianDraws that records the batch sizes it is asked for."""

    def __init__(self, w, v):
        super().__init__(w, v)
        self.batches = []

    def sample_predictions(self, x, num_samples):
        self.batches.append(x.shape[0])
        return super().sample_predictions(x, num_samples)


def test_generic_posterior_batches_bool_labels_scalar_draws_and_dims():
    """A generic posterior is asked for batch_size examples at a time; boolean labels of a regression are scored as
    0 / 1 (scipy); draws of a scalar parameter (chain, draw) are accepted; the observations have dim obs_id."""
    from scipy.stats import norm

    x, y = torch.randn(N, 5), torch.randn(N) > 0
    w, v = torch.randn(S, 5), 0.5 * torch.randn(S, 5)
    posterior = _RecordingGaussianDraws(w, v)
    tree = D.to_datatree(None, posterior, (x, y), S, batch_size=4, draws={"tau": np.arange(S)[None]})
    assert posterior.batches == [4, 4, 4, 1]
    mean, sd = (x @ w.T).T.double().numpy(), (x @ v.T).T.double().exp().sqrt().numpy()
    np.testing.assert_allclose(
        tree["log_likelihood"]["obs"].values[0], norm.logpdf(y.double().numpy(), mean, sd), rtol=1e-5
    )
    for group in ("log_likelihood", "posterior_predictive"):
        assert tree[group]["obs"].dims == ("chain", "draw", "obs_id")
    assert tree["posterior"]["tau"].dims == ("chain", "draw")
    np.testing.assert_array_equal(tree["posterior"]["tau"].values, np.arange(S)[None])


def test_netcdf_files_are_hdf5_whatever_xarrays_engine_preference(tmp_path):
    """to_netcdf writes with h5netcdf (an HDF5 file) and from_netcdf reads it back identically even when the user
    prefers the scipy engine (netCDF-3, no groups); from_netcdf opens with h5netcdf only, so a netCDF-3 file is an
    OSError (HDF5's missing signature), not a guess of another backend; missing paths are FileNotFoundErrors naming
    them."""
    tree = xr.DataTree.from_dict({"log_likelihood": xr.Dataset({"obs": ("obs_id", np.arange(3.0))})})
    with xr.set_options(netcdf_engine_order=("scipy", "h5netcdf")):
        path = D.to_netcdf(tree, tmp_path / "tree.nc")
        assert path.read_bytes()[:8] == b"\x89HDF\r\n\x1a\n"
        xr.testing.assert_identical(D.from_netcdf(path), tree)
    xr.Dataset({"obs": ("obs_id", np.arange(3.0))}).to_netcdf(tmp_path / "v3.nc", engine="scipy")
    with pytest.raises(OSError, match="file signature not found"):
        D.from_netcdf(tmp_path / "v3.nc")
    message = f"cannot write {tmp_path / 'no' / 'tree.nc'}: the directory {tmp_path / 'no'} does not exist"
    with pytest.raises(FileNotFoundError, match="^" + re.escape(message) + "$"):
        D.to_netcdf(tree, tmp_path / "no" / "tree.nc")
    with pytest.raises(FileNotFoundError, match="^" + re.escape(f"no such netCDF file: {tmp_path / 'x.nc'}") + "$"):
        D.from_netcdf(tmp_path / "x.nc")


def test_log_density_ratios_defaults_and_messages():
    """256 draws by default, minibatches of 512 examples; bad counts and point-mass guides are ValueErrors with
    their exact messages."""
    model, data, mean, cov = _conjugate_problem()
    x = torch.randn(600, DIM, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0], dtype=torch.float64)
    sizes = []

    def recording(x, y):
        sizes.append(x.shape[0])
        model(x, y)

    ds = D.log_density_ratios(recording, _gaussian_guide(mean, cov), (x, y))
    assert ds["lp"].shape == (1, 256) and sizes == [512, 88]
    for kwargs, message in [
        ({"num_samples": 0}, "num_samples must be an integer >= 1, got 0"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
    ]:
        with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
            D.log_density_ratios(model, _gaussian_guide(mean, cov), data, **kwargs)
    message = "guide: has point masses (Delta sites) or no latent sites, so log q(theta) is undefined"
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        net = rank1_mlp(5, [7], 3, ensemble_size=K)
        D.log_density_ratios(net, DeltaGuide(net), _data(), 2)


def test_posterior_predictive_of_a_model_without_latents_has_independent_draws():
    """Every draw s is its own sample of the observation density, also when no latent site varies with s: for
    N(x_0, 1) the draws of each observation have mean x_0 and sd 1 across the S draws (not one draw repeated)."""
    from rank1_pyro.inference.predictive import empty_guide

    x, y = torch.randn(N, 2), torch.randn(N)
    tree = D.to_datatree(_two_observations_model, empty_guide, (x, y), 400)
    z = tree["posterior_predictive"]["obs_a"].values[0] - x[:, 0].numpy()  # (S, N), standard normal
    assert np.abs(z.mean(0)).max() < 0.25 and np.abs(z.std(0) - 1.0).max() < 0.15


def test_a_guide_may_name_its_own_plate_samples_in_upper_case():
    """The library's plate over draws is named "samples" in the model and the guide alike: a guide plate named
    "SAMPLES" (here of size 1 at the data dim) is no clash, and its site is an ordinary latent site."""

    def model(x, y):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("obs", dist.Normal(x[:, 0] + z, 1.0), obs=y)

    def guide(x, y):
        with pyro.plate("SAMPLES", 1, dim=-1):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    tree = D.to_datatree(model, guide, (torch.randn(N, 2), torch.randn(N)), S)
    assert tree["posterior"]["z"].shape == (1, S) and np.unique(tree["posterior"]["z"].values).size == S


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_samples": 0}, "num_samples must be an integer >= 1, got 0"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"batch_size": 2.0}, "batch_size must be an integer >= 1, got 2.0"),
    ],
)
def test_to_datatree_names_a_bad_count_exactly(kwargs, message):
    """num_samples and batch_size must be integers >= 1: a ValueError naming the argument and the value."""
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        D.to_datatree(None, _SoftmaxDraws(torch.randn(S, 5, 3)), _data(), **{"num_samples": S, **kwargs})


def test_a_datatree_says_what_it_holds_in_its_attributes():
    """The tree's attributes name the posterior, likelihood, K and S and what chain and draw mean, and
    ``lp`` and ``log_q`` say what they are: the exact strings a reader (or a later tool) relies on."""
    torch.manual_seed(0)
    model, guide = _model_and_guide(Gaussian(1.0, 0.1))
    tree = D.to_datatree(model, Rank1Posterior(model, guide), _data(), S)
    assert {k: tree.attrs[k] for k in ("num_components", "num_samples", "posterior_kind", "likelihood")} == {
        "num_components": K,
        "num_samples": S,
        "posterior_kind": "MixtureGuide",
        "likelihood": "categorical",
    }
    assert tree.attrs["created_by"] == "rank1_pyro.diagnostics.to_datatree"
    assert tree.attrs["chain"] == "mixture component k (ensemble member k)"
    assert tree.attrs["draw"] == "Monte Carlo sample s from the component"
    assert tree["sample_stats"]["lp"].attrs["description"] == (
        "log p(theta, D): log prior + log-likelihood of observed_data"
    )
    assert tree["sample_stats"]["log_q"].attrs["description"] == "log q(theta): log density of the (mixture) guide"


class _BatchRecording(_SoftmaxDraws):
    """``_SoftmaxDraws`` that records the batch sizes it is evaluated on."""

    def __init__(self, weights):
        super().__init__(weights)
        self.batches = []

    def sample_predictions(self, x, num_samples):
        self.batches.append(x.shape[0])
        return super().sample_predictions(x, num_samples)


def test_to_datatree_defaults_to_32_draws_in_batches_of_512_and_takes_1d_inputs():
    """Without arguments: S = 32 draws, the data evaluated 512 examples at a time; a 1-D ``x`` (one
    scalar feature per example) is a batch like any other."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(513, 5, generator=g), torch.randint(0, 3, (513,), generator=g)
    posterior = _BatchRecording(torch.randn(40, 5, 3, generator=g))
    tree = D.to_datatree(None, posterior, (x, y))
    assert tree.attrs["num_samples"] == 32 and tree["log_likelihood"]["obs"].shape == (1, 32, 513)
    assert posterior.batches == [512, 1]

    class Scalar(_SoftmaxDraws):  # a classifier of 1-D inputs: logits x * w
        def sample_predictions(self, x, num_samples):
            return torch.softmax(x[None, :, None] * self.weights[:num_samples, None, 0], -1).unsqueeze(1)

    tree = D.to_datatree(None, Scalar(torch.randn(4, 1, 3, generator=g)), (x[:, 0], y), 4)
    assert tree["log_likelihood"]["obs"].shape == (1, 4, 513)


@pytest.mark.parametrize(
    ("model", "posterior", "data", "error", "message"),
    [
        (
            None,
            _SoftmaxDraws(torch.zeros(S, 5, 3)),
            (torch.zeros(4, 5), torch.zeros(4), torch.zeros(4)),
            TypeError,
            "data must be a pair of tensors (x, y), got tuple",
        ),
        (
            None,
            _SoftmaxDraws(torch.zeros(S, 5, 3)),
            {"x": torch.zeros(4, 5)},
            TypeError,
            "data must be a pair of tensors (x, y), got dict",
        ),
        (
            None,
            "guide",
            (torch.zeros(4, 5), torch.zeros(4)),
            TypeError,
            "posterior must be a Rank1Posterior, a Posterior (likelihood, sample_predictions) or a Pyro guide "
            "together with its model, got MixtureGuide with model=NoneType",
        ),
        (
            "model",
            "not a posterior",
            (torch.zeros(4, 5), torch.zeros(4)),
            TypeError,
            "posterior must be a Rank1Posterior, a Posterior (likelihood, sample_predictions) or a Pyro guide "
            "together with its model, got str with model=Rank1Model",
        ),
    ],
    ids=["three-tensors", "dict", "guide-without-model", "not-a-posterior"],
)
def test_bad_data_or_a_guide_without_its_model_is_named(model, posterior, data, error, message):
    if posterior == "guide":
        posterior = _model_and_guide(Gaussian(1.0, 0.1))[1]
    if model == "model":
        model = _model_and_guide(Gaussian(1.0, 0.1))[0]
    with pytest.raises(error, match="^" + re.escape(message) + "$"):
        D.to_datatree(model, posterior, data, S)


def test_a_plain_pyro_model_has_no_likelihood_name():
    """A Pyro model without a ``likelihood`` attribute (not a rank-1 network): the tree's ``likelihood``
    attribute is empty and ``posterior_kind`` names the guide's class."""
    from pyro.infer.autoguide import AutoNormal

    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(w * x, 1.0), obs=y)

    x = torch.randn(8)
    guide = AutoNormal(model)
    guide(x, x)
    tree = D.to_datatree(model, guide, (x, 2 * x), S)
    assert tree.attrs["likelihood"] == "" and tree.attrs["posterior_kind"] == "AutoNormal"
