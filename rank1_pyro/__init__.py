"""rank1_pyro: scalable Bayesian deep learning in Pyro.

Rank-1 Bayesian neural networks (Dusenberry et al., 2020), subnetwork linearized Laplace
(Daxberger et al., 2021) and the null-space projected posterior (Miani et al., 2025).
"""

from .inference import AveragedELBO, CauchyGuide, DeltaGuide, MixtureELBO, MixtureGuide
from .layers import Rank1Conv2d, Rank1Linear, Rank1LSTM
from .models import Rank1Model, mlp, rank1_mlp, set_prior
from .priors import Cauchy, Gaussian, HalfCauchy, HalfNormal, InverseGammaVariance, LogNormalScale, PriorMap, make_prior

__version__ = "0.1.0"

__all__ = [
    "Rank1Linear",
    "Rank1Conv2d",
    "Rank1LSTM",
    "Rank1Model",
    "rank1_mlp",
    "mlp",
    "set_prior",
    "Gaussian",
    "Cauchy",
    "HalfCauchy",
    "HalfNormal",
    "LogNormalScale",
    "InverseGammaVariance",
    "PriorMap",
    "make_prior",
    "MixtureGuide",
    "DeltaGuide",
    "CauchyGuide",
    "AveragedELBO",
    "MixtureELBO",
]
