r"""The model zoo: every network by name, deterministic or rank-1, from one registry.

Each entry of :data:`ZOO` names a deterministic network builder, its default number of classes
and whether it is sized by its data (``input_shape``, one example's shape). Two functions read it:

* :func:`network` — the deterministic ``torch.nn`` network (maximum a posteriori training, the
  deep ensemble's members, the post-hoc posteriors' base, parameter counts);
* :func:`rank1_network` — the same network as a rank-1 Bayesian model: every dense layer and
  convolution becomes :math:`W \circ (r s^\top)` with factors :math:`r, s` drawn per member
  (:func:`~rank1_pyro.convert.rank1ize`), except for ``mlp``, which is built from
  :class:`~rank1_pyro.layers.Rank1Linear` layers directly (:func:`~rank1_pyro.models.rank1_mlp`) (the members broadcast instead of being
  flattened into the batch, the faster layout for dense-only networks).

:func:`~rank1_pyro.models.rank1_mlp` (a rank-1 MLP from its layer sizes) is the one rank-1
builder outside the registry.

::

    net = network("lenet5", num_classes=10, input_shape=(1, 28, 28))
    model = rank1_network("lenet5", num_classes=10, ensemble_size=4, prior=Gaussian(1.0, 0.1),
                          input_shape=(1, 28, 28))

Run configurations (:class:`~rank1_pyro.config.RunConfig`) and ``rank1-pyro params`` name their
model by a key of :data:`ZOO`; ``model_args`` are the builder's extra keywords (``hidden`` for
``mlp``, ``depth``/``width`` for ``wrn28_10``, ``hidden_size`` for ``lstm``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .. import convert
from .base import Rank1Model
from .lenet import lenet5_net
from .lstm import lstm_net
from .mlp import mlp, rank1_mlp
from .resnet import resnet18_cifar_net, resnet20_cifar_net, resnet50_net
from .wide_resnet import wide_resnet_net

__all__ = ["ZOO", "ZooEntry", "network", "rank1_network"]


@dataclass(frozen=True)
class ZooEntry:
    """A network of the zoo.

    ``build(num_classes, input_shape, **model_args)`` returns the deterministic network;
    ``input_shape`` is ``None`` when the caller does not know it (then ``needs_input_shape``
    networks refuse, the others use their usual input).
    """

    build: Callable[..., nn.Module]
    num_classes: int
    needs_input_shape: bool
    summary: str
    #: a rank-1 builder of its own, ``(num_classes, input_shape, ensemble_size, prior, likelihood,
    #: num_data, **model_args) -> Rank1Model``; default: :func:`~rank1_pyro.convert.rank1ize` of ``build``
    rank1: Callable[..., Rank1Model] | None = None


def _channels(input_shape, default: int) -> int:
    return default if input_shape is None else int(input_shape[0])


def _mlp_net(num_classes, input_shape, hidden=(128, 128)):
    layers = mlp(math.prod(input_shape), list(hidden), num_classes)
    return nn.Sequential(nn.Flatten(start_dim=-len(input_shape)), *layers)


def _mlp_rank1(num_classes, input_shape, ensemble_size, prior, likelihood, num_data, hidden=(128, 128)):
    layers = rank1_mlp(math.prod(input_shape), list(hidden), num_classes, ensemble_size=ensemble_size, prior=prior).net
    net = nn.Sequential(nn.Flatten(start_dim=-len(input_shape)), *layers)
    return Rank1Model(net, ensemble_size, likelihood=likelihood, num_data=num_data)


def _lstm(num_classes, input_shape, hidden_size=128, dense_hidden=()):
    return lstm_net(64 if input_shape is None else int(input_shape[-1]), hidden_size, num_classes, dense_hidden)


#: every network by name
ZOO: dict[str, ZooEntry] = {
    "lenet5": ZooEntry(
        lambda num_classes, input_shape: lenet5_net(num_classes, _channels(input_shape, 1)),
        10,
        False,
        "LeNet-5 on (C, H, W) images of at least 12x12 pixels",
    ),
    "resnet18_cifar": ZooEntry(
        lambda num_classes, input_shape: resnet18_cifar_net(num_classes, _channels(input_shape, 3)),
        10,
        False,
        "ResNet-18 for 32x32 images",
    ),
    "resnet20_cifar": ZooEntry(
        lambda num_classes, input_shape: resnet20_cifar_net(num_classes, _channels(input_shape, 3)),
        10,
        False,
        "ResNet-20 for 32x32 images",
    ),
    "wrn28_10": ZooEntry(
        lambda num_classes, input_shape, depth=28, width=10: wide_resnet_net(
            depth, width, num_classes, _channels(input_shape, 3)
        ),
        10,
        False,
        "Wide ResNet-28-10 (`depth`, `width`)",
    ),
    "resnet50": ZooEntry(
        lambda num_classes, input_shape: resnet50_net(num_classes), 1000, False, "torchvision's ResNet-50"
    ),
    "lstm": ZooEntry(_lstm, 2, False, "an LSTM classifier on (T, F) sequences (`hidden_size`, default 128)"),
    "mlp": ZooEntry(_mlp_net, 10, True, "an MLP on flattened inputs (`hidden`, default [128, 128])", _mlp_rank1),
}


def _entry(name: str) -> ZooEntry:
    if name not in ZOO:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(ZOO)}")
    return ZOO[name]


def network(name: str, num_classes: int | None = None, input_shape=None, **model_args) -> nn.Module:
    """The deterministic network ``name`` (a key of :data:`ZOO`) with its builder's ``model_args``."""
    entry = _entry(name)
    if entry.needs_input_shape and input_shape is None:
        raise ValueError(f"model {name!r} needs the input shape of the data (input_shape=...)")
    shape = None if input_shape is None else tuple(input_shape)
    try:
        return entry.build(entry.num_classes if num_classes is None else num_classes, shape, **model_args)
    except TypeError as e:
        raise ValueError(f"model_args {model_args!r} do not fit model {name!r}: {e}") from None


def rank1_network(
    name: str,
    num_classes: int | None = None,
    ensemble_size: int = 4,
    prior=None,
    *,
    input_shape=None,
    batchnorm: str = "shared",
    likelihood: str = "categorical",
    num_data: int | None = None,
    **model_args,
) -> Rank1Model:
    """The rank-1 Bayesian model of network ``name``: K = ``ensemble_size`` members, factor prior
    ``prior`` (default N(1, 0.1²)), observation model ``likelihood``, ELBO scaled to ``num_data``.

    ``batchnorm`` (``"shared"`` or ``"per_member"``) applies to networks with BatchNorm.
    """
    entry = _entry(name)
    if entry.rank1 is None:
        net = network(name, num_classes, input_shape, **model_args)
        return convert.rank1ize(
            net, ensemble_size, prior, batchnorm=batchnorm, likelihood=likelihood, num_data=num_data
        )
    if entry.needs_input_shape and input_shape is None:
        raise ValueError(f"model {name!r} needs the input shape of the data (input_shape=...)")
    classes = entry.num_classes if num_classes is None else num_classes
    try:
        return entry.rank1(classes, tuple(input_shape), ensemble_size, prior, likelihood, num_data, **model_args)
    except TypeError as e:
        raise ValueError(f"model_args {model_args!r} do not fit model {name!r}: {e}") from None
