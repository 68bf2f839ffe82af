r"""The methods registry: every method the library compares, built and fitted one way.

A *method* turns a network architecture and training data into a posterior that
:func:`~rank1_pyro.inference.predict` accepts:

* ``deterministic``: the network, maximum a posteriori (L2 weight decay);
* ``mc-dropout``: the network with dropout (p = ``dropout``) in front of every hidden weight layer,
  dropout on at prediction (:class:`~rank1_pyro.baselines.MCDropout`);
* ``deep-ensemble``: K independently initialised and trained networks
  (:class:`~rank1_pyro.baselines.DeepEnsemble`);
* ``batchensemble``: the rank-1 network with point-estimate factors (:class:`DeltaGuide`);
* ``rank1-{gaussian,cauchy}[-{avg,mix}]``: the rank-1 BNN, prior N(1, σ²) or Cauchy(1, σ) on the
  factors, the mixture of K mean-field Gaussians as the guide (factor means at random signs with
  P(+1) = ``init_sign_prob``), trained with the averaged (``-avg``) or the mixture (``-mix``) ELBO;
  without the suffix, with ``settings.train.objective``;
* ``subnet-laplace``: subnetwork linearized Laplace around the trained ``deterministic`` network;
* ``projected``: the null-space projected posterior of the trained ``deterministic`` network;
* ``rank1-laplace``: full-covariance Laplace over all factors of a trained rank-1 model
  (``rank1-gaussian-avg``) under the rank-1 prior, predicting by sampling.

The last three are *post-hoc*: :data:`POSTHOC_BASE` names the trained method each starts from.
Every method is built from an :class:`Architecture` (the deterministic network and its rank-1
model; :meth:`Architecture.from_zoo` takes any network of the model zoo), so the same table can
be produced for an MLP on digits (``rank1-pyro demo``) or LeNet-5 on Fashion-MNIST
(``benchmarks/quality.py``)::

    arch = Architecture.from_zoo("lenet5", num_classes=10, input_shape=(1, 28, 28))
    det = fit_method("deterministic", arch, (x, y), MethodSettings(TrainConfig(epochs=5)), seed=0)
    laplace = fit_method("subnet-laplace", arch, (x, y), MethodSettings(), seed=0, base=det)
    prediction = predict(laplace.posterior, x_test, num_samples=laplace.num_samples)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pyro
import torch
from torch import nn

from ._checks import one_of
from .baselines import DeepEnsemble, MCDropout, insert_dropout
from .inference import DeltaGuide, MixtureGuide, Rank1Posterior
from .inference.objectives import ESTIMATORS, AveragedELBO
from .inference.predictive import empty_guide
from .inference.train import train
from .inference.train_config import TrainConfig
from .laplace import ProjectedPosterior, SubnetLaplace, rank1_point_network
from .models import Rank1Model
from .models.base import LIKELIHOODS
from .models.params import count_parameters
from .models.zoo import network, rank1_network
from .priors import Cauchy, Gaussian

__all__ = [
    "METHODS",
    "TRAINED",
    "POSTHOC_BASE",
    "Architecture",
    "MethodSettings",
    "Fitted",
    "fit_method",
    "check_methods",
    "training_curve",
]

#: every method, in table order
METHODS = (
    "deterministic",
    "mc-dropout",
    "batchensemble",
    "deep-ensemble",
    "rank1-gaussian-avg",
    "rank1-gaussian-mix",
    "rank1-cauchy-avg",
    "rank1-cauchy-mix",
    "subnet-laplace",
    "projected",
    "rank1-laplace",
)
#: post-hoc posterior -> the trained method it starts from
POSTHOC_BASE = {"subnet-laplace": "deterministic", "projected": "deterministic", "rank1-laplace": "rank1-gaussian-avg"}
#: the methods that train a network
TRAINED = tuple(m for m in METHODS if m not in POSTHOC_BASE)
_OBJECTIVES = {"avg": "averaged", "mix": "mixture"}
_PRIORS = {"gaussian": Gaussian, "cauchy": Cauchy}


def _rank1_parts(method: str) -> tuple[str, str | None] | None:
    """``(prior family, objective or None)`` of a ``rank1-<family>[-<avg|mix>]`` name, else ``None``."""
    parts = method.split("-")
    if parts[0] != "rank1" or len(parts) not in (2, 3) or parts[1] not in _PRIORS:
        return None
    if len(parts) == 3 and parts[2] not in _OBJECTIVES:
        return None
    return parts[1], _OBJECTIVES[parts[2]] if len(parts) == 3 else None


def check_methods(methods) -> list[str]:
    """``methods`` as a list, each a trained method, a post-hoc one or ``rank1-<family>[-<avg|mix>]``."""
    methods = [methods] if isinstance(methods, str) else list(methods)
    unknown = [m for m in methods if m not in METHODS and _rank1_parts(m) is None]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; valid: {list(METHODS)} (or rank1-<gaussian|cauchy>)")
    return methods


@dataclass(frozen=True)
class Architecture:
    """One network, built three ways: ``net()`` the deterministic network, ``rank1(K, prior)`` its
    rank-1 model, and ``flat_batch``, the layout of the deterministic model (``True`` for networks
    that take ``(B, ...)`` inputs only, e.g. convolutions). ``likelihood``: ``"categorical"``
    (the network outputs logits) or ``"normal"`` (one regression mean per example; every method
    learns the noise stddev as a point estimate, :class:`~rank1_pyro.models.Rank1Model`); the
    ``rank1`` builder must build its model with the same likelihood."""

    net: Callable[[], nn.Module]
    rank1: Callable[[int, object], Rank1Model]
    flat_batch: bool = True
    likelihood: str = "categorical"

    def __post_init__(self):
        one_of("likelihood", self.likelihood, LIKELIHOODS)

    @classmethod
    def from_zoo(
        cls, name: str, num_classes: int, input_shape, likelihood: str = "categorical", **model_args
    ) -> Architecture:
        """Network ``name`` of the model zoo (:mod:`rank1_pyro.models.zoo`); for ``likelihood="normal"``
        give ``num_classes=1`` (one output, the regression mean)."""
        return cls(
            net=lambda: network(name, num_classes, input_shape, **model_args),
            rank1=lambda k, prior: rank1_network(
                name, num_classes, k, prior, input_shape=input_shape, likelihood=likelihood, **model_args
            ),
            flat_batch=name != "mlp",
            likelihood=likelihood,
        )


@dataclass(frozen=True)
class MethodSettings:
    """Hyperparameters shared by every method (defaults: the rank-1 paper's and its reference code's).

    ``train`` (:class:`~rank1_pyro.inference.train_config.TrainConfig`: optimiser, schedule, L2 as
    weight decay on the network weights, never on the factors, KL annealing, device) is the same
    for every trained method; its ``objective`` applies to the methods that do not name one
    (``batchensemble``, ``rank1-<family>``; ``None``: the library default), the deterministic
    networks train with the library default. ``averaged_estimator`` is the estimator
    (:class:`~rank1_pyro.inference.objectives.Rank1ELBO`) of the methods trained with the averaged
    ELBO: ``"split"`` gives each member its own B/K rows of the batch (about 0.3× the cost of
    tiling it); the mixture ELBO always tiles.
    """

    train: TrainConfig = field(default_factory=lambda: TrainConfig(weight_decay=1e-4, device="cpu", progress=False))
    ensemble_size: int = 4
    prior_scale: float = 0.1
    init_sign_prob: float | None = 0.5  # None: factor means start at 1
    dropout: float = 0.1
    rank1_samples: int = 4  # posterior draws per member at prediction (x K members)
    averaged_estimator: str = "member"  # the averaged ELBO's estimator: "member", "example" or "split"
    dropout_samples: int = 16
    laplace_subnetwork: int = 1000
    laplace_selection: str = "largest-swag-variance"
    laplace_fit_examples: int | None = None  # None: the whole training set
    projected_fit_examples: int = 512
    projected_iterations: int = 20
    projected_probes: int = 8
    projected_samples: int = 8
    rank1_laplace_fit_examples: int = 200

    def __post_init__(self):
        one_of("averaged_estimator", self.averaged_estimator, ESTIMATORS)


@dataclass
class Fitted:
    """A fitted method: its posterior, the draws it predicts with, its trainable parameters, the
    seconds its training (and posterior fitting) took, its model and guide, details of a post-hoc
    fit (prior precision, subnetwork size, ...) and the training curve (:func:`training_curve`)."""

    posterior: object
    num_samples: int
    parameters: int
    seconds: float
    model: object = None
    guide: object = None
    details: dict | None = None
    curve: list[dict] | None = None


def _subset(data, n: int | None):
    x, y = data
    n = x.shape[0] if n is None else min(n, x.shape[0])
    return x[:n], y[:n]


#: the per-epoch numbers a training curve keeps (those present in the history)
CURVE_KEYS = ("epoch", "lr", "kl_weight", "nll", "accuracy", "val_nll", "val_accuracy")


def training_curve(histories) -> list[dict]:
    """Per-epoch ``{epoch, lr, kl_weight, nll, accuracy, val_nll, val_accuracy}`` (those recorded) of
    one training history, or the mean over several (a deep ensemble's members)."""
    histories = list(histories)
    curve = []
    for entries in zip(*(h.epochs for h in histories)):
        keys = [k for k in CURVE_KEYS if all(k in e for e in entries)]
        curve.append({k: sum(float(e[k]) for e in entries) / len(entries) for k in keys})
    return curve


def _objective(name: str | None, s: MethodSettings):
    """The training objective of a rank-1 method: the averaged ELBO with ``s.averaged_estimator``,
    else the name (``None``: the library default)."""
    return AveragedELBO(estimator=s.averaged_estimator) if name == "averaged" else name


def _train(method: str, arch: Architecture, data, s: MethodSettings, seed: int, val_data=None) -> Fitted:
    point = s.train.replace(objective=None, seed=seed)  # deterministic networks: the default objective
    if method == "deterministic":
        model = Rank1Model(arch.net(), ensemble_size=1, likelihood=arch.likelihood, flat_batch=arch.flat_batch)
        history = train(model, None, data, point, val_data=val_data)
        posterior = Rank1Posterior(model, empty_guide)
        return Fitted(posterior, 1, count_parameters(model), history.seconds, model, curve=training_curve([history]))
    if method == "mc-dropout":
        posterior = MCDropout(insert_dropout(arch.net(), s.dropout), arch.likelihood)
        history = posterior.fit(data, point, val_data=val_data)
        params, curve = count_parameters(posterior.model), training_curve([history])
        return Fitted(posterior, s.dropout_samples, params, history.seconds, posterior.model, curve=curve)
    if method == "deep-ensemble":
        ensemble = DeepEnsemble.from_builder(arch.net, s.ensemble_size, seed=seed, likelihood=arch.likelihood)
        histories = ensemble.fit(data, point, seed=seed, val_data=val_data)
        seconds, curve = sum(h.seconds for h in histories), training_curve(histories)
        return Fitted(ensemble, 1, count_parameters(ensemble), seconds, ensemble, curve=curve)
    if method == "batchensemble":
        model = arch.rank1(s.ensemble_size, Gaussian(1.0, s.prior_scale))
        guide, objective, samples = DeltaGuide(model), s.train.objective, 1
    else:
        family, objective = _rank1_parts(method)
        model = arch.rank1(s.ensemble_size, _PRIORS[family](1.0, s.prior_scale))
        guide = MixtureGuide(model, init_sign_prob=s.init_sign_prob)
        objective, samples = objective or s.train.objective, s.rank1_samples
    history = train(model, guide, data, s.train, objective=_objective(objective, s), seed=seed, val_data=val_data)
    params = count_parameters(model, guide)
    posterior = Rank1Posterior(model, guide)
    return Fitted(posterior, samples, params, history.seconds, model, guide, curve=training_curve([history]))


def _laplace_details(la) -> dict:
    return {
        "prior_precision": la.prior_precision,
        "subnetwork": la.num_params,
        "covariance_entries": la.num_params * (la.num_params + 1) // 2,
    }


def _posthoc(method: str, data, s: MethodSettings, base: Fitted) -> Fitted:
    from .data import to_loader

    start = time.perf_counter()
    likelihood = base.model.likelihood
    # regression: the network has no noise model of its own; the trained model's noise stddev is the posterior's
    noise = float(base.model.noise_scale().detach()) if likelihood == "normal" and method != "rank1-laplace" else None
    if method == "subnet-laplace":
        posterior = SubnetLaplace(
            base.model.net,
            likelihood,
            s.laplace_selection,
            subnetwork_size=s.laplace_subnetwork,
            predictive="glm",
            sigma_noise=noise,
        ).fit(to_loader(*_subset(data, s.laplace_fit_examples), batch_size=256))
        samples, details = 1, _laplace_details(posterior)
    elif method == "projected":
        posterior = ProjectedPosterior(
            base.model.net,
            likelihood,
            num_iterations=s.projected_iterations,
            num_trace_probes=s.projected_probes,
            noise_scale=noise,
        ).fit(_subset(data, s.projected_fit_examples))
        posterior.draws(s.projected_samples)  # project the noise of the predictive's draws now (fitting time)
        samples = s.projected_samples
        details = {
            "alpha": posterior.alpha,
            "trace": posterior.trace_estimate,
            "num_params": posterior.num_params,
            "final_residual": float(posterior.convergence[-1]),
        }
    else:  # rank1-laplace
        posterior = SubnetLaplace(
            rank1_point_network(base.model, base.guide),
            likelihood,
            "rank1-factors",
            prior_precision=1.0 / s.prior_scale**2,
            prior_mean=1.0,
            predictive="nn",
            jacobian_mode="reverse",
            max_block_elements=2**17,
        ).fit(_subset(data, s.rank1_laplace_fit_examples))
        samples, details = s.rank1_samples, _laplace_details(posterior)
    seconds = time.perf_counter() - start
    return Fitted(posterior, samples, base.parameters, base.seconds + seconds, base.model, base.guide, details)


def fit_method(
    method: str,
    arch: Architecture,
    data,
    settings: MethodSettings,
    seed: int = 0,
    base: Fitted | None = None,
    val_data=None,
) -> Fitted:
    """Build and fit ``method`` on ``data = (x, y)``, everything random drawn from ``seed``.

    A trained method starts from a fresh Pyro parameter store with the random state (torch,
    Python, NumPy) seeded by ``seed``, so its initial weights, factor signs, data order and draws
    are a function of the seed. A post-hoc method needs ``base``, the fitted
    :data:`POSTHOC_BASE` method; its ``seconds`` count the base's training and its own fit.
    ``val_data = (x, y)``: a trained method is evaluated on it after every epoch (``Fitted.curve``).
    """
    (method,) = check_methods([method])
    if method in POSTHOC_BASE:
        if base is None:
            raise ValueError(f"{method} is fitted around a trained {POSTHOC_BASE[method]!r}: pass base=")
        torch.manual_seed(seed)
        return _posthoc(method, data, settings, base)
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    return _train(method, arch, data, settings, seed, val_data)
