r"""The classic baselines as posteriors: a deep ensemble and MC dropout.

Both implement the :class:`~rank1_pyro.inference.predictive.Posterior` protocol (``likelihood``
and ``sample_predictions(x, S)`` returning ``(S, K, B, C)`` probabilities or ``(S, K, B, 2)``
Gaussian moments), so :func:`~rank1_pyro.inference.predict`, :mod:`rank1_pyro.metrics` and the
benchmarks treat them exactly like a rank-1 model or a Laplace posterior.

* :class:`DeepEnsemble` (Lakshminarayanan et al., 2017): K deterministic networks trained
  independently (own initialisation, own data order). The posterior is the equal-weight
  mixture of point masses :math:`q(\theta) = \frac1K \sum_k \delta_{\theta_k}`, so its
  predictive is the average of the members' predictives,
  :math:`p(y \mid x) = \frac1K \sum_k \operatorname{softmax} f(\theta_k, x)`. Predictions have
  ``S = 1`` (the members are deterministic) and ``K`` = the number of members.
* :class:`MCDropout` (Gal & Ghahramani, 2016): one network with dropout layers, trained as
  usual, and kept in dropout mode at prediction; each of the S samples is a forward pass with
  fresh Bernoulli masks, :math:`p(y \mid x) \approx \frac1S \sum_s \operatorname{softmax}
  f(\theta \circ m_s, x)`. The S passes run as one batch: the model is evaluated under
  ``pyro.plate("samples", S, dim=-3)``, which tiles the input S times (see
  :meth:`~rank1_pyro.models.Rank1Model.outputs`), and every row of the tiled batch draws its
  own masks. Predictions have ``K = 1``.

Every network is wrapped in a :class:`~rank1_pyro.models.Rank1Model` with ``ensemble_size=1``
(the deterministic special case, see :mod:`rank1_pyro.inference.train`), so members train with
:func:`~rank1_pyro.inference.train.train` and predict with
:class:`~rank1_pyro.inference.predictive.Rank1Posterior`, like every other model of the library.

:func:`insert_dropout` adds dropout layers to a sequential network; :func:`lenet5_dropout_net`
is the LeNet-5 of :func:`~rank1_pyro.models.lenet5_net` with them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.modules.dropout import _DropoutNd

from ._checks import one_of, positive_int
from .inference.predictive import Rank1Posterior, _device_of, _module_mode, empty_guide
from .inference.train import History, train
from .models import Rank1Model, lenet5_net
from .models.base import LIKELIHOODS

__all__ = ["DeepEnsemble", "MCDropout", "member_seeds", "insert_dropout", "lenet5_dropout_net"]


def _deterministic_model(net: nn.Module, likelihood: str) -> Rank1Model:
    """``net`` as a one-member model (or ``net`` itself when it already is a one-member model)."""
    if isinstance(net, Rank1Model):
        if net.ensemble_size != 1:
            raise ValueError(
                f"expected a deterministic network (ensemble_size 1), got ensemble_size {net.ensemble_size}"
            )
        return net
    if not isinstance(net, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(net).__name__}")
    one_of("likelihood", likelihood, LIKELIHOODS)
    # flat_batch: the network sees an ordinary (N, ...) batch, whatever its forward assumes
    return Rank1Model(net, ensemble_size=1, likelihood=likelihood, flat_batch=True)


def member_seeds(seed: int, ensemble_size: int) -> list[int]:
    """``ensemble_size`` distinct 31-bit seeds derived from ``seed`` (numpy's ``SeedSequence``).

    Unlike ``seed + k`` they do not collide with the seeds of other runs (the members of the
    ensemble of seed 0 are not the networks of seeds 1, 2, ...).
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    positive_int("ensemble_size", ensemble_size)
    return [int(s) >> 1 for s in np.random.SeedSequence(seed).generate_state(ensemble_size)]


class DeepEnsemble(nn.Module):
    r"""K independently trained deterministic networks as one posterior (module docstring).

    Args:
        members: the K networks (plain ``nn.Module`` s mapping a batch ``(B, ...)`` to outputs
            ``(B, C)``, or one-member :class:`~rank1_pyro.models.Rank1Model` s). Each is wrapped
            in a one-member model; ``self.members[k].net`` is network k.
        likelihood: ``"categorical"`` (outputs are logits) or ``"normal"`` (one mean per example,
            each member with its own learned noise scale).

    Build members with distinct initialisations with :meth:`from_builder`, train them with
    :meth:`fit`. ``sample_predictions`` runs the members one after the other (K is small) and
    returns ``(1, K, B, C)`` whatever ``num_samples`` is: the members are point estimates.
    """

    def __init__(self, members: Sequence[nn.Module], likelihood: str = "categorical"):
        super().__init__()
        if isinstance(members, nn.Module) or not isinstance(members, Sequence) or len(members) == 0:
            raise ValueError(f"members must be a non-empty sequence of networks, got {type(members).__name__}")
        self.likelihood = one_of("likelihood", likelihood, LIKELIHOODS)
        self.members = nn.ModuleList(_deterministic_model(m, likelihood) for m in members)
        if any(m.likelihood != likelihood for m in self.members):
            raise ValueError(f"every member must have likelihood {likelihood!r}")

    @classmethod
    def from_builder(
        cls, build: Callable[[], nn.Module], ensemble_size: int = 4, seed: int = 0, likelihood: str = "categorical"
    ) -> DeepEnsemble:
        """K networks ``build()``, member k initialised under ``torch.manual_seed(member_seeds(seed, K)[k])``.

        The global random state is left as it was.
        """
        if isinstance(build, nn.Module) or not callable(build):
            raise TypeError(f"build must be a function returning a new network, got {type(build).__name__}")
        members = []
        for member_seed in member_seeds(seed, ensemble_size):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(member_seed)
                members.append(build())
        return cls(members, likelihood)

    @property
    def ensemble_size(self) -> int:
        return len(self.members)

    @property
    def device(self) -> torch.device:
        return _device_of(self)

    def fit(self, data, config=None, /, *, seed: int = 0, **overrides) -> list[History]:
        """Train every member on ``data`` independently (its own data order and random draws):
        :func:`~rank1_pyro.inference.train.train` ``(member, None, data, config, seed=member_seeds(seed, K)[k],
        **overrides)``. Returns the K training histories."""
        if "guide" in overrides:
            raise TypeError("DeepEnsemble.fit: the members are deterministic and take no guide")
        return [
            train(member, None, data, config, seed=member_seed, **overrides)
            for member, member_seed in zip(self.members, member_seeds(seed, self.ensemble_size))
        ]

    def member_posteriors(self) -> list[Rank1Posterior]:
        """One single-member posterior per network (each predicts ``(S, 1, B, C)``)."""
        return [Rank1Posterior(member, empty_guide) for member in self.members]

    @torch.no_grad()
    def sample_predictions(self, x: torch.Tensor, num_samples: int) -> torch.Tensor:
        """The members' predictions side by side: ``(1, K, B, C)`` (or ``(1, K, B, 2)`` for regression)."""
        positive_int("num_samples", num_samples)
        return torch.cat([p.sample_predictions(x, 1) for p in self.member_posteriors()], dim=1)

    def extra_repr(self) -> str:
        return f"ensemble_size={self.ensemble_size}, likelihood={self.likelihood!r}"


class MCDropout(Rank1Posterior):
    r"""MC dropout: a network with dropout layers, with dropout on at prediction (module docstring).

    Args:
        net: the network (with at least one dropout layer), or a one-member
            :class:`~rank1_pyro.models.Rank1Model` around it.
        likelihood: ``"categorical"`` or ``"normal"`` (ignored when ``net`` is a model).
        max_rows: the most rows (draws × B) of one forward; more draws run in chunks
            (see :class:`~rank1_pyro.inference.predictive.Rank1Posterior`).

    Train it with :meth:`fit` (the network is trained as an ordinary deterministic one, dropout
    active as always in training). ``sample_predictions(x, S)`` returns ``(S, 1, B, C)``: every
    other layer runs in eval mode, only the dropout layers keep sampling masks.
    """

    def __init__(self, net: nn.Module, likelihood: str = "categorical", max_rows: int = 8192):
        model = _deterministic_model(net, likelihood)
        if not any(isinstance(m, _DropoutNd) for m in model.modules()):
            raise ValueError("MCDropout: the network has no dropout layer (torch.nn.Dropout, Dropout2d, ...)")
        super().__init__(model, empty_guide, max_rows=max_rows)

    @property
    def net(self) -> nn.Module:
        return self.model.net

    def dropout_layers(self) -> list[_DropoutNd]:
        return [m for m in self.model.modules() if isinstance(m, _DropoutNd)]

    def fit(self, data, config=None, /, **overrides) -> History:
        """Train the network: :func:`~rank1_pyro.inference.train.train` ``(model, None, data, config, **overrides)``."""
        if "guide" in overrides:
            raise TypeError("MCDropout.fit: the network is deterministic and takes no guide")
        return train(self.model, None, data, config, **overrides)

    def sample_outputs(self, x: torch.Tensor, num_samples: int) -> torch.Tensor:
        """Outputs of S forward passes with independent dropout masks: ``(S, 1, B, C)``.

        Called by :meth:`sample_predictions` after it has put the model in eval mode; the
        dropout layers are switched to training mode for the passes and back afterwards.
        """
        with _module_mode(self.dropout_layers(), training=True):
            return super().sample_outputs(x, num_samples)


# --------------------------------------------------------------------------------------- dropout networks

_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def insert_dropout(net: nn.Sequential, p: float = 0.1) -> nn.Sequential:
    r"""A copy of ``net`` with ``nn.Dropout(p)`` in front of every weight layer but the first.

    Dropout then acts on the input of every hidden weight layer (Gal & Ghahramani's placement
    "after every convolutional and dense layer" of their Bayesian LeNet), never on the raw
    input. ``net`` is not modified.
    """
    if not isinstance(net, nn.Sequential):
        raise TypeError(f"insert_dropout needs an nn.Sequential, got {type(net).__name__}")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"p must be a dropout probability in [0, 1), got {p!r}")
    layers, seen_weight_layer = [], False
    for module in net:
        if isinstance(module, _WEIGHT_LAYERS):
            if seen_weight_layer:
                layers.append(nn.Dropout(p))
            seen_weight_layer = True
        layers.append(copy.deepcopy(module))
    if not seen_weight_layer:
        raise ValueError("insert_dropout: the network has no Linear or Conv layer")
    return nn.Sequential(*layers)


def lenet5_dropout_net(num_classes: int = 10, in_channels: int = 1, p: float = 0.1) -> nn.Sequential:
    """:func:`~rank1_pyro.models.lenet5_net` with dropout (probability ``p``) in front of its
    second convolution and each of its three dense layers (:func:`insert_dropout`)."""
    return insert_dropout(lenet5_net(num_classes, in_channels), p)
