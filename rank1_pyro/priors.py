"""Declarative prior specifications for the rank-1 factors.

A prior is a small frozen value object (a *spec*) that knows how to build the
Pyro distribution of one factor site. Specs are swappable without touching any
other code::

    Gaussian(loc=1.0, scale=0.1)                 # r_i ~ N(1, 0.1²)
    Cauchy(loc=1.0, scale=0.1)                   # heavy tails, as in Dusenberry et al. (2020)
    Gaussian(loc=1.0, scale=HalfCauchy(0.1))     # hierarchical: σ ~ C⁺(0, 0.1), r_i | σ ~ N(1, σ²)
    Gaussian(loc=1.0, scale=InverseGammaVariance(2.0, 0.01))   # σ² ~ InvGamma(2, 0.01)

A hierarchical scale is one *global* random variable per factor site (``fc1.r`` gets
``fc1.r_scale``), sampled once outside the member plate and shared by all K
members, so the members stay exchangeable draws from the same prior.

:class:`PriorMap` assigns specs to sites by shell-style name patterns
(``fnmatch``) with a default, e.g. ``PriorMap(Gaussian(1, 0.1), {"out.*": Cauchy(1, 0.1)})``.
"""

from __future__ import annotations

import fnmatch
import functools
import math
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch

from ._checks import one_of

__all__ = [
    "Gaussian",
    "Cauchy",
    "HalfCauchy",
    "HalfNormal",
    "LogNormalScale",
    "InverseGammaVariance",
    "PriorMap",
    "make_prior",
]


def _positive(owner: str, name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{owner}: {name} must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{owner}: {name} must be a positive finite number, got {value!r}")
    return float(value)


def _finite(owner: str, name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be a finite number, got {value!r}")
    return float(value)


# --------------------------------------------------------------------------------------
# Hyperpriors on a scale (hierarchical priors)
# --------------------------------------------------------------------------------------
class ScaleSpec:
    """A distribution over a positive prior scale σ, sampled once per factor site."""

    def sample(self, name: str) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def init_value(self) -> float:
        """A sensible value of the *site* to initialise guides at (a median or mode)."""
        raise NotImplementedError


@dataclass(frozen=True)
class HalfCauchy(ScaleSpec):
    """σ ~ HalfCauchy(scale)."""

    scale: float = 0.1

    def __post_init__(self):
        _positive("HalfCauchy", "scale", self.scale)

    def sample(self, name):
        return pyro.sample(name, dist.HalfCauchy(torch.tensor(float(self.scale))))

    @property
    def init_value(self):
        return float(self.scale)  # median of C⁺(0, s) is s


@dataclass(frozen=True)
class HalfNormal(ScaleSpec):
    """σ ~ HalfNormal(scale)."""

    scale: float = 0.1

    def __post_init__(self):
        _positive("HalfNormal", "scale", self.scale)

    def sample(self, name):
        return pyro.sample(name, dist.HalfNormal(torch.tensor(float(self.scale))))

    @property
    def init_value(self):
        return 0.6745 * float(self.scale)


@dataclass(frozen=True)
class LogNormalScale(ScaleSpec):
    """log σ ~ N(loc, scale²)."""

    loc: float = math.log(0.1)
    scale: float = 0.5

    def __post_init__(self):
        _finite("LogNormalScale", "loc", self.loc)
        _positive("LogNormalScale", "scale", self.scale)

    def sample(self, name):
        return pyro.sample(name, dist.LogNormal(torch.tensor(float(self.loc)), torch.tensor(float(self.scale))))

    @property
    def init_value(self):
        return math.exp(self.loc)


@dataclass(frozen=True)
class InverseGammaVariance(ScaleSpec):
    """σ² ~ InverseGamma(concentration, rate); the site holds the variance, σ = √σ²."""

    concentration: float = 2.0
    rate: float = 0.01

    def __post_init__(self):
        _positive("InverseGammaVariance", "concentration", self.concentration)
        _positive("InverseGammaVariance", "rate", self.rate)

    def sample(self, name):
        variance = pyro.sample(
            name, dist.InverseGamma(torch.tensor(float(self.concentration)), torch.tensor(float(self.rate)))
        )
        return variance.sqrt()

    @property
    def init_value(self):
        return self.rate / (self.concentration + 1.0)  # the mode of the variance


ScaleLike = float | ScaleSpec


# --------------------------------------------------------------------------------------
# Priors on the factors
# --------------------------------------------------------------------------------------
class FactorPrior:
    """Base class of the prior on one rank-1 factor (a vector of ``size`` entries).

    Subclasses set ``family`` (a ``pyro.distributions`` class taking ``loc, scale``).
    """

    family: type
    loc: float
    scale: ScaleLike

    def __post_init__(self):
        owner = type(self).__name__
        _finite(owner, "loc", self.loc)
        if not isinstance(self.scale, ScaleSpec):
            _positive(owner, "scale", self.scale)

    @property
    def hierarchical(self) -> bool:
        return isinstance(self.scale, ScaleSpec)

    def sample_scale(self, name: str):
        """Sample the global scale site ``name`` (hierarchical priors) or return the fixed scale."""
        return self.scale.sample(name) if self.hierarchical else float(self.scale)

    def distribution(self, size: int, scale, device=None) -> dist.TorchDistribution:
        """The distribution of one factor vector of ``size`` entries (event dim 1).

        ``scale`` is what :meth:`sample_scale` returned: a float, or a tensor whose shape is
        already a batch shape aligned with the enclosing plates (e.g. ``(S, 1, 1)`` under a
        sample plate at dim -3); it gains a trailing event dim here.
        """
        if not torch.is_tensor(scale):  # a fixed prior: the same distribution object every step
            return _fixed_distribution(
                self.family,
                float(self.loc),
                float(scale),
                int(size),
                torch.device(device or "cpu"),
                torch.get_default_dtype(),
            )
        loc = torch.full((size,), float(self.loc), device=device)
        return self.family(loc, scale.unsqueeze(-1)).to_event(1)


@functools.lru_cache(maxsize=256)
def _fixed_distribution(
    family, loc: float, scale: float, size: int, device: torch.device, dtype
) -> dist.TorchDistribution:
    """``family(loc, scale)`` over ``size`` entries, built once per (spec, size, device, dtype): a
    training step then spends no time building prior distributions (they are never mutated)."""
    return family(
        torch.full((size,), loc, device=device, dtype=dtype), torch.tensor(scale, device=device, dtype=dtype)
    ).to_event(1)


@dataclass(frozen=True)
class Gaussian(FactorPrior):
    """Each factor entry ~ N(loc, scale²). The reference default is N(1, 0.1²) (0.05 on ImageNet)."""

    loc: float = 1.0
    scale: ScaleLike = 0.1
    family: type = field(default=dist.Normal, init=False, repr=False, compare=False)


@dataclass(frozen=True)
class Cauchy(FactorPrior):
    """Each factor entry ~ Cauchy(loc, scale): heavy tails let a few factors move far from 1."""

    loc: float = 1.0
    scale: ScaleLike = 0.1
    family: type = field(default=dist.Cauchy, init=False, repr=False, compare=False)


_FAMILIES = {"gaussian": Gaussian, "normal": Gaussian, "cauchy": Cauchy}
_SCALES = {
    "halfcauchy": HalfCauchy,
    "halfnormal": HalfNormal,
    "lognormal": LogNormalScale,
    "inversegamma": InverseGammaVariance,
}


def make_prior(family: str = "gaussian", loc: float = 1.0, scale=0.1) -> FactorPrior:
    """Build a prior from plain values (configs, the CLI).

    ``scale`` is a number, or a dict ``{"family": "halfcauchy", "scale": 0.1}`` for a
    hierarchical prior. Unknown names raise :class:`ValueError` listing the valid ones.
    """
    key = str(family).lower()
    if key not in _FAMILIES:
        raise ValueError(f"prior family: unknown name {family!r}; valid: {sorted(_FAMILIES)}")
    if isinstance(scale, dict):
        scale = dict(scale)
        name = str(scale.pop("family", "")).lower()
        one_of("prior scale family", name, sorted(_SCALES))
        try:
            scale = _SCALES[name](**scale)
        except TypeError as e:
            raise ValueError(f"prior scale {name!r}: {e}") from None
    return _FAMILIES[key](loc=loc, scale=scale)


class PriorMap:
    """A default prior plus per-site overrides chosen by ``fnmatch`` name pattern.

    The first pattern (in insertion order) that matches a site name wins::

        PriorMap(Gaussian(1.0, 0.1), {"head.*": Cauchy(1.0, 0.1), "*.s": Gaussian(1.0, 0.05)})
    """

    def __init__(self, default: FactorPrior = None, overrides: dict | None = None):
        self.default = Gaussian() if default is None else default
        if not isinstance(self.default, FactorPrior):
            raise ValueError(f"PriorMap: default must be a prior spec such as Gaussian(), got {default!r}")
        self.overrides = dict(overrides or {})
        for pattern, spec in self.overrides.items():
            if not isinstance(pattern, str) or not isinstance(spec, FactorPrior):
                raise ValueError(
                    f"PriorMap: overrides must map name patterns (str) to prior specs, got {pattern!r}: {spec!r}"
                )

    @classmethod
    def coerce(cls, prior) -> PriorMap:
        if isinstance(prior, PriorMap):
            return prior
        if prior is None or isinstance(prior, FactorPrior):
            return cls(prior)
        raise ValueError(f"prior: expected a prior spec (Gaussian, Cauchy) or a PriorMap, got {prior!r}")

    def for_site(self, site: str) -> FactorPrior:
        for pattern, spec in self.overrides.items():
            if fnmatch.fnmatchcase(site, pattern):
                return spec
        return self.default

    def check_patterns(self, sites) -> None:
        """Raise if an override pattern matches none of ``sites`` (a typo would silently do nothing)."""
        sites = list(sites)
        for pattern in self.overrides:
            if not any(fnmatch.fnmatchcase(s, pattern) for s in sites):
                raise ValueError(f"prior override {pattern!r} matches no factor site; sites are {sites}")

    def __repr__(self):
        return f"PriorMap(default={self.default!r}, overrides={self.overrides!r})"
