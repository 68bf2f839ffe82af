"""Declarative priors: validation, per-site overrides, hierarchical scales."""

import math

import pyro.poutine as poutine
import pytest
import torch

from rank1_pyro import Cauchy, Gaussian, HalfCauchy, InverseGammaVariance, PriorMap, make_prior, rank1_mlp, set_prior


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
