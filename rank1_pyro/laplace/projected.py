r"""The null-space projected posterior ("Bayes without Underfitting", Miani, Roy & Hauberg, AISTATS 2025).

Around a trained network :math:`f(\theta, x)` with MAP point :math:`\theta_*` (P parameters), let
:math:`J \in \mathbb R^{NO \times P}` stack the Jacobians :math:`J_n = \partial f(\theta_*, x_n)/\partial\theta`
of all N training examples (O outputs each) and :math:`\mathcal P = I - J^\top (J J^\top)^+ J` the
orthogonal projection onto its null space. The posterior is

.. math:: \theta = \theta_* + \alpha^{-1/2}\, \mathcal P \varepsilon, \qquad \varepsilon \sim \mathcal N(0, I_P),

the limit of the linearized Laplace posterior whose GGN eigenvalues on the data go to infinity:
along the null space it is the prior :math:`\mathcal N(0, \alpha^{-1} I)`, across it a point mass. So
the linearized predictive :math:`f(\theta_*, x) + J(x)(\theta - \theta_*)` is *exactly* the MAP's on
every training input (no underfitting), while it varies off the data.

**Alternating projections.** :math:`\mathcal P` is never formed. The training set is cut into
micro-batches b (S examples); with :math:`J_b` their Jacobian, the Gram matrix
:math:`G_b = J_b J_b^\top` ((S·O)×(S·O)) is built once, a block of columns at a time as
:math:`J_b (J_b^\top E)` by vmapped VJPs and JVPs (never more than ``chunk_size`` × P Jacobian
entries at once), and its pseudo-inverse cached through an eigendecomposition
:math:`G_b = U \Lambda U^\top` keeping the eigenvalues :math:`\lambda > \text{rtol}\cdot\lambda_{\max}`.
One projection step onto the null space of :math:`J_b` is

.. math:: v \leftarrow \mathcal P_b v = v - J_b^\top\, U \Lambda^{-1} U^\top J_b v

(one JVP, two small matmuls, one VJP; ``torch.func``, vmapped over a block of vectors). A *sweep*
applies the steps of all micro-batches in turn, :math:`T = \mathcal P_B \cdots \mathcal P_1`, and
:math:`T^k v \to \mathcal P v` (von Neumann / Halperin). Two solvers iterate it:

* ``solver="alternating"`` (the reference's): plain sweeps; with ``over_relaxation`` each ends with
  the Gearhart–Koshy line search: since :math:`x - \mathcal P v` and :math:`d = x - Tx` both lie
  in the row space of J, the point of the line :math:`x - t d` nearest to :math:`\mathcal P v` has
  :math:`t = \langle x, d\rangle / \lVert d\rVert^2`, computable without knowing :math:`\mathcal P v`
  (the reference code takes this step once, after the last sweep).
* ``solver="cg"`` (default): conjugate gradients on :math:`(I - T^\top T)\,x = 0` from
  :math:`x_0 = v`, one symmetric sweep :math:`T^\top T = \mathcal P_1 \cdots \mathcal P_B \cdots
  \mathcal P_1` per iteration (the CGMN method of Björck & Elfving). Sweeps converge at a rate set
  by the angles between the micro-batches' constraint spaces, which is slow when J is
  ill-conditioned (on a 3-8-3 MLP with 12 examples, 3000 sweeps still leave 10% error); CG needs
  the square root of that condition number and terminates on small problems (< 70 iterations
  there, to 1e-10).

Each iteration records :math:`\lVert J_m v\rVert / \lVert v\rVert` on *monitor* micro-batches (by
default the first training micro-batch, the one the rest of a sweep disturbs most; or data given
to :meth:`fit`) in :attr:`ProjectedPosterior.convergence`.

**Loss projection** (``kind="loss"``): the constraints are the per-example loss gradients
:math:`g_n = \nabla_\theta \ell(f(\theta_*, x_n), y_n) = J_n^\top r_n` with
:math:`r_n = \partial\ell/\partial f`, so :math:`G_b` is S×S whatever the output size (models with
many outputs, generative models). The same JVP/VJP serve: :math:`g_n^\top v = r_n^\top J_n v`,
:math:`\sum_n c_n g_n = J^\top (c \circ r)`.

**Prior precision.** :math:`\operatorname{tr}\mathcal P` (the null-space dimension) is estimated by
Hutchinson, :math:`\operatorname{tr}\mathcal P \approx \frac1M \sum_m \lVert \mathcal P z_m\rVert^2`
for Rademacher probes :math:`z_m` projected with the same sweeps (:math:`z^\top \mathcal P z =
\lVert \mathcal P z\rVert^2`; the variance of one probe is :math:`2(\operatorname{tr}\mathcal P -
\sum_i \mathcal P_{ii}^2) \le 2 \operatorname{tr}\mathcal P`). Unless given, α maximises the Laplace
evidence in this limit: with :math:`r = P - \operatorname{tr}\mathcal P` infinite GGN eigenvalues,
:math:`\log Z(\alpha) = \text{const} + \frac r2 \log\alpha - \frac\alpha2 \lVert\theta_*\rVert^2`, so

.. math:: \alpha = \frac{P - \operatorname{tr}\mathcal P}{\lVert\theta_*\rVert^2},
          \qquad\text{i.e. the prior variance } \alpha^{-1} = \frac{\lVert\theta_*\rVert^2}{P - \operatorname{tr}\mathcal P}.

**Draws and files.** The draws behind :meth:`~ProjectedPosterior.sample_predictions` are kept as
:math:`\mathcal P\varepsilon` (:mod:`~rank1_pyro.laplace.base`), each the result of one projection;
α scales them when used. :meth:`~rank1_pyro.laplace.base.PostHocPosterior.state_dict` holds the
settings, α's ingredients (:math:`\operatorname{tr}\mathcal P` and its standard error), the
convergence record, those projected draws and, unless ``micro_batches=False``, every micro-batch's
inputs, loss weights and Gram eigenpairs (so a loaded posterior projects exactly as the fitted one,
but the file holds the training inputs). Without them a loaded posterior predicts with its saved
draws only: :attr:`~ProjectedPosterior.max_samples` of them.

Cost: per sample and sweep, one JVP and one VJP per training example (linear in P) plus two
(S·O)×k matmuls per micro-batch (quadratic in O; S×k for ``kind="loss"``); memory: the cached
eigenvectors, :math:`\le (S\cdot O)^2` per micro-batch, the micro-batches' inputs, and
``chunk_size`` × P per vmapped VJP.

One concept, one module (hence over 400 lines): the null-space projected posterior: the projection, its solvers, and its fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vjp, vmap

from .._checks import one_of, positive_int
from .base import PostHocPosterior, batches
from .curvature import check_labels
from .functional import FlatFunctional, Rank1PointNetwork

__all__ = ["ProjectedPosterior", "KINDS", "PREDICTIVES", "SOLVERS", "LOSSES"]

KINDS = ("output", "loss")
PREDICTIVES = ("linearized", "nn")
SOLVERS = ("cg", "alternating")

#: per-example losses ``loss(outputs (R, O), targets (R,)) -> (R,)`` for ``kind="loss"``; the null
#: space of the gradients does not depend on a positive per-example scale (e.g. a noise variance)
LOSSES = {
    "categorical": lambda out, y: F.cross_entropy(out, y, reduction="none"),
    # targets (R,) or (R, O) (e.g. (N, 1)) against outputs (R, O): one loss per row, never an (R, R) broadcast
    "normal": lambda out, y: 0.5 * ((out - y.reshape(out.shape).to(out.dtype)) ** 2).sum(-1),
}


@dataclass
class _Block:
    """One micro-batch: its inputs, loss weights and cached Gram pseudo-inverse."""

    x: torch.Tensor
    rows: int  # R, output rows of the network on x (K·S for a rank-1 point network)
    weights: torch.Tensor | None = None  # (R, O) = ∂ℓ/∂f at θ_* for kind="loss"
    eigvecs: torch.Tensor | None = None  # (M, k) kept eigenvectors of G_b
    inv_eigvals: torch.Tensor | None = None  # (k,)


class ProjectedPosterior(PostHocPosterior):
    r"""The projected posterior :math:`\mathcal N(\theta_*, \alpha^{-1}\mathcal P)` of a trained network.

    Args:
        model: the trained network (any ``nn.Module`` mapping a batch to ``(B, O)`` outputs, e.g.
            logits), or a :class:`~rank1_pyro.laplace.functional.Rank1PointNetwork` (outputs
            ``(K·B, C)`` member-major; predictions then have K = ``ensemble_size``).
        likelihood: ``"categorical"``/``"classification"`` (outputs are logits) or ``"normal"``/``"regression"``.
        param_names: the parameters making up θ (see :class:`FlatFunctional`); the rest stay
            at their trained values. For a rank-1 point network: ``"model.…weight"`` (W),
            ``"factors.…"`` (the factor means), or both.
        alpha: prior precision α; ``None`` (default) sets it in :meth:`fit` by the closed form
            :math:`(P - \operatorname{tr}\mathcal P)/\lVert\theta_*\rVert^2`.
        kind: ``"output"`` (null space of the output Jacobian) or ``"loss"`` (of the per-example
            loss gradients; needs targets).
        predictive: ``"linearized"`` (:math:`f(\theta_*, x) + J(x)(\theta - \theta_*)`) or ``"nn"``
            (:math:`f(\theta, x)`).
        num_iterations: iterations per projection: sweeps (``"alternating"``; reference: 150–1000
            on large problems) or CG iterations of one symmetric sweep each (``"cg"``); see
            :attr:`convergence` for how far they got.
        micro_batch_size: S, examples per projection step (each loader batch is split into pieces
            of at most S). The Gram matrix is (S·O)² (``"output"``) or S² (``"loss"``).
        solver: ``"cg"`` or ``"alternating"`` (module docstring).
        over_relaxation: with ``solver="alternating"``, end every sweep with the Gearhart–Koshy
            line search.
        eig_rtol: relative eigenvalue cut-off of the Gram pseudo-inverses; default
            ``M · eps(dtype)`` for an M×M Gram matrix (numerical rank, as ``matrix_rank``).
        num_trace_probes: Rademacher probes of the Hutchinson estimate of tr 𝒫.
        tol: stop early once the mean monitor residual ‖J_m v‖/‖v‖ is at most ``tol``.
        loss_fn: per-example loss ``loss_fn(outputs (R, O), targets (R,)) -> (R,)`` for
            ``kind="loss"``; default :data:`LOSSES` ``[likelihood]``.
        noise_scale: observation noise stddev of the ``"normal"`` predictive; defaults to the
            rank-1 model's own for a rank-1 point network, else required.
        chunk_size: vectors pushed through one vmapped JVP/VJP at a time (bounds memory).

    Typical use::

        post = ProjectedPosterior(net, "categorical").fit(train_loader)
        pred = predict(post, x_test, num_samples=32)     # rank1_pyro.inference.predict

    The S draws behind :meth:`sample_predictions` are cached, so every batch of one
    :func:`~rank1_pyro.inference.predict` call sees the same S posterior samples;
    :meth:`clear_samples` draws afresh. ``post.save(path)`` writes the fitted posterior and
    ``ProjectedPosterior.load(path, net)`` reads it back onto the same network.
    """

    KIND = "projected"
    PREDICTIVES = PREDICTIVES

    def __init__(
        self,
        model: nn.Module,
        likelihood: str = "categorical",
        param_names=None,
        alpha: float | None = None,
        *,
        kind: str = "output",
        predictive: str = "linearized",
        num_iterations: int = 100,
        micro_batch_size: int = 32,
        solver: str = "cg",
        over_relaxation: bool = True,
        eig_rtol: float | None = None,
        num_trace_probes: int = 32,
        tol: float | None = None,
        loss_fn=None,
        noise_scale: float | None = None,
        chunk_size: int = 64,
    ):
        self._init_common(model, likelihood, predictive, chunk_size)
        likelihood = self.likelihood
        one_of("kind", kind, KINDS)
        if alpha is not None and not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha must be a positive number or None, got {alpha!r}")
        if eig_rtol is not None and not 0.0 < eig_rtol < 1.0:
            raise ValueError(f"eig_rtol must lie in (0, 1), got {eig_rtol!r}")
        if tol is not None and not tol > 0.0:
            raise ValueError(f"tol must be > 0 or None, got {tol!r}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self.kind = kind
        self.num_iterations = positive_int("num_iterations", num_iterations)
        self.micro_batch_size = positive_int("micro_batch_size", micro_batch_size)
        self.num_trace_probes = positive_int("num_trace_probes", num_trace_probes)
        self.solver = one_of("solver", solver, SOLVERS)
        self.over_relaxation = bool(over_relaxation)
        self.eig_rtol = eig_rtol
        self.tol = tol
        self.loss_fn = loss_fn or LOSSES[likelihood]
        if likelihood == "normal" and noise_scale is None:
            if not isinstance(model, Rank1PointNetwork):
                raise ValueError("noise_scale is required for likelihood='normal' (the network has no noise model)")
        elif noise_scale is not None and not noise_scale > 0:
            raise ValueError(f"noise_scale must be > 0, got {noise_scale!r}")
        self.noise_scale = noise_scale
        self.functional = FlatFunctional(model, param_names)
        self._theta = self.functional.theta_map
        self._alpha = None if alpha is None else float(alpha)
        self.trace_estimate: float | None = None
        self.trace_stderr: float | None = None
        self.convergence: torch.Tensor | None = None
        self._blocks: list[_Block] | None = None
        self._monitor: list[_Block] | None = None
        # self._bank (base): the cached projected noise 𝒫ε behind sample_predictions

    # -- basic properties ------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._theta.device

    @property
    def num_params(self) -> int:
        return self.functional.num_params

    @property
    def theta_map(self) -> torch.Tensor:
        return self._theta.clone()

    @property
    def max_samples(self) -> int | None:
        """The most samples :meth:`sample_predictions` can use: ``None`` (any number) for a fitted
        posterior, the number of saved draws for one loaded without its micro-batches."""
        if self._blocks is None and self._bank is not None:
            return self._bank.shape[0]
        return None

    @property
    def alpha(self) -> float:
        r"""Prior precision: as given, else :math:`(P - \operatorname{tr}\mathcal P)/\lVert\theta_*\rVert^2`."""
        if self._alpha is not None:
            return self._alpha
        if self.trace_estimate is None:
            raise RuntimeError("alpha is not set: pass alpha= or call fit() (which estimates tr P)")
        determined = self.num_params - self.trace_estimate
        norm2 = float(self._theta.double().pow(2).sum())
        if determined <= 0 or norm2 == 0.0:
            raise ValueError(
                f"cannot set alpha by the closed form: P - tr P = {determined:.4g}, "
                f"||theta_MAP||^2 = {norm2:.4g}; pass alpha="
            )
        return determined / norm2

    @alpha.setter
    def alpha(self, value: float) -> None:
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"alpha must be a positive number, got {value!r}")
        self._alpha = float(value)

    # -- constraints of one micro-batch: A_b v and A_bᵀ c --------------------------------
    def _forward(self, x):
        return self.functional(self._theta, x)

    def _apply(self, block: _Block, V: torch.Tensor) -> torch.Tensor:
        """``A_b V``: ``(n, P) -> (n, M)``: ``J_b v`` flattened, or ``r_nᵀ J_n v`` per example."""
        jv = vmap(lambda v: self.functional.jvp(block.x, v, self._theta)[1])(V)  # (n, R, O)
        if block.weights is None:
            return jv.reshape(jv.shape[0], -1)
        return (jv * block.weights).sum(-1)

    def _apply_t(self, block: _Block, C: torch.Tensor) -> torch.Tensor:
        """``A_bᵀ C``: ``(n, M) -> (n, P)`` by one vmapped VJP."""
        _, pullback = vjp(lambda t: self.functional(t, block.x), self._theta)
        if block.weights is None:
            U = C.reshape(C.shape[0], block.rows, -1)
        else:
            U = C.unsqueeze(-1) * block.weights
        return vmap(lambda u: pullback(u)[0])(U)

    def _make_block(self, x, y, gram: bool) -> _Block:
        x = x.to(self.device)
        out = self._forward(x)
        block = _Block(x=x, rows=out.shape[0])
        if self.kind == "loss":
            if y is None:
                raise ValueError("kind='loss' needs targets: pass (x, y) batches to fit()")
            y = torch.as_tensor(y).to(self.device)  # batches() checked y.shape[:1] == x.shape[:1]
            if block.rows != y.shape[0]:
                if isinstance(self.model, Rank1PointNetwork) and block.rows == self.ensemble_size * y.shape[0]:
                    y = y.repeat(self.ensemble_size, *([1] * (y.dim() - 1)))  # member-major rows
                else:
                    raise ValueError(f"the network gives {block.rows} output rows for {y.shape[0]} targets")
            if self.likelihood == "categorical" and self.loss_fn is LOSSES["categorical"]:
                check_labels(y, out.shape[-1])
            elif self.likelihood == "normal" and self.loss_fn is LOSSES["normal"] and y.numel() != out.numel():
                raise ValueError(f"targets of shape {tuple(y.shape)} do not fit outputs of shape {tuple(out.shape)}")
            with torch.enable_grad():
                block.weights = torch.func.grad(lambda o: self.loss_fn(o, y).sum())(out.detach())
        if not gram:
            return block
        size = block.rows * out.shape[1] if self.kind == "output" else block.rows
        basis = torch.eye(size, dtype=out.dtype, device=self.device)
        # G_b = A_b A_bᵀ, a block of columns at a time: A_b (A_bᵀ E) by one vmapped VJP and one
        # vmapped JVP, so at most chunk_size × P Jacobian entries exist at once
        gram = torch.cat([self._apply(block, self._apply_t(block, e)) for e in basis.split(self.chunk_size)]).double()
        eigvals, eigvecs = torch.linalg.eigh((gram + gram.T) / 2)
        rtol = self.eig_rtol if self.eig_rtol is not None else size * torch.finfo(out.dtype).eps
        keep = eigvals > rtol * eigvals[-1].clamp_min(torch.finfo(torch.float64).tiny)
        block.eigvecs = eigvecs[:, keep].to(out.dtype)
        block.inv_eigvals = eigvals[keep].reciprocal().to(out.dtype)
        return block

    def _micro_batches(self, data):
        # one (x, y) pair is a tuple; a list is an iterable of batches
        return batches(data, name="train_data", size=self.micro_batch_size, pairs=(tuple,))

    # -- fitting ---------------------------------------------------------------------------
    @torch.no_grad()
    def fit(self, train_data, monitor=None) -> ProjectedPosterior:
        """Cache the Gram pseudo-inverses of all training micro-batches; set α unless given.

        Args:
            train_data: a tensor of inputs, a pair ``(x, y)``, or an iterable (a DataLoader) of
                ``x`` or ``(x, y, ...)`` batches; targets are needed for ``kind="loss"``.
            monitor: data (same forms) on which each sweep records ‖J v‖/‖v‖; default the first
                training micro-batch.
        """
        blocks = [self._make_block(x, y, gram=True) for x, y in self._micro_batches(train_data)]
        if not blocks:
            raise ValueError("train_data is empty")
        if monitor is None:
            watched = blocks[:1]
        else:
            watched = [self._make_block(x, y, gram=False) for x, y in self._micro_batches(monitor)]
            if not watched:
                raise ValueError("monitor is empty")
        # only a complete fit replaces the last one: a refused fit leaves the posterior as it was
        self._blocks, self._monitor, self._bank = blocks, watched, None
        if self._alpha is None:
            self.estimate_trace()
        return self

    def _check_fitted(self) -> None:
        if self._blocks is None:
            if self._bank is not None:
                raise RuntimeError(
                    f"this projected posterior was loaded without its micro-batches: it predicts with its "
                    f"{self._bank.shape[0]} saved draws and cannot project; call fit(train_data) to project again"
                )
            raise RuntimeError("call fit(train_data) first")

    # -- alternating projections -----------------------------------------------------------
    def _step(self, block: _Block, V: torch.Tensor) -> torch.Tensor:
        if block.inv_eigvals.numel() == 0:
            return V
        C = ((self._apply(block, V) @ block.eigvecs) * block.inv_eigvals) @ block.eigvecs.T
        return V - self._apply_t(block, C)

    def _residual(self, V: torch.Tensor) -> float:
        sq = sum(self._apply(b, V).pow(2).sum(-1) for b in self._monitor)
        return (sq.sqrt() / V.norm(dim=-1).clamp_min(torch.finfo(V.dtype).tiny)).mean().item()

    def _sweep(self, V: torch.Tensor, symmetric: bool = False) -> torch.Tensor:
        """:math:`T V` (:math:`T = \\mathcal P_B \\cdots \\mathcal P_1`) or, with ``symmetric``, :math:`T^\\top T V`."""
        order = self._blocks + self._blocks[-2::-1] if symmetric else self._blocks
        chunks = []
        for Vc in V.split(self.chunk_size):
            for block in order:
                Vc = self._step(block, Vc)
            chunks.append(Vc)
        return torch.cat(chunks)

    @torch.no_grad()
    def project(self, vectors: torch.Tensor, num_iterations: int | None = None) -> torch.Tensor:
        """:math:`\\mathcal P v` by ``num_iterations`` iterations, for ``v`` of shape ``(P,)`` or ``(n, P)``.

        Sets :attr:`convergence` to the mean monitor residual ‖J_m v‖/‖v‖ before the first
        iteration and after each one.
        """
        self._check_fitted()
        iterations = self.num_iterations if num_iterations is None else positive_int("num_iterations", num_iterations)
        if not torch.is_tensor(vectors) or vectors.shape[-1:] != (self.num_params,) or vectors.dim() > 2:
            raise ValueError(
                f"vectors must have shape (P,) or (n, P) with P = {self.num_params}, got "
                f"{tuple(vectors.shape) if torch.is_tensor(vectors) else type(vectors).__name__}"
            )
        single = vectors.dim() == 1
        V = vectors.reshape(-1, self.num_params).to(device=self.device, dtype=self._theta.dtype)
        solve = self._conjugate_gradients if self.solver == "cg" else self._alternating
        history = [self._residual(V)]
        for V_next in solve(V, iterations):
            V = V_next
            history.append(self._residual(V))
            if self.tol is not None and history[-1] <= self.tol:
                break
        self.convergence = torch.tensor(history, dtype=torch.float64, device="cpu")
        return V[0] if single else V

    def _alternating(self, V: torch.Tensor, iterations: int):
        """Plain sweeps :math:`V \\leftarrow T V`, each optionally followed by the Gearhart–Koshy step."""
        # the step amplifies rounding in d by t: take it only while d is well above rounding level
        # (||d|| > sqrt(eps) ||x||); closer in, plain sweeps finish the job
        eps = torch.finfo(V.dtype).eps
        for _ in range(iterations):
            start, V = V, self._sweep(V)
            if self.over_relaxation:
                d = start - V
                dd = d.pow(2).sum(-1)
                t = (start * d).sum(-1) / dd.clamp_min(torch.finfo(V.dtype).tiny)
                t = torch.where(dd > eps * start.pow(2).sum(-1), t, torch.ones_like(t))
                V = start - t.unsqueeze(-1) * d
            yield V

    def _conjugate_gradients(self, V: torch.Tensor, iterations: int):
        r"""Conjugate gradients on :math:`A x = 0`, :math:`A = I - T^\top T`, from :math:`x_0 = v`.

        A is symmetric positive semi-definite with null space :math:`\mathcal N(J)`; every iterate
        keeps :math:`x - v` in its range, so CG converges to :math:`\mathcal P v`, at a rate set by
        the square root of the condition number of A on the range instead of the condition number
        itself (the CGMN method of Björck & Elfving for symmetric block-Kaczmarz sweeps).
        """
        eps, tiny = torch.finfo(V.dtype).eps, torch.finfo(V.dtype).tiny
        X = V
        R = self._sweep(X, symmetric=True) - X  # -A x
        D = R
        rr = R.pow(2).sum(-1)
        floor = eps**1.5 * X.pow(2).sum(-1)  # stop at ||r|| <= eps^(3/4) ||v||: beyond, rounding drives x off N(J)
        done = rr <= floor
        for _ in range(iterations):
            if bool(done.all()):
                break
            AD = D - self._sweep(D, symmetric=True)
            dad = (D * AD).sum(-1)
            done = done | (dad <= 100 * eps * D.pow(2).sum(-1))  # D has left the range of A
            step = torch.where(done, torch.zeros_like(rr), rr / dad.clamp_min(tiny))
            X = X + step.unsqueeze(-1) * D
            R = R - step.unsqueeze(-1) * AD
            rr_new = R.pow(2).sum(-1)
            done = done | (rr_new <= floor)
            beta = torch.where(done, torch.zeros_like(rr), rr_new / rr.clamp_min(tiny))
            D = R + beta.unsqueeze(-1) * D
            rr = rr_new
            yield X

    @torch.no_grad()
    def estimate_trace(self, num_probes: int | None = None) -> float:
        r"""Hutchinson estimate of :math:`\operatorname{tr}\mathcal P` from Rademacher probes.

        Sets :attr:`trace_estimate` and :attr:`trace_stderr` (standard error of the mean).
        """
        self._check_fitted()
        n = self.num_trace_probes if num_probes is None else positive_int("num_probes", num_probes)
        z = torch.randint(0, 2, (n, self.num_params), device=self.device).to(self._theta.dtype) * 2 - 1
        values = self.project(z).pow(2).sum(-1).double()
        self.trace_estimate = values.mean().item()
        self.trace_stderr = (values.std() / math.sqrt(n)).item() if n > 1 else float("nan")
        return self.trace_estimate

    # -- sampling --------------------------------------------------------------------------
    def _noise(self, num_samples: int, generator=None) -> torch.Tensor:
        shape = (num_samples, self.num_params)
        return torch.randn(shape, generator=generator, device=self.device, dtype=self._theta.dtype)

    @torch.no_grad()
    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        r"""Fresh draws :math:`\theta_* + \alpha^{-1/2}\mathcal P\varepsilon`: ``(num_samples, P)``."""
        positive_int("num_samples", num_samples)
        return self._theta + self.alpha**-0.5 * self.project(self._noise(num_samples, generator))

    @torch.no_grad()
    def draws(self, num_samples: int) -> torch.Tensor:
        """The cached θ draws behind :meth:`sample_predictions` (the first ``num_samples``): ``(S, P)``."""
        positive_int("num_samples", num_samples)
        return self._theta + self._deltas(num_samples)

    def _new_noise(self, n: int) -> torch.Tensor:
        r"""``n`` more projected draws :math:`\mathcal P\varepsilon` for the cache."""
        if self.max_samples is not None:
            raise RuntimeError(
                f"this projected posterior holds {self.max_samples} saved draws and no micro-batches to project "
                f"more: ask for at most {self.max_samples} samples, or call fit(train_data) again"
            )
        self._check_fitted()
        return self.project(self._noise(n))

    def _noise_to_deltas(self, bank: torch.Tensor) -> torch.Tensor:
        return self.alpha**-0.5 * bank

    def _functional(self) -> tuple[FlatFunctional, torch.Tensor]:
        return self.functional, self._theta

    def _noise_variance(self, out: torch.Tensor) -> torch.Tensor:
        if self.noise_scale is not None:
            scale = torch.as_tensor(self.noise_scale, dtype=out.dtype, device=out.device)
        else:
            with torch.no_grad():
                scale = self.model.model.noise_scale().to(out)
        return scale**2

    # -- files -----------------------------------------------------------------------------
    def _settings(self) -> dict:
        return {
            "likelihood": self.likelihood,
            "param_names": list(self.functional.param_names),
            "alpha": self._alpha,
            "kind": self.kind,
            "predictive": self.predictive,
            "num_iterations": self.num_iterations,
            "micro_batch_size": self.micro_batch_size,
            "solver": self.solver,
            "over_relaxation": self.over_relaxation,
            "eig_rtol": self.eig_rtol,
            "num_trace_probes": self.num_trace_probes,
            "tol": self.tol,
            "noise_scale": None if self.noise_scale is None else float(self.noise_scale),
            "chunk_size": self.chunk_size,
        }

    def _check_savable(self) -> None:
        if self._blocks is None and self._bank is None:
            self._check_fitted()

    def _fitted_state(self, micro_batches: bool = True) -> dict:
        """``micro_batches=False`` leaves out the micro-batches (inputs, loss weights, Gram
        eigenpairs): a small file that predicts with its saved draws only."""
        keep = micro_batches and self._blocks is not None

        def block(b: _Block, gram: bool = True) -> dict:
            out = {"x": b.x, "rows": b.rows, "weights": b.weights}
            if gram:
                out.update(eigvecs=b.eigvecs, inv_eigvals=b.inv_eigvals)
            return out

        first = self._monitor is not None and len(self._monitor) == 1 and self._monitor[0] is self._blocks[0]
        return {
            "trace_estimate": self.trace_estimate,
            "trace_stderr": self.trace_stderr,
            "convergence": self.convergence,
            "custom_loss_fn": self.loss_fn is not LOSSES[self.likelihood],
            "micro_batches": [block(b) for b in self._blocks] if keep else None,
            "monitor": None if not keep else ("first" if first else [block(b, gram=False) for b in self._monitor]),
        }

    def _load_fitted_state(self, state: dict) -> None:
        def block(d: dict) -> _Block:
            def dev(t):
                return None if t is None else t.to(self.device)

            return _Block(
                x=dev(d["x"]),
                rows=int(d["rows"]),
                weights=dev(d["weights"]),
                eigvecs=dev(d.get("eigvecs")),
                inv_eigvals=dev(d.get("inv_eigvals")),
            )

        self.trace_estimate, self.trace_stderr = state["trace_estimate"], state["trace_stderr"]
        self.convergence = state["convergence"]
        if state["micro_batches"] is None:
            self._blocks = self._monitor = None
        else:
            self._blocks = [block(d) for d in state["micro_batches"]]
            monitor = state["monitor"]
            self._monitor = self._blocks[:1] if monitor == "first" else [block(d) for d in monitor]
        self._bank = None

    @classmethod
    def from_state_dict(cls, model: nn.Module, state: dict, **overrides) -> ProjectedPosterior:
        if isinstance(state, dict) and state.get("state", {}).get("custom_loss_fn") and "loss_fn" not in overrides:
            raise ValueError("this projected posterior was fitted with a custom loss_fn: pass loss_fn= to load it")
        return super().from_state_dict(model, state, **overrides)

    def __repr__(self) -> str:
        fitted = "unfitted" if self._blocks is None else f"{len(self._blocks)} micro-batches"
        if self.max_samples is not None:
            fitted = f"{self.max_samples} saved draws"
        return (
            f"{type(self).__name__}(num_params={self.num_params}, likelihood={self.likelihood!r}, "
            f"kind={self.kind!r}, solver={self.solver!r}, predictive={self.predictive!r}, "
            f"num_iterations={self.num_iterations}, micro_batch_size={self.micro_batch_size}, {fitted})"
        )
