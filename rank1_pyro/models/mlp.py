"""Multi-layer perceptrons: rank-1 and deterministic, with the same layer layout."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..layers import Rank1Linear
from .base import Rank1Model

__all__ = ["rank1_mlp", "mlp"]


def _sizes(in_features: int, hidden: Sequence[int], out_features: int) -> list[int]:
    sizes = [in_features, *hidden, out_features]
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes):
        raise ValueError(f"layer sizes must be positive integers, got {sizes}")
    return sizes


def mlp(in_features: int, hidden: Sequence[int], out_features: int, activation=nn.ReLU) -> nn.Sequential:
    """A deterministic MLP ``Linear -> activation -> ... -> Linear``."""
    sizes = _sizes(in_features, hidden, out_features)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def rank1_mlp(
    in_features: int,
    hidden: Sequence[int],
    out_features: int,
    ensemble_size: int = 4,
    prior=None,
    activation=nn.ReLU,
    likelihood: str = "categorical",
    num_data: int | None = None,
) -> Rank1Model:
    """A rank-1 Bayesian MLP in one line: ``rank1_mlp(64, [128, 128], 10, ensemble_size=4)``.

    Every ``Linear`` of :func:`mlp` becomes a :class:`~rank1_pyro.layers.Rank1Linear`, so
    module paths (and site names ``"net.0.r"``, ``"net.2.s"``, ...) match the deterministic net's.
    """
    sizes = _sizes(in_features, hidden, out_features)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(Rank1Linear(a, b, ensemble_size=ensemble_size, prior=prior))
        if i < len(sizes) - 2:
            layers.append(activation())
    return Rank1Model(nn.Sequential(*layers), ensemble_size, likelihood=likelihood, num_data=num_data)
