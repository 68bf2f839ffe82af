r"""A network as a function of one flat parameter vector, and its Jacobian products.

Both post-hoc posteriors work with a trained network :math:`f(\theta, x)` around its MAP point
:math:`\theta_*` and need Jacobian-vector products :math:`J v` and vector-Jacobian products
:math:`J^\top u` of :math:`J = \partial f(\theta, x) / \partial \theta` at :math:`\theta_*`,
never the full Jacobian. :class:`FlatFunctional` provides them with ``torch.func``
(``functional_call``, ``jvp``, ``vjp``) for any ``nn.Module``, over all of its trainable
parameters or a chosen subset of parameter tensors; :meth:`FlatFunctional.restrict` narrows θ
further to individual entries (a subnetwork), so only those Jacobian columns are ever computed.

:func:`rank1_point_network` exposes a trained rank-1 model as such a network: the factors are
fixed at the guide's component means, and every member's outputs are stacked, so a Laplace or
projected posterior can be placed over W, the factors, or both.
"""

from __future__ import annotations

import pyro
import pyro.poutine as poutine
import torch
from torch import nn
from torch.func import functional_call, jvp, vjp

__all__ = ["FlatFunctional", "rank1_point_network", "Rank1PointNetwork"]


class FlatFunctional:
    r"""``f(θ, x)`` for ``module``, θ the concatenation of the selected parameter tensors.

    Args:
        module: the trained network, mapping a batch ``x`` to outputs ``(B, O)`` (or ``(B,)``,
            treated as ``O = 1``).
        param_names: names (as in ``named_parameters``) making up θ; default: every parameter
            with ``requires_grad``. The others stay fixed at their current values.
        indices: optional 1-D index tensor into that concatenation: θ is then only those entries
            (a subnetwork) and the rest are held at :math:`\theta_*`.

    ``theta_map`` is the current (MAP) value of θ. The module is used in eval mode.
    """

    def __init__(self, module: nn.Module, param_names=None, indices: torch.Tensor | None = None):
        self.module = module
        named = dict(module.named_parameters())
        if param_names is None:
            param_names = [n for n, p in named.items() if p.requires_grad]
        unknown = [n for n in param_names if n not in named]
        if unknown:
            raise ValueError(f"param_names: unknown parameters {unknown}; the module has {list(named)}")
        if not param_names:
            raise ValueError("param_names: no parameters selected")
        self.param_names = list(param_names)
        self.shapes = [named[n].shape for n in self.param_names]
        self.numels = [named[n].numel() for n in self.param_names]
        self.fixed = {n: p.detach() for n, p in named.items() if n not in self.param_names}
        self.buffers = {n: b.detach() for n, b in module.named_buffers()}
        self.full_map = torch.cat([named[n].detach().reshape(-1) for n in self.param_names])
        if indices is not None:
            indices = torch.as_tensor(indices, dtype=torch.long, device=self.full_map.device).reshape(-1)
            if indices.numel() == 0:
                raise ValueError("indices: the subnetwork is empty")
            if indices.min() < 0 or indices.max() >= self.full_map.numel():
                raise ValueError(
                    f"indices must lie in [0, {self.full_map.numel()}), got range "
                    f"[{int(indices.min())}, {int(indices.max())}]"
                )
            if torch.unique(indices).numel() != indices.numel():
                raise ValueError("indices must be distinct")
        self.indices = indices

    @property
    def theta_map(self) -> torch.Tensor:
        """θ at the MAP point (a copy)."""
        full = self.full_map
        return (full if self.indices is None else full[self.indices]).clone()

    @property
    def num_params(self) -> int:
        return self.full_map.numel() if self.indices is None else self.indices.numel()

    def restrict(self, indices: torch.Tensor) -> FlatFunctional:
        """The same network as a function of the entries ``indices`` of the full θ only."""
        return FlatFunctional(self.module, self.param_names, indices)

    def _params(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.indices is not None:
            return self._subnetwork_params(theta)
        params = dict(self.fixed)
        for name, chunk, shape in zip(self.param_names, theta.split(self.numels), self.shapes):
            params[name] = chunk.view(shape)
        return params

    def _subnetwork_params(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Scatter the subnetwork's entries into their own tensors only: tensors without any stay
        constants, so neither tangents nor (per-example) gradients are formed for them."""
        if getattr(self, "_segments", None) is None:
            starts = torch.tensor([0, *self.numels], device=self.indices.device).cumsum(0)
            owner = torch.bucketize(self.indices, starts[1:], right=True)
            order = torch.argsort(owner, stable=True)
            counts = torch.bincount(owner, minlength=len(self.numels)).tolist()
            local = (self.indices - starts[owner])[order].split(counts)
            self._segments = (order, counts, local)
        order, counts, local = self._segments
        params = dict(self.fixed)
        maps = self.full_map.split(self.numels)
        for name, shape, value, count, where, piece in zip(
            self.param_names, self.shapes, maps, counts, local, theta[..., order].split(counts, dim=-1)
        ):
            params[name] = (value.index_put((where,), piece) if count else value).view(shape)
        return params

    def __call__(self, theta: torch.Tensor, x) -> torch.Tensor:
        """Outputs ``(B, O)`` of the network with parameters θ."""
        was_training = self.module.training
        self.module.eval()
        try:
            # no data-dependent value checks under torch.func transforms (they cannot be vmapped)
            with pyro.validation_enabled(False):
                out = functional_call(self.module, (self._params(theta), self.buffers), (x,))
        finally:
            self.module.train(was_training)
        return out.unsqueeze(-1) if out.dim() == 1 else out.reshape(out.shape[0], -1)

    def jvp(self, x, v: torch.Tensor, theta: torch.Tensor | None = None):
        """``(f(θ, x), J v)``, both ``(B, O)``; θ defaults to the MAP point."""
        theta = self.theta_map if theta is None else theta
        return jvp(lambda t: self(t, x), (theta,), (v,))

    def vjp(self, x, u: torch.Tensor, theta: torch.Tensor | None = None) -> torch.Tensor:
        """``Jᵀ u`` for a cotangent ``u`` of shape ``(B, O)``; returns a vector like θ."""
        theta = self.theta_map if theta is None else theta
        _, pullback = vjp(lambda t: self(t, x), theta)
        return pullback(u)[0]

    def jacobian(self, x) -> torch.Tensor:
        """The dense Jacobian ``(B, O, P)`` (small problems and tests only)."""
        theta = self.theta_map
        return torch.func.jacrev(lambda t: self(t, x))(theta)


class Rank1PointNetwork(nn.Module):
    """A trained rank-1 model as a deterministic network of W, biases and factor *means*.

    ``forward(x)`` returns the outputs of all K members stacked member-major,
    ``(K·B, C)``: row ``k·B + b`` is member k on example b. Its parameters are the model's own
    (shared W, per-member biases) plus one ``nn.Parameter`` per factor site holding the guide's
    component means (``factors.<site with dots as '__'>``), so a Laplace or projected posterior
    can select W, the factors, or both by parameter name.
    """

    def __init__(self, model: nn.Module, guide: nn.Module):
        super().__init__()
        self.model = model
        self.factors = nn.ParameterDict(
            {name.replace(".", "__"): nn.Parameter(value.detach().clone()) for name, value in guide.median().items()}
        )

    @property
    def ensemble_size(self) -> int:
        return self.model.ensemble_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        data = {key.replace("__", "."): value for key, value in self.factors.items()}
        with poutine.block(), poutine.condition(data=data):
            out = self.model.outputs(x)
        return out.reshape(-1, out.shape[-1])


def rank1_point_network(model: nn.Module, guide: nn.Module) -> Rank1PointNetwork:
    """See :class:`Rank1PointNetwork`; ``guide`` must have ``median()`` (the rank-1 guides do)."""
    if not hasattr(guide, "median"):
        raise TypeError(
            f"guide must provide median() (MixtureGuide, DeltaGuide, CauchyGuide), got {type(guide).__name__}"
        )
    return Rank1PointNetwork(model, guide)
