"""Post-hoc Gaussian posteriors around a trained network: subnetwork Laplace and projected posteriors.

Modules: :mod:`~.functional` (the network as a function of a flat θ), :mod:`~.curvature` (Jacobian
columns and the GGN), :mod:`~.selection` (choosing a subnetwork), :mod:`~.base` (what both
posteriors share: draws, predictives, batches, files), :mod:`~.subnetwork` and :mod:`~.projected`.
"""

from .base import PostHocPosterior, load_posterior
from .curvature import Curvature, ggn, jacobian_columns
from .functional import FlatFunctional, Rank1PointNetwork, rank1_point_network
from .projected import ProjectedPosterior
from .selection import SUBNETWORK_STRATEGIES, select_subnetwork
from .subnetwork import SubnetLaplace

__all__ = ["FlatFunctional", "Rank1PointNetwork", "rank1_point_network"]
__all__ += ["Curvature", "ggn", "jacobian_columns", "SubnetLaplace", "SUBNETWORK_STRATEGIES", "select_subnetwork"]
__all__ += ["ProjectedPosterior", "PostHocPosterior", "load_posterior"]
