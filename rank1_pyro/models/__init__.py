"""Rank-1 Bayesian models: the Pyro model wrapper and the model zoo."""

from .base import LIKELIHOODS, Rank1Model, set_prior
from .mlp import mlp, rank1_mlp

__all__ = ["Rank1Model", "set_prior", "LIKELIHOODS", "mlp", "rank1_mlp"]
