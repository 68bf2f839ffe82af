r"""Jacobian columns of a (sub)network and its generalized Gauss-Newton (GGN) curvature.

For a network :math:`f(\theta, x)` with O outputs around :math:`\theta_*` and a likelihood
:math:`p(y \mid f)`, the GGN of the negative log-likelihood of the data is

.. math:: H = \sum_n J_n^\top \Lambda_n J_n, \qquad
          J_n = \frac{\partial f(\theta_*, x_n)}{\partial \theta} \in \mathbb R^{O \times M},
          \qquad \Lambda_n = -\frac{\partial^2 \log p(y_n \mid f)}{\partial f^2},

with :math:`\Lambda = \operatorname{diag}(p) - p p^\top` (:math:`p = \operatorname{softmax} f`) for
``"categorical"`` and :math:`\Lambda = \sigma^{-2} I` for ``"normal"``. Neither depends on
:math:`y`. Both factor as :math:`\Lambda = L L^\top`: :math:`L = \sigma^{-1} I`, and, since
:math:`\sum_c p_c = 1`, :math:`L_{:,c} = \sqrt{p_c}\,(e_c - p)`; so with
:math:`A_{n,c} = J_n^\top L_{n,:,c}` (:func:`ggn_factor`),

.. math:: H = \sum_{n,c} A_{n,c} A_{n,c}^\top, \qquad \operatorname{diag} H = \sum_{n,c} A_{n,c}^{\odot 2}.

**Only the subnetwork's columns.** θ is the flat vector of a
:class:`~rank1_pyro.laplace.functional.FlatFunctional`, usually restricted to M entries.
:class:`JacobianColumns` computes the M columns of the Jacobian without the other P − M
(laplace-torch computes the full :math:`(B, O, P)` Jacobian of every batch and slices it), in
one of two ways (``mode``):

* ``"forward"``: one JVP per column, :math:`J e_m`, vmapped over chunks of basis vectors (one
  JVP gives the column for every example of a batch); cost ≈ M forward passes.
* ``"reverse"``: VJPs of the O output rows; cost ≈ O backward passes. Entries in the weight or
  bias of an ``nn.Linear`` or ``nn.Conv2d`` get their columns from the layer's input and the
  gradient at its output: a zero perturbation :math:`\varepsilon` is added to the layer's
  output and, rows (examples) being independent, one VJP with cotangent :math:`e_o` on every row
  gives :math:`g_{r} = \partial f_{r,o}/\partial\varepsilon_r` for all rows at once; then
  :math:`\partial f_{r,o}/\partial W_{ac} = \sum_\ell g_{r,\ell,a}\,x_{r,\ell,c}` (ℓ over extra
  leading dims, or over output positions of the im2col-unfolded input of a convolution). So no
  per-example gradient of a whole weight matrix is ever formed -- the cost that makes a generic
  per-example Jacobian memory-bound. Any other parameter entries (norm layers, rank-1 factors,
  custom modules) get theirs from ``jacrev`` of single examples vmapped over the batch, or, for
  networks that cannot be vmapped over single examples (data-dependent Python control flow;
  :class:`FlatFunctional` already turns Pyro's value checks off), from ``jacrev`` of sub-batches of at most :data:`FALLBACK_BLOCK`
  examples (each cotangent then pulls back through the whole sub-batch: b times the work).
* ``"auto"`` (default): forward when :math:`M \le K \cdot O` (K·O the output rows of one
  example, see below), reverse otherwise -- the fewer of columns and per-example outputs.

Either way only the parameter *tensors* holding subnetwork entries take part (:func:`narrow`):
the others are constants, so no tangent or gradient is formed for them. Batches are cut into
sub-batches so that one block holds about ``max_elements`` numbers (a soft bound: activations
come on top); everything runs on the device of the network's parameters. A layer rule is used
only for a layer that runs once per forward on rows that are the network's output rows, and
only if, on a probe batch, the last output row depends on no other row of the layer's output;
otherwise its entries go to ``jacrev`` (as for networks that mix examples, whose per-example
Jacobians are those of the whole batch).

**Members.** A network that maps B inputs to K·B rows, member-major (row ``k·B + b`` is member
k on example b, as :class:`~rank1_pyro.laplace.functional.Rank1PointNetwork`), is treated as K
members with the member-*averaged* log-likelihood :math:`\frac1K \sum_k \log p(y_n \mid f_k(x_n))`
(the likelihood term of the averaged ELBO at point-estimate factors): every row carries weight
1/K in :math:`H` and in the log-likelihood. Blocks are returned as ``(K, b, ...)``.

One concept, one module (hence over 400 lines): Jacobians and generalized Gauss-Newton curvature of a (sub)network, in memory-bounded blocks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jacrev, jvp, vjp, vmap

from .._checks import one_of, positive_int
from .base import LIKELIHOOD_NAMES, batches, likelihood_name
from .functional import FlatFunctional

__all__ = [
    "LIKELIHOOD_NAMES",
    "JACOBIAN_MODES",
    "DEFAULT_MAX_ELEMENTS",
    "FALLBACK_BLOCK",
    "likelihood_name",
    "as_batches",
    "narrow",
    "supports_per_example",
    "JacobianColumns",
    "jacobian_blocks",
    "jacobian_columns",
    "ggn_factor",
    "log_likelihood",
    "Curvature",
    "ggn",
]

JACOBIAN_MODES = ("auto", "forward", "reverse")
#: default soft bound on the numbers held in one block of Jacobian entries
DEFAULT_MAX_ELEMENTS = 2**25
#: examples per sub-batch when ``jacrev`` cannot be vmapped over single examples
FALLBACK_BLOCK = 16


#: ``(x, y or None)`` pairs from a DataLoader (any iterable of ``x`` or ``(x, y, ...)`` batches), a
#: pair of tensors ``(x, y)`` (one batch), or a tensor ``x`` (one batch), checked: the library's one
#: batch reader, :func:`rank1_pyro.laplace.base.batches`
as_batches = batches


def _entries(f: FlatFunctional) -> tuple[torch.Tensor, torch.Tensor]:
    """For every entry of θ: the index of its parameter tensor and its position inside it."""
    starts = torch.tensor([0, *f.numels], device=f.full_map.device).cumsum(0)
    idx = f.indices if f.indices is not None else torch.arange(int(starts[-1]), device=starts.device)
    owner = torch.bucketize(idx, starts[1:], right=True)
    return owner, idx - starts[owner]


def narrow(functional: FlatFunctional) -> FlatFunctional:
    """The same function of the same θ, over only the parameter tensors that hold its entries.

    For a functional restricted to ``indices``, the returned one has ``param_names`` = the
    tensors those indices fall in (the rest become fixed) and the indices re-based, in the same
    order, so its ``theta_map`` and Jacobian columns are identical; an unrestricted functional,
    or one whose entries touch every tensor, is returned as is.
    """
    if functional.indices is None:
        return functional
    owner, local = _entries(functional)
    touched = sorted(set(owner.tolist()))
    if len(touched) == len(functional.numels):
        return functional
    new_starts = torch.zeros(len(functional.numels), dtype=torch.long, device=owner.device)
    offset = 0
    for t in touched:
        new_starts[t] = offset
        offset += functional.numels[t]
    names = [functional.param_names[t] for t in touched]
    return FlatFunctional(functional.module, names, local + new_starts[owner])


def supports_per_example(functional: FlatFunctional, x: torch.Tensor) -> bool:
    """Whether the network can be vmapped over single examples (tried on up to two of ``x``)."""
    theta = functional.theta_map
    try:
        with torch.no_grad():
            vmap(lambda xi: functional(theta, xi.unsqueeze(0)))(x[:2])
    except (RuntimeError, ValueError, NotImplementedError):
        return False
    return True


def _rule(module: nn.Module, attr: str) -> str | None:
    """The layer rule for parameter ``attr`` of ``module``: ``"linear"``, ``"conv2d"`` or None."""
    if attr not in ("weight", "bias"):
        return None
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        return "linear"
    if (
        isinstance(module, nn.Conv2d)
        and type(module).forward is nn.Conv2d.forward
        and module.groups == 1
        and module.padding_mode == "zeros"
        and isinstance(module.padding, tuple)
    ):
        return "conv2d"
    return None


class _Hooks:
    """Forward hooks on the rule layers for one call: record inputs and output shapes, or add
    the perturbations ``eps`` to the outputs."""

    def __init__(self, layers, eps=None):
        self.layers, self.eps = layers, eps
        self.inputs, self.shapes, self.calls = {}, {}, {}

    def __enter__(self):
        self.handles = [module.register_forward_hook(self._hook(path)) for path, module in self.layers]
        return self

    def _hook(self, path):
        def hook(module, args, out):
            self.calls[path] = self.calls.get(path, 0) + 1
            if self.eps is not None:
                return out + self.eps[path]
            self.inputs[path], self.shapes[path] = args[0], out.shape
            return out

        return hook

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


class JacobianColumns:
    """Outputs and Jacobian columns of ``functional`` at its MAP point, batch by batch.

    Args:
        functional: the network as a function of θ (a subnetwork via ``restrict``).
        mode: ``"auto"``, ``"forward"`` or ``"reverse"`` (module docstring).
        max_elements: soft bound on the numbers in one block (sets the sub-batch size).
        per_example: reverse mode, for entries without a layer rule: vmap ``jacrev`` over single
            examples (``None``: when :func:`supports_per_example`).
        layer_rules: use the ``nn.Linear``/``nn.Conv2d`` rules in reverse mode (``False``: every
            column by ``jacrev``).

    The plan (mode, which entries a layer rule covers, sub-batch size) is made on the first
    batch and kept: later batches must have the same shape apart from their size.
    """

    def __init__(
        self,
        functional: FlatFunctional,
        mode: str = "auto",
        max_elements: int = DEFAULT_MAX_ELEMENTS,
        per_example: bool | None = None,
        layer_rules: bool = True,
    ):
        one_of("mode", mode, JACOBIAN_MODES)
        self.f = narrow(functional)
        self.theta = self.f.theta_map
        self.requested_mode = mode
        self.max_elements = positive_int("max_elements", max_elements)
        self.per_example = per_example
        self.layer_rules = bool(layer_rules)
        self.mode = None  # set by the first batch

    @property
    def num_columns(self) -> int:
        return self.f.num_params

    # -- planning --------------------------------------------------------------------------
    def _plan(self, x: torch.Tensor) -> None:
        f, M = self.f, self.f.num_params
        with torch.no_grad():
            probe = f(self.theta, x[:1])
        self.members, self.outputs = K, O = probe.shape
        if self.requested_mode == "auto":
            self.mode = "forward" if M <= K * O else "reverse"
        else:
            self.mode = self.requested_mode
        if self.mode == "forward":
            self.rows_per_block = max(1, self.max_elements // (K * O * M))
            return
        self._plan_rules(x[:2])
        generic_size = 0 if self.generic is None else self.generic.full_map.numel()
        if self.generic is not None and self.per_example is None:
            self.per_example = supports_per_example(self.generic, x)
        per_row = K * O * max(generic_size, M * self.positions, 1)
        self.rows_per_block = max(1, self.max_elements // per_row)
        if self.generic is not None and not self.per_example:
            # jacrev of a sub-batch pulls each of its K·b·O cotangents back through all b examples
            self.rows_per_block = min(self.rows_per_block, FALLBACK_BLOCK)

    def _plan_rules(self, x2: torch.Tensor) -> None:
        """Split θ's entries between layer rules and ``jacrev``; check the rule layers on ``x2``."""
        f = self.f
        owner, local = _entries(f)
        candidates = {}
        if self.layer_rules:
            for t in sorted(set(owner.tolist())):
                path, _, attr = f.param_names[t].rpartition(".")
                module = f.module.get_submodule(path)
                kind = _rule(module, attr)
                if kind is not None:
                    candidates.setdefault(path, (module, kind))
        with _Hooks([(p, m) for p, (m, _) in candidates.items()]) as hooks, torch.no_grad():
            rows = f(self.theta, x2).shape[0]
        # one call per forward, on inputs whose rows are the network's output rows ...
        candidates = {
            p: c
            for p, c in candidates.items()
            if hooks.calls.get(p) == 1 and hooks.inputs[p].shape[0] == rows and hooks.shapes[p][0] == rows
        }
        if candidates and rows > 1:
            # ... and whose rows do not interact: the last output row depends on no other layer row
            layers = [(p, m) for p, (m, _) in candidates.items()]
            eps = {p: self.theta.new_zeros(hooks.shapes[p]) for p in candidates}

            def perturbed(eps):
                with _Hooks(layers, eps):
                    return f(self.theta, x2)

            out, pullback = vjp(perturbed, eps)
            cotangent = torch.zeros_like(out)
            cotangent[-1] = 1.0
            grads = pullback(cotangent)[0]
            candidates = {p: c for p, c in candidates.items() if not bool(grads[p][:-1].any())}
        self.layers = []  # (path, module, kind, [(positions in θ, positions in the tensor, attr)])
        covered = torch.zeros(owner.shape, dtype=torch.bool, device=owner.device)
        self.positions = 1
        for path, (module, kind) in candidates.items():
            parts = []
            for attr in ("weight", "bias"):
                name = f"{path}.{attr}" if path else attr
                if name in f.param_names:
                    hit = owner == f.param_names.index(name)
                    if bool(hit.any()):
                        parts.append((hit.nonzero().squeeze(1), local[hit], attr))
                        covered |= hit
            self.layers.append((path, module, kind, parts))
            shape = hooks.shapes[path]
            self.positions = max(self.positions, math.prod(shape[1:-1]) if kind == "linear" else math.prod(shape[2:]))
        self.generic_positions = (~covered).nonzero().squeeze(1)
        self.generic = None
        if self.generic_positions.numel():
            idx = f.indices if f.indices is not None else torch.arange(f.full_map.numel(), device=owner.device)
            self.generic = narrow(FlatFunctional(f.module, f.param_names, idx[self.generic_positions]))

    # -- computing -------------------------------------------------------------------------
    def blocks(self, x: torch.Tensor) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield ``(start, out, J)`` for consecutive sub-batches ``x[start:start + b]``: ``out``
        ``(K, b, O)`` and ``J`` ``(K, b, O, M)``."""
        if not torch.is_tensor(x) or x.dim() == 0 or x.shape[0] == 0:
            raise ValueError("x must be a non-empty batch (B, ...)")
        if self.mode is None:
            self._plan(x)
        K, O, M = self.members, self.outputs, self.num_columns
        step = self.rows_per_block
        for start in range(0, x.shape[0], step):
            xb = x[start : start + step]
            out, J = self._forward(xb) if self.mode == "forward" else self._reverse(xb)
            yield start, out.reshape(K, -1, O), J.reshape(K, -1, O, M)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f(θ_*, x), J)``: outputs ``(R, O)`` and ``J`` ``(R, O, M)`` in the network's row
        order (``R = K·B``, member-major), i.e. the columns of ``functional.jacobian(x)``."""
        blocks = list(self.blocks(x))
        out = torch.cat([o for _, o, _ in blocks], dim=1)
        J = torch.cat([j for _, _, j in blocks], dim=1)
        return out.reshape(-1, out.shape[-1]), J.reshape(-1, *J.shape[-2:])

    def _forward(self, x):
        f, theta, M = self.f, self.theta, self.num_columns
        with torch.no_grad():
            out = f(theta, x)
        chunk = max(1, min(M, self.max_elements // (f.full_map.numel() + out.numel())))
        cols = []
        for c0 in range(0, M, chunk):
            n = min(chunk, M - c0)
            basis = torch.zeros(n, M, dtype=theta.dtype, device=theta.device)
            basis[torch.arange(n), torch.arange(c0, c0 + n)] = 1
            cols.append(vmap(lambda v: jvp(lambda t: f(t, x), (theta,), (v,))[1])(basis))
        return out, torch.cat(cols).permute(1, 2, 0)

    def _reverse(self, x):
        J = out = None
        if self.layers:
            out, cols = self._rule_columns(x)
            J = out.new_zeros(*out.shape, self.num_columns)
            for positions, values in cols:
                J[..., positions] = values
        if self.generic is not None:
            gen_out, gen_J = self._generic_columns(x)
            if J is None:
                return gen_out, gen_J
            J[..., self.generic_positions] = gen_J
        return out, J

    def _rule_columns(self, x):
        """Columns of the layer-rule entries (module docstring): O VJPs on the batch."""
        f, theta = self.f, self.theta
        layers = [(path, module) for path, module, _, _ in self.layers]
        with _Hooks(layers) as plain, torch.no_grad():
            f(theta, x)

        def perturbed(eps):
            with _Hooks(layers, eps):
                return f(theta, x)

        eps = {path: theta.new_zeros(shape) for path, shape in plain.shapes.items()}
        out, pullback = vjp(perturbed, eps)
        R, O = out.shape
        basis = torch.eye(O, dtype=out.dtype, device=out.device).unsqueeze(1).expand(O, R, O)
        grads = vmap(pullback)(basis)[0]  # path -> (O, R, *layer output shape)
        cols = []
        for path, module, kind, parts in self.layers:
            g, inp = grads[path], plain.inputs[path]
            if kind == "linear":
                g = g.reshape(O, R, -1, g.shape[-1])  # (O, R, L, out)
                inp = inp.reshape(R, g.shape[2], inp.shape[-1])  # (R, L, in); L explicit: in may be 0
            else:
                g = g.reshape(O, R, g.shape[2], -1).transpose(-1, -2)  # (O, R, L, C_out)
                inp = F.unfold(inp, module.kernel_size, module.dilation, module.padding, module.stride).transpose(1, 2)
            fan_in = inp.shape[-1]  # in, or C_in·kh·kw for a convolution
            for positions, local, attr in parts:
                if attr == "weight":
                    values = torch.einsum("orlm,rlm->rom", g[..., local // fan_in], inp[..., local % fan_in])
                else:
                    values = g[..., local].sum(2).transpose(0, 1)
                cols.append((positions, values))
        return out.detach(), cols

    def _generic_columns(self, x):
        """``jacrev`` per example (vmapped over single examples), or of the whole sub-batch."""
        f = self.generic
        theta = f.theta_map
        if self.per_example:

            def one(t, xi):
                out = f(t, xi.unsqueeze(0))
                return out, out

            J, out = vmap(jacrev(one, has_aux=True), in_dims=(None, 0))(theta, x)  # (b, K, O, m), (b, K, O)
            return out.transpose(0, 1).reshape(-1, out.shape[-1]), J.transpose(0, 1).reshape(-1, *J.shape[-2:])

        def batch(t):
            out = f(t, x)
            return out, out

        J, out = jacrev(batch, has_aux=True)(theta)
        return out, J


def jacobian_blocks(
    functional: FlatFunctional,
    x: torch.Tensor,
    mode: str = "auto",
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    per_example: bool | None = None,
    layer_rules: bool = True,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """:meth:`JacobianColumns.blocks` of a one-off :class:`JacobianColumns`."""
    return JacobianColumns(functional, mode, max_elements, per_example, layer_rules).blocks(x)


def jacobian_columns(
    functional: FlatFunctional,
    x: torch.Tensor,
    mode: str = "auto",
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    per_example: bool | None = None,
    layer_rules: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f(θ_*, x), J)`` with ``J`` ``(R, O, M)`` equal to ``functional.jacobian(x)``, computed
    column-restricted (see :class:`JacobianColumns`)."""
    return JacobianColumns(functional, mode, max_elements, per_example, layer_rules)(x)


def ggn_factor(out: torch.Tensor, J: torch.Tensor, likelihood: str, sigma_noise: float = 1.0) -> torch.Tensor:
    r""":math:`A = L^\top J` per row with :math:`\Lambda = L L^\top`, so :math:`J^\top \Lambda J = A^\top A`.

    ``out``: ``(..., O)`` outputs at θ_*; ``J``: ``(..., O, M)``; returns ``(..., O, M)``.
    """
    if likelihood_name(likelihood) == "normal":
        return J / sigma_noise
    p = torch.softmax(out, dim=-1).unsqueeze(-1)  # (..., O, 1)
    return p.sqrt() * (J - (p * J).sum(-2, keepdim=True))


def check_labels(y: torch.Tensor, num_classes: int) -> None:
    """Class labels: integers in ``0..num_classes-1`` (a clear error instead of an indexing failure)."""
    if y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
        raise TypeError(f"data: class labels must be integers, got dtype {y.dtype}")
    if y.numel() and (bool(y.min() < 0) or bool(y.max() >= num_classes)):
        raise ValueError(
            f"data: labels out of range: expected 0..{num_classes - 1}, got min {int(y.min())}, max {int(y.max())}"
        )


def log_likelihood(out: torch.Tensor, y: torch.Tensor, likelihood: str, sigma_noise: float = 1.0) -> torch.Tensor:
    r""":math:`\sum \log p(y \mid f)` over all rows of ``out`` ``(..., O)`` with targets ``y``: class
    indices ``(...)``, or regression targets ``(...)`` (O = 1) or ``(..., O)``; in float64."""
    out = out.double()
    if likelihood_name(likelihood) == "categorical":
        check_labels(y, out.shape[-1])
        return torch.log_softmax(out, -1).gather(-1, y.long().unsqueeze(-1)).sum()
    y = y.double().reshape(out.shape)
    var = float(sigma_noise) ** 2
    return -0.5 * ((y - out) ** 2).sum() / var - 0.5 * out.numel() * math.log(2 * math.pi * var)


@dataclass
class Curvature:
    """The result of :func:`ggn`: the GGN (``(M, M)``, or its diagonal ``(M,)``), the
    member-averaged log-likelihood of the data at θ_* (``None`` without targets), N, K, O."""

    matrix: torch.Tensor
    log_likelihood: float | None
    num_data: int
    num_members: int
    num_outputs: int


def ggn(
    functional: FlatFunctional,
    data,
    likelihood: str,
    sigma_noise: float = 1.0,
    diagonal: bool = False,
    mode: str = "auto",
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    jacobians: JacobianColumns | None = None,
    dtype: torch.dtype | None = None,
) -> Curvature:
    r"""The GGN :math:`H = \frac1K\sum_{n,k} J_{nk}^\top \Lambda_{nk} J_{nk}` over θ of ``functional``.

    Args:
        functional: the network as a function of θ (a subnetwork via ``restrict``).
        data: a DataLoader of ``(x, y)`` (or ``x``) batches, or tensors (see :func:`as_batches`);
            targets are only needed for the log-likelihood.
        likelihood: ``"categorical"``/``"classification"`` or ``"normal"``/``"regression"``.
        sigma_noise: the observation noise stddev σ of ``"normal"``.
        diagonal: return only :math:`\operatorname{diag} H` (memory M instead of M²).
        mode, max_elements: see :class:`JacobianColumns`.
        jacobians: a :class:`JacobianColumns` of ``functional`` to use (and keep planned).
        dtype: the floating dtype H is accumulated in (default: θ's). H is the only ``(M, M)``
            tensor: every block is added to it in place (``addmm_``).
    """
    likelihood = likelihood_name(likelihood)
    if not sigma_noise > 0:
        raise ValueError(f"sigma_noise must be > 0, got {sigma_noise!r}")
    jac = JacobianColumns(functional, mode, max_elements) if jacobians is None else jacobians
    theta = jac.theta
    M = jac.num_columns
    dtype = theta.dtype if dtype is None else dtype
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    H = torch.zeros((M,) if diagonal else (M, M), dtype=dtype, device=theta.device)
    loglik, num_data, labelled = 0.0, 0, True
    with torch.no_grad():
        for x, y in as_batches(data):
            x = x.to(theta.device)
            for start, out, J in jac.blocks(x):
                K, b, _ = out.shape
                A = ggn_factor(out, J, likelihood, sigma_noise).reshape(-1, M).to(dtype)
                if diagonal:
                    H += A.pow(2).sum(0) / K
                else:
                    H.addmm_(A.T, A, alpha=1.0 / K)
                if y is None:
                    labelled = False
                else:
                    yb = y[start : start + b].to(theta.device)
                    loglik += (
                        log_likelihood(out, yb.unsqueeze(0).expand(K, *yb.shape), likelihood, sigma_noise).item() / K
                    )
            num_data += x.shape[0]
    if num_data == 0:
        raise ValueError("data is empty")
    return Curvature(H, loglik if labelled else None, num_data, jac.members, jac.outputs)
