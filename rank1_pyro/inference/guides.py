r"""Variational families for the rank-1 factors.

Each guide mirrors the model's factor sites (found from the model's rank-1 layers, so the
parameters exist as soon as the guide is built) and samples them inside the same
``pyro.plate("members", K, dim=-2)``. Component k of a guide is tied to member k.

* :class:`MixtureGuide` -- the paper's posterior: an equal-weight mixture of K mean-field
  Gaussians, :math:`q(\theta) = \frac1K \sum_k \prod_i \mathcal N(\theta_i; \mu_{k,i}, \sigma_{k,i}^2)`.
  Drawing each component once per step is a stratified estimate of the expectation under the
  mixture.
* :class:`DeltaGuide` -- point masses: this is BatchEnsemble (Wen et al., 2020).
* :class:`CauchyGuide` -- a mixture of K mean-field Cauchy components (trainable location/scale).

Hierarchical scale sites (one per factor site, outside the member plate) get a LogNormal guide
(or a Delta with ``scale_guide="delta"``). Any Pyro autoguide (e.g. ``AutoNormal``) also runs
on the same model, since the factors are ordinary sample sites, and the objectives count its
entropy exactly (:mod:`.objectives`). Start it with ``init_loc_fn=init_to_median`` (r = s = 1):
Pyro's default initialisation puts every factor at 0, the saddle where the network outputs only
its biases.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule
from torch import nn

from .._checks import one_of
from ..layers import factor_sites, member_plate

__all__ = ["Rank1Guide", "MixtureGuide", "DeltaGuide", "CauchyGuide", "inverse_softplus"]


def inverse_softplus(y: float) -> float:
    """The ``x`` with ``softplus(x) = y`` (``y > 0``)."""
    return y + math.log(-math.expm1(-y))


def _key(site: str) -> str:
    return site.replace(".", "__")


class Rank1Guide(PyroModule):
    """Base class: one location (and optionally one scale) per factor entry and member.

    Args:
        model: the :class:`~rank1_pyro.models.Rank1Model` (or any module with rank-1 layers).
            Build the guide after the priors are final: hierarchical scale sites are found here.
        init_sign_prob: initialise factor means at ±1 with P(+1) = ``init_sign_prob`` (the
            reference's random-sign init: 0.5 for CIFAR, 0.75 for ImageNet); ``None`` starts at 1.
        init_loc_std: standard deviation of Gaussian noise added to the initial means.
        init_scale: initial stddev of every component (the raw parameter is its inverse softplus).
        scale_guide: ``"lognormal"`` or ``"delta"`` for hierarchical scale sites.
    """

    has_scale = True

    def __init__(
        self,
        model: nn.Module,
        init_sign_prob: float | None = 0.5,
        init_loc_std: float = 0.0,
        init_scale: float = 0.0316,
        scale_guide: str = "lognormal",
    ):
        super().__init__()
        if init_sign_prob is not None and not 0.0 <= init_sign_prob <= 1.0:
            raise ValueError(f"init_sign_prob must be in [0, 1] or None, got {init_sign_prob!r}")
        if not init_loc_std >= 0.0:
            raise ValueError(f"init_loc_std must be >= 0, got {init_loc_std!r}")
        if not init_scale > 0.0:
            raise ValueError(f"init_scale must be > 0, got {init_scale!r}")
        one_of("scale_guide", scale_guide, ["delta", "lognormal"])
        self._model = (model,)  # a tuple keeps the model's parameters out of the guide's
        self.sites = factor_sites(model)
        if not self.sites:
            raise ValueError(f"{type(self).__name__}: the model has no rank-1 layers")
        self.scale_guide = scale_guide
        # PyroModule containers, so that pyro.infer.SVI sees every parameter as a param site
        self.loc = PyroModule[nn.ParameterDict]()
        self.raw_scale = PyroModule[nn.ParameterDict]()
        self.hyper_loc = PyroModule[nn.ParameterDict]()
        self.hyper_raw_scale = PyroModule[nn.ParameterDict]()
        raw = inverse_softplus(init_scale)
        for site in self.sites:
            k = site.layer.ensemble_size
            loc = torch.ones(k, 1, site.size)
            if init_sign_prob is not None:
                loc = 2.0 * torch.bernoulli(torch.full_like(loc, float(init_sign_prob))) - 1.0
            loc = loc + init_loc_std * torch.randn_like(loc)
            self.loc[_key(site.name)] = nn.Parameter(loc)
            if self.has_scale:
                self.raw_scale[_key(site.name)] = nn.Parameter(torch.full((k, 1, site.size), raw))
            if site.prior.hierarchical:
                self.hyper_loc[_key(site.name)] = nn.Parameter(torch.tensor(math.log(site.prior.scale.init_value)))
                self.hyper_raw_scale[_key(site.name)] = nn.Parameter(torch.tensor(raw))

    @property
    def model(self) -> nn.Module:
        return self._model[0]

    def component(self, site: str) -> dist.TorchDistribution:
        """The per-member distribution of factor ``site``, batch ``(K, 1)``, event ``(size,)``."""
        raise NotImplementedError

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        values = {}
        for site in self.sites:
            key = _key(site.name)
            if site.prior.hierarchical:
                loc = self.hyper_loc[key]
                q = (
                    dist.Delta(loc.exp())
                    if self.scale_guide == "delta"
                    else dist.LogNormal(loc, F.softplus(self.hyper_raw_scale[key]))
                )
                values[site.scale_site] = pyro.sample(site.scale_site, q)
            with member_plate(site.layer.ensemble_size):
                values[site.name] = pyro.sample(site.name, self.component(site.name))
        return values

    def median(self) -> dict[str, torch.Tensor]:
        """Component locations of every factor site (``(K, 1, size)`` each)."""
        return {s.name: self.loc[_key(s.name)].detach() for s in self.sites}

    def extra_repr(self) -> str:
        return f"sites={len(self.sites)}, ensemble_size={self.sites[0].layer.ensemble_size}"


class MixtureGuide(Rank1Guide):
    r"""Equal-weight mixture of K mean-field Normals, component k tied to member k.

    :math:`q_k(r) = \mathcal N(\mu_k, \mathrm{diag}\,\mathrm{softplus}(\rho_k)^2)`, initialised at
    random-sign means and stddev ``init_scale`` ≈ 0.0316 (the reference's ``raw ≈ -3.44``).
    """

    def component(self, site):
        key = _key(site)
        return dist.Normal(self.loc[key], F.softplus(self.raw_scale[key])).to_event(1)


class CauchyGuide(Rank1Guide):
    """Mixture of K mean-field Cauchy components with trainable location and scale."""

    def component(self, site):
        key = _key(site)
        return dist.Cauchy(self.loc[key], F.softplus(self.raw_scale[key])).to_event(1)


class DeltaGuide(Rank1Guide):
    """Point estimates of the factors: BatchEnsemble. Defaults to the reference's N(1, 0.5²) init.

    With ``ensemble_size = 1`` and ``init_sign_prob=None, init_loc_std=0`` (r = s = 1) the
    model computes exactly its deterministic network.
    """

    has_scale = False

    def __init__(self, model, init_sign_prob=None, init_loc_std=0.5, scale_guide="delta", **kwargs):
        super().__init__(model, init_sign_prob, init_loc_std, scale_guide=scale_guide, **kwargs)

    def component(self, site):
        return dist.Delta(self.loc[_key(site)], event_dim=1)
