"""Post-hoc Gaussian posteriors around a trained network: subnetwork Laplace and projected posteriors."""

from .functional import FlatFunctional, Rank1PointNetwork, rank1_point_network
from .projected import ProjectedPosterior
from .curvature import Curvature, ggn, jacobian_columns
from .subnetwork import SUBNETWORK_STRATEGIES, SubnetLaplace, select_subnetwork

__all__ = ["FlatFunctional", "Rank1PointNetwork", "rank1_point_network"]
__all__ += ["Curvature", "ggn", "jacobian_columns", "SubnetLaplace", "SUBNETWORK_STRATEGIES", "select_subnetwork"]
__all__ += ["ProjectedPosterior"]
