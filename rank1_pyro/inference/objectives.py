r"""The two training objectives of rank-1 BNNs as Pyro ELBOs.

With N training examples, a minibatch of B, K members and variational components
:math:`q_k` (one per member), and :math:`\ell_{nk} = \log p(y_n \mid x_n, \theta_k)`:

* :class:`AveragedELBO` -- the members' ELBOs averaged,

  .. math:: \mathcal L_{avg} = \frac1K \sum_k \Big( \mathbb E_{q_k}\big[\textstyle\sum_n \ell_{nk}\big]
            - \mathrm{KL}(q_k \,\|\, p) \Big).

* :class:`MixtureELBO` -- the log-likelihood of the mixture of members,

  .. math:: \mathcal L_{mix} = \mathbb E_{q}\Big[\textstyle\sum_n \log \frac1K \sum_k e^{\ell_{nk}}\Big]
            - \frac1K \sum_k \mathrm{KL}(q_k \,\|\, p) \;\ge\; \mathcal L_{avg}

  (Jensen). It equals ``TraceEnum_ELBO`` on the same model with an enumerated, uniformly
  distributed member index per example (see the tests).

Both are lower bounds on :math:`\log p(\mathcal D)` for the mixture posterior, since
:math:`\mathrm{KL}(\frac1K\sum_k q_k \,\|\, p) \le \frac1K\sum_k \mathrm{KL}(q_k\,\|\,p)`.
(The reference code adds :math:`\sum_k \mathrm{KL}_k`, i.e. ``kl_weight = K`` here.)

Common behaviour:

* The minibatch log-likelihood is scaled by N / B by the model's data plate.
* KL terms are analytic where ``torch.distributions.kl_divergence`` knows the pair
  (Normal-Normal, Delta-anything) and single-sample Monte Carlo
  :math:`\log q(\theta) - \log p(\theta)` otherwise (Cauchy priors or guides).
* ``kl_weight`` (β of KL annealing) multiplies the KL terms only; a training loop sets it
  every step (see :func:`kl_annealing`).
* ``estimator="member"`` draws one factor sample per member per step (the plain Pyro
  estimator); ``estimator="example"`` draws independent factors for every example of the
  batch (the reference's lower-variance estimator): the factor sites move into an extra
  ``examples`` plate scaled by 1/B, so each member's KL still counts once. It needs the
  model's first argument to be the batch-first input.

Use them like any Pyro ELBO: ``SVI(model, guide, optim, loss=MixtureELBO())``, or
``MixtureELBO().differentiable_loss(model, guide, x, y)`` with a torch optimizer.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import pyro.distributions as dist

import torch
from pyro.distributions.util import is_identically_zero
from pyro.infer import ELBO
from pyro.infer.enum import get_importance_trace
from pyro.infer.util import check_fully_reparametrized, torch_item
from pyro.poutine.indep_messenger import CondIndepStackFrame
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample
from pyro.util import warn_if_nan
from torch.distributions import kl_divergence

from .._checks import one_of, positive_int


__all__ = ["Rank1ELBO", "AveragedELBO", "MixtureELBO", "ExamplePlate", "ELBOTerms", "kl_annealing", "OBJECTIVES"]

ESTIMATORS = ("member", "example")


def kl_annealing(step: int, annealing_steps: int) -> float:
    """Linear KL annealing weight β = min(1, step / annealing_steps) (1 when ``annealing_steps <= 0``)."""
    return 1.0 if annealing_steps <= 0 else min(1.0, step / annealing_steps)


class ExamplePlate(Messenger):
    """Draw every rank-1 factor independently per example (the per-example estimator).

    Adds an ``examples`` plate of size ``batch_size`` at dim -1 to each latent site inside the
    member plate (the rank-1 factors, in model and guide alike, whichever guide it is),
    expanding its distribution from ``(..., K, 1)`` to ``(..., K, B)`` and scaling it by 1/B
    so the KL of each member still counts once. Apply it to both model and guide.
    """

    def __init__(self, batch_size: int):
        super().__init__()
        self.batch_size = int(batch_size)
        self._frame = CondIndepStackFrame("examples", -1, self.batch_size, 0)

    def _pyro_sample(self, msg):
        if msg["is_observed"] or isinstance(msg["fn"], _Subsample) or _member_dim(msg) is None:
            return
        shape = msg["fn"].batch_shape
        msg["fn"] = msg["fn"].expand(shape[:-1] + (self.batch_size,))
        msg["scale"] = msg["scale"] / self.batch_size
        msg["cond_indep_stack"] = msg["cond_indep_stack"] + (self._frame,)


def _member_dim(site) -> int | None:
    for frame in site["cond_indep_stack"]:
        if frame.name == "members":
            return frame.dim
    return None


class ELBOTerms(NamedTuple):
    """``loss = -(log_likelihood - kl_weight * kl)``; ``logits`` of the "obs" site when categorical."""

    loss: torch.Tensor
    log_likelihood: torch.Tensor
    kl: torch.Tensor
    logits: torch.Tensor | None


class Rank1ELBO(ELBO):
    """Base class; subclasses define how the member dim of the log-likelihood is reduced.

    Args:
        num_particles: Monte Carlo particles per step (vectorized by default).
        kl_weight: β, the KL annealing weight (mutable attribute).
        estimator: ``"member"`` or ``"example"`` (see the module docstring).
        analytic_kl: use closed-form KL where available (``False``: always Monte Carlo).
        max_plate_nesting: plates in the model; rank-1 models use two (members, data).
    """

    def __init__(
        self,
        num_particles: int = 1,
        kl_weight: float = 1.0,
        estimator: str = "member",
        analytic_kl: bool = True,
        vectorize_particles: bool = True,
        max_plate_nesting: int = 2,
    ):
        one_of("estimator", estimator, ESTIMATORS)
        positive_int("num_particles", num_particles)
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
        )
        self.kl_weight = kl_weight
        self.estimator = estimator
        self.analytic_kl = analytic_kl

    @property
    def kl_weight(self) -> float:
        """β, the weight of the KL terms (a finite number ≥ 0; 1 is the ELBO)."""
        return self._kl_weight

    @kl_weight.setter
    def kl_weight(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"kl_weight must be a finite number >= 0, got {value!r}")
        self._kl_weight = float(value)

    # -- the member reduction -------------------------------------------------------------
    def reduce_members(self, log_p: torch.Tensor, dim: int) -> torch.Tensor:
        raise NotImplementedError

    # -- traces ---------------------------------------------------------------------------
    def _get_trace(self, model, guide, args, kwargs):
        if self.estimator == "example":
            batch = args[0].shape[0] if args and torch.is_tensor(args[0]) else None
            if not batch:
                raise ValueError("estimator='example' needs the model's first argument to be a batch-first tensor")
            model, guide = ExamplePlate(batch)(model), ExamplePlate(batch)(guide)
        return get_importance_trace("flat", self.max_plate_nesting, model, guide, args, kwargs)

    # -- terms ----------------------------------------------------------------------------
    def log_likelihood(self, site) -> torch.Tensor:
        """Scaled log-likelihood of one observed site, member dim reduced by the objective."""
        log_p = site["unscaled_log_prob"]
        if site["mask"] is not None and not isinstance(site["mask"], bool):
            log_p = log_p.masked_fill(~site["mask"], 0.0)
        dim = _member_dim(site)
        if dim is not None and log_p.dim() >= -dim:
            log_p = self.reduce_members(log_p, dim)
        return (log_p * site["scale"]).sum()

    def kl(self, model_site, guide_site) -> torch.Tensor:
        """KL(q ‖ p) of one latent site, summed; member-plate sites count 1/K each."""
        check_fully_reparametrized(guide_site)
        kl = None
        if self.analytic_kl:
            try:
                kl = kl_divergence(guide_site["fn"], model_site["fn"])
            except NotImplementedError:
                pass
        if kl is None:
            kl = guide_site["unscaled_log_prob"] - model_site["unscaled_log_prob"]
        scale = guide_site["scale"]
        dim = _member_dim(guide_site)
        if dim is not None:
            scale = scale / guide_site["fn"].batch_shape[dim]
        if guide_site["mask"] is not None and not isinstance(guide_site["mask"], bool):
            kl = kl.masked_fill(~guide_site["mask"], 0.0)
        return kl.sum() * scale

    def elbo_terms(self, model_trace, guide_trace) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log-likelihood, KL)`` of one (possibly vectorized) particle, both summed."""
        log_lik = kl = 0.0
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample" or is_identically_zero(site["scale"]):
                continue
            if site["is_observed"]:
                log_lik = log_lik + self.log_likelihood(site)
            elif name in guide_trace.nodes:
                kl = kl + self.kl(site, guide_trace.nodes[name])
        return torch.as_tensor(log_lik), torch.as_tensor(kl)

    # -- the ELBO interface ---------------------------------------------------------------
    def loss_terms(self, model, guide, *args, **kwargs) -> "ELBOTerms":
        """The loss and its parts, averaged over particles (see :class:`ELBOTerms`)."""
        log_lik = kl = 0.0
        logits = None
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            particle_log_lik, particle_kl = self.elbo_terms(model_trace, guide_trace)
            log_lik = log_lik + particle_log_lik / self.num_particles
            kl = kl + particle_kl / self.num_particles
            obs = model_trace.nodes.get("obs")
            if obs is not None and isinstance(obs["fn"], dist.Categorical):
                logits = obs["fn"].logits
        loss = -(log_lik - self.kl_weight * kl)
        warn_if_nan(loss, "loss")
        return ELBOTerms(loss, log_lik, kl, logits)

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """The negative ELBO, −(log-likelihood − β·KL), averaged over particles."""
        return self.loss_terms(model, guide, *args, **kwargs).loss

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return torch_item(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward()
        return torch_item(loss)


class AveragedELBO(Rank1ELBO):
    r"""Average of the members' ELBOs: the log-likelihood is averaged over the member dim."""

    def reduce_members(self, log_p, dim):
        return log_p.mean(dim)


class MixtureELBO(Rank1ELBO):
    r"""ELBO with the log-mixture likelihood :math:`\log \frac1K \sum_k p(y_n \mid x_n, \theta_k)`."""

    def reduce_members(self, log_p, dim):
        return torch.logsumexp(log_p, dim) - math.log(log_p.shape[dim])


OBJECTIVES = {"averaged": AveragedELBO, "mixture": MixtureELBO}
