r"""Marginal densities inside the joint latent of Pyro's ``AutoContinuous`` guides.

``AutoDiagonalNormal``, ``AutoMultivariateNormal`` and ``AutoLowRankMultivariateNormal`` draw one
unconstrained vector :math:`u` for *all* latent sites of a model (site ``"_<name>_latent"``,
outside every plate) and hand each model site its slice through a ``Delta``. On a rank-1 model
that vector holds the factors of every member k (coordinates :math:`M_k`) and any global
hierarchical scale (coordinates :math:`G`). The objectives and the diagnostics need densities of
parts of it:

* the objectives weigh member terms by 1/K and global terms by 1, so they need the marginal
  :math:`q(u_G)` of the global coordinates
  (:math:`\log q(u) = \log q(u_G) + \log q(u_M \mid u_G)`);
* the diagnostics score one member's draw under component j, i.e. the marginal
  :math:`q(u_G, u_{M_j})` evaluated at :math:`(u_G, u_{M_k})`.

Gaussian posteriors have Gaussian marginals: the sub-vector of the mean and the sub-block of the
covariance (for the low-rank family, the rows of the factor and of the diagonal).
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch import nn

from ..layers import MEMBERS

__all__ = ["JointLatent", "joint_latents"]


class JointLatent:
    """The layout of one ``AutoContinuous`` guide's latent vector over members and global sites.

    Args:
        guide: an ``AutoContinuous`` guide that has been called once (its prototype trace exists).
    """

    def __init__(self, guide):
        self.guide = guide
        self.site = f"_{guide._pyro_name}_latent"
        global_idx, member_idx, sizes = [], [], set()
        offset = 0
        for name, site in guide.prototype_trace.iter_stochastic_nodes():
            shape = guide._unconstrained_shapes[name]
            n = math.prod(shape)
            members = next((f for f in guide._cond_indep_stacks[name] if f.name == MEMBERS), None)
            if members is None:
                global_idx.append(torch.arange(offset, offset + n))
            else:
                # the unconstrained value is (K, ..., event) with the member dim leading (plate dim -2 of
                # a (K, 1) batch), so member k owns the k-th contiguous block of n / K coordinates
                k = members.size
                event_dim = site["fn"].event_dim + len(shape) - site["value"].dim()
                axis = len(shape) - event_dim + members.dim
                if axis < 0 or shape[axis] != k or math.prod(shape[:axis]) != 1:
                    raise ValueError(
                        f"{type(guide).__name__}: site {name!r} has unconstrained shape {tuple(shape)}; expected the "
                        f"member dim (size {k}) first"
                    )
                sizes.add(k)
                member_idx.append(torch.arange(offset, offset + n).reshape(k, n // k))
            offset += n
        if len(sizes) > 1:
            raise ValueError(f"{type(guide).__name__}: sites in members plates of different sizes {sorted(sizes)}")
        self.num_members = sizes.pop() if sizes else None
        self.global_idx = torch.cat(global_idx) if global_idx else torch.zeros(0, dtype=torch.long)
        #: (K, coordinates of one member)
        self.member_idx = torch.cat(member_idx, dim=1) if member_idx else None

    def marginal(self, idx: torch.Tensor) -> dist.TorchDistribution:
        """The guide's marginal distribution of the latent coordinates ``idx`` (event dim 1)."""
        post = self.guide.get_posterior()
        idx = idx.to(post.mean.device)
        if isinstance(post, dist.Independent) and isinstance(post.base_dist, dist.Normal):
            return dist.Normal(post.base_dist.loc[..., idx], post.base_dist.scale[..., idx]).to_event(1)
        if isinstance(post, dist.LowRankMultivariateNormal):
            return dist.LowRankMultivariateNormal(
                post.loc[..., idx], post.cov_factor[..., idx, :], post.cov_diag[..., idx]
            )
        if isinstance(post, dist.MultivariateNormal):
            cov = post.covariance_matrix[..., idx, :][..., idx]
            return dist.MultivariateNormal(post.loc[..., idx], covariance_matrix=cov)
        raise NotImplementedError(
            f"{type(self.guide).__name__}: marginals of a {type(post).__name__} posterior are not available; "
            "use a Gaussian autoguide (AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal, "
            "AutoLowRankMultivariateNormal) or a rank-1 guide"
        )

    def global_log_density(self, value: torch.Tensor) -> torch.Tensor:
        """:math:`\\log q(u_G)` of latent draws ``value`` (``(..., D)``)."""
        return self.marginal(self.global_idx).log_prob(value[..., self.global_idx.to(value.device)])

    def member_log_density(self, value: torch.Tensor, component: int) -> torch.Tensor:
        """:math:`\\log q_j(u_G, u_{M_k})` for every member k: ``(..., K)``, j = ``component``."""
        idx = self.member_idx.to(value.device)
        own = torch.cat([self.global_idx.to(value.device), idx[component]])
        points = torch.cat(
            [
                value[..., self.global_idx.to(value.device)].unsqueeze(-2).expand(*value.shape[:-1], idx.shape[0], -1),
                value[..., idx],
            ],
            dim=-1,
        )  # (..., K, |G| + |M_k|)
        return self.marginal(own).log_prob(points)


def joint_latents(guide) -> dict[str, JointLatent]:
    """``{latent site name: JointLatent}`` for every called ``AutoContinuous`` guide inside ``guide``."""
    from pyro.infer.autoguide import AutoContinuous

    if not isinstance(guide, nn.Module):
        return {}
    out = {}
    for m in guide.modules():
        if isinstance(m, AutoContinuous) and hasattr(m, "prototype_trace"):
            joint = JointLatent(m)
            out[joint.site] = joint
    return out
