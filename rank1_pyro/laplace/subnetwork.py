r"""Subnetwork linearized Laplace (Daxberger et al., ICML 2021, "Bayesian Deep Learning via Subnetwork Inference").

Around a trained network :math:`f(\theta, x)` with MAP point :math:`\theta_*`, choose M of its P
weights, :math:`\theta_S` (a *subnetwork*), hold the rest at :math:`\theta_*` and place a
full-covariance Gaussian over :math:`\theta_S`:

.. math:: q(\theta_S) = \mathcal N\bigl(\theta_{S*},\ (H + \delta I)^{-1}\bigr), \qquad
          H = \sum_n J_n^\top \Lambda_n J_n \in \mathbb R^{M \times M},

H the GGN of the data's negative log-likelihood over :math:`\theta_S`, computed from the
subnetwork's Jacobian columns only (:mod:`rank1_pyro.laplace.curvature`), and δ the precision of
the prior :math:`\mathcal N(\mu_0, \delta^{-1} I)` on :math:`\theta_S`.

**Choosing the subnetwork** (:data:`SUBNETWORK_STRATEGIES`; every strategy returns a sorted
``LongTensor`` of indices into the flat θ of a :class:`~rank1_pyro.laplace.functional.FlatFunctional`,
the order of ``torch.nn.utils.parameters_to_vector`` for the default θ; a size is a count or a
fraction of P):

* ``"largest-variance"``: the M largest marginal variances :math:`1/(\operatorname{diag} H_{\rm full} + \delta)`
  of a diagonal Laplace over all P weights (the paper's choice); the exact GGN diagonal costs O
  backward passes per example and P numbers of memory.
* ``"largest-swag-variance"``: the M largest variances of diagonal SWAG, i.e. of the iterates of
  a short SGD run started at :math:`\theta_*` (see :func:`largest_swag_variance`; needs the
  training data and a few epochs).
* ``"largest-magnitude"``, ``"random"`` (seeded), ``"by-name"`` (``fnmatch`` patterns over
  parameter names), ``"last-layer"``, and ``"rank1-factors"``: the factor means ``factors.*`` of a
  :class:`~rank1_pyro.laplace.functional.Rank1PointNetwork` -- a full-covariance Laplace over all
  rank-1 factors.

**Prior precision.** The Laplace approximation of the log evidence, restricted to the subnetwork, is

.. math:: \log Z(\delta) = \log p(\mathcal D \mid \theta_*) - \tfrac\delta2 \lVert\theta_{S*} - \mu_0\rVert^2
          + \tfrac M2 \log\delta - \tfrac12 \log\lvert H + \delta I\rvert

(:math:`\log p(\theta_*)` with its normaliser, plus :math:`\frac M2 \log 2\pi - \frac12\log|H+\delta I|`;
exact for a linear-Gaussian model). With the eigenvalues :math:`\lambda_i` of H its derivative in
:math:`\log\delta` is :math:`\frac12\bigl(\sum_i \frac{\lambda_i}{\lambda_i + \delta} - \delta\lVert\theta_{S*}-\mu_0\rVert^2\bigr)`,
strictly decreasing, so the maximiser is its unique root (MacKay's
:math:`\delta = \gamma / \lVert\theta_{S*}-\mu_0\rVert^2`, γ the effective number of parameters), found by
bisection in :math:`\log\delta` (``method="marglik"``, the default). ``method="gridsearch"`` picks
δ from a grid by the NLL of the closed-form GLM predictive on validation data. H is
eigendecomposed once (float64), so δ can change at the cost of O(M²).

**Predictives** (``predictive=``), all through the :class:`~rank1_pyro.inference.predictive.Posterior`
protocol (``likelihood`` and ``sample_predictions(x, S)``), so :func:`~rank1_pyro.inference.predict`
and :mod:`rank1_pyro.metrics` apply unchanged:

* ``"glm"``: the linearized network :math:`f_{\rm lin}(\theta_S, x) = f(\theta_*, x) + J_S(x)(\theta_S - \theta_{S*})`
  in closed form: for classification the probit approximation
  :math:`\operatorname{softmax}\bigl(f_* / \sqrt{1 + \frac\pi8 \operatorname{diag}(J_S \Sigma J_S^\top)}\bigr)`,
  for regression the Gaussian :math:`\mathcal N(f_*, J_S \Sigma J_S^\top + \sigma^2)`. One "sample" (S = 1).
* ``"glm-mc"``: :math:`f_{\rm lin}` at S draws of :math:`\theta_S` (one JVP each).
* ``"nn"``: the network itself re-run at S draws.

The draws behind ``sample_predictions`` are cached (as standard-normal noise; :meth:`SubnetLaplace.clear_samples`
redraws), so every batch of one :func:`~rank1_pyro.inference.predict` call sees the same S
posterior samples. For a rank-1 point network (outputs ``(K·B, C)``, member-major), the K members
stay a mixture: predictions have shape ``(S, K, B, C)`` with K = ``ensemble_size``, and the GGN and
log-likelihood average the members (see :mod:`~rank1_pyro.laplace.curvature`).
"""

from __future__ import annotations

import fnmatch
import inspect
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jvp, vmap

from .._checks import one_of, positive_int
from .curvature import (
    DEFAULT_MAX_ELEMENTS,
    JACOBIAN_MODES,
    JacobianColumns,
    as_batches,
    ggn,
    likelihood_name,
)
from .functional import FlatFunctional, Rank1PointNetwork

__all__ = [
    "SubnetLaplace",
    "SUBNETWORK_STRATEGIES",
    "PREDICTIVES",
    "select_subnetwork",
    "subnetwork_size",
    "largest_variance",
    "largest_swag_variance",
    "largest_magnitude",
    "random_subnetwork",
    "by_name",
    "last_layer",
    "rank1_factors",
]

PREDICTIVES = ("glm", "glm-mc", "nn")
_PRIOR_METHODS = ("marglik", "gridsearch")


# ----------------------------------------------------------------------------- subnetwork selection


def subnetwork_size(size, total: int) -> int:
    """A count ``1 <= size <= total``, or a fraction in (0, 1] of ``total`` (rounded, at least 1)."""
    if isinstance(size, bool) or not isinstance(size, (int, float)):
        raise TypeError(f"size must be an int count or a float fraction, got {type(size).__name__}")
    if isinstance(size, float):
        if not 0.0 < size <= 1.0:
            raise ValueError(f"size: a fraction must lie in (0, 1], got {size!r}")
        return max(1, round(size * total))
    if not 1 <= size <= total:
        raise ValueError(f"size must lie in [1, {total}] (the number of parameters), got {size}")
    return size


def _top(scores: torch.Tensor, size) -> torch.Tensor:
    k = subnetwork_size(size, scores.numel())
    return torch.topk(scores, k, sorted=False).indices.sort().values.cpu()


def _tensor_indices(functional: FlatFunctional, names: list[str], size, strategy: str) -> torch.Tensor:
    """All entries of the parameter tensors ``names``, in θ's order."""
    if not names:
        raise ValueError(f"{strategy}: no parameter selected; the parameters are {functional.param_names}")
    starts = [0]
    for n in functional.numels:
        starts.append(starts[-1] + n)
    chosen = set(names)
    idx = torch.cat([torch.arange(starts[i], starts[i + 1]) for i, n in enumerate(functional.param_names) if n in chosen])
    if size is not None and subnetwork_size(size, functional.full_map.numel()) != idx.numel():
        raise ValueError(f"{strategy} selects all {idx.numel()} entries of {names}; leave the size unset")
    return idx


def largest_variance(functional: FlatFunctional, size, *, data, likelihood: str = "categorical",
                     sigma_noise: float = 1.0, prior_precision: float = 1.0,
                     max_elements: int = DEFAULT_MAX_ELEMENTS) -> torch.Tensor:
    r"""The ``size`` entries of θ with the largest variance :math:`1/(\operatorname{diag} H + \delta)`
    under a diagonal Laplace (exact GGN diagonal over all of θ on ``data``, δ = ``prior_precision``)."""
    if not prior_precision > 0:
        raise ValueError(f"prior_precision must be > 0, got {prior_precision!r}")
    diag = ggn(functional.restrict(None) if functional.indices is not None else functional, data, likelihood,
               sigma_noise, diagonal=True, max_elements=max_elements).matrix
    return _top(1.0 / (diag + prior_precision), size)


def largest_swag_variance(functional: FlatFunctional, size, *, data, likelihood: str = "categorical",
                          sigma_noise: float = 1.0, epochs: int = 2, lr: float = 1e-2, momentum: float = 0.9,
                          weight_decay: float = 0.0) -> torch.Tensor:
    r"""The ``size`` entries of θ with the largest variance under diagonal SWAG (Maddox et al., 2019).

    SWAG here is a short run of SGD (``lr``, ``momentum``, ``weight_decay``; constant learning rate)
    on the mean negative log-likelihood of ``data`` (a DataLoader re-iterated for ``epochs`` epochs,
    or one ``(x, y)`` batch), started at :math:`\theta_*` on a copy of θ (the network is not
    changed) with the network in eval mode. After every step the first two moments of θ are
    updated; the variance is :math:`\overline{\theta^2} - \bar\theta^2`. Rows of a K-member network
    are averaged as in the GGN.
    """
    positive_int("epochs", epochs)
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    likelihood = likelihood_name(likelihood)
    f = functional.restrict(None) if functional.indices is not None else functional
    theta = f.theta_map.requires_grad_(True)
    opt = torch.optim.SGD([theta], lr=lr, momentum=momentum, weight_decay=weight_decay)
    first = torch.zeros_like(theta, dtype=torch.float64)
    second = torch.zeros_like(first)
    steps = 0
    with torch.enable_grad():
        for _ in range(epochs):
            for x, y in as_batches(data):
                if y is None:
                    raise ValueError("largest-swag-variance needs targets: pass (x, y) batches")
                x, y = x.to(theta.device), y.to(theta.device)
                out = f(theta, x)
                y = y.repeat(out.shape[0] // x.shape[0], *([1] * (y.dim() - 1)))  # member-major rows
                if likelihood == "categorical":
                    loss = F.cross_entropy(out, y)
                else:
                    loss = 0.5 * ((out - y.reshape(out.shape)) ** 2).sum(-1).mean() / sigma_noise**2
                opt.zero_grad()
                loss.backward()
                opt.step()
                t = theta.detach().double()
                first += t
                second += t * t
                steps += 1
    if steps == 0:
        raise ValueError("data is empty")
    mean = first / steps
    return _top((second / steps - mean * mean).clamp_min(0.0), size)


def largest_magnitude(functional: FlatFunctional, size) -> torch.Tensor:
    r"""The ``size`` entries of θ with the largest :math:`|\theta_*|`."""
    return _top(functional.full_map.abs(), size)


def random_subnetwork(functional: FlatFunctional, size, *, seed: int = 0) -> torch.Tensor:
    """``size`` entries of θ drawn uniformly without replacement (``seed`` fixes them)."""
    total = functional.full_map.numel()
    k = subnetwork_size(size, total)
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    return perm[:k].sort().values


def by_name(functional: FlatFunctional, size=None, *, pattern) -> torch.Tensor:
    """All entries of the parameters whose names match ``pattern`` (a ``fnmatch`` pattern, e.g.
    ``"2.*"`` for module ``2``, ``"*.bias"``, or a list of patterns)."""
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"pattern must be a string or a list of strings, got {pattern!r}")
    names = [n for n in functional.param_names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    return _tensor_indices(functional, names, size, f"by-name {patterns}")


def last_layer(functional: FlatFunctional, size=None) -> torch.Tensor:
    """All entries of the last module (in registration order) that owns parameters of θ directly
    (parameter containers such as a rank-1 point network's ``factors`` do not count)."""
    owners = {}
    for mod_name, module in functional.module.named_modules():
        if isinstance(module, (nn.ParameterDict, nn.ParameterList)):
            continue
        for p_name, _ in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if full in functional.param_names:
                owners.setdefault(mod_name, []).append(full)
    if not owners:
        raise ValueError(f"last-layer: no module owns the parameters {functional.param_names}")
    return _tensor_indices(functional, owners[list(owners)[-1]], size, "last-layer")


def rank1_factors(functional: FlatFunctional, size=None) -> torch.Tensor:
    """All factor means (parameters ``factors.*``) of a rank-1 point network."""
    names = [n for n in functional.param_names if n.startswith("factors.")]
    if not names:
        raise ValueError("rank1-factors: θ has no 'factors.*' parameters (use rank1_point_network(model, guide))")
    return _tensor_indices(functional, names, size, "rank1-factors")


#: strategy name -> ``fn(functional, size, **options) -> sorted LongTensor`` (on the CPU)
SUBNETWORK_STRATEGIES: dict[str, Callable[..., torch.Tensor]] = {
    "largest-variance": largest_variance,
    "largest-swag-variance": largest_swag_variance,
    "largest-magnitude": largest_magnitude,
    "random": random_subnetwork,
    "by-name": by_name,
    "last-layer": last_layer,
    "rank1-factors": rank1_factors,
}


def select_subnetwork(strategy: str, functional: FlatFunctional, size=None, context: dict | None = None,
                      **options) -> torch.Tensor:
    """Indices chosen by the strategy named ``strategy`` (see :data:`SUBNETWORK_STRATEGIES`).

    ``options`` go to the strategy; ``context`` holds keyword arguments that are passed only to
    strategies that accept them (``data``, ``likelihood``, ``sigma_noise``, ``prior_precision``,
    ``max_elements``), so a caller can offer them all.
    """
    if strategy not in SUBNETWORK_STRATEGIES:
        raise ValueError(f"subnetwork: unknown strategy {strategy!r}; valid: {list(SUBNETWORK_STRATEGIES)}")
    fn = SUBNETWORK_STRATEGIES[strategy]
    accepted = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in (context or {}).items() if k in accepted and k not in options}
    if "data" in accepted and kwargs.get("data", options.get("data")) is None:
        raise ValueError(f"subnetwork strategy {strategy!r} needs the training data")
    return fn(functional, size, **kwargs, **options)


# ----------------------------------------------------------------------------- the posterior


def _eigh_psd(H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (clamped at 0: H is PSD up to rounding) and eigenvectors of a GGN.

    Rows of H that are exactly zero (weights without curvature, e.g. on inputs that are always 0,
    which ``"largest-variance"`` favours) are split off as eigenvalue 0 with a unit eigenvector;
    LAPACK's ``syevd`` can fail to converge on matrices made mostly of them. If it still fails,
    the SVD (equal to the eigendecomposition for a PSD matrix) is used.
    """
    M = H.shape[0]
    active = (H != 0).any(0).nonzero().squeeze(1)
    eigvals = H.new_zeros(M)
    eigvecs = H.new_zeros(M, M)
    inactive = torch.ones(M, dtype=torch.bool, device=H.device)
    inactive[active] = False
    rest = inactive.nonzero().squeeze(1)
    eigvecs[rest, torch.arange(rest.numel(), device=H.device)] = 1.0
    if active.numel():
        block = H[active][:, active]
        try:
            lam, vec = torch.linalg.eigh(block)
        except torch.linalg.LinAlgError:
            vec, lam, _ = torch.linalg.svd(block)
        cols = torch.arange(rest.numel(), M, device=H.device)
        eigvals[cols] = lam.clamp_min(0.0)
        eigvecs[active.unsqueeze(1), cols.unsqueeze(0)] = vec
    return eigvals, eigvecs


def _positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


class SubnetLaplace:
    r"""Full-covariance linearized Laplace over a subnetwork of a trained network.

    Args:
        model: the trained (MAP) network mapping a batch to outputs ``(B, O)`` (logits or
            regression means), or a :class:`~rank1_pyro.laplace.functional.Rank1PointNetwork`.
        likelihood: ``"classification"`` (or ``"categorical"``) or ``"regression"`` (``"normal"``);
            :attr:`likelihood` holds the library's name.
        subnetwork: a strategy name from :data:`SUBNETWORK_STRATEGIES` (applied in :meth:`fit`) or
            indices into the flat θ (``param_names`` order).
        subnetwork_size: count or fraction for a strategy (``None`` for the structural ones).
        prior_precision: δ; ``None`` (default) sets it in :meth:`fit` by the marginal likelihood.
        sigma_noise: observation noise stddev (regression); default 1, or the model's own for a
            rank-1 point network. Must stay 1 (or ``None``) for classification.
        prior_mean: μ0 of the prior on :math:`\theta_S`: a number, an ``(M,)`` tensor, or a ``(P,)``
            tensor over all of θ (sliced to the chosen subnetwork), e.g. 1 on rank-1 factors.
        param_names: the parameter tensors making up θ (default: all trainable ones).
        predictive: ``"glm"``, ``"glm-mc"`` or ``"nn"`` (module docstring); can be changed later.
        jacobian_mode: ``"auto"``, ``"forward"``, ``"reverse"`` (:mod:`~rank1_pyro.laplace.curvature`).
        max_block_elements: soft bound on the numbers in one block of Jacobian entries.
        selection_options: keyword arguments of the strategy (e.g. ``{"seed": 1}``,
            ``{"pattern": "2.*"}``, ``{"epochs": 3}``). The variance strategies get the data,
            likelihood, σ and δ (1 while δ is unset) from here.
        chunk_size: posterior samples pushed through one vmapped forward/JVP.

    Typical use::

        la = SubnetLaplace(net, "classification", "largest-variance", subnetwork_size=1000).fit(train_loader)
        pred = predict(la, x_test)           # rank1_pyro.inference.predict
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str = "classification",
        subnetwork="largest-variance",
        subnetwork_size=None,
        prior_precision: float | None = None,
        sigma_noise: float | None = None,
        *,
        prior_mean=0.0,
        param_names=None,
        predictive: str = "glm",
        jacobian_mode: str = "auto",
        max_block_elements: int = DEFAULT_MAX_ELEMENTS,
        selection_options: dict | None = None,
        chunk_size: int = 32,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.likelihood = likelihood_name(likelihood)
        self.ensemble_size = model.ensemble_size if isinstance(model, Rank1PointNetwork) else 1
        if self.likelihood == "categorical":
            if sigma_noise not in (None, 1, 1.0):
                raise ValueError(f"sigma_noise must be 1 for classification, got {sigma_noise!r}")
            sigma_noise = 1.0
        elif sigma_noise is None:
            sigma_noise = float(model.model.noise_scale()) if isinstance(model, Rank1PointNetwork) else 1.0
        self.sigma_noise = _positive("sigma_noise", sigma_noise)
        self._prior_precision = None if prior_precision is None else _positive("prior_precision", prior_precision)
        self.predictive = predictive
        self.jacobian_mode = one_of("jacobian_mode", jacobian_mode, JACOBIAN_MODES)
        self.max_block_elements = positive_int("max_block_elements", max_block_elements)
        self.chunk_size = positive_int("chunk_size", chunk_size)
        if selection_options is not None and not isinstance(selection_options, dict):
            raise TypeError(f"selection_options must be a dict, got {type(selection_options).__name__}")
        self.selection_options = dict(selection_options or {})
        self.full = FlatFunctional(model, param_names)
        self.strategy: str | None = None
        self.subnetwork_size = subnetwork_size
        self._sub: FlatFunctional | None = None
        if isinstance(subnetwork, str):
            if subnetwork not in SUBNETWORK_STRATEGIES:
                raise ValueError(f"subnetwork: unknown strategy {subnetwork!r}; valid: {list(SUBNETWORK_STRATEGIES)}")
            self.strategy = subnetwork
        else:
            if subnetwork_size is not None:
                raise ValueError("subnetwork_size is only used with a strategy name; got indices")
            self._set_subnetwork(torch.as_tensor(subnetwork))
        self._prior_mean_arg = prior_mean
        self._reset_fit()

    # -- state ----------------------------------------------------------------------------
    def _reset_fit(self) -> None:
        self.H: torch.Tensor | None = None
        self.log_likelihood: float | None = None
        self.num_data: int | None = None
        self._eigvals = self._eigvecs = None
        self._sqrt_cov = None
        self._bank: torch.Tensor | None = None

    def _set_subnetwork(self, indices: torch.Tensor) -> None:
        if indices.dtype not in (torch.int64, torch.int32) or indices.dim() != 1:
            raise ValueError(f"subnetwork indices must be a 1-D integer tensor, got {indices.dtype} {tuple(indices.shape)}")
        self._jac = JacobianColumns(self.full.restrict(indices), self.jacobian_mode, self.max_block_elements)
        self._sub = self._jac.f
        self._indices = indices.to(torch.long).cpu()

    @property
    def device(self) -> torch.device:
        return self.full.full_map.device

    @property
    def subnetwork_indices(self) -> torch.Tensor:
        """Indices of the subnetwork into the flat θ (CPU ``LongTensor``)."""
        self._check_subnetwork()
        return self._indices.clone()

    @property
    def num_params(self) -> int:
        """M, the size of the subnetwork."""
        self._check_subnetwork()
        return self._indices.numel()

    @property
    def theta_map(self) -> torch.Tensor:
        r""":math:`\theta_{S*}`, the subnetwork's MAP values."""
        self._check_subnetwork()
        return self._sub.theta_map

    @property
    def prior_mean(self) -> torch.Tensor:
        r""":math:`\mu_0` over the subnetwork ``(M,)``."""
        mean = torch.as_tensor(self._prior_mean_arg, dtype=self.full.full_map.dtype, device=self.device)
        if mean.dim() == 1 and mean.numel() == self.full.num_params:
            return mean[self._indices.to(self.device)]
        if mean.dim() > 1 or (mean.dim() == 1 and mean.numel() != self.num_params):
            raise ValueError(f"prior_mean must be a number, a ({self.num_params},) tensor over the subnetwork or a "
                             f"({self.full.num_params},) tensor over all of theta, got shape {tuple(mean.shape)}")
        return mean.expand(self.num_params)

    @property
    def predictive(self) -> str:
        return self._predictive

    @predictive.setter
    def predictive(self, value: str) -> None:
        self._predictive = one_of("predictive", value, PREDICTIVES)

    @property
    def prior_precision(self) -> float:
        """δ, the prior precision of :math:`\\theta_S`."""
        if self._prior_precision is None:
            raise RuntimeError("prior_precision is not set: pass it, call fit() or optimize_prior_precision()")
        return self._prior_precision

    @prior_precision.setter
    def prior_precision(self, value: float) -> None:
        self._prior_precision = _positive("prior_precision", value)
        self._sqrt_cov = None

    def _check_subnetwork(self) -> None:
        if self._sub is None:
            raise RuntimeError(f"the subnetwork is chosen by strategy {self.strategy!r} in fit(); call fit() first")

    def _check_fitted(self) -> None:
        if self.H is None:
            raise RuntimeError("call fit(train_loader) first")

    # -- fitting ---------------------------------------------------------------------------
    def fit(self, train_loader) -> "SubnetLaplace":
        """Choose the subnetwork (for a strategy), compute H and the log-likelihood on the
        training data (a DataLoader of ``(x, y)`` batches, or ``(x, y)`` tensors) and, unless δ
        was given, set δ by the marginal likelihood."""
        if self.strategy is not None:
            context = {
                "data": train_loader,
                "likelihood": self.likelihood,
                "sigma_noise": self.sigma_noise,
                "prior_precision": self._prior_precision or 1.0,
                "max_elements": self.max_block_elements,
            }
            indices = select_subnetwork(self.strategy, self.full, self.subnetwork_size, context, **self.selection_options)
            self._set_subnetwork(indices)
        self._reset_fit()
        curv = ggn(self._sub, train_loader, self.likelihood, self.sigma_noise, jacobians=self._jac)
        if curv.log_likelihood is None:
            raise ValueError("train_loader must yield (x, y) batches: the marginal likelihood needs targets")
        if curv.num_members != self.ensemble_size:
            raise ValueError(f"the network gives {curv.num_members} output rows per input, expected {self.ensemble_size}")
        self.H, self.log_likelihood, self.num_data = curv.matrix, curv.log_likelihood, curv.num_data
        self._eigvals, self._eigvecs = _eigh_psd(self.H.double())
        if self._prior_precision is None:
            self.optimize_prior_precision("marglik")
        return self

    def log_marginal_likelihood(self, prior_precision=None) -> torch.Tensor:
        r""":math:`\log Z(\delta)` of the module docstring, in float64, at the current δ or at
        ``prior_precision`` (a number, or a tensor of δ values of any shape, evaluated elementwise
        and differentiably)."""
        self._check_fitted()
        delta = self.prior_precision if prior_precision is None else prior_precision
        if isinstance(delta, bool) or not (torch.is_tensor(delta) or isinstance(delta, (int, float))):
            raise TypeError(f"prior_precision must be a number or a tensor, got {type(delta).__name__}")
        delta = torch.as_tensor(delta, dtype=torch.float64, device=self.device)
        if not bool(((delta > 0) & torch.isfinite(delta)).all()):
            raise ValueError(f"prior_precision must be > 0 and finite, got {delta.tolist()}")
        diff = (self.theta_map - self.prior_mean).double()
        return (self.log_likelihood - 0.5 * delta * diff.pow(2).sum() + 0.5 * self.num_params * delta.log()
                - 0.5 * torch.log(self._eigvals + delta.unsqueeze(-1)).sum(-1))

    def optimize_prior_precision(self, method: str = "marglik", val_loader=None, grid=None) -> float:
        r"""Set δ by ``"marglik"`` (the root of :math:`\partial\log Z/\partial\log\delta`, by bisection) or
        ``"gridsearch"`` (lowest NLL of the closed-form GLM predictive on ``val_loader`` over ``grid``,
        default ``logspace(-4, 4, 41)``). Returns δ."""
        self._check_fitted()
        one_of("method", method, _PRIOR_METHODS)
        if method == "marglik":
            self.prior_precision = self._marglik_root()
        else:
            if val_loader is None:
                raise ValueError("method='gridsearch' needs val_loader")
            grid = torch.logspace(-4, 4, 41, dtype=torch.float64) if grid is None else torch.as_tensor(grid, dtype=torch.float64)
            if grid.dim() != 1 or grid.numel() == 0 or not bool((grid > 0).all()):
                raise ValueError("grid must be a non-empty 1-D sequence of positive numbers")
            nll = self._grid_nll(val_loader, grid)
            self.prior_precision = float(grid[int(torch.argmin(nll))])
        return self.prior_precision

    def _marglik_root(self) -> float:
        lam = self._eigvals
        sq = (self.theta_map - self.prior_mean).double().pow(2).sum().item()
        if sq == 0.0:
            raise ValueError("the marginal likelihood grows without bound in delta: theta_MAP equals the prior mean")
        if float(lam.max()) <= 0.0:
            raise ValueError("the marginal likelihood grows without bound as delta -> 0: H is zero on the subnetwork")

        def slope(t: float) -> float:  # 2 d log Z / d log δ
            d = math.exp(t)
            return float((lam / (lam + d)).sum()) - d * sq

        lo, hi = -10.0, 10.0
        while slope(lo) <= 0.0:
            lo -= 10.0
        while slope(hi) >= 0.0:
            hi += 10.0
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if slope(mid) > 0.0 else (lo, mid)
            if hi - lo < 1e-13:
                break
        return math.exp(0.5 * (lo + hi))

    @torch.no_grad()
    def _grid_nll(self, data, grid: torch.Tensor) -> torch.Tensor:
        """Summed NLL of the closed-form GLM predictive for every δ of ``grid`` (one Jacobian pass)."""
        total = torch.zeros(grid.numel(), dtype=torch.float64)
        V, lam = self._eigvecs.to(self.device), self._eigvals.to(self.device)
        for x, y in as_batches(data):
            if y is None:
                raise ValueError("val_loader must yield (x, y) batches")
            x, y = x.to(self.device), y.to(self.device)
            for start, out, J in self._jac.blocks(x):
                yb = y[start:start + out.shape[1]]
                proj = (J.double() @ V).pow(2)  # (K, b, O, M): squared coordinates in H's eigenbasis
                for g, delta in enumerate(grid.tolist()):
                    var = proj @ (1.0 / (lam + delta))  # (K, b, O)
                    total[g] -= self._closed_form_loglik(out.double(), var, yb).cpu()
        return total

    def _closed_form_loglik(self, mean: torch.Tensor, var: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Summed log predictive density of the closed-form GLM predictive (members mixed)."""
        if self.likelihood == "categorical":
            probs = self._probit(mean, var).mean(0)  # (b, C)
            return probs.gather(-1, y.long().unsqueeze(-1)).clamp_min(1e-300).log().sum()
        var = var + self.sigma_noise**2
        dens = torch.exp(-0.5 * (y.reshape(mean.shape[1:]).double() - mean) ** 2 / var) / torch.sqrt(2 * math.pi * var)
        return dens.prod(-1).mean(0).clamp_min(1e-300).log().sum()

    @staticmethod
    def _probit(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        return torch.softmax(mean / torch.sqrt(1.0 + math.pi / 8.0 * var), dim=-1)

    # -- the Gaussian over θ_S -------------------------------------------------------------
    @property
    def posterior_precision(self) -> torch.Tensor:
        r""":math:`H + \delta I` ``(M, M)``."""
        self._check_fitted()
        return self.H + self.prior_precision * torch.eye(self.num_params, dtype=self.H.dtype, device=self.H.device)

    @property
    def posterior_covariance(self) -> torch.Tensor:
        r""":math:`(H + \delta I)^{-1}` ``(M, M)``, from the eigendecomposition of H."""
        S = self._scale()
        return S @ S.T

    def _scale(self) -> torch.Tensor:
        r""":math:`V \operatorname{diag}(\lambda + \delta)^{-1/2}`, a square root of the covariance."""
        self._check_fitted()
        if self._sqrt_cov is None:
            S = self._eigvecs * (self._eigvals + self.prior_precision).rsqrt()
            self._sqrt_cov = S.to(self.H.dtype)
        return self._sqrt_cov

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        r"""Draws of :math:`\theta_S \sim \mathcal N(\theta_{S*}, (H + \delta I)^{-1})`: ``(num_samples, M)``."""
        positive_int("num_samples", num_samples)
        S = self._scale()
        eps = torch.randn(num_samples, self.num_params, generator=generator, dtype=S.dtype, device=S.device)
        return self.theta_map + eps @ S.T

    def clear_samples(self) -> None:
        """Forget the cached draws behind :meth:`sample_predictions`."""
        self._bank = None

    def _deltas(self, num_samples: int) -> torch.Tensor:
        S = self._scale()
        have = 0 if self._bank is None else self._bank.shape[0]
        if num_samples > have:
            new = torch.randn(num_samples - have, self.num_params, dtype=S.dtype, device=S.device)
            self._bank = new if self._bank is None else torch.cat([self._bank, new])
        return self._bank[:num_samples] @ S.T

    # -- predictives -----------------------------------------------------------------------
    def _check_x(self, x) -> torch.Tensor:
        if not torch.is_tensor(x) or x.dim() == 0 or x.shape[0] == 0:
            raise ValueError("x must be a non-empty batch (B, ...)")
        return x.to(self.device)

    @torch.no_grad()
    def glm_mean_variance(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Mean :math:`f(\theta_*, x)` and marginal variances :math:`\operatorname{diag}(J_S \Sigma J_S^\top)`
        of the linearized network, both ``(K, B, O)``."""
        x = self._check_x(x)
        S = self._scale()
        means, variances = [], []
        for _, out, J in self._jac.blocks(x):
            means.append(out)
            variances.append((J @ S).pow(2).sum(-1))
        return torch.cat(means, dim=1), torch.cat(variances, dim=1)

    @torch.no_grad()
    def sample_outputs(self, x: torch.Tensor, num_samples: int) -> torch.Tensor:
        """Outputs at ``num_samples`` cached posterior draws, ``(S, K, B, O)``: the linearized
        network (``"glm-mc"``) or the network itself (``"nn"``)."""
        positive_int("num_samples", num_samples)
        x = self._check_x(x)
        deltas = self._deltas(num_samples)
        theta = self.theta_map
        f = self._sub
        outs = []
        for D in deltas.split(self.chunk_size):
            if self.predictive == "nn":
                outs.append(vmap(lambda d: f(theta + d, x))(D))
            else:
                out, jd = vmap(lambda d: jvp(lambda t: f(t, x), (theta,), (d,)))(D)
                outs.append(out + jd)
        out = torch.cat(outs)
        return out.reshape(num_samples, self.ensemble_size, x.shape[0], out.shape[-1])

    def sample_predictions(self, x: torch.Tensor, num_samples: int) -> torch.Tensor:
        """Probabilities ``(S, K, B, C)`` or Gaussian (mean, variance) pairs ``(S, K, B, 2)``;
        ``S = 1`` for the closed-form ``"glm"`` predictive."""
        positive_int("num_samples", num_samples)
        if self.predictive == "glm":
            mean, var = self.glm_mean_variance(x)
            if self.likelihood == "categorical":
                return self._probit(mean, var).unsqueeze(0)
            self._check_one_output(mean)
            return torch.stack([mean.squeeze(-1), var.squeeze(-1) + self.sigma_noise**2], dim=-1).unsqueeze(0)
        out = self.sample_outputs(x, num_samples)
        if self.likelihood == "categorical":
            return torch.softmax(out, dim=-1)
        self._check_one_output(out)
        mean = out.squeeze(-1)
        return torch.stack([mean, torch.full_like(mean, self.sigma_noise**2)], dim=-1)

    @staticmethod
    def _check_one_output(out: torch.Tensor) -> None:
        if out.shape[-1] != 1:
            raise ValueError(f"likelihood='normal' predictions need one output per example, got {out.shape[-1]}")

    def __repr__(self) -> str:
        sub = f"strategy={self.strategy!r}" if self._sub is None else f"num_params={self.num_params}"
        prior = "unset" if self._prior_precision is None else f"{self._prior_precision:.4g}"
        return (f"{type(self).__name__}({sub}, likelihood={self.likelihood!r}, prior_precision={prior}, "
                f"predictive={self.predictive!r}, {'unfitted' if self.H is None else f'fitted on {self.num_data}'})")
