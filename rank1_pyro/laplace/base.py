r"""What the post-hoc posteriors share: one Gaussian around a trained network, its draws, its
predictives, its batches, and its file.

Both post-hoc posteriors of the library, :class:`~rank1_pyro.laplace.subnetwork.SubnetLaplace` and
:class:`~rank1_pyro.laplace.projected.ProjectedPosterior`, are Gaussians around the MAP point
:math:`\theta_*` of a trained network :math:`f(\theta, x)` (θ all of its weights, a subset of
parameter tensors, or a subnetwork of M entries), drawn as a fixed linear map of standard normal
noise:

.. math:: \theta = \theta_* + \Delta, \qquad \Delta = A\,\varepsilon, \qquad \varepsilon \sim \mathcal N(0, I),

with :math:`A = L^{-\top}` for the Laplace (:math:`L L^\top = H + \delta I`, so
:math:`\operatorname{Cov}\Delta = (H + \delta I)^{-1}`) and :math:`A = \alpha^{-1/2}\mathcal P` for the
projected posterior (:math:`\mathcal P` the projection onto the null space of the training Jacobian).
The class :class:`PostHocPosterior` holds what follows from that form alone:

**Cached draws.** The noise behind :meth:`~PostHocPosterior.sample_predictions` is drawn once and
kept (a bank of S rows, extended when more are asked for; ``clear_samples()`` forgets it), so every
batch of one :func:`~rank1_pyro.inference.predict` call sees the same S posterior samples -- the
mixture predictive :math:`\frac1S \sum_s p(y \mid x, \theta_s)` is one mixture over the whole data
set, not a fresh one per batch. The Laplace keeps ε (cheap to draw, :math:`A` is applied per call);
the projected posterior keeps :math:`\mathcal P\varepsilon` (each costs a projection, α is applied
per call, so a new α needs no new projections).

**Predictives at the draws.** For S draws :math:`\Delta_s`, in vmapped chunks of ``chunk_size``:

* linearized: :math:`f_{\rm lin}(\theta_s, x) = f(\theta_*, x) + J(x)\,\Delta_s`, one JVP per draw
  (``"glm-mc"`` of the Laplace, ``"linearized"`` of the projected posterior);
* network: :math:`f(\theta_* + \Delta_s, x)` (``"nn"`` of both).

Outputs are stacked as ``(S, K, B, O)``: K = ``ensemble_size`` members of a rank-1 point network
(rows ``k·B + b``, member-major), K = 1 otherwise. Probabilities are :math:`\operatorname{softmax}`
of the outputs (classification); a regression sample is the Gaussian
:math:`\mathcal N(f, \sigma^2)`, returned as its (mean, variance) pair ``(S, K, B, 2)``.

**Batches.** :func:`batches` is the one reader of data for both fits: a DataLoader (any iterable of
``x`` or ``(x, y, ...)`` batches), a pair of tensors ``(x, y)`` or a tensor ``x``, checked (non-empty,
finite, targets with as many rows as the inputs) and optionally cut into micro-batches.

**Files.** :meth:`~PostHocPosterior.state_dict` is the fitted state as plain data: tensors, numbers,
strings, lists and dicts (``torch.load(weights_only=True)`` reads it), with the settings the
constructor takes, the cached draws, and a SHA-256 fingerprint of the network's ``state_dict``.
:meth:`~PostHocPosterior.from_state_dict` rebuilds the posterior on a network (refused unless it
is the same network, by the fingerprint), and its predictions are those of the saved posterior,
draw for draw; :meth:`~PostHocPosterior.save` and :func:`load_posterior` write and read it
atomically as one ``torch.save`` file.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from torch.func import jvp, vmap

from .._checks import one_of, positive_int
from .functional import FlatFunctional, Rank1PointNetwork

__all__ = [
    "PostHocPosterior",
    "batches",
    "likelihood_name",
    "load_posterior",
    "read_state",
    "network_fingerprint",
    "LIKELIHOOD_NAMES",
    "POSTERIOR_KINDS",
    "FORMAT",
]

#: marker of a saved post-hoc posterior (a foreign file lacks it)
FORMAT = "rank1-pyro-posthoc-posterior"
VERSION = 1
#: kind name -> class, filled by the subclasses (``"laplace"``, ``"projected"``)
POSTERIOR_KINDS: dict[str, type[PostHocPosterior]] = {}
#: accepted likelihood names -> the library's name (the ``Posterior.likelihood`` values)
LIKELIHOOD_NAMES = {
    "classification": "categorical",
    "categorical": "categorical",
    "regression": "normal",
    "normal": "normal",
}


def likelihood_name(likelihood: str) -> str:
    """``"classification"``/``"categorical"`` -> ``"categorical"``; ``"regression"``/``"normal"`` -> ``"normal"``."""
    return LIKELIHOOD_NAMES[one_of("likelihood", likelihood, LIKELIHOOD_NAMES)]


def batches(
    data, *, name: str = "data", size: int | None = None, pairs: tuple[type, ...] = (tuple, list)
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """``(x, y or None)`` batches of ``data``, checked, optionally cut into pieces of at most ``size`` rows.

    ``data`` is an iterable (a DataLoader) of ``x`` or ``(x, y, ...)`` batches, a pair of tensors
    ``(x, y)`` (one batch), or a tensor ``x`` (one batch). A pair is a ``tuple`` or ``list`` of two
    tensors (``pairs``; with ``(tuple,)`` a list is always an iterable of batches). Error messages
    start with ``name``.
    """
    if torch.is_tensor(data):
        data = [data]
    elif isinstance(data, pairs) and len(data) == 2 and all(torch.is_tensor(d) for d in data):
        data = [tuple(data)]
    for batch in data:
        if isinstance(batch, (tuple, list)):
            if not batch:
                raise ValueError(f"{name}: got an empty batch")
            x, y = batch[0], (batch[1] if len(batch) > 1 else None)
        else:
            x, y = batch, None
        if not torch.is_tensor(x) or x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(f"{name}: every batch must hold a non-empty tensor of inputs (B, ...)")
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name}: the inputs contain NaN or infinite values")
        if y is not None and torch.is_tensor(y) and y.is_floating_point() and not bool(torch.isfinite(y).all()):
            raise ValueError(f"{name}: the targets contain NaN or infinite values")
        if y is not None and (not torch.is_tensor(y) or y.shape[:1] != x.shape[:1]):
            raise ValueError(
                f"{name}: targets must be a tensor with {x.shape[0]} rows, got "
                f"{tuple(y.shape) if torch.is_tensor(y) else type(y).__name__}"
            )
        if size is None:
            yield x, y
        else:
            ys = [None] * math.ceil(x.shape[0] / size) if y is None else y.split(size)
            yield from zip(x.split(size), ys)


def network_fingerprint(module: nn.Module) -> str:
    """SHA-256 of a network's ``state_dict`` (names, dtypes, shapes and values, read on the CPU):
    equal for the same weights on any device."""
    h = hashlib.sha256()
    for key, value in module.state_dict().items():
        h.update(key.encode())
        if torch.is_tensor(value):
            t = value.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _cpu(value):
    """Tensors (also inside lists and dicts) moved to the CPU and detached, for a file."""
    if torch.is_tensor(value):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_cpu(v) for v in value]
    return value


class PostHocPosterior:
    """The shared part of :class:`~rank1_pyro.laplace.SubnetLaplace` and
    :class:`~rank1_pyro.laplace.ProjectedPosterior` (module docstring).

    A subclass sets :attr:`KIND` and :attr:`PREDICTIVES` (at sampled draws, ``"nn"`` runs the
    network, every other name its linearization), and provides ``_functional()`` (the network as a function of θ and
    :math:`\\theta_*`), ``_new_noise(n)`` (n more rows of the bank), ``_noise_to_deltas(bank)``
    (rows of the bank -> :math:`\\Delta`), ``_check_fitted()``, ``_noise_variance(out)`` and the
    ``_settings``/``_fitted_state``/``_load_fitted_state`` triple of its file.
    """

    KIND: str = ""
    PREDICTIVES: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.KIND:
            POSTERIOR_KINDS[cls.KIND] = cls

    # -- common attributes -----------------------------------------------------------------
    def _init_common(self, model: nn.Module, likelihood: str, predictive: str, chunk_size: int) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.likelihood = likelihood_name(likelihood)
        self.ensemble_size = model.ensemble_size if isinstance(model, Rank1PointNetwork) else 1
        self.predictive = predictive
        self.chunk_size = positive_int("chunk_size", chunk_size)
        self._bank: torch.Tensor | None = None

    @property
    def predictive(self) -> str:
        """The predictive of :meth:`sample_predictions` (:attr:`PREDICTIVES`); may be switched after
        fitting (the draws are kept)."""
        return self._predictive

    @predictive.setter
    def predictive(self, value: str) -> None:
        self._predictive = one_of("predictive", value, self.PREDICTIVES)

    # -- cached draws ------------------------------------------------------------------------
    def clear_samples(self) -> None:
        """Forget the cached draws behind :meth:`sample_predictions`."""
        self._bank = None

    def _deltas(self, num_samples: int) -> torch.Tensor:
        r""":math:`\theta_s - \theta_*` for the first ``num_samples`` cached draws (drawing more if needed)."""
        have = 0 if self._bank is None else self._bank.shape[0]
        if num_samples > have:
            new = self._new_noise(num_samples - have)
            self._bank = new if self._bank is None else torch.cat([self._bank, new])
        return self._noise_to_deltas(self._bank[:num_samples])

    # -- predictives -------------------------------------------------------------------------
    def _check_x(self, x) -> torch.Tensor:
        if not torch.is_tensor(x) or x.dim() == 0 or x.shape[0] == 0:
            raise ValueError("x must be a non-empty batch (B, ...)")
        return x.to(self.device)

    @torch.no_grad()
    def sample_outputs(self, x: torch.Tensor, num_samples: int) -> torch.Tensor:
        """Outputs at ``num_samples`` cached posterior draws, ``(S, K, B, O)``: the linearized
        network or, with the ``"nn"`` predictive, the network itself."""
        positive_int("num_samples", num_samples)
        x = self._check_x(x)
        deltas = self._deltas(num_samples)
        f, theta = self._functional()
        outs = []
        for D in deltas.split(self.chunk_size):
            if self.predictive == "nn":
                outs.append(vmap(lambda d: f(theta + d, x))(D))
            else:
                out, jd = vmap(lambda d: jvp(lambda t: f(t, x), (theta,), (d,)))(D)
                outs.append(out + jd)
        out = torch.cat(outs)
        return out.reshape(num_samples, self.ensemble_size, x.shape[0], out.shape[-1])

    def _predictions(self, out: torch.Tensor, variance: torch.Tensor | None = None) -> torch.Tensor:
        """Outputs ``(S, K, B, O)`` -> probabilities ``(S, K, B, C)`` or Gaussian (mean, variance)
        pairs ``(S, K, B, 2)``; ``variance``: an output variance added to the noise's."""
        if self.likelihood == "categorical":
            return torch.softmax(out, dim=-1)
        self._check_one_output(out)
        mean = out.squeeze(-1)
        noise = self._noise_variance(out).expand_as(mean)
        return torch.stack([mean, noise if variance is None else variance.squeeze(-1) + noise], dim=-1)

    def sample_predictions(self, x: torch.Tensor, num_samples: int) -> torch.Tensor:
        """Probabilities ``(S, K, B, C)`` or Gaussian (mean, variance) pairs ``(S, K, B, 2)``."""
        return self._predictions(self.sample_outputs(x, num_samples))

    @staticmethod
    def _check_one_output(out: torch.Tensor) -> None:
        if out.shape[-1] != 1:
            raise ValueError(
                f"likelihood='normal' needs one output per example, got {out.shape[-1]} (output shape {tuple(out.shape)})"
            )

    # -- files -------------------------------------------------------------------------------
    def state_dict(self, **options) -> dict:
        """The fitted state as plain data (tensors on the CPU, numbers, strings, lists, dicts):
        ``format``, ``kind``, ``version``, ``network`` (the fingerprint of the network it was
        fitted on), ``settings`` (constructor arguments), ``state`` (what the fit computed) and
        ``draws`` (the cached noise behind :meth:`sample_predictions`, or ``None``)."""
        self._check_savable()
        return {
            "format": FORMAT,
            "version": VERSION,
            "kind": self.KIND,
            "network": network_fingerprint(self.model),
            "settings": _cpu(self._settings()),
            "state": _cpu(self._fitted_state(**options)),
            "draws": _cpu(self._bank),
        }

    def load_state_dict(self, state: dict) -> PostHocPosterior:
        """Restore a :meth:`state_dict` of a posterior of this kind on this network; returns ``self``."""
        check_state(state, self.KIND)
        if state["network"] != network_fingerprint(self.model):
            raise ValueError(
                f"this {self.KIND} posterior was fitted on another network (its weights differ): load it onto "
                "the network it was fitted on"
            )
        self._load_fitted_state(state["state"])
        draws = state.get("draws")
        self._bank = None if draws is None else draws.to(self.device)
        return self

    @classmethod
    def from_state_dict(cls, model: nn.Module, state: dict, **overrides) -> PostHocPosterior:
        """A posterior on ``model`` (the network it was fitted on) from a :meth:`state_dict`;
        ``overrides`` replace saved constructor settings (e.g. ``predictive``, ``chunk_size``)."""
        check_state(state, cls.KIND)
        settings = {**state["settings"], **overrides}
        return cls._from_settings(model, settings).load_state_dict(state)

    @classmethod
    def _from_settings(cls, model: nn.Module, settings: dict) -> PostHocPosterior:
        return cls(model, **settings)

    def save(self, path, **options) -> Path:
        """Write :meth:`state_dict` to ``path`` (one ``torch.save`` file, written atomically)."""
        from ..atomic import atomic_write

        state = self.state_dict(**options)
        return atomic_write(path, lambda f: torch.save(state, f))

    @classmethod
    def load(cls, path, model: nn.Module, **overrides) -> PostHocPosterior:
        """The posterior saved at ``path`` by :meth:`save`, on ``model`` (see :meth:`from_state_dict`)."""
        return cls.from_state_dict(model, read_state(path, cls.KIND), **overrides)

    # -- subclass hooks ----------------------------------------------------------------------
    def _functional(self) -> tuple[FlatFunctional, torch.Tensor]:
        raise NotImplementedError

    def _new_noise(self, n: int) -> torch.Tensor:
        raise NotImplementedError

    def _noise_to_deltas(self, bank: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _check_fitted(self) -> None:
        raise NotImplementedError

    def _check_savable(self) -> None:
        self._check_fitted()

    def _noise_variance(self, out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _settings(self) -> dict:
        raise NotImplementedError

    def _fitted_state(self, **options) -> dict:
        raise NotImplementedError

    def _load_fitted_state(self, state: dict) -> None:
        raise NotImplementedError


def check_state(state, kind: str | None = None) -> dict:
    """A :meth:`PostHocPosterior.state_dict` (of ``kind``, when given), or a ValueError saying what it is not."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        what = f"a dict with keys {sorted(map(str, state))[:8]}" if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"not a saved post-hoc posterior of rank1-pyro (no {FORMAT!r} marker; got {what})")
    if state.get("version") != VERSION:
        raise ValueError(f"saved posterior format version {state.get('version')!r}; this library reads {VERSION}")
    if kind is not None and state.get("kind") != kind:
        raise ValueError(f"the saved posterior is a {state.get('kind')!r} posterior, not {kind!r}")
    return state


def read_state(path, kind: str | None = None) -> dict:
    """The state dict saved at ``path`` (``torch.load(weights_only=True)``, on the CPU), checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no saved posterior at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt, or holding code (refused by weights_only)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path} is not a readable saved posterior (truncated or corrupt: {first})") from None
    try:
        return check_state(state, kind)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def load_posterior(path, model: nn.Module, **overrides) -> PostHocPosterior:
    """The posterior saved at ``path`` (a :class:`~rank1_pyro.laplace.SubnetLaplace` or
    :class:`~rank1_pyro.laplace.ProjectedPosterior`, by the file's ``kind``) on ``model``."""
    state = read_state(path)
    kind = state["kind"]
    if kind not in POSTERIOR_KINDS:
        raise ValueError(f"{path}: unknown posterior kind {kind!r}; known: {sorted(POSTERIOR_KINDS)}")
    return POSTERIOR_KINDS[kind].from_state_dict(model, state, **overrides)
