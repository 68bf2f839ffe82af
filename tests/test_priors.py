"""Declarative priors: validation, per-site overrides, hierarchical scales."""

import math

import pyro
import pyro.poutine as poutine
import pytest
import torch
from scipy import stats

from rank1_pyro import (
    Cauchy,
    Gaussian,
    HalfCauchy,
    InverseGammaVariance,
    PriorMap,
    make_prior,
    rank1_mlp,
    set_prior,
)
from rank1_pyro.priors import HalfNormal, LogNormalScale


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: Gaussian(scale=-0.1), "Gaussian: scale must be a positive"),
        (lambda: Gaussian(scale=0.0), "Gaussian: scale must be a positive"),
        (lambda: Cauchy(scale=float("nan")), "Cauchy: scale must be a positive"),
        (lambda: Gaussian(loc=float("inf")), "Gaussian: loc must be a finite"),
        (lambda: HalfCauchy(scale=0), "HalfCauchy: scale must be a positive"),
        (lambda: InverseGammaVariance(concentration=-1), "InverseGammaVariance: concentration"),
        (lambda: make_prior("gausian"), "prior family: unknown name 'gausian'"),
        (lambda: make_prior("gaussian", scale={"family": "halfstudent"}), "prior scale family: unknown name"),
        (lambda: PriorMap(Gaussian(), {"net.*": 0.1}), "overrides must map"),
        (lambda: PriorMap("normal"), "default must be a prior spec"),
    ],
)
def test_invalid_specs_raise_value_error_naming_the_argument(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_make_prior_builds_the_same_specs():
    assert make_prior("cauchy", 1.0, 0.2) == Cauchy(1.0, 0.2)
    assert make_prior("normal", scale={"family": "halfcauchy", "scale": 0.3}) == Gaussian(1.0, HalfCauchy(0.3))


def test_overrides_by_pattern_change_only_the_matching_sites():
    model = rank1_mlp(3, [4], 2, ensemble_size=2)
    set_prior(model, PriorMap(Gaussian(1.0, 0.1), {"net.2.*": Cauchy(1.0, 0.5), "*.s": Gaussian(1.0, 0.2)}))
    trace = poutine.trace(model).get_trace(torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1]))
    fns = {n: trace.nodes[n]["fn"].base_dist for n in ("net.0.r", "net.0.s", "net.2.r", "net.2.s")}
    assert type(fns["net.0.r"]).__name__ == "Normal" and float(fns["net.0.r"].scale.max()) == pytest.approx(0.1)
    assert float(fns["net.0.s"].scale.max()) == pytest.approx(0.2)  # "*.s" matched
    assert type(fns["net.2.r"]).__name__ == "Cauchy" and type(fns["net.2.s"]).__name__ == "Cauchy"  # first match wins


def test_override_matching_no_site_is_an_error():
    model = rank1_mlp(3, [4], 2, ensemble_size=2)
    with pytest.raises(ValueError, match="matches no factor site"):
        set_prior(model, PriorMap(Gaussian(), {"net.9.*": Cauchy()}))


def test_hierarchical_scale_is_one_global_site_per_factor():
    model = rank1_mlp(3, [4], 2, ensemble_size=3, prior=Gaussian(1.0, HalfCauchy(0.1)))
    trace = poutine.trace(model).get_trace(torch.randn(5, 3), torch.zeros(5, dtype=torch.long))
    scale_site = trace.nodes["net.0.r_scale"]
    assert scale_site["value"].shape == ()  # outside the member plate: shared by all members
    assert [f.name for f in scale_site["cond_indep_stack"]] == []
    r = trace.nodes["net.0.r"]
    assert r["value"].shape == (3, 1, 3)
    sigma = scale_site["value"]
    expected = torch.distributions.Normal(1.0, sigma).log_prob(r["value"]).sum(-1)
    torch.testing.assert_close(r["fn"].log_prob(r["value"]), expected)
    half_cauchy = math.log(2 / (math.pi * 0.1)) - torch.log1p((sigma / 0.1) ** 2)
    torch.testing.assert_close(scale_site["fn"].log_prob(sigma), half_cauchy)


def test_inverse_gamma_prior_samples_a_variance():
    model = rank1_mlp(3, [4], 2, ensemble_size=2, prior=Gaussian(1.0, InverseGammaVariance(3.0, 0.02)))
    trace = poutine.trace(model).get_trace(torch.randn(5, 3))
    variance = trace.nodes["net.0.r_scale"]["value"]
    r = trace.nodes["net.0.r"]
    torch.testing.assert_close(r["fn"].base_dist.scale.max(), variance.sqrt())


# --------------------------------------------------------------------------------------
# Mutation-tested behaviour (issue #21): every spec against scipy.stats / a hand-built density
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: Gaussian(loc=True), "Gaussian: loc must be a finite number, got True"),
        (lambda: Gaussian(loc="1"), "Gaussian: loc must be a finite number, got '1'"),
        (lambda: Gaussian(scale=True), "Gaussian: scale must be a number, got True"),
        (lambda: Cauchy(scale="0.1"), "Cauchy: scale must be a number, got '0.1'"),
        (lambda: InverseGammaVariance(rate=0.0), "InverseGammaVariance: rate must be a positive finite number"),
        (lambda: HalfNormal(scale=-1.0), "HalfNormal: scale must be a positive finite number, got -1.0"),
        (lambda: LogNormalScale(loc=float("inf")), "LogNormalScale: loc must be a finite number, got inf"),
        (lambda: LogNormalScale(scale=0), "LogNormalScale: scale must be a positive finite number, got 0"),
        (lambda: make_prior(scale={"scale": 0.1}), r"prior scale family: unknown name ''"),
        (lambda: make_prior(scale={"family": "halfcauchy", "rate": 1.0}), r"prior scale 'halfcauchy': .*rate"),
        (lambda: PriorMap.coerce(3), r"prior: expected a prior spec \(Gaussian, Cauchy\) or a PriorMap, got 3"),
        (lambda: PriorMap.coerce("gaussian"), "prior: expected a prior spec"),
    ],
)
def test_bad_values_raise_a_value_error_with_the_owner_and_argument(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_make_prior_defaults_and_loc_reach_the_spec():
    assert make_prior() == Gaussian(1.0, 0.1)
    assert make_prior("Cauchy", 0.5, 0.2) == Cauchy(0.5, 0.2)
    assert make_prior("gaussian", -2.0, {"family": "lognormal", "loc": -1.0, "scale": 0.3}) == Gaussian(
        -2.0, LogNormalScale(-1.0, 0.3)
    )


def test_prior_map_default_and_coerce():
    assert PriorMap().default == Gaussian() and PriorMap(None).for_site("any.r") == Gaussian()
    assert PriorMap.coerce(None).default == Gaussian()
    spec = Cauchy(0.0, 0.3)
    assert PriorMap.coerce(spec).for_site("x.r") is spec
    prior_map = PriorMap(spec)
    assert PriorMap.coerce(prior_map) is prior_map


def _site(spec, name="layer.r_scale", seed=0):
    pyro.set_rng_seed(seed)
    trace = poutine.trace(lambda: spec.sample(name)).get_trace()
    return trace.nodes[name], trace.nodes["_RETURN"]["value"]


@pytest.mark.parametrize(
    "spec, frozen, transform",
    [
        (HalfCauchy(0.3), stats.halfcauchy(scale=0.3), lambda v: v),
        (HalfNormal(0.3), stats.halfnorm(scale=0.3), lambda v: v),
        (LogNormalScale(-1.5, 0.4), stats.lognorm(s=0.4, scale=math.exp(-1.5)), lambda v: v),
        # the site holds the variance; the returned scale is its square root
        (InverseGammaVariance(3.0, 0.02), stats.invgamma(a=3.0, scale=0.02), lambda v: v.sqrt()),
    ],
)
def test_scale_hyperpriors_match_scipy(spec, frozen, transform):
    site, returned = _site(spec)
    assert site["type"] == "sample" and not site["is_observed"]
    values = torch.tensor([0.05, 0.2, 0.7, 1.9])
    expected = torch.from_numpy(frozen.logpdf(values.double().numpy())).float()
    torch.testing.assert_close(site["fn"].log_prob(values), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(returned, transform(site["value"]))
    # init_value: the median (half-Cauchy, half-normal, log-normal) or the mode of the variance
    if isinstance(spec, InverseGammaVariance):
        assert spec.init_value == pytest.approx(0.02 / 4.0)
    else:
        assert spec.init_value == pytest.approx(frozen.median(), rel=1e-4)


def test_samples_of_each_hyperprior_follow_its_law():
    pyro.set_rng_seed(1)
    laws = [
        (HalfNormal(0.3), stats.halfnorm(scale=0.3)),
        (LogNormalScale(-1.0, 0.5), stats.lognorm(0.5, scale=math.exp(-1.0))),
    ]
    for spec, frozen in laws:
        with pyro.plate("draws", 2000):
            draws = spec.sample("s").double().numpy()
        assert draws.shape == (2000,) and stats.kstest(draws, frozen.cdf).pvalue > 1e-3


def test_fixed_distribution_matches_a_hand_built_density():
    x = torch.tensor([0.7, 1.0, 1.6])
    for spec, frozen in [(Gaussian(0.9, 0.2), stats.norm(0.9, 0.2)), (Cauchy(1.1, 0.3), stats.cauchy(1.1, 0.3))]:
        d = spec.distribution(3, spec.scale)  # device None: CPU
        assert d.batch_shape == () and d.event_shape == (3,) and d.mean.device.type == "cpu"
        expected = torch.tensor(frozen.logpdf(x.double().numpy()).sum(), dtype=torch.float32)
        torch.testing.assert_close(d.log_prob(x), expected)


def test_fixed_distribution_follows_the_default_dtype():
    assert Gaussian(1.0, 0.1).distribution(2, 0.1).mean.dtype == torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:  # the cached float32 object must not be served under float64
        assert Gaussian(1.0, 0.1).distribution(2, 0.1).mean.dtype == torch.float64
    finally:
        torch.set_default_dtype(previous)


def test_hierarchical_distribution_with_a_batch_of_scales():
    scale = torch.tensor([[0.1], [0.5]])  # a batch of two global scales, aligned as (S, 1)
    d = Gaussian(0.8, HalfCauchy(0.1)).distribution(3, scale)
    assert d.batch_shape == (2, 1) and d.event_shape == (3,)
    x = torch.tensor([0.5, 0.8, 1.3])
    expected = torch.tensor([[stats.norm(0.8, s).logpdf(x.double().numpy()).sum()] for s in (0.1, 0.5)])
    torch.testing.assert_close(d.log_prob(x), expected.float())


def test_distribution_lives_on_the_requested_device():
    # the meta device stands in for an accelerator: a tensor left on the CPU would show
    with pyro.validation_enabled(False):
        assert Gaussian().distribution(3, 0.1, device="meta").mean.device.type == "meta"
        d = Cauchy(1.0, HalfNormal(0.1)).distribution(3, torch.tensor(0.2, device="meta"), device="meta")
        assert d.base_dist.loc.device.type == "meta" and d.base_dist.scale.device.type == "meta"
