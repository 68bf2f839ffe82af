r"""The two training objectives of rank-1 BNNs as Pyro ELBOs.

With N training examples, a minibatch of B, K members and variational components
:math:`q_k` (one per member), and :math:`\ell_{nk} = \log p(y_n \mid x_n, \theta_k)`:

* :class:`AveragedELBO` -- the members' ELBOs averaged,

  .. math:: \mathcal L_{avg} = \frac1K \sum_k \Big( \mathbb E_{q_k}\big[\textstyle\sum_n \ell_{nk}\big]
            - \mathrm{KL}(q_k \,\|\, p) \Big).

  It is a lower bound on :math:`\log p(\mathcal D)`: each member's ELBO is one, and so is the
  ELBO of the mixture :math:`\frac1K\sum_k q_k`, which is at least their average.

* :class:`MixtureELBO` -- the log-likelihood of the mixture of members,

  .. math:: \mathcal L_{mix} = \mathbb E_{q}\Big[\textstyle\sum_n \log \frac1K \sum_k e^{\ell_{nk}}\Big]
            - \frac1K \sum_k \mathrm{KL}(q_k \,\|\, p) \;\ge\; \mathcal L_{avg}

  (Jensen, on every draw). It is **not** a lower bound on :math:`\log p(\mathcal D)`: with
  every :math:`q_k` the exact posterior of a conjugate model it exceeds :math:`\log p(\mathcal D)`
  (see the tests). It is the ELBO-like objective of the *ensemble model*
  :math:`\prod_n \frac1K \sum_k p(y_n \mid x_n, \theta_k)`, in which every example picks its
  member, with the KL of one member; it equals ``TraceEnum_ELBO`` on that model with an
  enumerated, uniformly distributed member index per example (see the tests).

**Weighting of the latent terms, for any guide.** Terms of sites inside the ``members`` plate
(model log priors, guide log densities, analytic KLs) count 1/K; terms of global sites (a
hierarchical scale :math:`\sigma`, shared by the members) count 1. For a guide that does not
factorise over members, the weighting applies to its density's parts:
:math:`\log q(u) = \log q(u_G) + \log q(u_M \mid u_G)` with weight 1 on the global marginal and
1/K on the conditional (:mod:`.joint`). In general

.. math:: \mathcal L_{avg} = \mathbb E_q\Big[\frac1K \sum_k \ell_k
          + \frac1K \log\frac{p(\theta_{1:K} \mid \sigma)}{q(\theta_{1:K} \mid \sigma)}
          + \log \frac{p(\sigma)}{q(\sigma)}\Big].

Pyro's own ``Trace_ELBO`` on the same model and guide counts every member's likelihood and every
site once, so ``Trace_ELBO = K·L_avg − (K−1)·E[log p(σ) − log q(σ)]``: without a hierarchical prior
it is exactly K times the averaged ELBO (the same optimum), with one it weighs the scale site K
times less than these objectives do (tested).

Common behaviour:

* The minibatch log-likelihood is scaled by N / B by the model's data plate.
* A latent term is the closed-form KL where the guide site is an ordinary sample of the model
  site's name and ``torch.distributions.kl_divergence`` knows the pair (Normal-Normal);
  otherwise it is the single-sample Monte Carlo :math:`\log q - \log p` over **every** guide
  site, auxiliary sites of autoguides included (their entropy), and over every model latent
  site (Cauchy priors, ``Delta`` sites of autoguides, which carry the log-Jacobian of their
  transform). This is what ``Trace_ELBO`` computes, with the weights above.
* ``kl_weight`` (a constructor argument, 1 = the ELBO) multiplies the latent terms only; the
  reference loss :math:`\text{mean NLL} + \sum_k \mathrm{KL}_k / N` is ``kl_weight = K``.
  KL annealing multiplies it further: a training loop sets ``annealing`` (β in [0, 1]) every
  step, and the effective weight is ``kl_weight × annealing`` (:attr:`Rank1ELBO.effective_kl_weight`).
* ``estimator="member"`` draws one factor sample per member per step (the plain Pyro
  estimator); ``estimator="example"`` draws independent factors for every example of the
  batch (the reference's lower-variance estimator): the factor sites move into an extra
  ``examples`` plate scaled by 1/B, so each member's KL still counts once. It needs the
  model's first argument to be the batch-first input. Its cost: B·K draws (and log
  densities) per factor site instead of K; the layers' arithmetic is unchanged.
  ``estimator="split"`` (:class:`AveragedELBO` only) gives each member its own B/K rows of the
  batch instead of all B (:class:`~rank1_pyro.layers.SplitBatch`): the network runs on B rows
  instead of K·B, for an unbiased but noisier estimate of the same objective. The mixture ELBO
  needs every member's likelihood of every example, so it refuses it.

Use them like any Pyro ELBO: ``SVI(model, guide, optim, loss=MixtureELBO())``, or
``MixtureELBO().differentiable_loss(model, guide, x, y)`` with a torch optimizer.

**In the training loop** every objective is stepped through one interface
(:func:`training_objective`): ``loss_terms(model, guide, x, y)`` returns :class:`ELBOTerms`, the
loss with, for the rank-1 objectives, its log-likelihood and KL and the logits of the model's
categorical observation (for training accuracy), and ``annealing`` takes the KL-annealing
factor. Any other Pyro ELBO is wrapped in :class:`PlainELBO`, whose terms hold the loss alone.

One concept, one module (hence over 400 lines): the rank-1 ELBOs: one estimator for every guide, with its KL weighting and annealing.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions.util import is_identically_zero
from pyro.infer import ELBO
from pyro.infer.enum import get_importance_trace
from pyro.infer.util import is_validation_enabled, torch_item
from pyro.poutine.indep_messenger import CondIndepStackFrame
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from pyro.util import warn_if_nan
from torch.distributions import kl_divergence

from .._checks import one_of, positive_int
from ..layers import MEMBERS, SplitBatch
from .joint import joint_latents

__all__ = [
    "Rank1ELBO",
    "AveragedELBO",
    "MixtureELBO",
    "ExamplePlate",
    "ELBOTerms",
    "PlainELBO",
    "kl_annealing",
    "training_objective",
    "OBJECTIVES",
]

ESTIMATORS = ("member", "example", "split")


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
        if msg["is_observed"] or site_is_subsample(msg) or _member_frame(msg) is None:
            return
        shape = msg["fn"].batch_shape
        msg["fn"] = msg["fn"].expand(shape[:-1] + (self.batch_size,))
        msg["scale"] = msg["scale"] / self.batch_size
        msg["cond_indep_stack"] = msg["cond_indep_stack"] + (self._frame,)


def _member_frame(site):
    """The ``members`` plate frame of a site, or ``None`` for a global site."""
    for frame in site["cond_indep_stack"]:
        if frame.name == MEMBERS:
            return frame
    return None


def is_point_mass(fn) -> bool:
    """Whether ``fn`` is a ``Delta`` (possibly wrapped, e.g. by ``Independent``): a point mass."""
    while True:
        if isinstance(fn, dist.Delta):
            return True
        fn = getattr(fn, "base_dist", None)
        if fn is None:
            return False


class ELBOTerms(NamedTuple):
    """One step's loss and its parts: ``loss = -(log_likelihood - effective_kl_weight * kl)``.

    ``logits``: the logits of the model's observed ``Categorical`` site, whatever its name
    (normalised: the log-probabilities, ``log_softmax`` of the network's outputs), shape
    ``(..., K, B, C)`` (``(..., K, B // K, C)``, each member on its own rows, under ``estimator="split"``); ``None`` when the model observes no categorical site. The training loop
    reads its accuracy from them. :class:`PlainELBO` reports the loss alone (the rest ``None``).
    """

    loss: torch.Tensor
    log_likelihood: torch.Tensor | None
    kl: torch.Tensor | None
    logits: torch.Tensor | None


def _weight(site) -> float | torch.Tensor:
    """A site's scale, divided by K inside the members plate (see the module docstring)."""
    frame = _member_frame(site)
    return site["scale"] if frame is None else site["scale"] / frame.size


def _log_prob(site) -> torch.Tensor:
    """The site's unscaled log density at its value (computed here unless the trace already has it)."""
    if "unscaled_log_prob" not in site:
        site["unscaled_log_prob"] = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
    return site["unscaled_log_prob"]


def _masked(log_p: torch.Tensor, site) -> torch.Tensor:
    """``log_p`` with the site's masked-out entries set to 0."""
    if site["mask"] is not None and not isinstance(site["mask"], bool):
        log_p = log_p.masked_fill(~site["mask"], 0.0)
    return log_p


def _masked_sum(log_p: torch.Tensor, site) -> torch.Tensor:
    return _masked(log_p, site).sum()


def _finite_number(name: str, value, upper: float = math.inf) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not 0 <= value <= upper
    ):
        bound = "" if upper == math.inf else f" and <= {upper:g}"
        raise ValueError(f"{name} must be a finite number >= 0{bound}, got {value!r}")
    return float(value)


class Rank1ELBO(ELBO):
    r"""Base class; subclasses define how the member dim of the log-likelihood is reduced.

    Args:
        num_particles: Monte Carlo particles per step (vectorized by default).
        kl_weight: the weight of the latent (KL) terms: 1 is the ELBO; ``K`` gives the reference
            loss's :math:`\sum_k \mathrm{KL}_k`.
        estimator: ``"member"``, ``"example"`` or (averaged ELBO only) ``"split"`` (see the module
            docstring).
        analytic_kl: use closed-form KL where available (``False``: always Monte Carlo).
        max_plate_nesting: plates in the model; rank-1 models use two (members, data).

    ``annealing`` (β in [0, 1], default 1) is the KL-annealing factor a training loop sets every
    step; it never changes ``kl_weight``.
    """

    #: :meth:`loss_terms` reports the log-likelihood and the KL (a :class:`PlainELBO` does not)
    has_parts = True
    #: whether ``estimator="split"`` estimates this objective (the member reduction is a mean)
    splits_batch = False

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
        if estimator == "split" and not self.splits_batch:
            raise ValueError(
                f"{type(self).__name__}: estimator='split' gives each member different examples, but the mixture "
                "likelihood needs every member on every example; use AveragedELBO(estimator='split')"
            )
        positive_int("num_particles", num_particles)
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
        )
        self.kl_weight = kl_weight
        self.annealing = 1.0
        self.estimator = estimator
        self.analytic_kl = analytic_kl

    @property
    def kl_weight(self) -> float:
        """The user's weight of the KL terms (a finite number ≥ 0; 1 is the ELBO)."""
        return self._kl_weight

    @kl_weight.setter
    def kl_weight(self, value: float) -> None:
        self._kl_weight = _finite_number("kl_weight", value)

    @property
    def annealing(self) -> float:
        """β of KL annealing in [0, 1], set by the training loop (:func:`kl_annealing`)."""
        return self._annealing

    @annealing.setter
    def annealing(self, value: float) -> None:
        self._annealing = _finite_number("annealing", value, upper=1.0)

    @property
    def effective_kl_weight(self) -> float:
        """``kl_weight × annealing``: what multiplies the KL in the loss."""
        return self.kl_weight * self.annealing

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
        elif self.estimator == "split":
            split = SplitBatch()
            traces = self._traces(split(model), guide, args, kwargs)
            if not split.used:
                raise ValueError(
                    "estimator='split' needs a model that splits its batch over the members (a Rank1Model); "
                    "this model tiled it or ignored the handler"
                )
            return traces
        return self._traces(model, guide, args, kwargs)

    def _traces(self, model, guide, args, kwargs):
        try:
            if not is_validation_enabled():
                # the fast path: no log densities computed up front (the analytic KLs need none);
                # elbo_terms computes the few it needs. With validation: Pyro's checks and all densities.
                guide_trace = poutine.trace(guide, graph_type="flat").get_trace(*args, **kwargs)
                model_trace = poutine.trace(poutine.replay(model, trace=guide_trace), graph_type="flat").get_trace(
                    *args, **kwargs
                )
                return model_trace, guide_trace
            return get_importance_trace("flat", self.max_plate_nesting, model, guide, args, kwargs)
        except ValueError as e:
            if "invalid log_prob shape" in str(e):
                raise ValueError(
                    f"{e}\nA rank-1 model's sites carry the member dim (K) at dim -2: sample the observations "
                    "inside the members plate, e.g. `with rank1_pyro.members(K) as m:` around the likelihood "
                    "(see the how-to 'Define a model')."
                ) from None
            raise

    # -- terms ----------------------------------------------------------------------------
    def log_likelihood(self, site) -> torch.Tensor:
        """Scaled log-likelihood of one observed site, member dim reduced by the objective."""
        log_p = _masked(_log_prob(site), site)
        frame = _member_frame(site)
        if frame is not None and log_p.dim() >= -frame.dim:
            log_p = self.reduce_members(log_p, frame.dim)
        return (log_p * site["scale"]).sum()

    def analytic_kl_term(self, model_site, guide_site) -> torch.Tensor | None:
        """Weighted closed-form KL(q ‖ p) of a guide site that samples the model site, or ``None``.

        ``None`` when the pair has no closed form, when the guide site is a point mass (a ``Delta``,
        whose log density may carry a log-Jacobian), or when ``analytic_kl`` is off.
        """
        if not self.analytic_kl or guide_site is None or is_point_mass(guide_site["fn"]):
            return None
        try:
            kl = kl_divergence(guide_site["fn"], model_site["fn"])
        except NotImplementedError:
            return None
        return _masked_sum(kl, guide_site) * _weight(guide_site)

    def elbo_terms(self, model_trace, guide_trace, joints: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log-likelihood, KL)`` of one (possibly vectorized) particle, both summed and weighted.

        ``KL`` = Σ over latent sites of (analytic KL, or Monte Carlo log q − log p), with the
        member/global weights of the module docstring; ``joints`` are the guide's joint latents
        (:func:`~rank1_pyro.inference.joint.joint_latents`).
        """
        return self._particle_terms(model_trace, guide_trace, joints)[:2]

    def _particle_terms(self, model_trace, guide_trace, joints: dict | None = None):
        """:meth:`elbo_terms` and the logits of the observed categorical site (``None`` if there is none)."""
        joints = joints or {}
        log_lik = kl = 0.0
        logits = None
        analytic = set()
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site) or is_identically_zero(site["scale"]):
                continue
            if site["is_observed"]:
                log_lik = log_lik + self.log_likelihood(site)
                if isinstance(site["fn"], dist.Categorical):
                    logits = site["fn"].logits
                continue
            guide_site = guide_trace.nodes.get(name)
            term = self.analytic_kl_term(site, guide_site)
            if term is not None:
                kl = kl + term
                analytic.add(name)
            else:
                kl = kl - _masked_sum(_log_prob(site), site) * _weight(site)
        for name, site in guide_trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site) or name in analytic:
                continue
            if site["is_observed"] or is_identically_zero(site["scale"]):
                continue
            if not getattr(site["fn"], "has_rsample", False):
                raise NotImplementedError(
                    f"guide site {name!r}: {type(site['fn']).__name__} has no reparameterized sampler; the rank-1 "
                    "objectives need reparameterized guide distributions"
                )
            log_q = _masked_sum(_log_prob(site), site) * _weight(site)
            joint = joints.get(name)
            if joint is not None and joint.num_members is not None:
                # log q(u) = log q(u_G) + log q(u_M | u_G): weight 1 on the global marginal, 1/K on the rest
                k = joint.num_members
                log_q = log_q / k
                if joint.global_idx.numel():
                    log_q = log_q + (1 - 1 / k) * joint.global_log_density(site["value"]).sum() * site["scale"]
            kl = kl + log_q
        return torch.as_tensor(log_lik), torch.as_tensor(kl), logits

    # -- the ELBO interface ---------------------------------------------------------------
    def loss_terms(self, model, guide, *args, **kwargs) -> ELBOTerms:
        """The loss and its parts, averaged over particles (see :class:`ELBOTerms`; the logits are the
        last particle's)."""
        log_lik = kl = 0.0
        logits = None
        joints = None
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            if joints is None:  # autoguides set up their latent layout on their first call
                joints = joint_latents(guide)
            particle_log_lik, particle_kl, logits = self._particle_terms(model_trace, guide_trace, joints)
            log_lik = log_lik + particle_log_lik / self.num_particles
            kl = kl + particle_kl / self.num_particles
        loss = -(log_lik - self.effective_kl_weight * kl)
        if is_validation_enabled():  # a host read (and a backward hook): not in validation-free training steps
            warn_if_nan(loss, "loss")
        return ELBOTerms(loss, log_lik, kl, logits)

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """The negative ELBO, −(log-likelihood − kl_weight·annealing·KL), averaged over particles."""
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

    splits_batch = True

    def reduce_members(self, log_p, dim):
        return log_p.mean(dim)


class MixtureELBO(Rank1ELBO):
    r"""ELBO with the log-mixture likelihood :math:`\log \frac1K \sum_k p(y_n \mid x_n, \theta_k)`."""

    def reduce_members(self, log_p, dim):
        return torch.logsumexp(log_p, dim) - math.log(log_p.shape[dim])


OBJECTIVES = {"averaged": AveragedELBO, "mixture": MixtureELBO}


class PlainELBO:
    """Any other Pyro ELBO (``Trace_ELBO``, ``TraceMeanField_ELBO``, ...) behind the training loop's
    interface: :meth:`loss_terms` is its ``differentiable_loss`` with no parts (:class:`ELBOTerms`
    of the loss alone), and it has no KL weight to anneal (``annealing`` stays 1)."""

    has_parts = False
    effective_kl_weight = 1.0

    def __init__(self, elbo):
        self.elbo = elbo

    @property
    def annealing(self) -> float:
        return 1.0

    @annealing.setter
    def annealing(self, value: float) -> None:
        if value != 1.0:
            raise ValueError(f"{type(self.elbo).__name__} has no KL weight to anneal (annealing must stay 1)")

    def loss_terms(self, model, guide, *args, **kwargs) -> ELBOTerms:
        return ELBOTerms(self.elbo.differentiable_loss(model, guide, *args, **kwargs), None, None, None)


def check_objective(objective, kl_annealing_epochs: float = 0.0) -> None:
    """Raise unless ``objective`` is ``None``, a name in :data:`OBJECTIVES` or a Pyro ELBO, and one
    that has a KL weight to anneal when ``kl_annealing_epochs`` is not 0 (a rank-1 objective)."""
    if isinstance(objective, str):
        one_of("objective", objective, sorted(OBJECTIVES))
    elif objective is not None and not hasattr(objective, "differentiable_loss"):
        raise TypeError(f"objective must be a name or a Pyro ELBO, got {type(objective).__name__}")
    if kl_annealing_epochs and not (objective is None or isinstance(objective, (str, Rank1ELBO))):
        raise ValueError(
            f"kl_annealing_epochs={kl_annealing_epochs!r} needs a rank-1 objective (AveragedELBO or MixtureELBO), "
            f"which has a KL weight; {type(objective).__name__} has none (pass kl_annealing_epochs=0)"
        )


def training_objective(objective) -> Rank1ELBO | PlainELBO:
    """``objective`` as the training loop steps it: ``None`` is a fresh :class:`AveragedELBO` (the
    library's default: the reference code's training loss, and better than the mixture ELBO on most
    of the converged benchmark's measures, ``docs/benchmarks.md``), a name a fresh objective of
    :data:`OBJECTIVES`, a rank-1 objective itself, any other Pyro ELBO a :class:`PlainELBO` around it."""
    check_objective(objective)
    if objective is None:
        return AveragedELBO()
    if isinstance(objective, str):
        return OBJECTIVES[objective]()
    return objective if isinstance(objective, Rank1ELBO) else PlainELBO(objective)


def objective_record(objective) -> dict:
    """The plain values a checkpoint records of a training objective: its name (a key of
    :data:`OBJECTIVES`, else its class name), ``kl_weight`` and ``estimator`` (``None`` if it has none)."""
    elbo = objective.elbo if isinstance(objective, PlainELBO) else objective
    name = next((key for key, cls in OBJECTIVES.items() if type(elbo) is cls), type(elbo).__name__)
    return {
        "objective": name,
        "kl_weight": getattr(elbo, "kl_weight", None),
        "estimator": getattr(elbo, "estimator", None),
    }
