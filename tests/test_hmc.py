"""HMC over the rank-1 factors: the exact conjugate posterior, the potential against Pyro's, member views,
the DataTree export, divergences, modes, the comparison report and figures, the command, bad input."""

import contextlib
import copy
import json
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from rank1_pyro import AveragedELBO, DeltaGuide, Gaussian, MixtureGuide, Rank1Linear, members, rank1_mlp
from rank1_pyro.inference.guides import inverse_softplus
from rank1_pyro.inference.hmc import (
    FactorTarget,
    chain_modes,
    concat_chains,
    convergence,
    factor_model,
    hmc_summary,
    hmc_to_datatree,
    member_view,
    run_hmc,
)
from rank1_pyro.inference.train import train
from rank1_pyro.layers import Rank1Layer
from rank1_pyro.models import Rank1Model, set_prior
from rank1_pyro.priors import HalfNormal, PriorMap

# ----------------------------------------------------------------------------- a conjugate rank-1 model


@contextlib.contextmanager
def float64():
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


N, D, SIGMA, TAU = 40, 3, 0.5, 0.3
W_TRUE = torch.tensor([1.0, -2.0, 0.5])


def _conjugate_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g)
    y = x @ (W_TRUE * torch.tensor([1.3, 0.8, 1.0])) + SIGMA * torch.randn(N, generator=g)
    return x, y


def conjugate_model(x, y=None):
    """y = x (w ∘ r) + ε, ε ~ N(0, σ²), r ~ N(1, τ² I); s fixed at 1: r | D is Gaussian."""
    m = members(1)
    with m:
        r = pyro.sample("r", dist.Normal(torch.ones(D), TAU).to_event(1))  # (1, 1, D)
    mean = ((x * W_TRUE) * r).sum(-1)  # (1, N)
    with m, pyro.plate("data", x.shape[0], dim=-1):
        pyro.sample("obs", dist.Normal(mean, SIGMA), obs=y)


def exact_posterior(x, y):
    r"""r | D ~ N(Σ (Xᵀy/σ² + 1/τ²), Σ), Σ = (XᵀX/σ² + I/τ²)⁻¹ with X = x ∘ w."""
    X, y = (x * W_TRUE).double(), y.double()
    cov = torch.linalg.inv(X.T @ X / SIGMA**2 + torch.eye(D, dtype=torch.float64) / TAU**2)
    mean = cov @ (X.T @ y / SIGMA**2 + torch.ones(D, dtype=torch.float64) / TAU**2)
    return mean, cov


def test_hmc_recovers_the_conjugate_posterior_with_the_default_budget():
    x, y = _conjugate_data()
    result = run_hmc(conjugate_model, (x, y), progress=False)  # the default budget: 3 chains x 500 (+500)
    assert result.settings["jit"] and result.num_chains == 3 and result.num_samples == 500
    tree = result.to_datatree()
    conv = convergence(tree)[0]
    assert conv["r_hat_max"] < 1.01 and conv["ess_bulk_min"] >= 400 and conv["divergences"] == 0
    mean, cov = exact_posterior(x, y)
    table = hmc_summary(tree)
    # within Monte Carlo error: 4 MCSE of the mean and of the sd
    assert np.all(np.abs(table["mean"].values - mean.numpy()) < 4 * table["mcse_mean"].values)
    assert np.all(np.abs(table["sd"].values - cov.diagonal().sqrt().numpy()) < 4 * table["mcse_sd"].values)
    draws = result.samples["r"].reshape(-1, D).double()
    assert torch.allclose(torch.cov(draws.T), cov, atol=0.15 * cov.diagonal().max().item())
    # energy = U + kinetic >= U = -log p(theta, D); the selected state (z, p) ~ exp(-H): E[kinetic] = D / 2
    kinetic = result.stats["energy"] + result.stats["lp"]
    assert np.all(kinetic >= -1e-9) and abs(kinetic.mean() - D / 2) < 0.2
    assert set(np.unique(result.stats["tree_depth"])) <= set(range(1, 11))


def test_a_rank1_model_with_a_fixed_factor_has_the_conjugate_models_density_and_member_views_cut_one_member():
    x, y = _conjugate_data()
    net = nn.Sequential(Rank1Linear(D, 1, ensemble_size=3, bias=False, prior=Gaussian(1.0, TAU)))
    with torch.no_grad():
        net[0].weight.copy_(W_TRUE[None])
    model = Rank1Model(net, likelihood="normal", noise_scale=SIGMA)
    target = FactorTarget(model, (x, y), member=2, fixed={"net.0.s": torch.ones(1)})
    assert target.factor_sites == ["net.0.r"] and target.dimension == D and target.dtype == torch.float64
    plain = FactorTarget(conjugate_model, (x, y))
    for r in (torch.ones(1, 1, D), torch.tensor([[[1.3, 0.7, 0.9]]])):
        z = {"net.0.r": r.double()}
        # the same log density up to the fixed site's constant log prior density N(1; 1, τ²)
        const = dist.Normal(1.0, TAU).log_prob(torch.tensor(1.0)).double()
        assert torch.allclose(target.potential(z), plain.potential({"r": r.double()}) - const)
    # the view: K = 1, the weights buffers (no parameters for autograd or Pyro's param store), model untouched
    view = member_view(rank1_mlp(4, [3], 2, ensemble_size=3), 1)
    assert view.ensemble_size == 1 and all(m.ensemble_size == 1 for m in view.modules() if isinstance(m, Rank1Layer))
    assert list(view.parameters()) == [] and dict(view.named_buffers())["net.0.bias"].shape == (1, 3)


def test_member_view_computes_member_k_of_the_full_model_and_keeps_the_original():
    model = rank1_mlp(4, [3], 2, ensemble_size=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(5, 4)
    view = member_view(model, 2)
    factors = {"net.0.r": torch.rand(3, 1, 4) + 0.5, "net.0.s": torch.rand(3, 1, 3) + 0.5}
    factors.update({"net.2.r": torch.rand(3, 1, 3) + 0.5, "net.2.s": torch.rand(3, 1, 2) + 0.5})
    with torch.no_grad():
        full = pyro.poutine.condition(model.outputs, data=factors)(x)
        one = pyro.poutine.condition(view.outputs, data={k: v[2:3] for k, v in factors.items()})(x)
    assert torch.allclose(one[0], full[2], atol=1e-6)
    assert model.ensemble_size == 3 and all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match=r"member must be an integer in \[0, 3\)"):
        member_view(model, 3)


def test_the_potential_and_its_trace_agree_with_pyros_potential_of_factor_model():
    from pyro.infer.mcmc.util import initialize_model

    x, y = torch.randn(30, 4), torch.randint(0, 2, (30,))
    model = rank1_mlp(4, [3], 2, ensemble_size=2)
    set_prior(model, PriorMap(Gaussian(1.0, 0.1), {"net.2.*": Gaussian(1.0, HalfNormal(0.2))}))
    fm = factor_model(model, x, y, member=1)
    target = fm.target
    assert target.factor_sites == ["net.0.r", "net.0.s", "net.2.r", "net.2.s"]
    assert {"net.2.r_scale", "net.2.s_scale"} <= set(target.transforms)  # hierarchical scales: log transform
    with float64():  # factor_model's documented use: Pyro's default dtype set to the chains' dtype
        _, pyro_potential, _, _ = initialize_model(fm, max_plate_nesting=2)
        z = target.unconstrained(target.prior_draw())
        traced = target.traced_potential(z)
        assert traced is not None
        for point in (z, {n: v + 0.05 * torch.randn_like(v) for n, v in z.items()}):
            expected = pyro_potential(point)
            assert torch.allclose(target.potential(point), expected, rtol=1e-12, atol=1e-10)
            assert torch.allclose(traced(point), expected, rtol=1e-12, atol=1e-10)
        mcmc = pyro.infer.MCMC(pyro.infer.NUTS(fm, max_plate_nesting=2), 3, warmup_steps=2, disable_progbar=True)
        mcmc.run()
    assert mcmc.get_samples()["net.0.r"].shape == (3, 1, 1, 4)


# ----------------------------------------------------------------------------- a small trained classifier


@pytest.fixture(scope="module")
def classifier():
    """A 3-4-2 rank-1 MLP (K = 2) trained briefly, its mixture guide, data, and short HMC chains."""
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    x = torch.randn(120, 3)
    y = (x[:, 0] + x[:, 1] > 0).long()
    model = rank1_mlp(3, [4], 2, ensemble_size=2)
    guide = MixtureGuide(model, init_sign_prob=None)
    train(model, guide, (x, y), objective=AveragedELBO(), epochs=15, lr=1e-2, progress=False, seed=0)
    result = run_hmc(model, (x, y), guide=guide, random_starts=1, num_samples=20, warmup_steps=20, progress=False)
    return model, guide, (x, y), result


def test_the_datatree_has_the_variational_layout_with_chains_members_and_stan_statistics(classifier, tmp_path):
    import arviz_stats

    from rank1_pyro.diagnostics import from_netcdf, to_netcdf

    model, guide, (x, y), result = classifier
    tree = hmc_to_datatree(result)
    assert set(tree.children) == {
        "posterior",
        "sample_stats",
        "log_likelihood",
        "posterior_predictive",
        "observed_data",
    }
    post = tree["posterior"]
    assert post["net.0.r"].dims == ("chain", "draw", "net.0.r_dim") and post["net.0.r"].shape == (4, 20, 3)
    assert post["net.2.s"].shape == (4, 20, 2)
    assert list(post["member"].values) == [0, 0, 1, 1]
    assert list(post["start"].values) == ["component 0 mean", "prior draw 1", "component 1 mean", "prior draw 1"]
    stats = tree["sample_stats"]
    assert {"diverging", "tree_depth", "energy", "lp", "n_steps", "acceptance_rate", "step_size"} <= set(
        stats.data_vars
    )
    assert stats["diverging"].dtype == bool and stats["tree_depth"].dims == ("chain", "draw")
    assert tree["log_likelihood"]["obs"].dims == ("chain", "draw", "obs_id") and tree["log_likelihood"][
        "obs"
    ].shape == (4, 20, 120)
    assert tree["observed_data"]["obs"].shape == (120,)
    # log-likelihood and lp at one draw, computed independently from the full model's member 1
    chain, draw = 2, 7
    factors = {
        name: torch.as_tensor(post[name].values[chain, draw], dtype=torch.float32).expand(2, 1, -1).clone()
        for name in ("net.0.r", "net.0.s", "net.2.r", "net.2.s")
    }
    with torch.no_grad():
        logits = pyro.poutine.condition(model.outputs, data=factors)(x)[1]
    loglik = torch.log_softmax(logits, -1).gather(-1, y[:, None]).squeeze(-1)
    assert np.allclose(tree["log_likelihood"]["obs"].values[chain, draw], loglik.numpy(), atol=1e-4)
    prior = sum(dist.Normal(1.0, 0.1).log_prob(v[1]).sum() for v in factors.values())
    assert math.isclose(stats["lp"].values[chain, draw], float(loglik.sum() + prior), rel_tol=1e-5)
    # ArviZ reads it: summary per member (R-hat, ESS over that member's chains), BFMI from the energy
    table = hmc_summary(tree)
    assert {"ess_bulk", "ess_tail", "r_hat", "mcse_mean"} <= set(table.columns) and set(table["member"]) == {0, 1}
    assert len(table) == 2 * (3 + 4 + 4 + 2)
    assert np.all(np.isfinite(arviz_stats.bfmi(tree)["energy"].values))
    to_netcdf(tree, tmp_path / "hmc.nc")
    again = from_netcdf(tmp_path / "hmc.nc")
    assert list(again["posterior"]["member"].values) == [0, 0, 1, 1]
    joined = concat_chains([tree.isel(chain=[0, 1]), tree.isel(chain=[2, 3])])
    assert list(joined["posterior"]["chain"].values) == [0, 1, 2, 3] and joined.attrs["num_chains"] == 4


def divergent_model(x, y=None):
    """A negative observation scale gives NaN: every trajectory that crosses r = 0 diverges."""
    m = members(1)
    with m:
        r = pyro.sample("r", dist.Normal(torch.ones(1), 1.0).to_event(1))
    with m, pyro.plate("data", x.shape[0], dim=-1):
        pyro.sample("obs", dist.Normal(0.0, r.squeeze(-1)), obs=y)


def test_divergences_are_recorded_per_draw_and_reported():
    result = run_hmc(
        divergent_model,
        (torch.zeros(5, 1), torch.zeros(5)),
        random_starts=1,
        num_samples=50,
        warmup_steps=50,
        progress=False,
        seed=0,
    )
    assert result.num_divergences > 0
    tree = result.to_datatree(log_likelihood=False)
    assert set(tree.children) == {"posterior", "sample_stats"}
    assert int(tree["sample_stats"]["diverging"].sum()) == result.num_divergences
    assert convergence(tree)[0]["divergences"] == result.num_divergences


def test_the_hmc_kernel_records_energy_and_steps_without_a_tree_depth():
    x, y = _conjugate_data()
    result = run_hmc(
        conjugate_model,
        (x, y),
        kernel="hmc",
        trajectory_length=1.0,
        random_starts=1,
        num_samples=10,
        warmup_steps=10,
        progress=False,
    )
    assert "tree_depth" not in result.stats
    # steps = trajectory length / adapted step size
    assert np.all(result.stats["n_steps"] == np.maximum(1, np.floor(1.0 / result.stats["step_size"])).astype(int))
    assert np.all(result.stats["energy"] >= -result.stats["lp"] - 1e-9)


def _two_mode_tree(names_sizes, chains_per_mode=(2, 1)):
    """Chains of member 0 in two modes: N(0, 1) with lp -10 and N(5, 2²) with lp -20, per entry."""
    from arviz_base import from_dict

    rng = np.random.default_rng(0)
    modes = [0] * chains_per_mode[0] + [1] * chains_per_mode[1]
    posterior = {}
    for name, size in names_sizes:
        draws = rng.normal(size=(len(modes), 400, size))
        draws[np.array(modes) == 1] = 5.0 + 2.0 * draws[np.array(modes) == 1]
        posterior[name] = draws
    lp = np.stack([np.full(400, -10.0 if m == 0 else -20.0) for m in modes])
    tree = from_dict({"posterior": posterior, "sample_stats": {"lp": lp}}, dims={n: [f"{n}_dim"] for n in posterior})
    tree["posterior"] = tree["posterior"].to_dataset().assign_coords(member=("chain", [0] * len(modes)))
    return tree


def test_chain_modes_group_chains_and_weigh_modes_by_their_gaussian_mass():
    modes = chain_modes(_two_mode_tree([("r", 2)]))
    assert [m["chains"] for m in modes] == [[0, 1], [2]]
    # log Z = mean lp + ½ log det(2πe Σ): 10 nats apart in lp, the second mode 2² times wider in 2 dims
    assert math.isclose(modes[0]["log_mass"] - modes[1]["log_mass"], 10.0 - 2 * math.log(2.0), abs_tol=0.3)
    assert modes[0]["weight"] > 0.999 and math.isclose(sum(m["weight"] for m in modes), 1.0)
    assert modes[1]["sd"].mean() == pytest.approx(2.0, rel=0.1)


def test_the_reference_takes_each_mode_by_its_weight_not_by_its_chains():
    from rank1_pyro.comparison import hmc_reference

    model = rank1_mlp(1, [1], 2, ensemble_size=1)
    tree = _two_mode_tree([("net.0.r", 1), ("net.0.s", 1), ("net.2.r", 1), ("net.2.s", 2)], chains_per_mode=(1, 2))
    draws, members, modes = hmc_reference(tree, model, max_draws=300)
    assert members == [0] and [m["chains"] for m in modes] == [[0], [1, 2]]
    assert draws["net.2.s"].shape == (300, 1, 1, 2)
    assert abs(draws["net.0.r"].mean().item()) < 0.3  # all from the heavy mode, although 2 of 3 chains are elsewhere


def test_compare_to_hmc_reports_every_approximation_and_is_exact_for_the_reference_itself(classifier, tmp_path):
    from rank1_pyro.comparison import compare_to_hmc, hmc_reference, plot_marginals, plot_std_ratios
    from rank1_pyro.laplace import SubnetLaplace, rank1_point_network

    model, guide, data, result = classifier
    tree = result.to_datatree()
    for p in model.parameters():
        p.requires_grad_(False)
    delta = DeltaGuide(model)
    la = SubnetLaplace(
        rank1_point_network(model, guide),
        "classification",
        "rank1-factors",
        prior_precision=100.0,
        prior_mean=1.0,
        predictive="nn",
    ).fit(data)
    reference, _, _ = hmc_reference(tree, model, max_draws=64)
    wide = copy.deepcopy(guide)  # component 1 with sd 0.2 everywhere, component 0 as trained
    with torch.no_grad():
        for raw in wide.raw_scale.values():
            raw[1].fill_(inverse_softplus(0.2))
    comparison = compare_to_hmc(
        model,
        {"mixture": guide, "delta": delta, "laplace": la, "wide": wide, "itself": reference},
        tree,
        data,
        data,
        num_samples=64,
        khat_samples=16,
        reference_draws=64,
    )
    rows = {r["method"]: r for r in comparison.rows}
    assert list(rows) == ["hmc", "mixture", "delta", "laplace", "wide", "itself"]
    assert rows["itself"]["predictive_kl"] < 1e-12 and rows["itself"]["std_ratio_median"] == pytest.approx(1.0)
    assert rows["itself"]["modes_covered"] == rows["itself"]["modes_total"] == len(comparison.modes)
    assert (
        rows["delta"]["point_mass"] and rows["delta"]["std_ratio_median"] == 0.0 and math.isnan(rows["delta"]["khat"])
    )
    assert rows["mixture"]["predictive_kl"] > 0 and 0 < rows["mixture"]["std_ratio_median"] < 10
    # the moments come from draws of each component: component k's sds are its softplus(raw scales)
    scales = torch.cat([torch.nn.functional.softplus(guide.raw_scale[n][0, 0]) for n in guide.loc]).detach()
    assert np.median(comparison.moments["wide"][1][1]) == pytest.approx(0.2, rel=0.1)
    assert np.median(comparison.moments["wide"][0][1] / scales.numpy()) == pytest.approx(1.0, rel=0.1)
    assert comparison.closest == "itself"
    text = comparison.report()
    assert "Closest to HMC by the predictive: itself" in text and "| laplace |" in text
    json.dumps(comparison.to_dict(), allow_nan=False)  # strict JSON: NaN k-hats become null
    plot_marginals(comparison, tmp_path / "m.png", entries=3)
    plot_std_ratios(comparison, tmp_path / "s.png")
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "s.png").stat().st_size > 10_000


# ----------------------------------------------------------------------------- bad input


def test_bad_settings_give_errors_that_say_what_to_do(classifier):
    model, guide, data, _ = classifier
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1"):
        run_hmc(model, data, num_samples=0)
    with pytest.raises(ValueError, match="no chains to run: pass a guide"):
        run_hmc(model, data, random_starts=0)
    with pytest.raises(ValueError, match="kernel: unknown name 'mala'"):
        run_hmc(model, data, kernel="mala")
    with pytest.raises(ValueError, match=r"member must be an integer in \[0, 2\)"):
        run_hmc(model, data, members=[5])
    with pytest.raises(ValueError, match="target_accept_prob must be a float in"):
        run_hmc(model, data, target_accept_prob=1.5)

    def no_factors(x, y=None):
        scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("obs", dist.Normal(0.0, scale), obs=y)

    with pytest.raises(ValueError, match=r"no rank-1 factor sites to sample.*pyro.plate\('members'"):
        FactorTarget(no_factors, (torch.zeros(3, 1), torch.zeros(3)))
    with pytest.raises(ValueError, match="no rank-1 factor sites.*the sites in `fixed`"):
        FactorTarget(conjugate_model, _conjugate_data(), fixed={"r": torch.ones(D)})
    with pytest.raises(ValueError, match="fixed: 'nope' is not a latent site of the model; its latent sites"):
        FactorTarget(model, data, fixed={"nope": torch.ones(1)})

    def two_members(x, y=None):
        m = members(2)
        with m:
            r = pyro.sample("r", dist.Normal(torch.ones(1), 1.0).to_event(1))
        with m, pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("obs", dist.Normal(r.squeeze(-1), 1.0), obs=y)

    with pytest.raises(ValueError, match="members plate has size 2: HMC samples one set of factors"):
        FactorTarget(two_members, (torch.zeros(3, 1), torch.zeros(3)))
    with pytest.raises(TypeError, match=r"data must be a pair of tensors \(x, y\)"):
        run_hmc(model, data[0])
    with pytest.raises(ValueError, match="y must have 120 rows"):
        FactorTarget(model, (data[0], data[1][:5]))


def test_compare_to_hmc_refuses_what_it_cannot_compare(classifier):
    from rank1_pyro.comparison import compare_to_hmc

    model, guide, data, result = classifier
    tree = result.to_datatree(log_likelihood=False)
    with pytest.raises(ValueError, match="non-empty dict"):
        compare_to_hmc(model, {}, tree, data, data)
    with pytest.raises(ValueError, match="the name 'hmc' is the reference's"):
        compare_to_hmc(model, {"hmc": guide}, tree, data, data)
    regression = rank1_mlp(3, [4], 1, ensemble_size=2, likelihood="normal")
    with pytest.raises(ValueError, match="compares classification models"):
        compare_to_hmc(regression, {"q": guide}, tree, data, data)
    deeper = rank1_mlp(3, [4, 4], 2, ensemble_size=2)
    with pytest.raises(ValueError, match=r"no draws of the model's factor sites \['net.4.r', 'net.4.s'\]"):
        compare_to_hmc(deeper, {"q": MixtureGuide(deeper)}, tree, data, data)


# ----------------------------------------------------------------------------- the command


def test_the_hmc_command_samples_a_run_and_writes_the_comparison(tmp_path, capsys):
    from rank1_pyro.cli import main

    config = tmp_path / "tiny.toml"
    config.write_text(
        'name = "tiny"\ndataset = "digits"\nmodel = "mlp"\nmodel_args = { hidden = [3] }\nnum_classes = 10\n'
        "ensemble_size = 2\nepochs = 1\nseed = 0\n"
    )
    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(run_dir), "--no-progress"]) == 0
    capsys.readouterr()
    argv = ["hmc", str(run_dir), "--samples", "4", "--warmup", "4", "--random-starts", "0", "--members", "0"]
    assert main(argv + ["--draws", "8", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "run 'tiny'" in out and "| run guide (MixtureGuide) |" in out and "member 0: max R-hat" in out
    for name in ("hmc.nc", "summary.csv", "comparison.json", "report.txt", "hmc-marginals.png", "hmc-std-ratios.png"):
        assert (run_dir / "hmc" / name).is_file(), name
    saved = json.loads((run_dir / "hmc" / "comparison.json").read_text())
    assert [r["method"] for r in saved["rows"]] == ["hmc", "run guide (MixtureGuide)"]
    assert main(["hmc", str(run_dir), "--samples", "0"]) == 2
    assert "--samples must be >= 1" in capsys.readouterr().err
    assert main(["hmc", str(run_dir), "--members", "7", "--no-progress"]) == 2
    assert "--members: [7] are not members of this K = 2 run" in capsys.readouterr().err
    assert main(["hmc", str(tmp_path / "nothing")]) == 2
    assert "not a rank1-pyro run directory" in capsys.readouterr().err


def test_the_benchmark_section_of_the_docs_is_generated_from_its_results():
    import importlib.util
    import sys
    from pathlib import Path

    from rank1_pyro.comparison import markdown_table

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("hmc_benchmark", root / "benchmarks" / "hmc.py")
    benchmark = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = benchmark
    spec.loader.exec_module(benchmark)
    results = json.loads((root / "docs" / "results" / "hmc.json").read_text())
    assert results["stage"] == "done"
    text = (root / "docs" / "benchmarks.md").read_text()
    section = text.split("<!-- hmc-table:start -->\n", 1)[1].split("<!-- hmc-table:end -->", 1)[0]
    assert markdown_table(results["comparison"]["rows"]) in section
    assert section == benchmark.markdown(results)  # regenerate with: python benchmarks/hmc.py --docs-only
    for image in ("hmc-marginals.png", "hmc-std-ratios.png"):
        assert (root / "docs" / "images" / image).is_file()
