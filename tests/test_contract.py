"""The declarative contract: any guide x any prior x any objective gives the ELBO it claims.

The reference for every combination is Pyro's own ``Trace_ELBO`` evaluated on the *same* draws
(same seed): on a rank-1 model it counts each member's likelihood and every latent site once, so

    Trace_ELBO = K * AveragedELBO - (K - 1) * (log p(sigma) - log q(sigma))

per draw, where sigma are the global (hierarchical-scale) sites and q(sigma) the guide's
marginal density of them (computed here from each guide's own parameters), and

    MixtureELBO - AveragedELBO = (N / B) sum_n [log mean_k p(y_n | theta_k) - mean_k log p(y_n | theta_k)].
"""

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
import torch.nn.functional as F
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import (
    AutoDiagonalNormal,
    AutoGuideList,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
    init_to_median,
)

from rank1_pyro import (
    AveragedELBO,
    Cauchy,
    CauchyGuide,
    DeltaGuide,
    Gaussian,
    HalfCauchy,
    MixtureELBO,
    MixtureGuide,
    PriorMap,
    rank1_mlp,
)

K, N, B = 3, 40, 6

PRIORS = {
    "gaussian": lambda: Gaussian(1.0, 0.1),
    "cauchy": lambda: Cauchy(1.0, 0.1),
    "hierarchical": lambda: Gaussian(1.0, HalfCauchy(0.1)),
    "priormap": lambda: PriorMap(
        Gaussian(1.0, 0.1), {"net.2.*": Cauchy(1.0, 0.2), "net.0.s": Gaussian(1.0, HalfCauchy(0.2))}
    ),
}


def _guide_list(model):
    guide = AutoGuideList(model)
    guide.append(
        AutoDiagonalNormal(
            poutine.block(model, expose_fn=lambda m: m["name"].startswith("net.0")),
            init_loc_fn=init_to_median,
            init_scale=0.2,
        )
    )
    guide.append(
        AutoNormal(
            poutine.block(model, hide_fn=lambda m: m["name"].startswith("net.0")),
            init_loc_fn=init_to_median,
            init_scale=0.2,
        )
    )
    return guide


GUIDES = {
    "mixture": lambda m: MixtureGuide(m, init_loc_std=0.3, init_scale=0.2),
    "delta": lambda m: DeltaGuide(m),
    "cauchy": lambda m: CauchyGuide(m, init_loc_std=0.3, init_scale=0.2),
    "autonormal": lambda m: AutoNormal(m, init_loc_fn=init_to_median, init_scale=0.2),
    "autodiagonal": lambda m: AutoDiagonalNormal(m, init_loc_fn=init_to_median, init_scale=0.2),
    "autolowrank": lambda m: AutoLowRankMultivariateNormal(m, init_loc_fn=init_to_median, init_scale=0.2, rank=2),
    "automvn": lambda m: AutoMultivariateNormal(m, init_loc_fn=init_to_median, init_scale=0.2),
    "autoguidelist": _guide_list,
}


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, 2, generator=g), torch.randint(0, 3, (B,), generator=g)


def setup(prior_name, guide_name):
    model = rank1_mlp(2, [4], 3, ensemble_size=K, prior=PRIORS[prior_name](), num_data=N)
    guide = GUIDES[guide_name](model)
    x, y = data()
    guide(x, y)  # autoguides build their parameters on the first call
    with torch.no_grad():  # move every parameter off its init so no term is trivially zero
        g = torch.Generator().manual_seed(2)
        for p in guide.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model, guide, x, y


def _marginal_log_q_of_scales(guide, draws) -> torch.Tensor:
    """log q(sigma) at the drawn scales, from each guide family's own parameters (constrained space)."""
    scale_sites = [n for n in draws if n.endswith("_scale")]
    if not scale_sites:
        return torch.zeros(())
    total = torch.zeros(())
    parts = list(guide) if isinstance(guide, AutoGuideList) else [guide]
    for part in parts:
        if isinstance(part, (MixtureGuide, CauchyGuide)):
            for n in scale_sites:
                key = n[: -len("_scale")].replace(".", "__")
                q = dist.LogNormal(part.hyper_loc[key], F.softplus(part.hyper_raw_scale[key]))
                total = total + q.log_prob(draws[n])
        elif isinstance(part, DeltaGuide):
            pass  # point masses: log q = 0
        elif isinstance(part, AutoNormal):
            for n in (n for n in scale_sites if n in part._event_dims):
                loc, scale = part._get_loc_and_scale(n)
                u = draws[n].log()  # the HalfCauchy support is positive: u = log sigma, dsigma/du = sigma
                total = total + dist.Normal(loc, scale).log_prob(u).sum() - u.sum()
        else:  # AutoContinuous: the sub-block of the joint posterior at the scale sites' coordinates
            d = part.latent_dim
            index = {
                site["name"]: v.reshape(-1).long()
                for site, v in part._unpack_latent(torch.arange(d, dtype=torch.float64))
            }
            idx = (
                torch.cat([index[n] for n in scale_sites if n in index])
                if any(n in index for n in scale_sites)
                else None
            )
            if idx is None:
                continue
            post = part.get_posterior()
            cov = post.covariance_matrix if hasattr(post, "covariance_matrix") else torch.diag(post.base_dist.scale**2)
            q = torch.distributions.MultivariateNormal(post.mean[idx], covariance_matrix=cov[idx][:, idx])
            u = torch.cat([draws[n].log().reshape(-1) for n in scale_sites if n in index])
            total = total + q.log_prob(u) - u.sum()
    return total


def _log_prior_of_scales(model, draws) -> torch.Tensor:
    total = torch.zeros(())
    for n, v in draws.items():
        if n.endswith("_scale"):
            layer_path, factor = n[: -len("_scale")].rsplit(".", 1)
            spec = model.get_submodule(layer_path).prior.for_site(n[: -len("_scale")])
            total = total + dist.HalfCauchy(torch.tensor(spec.scale.scale)).log_prob(v).sum()
    return total


def _draws(guide, x, y, seed):
    pyro.set_rng_seed(seed)
    trace = poutine.trace(guide).get_trace(x, y)
    return {n: s["value"] for n, s in trace.nodes.items() if s["type"] == "sample"}


@pytest.mark.parametrize("validation", [True, False], ids=["validated", "fast-path"])
@pytest.mark.parametrize("guide_name", list(GUIDES))
@pytest.mark.parametrize("prior_name", list(PRIORS))
def test_averaged_elbo_equals_rescaled_trace_elbo_on_the_same_draws(prior_name, guide_name, validation):
    """Both trace paths: Pyro's importance trace (validation on) and the objectives' own (training steps)."""
    model, guide, x, y = setup(prior_name, guide_name)
    for seed in (0, 1):
        pyro.set_rng_seed(seed)
        with pyro.validation_enabled(validation):
            averaged = AveragedELBO(analytic_kl=False, vectorize_particles=False).differentiable_loss(
                model, guide, x, y
            )
        pyro.set_rng_seed(seed)
        trace = Trace_ELBO(max_plate_nesting=2).differentiable_loss(model, guide, x, y)
        draws = _draws(guide, x, y, seed)
        global_term = _log_prior_of_scales(model, draws) - _marginal_log_q_of_scales(guide, draws)
        # losses are negative ELBOs: -trace = K (-averaged) - (K - 1) global_term
        torch.testing.assert_close(-trace, -K * averaged - (K - 1) * global_term, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("validation", [True, False], ids=["validated", "fast-path"])
@pytest.mark.parametrize("guide_name", list(GUIDES))
@pytest.mark.parametrize("prior_name", ["gaussian", "hierarchical"])
def test_mixture_elbo_differs_from_averaged_by_the_log_mixture_gap(prior_name, guide_name, validation):
    model, guide, x, y = setup(prior_name, guide_name)
    seed = 3
    with pyro.validation_enabled(validation):
        pyro.set_rng_seed(seed)
        averaged = AveragedELBO(analytic_kl=False, vectorize_particles=False).differentiable_loss(model, guide, x, y)
        pyro.set_rng_seed(seed)
        mixture = MixtureELBO(analytic_kl=False, vectorize_particles=False).differentiable_loss(model, guide, x, y)
    draws = _draws(guide, x, y, seed)
    with torch.no_grad():
        logits = poutine.condition(model.outputs, data=draws)(x)  # (K, B, C)
    ll = torch.log_softmax(logits, -1).gather(-1, y.expand(K, B)[..., None])[..., 0]
    gap = (N / B) * ((torch.logsumexp(ll, 0) - math.log(K)) - ll.mean(0)).sum()
    torch.testing.assert_close(averaged - mixture, gap, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "prior_name, guide_name",
    [
        ("gaussian", "mixture"),
        ("hierarchical", "mixture"),
        ("gaussian", "autonormal"),
        ("hierarchical", "autonormal"),
        ("hierarchical", "autodiagonal"),
        ("gaussian", "autolowrank"),
    ],
)
def test_analytic_and_monte_carlo_kl_agree_in_expectation(prior_name, guide_name):
    """With closed-form KLs where the guide site samples the model site, the ELBO keeps its expectation
    (a Delta site of an autoguide carries a log-Jacobian, so it must never take the closed form)."""
    model, guide, x, y = setup(prior_name, guide_name)
    losses = {}
    for analytic in (True, False):
        values = []
        for seed in range(40):
            pyro.set_rng_seed(seed)
            with torch.no_grad():
                with pyro.validation_enabled(analytic):  # the fast trace path for the Monte Carlo side
                    values.append(
                        AveragedELBO(num_particles=50, analytic_kl=analytic).differentiable_loss(model, guide, x, y)
                    )
        losses[analytic] = torch.stack(values)
    diff = losses[True].mean() - losses[False].mean()
    se = (losses[True].var() / 40 + losses[False].var() / 40).sqrt()
    assert diff.abs() < 4 * se + 1e-3, (diff, se)


def test_autonormal_entropy_is_counted():
    """The defect: AutoNormal's auxiliary sites' entropy was dropped and its Delta sites' KL was -log p."""
    model, guide, x, y = setup("gaussian", "autonormal")
    elbo = AveragedELBO()
    kls = []
    for seed in range(200):
        pyro.set_rng_seed(seed)
        with torch.no_grad():
            kls.append(elbo.loss_terms(model, guide, x, y).kl)
    mc = torch.stack(kls).mean()
    exact = 0.0  # (1/K) sum_k KL(q_k || p): per-site Normal-Normal KLs, members weighted 1/K
    for name in guide._event_dims:
        loc, scale = guide._get_loc_and_scale(name)
        exact = exact + torch.distributions.kl_divergence(dist.Normal(loc, scale), dist.Normal(1.0, 0.1)).sum() / K
    torch.testing.assert_close(mc, exact.detach(), rtol=0.05, atol=0.5)
    assert mc > 0


# ----------------------------------------------------------------------------- a conjugate model


def _conjugate_problem(ensemble_size):
    """y = ((x * r) W^T) * s + noise with W = 1, b = 0, s pinned at 1 by a tight prior: r's posterior is
    the Bayesian linear regression posterior, and the orthogonal design makes it factorise (so every
    Gaussian family, mean-field included, can represent it exactly)."""
    from rank1_pyro import Rank1Linear, Rank1Model

    d, n, tau, noise = 3, 32, 0.5, 0.5
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(n, d, generator=g))
    x = q * torch.tensor([2.0**0.5, 8.0**0.5, 30.0**0.5])  # X^T X = diag(2, 8, 30)
    r_true = torch.tensor([1.8, 1.4, 2.0])
    y = x @ r_true + noise * torch.randn(n, generator=g)
    prior = PriorMap(Gaussian(1.0, tau), {"*.s": Gaussian(1.0, 1e-3)})
    layer = Rank1Linear(d, 1, ensemble_size=ensemble_size, prior=prior)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.bias.zero_()
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    model = Rank1Model(torch.nn.Sequential(layer), likelihood="normal", noise_scale=noise, num_data=n)
    precision = 1 / tau**2 + torch.diag(x.T @ x) / noise**2
    mean = (1 / tau**2 + x.T @ y / noise**2) / precision
    return model, x, y, mean, precision.rsqrt()


CONJUGATE_GUIDES = {
    "mixture": lambda m: MixtureGuide(m, init_sign_prob=None),
    "autonormal": lambda m: AutoNormal(m, init_loc_fn=init_to_median),
    "autodiagonal": lambda m: AutoDiagonalNormal(m, init_loc_fn=init_to_median),
    "autolowrank": lambda m: AutoLowRankMultivariateNormal(m, init_loc_fn=init_to_median, rank=2),
    "automvn": lambda m: AutoMultivariateNormal(m, init_loc_fn=init_to_median),
}


@pytest.mark.parametrize("objective", ["averaged", "mixture-k1", "trace"])
@pytest.mark.parametrize("guide_name", list(CONJUGATE_GUIDES))
def test_every_gaussian_guide_recovers_the_exact_posterior(guide_name, objective):
    k = 1 if objective == "mixture-k1" else 3
    model, x, y, mean, std = _conjugate_problem(k)
    guide = CONJUGATE_GUIDES[guide_name](model)
    elbo = {"averaged": AveragedELBO, "mixture-k1": MixtureELBO}.get(objective)
    elbo = elbo(num_particles=8) if elbo else Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=2)
    guide(x, y)
    steps = 600  # measured: the largest error over these 15 fits is 4.6% (stds), 1.8% (means)
    opt = torch.optim.Adam(guide.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.05 ** (t / steps))
    for _ in range(steps):
        opt.zero_grad()
        elbo.differentiable_loss(model, guide, x, y).backward()
        opt.step()
        sched.step()
    with torch.no_grad(), pyro.plate("samples", 4000, dim=-3):
        r = poutine.trace(guide).get_trace(x, y).nodes["net.0.r"]["value"]  # (S, K, 1, d)
    r = r.reshape(4000, k, -1)
    torch.testing.assert_close(r.mean(0), mean.expand(k, -1), rtol=0.1, atol=0.0)
    torch.testing.assert_close(r.std(0), std.expand(k, -1), rtol=0.1, atol=0.0)


# ----------------------------------------------------------------------------- a model written in plain Pyro


def _linear_regression(k, n=24, d=2, tau=0.7, noise=0.4):
    from rank1_pyro import members

    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, d, generator=g)
    y = x @ torch.tensor([1.5, -0.5]) + noise * torch.randn(n, generator=g)

    def model(x, y=None):
        m = members(k)
        with m:  # one factor vector per member
            r = pyro.sample("r", dist.Normal(torch.ones(d), tau).to_event(1))  # (K, 1, d)
        mean = (m.tile(x) * r).sum(-1)  # (K, B)
        with m, pyro.plate("data", n, dim=-1):
            pyro.sample("obs", dist.Normal(mean, noise), obs=y)

    # the exact posterior of r and the evidence of the (single-network) model
    precision = torch.eye(d) / tau**2 + x.T @ x / noise**2
    cov = torch.linalg.inv(precision)
    post_mean = cov @ (torch.ones(d) / tau**2 + x.T @ y / noise**2)
    evidence = dist.MultivariateNormal(x @ torch.ones(d), noise**2 * torch.eye(n) + tau**2 * x @ x.T).log_prob(y)

    def exact_guide(x, y=None):
        with members(k):
            pyro.sample("r", dist.MultivariateNormal(post_mean, covariance_matrix=cov))

    return model, exact_guide, x, y, evidence


def test_a_plain_pyro_model_with_members_gives_the_exact_elbo_and_the_bounds_hold():
    """With every q_k the exact posterior: averaged ELBO = log p(D) (a tight lower bound, zero variance);
    the mixture ELBO exceeds log p(D), so it is not a lower bound; Trace_ELBO = K x the averaged ELBO."""
    k = 4
    model, guide, x, y, evidence = _linear_regression(k)
    pyro.set_rng_seed(0)
    averaged = -AveragedELBO(num_particles=2000).differentiable_loss(model, guide, x, y)
    mixture = -MixtureELBO(num_particles=2000).differentiable_loss(model, guide, x, y)
    trace = -Trace_ELBO(num_particles=2000, vectorize_particles=True, max_plate_nesting=2).differentiable_loss(
        model, guide, x, y
    )
    torch.testing.assert_close(averaged, evidence, atol=2e-3, rtol=0)  # log p(D) - KL(q || posterior) with KL = 0
    torch.testing.assert_close(trace, k * evidence, atol=1e-2, rtol=0)
    assert mixture > evidence + 0.1, (mixture, evidence)
    # at K = 1 the mixture ELBO is the ELBO
    model1, guide1, *_ = _linear_regression(1)
    mixture1 = -MixtureELBO(num_particles=2000).differentiable_loss(model1, guide1, x, y)
    torch.testing.assert_close(mixture1, evidence, atol=2e-3, rtol=0)


def test_an_observation_outside_the_members_plate_says_what_to_do():

    net = rank1_mlp(2, [4], 1, ensemble_size=3)

    def model(x, y=None):
        mean = net.outputs(x).squeeze(-1)  # (K, B)
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("obs", dist.Normal(mean, 1.0), obs=y)

    x, y = torch.randn(5, 2), torch.randn(5)
    with pytest.raises(ValueError, match=r"inside the members plate, e.g. `with rank1_pyro.members\(K\)"):
        AveragedELBO().differentiable_loss(model, MixtureGuide(net), x, y)


def test_a_flat_batch_to_a_rank1_layer_says_how_to_tile_it():
    net = rank1_mlp(2, [4], 1, ensemble_size=3).net
    with pytest.raises(ValueError, match=r"members\(K\)\.tile\(x\)"):
        net(torch.randn(5, 2))


def test_members_refuses_nesting_and_a_wrong_ensemble_size():
    from rank1_pyro import members

    with pytest.raises(ValueError, match="do not nest"):
        with members(3), members(3):
            pass
    net = rank1_mlp(2, [4], 1, ensemble_size=3).net
    with pytest.raises(ValueError, match="ensemble_size=3 but it runs inside a members plate of size 2"):
        with members(2):
            net(members(3).tile(torch.randn(5, 2)))


# ----------------------------------------------------------------------------- predictive NLL in log space


def test_predictive_nll_is_computed_in_log_space_and_never_clamped():
    """A confidently wrong network: the true NLL (from the logits, in float64) is far above -log(1e-12) = 27.6
    and above float32's smallest probability; the library reports it exactly."""
    from rank1_pyro import metrics
    from rank1_pyro.inference import Rank1Posterior, predict
    from rank1_pyro.inference.predictive import evaluate

    model = rank1_mlp(2, [8], 3, ensemble_size=2)
    guide = DeltaGuide(model, init_loc_std=0.0)  # r = s = 1: every member is the deterministic network
    with torch.no_grad():
        last = model.net[2]
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.0, 60.0, 120.0]))  # logits (0, 60, 120): class 0 has log p = -120
    x, y = torch.randn(10, 2), torch.zeros(10, dtype=torch.long)
    exact = -torch.log_softmax(torch.tensor([0.0, 60.0, 120.0], dtype=torch.float64), -1)[0].item()
    prediction = predict(Rank1Posterior(model, guide), x, num_samples=3)
    assert metrics.nll(prediction.probs, y, prediction.log_probs) == pytest.approx(exact, rel=1e-6)
    assert evaluate(model, guide, (x, y), num_samples=3)["nll"] == pytest.approx(exact, rel=1e-6)
    # from probabilities alone a zero probability is an infinite NLL, never a capped one
    assert metrics.nll(prediction.probs, y) == math.inf
    moderate = torch.tensor([[1e-20, 1.0 - 1e-20]], dtype=torch.float64)
    assert metrics.nll(moderate, torch.tensor([0])) == pytest.approx(20 * math.log(10), rel=1e-12)


# ----------------------------------------------------------------------------- ArviZ with autoguides


@pytest.mark.parametrize("guide_name", ["autonormal", "autolowrank"])
def test_datatree_exports_model_sites_and_the_mixture_density_of_an_autoguide(guide_name):
    from rank1_pyro.diagnostics import to_datatree, vi_khat
    from rank1_pyro.layers import factor_sites

    model, guide, x, y = setup("gaussian", guide_name)
    tree = to_datatree(model, guide, (x, y), num_samples=12)
    names = [s.name for s in factor_sites(model)]
    assert sorted(tree["posterior"].data_vars) == sorted(names)  # no *_unconstrained, no _..._latent
    draws = {n: torch.as_tensor(tree["posterior"][n].values) for n in names}  # (chain = K, draw = S, size)
    # log q of each draw under the equal-weight mixture of the K components, from the guide's parameters
    if guide_name == "autonormal":
        per_component = []
        for j in range(K):
            total = 0.0
            for n in names:
                loc, scale = guide._get_loc_and_scale(n)  # (K, 1, size)
                total = total + dist.Normal(loc[j, 0], scale[j, 0]).log_prob(draws[n]).sum(-1)
            per_component.append(total)
    else:
        d = guide.latent_dim
        index = {site["name"]: v.long() for site, v in guide._unpack_latent(torch.arange(d, dtype=torch.float64))}
        post = guide.get_posterior()
        cov = post.covariance_matrix
        points = torch.cat([draws[n] for n in names], -1)  # (K, S, coordinates of one member)
        per_component = []
        for j in range(K):
            idx = torch.cat([index[n][j].reshape(-1) for n in names])
            q = torch.distributions.MultivariateNormal(post.mean[idx], covariance_matrix=cov[idx][:, idx])
            per_component.append(q.log_prob(points))
    expected = torch.logsumexp(torch.stack(per_component), 0) - math.log(K)
    torch.testing.assert_close(
        torch.as_tensor(tree["sample_stats"]["log_q"].values), expected.double(), rtol=1e-5, atol=1e-4
    )
    assert math.isfinite(vi_khat(tree))


# ----------------------------------------------------------------------------- initialisation


@pytest.mark.parametrize("sign_prob", [0.5, 0.75, None])
def test_guide_initialisation_draws_what_the_reference_does(sign_prob):
    """Means at +-1 with P(+1) = init_sign_prob (or 1), each component's stddev init_scale: checked on
    the guide's own draws, not on its parameters."""
    from rank1_pyro import Rank1Linear, Rank1Model

    pyro.set_rng_seed(0)
    model = Rank1Model(torch.nn.Sequential(Rank1Linear(2000, 3, ensemble_size=4)))
    guide = MixtureGuide(model, init_sign_prob=sign_prob, init_scale=0.0316)
    with torch.no_grad(), pyro.plate("samples", 400, dim=-3):
        r = poutine.trace(guide).get_trace(torch.randn(2, 2000)).nodes["net.0.r"]["value"]  # (S, K, 1, 2000)
    centre = r.mean(0)
    assert torch.allclose(centre.abs(), torch.ones_like(centre), atol=0.02)  # every mean at +-1
    positive = (centre > 0).double().mean().item()
    assert positive == pytest.approx(1.0 if sign_prob is None else sign_prob, abs=0.02)
    torch.testing.assert_close(r.std(0).mean().item(), 0.0316, rtol=0.02, atol=0.0)


def test_autoguide_default_init_is_the_bias_only_saddle_and_init_to_median_is_not():
    """Pyro's default init puts r = s = 0, where the rank-1 network ignores its input; the documented
    ``init_loc_fn=init_to_median`` starts at r = s = 1 (the prior medians), i.e. the deterministic net."""
    from rank1_pyro.inference import Rank1Posterior

    model = rank1_mlp(2, [4], 3, ensemble_size=2)
    x, y = torch.randn(5, 2), torch.randint(0, 3, (5,))
    for init, varies in ((None, False), (init_to_median, True)):
        pyro.clear_param_store()  # both guides are named "AutoNormal": do not share parameters
        guide = (
            AutoNormal(model, init_scale=1e-6) if init is None else AutoNormal(model, init_loc_fn=init, init_scale=1e-6)
        )
        guide(x, y)
        out = Rank1Posterior(model, guide).sample_outputs(x, 1)[0]  # (K, B, C)
        assert bool((out.std(1) > 1e-3).any()) == varies  # does the output depend on the input?


# ----------------------------------------------------------------------------- KL weight and estimator in runs


def test_train_keeps_the_objectives_kl_weight_and_anneals_on_top_of_it():
    from rank1_pyro.inference.train import train

    model = rank1_mlp(2, [4], 3, ensemble_size=3)
    guide = MixtureGuide(model)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 2, generator=g), torch.randint(0, 3, (32,), generator=g)
    elbo = AveragedELBO(kl_weight=4.0)
    history = train(
        model, guide, (x, y), objective=elbo, epochs=2, batch_size=32, kl_annealing_epochs=4, progress=False, seed=0
    )
    assert elbo.kl_weight == 4.0
    assert [r["kl_weight"] for r in history.epochs] == [1.0, 2.0]  # 4 x beta, beta = 1/4 then 2/4
    for r in history.epochs:  # one full batch per epoch: the per-example -ELBO with that weight
        assert r["loss"] == pytest.approx(r["nll"] + r["kl_weight"] * r["kl"] / 32, rel=1e-5)


def test_annealing_a_pyro_elbo_without_a_kl_weight_is_refused():
    from rank1_pyro.inference.train import train

    model = rank1_mlp(2, [4], 3, ensemble_size=2)
    with pytest.raises(ValueError, match="kl_annealing_epochs=2 needs a rank-1 objective"):
        train(
            model,
            MixtureGuide(model),
            (torch.randn(8, 2), torch.zeros(8, dtype=torch.long)),
            objective=Trace_ELBO(max_plate_nesting=2),
            epochs=1,
            kl_annealing_epochs=2,
            progress=False,
        )


def test_kl_weight_k_is_the_reference_loss():
    """Reference loss per example: mean NLL over the K tiled copies + sum_k KL_k / N (hand computation)."""
    model = rank1_mlp(2, [4], 3, ensemble_size=K, num_data=N)
    guide = MixtureGuide(model, init_loc_std=0.2, init_scale=0.1)
    x, y = data()
    pyro.set_rng_seed(4)
    loss = AveragedELBO(kl_weight=K, vectorize_particles=False).differentiable_loss(model, guide, x, y) / N
    draws = _draws(guide, x, y, 4)
    with torch.no_grad():
        logits = poutine.condition(model.outputs, data=draws)(x)
    nll = -torch.log_softmax(logits, -1).gather(-1, y.expand(K, B)[..., None]).mean()
    kl = 0.0
    for name in draws:
        key = name.replace(".", "__")
        q = dist.Normal(guide.loc[key], F.softplus(guide.raw_scale[key]))
        kl = kl + torch.distributions.kl_divergence(q, dist.Normal(1.0, 0.1)).sum()  # sum over members k
    torch.testing.assert_close(loss, nll + kl / N, rtol=1e-5, atol=1e-6)


def test_run_configs_choose_kl_weight_and_estimator():
    from rank1_pyro.config import load_config

    for name in ("cifar10_wrn28_10", "cifar100_wrn28_10", "imagenet_resnet50"):
        cfg = load_config(name)
        objective = cfg.train_config().objective
        assert isinstance(objective, AveragedELBO)
        assert objective.kl_weight == cfg.ensemble_size == 4 and objective.estimator == "example"
    cfg = load_config("digits_mlp").replace(kl_weight=2.5, estimator="example")
    objective = cfg.build_objective()
    assert (objective.kl_weight, objective.estimator) == (2.5, "example")
    with pytest.raises(ValueError, match="estimator: unknown name 'batch'"):
        cfg.replace(estimator="batch")
    with pytest.raises(ValueError, match="kl_weight must be >= 0"):
        cfg.replace(kl_weight=-1.0)


@pytest.mark.parametrize("guide", ["autonormal", "autolowrank"])
def test_cli_trains_and_diagnoses_an_autoguide_run_with_per_example_sampling(tmp_path, guide):
    from rank1_pyro.cli import main

    config = tmp_path / "run.toml"
    config.write_text(
        'name = "auto"\ndataset = "digits"\nmodel = "mlp"\nmodel_args = { hidden = [16] }\nnum_classes = 10\n'
        f'guide = "{guide}"\nobjective = "averaged"\nkl_weight = 1.0\nestimator = "example"\nepochs = 2\n'
        'per_core_batch_size = 256\nnum_cores = 1\noptimizer = "adam"\nbase_learning_rate = 3e-3\n'
        "lr_reference_batch = 64\nwarmup_epochs = 0\ndecay_epochs = []\nkl_annealing_epochs = 0\n"
    )
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(run), "--no-progress"]) == 0
    assert main(["diagnose", str(run), "--samples", "8"]) == 0
    report = (run / "diagnostics" / "report.txt").read_text()
    assert "k-hat = " in report and "net.1.r" in report and "_unconstrained" not in report and "_latent" not in report


@pytest.mark.parametrize("validation", [True, False])
def test_a_guide_without_reparameterized_samples_is_refused(validation):
    model = rank1_mlp(2, [4], 3, ensemble_size=K)
    mixture = MixtureGuide(model)

    class NoRsample(dist.Normal):
        has_rsample = False

    def score_guide(x, y=None):  # the mixture guide plus one site that cannot be reparameterized
        from rank1_pyro.layers import member_plate

        with member_plate(K):
            pyro.sample("aux", NoRsample(torch.zeros(K, 1, 2), 1.0).to_event(1), infer={"is_auxiliary": True})
        return mixture(x, y)

    x, y = data()
    with pyro.validation_enabled(validation), pytest.raises(NotImplementedError, match="reparameterized"):
        AveragedELBO().differentiable_loss(model, score_guide, x, y)
