"""Post-hoc Gaussian posteriors around a trained network: subnetwork Laplace and projected posteriors."""

from .functional import FlatFunctional, Rank1PointNetwork, rank1_point_network

__all__ = ["FlatFunctional", "Rank1PointNetwork", "rank1_point_network"]
