"""Variational inference for rank-1 models: guides, objectives, the predictive, and the training configuration."""

from .guides import CauchyGuide, DeltaGuide, MixtureGuide, Rank1Guide
from .objectives import OBJECTIVES, AveragedELBO, ExamplePlate, MixtureELBO, Rank1ELBO, kl_annealing
from .predictive import Posterior, Prediction, Rank1Posterior, predict
from .train_config import TrainConfig

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
    "TrainConfig",
]
