r"""Choosing the subnetwork of a subnetwork Laplace: which M of a network's P weights get a full covariance.

Every strategy of :data:`SUBNETWORK_STRATEGIES` maps a
:class:`~rank1_pyro.laplace.functional.FlatFunctional` (the network as a function of its flat θ,
in the order of ``torch.nn.utils.parameters_to_vector`` for the default θ) and a size to a sorted
CPU ``LongTensor`` of indices into θ; a size is a count :math:`1 \le M \le P` or a fraction of P in
(0, 1] (:func:`subnetwork_size`: :math:`\max(1, \operatorname{round}(fP))`).

**Largest marginal variance** (``"largest-variance"``, the paper's choice). A diagonal Laplace over
all P weights has the marginal variances

.. math:: v_p = \frac{1}{[\operatorname{diag} H_{\rm full}]_p + \delta}, \qquad
          \operatorname{diag} H_{\rm full} = \sum_{n,c} \bigl(J_n^\top L_{n,:,c}\bigr)^{\odot 2}

(the exact GGN diagonal, :mod:`~rank1_pyro.laplace.curvature`: O backward passes per example and P
numbers of memory), and the M largest :math:`v_p` are chosen. **Zero curvature is skipped:** an
entry with :math:`[\operatorname{diag} H]_p \le 10^{-12} \max_q [\operatorname{diag} H]_q` (e.g. the
weights of an input that is constant zero in the data, digits' blank corner pixels) has the largest
variance :math:`1/\delta` of all, yet the data says nothing about it: its posterior is the prior,
a Laplace over it equals the MAP (its predictive contribution is zero on the data and only prior
noise off it), and with only such entries the marginal likelihood has no optimum in δ. They are
ranked below every entry with curvature, so they are chosen only when M exceeds the entries that
have some.

**Largest SWAG variance** (``"largest-swag-variance"``, Maddox et al. 2019, diagonal). A short SGD
run from :math:`\theta_*` on a copy of θ (constant learning rate, momentum, weight decay; the mean
negative log-likelihood of the data, rows of a K-member network averaged as in the GGN) records
the first two moments of its iterates :math:`\theta^{(t)}`, t = 1..T,

.. math:: \bar\theta = \frac1T \sum_t \theta^{(t)}, \qquad
          v_p = \frac1T \sum_t \bigl(\theta^{(t)}_p\bigr)^2 - \bar\theta_p^2 ,

and the M largest :math:`v_p` are chosen (the network itself is not changed).

**Structural and simple choices.** ``"largest-magnitude"`` (:math:`|\theta_{*p}|`), ``"random"``
(uniform without replacement, seeded), ``"by-name"`` (all entries of the parameter tensors whose
names match ``fnmatch`` patterns), ``"last-layer"`` (all entries of the last module that owns
parameters of θ), and ``"rank1-factors"``: the factor means ``factors.*`` of a
:class:`~rank1_pyro.laplace.functional.Rank1PointNetwork`, i.e. a full-covariance Laplace over all
rank-1 factors. The structural ones take all their entries (leave the size unset).

:func:`select_subnetwork` runs a strategy by name, passing each only the context (data,
likelihood, σ, δ, block size) it accepts.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import positive_int
from .base import batches
from .curvature import DEFAULT_MAX_ELEMENTS, ggn, likelihood_name
from .functional import FlatFunctional

__all__ = [
    "SUBNETWORK_STRATEGIES",
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
    idx = torch.cat(
        [torch.arange(starts[i], starts[i + 1]) for i, n in enumerate(functional.param_names) if n in chosen]
    )
    if size is not None and subnetwork_size(size, functional.full_map.numel()) != idx.numel():
        raise ValueError(f"{strategy} selects all {idx.numel()} entries of {names}; leave the size unset")
    return idx


def largest_variance(
    functional: FlatFunctional,
    size,
    *,
    data,
    likelihood: str = "categorical",
    sigma_noise: float = 1.0,
    prior_precision: float = 1.0,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> torch.Tensor:
    r"""The ``size`` entries of θ with the largest variance :math:`1/(\operatorname{diag} H + \delta)`
    under a diagonal Laplace (exact GGN diagonal over all of θ on ``data``, δ = ``prior_precision``).

    Entries with zero curvature (:math:`\operatorname{diag} H \le 10^{-12} \max \operatorname{diag} H`,
    e.g. the weights of an input that is constant zero in the data) come last, whatever their
    variance: the data says nothing about them, so their posterior is the prior and a Laplace over
    them equals the MAP (and the marginal likelihood has no optimum). They are chosen only when
    ``size`` exceeds the entries with curvature.
    """
    if not prior_precision > 0:
        raise ValueError(f"prior_precision must be > 0, got {prior_precision!r}")
    diag = ggn(
        functional.restrict(None) if functional.indices is not None else functional,
        data,
        likelihood,
        sigma_noise,
        diagonal=True,
        max_elements=max_elements,
    ).matrix
    variance = 1.0 / (diag + prior_precision)
    flat = diag <= 1e-12 * diag.max().clamp_min(torch.finfo(diag.dtype).tiny)
    return _top(torch.where(flat, variance - variance.max() - 1.0, variance), size)


def largest_swag_variance(
    functional: FlatFunctional,
    size,
    *,
    data,
    likelihood: str = "categorical",
    sigma_noise: float = 1.0,
    epochs: int = 2,
    lr: float = 1e-2,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
) -> torch.Tensor:
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
            for x, y in batches(data):
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


def select_subnetwork(
    strategy: str, functional: FlatFunctional, size=None, context: dict | None = None, **options
) -> torch.Tensor:
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
