"""Variational inference for rank-1 models: guides and objectives."""

from .guides import CauchyGuide, DeltaGuide, MixtureGuide, Rank1Guide
from .predictive import Posterior, Prediction, Rank1Posterior, predict
from .objectives import OBJECTIVES, AveragedELBO, ExamplePlate, MixtureELBO, Rank1ELBO, kl_annealing

__all__ = [
    "Rank1Guide",
    "MixtureGuide",
    "DeltaGuide",
    "CauchyGuide",
    "Rank1ELBO",
    "AveragedELBO",
    "MixtureELBO",
    "ExamplePlate",
    "kl_annealing",
    "OBJECTIVES",
    "Posterior",
    "Rank1Posterior",
    "Prediction",
    "predict",
]
