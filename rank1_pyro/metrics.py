r"""Quality metrics of predictive distributions.

Classification metrics take the *mixture* predictive ``probs`` of shape ``(N, C)`` (e.g.
:attr:`~rank1_pyro.inference.predictive.Prediction.probs`) and integer labels ``(N,)``:

* :func:`nll` -- :math:`-\frac1N \sum_n \log p(y_n \mid x_n)`; with
  :math:`p = \frac{1}{SK}\sum_{s,k} p(\cdot \mid x, \theta_{sk})` this is the mixture NLL.
* :func:`ece` -- expected calibration error with 15 equal-width confidence bins,
  :math:`\sum_b \frac{|B_b|}{N} \,|\mathrm{acc}(B_b) - \mathrm{conf}(B_b)|`.
* :func:`brier` -- :math:`\frac1N \sum_n \sum_c (p_{nc} - [y_n = c])^2`.
* :func:`ood_auroc` -- the probability that a random out-of-distribution input scores higher than
  a random in-distribution one (AUROC, scikit-learn's; ties count one half).
* :func:`disagreement`, :func:`pairwise_kl` -- diversity of the K members' predictives ``(K, N, C)``.

Regression: :func:`gaussian_nll`, :func:`rmse`, :func:`interval_coverage`.

Selective prediction and calibration, as torch-uncertainty reports them:

* :func:`adaptive_ece` -- ECE with 15 equal-*mass* bins (each holds N/15 examples by confidence).
* :func:`aurc` -- area under the risk-coverage curve: the mean, over k = 1..N, of the error rate of
  the k most confident predictions (lower is better; ties in confidence broken by order).
* :func:`selective_accuracy` -- the accuracy of the ``coverage`` fraction of most confident predictions.
* :func:`fpr_at_tpr` -- the false-positive rate at 95 % true-positive rate of telling
  in-distribution inputs (positives, scored higher) from out-of-distribution ones.
"""

from __future__ import annotations

import math

import torch

from ._checks import positive_int

__all__ = [
    "accuracy",
    "nll",
    "ece",
    "reliability",
    "brier",
    "ood_auroc",
    "disagreement",
    "pairwise_kl",
    "gaussian_nll",
    "rmse",
    "interval_coverage",
    "classification_metrics",
    "regression_metrics",
    "adaptive_ece",
    "aurc",
    "selective_accuracy",
    "fpr_at_tpr",
    "selective_metrics",
]

_EPS = 1e-12


def _check(probs: torch.Tensor, labels: torch.Tensor) -> None:
    if probs.dim() != 2:
        raise ValueError(f"probs must have shape (N, C), got {tuple(probs.shape)}")
    if labels.shape != probs.shape[:1]:
        raise ValueError(f"labels must have shape ({probs.shape[0]},), got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if not torch.isfinite(probs).all():
        raise ValueError("probs contains NaN or infinite values")
    if labels.numel() and (labels.min() < 0 or labels.max() >= probs.shape[1]):
        raise ValueError(f"labels out of range 0..{probs.shape[1] - 1}")
    if probs.numel():
        # probabilities: in [0, 1] and each row sums to 1 (a tolerance for float32/half rounding)
        tol = 1e-2 if probs.is_floating_point() and torch.finfo(probs.dtype).bits < 32 else 1e-3
        if probs.min() < -tol or probs.max() > 1 + tol:
            raise ValueError(
                f"probs must lie in [0, 1], got values in [{float(probs.min()):.4g}, {float(probs.max()):.4g}]"
            )
        err = (probs.double().sum(-1) - 1).abs()
        if err.max() > tol:
            row = int(err.argmax())
            raise ValueError(
                f"probs rows must sum to 1 (within {tol:g}): row {row} sums to {float(probs[row].double().sum()):.6g}; "
                "pass probabilities, e.g. softmax(logits), not logits or unnormalised scores"
            )


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    _check(probs, labels)
    return (probs.argmax(-1) == labels).double().mean().item()


def nll(probs: torch.Tensor, labels: torch.Tensor, log_probs: torch.Tensor | None = None) -> float:
    """Mean negative log predictive probability of the labels, never clamped.

    Pass ``log_probs`` (e.g. :attr:`~rank1_pyro.inference.predictive.Prediction.log_probs`, computed
    in log space) to stay exact where probabilities underflow: a probability that is 0 in floating
    point gives an infinite NLL here, not a capped one.
    """
    _check(probs, labels)
    if log_probs is not None:
        if log_probs.shape != probs.shape:
            raise ValueError(
                f"log_probs must have the shape of probs {tuple(probs.shape)}, got {tuple(log_probs.shape)}"
            )
        return -log_probs.double().gather(-1, labels.long().unsqueeze(-1)).mean().item()
    p = probs.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1).double()
    return -p.log().mean().item()


def reliability(probs: torch.Tensor, labels: torch.Tensor, num_bins: int = 15):
    """Per-bin mean confidence, accuracy and count for a reliability diagram (and :func:`ece`).

    Bin b of ``num_bins`` equal-width bins holds the confidences in (b/M, (b+1)/M].
    """
    _check(probs, labels)
    positive_int("num_bins", num_bins)
    conf, pred = probs.double().max(-1)
    correct = (pred == labels).double()
    bins = (conf * num_bins).ceil().long().clamp(1, num_bins) - 1
    count = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, bins, torch.ones_like(conf))
    sum_conf = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, bins, conf)
    sum_acc = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, bins, correct)
    safe = count.clamp_min(1)
    return sum_conf / safe, sum_acc / safe, count


def ece(probs: torch.Tensor, labels: torch.Tensor, num_bins: int = 15) -> float:
    conf, acc, count = reliability(probs, labels, num_bins)
    return ((count / count.sum().clamp_min(1)) * (acc - conf).abs()).sum().item()


def brier(probs: torch.Tensor, labels: torch.Tensor) -> float:
    _check(probs, labels)
    onehot = torch.nn.functional.one_hot(labels.long(), probs.shape[1]).double()
    return ((probs.double() - onehot) ** 2).sum(-1).mean().item()


def ood_auroc(score_in: torch.Tensor, score_out: torch.Tensor) -> float:
    """AUROC of telling out-of-distribution inputs (positives) from in-distribution ones by ``score``.

    scikit-learn's ``roc_auc_score`` (ties count one half). It refuses infinite scores, and an AUROC
    depends on the scores' order only, so it is given their dense ranks (equal scores, equal ranks).
    """
    from sklearn.metrics import roc_auc_score

    score_in, score_out = score_in.reshape(-1).double(), score_out.reshape(-1).double()
    if score_in.numel() == 0 or score_out.numel() == 0:
        raise ValueError("ood_auroc needs at least one in- and one out-of-distribution score")
    scores = torch.cat([score_in, score_out])
    if scores.isnan().any():
        raise ValueError("ood_auroc: the scores contain NaN")
    ranks = torch.unique(scores, return_inverse=True)[1]
    is_out = torch.cat([torch.zeros(len(score_in)), torch.ones(len(score_out))])
    return float(roc_auc_score(is_out.numpy(), ranks.numpy()))


def disagreement(member_probs: torch.Tensor) -> float:
    """Fraction of member pairs (k ≠ l) whose top-1 predictions differ, averaged over inputs."""
    if member_probs.dim() != 3:
        raise ValueError(f"member_probs must have shape (K, N, C), got {tuple(member_probs.shape)}")
    k = member_probs.shape[0]
    if k < 2:
        return 0.0
    pred = member_probs.argmax(-1)
    differ = (pred.unsqueeze(0) != pred.unsqueeze(1)).double()
    return (differ.sum((0, 1)) / (k * (k - 1))).mean().item()


def pairwise_kl(member_probs: torch.Tensor) -> float:
    """Mean KL(p_k ‖ p_l) over ordered member pairs k ≠ l and inputs."""
    if member_probs.dim() != 3:
        raise ValueError(f"member_probs must have shape (K, N, C), got {tuple(member_probs.shape)}")
    k = member_probs.shape[0]
    if k < 2:
        return 0.0
    logp = member_probs.double().clamp_min(_EPS).log()
    p = logp.exp()
    kl = (p.unsqueeze(1) * (logp.unsqueeze(1) - logp.unsqueeze(0))).sum(-1)  # (K, K, N): KL(p_k || p_l)
    return (kl.sum((0, 1)) / (k * (k - 1))).mean().item()


def gaussian_nll(mean: torch.Tensor, variance: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean negative log density of ``targets`` under N(mean, variance)."""
    var = variance.double().clamp_min(_EPS)
    return (0.5 * (math.log(2 * math.pi) + var.log() + (targets.double() - mean.double()) ** 2 / var)).mean().item()


def rmse(mean: torch.Tensor, targets: torch.Tensor) -> float:
    return ((mean.double() - targets.double()) ** 2).mean().sqrt().item()


def interval_coverage(mean: torch.Tensor, variance: torch.Tensor, targets: torch.Tensor, level: float = 0.95) -> float:
    """Fraction of targets inside the central ``level`` interval of N(mean, variance)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(0.5 + level / 2.0)).item()
    half = z * variance.double().clamp_min(0).sqrt()
    return ((targets.double() - mean.double()).abs() <= half).double().mean().item()


def regression_metrics(
    mean: torch.Tensor, variance: torch.Tensor, targets: torch.Tensor, log_density: torch.Tensor | None = None
) -> dict[str, float]:
    """RMSE, NLL and the coverage of the central 95 % interval in one dict. The NLL is
    ``-mean(log_density)`` when the exact per-target log density of the predictive is given
    (:meth:`~rank1_pyro.inference.predictive.Prediction.log_density`), else :func:`gaussian_nll`
    of the moment-matched Gaussian N(mean, variance); the interval is the Gaussian's either way."""
    if log_density is not None and log_density.shape != targets.shape:
        raise ValueError(f"log_density {tuple(log_density.shape)} and targets {tuple(targets.shape)} differ in shape")
    return {
        "rmse": rmse(mean, targets),
        "nll": gaussian_nll(mean, variance, targets) if log_density is None else -log_density.double().mean().item(),
        "coverage95": interval_coverage(mean, variance, targets, 0.95),
    }


def classification_metrics(
    probs: torch.Tensor, labels: torch.Tensor, log_probs: torch.Tensor | None = None
) -> dict[str, float]:
    """Accuracy, NLL (from ``log_probs`` when given, see :func:`nll`), ECE and Brier score in one dict."""
    return {
        "accuracy": accuracy(probs, labels),
        "nll": nll(probs, labels, log_probs),
        "ece": ece(probs, labels),
        "brier": brier(probs, labels),
    }


def adaptive_ece(probs: torch.Tensor, labels: torch.Tensor, num_bins: int = 15) -> float:
    r"""ECE over ``num_bins`` equal-mass bins: examples sorted by confidence and split into bins of
    (nearly) equal size, :math:`\sum_b \frac{|B_b|}{N} |\mathrm{acc}(B_b) - \mathrm{conf}(B_b)|`."""
    _check(probs, labels)
    positive_int("num_bins", num_bins)
    conf, pred = probs.double().max(-1)
    order = conf.argsort(stable=True)
    correct = (pred == labels).double()[order]
    conf = conf[order]
    n = len(conf)
    if n == 0:  # no examples: undefined, like the other means (not an error from deep inside torch)
        return math.nan
    total = 0.0
    for idx in torch.arange(n).tensor_split(min(num_bins, n)):  # at most n bins: none is empty
        total += len(idx) / n * abs(correct[idx].mean().item() - conf[idx].mean().item())
    return total


def _risk_order(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Errors (1.0) and hits (0.0) from the most to the least confident prediction."""
    _check(probs, labels)
    conf, pred = probs.double().max(-1)
    order = (-conf).argsort(stable=True)
    return (pred != labels).double()[order]


def aurc(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the risk-coverage curve (see the module docstring): the mean selective risk."""
    errors = _risk_order(probs, labels)
    if not len(errors):
        raise ValueError("aurc needs at least one example")
    risks = errors.cumsum(0) / torch.arange(1, len(errors) + 1, dtype=torch.float64)
    return risks.mean().item()


def selective_accuracy(probs: torch.Tensor, labels: torch.Tensor, coverage: float = 0.8) -> float:
    """Accuracy of the ``ceil(coverage × N)`` most confident predictions."""
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must be in (0, 1], got {coverage!r}")
    errors = _risk_order(probs, labels)
    k = max(1, math.ceil(coverage * len(errors) - 1e-9))
    return 1.0 - errors[:k].mean().item()


def fpr_at_tpr(score_in: torch.Tensor, score_out: torch.Tensor, tpr: float = 0.95) -> float:
    """False-positive rate at ``tpr`` true-positive rate: in-distribution inputs are the positives and
    score *higher* (e.g. the confidence); the threshold is the highest one that accepts at least a
    ``tpr`` fraction of them, and the result the fraction of out-of-distribution scores at or above it."""
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr!r}")
    score_in, score_out = score_in.reshape(-1).double(), score_out.reshape(-1).double()
    if score_in.numel() == 0 or score_out.numel() == 0:
        raise ValueError("fpr_at_tpr needs at least one in- and one out-of-distribution score")
    ranked = score_in.sort(descending=True).values
    threshold = ranked[max(0, math.ceil(tpr * len(ranked) - 1e-9) - 1)]
    return (score_out >= threshold).double().mean().item()


def selective_metrics(probs: torch.Tensor, labels: torch.Tensor, coverage: float = 0.8) -> dict[str, float]:
    """Adaptive ECE, AURC and the selective accuracy at ``coverage`` (key ``"sel_acc@80"`` for 0.8)."""
    return {
        "aece": adaptive_ece(probs, labels),
        "aurc": aurc(probs, labels),
        f"sel_acc@{round(coverage * 100)}": selective_accuracy(probs, labels, coverage),
    }
