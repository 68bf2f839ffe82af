r"""Post-hoc calibration for any posterior: temperature scaling and split conformal prediction sets.

Both are fitted on held-out labelled data (a *calibration* split, never the training data) and
apply to any classification posterior of the library (rank-1, subnetwork Laplace, projected):

* **temperature scaling** (Guo et al., 2017) divides every posterior sample's logits by one
  scalar T > 0, fitted to minimise the NLL of the mixture predictive on the calibration split
  (:func:`fit_temperature`). Only the sample's log-probabilities are needed:
  :math:`\operatorname{softmax}(\log p / T) = \operatorname{softmax}(z / T)` for
  :math:`p = \operatorname{softmax}(z)`, so :class:`TemperatureScaled` wraps any posterior.
  The predicted class does not change.
* **split conformal prediction** (Vovk et al.; the "LAC" score of Sadinle et al., 2019): with
  scores :math:`s_i = 1 - p(y_i \mid x_i)` on n calibration examples and
  :math:`\hat q` their :math:`\lceil (n+1)(1-\alpha) \rceil`-th smallest,
  the set :math:`\{c : 1 - p(c \mid x) \le \hat q\}` holds the true class with probability at least
  :math:`1 - \alpha` for exchangeable data (:func:`conformal_threshold`, :func:`conformal_sets`).

``rank1-pyro evaluate RUN_DIR --calibrate [--conformal 0.1]`` fits both on half of the test set,
reports the metrics and the measured coverage on the other half, and saves them in
``RUN_DIR/calibration.json``, which ``rank1-pyro predict`` and :meth:`~rank1_pyro.runs.Run.predict`
then apply.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

__all__ = [
    "TemperatureScaled",
    "fit_temperature",
    "conformal_threshold",
    "conformal_sets",
    "set_coverage",
    "save_calibration",
    "load_calibration",
    "CALIBRATION_FILE",
]

CALIBRATION_FILE = "calibration.json"


def _tempered(log_samples: torch.Tensor, temperature) -> torch.Tensor:
    return torch.log_softmax(log_samples / temperature, dim=-1)


class TemperatureScaled:
    """``posterior`` with every sample's logits divided by ``temperature`` (classification only)."""

    def __init__(self, posterior, temperature: float):
        if posterior.likelihood != "categorical":
            raise ValueError("temperature scaling applies to classification posteriors")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        self.posterior, self.temperature, self.likelihood = posterior, float(temperature), "categorical"
        self.model = getattr(posterior, "model", None)  # the network's dtype, for predict()

    @property
    def device(self):
        return getattr(self.posterior, "device", torch.device("cpu"))

    @torch.no_grad()
    def sample_log_predictions(self, x: torch.Tensor, num_samples: int) -> torch.Tensor:
        if hasattr(self.posterior, "sample_log_predictions"):
            log_samples = self.posterior.sample_log_predictions(x, num_samples)
        else:
            log_samples = self.posterior.sample_predictions(x, num_samples).clamp_min(1e-30).log()
        return _tempered(log_samples, self.temperature)

    def sample_predictions(self, x: torch.Tensor, num_samples: int) -> torch.Tensor:
        return self.sample_log_predictions(x, num_samples).exp()


def _mixture_nll(log_samples: torch.Tensor, labels: torch.Tensor, log_t: torch.Tensor) -> torch.Tensor:
    s, k = log_samples.shape[:2]
    mix = torch.logsumexp(_tempered(log_samples, log_t.exp()).flatten(0, 1), dim=0) - math.log(s * k)
    return -mix.gather(1, labels.view(-1, 1)).mean()


def fit_temperature(log_samples: torch.Tensor, labels: torch.Tensor, bounds=(0.05, 20.0)) -> float:
    """The temperature minimising the NLL of the tempered mixture predictive.

    ``log_samples``: per-sample log-probabilities ``(S, K, N, C)`` (or ``(N, C)`` for one
    deterministic network; e.g. :attr:`~rank1_pyro.inference.predictive.Prediction.log_samples`),
    ``labels``: ``(N,)``. Fitted by a golden-section search over log T in ``bounds`` (the NLL is
    unimodal in T for one network) to 1e-7 in log T.
    """
    log_samples = log_samples.double()
    if log_samples.dim() == 2:
        log_samples = log_samples[None, None]
    if log_samples.dim() != 4 or labels.shape != log_samples.shape[2:3]:
        raise ValueError(
            f"log_samples (S, K, N, C) and labels (N,) expected, got {tuple(log_samples.shape)} and "
            f"{tuple(labels.shape)}"
        )
    labels = labels.long()
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    golden = (math.sqrt(5) - 1) / 2

    def f(u):
        return _mixture_nll(log_samples, labels, torch.tensor(u, dtype=torch.float64)).item()

    a, b = lo, hi
    c, d = b - golden * (b - a), a + golden * (b - a)
    fc, fd = f(c), f(d)
    while b - a > 1e-7:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - golden * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + golden * (b - a)
            fd = f(d)
    return math.exp((a + b) / 2)


def conformal_threshold(probs: torch.Tensor, labels: torch.Tensor, alpha: float = 0.1) -> float:
    r"""The split-conformal threshold :math:`\hat q` of the scores :math:`1 - p(y_i \mid x_i)`:
    their :math:`\lceil (n+1)(1-\alpha) \rceil`-th smallest (1.0, every class, when that exceeds n)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    scores = 1.0 - probs.double().gather(1, labels.long().view(-1, 1)).flatten()
    n = len(scores)
    rank = math.ceil((n + 1) * (1 - alpha))
    if rank > n:
        return 1.0
    return scores.sort().values[rank - 1].item()


def conformal_sets(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """Boolean ``(N, C)``: class c is in example n's set when ``1 - p_nc <= threshold``."""
    return (1.0 - probs.double()) <= threshold + 1e-12


def set_coverage(sets: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """``(coverage, mean set size)``: the fraction of sets holding the true class, and their mean size."""
    covered = sets.gather(1, labels.long().view(-1, 1)).double().mean().item()
    return covered, sets.double().sum(1).mean().item()


def save_calibration(run_dir, posterior: str, values: dict) -> Path:
    """Record ``values`` (``temperature``, ``conformal``: {alpha: threshold}) for ``posterior`` of a run."""
    from .runs import write_json

    path = Path(run_dir) / CALIBRATION_FILE
    saved = json.loads(path.read_text()) if path.is_file() else {}
    saved[posterior] = values
    write_json(saved, path)
    return path


def load_calibration(run_dir, posterior: str = "rank1") -> dict | None:
    path = Path(run_dir) / CALIBRATION_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get(posterior)
