"""Metrics against torchmetrics, scikit-learn and hand computations."""

import pytest
import torch
from sklearn.metrics import roc_auc_score
from torchmetrics.functional.classification import multiclass_calibration_error

from rank1_pyro import metrics


@pytest.fixture
def preds():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(400, 5, generator=g), -1)
    labels = torch.randint(0, 5, (400,), generator=g)
    return probs, labels


def test_accuracy_nll_brier_by_hand(preds):
    probs, labels = preds
    assert metrics.accuracy(probs, labels) == pytest.approx((probs.argmax(1) == labels).float().mean().item())
    assert metrics.nll(probs, labels) == pytest.approx(
        torch.nn.functional.nll_loss(probs.log(), labels).item(), rel=1e-5
    )
    onehot = torch.eye(5)[labels]
    assert metrics.brier(probs, labels) == pytest.approx(((probs - onehot) ** 2).sum(1).mean().item(), rel=1e-5)


def test_ece_matches_torchmetrics(preds):
    probs, labels = preds
    expected = multiclass_calibration_error(probs, labels, num_classes=5, n_bins=15, norm="l1").item()
    assert metrics.ece(probs, labels) == pytest.approx(expected, rel=1e-5)


def test_reliability_bins_are_consistent(preds):
    probs, labels = preds
    conf, acc, count = metrics.reliability(probs, labels)
    assert count.sum() == 400 and ((conf >= 0) & (conf <= 1)).all()
    assert metrics.ece(probs, labels) == pytest.approx(((count / 400) * (acc - conf).abs()).sum().item())


def test_ood_auroc_matches_sklearn_including_ties():
    g = torch.Generator().manual_seed(1)
    score_in = torch.randn(300, generator=g).round()
    score_out = (torch.randn(200, generator=g) + 0.7).round()
    expected = roc_auc_score([0] * 300 + [1] * 200, torch.cat([score_in, score_out]).numpy())
    assert metrics.ood_auroc(score_in, score_out) == pytest.approx(expected)
    assert metrics.ood_auroc(torch.zeros(3), torch.ones(3)) == 1.0


def test_ood_auroc_by_hand_with_ties_and_infinite_scores():
    # pairs (in, out): 0<1, 0<2, 1=1 (one half), 1<2 -> 3.5 of 4
    assert metrics.ood_auroc(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 2.0])) == 0.875
    assert metrics.ood_auroc(torch.tensor([1.0, 0.0]), torch.tensor([2.0, 1.0])) == 0.875  # order-free
    assert metrics.ood_auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 0.0
    inf = float("inf")  # only the order counts: infinite scores rank like any other
    assert metrics.ood_auroc(torch.tensor([-inf, 1.0]), torch.tensor([1.0, inf])) == 0.875
    with pytest.raises(ValueError, match="NaN"):
        metrics.ood_auroc(torch.tensor([0.0, float("nan")]), torch.tensor([1.0]))


def test_diversity_by_hand():
    member_probs = torch.tensor(
        [[[0.9, 0.1], [0.2, 0.8]], [[0.6, 0.4], [0.7, 0.3]], [[0.3, 0.7], [0.1, 0.9]]]
    )  # (K=3, N=2, C=2)
    # input 0: predictions 0, 0, 1 -> 4 of 6 ordered pairs differ; input 1: 1, 0, 1 -> 4 of 6
    assert metrics.disagreement(member_probs) == pytest.approx(4 / 6)
    kl = lambda p, q: (p * (p / q).log()).sum(-1)  # noqa: E731
    pairs = [kl(member_probs[i], member_probs[j]) for i in range(3) for j in range(3) if i != j]
    assert metrics.pairwise_kl(member_probs) == pytest.approx(torch.stack(pairs).mean().item(), rel=1e-5)
    assert metrics.disagreement(member_probs[:1]) == 0.0


def test_regression_metrics_by_hand():
    g = torch.Generator().manual_seed(2)
    mean, var, y = torch.randn(50, generator=g), torch.rand(50, generator=g) + 0.1, torch.randn(50, generator=g)
    expected = -torch.distributions.Normal(mean, var.sqrt()).log_prob(y).mean().item()
    assert metrics.gaussian_nll(mean, var, y) == pytest.approx(expected, rel=1e-5)
    assert metrics.rmse(mean, y) == pytest.approx(((mean - y) ** 2).mean().sqrt().item(), rel=1e-5)
    z = torch.distributions.Normal(0, 1).icdf(torch.tensor(0.95)).item()
    inside = ((y - mean).abs() <= z * var.sqrt()).float().mean().item()
    assert metrics.interval_coverage(mean, var, y, level=0.9) == pytest.approx(inside)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: metrics.accuracy(torch.rand(3), torch.zeros(3, dtype=torch.long)), r"shape \(N, C\)"),
        (lambda: metrics.nll(torch.rand(3, 2), torch.tensor([0, 1, 2])), "labels out of range"),
        (lambda: metrics.ece(torch.rand(3, 2), torch.zeros(4, dtype=torch.long)), "labels must have shape"),
        (lambda: metrics.ood_auroc(torch.zeros(0), torch.ones(2)), "at least one"),
        (lambda: metrics.interval_coverage(torch.zeros(2), torch.ones(2), torch.zeros(2), level=1.0), "level"),
    ],
)
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()
