r"""Subnetwork linearized Laplace (Daxberger et al., ICML 2021, "Bayesian Deep Learning via Subnetwork Inference").

Around a trained network :math:`f(\theta, x)` with MAP point :math:`\theta_*`, choose M of its P
weights, :math:`\theta_S` (a *subnetwork*), hold the rest at :math:`\theta_*` and place a
full-covariance Gaussian over :math:`\theta_S`:

.. math:: q(\theta_S) = \mathcal N\bigl(\theta_{S*},\ (H + \delta I)^{-1}\bigr), \qquad
          H = \sum_n J_n^\top \Lambda_n J_n \in \mathbb R^{M \times M},

H the GGN of the data's negative log-likelihood over :math:`\theta_S`, computed from the
subnetwork's Jacobian columns only (:mod:`rank1_pyro.laplace.curvature`), and δ the precision of
the prior :math:`\mathcal N(\mu_0, \delta^{-1} I)` on :math:`\theta_S`.

**Choosing the subnetwork**: a strategy name of :data:`~rank1_pyro.laplace.selection.SUBNETWORK_STRATEGIES`
(the M largest marginal variances of a diagonal Laplace, skipping weights without curvature, or of
diagonal SWAG; largest magnitudes; random; by name; the last layer; all rank-1 factors), applied in
:meth:`SubnetLaplace.fit` (see :mod:`rank1_pyro.laplace.selection` for their definitions), or the
indices themselves, into the flat θ of a :class:`~rank1_pyro.laplace.functional.FlatFunctional`.

**Prior precision.** The Laplace approximation of the log evidence, restricted to the subnetwork, is

.. math:: \log Z(\delta) = \log p(\mathcal D \mid \theta_*) - \tfrac\delta2 \lVert\theta_{S*} - \mu_0\rVert^2
          + \tfrac M2 \log\delta - \tfrac12 \log\lvert H + \delta I\rvert

(:math:`\log p(\theta_*)` with its normaliser, plus :math:`\frac M2 \log 2\pi - \frac12\log|H+\delta I|`;
exact for a linear-Gaussian model). With the eigenvalues :math:`\lambda_i` of H its derivative in
:math:`\log\delta` is :math:`\frac12\bigl(\sum_i \frac{\lambda_i}{\lambda_i + \delta} - \delta\lVert\theta_{S*}-\mu_0\rVert^2\bigr)`,
strictly decreasing, so the maximiser is its unique root (MacKay's
:math:`\delta = \gamma / \lVert\theta_{S*}-\mu_0\rVert^2`, γ the effective number of parameters), found by
bisection in :math:`\log\delta` (``method="marglik"``, the default). ``method="gridsearch"`` picks
δ from a grid by the NLL of the closed-form GLM predictive on validation data (one Cholesky
factorisation per δ). Only H's eigenvalues are computed (once, when first needed: no
eigenvectors, whose LAPACK workspace alone is two more M × M matrices), so log Z(δ) costs O(M)
for any δ. The posterior itself uses the Cholesky factor of :math:`H + \delta I`, computed in
place in one buffer: a fit keeps at most two M × M matrices (H and the factor) alive, in
``dtype`` (float64 by default, float32 to halve that).

**Predictives** (``predictive=``), all through the :class:`~rank1_pyro.inference.predictive.Posterior`
protocol (``likelihood`` and ``sample_predictions(x, S)``), so :func:`~rank1_pyro.inference.predict`
and :mod:`rank1_pyro.metrics` apply unchanged:

* ``"glm"``: the linearized network :math:`f_{\rm lin}(\theta_S, x) = f(\theta_*, x) + J_S(x)(\theta_S - \theta_{S*})`
  in closed form: for classification the probit approximation
  :math:`\operatorname{softmax}\bigl(f_* / \sqrt{1 + \frac\pi8 \operatorname{diag}(J_S \Sigma J_S^\top)}\bigr)`,
  for regression the Gaussian :math:`\mathcal N(f_*, J_S \Sigma J_S^\top + \sigma^2)`. One "sample" (S = 1).
* ``"glm-mc"``: :math:`f_{\rm lin}` at S draws of :math:`\theta_S` (one JVP each).
* ``"nn"``: the network itself re-run at S draws.

The draws behind ``sample_predictions`` are cached (as standard-normal noise ε, each draw
:math:`\theta_{S*} + L^{-\top}\varepsilon`; :meth:`SubnetLaplace.clear_samples` redraws), so every
batch of one :func:`~rank1_pyro.inference.predict` call sees the same S posterior samples
(:mod:`~rank1_pyro.laplace.base`). For a rank-1 point network (outputs ``(K·B, C)``, member-major),
the K members stay a mixture: predictions have shape ``(S, K, B, C)`` with K = ``ensemble_size``,
and the GGN and log-likelihood average the members (see :mod:`~rank1_pyro.laplace.curvature`).

**Saving.** :meth:`~rank1_pyro.laplace.base.PostHocPosterior.state_dict` holds the subnetwork's
indices, H, δ, the log-likelihood, N, the settings and the cached ε; the Cholesky factor and the
eigenvalues are recomputed from H when first needed, so a loaded posterior predicts exactly as the
saved one (:meth:`~rank1_pyro.laplace.base.PostHocPosterior.save`, :meth:`~rank1_pyro.laplace.base.PostHocPosterior.load`).

One concept, one module (hence over 400 lines): the subnetwork linearized Laplace: its fit, marginal likelihood and predictives.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._checks import one_of, positive_int
from .base import PostHocPosterior, batches
from .curvature import DEFAULT_MAX_ELEMENTS, JACOBIAN_MODES, JacobianColumns, ggn
from .functional import FlatFunctional, Rank1PointNetwork
from .selection import (
    SUBNETWORK_STRATEGIES,
    by_name,
    largest_magnitude,
    largest_swag_variance,
    largest_variance,
    last_layer,
    random_subnetwork,
    rank1_factors,
    select_subnetwork,
    subnetwork_size,
)

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


# ----------------------------------------------------------------------------- the posterior


def _eigvalsh_psd(H: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a GGN (float64, clamped at 0: H is PSD up to rounding), without eigenvectors.

    ``torch.linalg.eigvalsh`` works on one internal copy of H (LAPACK ``syevd`` without vectors
    needs only O(M) workspace), so this costs one transient ``(M, M)`` matrix. If it fails to
    converge (rows that are exactly zero, weights without curvature, are the usual suspects),
    the eigenvalues of the block of nonzero rows are used (zeros for the rest), and if that
    fails too, its singular values (equal for a PSD matrix).
    """
    try:
        return torch.linalg.eigvalsh(H, UPLO="U").double().clamp_min(0.0)
    except torch.linalg.LinAlgError:
        pass
    active = (H != 0).any(0).nonzero().squeeze(1)
    eigvals = torch.zeros(H.shape[0], dtype=torch.float64, device=H.device)
    if active.numel():
        block = H[active][:, active]
        try:
            lam = torch.linalg.eigvalsh(block)
        except torch.linalg.LinAlgError:
            lam = torch.linalg.svdvals(block)
        eigvals[: active.numel()] = lam.double().clamp_min(0.0)
    return eigvals


def _cholesky_into(out: torch.Tensor, H: torch.Tensor, delta: float) -> torch.Tensor:
    r"""The Cholesky factor of :math:`H + \delta I`, computed in place in ``out`` (``(M, M)``,
    row-major, reused across δ); returns the lower factor L (a column-major view of ``out``).

    ``out`` is filled with H + δI and LAPACK's ``potrf`` runs on it directly: ``out.mT`` is
    column-major, so ``cholesky_ex`` with ``out=out.mT`` needs no copy (one ``(M, M)`` matrix for
    the factor, beside H).
    """
    out.copy_(H)
    out.diagonal().add_(delta)
    L = out.mT
    factor, info = torch.linalg.cholesky_ex(L, out=(L, torch.empty((), dtype=torch.int32, device=out.device)))
    if factor.data_ptr() != out.data_ptr():  # a torch that does not factor in place (costs a copy)
        L.copy_(factor)
    if int(info) != 0:
        raise torch.linalg.LinAlgError(
            f"H + {delta:.3g} I is not positive definite in {out.dtype} (leading minor {int(info)}): "
            f"use dtype=torch.float64 or a larger prior_precision"
        )
    return L


def _positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


class SubnetLaplace(PostHocPosterior):
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
        dtype: the floating dtype of the ``(M, M)`` matrices: H (accumulated in it), its
            eigenvalues and the Cholesky factor of :math:`H + \delta I`. ``torch.float64`` (default)
            or ``torch.float32`` (half the memory; the factorisation fails for a δ too small
            against H at float32 precision). Outputs (covariance, draws, variances) come in the
            network's dtype.

    **Memory.** A fit holds H; the eigenvalues (for the marginal likelihood, computed when first
    needed) cost one transient copy of H; predictions and draws use the Cholesky factor of
    :math:`H + \delta I`, one more ``(M, M)`` matrix kept beside H and refactored in place when δ
    changes. So at most two ``(M, M)`` matrices of ``dtype`` are alive at once (the dense
    :attr:`posterior_covariance` and :attr:`posterior_precision` are new matrices on request).

    Typical use::

        la = SubnetLaplace(net, "classification", "largest-variance", subnetwork_size=1000).fit(train_loader)
        pred = predict(la, x_test)           # rank1_pyro.inference.predict
        la.save("laplace.pt")                # later: SubnetLaplace.load("laplace.pt", net)
    """

    KIND = "laplace"
    PREDICTIVES = PREDICTIVES

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
        dtype: torch.dtype = torch.float64,
    ):
        self._init_common(model, likelihood, predictive, chunk_size)
        if self.likelihood == "categorical":
            if sigma_noise not in (None, 1, 1.0):
                raise ValueError(f"sigma_noise must be 1 for classification, got {sigma_noise!r}")
            sigma_noise = 1.0
        elif sigma_noise is None:
            sigma_noise = float(model.model.noise_scale().detach()) if isinstance(model, Rank1PointNetwork) else 1.0
        self.sigma_noise = _positive("sigma_noise", sigma_noise)
        self._prior_precision = None if prior_precision is None else _positive("prior_precision", prior_precision)
        self.jacobian_mode = one_of("jacobian_mode", jacobian_mode, JACOBIAN_MODES)
        self.max_block_elements = positive_int("max_block_elements", max_block_elements)
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
        self.dtype = dtype
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
        self._eigvals: torch.Tensor | None = None
        self._chol: torch.Tensor | None = None  # (M, M) buffer: the Cholesky factor of H + δ I
        self._chol_delta: float | None = None  # the δ it holds the factor for
        self._bank: torch.Tensor | None = None

    def _set_subnetwork(self, indices: torch.Tensor) -> None:
        if indices.dtype not in (torch.int64, torch.int32) or indices.dim() != 1:
            raise ValueError(
                f"subnetwork indices must be a 1-D integer tensor, got {indices.dtype} {tuple(indices.shape)}"
            )
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
            raise ValueError(
                f"prior_mean must be a number, a ({self.num_params},) tensor over the subnetwork or a "
                f"({self.full.num_params},) tensor over all of theta, got shape {tuple(mean.shape)}"
            )
        return mean.expand(self.num_params)

    @property
    def prior_precision(self) -> float:
        """δ, the prior precision of :math:`\\theta_S`."""
        if self._prior_precision is None:
            raise RuntimeError("prior_precision is not set: pass it, call fit() or optimize_prior_precision()")
        return self._prior_precision

    @prior_precision.setter
    def prior_precision(self, value: float) -> None:
        self._prior_precision = _positive("prior_precision", value)

    def _check_subnetwork(self) -> None:
        if self._sub is None:
            raise RuntimeError(f"the subnetwork is chosen by strategy {self.strategy!r} in fit(); call fit() first")

    def _check_fitted(self) -> None:
        if self.H is None:
            raise RuntimeError("call fit(train_loader) first")

    # -- fitting ---------------------------------------------------------------------------
    def fit(self, train_loader) -> SubnetLaplace:
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
            indices = select_subnetwork(
                self.strategy, self.full, self.subnetwork_size, context, **self.selection_options
            )
            self._set_subnetwork(indices)
        self._reset_fit()
        curv = ggn(self._sub, train_loader, self.likelihood, self.sigma_noise, jacobians=self._jac, dtype=self.dtype)
        if curv.log_likelihood is None:
            raise ValueError("train_loader must yield (x, y) batches: the marginal likelihood needs targets")
        if curv.num_members != self.ensemble_size:
            raise ValueError(
                f"the network gives {curv.num_members} output rows per input, expected {self.ensemble_size}"
            )
        self.H, self.log_likelihood, self.num_data = curv.matrix, curv.log_likelihood, curv.num_data
        del curv
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
        return (
            self.log_likelihood
            - 0.5 * delta * diff.pow(2).sum()
            + 0.5 * self.num_params * delta.log()
            - 0.5 * torch.log(self._eigenvalues().to(self.device) + delta.unsqueeze(-1)).sum(-1)
        )

    def _eigenvalues(self) -> torch.Tensor:
        """The eigenvalues of H (float64, computed once per fit). Their transient copy of H takes
        the place of the Cholesky factor, which is dropped first (and refactored when needed)."""
        self._check_fitted()
        if self._eigvals is None:
            self._chol = self._chol_delta = None
            self._eigvals = _eigvalsh_psd(self.H)
        return self._eigvals

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
            grid = (
                torch.logspace(-4, 4, 41, dtype=torch.float64)
                if grid is None
                else torch.as_tensor(grid, dtype=torch.float64)
            )
            if grid.dim() != 1 or grid.numel() == 0 or not bool((grid > 0).all()):
                raise ValueError("grid must be a non-empty 1-D sequence of positive numbers")
            nll = self._grid_nll(val_loader, grid)
            self.prior_precision = float(grid[int(torch.argmin(nll))])
        return self.prior_precision

    def _marglik_root(self) -> float:
        lam = self._eigenvalues()
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
        """Summed NLL of the closed-form GLM predictive for every δ of ``grid``: one Cholesky
        factor of H + δI per δ, in the factor's buffer. The validation Jacobian blocks are
        computed once and kept while they hold at most M²/4 numbers, else recomputed per δ."""
        val = []
        for x, y in batches(data):
            if y is None:
                raise ValueError("val_loader must yield (x, y) batches")
            val.append((x.to(self.device), y.to(self.device)))

        def blocks():
            for x, y in val:
                for start, out, J in self._jac.blocks(x):
                    yield out, J, y[start : start + out.shape[1]]

        cache, kept, budget = [], 0, self.num_params**2 // 4
        for block in blocks():
            kept += block[1].numel()
            if kept > budget:
                cache = None
                break
            cache.append(block)
        total = torch.zeros(grid.numel(), dtype=torch.float64)
        for g, delta in enumerate(grid.tolist()):
            L = self._factor(delta)
            for out, J, yb in cache if cache is not None else blocks():
                total[g] -= self._closed_form_loglik(out.double(), self._variance(J, L).double(), yb).cpu()
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
        r""":math:`H + \delta I` ``(M, M)`` (a new matrix, in the network's dtype)."""
        self._check_fitted()
        P = self.H.to(self.theta_map.dtype, copy=True)
        P.diagonal().add_(self.prior_precision)
        return P

    @property
    def posterior_covariance(self) -> torch.Tensor:
        r""":math:`(H + \delta I)^{-1}` ``(M, M)`` (a new matrix, in the network's dtype), from the
        Cholesky factor."""
        return torch.cholesky_inverse(self._factor()).to(self.theta_map.dtype)

    def _factor(self, delta: float | None = None) -> torch.Tensor:
        r"""The lower Cholesky factor L of :math:`H + \delta I` (δ: the current prior precision),
        :math:`\Sigma = L^{-\top} L^{-1}`; refactored in place in one buffer when δ changes."""
        self._check_fitted()
        delta = self.prior_precision if delta is None else delta
        if self._chol is None:
            self._chol = torch.empty_like(self.H)
            self._chol_delta = None
        if self._chol_delta != delta:
            self._chol_delta = None  # the buffer is overwritten: invalid until the factorisation succeeds
            _cholesky_into(self._chol, self.H, delta)
            self._chol_delta = delta
        return self._chol.mT

    def _solve_draws(self, eps: torch.Tensor) -> torch.Tensor:
        r"""``eps`` ``(S, M)`` of standard normals -> ``(S, M)`` draws of :math:`\mathcal N(0, \Sigma)`:
        :math:`L^{-\top}\varepsilon` (a triangular solve; no ``(M, M)`` temporary)."""
        L = self._factor()
        return torch.linalg.solve_triangular(L.mT, eps.to(L.dtype).T, upper=True).T

    def _variance(self, J: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
        r""":math:`\operatorname{diag}(J \Sigma J^\top) = \lVert L^{-1} J^\top \rVert^2` columnwise, for
        ``J`` ``(..., M)`` -> ``(...)``; in chunks of at most M/16 rows of J, so the temporaries
        stay below an eighth of an ``(M, M)`` matrix whatever the batch."""
        rows = J.reshape(-1, J.shape[-1])
        out = [
            torch.linalg.solve_triangular(L, chunk.to(L.dtype).T, upper=False).square_().sum(0)
            for chunk in rows.split(max(1, rows.shape[-1] // 16))
        ]
        return torch.cat(out).reshape(J.shape[:-1])

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        r"""Draws of :math:`\theta_S \sim \mathcal N(\theta_{S*}, (H + \delta I)^{-1})`: ``(num_samples, M)``."""
        positive_int("num_samples", num_samples)
        eps = torch.randn(num_samples, self.num_params, generator=generator, dtype=self.dtype, device=self.device)
        return self.theta_map + self._solve_draws(eps).to(self.theta_map.dtype)

    def _new_noise(self, n: int) -> torch.Tensor:
        """``n`` more rows of ε for the cache behind :meth:`sample_predictions` (standard normals)."""
        return torch.randn(n, self.num_params, dtype=self.dtype, device=self.device)

    def _noise_to_deltas(self, bank: torch.Tensor) -> torch.Tensor:
        return self._solve_draws(bank).to(self.theta_map.dtype)

    # -- predictives -----------------------------------------------------------------------
    def _functional(self) -> tuple[FlatFunctional, torch.Tensor]:
        self._check_subnetwork()
        return self._sub, self.theta_map

    def _noise_variance(self, out: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self.sigma_noise**2, dtype=out.dtype, device=out.device)

    @torch.no_grad()
    def glm_mean_variance(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Mean :math:`f(\theta_*, x)` and marginal variances :math:`\operatorname{diag}(J_S \Sigma J_S^\top)`
        of the linearized network, both ``(K, B, O)``."""
        x = self._check_x(x)
        L = self._factor()
        means, variances = [], []
        for _, out, J in self._jac.blocks(x):
            means.append(out)
            variances.append(self._variance(J, L).to(out.dtype))
        return torch.cat(means, dim=1), torch.cat(variances, dim=1)

    def sample_predictions(self, x: torch.Tensor, num_samples: int) -> torch.Tensor:
        """Probabilities ``(S, K, B, C)`` or Gaussian (mean, variance) pairs ``(S, K, B, 2)``;
        ``S = 1`` for the closed-form ``"glm"`` predictive."""
        positive_int("num_samples", num_samples)
        if self.predictive == "glm":
            mean, var = self.glm_mean_variance(x)
            if self.likelihood == "categorical":
                return self._probit(mean, var).unsqueeze(0)
            return self._predictions(mean.unsqueeze(0), variance=var.unsqueeze(0))
        return super().sample_predictions(x, num_samples)

    # -- files -----------------------------------------------------------------------------
    def _settings(self) -> dict:
        prior_mean = self._prior_mean_arg
        if not isinstance(prior_mean, (int, float)):
            prior_mean = torch.as_tensor(prior_mean)
        return {
            "likelihood": self.likelihood,
            "subnetwork": self.subnetwork_indices,
            "prior_precision": self._prior_precision,
            "sigma_noise": self.sigma_noise,
            "prior_mean": prior_mean,
            "param_names": list(self.full.param_names),
            "predictive": self.predictive,
            "jacobian_mode": self.jacobian_mode,
            "max_block_elements": self.max_block_elements,
            "chunk_size": self.chunk_size,
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    def _fitted_state(self) -> dict:
        return {
            "H": self.H,
            "log_likelihood": self.log_likelihood,
            "num_data": self.num_data,
            "strategy": self.strategy,  # how the subnetwork was chosen (for the record: loaded, it is fixed)
        }

    def _load_fitted_state(self, state: dict) -> None:
        H = state["H"]
        if not torch.is_tensor(H) or H.shape != (self.num_params, self.num_params):
            raise ValueError(f"saved H must be a ({self.num_params}, {self.num_params}) tensor")
        self._reset_fit()
        self.H = H.to(device=self.device, dtype=self.dtype)
        self.log_likelihood, self.num_data = state["log_likelihood"], state["num_data"]

    @classmethod
    def _from_settings(cls, model: nn.Module, settings: dict) -> SubnetLaplace:
        dtype = settings.get("dtype", "float64")
        if isinstance(dtype, str):
            if dtype not in ("float32", "float64"):
                raise ValueError(f"saved dtype must be 'float32' or 'float64', got {dtype!r}")
            dtype = getattr(torch, dtype)
        return cls(model, **{**settings, "dtype": dtype})

    def __repr__(self) -> str:
        sub = f"strategy={self.strategy!r}" if self._sub is None else f"num_params={self.num_params}"
        prior = "unset" if self._prior_precision is None else f"{self._prior_precision:.4g}"
        return (
            f"{type(self).__name__}({sub}, likelihood={self.likelihood!r}, prior_precision={prior}, "
            f"predictive={self.predictive!r}, {'unfitted' if self.H is None else f'fitted on {self.num_data}'})"
        )
