r"""A gold standard for the approximate posteriors: Hamiltonian Monte Carlo over the rank-1 factors.

Every posterior of the library is an approximation. With the weights :math:`W` and the biases
:math:`b` held at their trained values, the posterior over one member's rank-1 factors
:math:`\theta = (r^{(l)}, s^{(l)})_l` (a few hundred to a few thousand numbers for a small
network) is within reach of NUTS:

.. math:: p_k(\theta \mid \mathcal D) \;\propto\; p(\theta) \prod_{n=1}^N p(y_n \mid x_n, \theta; W, b_k),

the full-data likelihood (no minibatches, no :math:`N/B` scaling) of **member k** -- the network
with member k's point estimates (:math:`W` is shared, the bias :math:`b_k` is member k's) -- times
the factor prior. It is the posterior that component :math:`q_k` of a mixture guide approximates
under the averaged ELBO (each member's ELBO bounds its own evidence), so HMC gives each component
its exact reference.

**One set of factors.** :func:`member_view` cuts member k out of a K-member
:class:`~rank1_pyro.models.Rank1Model`: a copy with ``ensemble_size = 1``, the shared weights and
member k's biases, whose factor sites keep their names (``"net.0.r"``) and have shape
``(1, 1, size)``. :func:`factor_model` is that view as a Pyro model of no arguments, the data
closed over, for any Pyro kernel: ``MCMC(NUTS(factor_model(model, x, y, member=k)), 500).run()``.
:class:`FactorTarget` is the same density as a potential energy
:math:`U(z) = -\log p(T(z), \mathcal D) - \log\lvert\det J_T(z)\rvert` over the unconstrained
coordinates :math:`z` (:math:`T` = ``biject_to(support)``: the identity for the factors, ``exp``
for hierarchical scales), accumulated while the network runs instead of from a recorded trace
(about twice as fast as Pyro's trace-based potential; a test checks they agree).

**Chains.** :func:`run_hmc` runs NUTS (or HMC) chains for each requested member: one started at the
guide's component-k mean when a guide is given (the natural starting point: the mode q_k found),
plus ``random_starts`` chains from prior draws (or random signs, ±1 entries, the mixture guide's
initialisation) to expose other modes. Pyro's ``MCMC`` cannot vectorize chains within one process
(``num_chains > 1`` starts one worker process per chain, or runs them one after another when the
cores are short); a shared CPU gains nothing from processes, so the chains run **one after
another** in this process, each its own ``MCMC(num_chains=1)`` with its own warmup (step size and
diagonal mass matrix adaptation), seed ``seed + chain``, and a progress bar.

**Statistics per draw** (Stan's, recorded by thin subclasses of Pyro's kernels): ``diverging``
(the trajectory's energy error exceeded 1000), ``tree_depth`` (NUTS: the number of doublings,
:math:`2^{d}-1 \ge` leapfrog steps), ``n_steps`` (leapfrog steps), ``energy`` (the Hamiltonian
:math:`H = U(z) + \frac12 p^\top M^{-1} p` of the selected state, for ArviZ's energy plot and
BFMI), ``acceptance_rate`` (the mean Metropolis acceptance probability over the trajectory),
``step_size`` and ``lp`` :math:`= \log p(\theta, \mathcal D)` (the log joint in the constrained
space, as in the variational DataTree's ``sample_stats``).

**DataTree.** :func:`hmc_to_datatree` exports the chains in the layout of
:func:`rank1_pyro.diagnostics.to_datatree`: ``posterior`` (one variable per site, dims
``(chain, draw, "<site>_dim")``), ``sample_stats``, ``log_likelihood``, ``posterior_predictive``
and ``observed_data`` of the training data. Here **chain = Markov chain** and **draw = post-warmup
iteration**; the chain dim carries the coordinates ``member`` (whose posterior the chain samples)
and ``start`` (its initial point). Chains of different members sample different posteriors, so
R-hat and ESS are computed per member (:func:`hmc_summary`, :func:`convergence`); the variational
tree's chain k is member k's component, to be compared with the HMC chains of ``member == k``.
:func:`chain_modes` groups the chains of each member into modes.

One concept, one module (hence over 400 lines): the HMC reference over the rank-1 factors: the factor model and its member views, NUTS runs with their chains and modes, and their export to the variational posterior's DataTree layout.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.mcmc import HMC, MCMC, NUTS
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import nn
from torch.distributions import biject_to

from .._checks import number, one_of, positive_int
from ..layers import MEMBERS, rank1_layers

__all__ = [
    "member_view",
    "factor_model",
    "FactorTarget",
    "run_hmc",
    "HMCResult",
    "hmc_to_datatree",
    "hmc_summary",
    "convergence",
    "chain_modes",
    "concat_chains",
    "KERNELS",
    "RANDOM_INITS",
    "SAME_MODE_DISTANCE",
]

KERNELS = ("nuts", "hmc")
#: how the random starts are drawn: a prior draw, or ±1 entries (the mixture guide's random-sign init)
RANDOM_INITS = ("prior", "signs")
#: chains of one member whose RMS standardized mean distance is below this sit in the same mode
SAME_MODE_DISTANCE = 1.0
#: draws evaluated at once when the chains' log-likelihoods are computed (bounded further by rows)
_MAX_ROWS = 1 << 22
_CHAIN_DOC = "Markov chain (see the member and start coordinates)"
_DRAW_DOC = "post-warmup iteration of the chain"


# ----------------------------------------------------------------------------- the target


def _is_rank1_model(model) -> bool:
    from ..models.base import Rank1Model

    return isinstance(model, Rank1Model)


def member_view(model: nn.Module, member: int = 0) -> nn.Module:
    """Member ``member`` of a K-member :class:`~rank1_pyro.models.Rank1Model` as a frozen model with K = 1.

    A deep copy with ``ensemble_size = 1`` in the model and every rank-1 layer, each layer's
    per-member ``bias`` (shape ``(K, ...)``) cut to row ``member``, ``num_data = None`` (full-data,
    unscaled likelihood) and eval mode. Every parameter becomes a buffer: neither autograd nor
    Pyro's global param store (which a ``PyroModule`` feeds its ``nn.Parameter`` s to, switching
    their gradients back on) sees the fixed weights. Site names are unchanged (``"net.0.r"``);
    factors have shape ``(1, 1, size)``. The original model is untouched.
    """
    if not _is_rank1_model(model):
        raise TypeError(f"member_view needs a Rank1Model, got {type(model).__name__}")
    k = model.ensemble_size
    if isinstance(member, bool) or not isinstance(member, int) or not 0 <= member < k:
        raise ValueError(f"member must be an integer in [0, {k}) for this K = {k} model, got {member!r}")
    view = copy.deepcopy(model)
    layers = {id(layer) for _, layer in rank1_layers(view)}
    for module in view.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            value = param.detach().clone()
            if name == "bias" and id(module) in layers and value.dim() >= 1 and value.shape[0] == k:
                value = value[member : member + 1].clone()  # the per-member bias: member k's row
            delattr(module, name)
            module.register_buffer(name, value)
        if id(module) in layers:
            module.ensemble_size = 1
    view.ensemble_size = 1
    view.num_data = None
    return view.eval()


def _check_data(data) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(data, (tuple, list)) and len(data) == 2 and all(torch.is_tensor(t) for t in data)):
        raise TypeError(f"data must be a pair of tensors (x, y): the full training set, got {type(data).__name__}")
    x, y = data
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"data: x must be a non-empty batch (N, ...), got shape {tuple(x.shape)}")
    if y.shape[:1] != x.shape[:1]:
        raise ValueError(f"data: y must have {x.shape[0]} rows to match x, got shape {tuple(y.shape)}")
    return x, y


class _LogJoint(Messenger):
    r"""Accumulates :math:`\sum_{\text{sites}} \text{scale} \cdot \log p(\text{value})` (masked) of every
    sample site, latent and observed, as the model runs: the log joint without a recorded trace."""

    def __init__(self):
        super().__init__()
        self.total = 0.0

    def _pyro_post_sample(self, msg):
        if site_is_subsample(msg) or msg["mask"] is False:
            return
        log_p = msg["fn"].log_prob(msg["value"])
        mask = msg["mask"]
        if mask is not None and mask is not True:
            log_p = log_p.masked_fill(~mask, 0.0)
        self.total = self.total + (log_p * msg["scale"]).sum()


@dataclass(frozen=True)
class _Site:
    name: str
    shape: torch.Size  # the value's shape in one run of the view (batch + event)
    event_dim: int
    transform: object  # constrained <- unconstrained: biject_to(support)
    member: bool  # sampled inside the members plate (a factor) or global (a hierarchical scale)

    @property
    def event_shape(self) -> torch.Size:
        return self.shape[len(self.shape) - self.event_dim :]


class FactorTarget:
    r"""The HMC target of one member: :math:`p_k(\theta \mid \mathcal D)`, with W and the biases fixed.

    Args:
        model: a :class:`~rank1_pyro.models.Rank1Model` (member ``member`` is cut out by
            :func:`member_view`), or a Pyro model ``model(x, y)`` with K = 1 (its latents in
            ``pyro.plate("members", 1, dim=-2)`` -- e.g. written with ``rank1_pyro.members(1)`` --
            or outside every plate), used as it is.
        data: the full training set ``(x, y)``; every potential evaluation uses all of it.
        member: k, which member's posterior.
        fixed: ``{site: value}`` latent sites held at a value (conditioned on) instead of sampled,
            e.g. one factor of a conjugate model; their log density enters :math:`U` as a constant.
        dtype: the floating dtype of the network, the data and the chains; ``torch.float64``
            (default) keeps the energy errors of long trajectories at rounding level. ``None``: the
            model's own.

    ``sites`` are the sampled latent sites (factors first, in execution order); ``transforms`` maps
    each to its bijection onto the unconstrained space (``biject_to(support).inv``, as Pyro's).
    """

    def __init__(self, model, data, member: int = 0, fixed: dict | None = None, dtype=torch.float64):
        x, y = _check_data(data)
        if fixed is not None and not isinstance(fixed, dict):
            raise TypeError(f"fixed must be a dict {{site: value}}, got {type(fixed).__name__}")
        if dtype is not None and dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32, torch.float64 or None, got {dtype!r}")
        self.member = member
        if _is_rank1_model(model):
            view = member_view(model, member)
            self.likelihood = view.likelihood
        elif callable(model):
            if member != 0:
                raise ValueError(
                    f"member={member!r}: a plain Pyro model is used as it is and must have K = 1 (member 0); "
                    "pass a Rank1Model to sample member k of a K-member model"
                )
            view = model
            self.likelihood = getattr(model, "likelihood", None)
        else:
            raise TypeError(f"model must be a Rank1Model or a Pyro model callable as model(x, y), got {model!r}")
        if isinstance(view, nn.Module):
            if dtype is not None:
                view = view.to(dtype)
            tensors = [*view.parameters(), *view.buffers()]
            dtype = next((t.dtype for t in tensors if t.is_floating_point()), dtype)
        self.dtype = dtype or torch.get_default_dtype()
        self.view = view
        self.x = x.to(self.dtype) if x.is_floating_point() else x
        self.y = y.to(self.dtype) if y.is_floating_point() else y
        self.num_data = x.shape[0]
        with self._default_dtype(), torch.no_grad():
            self.fixed = self._check_fixed(fixed or {})
            self.sites = self._find_sites()
        #: constrained -> unconstrained per site (Pyro's convention: MCMC maps its draws back with ``.inv``)
        self.transforms = {s.name: s.transform.inv for s in self.sites}

    # -- set-up ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _default_dtype(self):
        """The context every run of the view needs: torch's default dtype set to the chains' dtype (prior
        distributions are built in it) and Pyro's value checks off."""
        saved = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with pyro.validation_enabled(False):
                yield
        finally:
            torch.set_default_dtype(saved)

    def _trace(self, values: dict | None = None):
        data = {**self.fixed, **(values or {})}
        with self._default_dtype():
            return poutine.trace(poutine.condition(self.view, data=data)).get_trace(self.x, self.y)

    def _check_fixed(self, fixed: dict) -> dict:
        with self._default_dtype():
            trace = poutine.trace(self.view).get_trace(self.x, self.y)
        latent = {n: s for n, s in trace.nodes.items() if _is_latent(s)}
        out = {}
        for name, value in fixed.items():
            if name not in latent:
                raise ValueError(f"fixed: {name!r} is not a latent site of the model; its latent sites: {list(latent)}")
            shape = latent[name]["value"].shape
            value = torch.as_tensor(value, dtype=latent[name]["value"].dtype)
            try:
                out[name] = value.expand(shape).clone()
            except RuntimeError:
                raise ValueError(
                    f"fixed[{name!r}]: a value of shape {tuple(value.shape)} does not broadcast to the site's "
                    f"shape {tuple(shape)}"
                ) from None
        return out

    def _find_sites(self) -> list[_Site]:
        trace = self._trace()
        sites, observed, members_size = [], [], None
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            if site["is_observed"]:
                if name not in self.fixed:
                    observed.append(name)
                continue
            frame = next((f for f in site["cond_indep_stack"] if f.name == MEMBERS), None)
            if frame is not None:
                members_size = frame.size
            sites.append(
                _Site(
                    name,
                    site["value"].shape,
                    site["fn"].event_dim,
                    biject_to(site["fn"].support),
                    frame is not None,
                )
            )
        if not any(s.member for s in sites):
            raise ValueError(
                "the model has no rank-1 factor sites to sample: HMC over the factors needs latent sample sites "
                "inside pyro.plate('members', ...) (the r and s of Rank1Linear/Rank1Conv2d/Rank1LSTM in a "
                "Rank1Model, or a plain Pyro model written with rank1_pyro.members(1))"
                + (f"; the sites in `fixed` ({list(self.fixed)}) are not sampled" if self.fixed else "")
            )
        if members_size != 1:
            raise ValueError(
                f"the model's members plate has size {members_size}: HMC samples one set of factors; pass a "
                "Rank1Model (member k is cut out with member_view) or write the model with K = 1"
            )
        if not observed:
            raise ValueError("the model observes nothing: it must observe y when called as model(x, y)")
        self.observed = observed
        return sorted(sites, key=lambda s: not s.member)  # factors first, execution order within

    # -- densities ------------------------------------------------------------------------
    @property
    def factor_sites(self) -> list[str]:
        """Names of the sampled sites inside the members plate (the rank-1 factors)."""
        return [s.name for s in self.sites if s.member]

    @property
    def dimension(self) -> int:
        """The number of sampled numbers (factor entries and hierarchical scales)."""
        return sum(math.prod(s.shape) for s in self.sites)

    def model(self):
        """The target as a Pyro model of no arguments (the data closed over): see :func:`factor_model`."""
        with poutine.condition(data=self.fixed):
            return self.view(self.x, self.y)

    def constrained(self, z: dict) -> tuple[dict, torch.Tensor]:
        """``(values, log|det J|)``: unconstrained ``z`` mapped to the sites' supports."""
        values, log_det = {}, 0.0
        for s in self.sites:
            u = z[s.name]
            values[s.name] = s.transform(u)
            log_det = log_det + s.transform.log_abs_det_jacobian(u, values[s.name]).sum()
        return values, torch.as_tensor(log_det)

    def log_joint(self, values: dict) -> torch.Tensor:
        r""":math:`\log p(\theta, \mathcal D)` at one draw ``values`` (constrained, the sites' shapes)."""
        with self._default_dtype(), _LogJoint() as lj:
            poutine.condition(self.view, data={**self.fixed, **values})(self.x, self.y)
        return lj.total

    def potential(self, z: dict) -> torch.Tensor:
        r"""The potential energy :math:`U(z) = -\log p(T(z), \mathcal D) - \log\lvert\det J_T(z)\rvert`."""
        values, log_det = self.constrained(z)
        return -(self.log_joint(values) + log_det)

    def traced_potential(self, z: dict):
        """:meth:`potential` compiled by ``torch.jit.trace`` at the point ``z`` (unconstrained), or ``None``.

        Tracing records the network's tensor operations once, so an evaluation skips Pyro's effect
        handlers and Python: several times faster for small networks, where that overhead dominates.
        The trace is checked against :meth:`potential` and its gradient at ``z`` and at a second point;
        ``None`` (use the eager potential) when tracing fails or disagrees (data-dependent Python
        control flow in the model).
        """
        names = [s.name for s in self.sites]

        def flat(*values):
            return self.potential(dict(zip(names, values)))

        points = [{n: z[n].detach() for n in names}]
        points.append({n: v + 0.01 * torch.randn_like(v) for n, v in points[0].items()})
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                traced = torch.jit.trace(flat, tuple(points[0][n] for n in names), check_trace=False)
            for point in points:
                args = [point[n].clone().requires_grad_() for n in names]
                eager, eager_grad = _value_and_grad(flat, args)
                value, grad = _value_and_grad(traced, args)
                if not torch.allclose(value, eager, rtol=1e-6, atol=1e-6) or not all(
                    torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(grad, eager_grad)
                ):
                    return None
        except Exception:  # noqa: BLE001 - any failure to trace means: run eagerly
            return None

        def potential(z):
            return traced(*(z[n] for n in names))

        return potential

    def unconstrained(self, values: dict) -> dict:
        """Constrained site values -> the unconstrained coordinates the kernels move in."""
        return {s.name: s.transform.inv(values[s.name]) for s in self.sites}

    # -- starting points ------------------------------------------------------------------
    def prior_draw(self) -> dict:
        """One draw of every sampled site from the prior (constrained)."""
        with self._default_dtype(), torch.no_grad():
            trace = poutine.trace(poutine.condition(poutine.block(self.view, hide_types=["observe"]), self.fixed))
            trace = trace.get_trace(self.x, None)
        return {s.name: trace.nodes[s.name]["value"].detach().clone() for s in self.sites}

    def sign_draw(self) -> dict:
        """Random ±1 entries (P(+1) = 0.5) for every factor site; the other sites from the prior."""
        values = self.prior_draw()
        for s in self.sites:
            if s.member:
                values[s.name] = 2.0 * torch.bernoulli(torch.full(s.shape, 0.5, dtype=self.dtype)) - 1.0
        return values

    def guide_start(self, guide, member: int | None = None) -> dict:
        """Component ``member``'s location in ``guide`` (``guide.median()``: a rank-1 guide's component
        means, an autoguide's medians); sites the guide does not hold start at a prior draw."""
        if not hasattr(guide, "median"):
            raise TypeError(f"guide must provide median() (the rank-1 guides and Pyro's autoguides do), got {guide!r}")
        member = self.member if member is None else member
        with torch.no_grad():
            medians = guide.median()
        values = self.prior_draw()
        for s in self.sites:
            if s.name not in medians:
                continue
            value = torch.as_tensor(medians[s.name]).detach().to(self.dtype)
            n = math.prod(s.shape)
            if s.member and value.numel() != n:  # (K, 1, size): the member's row
                if value.numel() % n:
                    raise ValueError(
                        f"guide: site {s.name!r} holds {tuple(value.shape)}, not K rows of {tuple(s.shape)}"
                    )
                value = value.reshape(-1, n)[member]
            values[s.name] = value.reshape(s.shape).clone()
        return values

    # -- many draws at once ---------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, draws: dict, predictive: bool = True) -> dict:
        """Evaluate the model at ``n`` draws ``{site: (n, *site shape)}`` (constrained), vectorized.

        Returns ``lp`` ``(n,)`` (:math:`\\log p(\\theta, \\mathcal D)`), ``log_likelihood``
        ``{observed site: (n, N)}`` and, with ``predictive``, ``predictive`` ``{site: (n, N)}`` draws
        of the observations. Draws run under ``pyro.plate("samples", n, dim=-3)`` in chunks.
        """
        n = next(iter(draws.values())).shape[0]
        rows = max(1, self.num_data * max(1, self._outputs_per_example()))
        chunk = max(1, min(n, _MAX_ROWS // rows))
        lp, loglik, pred = [], {}, {}
        with self._default_dtype():
            for start in range(0, n, chunk):
                m = min(chunk, n - start)
                values = {}
                for s in self.sites:
                    v = draws[s.name][start : start + m].to(self.dtype)
                    batch = len(s.shape) - s.event_dim
                    values[s.name] = v.reshape(m, *(1,) * (2 - batch), *s.shape)
                fixed = {k: v for k, v in self.fixed.items()}
                with pyro.plate("samples", m, dim=-3):
                    trace = poutine.trace(poutine.condition(self.view, data={**fixed, **values})).get_trace(
                        self.x, self.y
                    )
                total = torch.zeros(m, dtype=torch.float64)
                for name, site in trace.nodes.items():
                    if site["type"] != "sample" or site_is_subsample(site):
                        continue
                    log_p = site["fn"].log_prob(site["value"]).double() * site["scale"]
                    log_p = log_p.reshape((1,) * (3 - log_p.dim()) + tuple(log_p.shape)) if log_p.dim() < 3 else log_p
                    per_draw = log_p.expand(m, *log_p.shape[1:]).reshape(m, -1)
                    total += per_draw.sum(-1)
                    if name in self.observed:
                        loglik.setdefault(name, []).append(per_draw.cpu())
                        if predictive:
                            sample = site["fn"].sample()
                            sample = sample.reshape((1,) * max(0, 3 - sample.dim()) + tuple(sample.shape))
                            pred.setdefault(name, []).append(sample.expand(m, *sample.shape[1:]).reshape(m, -1).cpu())
                lp.append(total)
        out = {"lp": torch.cat(lp), "log_likelihood": {k: torch.cat(v) for k, v in loglik.items()}}
        if predictive:
            out["predictive"] = {k: torch.cat(v) for k, v in pred.items()}
        return out

    def _outputs_per_example(self) -> int:
        if self.likelihood == "categorical":
            with torch.no_grad():
                trace = self._trace()
            for name in self.observed:
                logits = getattr(trace.nodes[name]["fn"], "logits", None)
                if logits is not None:
                    return logits.shape[-1]
        return 1


def _value_and_grad(fn, args):
    value = fn(*args)
    return value.detach(), [g.detach() for g in torch.autograd.grad(value, args)]


def _is_latent(site) -> bool:
    return site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)


def factor_model(model, x: torch.Tensor, y: torch.Tensor, *, member: int = 0, fixed=None, dtype=torch.float64):
    """Member ``member``'s factor posterior as a Pyro model of no arguments, for any Pyro MCMC kernel.

    ``model``, ``member``, ``fixed`` and ``dtype`` as :class:`FactorTarget`; ``(x, y)`` is the
    full training set. The model runs the K = 1 view (:func:`member_view`) on all of the data, so
    its log joint is :math:`\\log p(\\theta) + \\sum_n \\log p(y_n \\mid x_n, \\theta; W, b_k)`::

        mcmc = MCMC(NUTS(factor_model(model, x, y, member=0)), num_samples=500)
        mcmc.run()

    Run it with ``torch.set_default_dtype`` equal to ``dtype`` (the factor priors are built in
    the default dtype), or use :func:`run_hmc`, which does that and records Stan's statistics.
    """
    target = FactorTarget(model, (x, y), member=member, fixed=fixed, dtype=dtype)

    def model_fn():
        return target.model()

    model_fn.target = target
    return model_fn


# ----------------------------------------------------------------------------- kernels that record


class _Recorder:
    """Mixin: per post-warmup iteration, Stan's statistics of the transition."""

    def setup(self, warmup_steps, *args, **kwargs):
        self.records = []
        self._nesting = 0
        return super().setup(warmup_steps, *args, **kwargs)

    def _after(self, divergences_before: int, mean_accept_before: float, energy: float, depth, steps: int):
        n = self._t - self._warmup_steps
        if n <= 0:
            return
        accept = n * self._mean_accept_prob - (n - 1) * mean_accept_before
        self.records.append(
            {
                "diverging": len(self._divergences) > divergences_before,
                "tree_depth": depth,
                "n_steps": steps,
                "energy": float(energy),
                "acceptance_rate": min(1.0, max(0.0, accept)),
                "step_size": float(self.step_size),
            }
        )


class _RecordingNUTS(_Recorder, NUTS):
    """Pyro's NUTS, recording tree depth, leapfrog steps and the Hamiltonian of the selected state."""

    def _sample_r(self, name):
        r, r_unscaled = super()._sample_r(name)
        self._r0 = r_unscaled
        return r, r_unscaled

    def _build_basetree(self, z, r, z_grads, log_slice, direction, energy_current):
        tree = super()._build_basetree(z, r, z_grads, log_slice, direction, energy_current)
        self._steps += 1
        energy = tree.z_proposal_pe + self._kinetic_energy(tree.r_left_unscaled)
        self._leaves.append((tree.z_proposal, energy))
        return tree

    def _build_tree(self, z, r, z_grads, log_slice, direction, tree_depth, energy_current):
        top = self._nesting == 0
        self._nesting += 1
        try:
            tree = super()._build_tree(z, r, z_grads, log_slice, direction, tree_depth, energy_current)
        finally:
            self._nesting -= 1
        if top:  # Stan's depth: doublings done, the last one counted when its subtree was valid
            self._depth = tree_depth + (0 if tree.turning or tree.diverging else 1)
        return tree

    def sample(self, params):
        divergences, mean_accept = len(self._divergences), self._mean_accept_prob
        self._leaves, self._steps, self._depth, self._r0 = [], 0, 0, None
        z = super().sample(params)
        if self._r0 is None:  # no momentum drawn (no sites): nothing to record
            return z
        # the selected state is a leaf of this trajectory, or (nothing accepted) the initial state,
        # whose potential energy is still the cached one and whose momentum is the one drawn
        energy = next((e for leaf, e in reversed(self._leaves) if leaf is self._z_last), None)
        if energy is None:
            energy = self._potential_energy_last + self._kinetic_energy(self._r0)
        self._after(divergences, mean_accept, energy, self._depth, self._steps)
        self._leaves = []
        return z


class _RecordingHMC(_Recorder, HMC):
    """Pyro's HMC, recording leapfrog steps and the Hamiltonian of the selected state."""

    def _kinetic_energy(self, r_unscaled):
        energy = super()._kinetic_energy(r_unscaled)
        kinetic = getattr(self, "_kinetic", None)
        if kinetic is not None:
            kinetic.append(energy)
        return energy

    def sample(self, params):
        z_before = self._z_last
        divergences, mean_accept = len(self._divergences), self._mean_accept_prob
        self._kinetic = []
        z = super().sample(params)
        kinetic, self._kinetic = self._kinetic, None
        if len(kinetic) >= 2:
            accepted = self._z_last is not z_before
            energy = self._potential_energy_last + kinetic[1 if accepted else 0]
            self._after(divergences, mean_accept, energy, None, self.num_steps)
        return z


# ----------------------------------------------------------------------------- running the chains


@dataclass
class HMCResult:
    """The chains of :func:`run_hmc`.

    ``samples``: ``{site: (chains, draws, *event shape)}`` constrained draws (a factor's event shape
    is ``(size,)``); ``stats``: ``{name: (chains, draws)}`` NumPy arrays (the module docstring's
    statistics); ``members`` and ``starts``: per chain, the member whose posterior it samples and
    its starting point; ``seconds``: wall time per chain; ``targets``: member -> :class:`FactorTarget`.
    """

    samples: dict
    stats: dict
    members: np.ndarray
    starts: list
    seconds: list
    targets: dict
    settings: dict = field(default_factory=dict)

    @property
    def num_chains(self) -> int:
        return len(self.starts)

    @property
    def num_samples(self) -> int:
        return next(iter(self.stats.values())).shape[1]

    @property
    def num_divergences(self) -> int:
        return int(np.asarray(self.stats["diverging"]).sum())

    def draws(self, member: int) -> dict:
        """All draws of ``member``'s chains pooled: ``{site: (chains_k · draws, *event)}``."""
        idx = np.flatnonzero(self.members == member)
        if idx.size == 0:
            raise ValueError(f"member {member}: no chains sampled it (members sampled: {sorted(set(self.members))})")
        return {name: v[idx].reshape(-1, *v.shape[2:]) for name, v in self.samples.items()}

    def to_datatree(self, log_likelihood: bool = True):
        """See :func:`hmc_to_datatree`."""
        return hmc_to_datatree(self, log_likelihood=log_likelihood)


def _progress_on(progress) -> bool:
    if progress is None:
        return sys.stderr.isatty()
    if not isinstance(progress, bool):
        raise ValueError(f"progress must be True, False or None (a bar on a terminal), got {progress!r}")
    return progress


def run_hmc(
    model,
    data,
    *,
    guide=None,
    members=None,
    random_starts: int = 3,
    random_init: str = "prior",
    num_samples: int = 500,
    warmup_steps: int | None = None,
    kernel: str = "nuts",
    max_tree_depth: int = 10,
    target_accept_prob: float = 0.8,
    trajectory_length: float | None = None,
    fixed: dict | None = None,
    dtype=torch.float64,
    jit: bool = True,
    seed: int = 0,
    progress: bool | None = None,
) -> HMCResult:
    r"""NUTS (or HMC) chains over the rank-1 factors of a trained model, W and the biases fixed.

    Args:
        model: a trained :class:`~rank1_pyro.models.Rank1Model` or a K = 1 Pyro model (see
            :class:`FactorTarget`).
        data: the full training set ``(x, y)``: the likelihood is never minibatched.
        guide: the trained guide; each member then gets one chain started at its component's mean
            (``guide.median()``).
        members: which members' posteriors to sample (default: all K).
        random_starts: further chains per member from random starting points (``random_init``:
            ``"prior"``, a draw from the prior; ``"signs"``, ±1 entries) to expose other modes.
        num_samples: draws kept per chain (the sample budget; default 500).
        warmup_steps: adaptation iterations per chain, discarded (default: ``num_samples``).
        kernel: ``"nuts"`` (default) or ``"hmc"``: trajectories of a fixed length ``trajectory_length``
            (Pyro's default 2π), the number of leapfrog steps that length over the adapted step size.
        max_tree_depth, target_accept_prob: NUTS's settings (Pyro's defaults).
        fixed: ``{site: value}`` sites held fixed (:class:`FactorTarget`).
        dtype: the dtype of the chains and the network (default float64).
        jit: evaluate the potential through ``torch.jit.trace`` (:meth:`FactorTarget.traced_potential`;
            checked against the eager potential, which is used where tracing fails).
        seed: chain c uses ``pyro.set_rng_seed(seed + c)``.
        progress: Pyro's progress bar per chain (``None``: on a terminal only), with a header line
            naming the chain's member and start.

    Chains run one after another in this process (see the module docstring). Returns an
    :class:`HMCResult`; :meth:`HMCResult.to_datatree` exports it for ArviZ.
    """
    positive_int("num_samples", num_samples)
    warmup_steps = num_samples if warmup_steps is None else warmup_steps
    number("warmup_steps", warmup_steps, integer=True)
    number("random_starts", random_starts, integer=True)
    one_of("random_init", random_init, RANDOM_INITS)
    one_of("kernel", kernel, KERNELS)
    positive_int("max_tree_depth", max_tree_depth)
    if trajectory_length is not None:
        number("trajectory_length", trajectory_length, strict=True)
    number("seed", seed, integer=True)
    if not (isinstance(target_accept_prob, float) and 0.0 < target_accept_prob < 1.0):
        raise ValueError(f"target_accept_prob must be a float in (0, 1), got {target_accept_prob!r}")
    show = _progress_on(progress)
    if guide is None and random_starts == 0:
        raise ValueError("no chains to run: pass a guide (one chain from each component's mean) or random_starts >= 1")
    ensemble_size = model.ensemble_size if _is_rank1_model(model) else 1
    if members is None:
        members = list(range(ensemble_size))
    members = [members] if isinstance(members, int) and not isinstance(members, bool) else list(members)
    if not members or len(set(members)) != len(members):
        raise ValueError(f"members must be a non-empty list of distinct member indices, got {members!r}")
    targets = {k: FactorTarget(model, data, member=k, fixed=fixed, dtype=dtype) for k in members}

    plan = []  # (member, start label, initial values)
    for k in members:
        if guide is not None:
            plan.append((k, f"component {k} mean", "guide"))
        plan += [
            (k, f"{'prior draw' if random_init == 'prior' else 'random signs'} {i + 1}", random_init)
            for i in range(random_starts)
        ]
    chains, records, seconds, potentials = [], [], [], {}
    for c, (k, label, how) in enumerate(plan):
        target = targets[k]
        pyro.set_rng_seed(seed + c)
        with target._default_dtype():
            if how == "guide":
                start = target.guide_start(guide, k)
            elif how == "signs":
                start = target.sign_draw()
            else:
                start = target.prior_draw()
            initial = {n: v.detach() for n, v in target.unconstrained(start).items()}
            if k not in potentials:
                traced = target.traced_potential(initial) if jit else None
                potentials[k] = (traced, traced or target.potential)
            options = {"potential_fn": potentials[k][1], "transforms": target.transforms}
            options["target_accept_prob"] = target_accept_prob
            if kernel == "nuts":
                sampler = _RecordingNUTS(max_tree_depth=max_tree_depth, **options)
            else:
                sampler = _RecordingHMC(trajectory_length=trajectory_length, **options)
            if show:
                print(
                    f"HMC chain {c + 1}/{len(plan)}: member {k}, start: {label} "
                    f"({target.dimension} dimensions, {target.num_data} examples)",
                    file=sys.stderr,
                    flush=True,
                )
            mcmc = MCMC(
                sampler,
                num_samples=num_samples,
                warmup_steps=warmup_steps,
                initial_params=initial,
                disable_progbar=not show,
            )
            began = time.perf_counter()
            mcmc.run()
            seconds.append(time.perf_counter() - began)
            chains.append({n: v[0].detach().cpu() for n, v in mcmc.get_samples(group_by_chain=True).items()})
            records.append(sampler.records)

    samples = {}
    site_info = {s.name: s for s in next(iter(targets.values())).sites}
    for name, s in site_info.items():
        stacked = torch.stack([chain[name] for chain in chains])  # (C, S, *site shape)
        samples[name] = stacked.reshape(*stacked.shape[:2], *s.event_shape)
    stats = {
        key: np.array([[r[key] if r[key] is not None else -1 for r in rec] for rec in records])
        for key in records[0][0]
        if not (key == "tree_depth" and kernel == "hmc")
    }
    stats["diverging"] = stats["diverging"].astype(bool)
    chain_members = np.array([k for k, _, _ in plan])
    lp = np.zeros(stats["energy"].shape)
    for k, target in targets.items():
        idx = np.flatnonzero(chain_members == k)
        draws = {n: samples[n][idx].reshape(-1, *site_info[n].shape) for n in site_info}
        lp[idx] = target.evaluate(draws, predictive=False)["lp"].reshape(len(idx), -1).numpy()
    stats["lp"] = lp
    settings = {
        "kernel": kernel,
        "num_samples": num_samples,
        "warmup_steps": warmup_steps,
        "max_tree_depth": max_tree_depth if kernel == "nuts" else None,
        "trajectory_length": (trajectory_length or 2 * math.pi) if kernel == "hmc" else None,
        "target_accept_prob": target_accept_prob,
        "random_starts": random_starts,
        "random_init": random_init,
        "guide": None if guide is None else type(guide).__name__,
        "fixed": sorted(fixed or {}),
        "dtype": str(next(iter(targets.values())).dtype).replace("torch.", ""),
        "jit": all(traced is not None for traced, _ in potentials.values()),
        "seed": seed,
        "num_data": next(iter(targets.values())).num_data,
        "dimension": next(iter(targets.values())).dimension,
        "execution": "chains run one after another in one process (Pyro's MCMC cannot vectorize chains)",
    }
    return HMCResult(samples, stats, chain_members, [label for _, label, _ in plan], seconds, targets, settings)


# ----------------------------------------------------------------------------- ArviZ export


def hmc_to_datatree(result: HMCResult, log_likelihood: bool = True):
    """The chains as an ArviZ DataTree in the variational trees' layout (module docstring).

    Groups: ``posterior`` (dims ``(chain, draw, "<site>_dim")``; coordinates ``member`` and
    ``start`` on ``chain``), ``sample_stats`` (``lp``, ``diverging``, ``energy``, ``n_steps``,
    ``acceptance_rate``, ``step_size`` and, for NUTS, ``tree_depth``) and, with
    ``log_likelihood``, ``log_likelihood``, ``posterior_predictive`` and ``observed_data`` of the
    training data (the model evaluated at every draw: one more pass over the data per draw).
    """
    from arviz_base import from_dict

    if not isinstance(result, HMCResult):
        raise TypeError(f"result must be an HMCResult (from run_hmc), got {type(result).__name__}")
    C, S = result.num_chains, result.num_samples
    groups = {
        "posterior": {name: v.numpy() for name, v in result.samples.items()},
        "sample_stats": {k: np.asarray(v) for k, v in result.stats.items()},
    }
    dims = {}
    for name, v in result.samples.items():
        event = v.shape[2:]
        dims[name] = [f"{name}_dim"] if len(event) == 1 else [f"{name}_dim_{i}" for i in range(len(event))]
    if log_likelihood:
        loglik, predictive = {}, {}
        target0 = next(iter(result.targets.values()))
        for k, target in result.targets.items():
            idx = np.flatnonzero(result.members == k)
            draws = {s.name: result.samples[s.name][idx].reshape(-1, *s.shape) for s in target.sites}
            ev = target.evaluate(draws)
            for name, v in ev["log_likelihood"].items():
                loglik.setdefault(name, np.zeros((C, S, v.shape[-1])))[idx] = v.reshape(len(idx), S, -1).numpy()
            for name, v in ev["predictive"].items():
                predictive.setdefault(name, np.zeros((C, S, v.shape[-1]), dtype=v.numpy().dtype))[idx] = v.reshape(
                    len(idx), S, -1
                ).numpy()
        groups["log_likelihood"] = loglik
        groups["posterior_predictive"] = predictive
        for name in loglik:
            dims[name] = [f"{name}_id"]
        if len(target0.observed) == 1:
            y = target0.y.detach().cpu()
            groups["observed_data"] = {target0.observed[0]: y.reshape(y.shape[0], -1).squeeze(-1).numpy()}
    tree = from_dict(groups, dims=dims)
    chain_coords = {"member": ("chain", result.members.astype(int)), "start": ("chain", np.array(result.starts))}
    for group in ("posterior", "sample_stats", "log_likelihood", "posterior_predictive"):
        if group in tree.children:
            tree[group] = tree[group].to_dataset().assign_coords(chain_coords)
    tree["sample_stats"]["lp"].attrs["description"] = "log p(theta, D): log prior + log-likelihood of all the data"
    tree["sample_stats"]["energy"].attrs["description"] = "Hamiltonian of the selected state (ArviZ energy plot, BFMI)"
    tree.attrs.update(
        {
            "chain": _CHAIN_DOC,
            "draw": _DRAW_DOC,
            "num_chains": int(C),
            "num_samples": int(S),
            "posterior_kind": result.settings.get("kernel", "nuts").upper(),
            "likelihood": str(target0.likelihood or "") if log_likelihood else "",
            "members": [int(k) for k in result.targets],
            "warmup_steps": int(result.settings.get("warmup_steps", 0)),
            "created_by": "rank1_pyro.inference.hmc.hmc_to_datatree",
        }
    )
    return tree


def _member_indices(tree) -> dict:
    posterior = tree["posterior"]
    members = posterior["member"].values if "member" in posterior.coords else np.zeros(posterior.sizes["chain"], int)
    return {int(k): np.flatnonzero(members == k) for k in dict.fromkeys(members.tolist())}


def hmc_summary(tree, var_names=None):
    """ArviZ's summary (mean, sd, credible interval, MCSE, bulk and tail ESS, R-hat) per member.

    One row per factor entry and member: the chains of one member sample one posterior, so R-hat and
    ESS are computed over those chains only. Columns as :func:`arviz_stats.summary` plus ``member``.
    """
    import arviz_stats
    import pandas as pd

    if "posterior" not in getattr(tree, "children", {}):
        raise ValueError("tree must be a DataTree with a posterior group (hmc_to_datatree)")
    frames = []
    for k, idx in _member_indices(tree).items():
        sub = tree.isel(chain=idx)
        df = arviz_stats.summary(sub, var_names=var_names, group="posterior", kind="all", round_to="none")
        df.insert(0, "member", k)
        frames.append(df)
    return pd.concat(frames)


def convergence(tree) -> dict:
    """Per member: the largest R-hat, the smallest bulk and tail ESS over the factor entries, and the
    number of divergent transitions. ``{member: {"r_hat_max", "ess_bulk_min", "ess_tail_min",
    "divergences", "chains"}}``; R-hat is NaN for a single chain."""
    table = hmc_summary(tree)
    diverging = tree["sample_stats"]["diverging"].values if "sample_stats" in tree.children else None
    out = {}
    for k, idx in _member_indices(tree).items():
        rows = table[table["member"] == k]
        out[k] = {
            "chains": int(idx.size),
            "r_hat_max": float(rows["r_hat"].max()) if idx.size > 1 else float("nan"),
            "ess_bulk_min": float(rows["ess_bulk"].min()),
            "ess_tail_min": float(rows["ess_tail"].min()),
            "divergences": int(diverging[idx].sum()) if diverging is not None else 0,
        }
    return out


def _flat_posterior(tree, idx, var_names=None) -> np.ndarray:
    """``(chains, draws, entries)``: the posterior variables of the chains ``idx``, flattened and joined
    in ``var_names`` order (default: the group's order)."""
    posterior = tree["posterior"].to_dataset()
    names = list(posterior.data_vars) if var_names is None else list(var_names)
    missing = [n for n in names if n not in posterior.data_vars]
    if missing:
        raise ValueError(f"var_names: {missing} are not in the posterior group ({list(posterior.data_vars)})")
    parts = []
    for name in names:
        v = posterior[name].values[idx]
        parts.append(v.reshape(v.shape[0], v.shape[1], -1))
    return np.concatenate(parts, axis=-1)


def _gaussian_log_volume(draws: np.ndarray) -> float:
    r""":math:`\tfrac12 \log\det(2\pi e\, \Sigma)` of the draws' covariance: the entropy of the Gaussian
    fit (full covariance with more than twice as many draws as dimensions, else diagonal)."""
    n, d = draws.shape
    if n < 2:
        return float("nan")
    if n > 2 * d:
        cov = np.cov(draws, rowvar=False).reshape(d, d)
        sign, logdet = np.linalg.slogdet(cov + 1e-12 * np.eye(d))
        if sign <= 0:
            logdet = float(np.log(np.maximum(draws.var(0, ddof=1), 1e-300)).sum())
    else:
        logdet = float(np.log(np.maximum(draws.var(0, ddof=1), 1e-300)).sum())
    return 0.5 * (d * math.log(2 * math.pi * math.e) + logdet)


def chain_modes(tree, threshold: float = SAME_MODE_DISTANCE, var_names=None) -> list[dict]:
    r"""Group each member's chains into modes and weigh the modes.

    Chains i and j of one member sit in the same mode when the RMS standardized distance of their
    means over the D posterior entries (``var_names``, default all) is below ``threshold``:

    .. math:: d_{ij} = \Big(\frac1D \sum_{e=1}^D \frac{(\bar\theta_{ie} - \bar\theta_{je})^2}
              {\tfrac12(\hat\sigma^2_{ie} + \hat\sigma^2_{je})}\Big)^{1/2} < \text{threshold}

    (:math:`\bar\theta, \hat\sigma` a chain's mean and sd per entry); two chains in one mode differ
    by Monte Carlo error, :math:`d \approx \sqrt{2/\mathrm{ESS}}`. Modes are the connected components
    of that relation. Chains do not move between well-separated modes, so their share of the draws
    says nothing about a mode's posterior mass; each mode m gets the Gaussian estimate of its mass

    .. math:: \log Z_m \approx \overline{\log p(\theta, \mathcal D)}_m + \tfrac12 \log\det(2\pi e\, \Sigma_m),

    exact for a Gaussian mode (:math:`\Sigma_m` the covariance of its draws; it needs
    ``sample_stats.lp``), and the weight :math:`w_m = Z_m / \sum_{m'} Z_{m'}` among its member's modes.

    Returns one dict per mode: ``member``, ``chains`` (indices), ``mean`` and ``sd`` ``(D,)`` pooled
    over its chains, ``lp`` (mean log joint), ``log_mass`` (log Z_m) and ``weight``.
    """
    number("threshold", threshold, strict=True)
    modes = []
    stats = tree["sample_stats"] if "sample_stats" in tree.children else None
    lp = stats["lp"].values if stats is not None and "lp" in stats.data_vars else None
    for k, idx in _member_indices(tree).items():
        values = _flat_posterior(tree, idx, var_names)  # (c, S, D)
        means, variances = values.mean(1), values.var(1)
        parent = list(range(len(idx)))

        def root(i):
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for i in range(len(idx)):
            for j in range(i + 1, len(idx)):
                pooled = np.maximum(0.5 * (variances[i] + variances[j]), 1e-300)
                if np.sqrt(np.mean((means[i] - means[j]) ** 2 / pooled)) < threshold:
                    parent[root(i)] = root(j)
        groups = {}
        for i in range(len(idx)):
            groups.setdefault(root(i), []).append(i)
        member_modes = []
        for local in groups.values():
            chains = idx[local]
            pooled = values[local].reshape(-1, values.shape[-1])
            mean_lp = float(lp[chains].mean()) if lp is not None else float("nan")
            member_modes.append(
                {
                    "member": k,
                    "chains": [int(c) for c in chains],
                    "mean": pooled.mean(0),
                    "sd": pooled.std(0),
                    "lp": mean_lp,
                    "log_mass": mean_lp + _gaussian_log_volume(pooled),
                }
            )
        log_mass = np.array([m["log_mass"] for m in member_modes])
        if np.isfinite(log_mass).all():
            weights = np.exp(log_mass - log_mass.max())
            weights /= weights.sum()
        else:  # no lp: weigh the modes by their chains
            weights = np.array([len(m["chains"]) for m in member_modes], dtype=float)
            weights /= weights.sum()
        for m, w in zip(member_modes, weights):
            m["weight"] = float(w)
        modes += member_modes
    return modes


def concat_chains(trees) -> object:
    """Join DataTrees of :func:`hmc_to_datatree` along ``chain`` (e.g. one run per member, saved as it
    finished): every group that has a chain dim is concatenated and the chains renumbered 0..C-1."""
    import xarray as xr

    trees = list(trees)
    if not trees:
        raise ValueError("concat_chains: no trees given")
    if len(trees) == 1:
        return trees[0]
    out = trees[0].copy()
    for group in trees[0].children:
        datasets = [t[group].to_dataset() for t in trees]
        if "chain" not in datasets[0].dims:
            continue
        joined = xr.concat(datasets, dim="chain")
        out[group] = joined.assign_coords(chain=np.arange(joined.sizes["chain"]))
    out.attrs["num_chains"] = int(out["posterior"].sizes["chain"])
    out.attrs["members"] = sorted({int(k) for t in trees for k in t.attrs.get("members", [])})
    return out
