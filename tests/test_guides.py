"""The variational families of the rank-1 factors, against hand-built distributions (scipy, torch)."""

import math

import numpy as np
import pyro
import pyro.poutine as poutine
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from rank1_pyro import Gaussian, HalfCauchy, PriorMap, rank1_mlp
from rank1_pyro.inference import CauchyGuide, DeltaGuide, MixtureGuide
from rank1_pyro.inference.guides import Rank1Guide, inverse_softplus
from rank1_pyro.priors import HalfNormal

K = 3
SITES = {"net.0.r": 3, "net.0.s": 4, "net.2.r": 4, "net.2.s": 2}


def mlp(prior=None, k=K, hidden=4):
    return rank1_mlp(3, [hidden], 2, ensemble_size=k, prior=prior)


def sample_sites(guide):
    trace = poutine.trace(guide).get_trace(torch.randn(5, 3))
    return {name: node for name, node in trace.nodes.items() if node["type"] == "sample"}, trace


@pytest.mark.parametrize("y", [1e-3, 0.0316, 1.0, 7.5, 30.0])
def test_inverse_softplus_inverts_softplus(y):
    x = inverse_softplus(y)
    assert x == pytest.approx(math.log(math.expm1(y)), rel=1e-9, abs=1e-12)  # closed form
    assert F.softplus(torch.tensor(x, dtype=torch.float64)).item() == pytest.approx(y, rel=1e-12)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"init_sign_prob": -0.01}, r"init_sign_prob must be in \[0, 1\] or None, got -0.01"),
        ({"init_sign_prob": 1.01}, r"init_sign_prob must be in \[0, 1\] or None, got 1.01"),
        ({"init_loc_std": -0.5}, "init_loc_std must be >= 0, got -0.5"),
        ({"init_loc_std": float("nan")}, "init_loc_std must be >= 0, got nan"),
        ({"init_scale": 0.0}, "init_scale must be > 0, got 0.0"),
        ({"init_scale": float("nan")}, "init_scale must be > 0, got nan"),
        ({"scale_guide": "normal"}, r"scale_guide: unknown name 'normal'; valid: \['delta', 'lognormal'\]"),
    ],
)
def test_bad_arguments_raise_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MixtureGuide(mlp(), **kwargs)


def test_boundary_arguments_are_accepted():
    assert torch.all(MixtureGuide(mlp(), init_sign_prob=0.0).loc["net__0__r"] == -1.0)
    assert torch.all(MixtureGuide(mlp(), init_sign_prob=1.0).loc["net__0__r"] == 1.0)
    guide = MixtureGuide(mlp(), init_sign_prob=None, init_loc_std=0.0)
    assert all(torch.all(p == 1.0) for p in guide.loc.values())


def test_a_model_without_rank1_layers_is_refused():
    with pytest.raises(ValueError, match="CauchyGuide: the model has no rank-1 layers"):
        CauchyGuide(nn.Sequential(nn.Linear(2, 2)))


def test_parameters_mirror_the_factor_sites():
    model = mlp()
    guide = MixtureGuide(model, init_scale=0.05)
    assert guide.model is model
    keys = {name.replace(".", "__") for name in SITES}
    assert set(guide.loc) == keys and set(guide.raw_scale) == keys  # "net.0.r" -> "net__0__r"
    for name, size in SITES.items():
        key = name.replace(".", "__")
        assert guide.loc[key].shape == (K, 1, size)
        torch.testing.assert_close(F.softplus(guide.raw_scale[key]), torch.full((K, 1, size), 0.05))
    # the guide holds the factors' parameters only, never the network's weights
    assert all(n.split(".")[0] in ("loc", "raw_scale") for n, _ in guide.named_parameters())
    assert len(guide.hyper_loc) == 0 and len(guide.hyper_raw_scale) == 0
    assert guide.extra_repr() == "sites=4, ensemble_size=3"
    median = guide.median()
    assert set(median) == set(SITES)
    assert all(torch.equal(median[n], guide.loc[n.replace(".", "__")]) for n in SITES)
    assert not any(v.requires_grad for v in median.values())


def test_random_sign_and_noise_initialisation_follow_their_laws():
    pyro.set_rng_seed(0)
    model = rank1_mlp(50, [400], 10, ensemble_size=4)  # 4 * (50 + 400 + 400 + 10) = 3440 entries
    signs = torch.cat([p.flatten() for p in MixtureGuide(model, init_sign_prob=0.75).loc.values()])
    assert set(signs.unique().tolist()) == {-1.0, 1.0}
    n = signs.numel()
    assert stats.binomtest(int((signs > 0).sum()), n, 0.75).pvalue > 1e-3
    noisy = torch.cat([p.flatten() for p in MixtureGuide(model, init_sign_prob=None, init_loc_std=0.3).loc.values()])
    assert stats.kstest(noisy.detach().double().numpy(), stats.norm(1.0, 0.3).cdf).pvalue > 1e-3
    # DeltaGuide (BatchEnsemble) defaults: N(1, 0.5²) means, no scales
    delta = DeltaGuide(model)
    points = torch.cat([p.flatten() for p in delta.loc.values()])
    assert stats.kstest(points.detach().double().numpy(), stats.norm(1.0, 0.5).cdf).pvalue > 1e-3
    assert len(delta.raw_scale) == 0


@pytest.mark.parametrize("guide_cls, law", [(MixtureGuide, stats.norm), (CauchyGuide, stats.cauchy)])
def test_factor_sites_are_mean_field_components_in_the_members_plate(guide_cls, law):
    pyro.set_rng_seed(1)
    guide = guide_cls(mlp(), init_loc_std=0.2, init_scale=0.3)
    with torch.no_grad():
        for raw in guide.raw_scale.values():
            raw.add_(0.5 * torch.randn_like(raw))  # a different scale per entry
    sites, trace = sample_sites(guide)
    assert set(sites) == set(SITES)
    returned = trace.nodes["_RETURN"]["value"]
    for name, size in SITES.items():
        node, key = sites[name], name.replace(".", "__")
        assert [(f.name, f.dim, f.size) for f in node["cond_indep_stack"]] == [("members", -2, K)]
        fn = node["fn"]
        assert fn.batch_shape == (K, 1) and fn.event_shape == (size,)
        assert node["value"].shape == (K, 1, size) and torch.equal(returned[name], node["value"])
        loc = guide.loc[key].detach().double().numpy()
        scale = F.softplus(guide.raw_scale[key]).detach().double().numpy()
        x = node["value"].detach() + torch.linspace(-1, 1, size)
        expected = law(loc, scale).logpdf(x.double().numpy()).sum(-1)
        np.testing.assert_allclose(fn.log_prob(x).detach().numpy(), expected, rtol=1e-5, atol=1e-5)


def test_delta_guide_returns_its_points():
    guide = DeltaGuide(mlp(), init_loc_std=0.4)
    sites, _ = sample_sites(guide)
    for name in SITES:
        assert torch.equal(sites[name]["value"], guide.loc[name.replace(".", "__")])
        assert sites[name]["fn"].event_dim == 1
        assert [f.name for f in sites[name]["cond_indep_stack"]] == ["members"]


def test_hierarchical_scales_get_a_lognormal_guide_at_the_prior_init_value():
    prior = PriorMap(
        Gaussian(1.0, 0.1), {"net.0.*": Gaussian(1.0, HalfCauchy(0.2)), "net.2.s": Gaussian(1.0, HalfNormal(0.5))}
    )
    guide = MixtureGuide(mlp(prior), init_scale=0.07)
    assert set(guide.hyper_loc) == {"net__0__r", "net__0__s", "net__2__s"} == set(guide.hyper_raw_scale)
    assert guide.hyper_loc["net__0__r"].item() == pytest.approx(math.log(0.2))
    assert guide.hyper_loc["net__2__s"].item() == pytest.approx(math.log(0.6745 * 0.5))
    assert F.softplus(guide.hyper_raw_scale["net__0__s"]).item() == pytest.approx(0.07, rel=1e-5)
    with torch.no_grad():
        guide.hyper_loc["net__0__r"].fill_(-1.3)
        guide.hyper_raw_scale["net__0__r"].fill_(inverse_softplus(0.4))
    sites, trace = sample_sites(guide)
    assert set(sites) == set(SITES) | {"net.0.r_scale", "net.0.s_scale", "net.2.s_scale"}
    node = sites["net.0.r_scale"]
    assert node["cond_indep_stack"] == () or list(node["cond_indep_stack"]) == []  # global: outside the plate
    x = torch.tensor([0.05, 0.3, 1.2])
    expected = stats.lognorm(s=0.4, scale=math.exp(-1.3)).logpdf(x.double().numpy())
    np.testing.assert_allclose(node["fn"].log_prob(x).detach().numpy(), expected, rtol=1e-5)
    assert torch.equal(trace.nodes["_RETURN"]["value"]["net.0.r_scale"], node["value"])
    # the scale site comes before its factor (the model samples it first)
    names = [n for n in trace.nodes if n in sites]
    assert names.index("net.0.r_scale") < names.index("net.0.r")


@pytest.mark.parametrize("guide_cls", [DeltaGuide, lambda m: MixtureGuide(m, scale_guide="delta")])
def test_delta_scale_guide_is_the_exponential_of_its_location(guide_cls):
    guide = guide_cls(mlp(Gaussian(1.0, HalfCauchy(0.2))))
    with torch.no_grad():
        guide.hyper_loc["net__2__r"].fill_(-0.7)
    sites, _ = sample_sites(guide)
    node = sites["net.2.r_scale"]
    assert type(node["fn"]).__name__ == "Delta"
    torch.testing.assert_close(node["value"], torch.tensor(math.exp(-0.7)))


def test_base_class_has_no_component():
    guide = Rank1Guide(mlp())
    with pytest.raises(NotImplementedError):
        guide.component("net.0.r")


def test_defaults_and_keyword_arguments_reach_the_base_guide():
    guide = MixtureGuide(mlp())  # the reference's initial stddev ≈ 0.0316 (raw ≈ -3.44)
    torch.testing.assert_close(F.softplus(guide.raw_scale["net__0__r"]), torch.full((K, 1, 3), 0.0316))
    assert guide.raw_scale["net__0__r"][0, 0, 0].item() == pytest.approx(-3.44, abs=0.01)
    delta = DeltaGuide(mlp(Gaussian(1.0, HalfCauchy(0.2))), init_sign_prob=0.0, init_loc_std=0.0, init_scale=0.2)
    assert all(torch.all(p == -1.0) for p in delta.loc.values())  # init_sign_prob reaches the base class
    assert F.softplus(delta.hyper_raw_scale["net__0__r"]).item() == pytest.approx(0.2, rel=1e-5)  # so do kwargs
    with pytest.raises(ValueError, match="init_scale must be > 0"):
        DeltaGuide(mlp(), init_scale=0.0)
