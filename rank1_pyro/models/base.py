r"""The Pyro model around a network of rank-1 layers.

:class:`Rank1Model` turns a network (any ``nn.Module`` whose Bayesian layers are
:class:`~rank1_pyro.layers.Rank1Layer`) into a Pyro model ``model(x, y=None)``:

1. tile the batch over the K members: ``x`` of shape ``(B, ...)`` is viewed as ``(K, B, ...)``
   (an ``expand``, no copy);
2. run the network: the rank-1 layers sample their factors inside the member plate and the
   output has shape ``(..., K, B, C)``;
   (under :class:`~rank1_pyro.layers.SplitBatch`, an estimator of the averaged ELBO, each member
   gets its own B / K rows instead: ``(K, B / K, ...)``);
3. observe the labels inside ``pyro.plate("members", K, dim=-2)`` and
   ``pyro.plate("data", num_data, subsample=..., dim=-1)``: the data plate scales the
   minibatch log-likelihood by ``N / B``.

The observation site ``"obs"`` carries one log-likelihood per member and example; how the
member dim is reduced (average of member log-likelihoods, or log of the average likelihood)
is the *objective's* choice (:mod:`rank1_pyro.inference.objectives`), so the same model trains
with either ELBO.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.infer.util import is_validation_enabled
from pyro.nn import PyroModule
from pyro.nn.module import to_pyro_module_
from pyro.poutine.runtime import get_plates
from torch import nn

from .._checks import one_of, positive_int
from ..layers import MEMBER_DIM, factor_sites, members, rank1_layers, split_batch
from ..priors import PriorMap

__all__ = ["Rank1Model", "LIKELIHOODS", "set_prior"]

LIKELIHOODS = ("categorical", "normal")


def _sample_plate_shape() -> tuple[int, ...]:
    """Sizes of the active plates left of the member dim (particles, predictive samples).

    Read from the enclosing plates (:func:`pyro.poutine.runtime.get_plates`), so a flat-batch model
    tiles its input over exactly the sample dims its factors will carry.
    """
    sizes = {frame.dim: frame.size for frame in get_plates() if frame.dim is not None and frame.dim < MEMBER_DIM}
    if not sizes:
        return ()
    n = -min(sizes) + MEMBER_DIM
    return tuple(sizes.get(i - n + MEMBER_DIM, 1) for i in range(n))


def set_prior(net: nn.Module, prior) -> None:
    """Give every rank-1 layer of ``net`` the prior ``prior`` (a spec or a :class:`PriorMap`).

    Override patterns are checked against the factor site names (``"<layer path>.r"``) and a
    pattern that matches nothing raises :class:`ValueError`.
    """
    prior = PriorMap.coerce(prior)
    prior.check_patterns(site.name for site in factor_sites(net))
    for _, layer in rank1_layers(net):
        layer.prior = prior


class Rank1Model(PyroModule):
    r"""A Bayesian model :math:`p(y \mid x, \theta_k)` with rank-1 factors :math:`\theta_k`, k = 1..K.

    Args:
        net: the network; its rank-1 layers must all have ``ensemble_size == K``.
        ensemble_size: K (inferred from the rank-1 layers when omitted).
        likelihood: ``"categorical"`` (``net`` outputs logits) or ``"normal"`` (``net`` outputs
            one mean per example; the noise stddev is a learned point estimate unless
            ``noise_scale`` is given).
        num_data: N, the training-set size; the data plate scales minibatch log-likelihoods by
            N / B. ``None`` means the batch is the whole data set.
        num_classes: for checking labels; inferred from the output width when omitted.
        noise_scale: a fixed observation noise stddev for ``likelihood="normal"``.
        flat_batch: feed the network the flat layout ``(S·K·B, ...)`` (members and any sample
            plates folded into the batch, outermost first) instead of ``(..., K, B, ...)``.
            Needed for networks whose forward assumes a fixed input rank (torchvision's
            ``torch.flatten(x, 1)``, ``BatchNorm2d``); outputs are returned as ``(..., K, B, C)``
            either way.
    """

    def __init__(
        self,
        net: nn.Module,
        ensemble_size: int | None = None,
        likelihood: str = "categorical",
        num_data: int | None = None,
        noise_scale: float | None = None,
        flat_batch: bool = False,
    ):
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"Rank1Model: net must be a torch.nn.Module, got {type(net).__name__}")
        sizes = {layer.ensemble_size for _, layer in rank1_layers(net)}
        if ensemble_size is None:
            if len(sizes) != 1:
                raise ValueError(f"Rank1Model: cannot infer ensemble_size from the rank-1 layers (sizes {sizes})")
            ensemble_size = sizes.pop()
        self.ensemble_size = positive_int("ensemble_size", ensemble_size)
        if sizes - {self.ensemble_size}:
            raise ValueError(f"Rank1Model: ensemble_size={ensemble_size} but the rank-1 layers have sizes {sizes}")
        self.likelihood = one_of("likelihood", likelihood, LIKELIHOODS)
        to_pyro_module_(net)  # PyroModule containers give the sample sites their full module paths
        self.net = net
        self.num_data = num_data
        if likelihood == "normal" and noise_scale is None:
            self.noise_raw = nn.Parameter(torch.tensor(0.5413))  # softplus -> 1.0
        else:
            self.noise_raw = None
        self.fixed_noise_scale = noise_scale
        self.flat_batch = flat_batch
        self._arange = {}

    @property
    def num_data(self):
        return self._num_data

    @num_data.setter
    def num_data(self, value):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"num_data must be a positive integer or None, got {value!r}")
        self._num_data = value

    def noise_scale(self) -> torch.Tensor:
        """Observation noise stddev of the ``"normal"`` likelihood."""
        if self.noise_raw is None:
            return torch.tensor(float(self.fixed_noise_scale))
        return F.softplus(self.noise_raw)

    def outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Network outputs for all members: ``(..., K, B, C)`` (logits or regression means)."""
        if not torch.is_tensor(x):
            raise TypeError(f"x must be a tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[0] == 0:
            raise ValueError(f"x must be a non-empty batch (B, ...), got shape {tuple(x.shape)}")
        # value checks read the data back to the host: only under Pyro's validation, like Pyro's
        # own distribution checks (``train`` validates its first step; ``pyro.enable_validation(False)``)
        if x.is_floating_point() and is_validation_enabled() and not torch.isfinite(x).all():
            raise ValueError("x contains NaN or infinite values")
        split = split_batch()
        x = members(self.ensemble_size).tile(x) if split is None else split.rows(x, self.ensemble_size)  # (K, B, ...)
        if not self.flat_batch:
            return self.net(x)
        lead = _sample_plate_shape()
        out = self.net(x.expand(*lead, *x.shape).reshape(-1, *x.shape[2:]))
        return out.reshape(*lead, *x.shape[:2], *out.shape[1:])

    def predictive_distribution(self, out: torch.Tensor) -> dist.Distribution:
        """The observation distribution given network outputs ``out`` (batch shape ``(..., K, B)``)."""
        if self.likelihood == "categorical":
            return dist.Categorical(logits=out)
        if out.shape[-1] != 1:
            raise ValueError(f"likelihood='normal' needs one output per example, got output shape {tuple(out.shape)}")
        return dist.Normal(out.squeeze(-1), self.noise_scale().to(out.device))

    def _check_labels(self, y: torch.Tensor, batch: int, out: torch.Tensor) -> None:
        if not torch.is_tensor(y):
            raise TypeError(f"y must be a tensor, got {type(y).__name__}")
        if y.shape != (batch,):
            raise ValueError(f"y must have shape ({batch},) to match x, got {tuple(y.shape)}")
        if self.likelihood == "categorical":
            if y.is_floating_point() or y.dtype == torch.bool:
                raise TypeError(f"y must hold integer class labels, got dtype {y.dtype}")
            if not is_validation_enabled():
                return
            num_classes = out.shape[-1]
            if y.min() < 0 or y.max() >= num_classes:
                raise ValueError(
                    f"labels out of range: expected 0..{num_classes - 1}, got min {int(y.min())}, max {int(y.max())}"
                )
        elif is_validation_enabled() and not torch.isfinite(y).all():
            raise ValueError("y contains NaN or infinite values")

    def data_plate(self, batch_size: int, device) -> pyro.plate:
        """The data plate; it scales the minibatch log-likelihood by ``num_data / batch_size``."""
        key = (batch_size, device)
        if key not in self._arange:
            self._arange[key] = torch.arange(batch_size, device=device)
        size = batch_size if self.num_data is None else self.num_data
        if size < batch_size:
            raise ValueError(f"num_data={size} is smaller than the batch size {batch_size}")
        return pyro.plate("data", size, subsample=self._arange[key], dim=-1)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        out = self.outputs(x)
        if y is not None:
            self._check_labels(y, x.shape[0], out)
            split = split_batch()
            y = y if split is None else split.rows(y, self.ensemble_size)  # (K, B // K): each member's labels
        # a fresh plate records the "members" subsample site once per trace (autoguides expect it)
        with members(self.ensemble_size), self.data_plate(out.shape[-2], out.device):
            pyro.sample("obs", self.predictive_distribution(out), obs=y)
        return out

    def extra_repr(self) -> str:
        return f"ensemble_size={self.ensemble_size}, likelihood={self.likelihood!r}, num_data={self.num_data}"
