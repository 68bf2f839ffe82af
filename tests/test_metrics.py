"""Metrics against torchmetrics, scikit-learn and hand computations."""

import numpy as np
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


def test_regression_metrics_take_the_exact_log_density_when_given():
    g = torch.Generator().manual_seed(4)
    mean, var, y = torch.randn(40, generator=g), torch.rand(40, generator=g) + 0.1, torch.randn(40, generator=g)
    gaussian = -torch.distributions.Normal(mean, var.sqrt()).log_prob(y).double()
    z = 1.959963984540054  # the 97.5 % quantile of N(0, 1)
    coverage = ((y - mean).abs() <= z * var.sqrt()).double().mean().item()
    assert metrics.regression_metrics(mean, var, y) == pytest.approx(
        {"rmse": ((mean - y) ** 2).mean().sqrt().item(), "nll": gaussian.mean().item(), "coverage95": coverage},
        rel=1e-6,
    )
    log_density = -gaussian - torch.rand(40, generator=g).double()  # any other density
    row = metrics.regression_metrics(mean, var, y, log_density)
    assert row["nll"] == pytest.approx(-log_density.mean().item(), rel=1e-12)
    assert row["coverage95"] == pytest.approx(coverage)
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.regression_metrics(mean, var, y, log_density[:3])


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


# ------------------------------------------------------------------------------------------
# Mutation-testing pass (issue #21): every metric against an independent computation
# ------------------------------------------------------------------------------------------
def _calibrated(n=600, c=4, seed=3, scale=1.5):
    """Float64 predictions whose labels are drawn from them: calibrated up to noise, so the signs of
    acc - conf differ between bins (with a constant sign every binning gives the same ECE)."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(scale * torch.randn(n, c, generator=g, dtype=torch.float64), -1)
    labels = torch.multinomial(probs, 1, generator=g).squeeze(-1)
    return probs, labels


def _reliability_by_hand(probs, labels, m):
    """Bin b holds the confidences in (b/m, (b+1)/m], by explicit interval tests (numpy, one example at a time)."""
    conf = probs.max(-1).values.numpy()
    correct = (probs.argmax(-1) == labels).numpy().astype(float)
    count, sum_conf, sum_acc = np.zeros(m), np.zeros(m), np.zeros(m)
    for c, a in zip(conf, correct):
        b = next((b for b in range(m) if b / m < c <= (b + 1) / m), m - 1)  # above 1 (rounding): the last bin
        count[b] += 1
        sum_conf[b] += c
        sum_acc[b] += a
    safe = np.maximum(count, 1)
    return sum_conf / safe, sum_acc / safe, count


@pytest.mark.parametrize("num_bins", [None, 3, 40])
def test_reliability_equals_explicit_right_closed_bins(num_bins):
    probs, labels = _calibrated(n=90, c=4, scale=0.7)  # flat rows too: confidences below 1/3 land in bin 0
    got = metrics.reliability(probs, labels) if num_bins is None else metrics.reliability(probs, labels, num_bins)
    expected = _reliability_by_hand(probs, labels, num_bins or 15)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g.numpy(), e, rtol=1e-12, atol=1e-15)
    if num_bins == 40:  # bins with a single example: their mean is that example, not half of it
        assert (expected[2] == 1).any()
    if num_bins == 3:
        assert expected[2][0] > 0


def test_reliability_bin_edges_are_right_closed_at_exact_edges():
    # confidences 1/4, 1/2, 3/4, 1 (exact in binary) each sit at the upper edge of bin 0, 1, 2, 3 of four
    probs = torch.tensor(
        [[0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0.0, 0.0], [0.75, 0.25, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]],
        dtype=torch.float64,
    )
    conf, acc, count = metrics.reliability(probs, torch.tensor([0, 1, 0, 0]), 4)
    assert count.tolist() == [1.0, 1.0, 1.0, 1.0]
    assert conf.tolist() == [0.25, 0.5, 0.75, 1.0] and acc.tolist() == [1.0, 0.0, 1.0, 1.0]
    # a confidence a rounding error above 1 (accepted by the check) still goes to the last bin
    over = torch.tensor([[1.0005, -0.0005]], dtype=torch.float64)
    assert metrics.reliability(over, torch.tensor([0]), 4)[2].tolist() == [0.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize("num_bins", [None, 10])
def test_ece_matches_torchmetrics_on_calibrated_predictions(num_bins):
    probs, labels = _calibrated()
    n_bins = num_bins or 15
    expected = multiclass_calibration_error(probs, labels, num_classes=4, n_bins=n_bins, norm="l1").item()
    got = metrics.ece(probs, labels) if num_bins is None else metrics.ece(probs, labels, num_bins)
    assert got == pytest.approx(expected, rel=1e-5)  # torchmetrics works in float32
    other = multiclass_calibration_error(probs, labels, num_classes=4, n_bins=n_bins + 1, norm="l1").item()
    assert abs(other - expected) > 1e-4  # the data tell the number of bins apart


def test_ece_of_a_single_example_is_its_calibration_gap():
    assert metrics.ece(torch.tensor([[0.7, 0.3]]), torch.tensor([0])) == pytest.approx(0.3)
    assert metrics.ece(torch.tensor([[0.7, 0.3]]), torch.tensor([1])) == pytest.approx(0.7)


def test_nll_from_log_probs_equals_cross_entropy_where_probabilities_underflow():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(6, 3, generator=g, dtype=torch.float64)
    logits[0, 0] = -300.0  # exp underflows in float32: p = 0 there
    labels = torch.tensor([0, 2, 1, 1, 0, 2])
    log_probs = torch.log_softmax(logits, -1)
    probs = log_probs.exp().float()
    assert probs[0, 0] == 0
    expected = torch.nn.functional.cross_entropy(logits, labels).item()
    assert metrics.nll(probs, labels, log_probs) == pytest.approx(expected, rel=1e-12)
    assert metrics.nll(probs, labels) == float("inf")  # never clamped
    rest = torch.nn.functional.cross_entropy(logits[1:], labels[1:]).item()
    assert metrics.nll(probs[1:], labels[1:]) == pytest.approx(rest, rel=1e-5)


def test_brier_when_the_last_class_never_occurs():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1]])
    # (0.4² + 0.3² + 0.1²) and (0.2² + 0.3² + 0.1²), by hand
    assert metrics.brier(probs, torch.tensor([0, 1])) == pytest.approx((0.26 + 0.14) / 2, rel=1e-6)


def test_classification_metrics_by_hand():
    probs, labels = _calibrated(n=200, c=3)
    logits = probs.log()
    out = metrics.classification_metrics(probs, labels, torch.log_softmax(logits, -1))
    assert list(out) == ["accuracy", "nll", "ece", "brier"]
    assert out["accuracy"] == pytest.approx((probs.argmax(1) == labels).double().mean().item())
    assert out["nll"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-9)
    tm = multiclass_calibration_error(probs, labels, num_classes=3, n_bins=15, norm="l1").item()
    assert out["ece"] == pytest.approx(tm, rel=1e-5)
    onehot = torch.eye(3, dtype=torch.float64)[labels]
    assert out["brier"] == pytest.approx(((probs - onehot) ** 2).sum(1).mean().item(), rel=1e-12)
    # the NLL comes from log_probs where given: finite where a float32 probability underflows to 0
    logits = torch.tensor([[0.0, -200.0], [1.0, 0.0]], dtype=torch.float64)
    small = torch.softmax(logits, -1).float()
    assert small[0, 1] == 0
    underflow = metrics.classification_metrics(small, torch.tensor([1, 0]), torch.log_softmax(logits, -1))
    assert underflow["nll"] == pytest.approx(
        torch.nn.functional.cross_entropy(logits, torch.tensor([1, 0])).item(), rel=1e-12
    )
    assert metrics.classification_metrics(small, torch.tensor([1, 0]))["nll"] == float("inf")


def test_diversity_by_hand_with_more_inputs_than_classes():
    g = torch.Generator().manual_seed(5)
    member_probs = torch.softmax(2 * torch.randn(3, 4, 2, generator=g, dtype=torch.float64), -1)  # K=3, N=4, C=2
    pred = member_probs.argmax(-1)
    pairs = [(i, j) for i in range(3) for j in range(3) if i != j]
    differ = np.mean([[float(pred[i, n] != pred[j, n]) for i, j in pairs] for n in range(4)])
    assert metrics.disagreement(member_probs) == pytest.approx(differ)
    kl = [(member_probs[i] * (member_probs[i] / member_probs[j]).log()).sum(-1) for i, j in pairs]
    assert metrics.pairwise_kl(member_probs) == pytest.approx(torch.stack(kl).mean().item(), rel=1e-12)
    two = member_probs[:2]  # K = 2: one pair each way
    assert metrics.disagreement(two) == pytest.approx((pred[0] != pred[1]).double().mean().item())
    kl2 = [(two[a] * (two[a] / two[b]).log()).sum(-1) for a, b in [(0, 1), (1, 0)]]
    assert metrics.pairwise_kl(two) == pytest.approx(torch.stack(kl2).mean().item(), rel=1e-12)
    assert metrics.pairwise_kl(member_probs[:1]) == 0.0 and metrics.disagreement(member_probs[:1]) == 0.0


@pytest.mark.parametrize("fn", [metrics.disagreement, metrics.pairwise_kl])
def test_diversity_refuses_a_batch_without_members(fn):
    with pytest.raises(ValueError, match=r"^member_probs must have shape \(K, N, C\), got \(2, 3\)$"):
        fn(torch.full((2, 3), 1 / 3))


def test_interval_coverage_default_level_and_a_point_mass():
    g = torch.Generator().manual_seed(6)
    mean, var, y = torch.randn(400, generator=g), torch.rand(400, generator=g) + 0.1, torch.randn(400, generator=g)
    lo, hi = -1.959963984540054, 1.959963984540054  # the standard normal's 2.5 % and 97.5 % quantiles
    inside = ((y - mean) / var.sqrt()).double()
    assert metrics.interval_coverage(mean, var, y) == pytest.approx(((inside >= lo) & (inside <= hi)).double().mean())
    # a point-mass predictive covers exactly the targets at its mean (the interval is closed)
    assert metrics.interval_coverage(mean, torch.zeros(400), mean) == 1.0
    with pytest.raises(ValueError, match=r"^level must be in \(0, 1\), got 0\.0$"):
        metrics.interval_coverage(mean, var, y, level=0.0)


@pytest.mark.parametrize(
    "probs, labels, error, message",
    [
        (
            torch.full((3,), 1 / 3),
            torch.zeros(3, dtype=torch.long),
            ValueError,
            "probs must have shape (N, C), got (3,)",
        ),
        (
            torch.full((3, 2), 0.5),
            torch.zeros(4, dtype=torch.long),
            ValueError,
            "labels must have shape (3,), got (4,)",
        ),
        (
            torch.full((3, 2), 0.5),
            torch.zeros(3),
            TypeError,
            "labels must be integer class indices, got dtype torch.float32",
        ),
        (
            torch.full((3, 2), 0.5),
            torch.zeros(3, dtype=torch.bool),
            TypeError,
            "labels must be integer class indices, got dtype torch.bool",
        ),
        (
            torch.tensor([[0.5, float("nan")]]),
            torch.tensor([0]),
            ValueError,
            "probs contains NaN or infinite values",
        ),
        (torch.full((2, 2), 0.5), torch.tensor([0, 2]), ValueError, "labels out of range 0..1"),
        (torch.full((2, 2), 0.5), torch.tensor([-1, 0]), ValueError, "labels out of range 0..1"),
        (
            torch.tensor([[1.5, 0.0]], dtype=torch.float64),
            torch.tensor([0]),
            ValueError,
            "probs must lie in [0, 1], got values in [0, 1.5]",
        ),
        (
            torch.tensor([[-0.1, 0.6, 0.5]], dtype=torch.float64),  # rows sum to 1, one entry negative
            torch.tensor([0]),
            ValueError,
            "probs must lie in [0, 1], got values in [-0.1, 0.6]",
        ),
        (
            torch.tensor([[0.5, 0.5], [0.625, 0.5]], dtype=torch.float64),
            torch.tensor([0, 1]),
            ValueError,
            "probs rows must sum to 1 (within 0.001): row 1 sums to 1.125; "
            "pass probabilities, e.g. softmax(logits), not logits or unnormalised scores",
        ),
        (  # float32: the tolerance is 1e-3
            torch.tensor([[0.5, 0.505]], dtype=torch.float32),
            torch.tensor([0]),
            ValueError,
            "probs rows must sum to 1 (within 0.001): row 0 sums to 1.005;",
        ),
        (  # half precision: 1e-2, and no more
            torch.tensor([[0.5, 0.5625]], dtype=torch.float16),
            torch.tensor([0]),
            ValueError,
            "probs rows must sum to 1 (within 0.01): row 0 sums to 1.0625;",
        ),
    ],
)
def test_input_check_messages(probs, labels, error, message):
    import re

    with pytest.raises(error, match="^" + re.escape(message)):
        metrics.accuracy(probs, labels)


def test_input_check_tolerances_accept_rounding():
    # half precision rounds 0.505 to 0.50488: the row is 0.5 % off, inside half's 1e-2
    assert metrics.accuracy(torch.tensor([[0.5, 0.505]], dtype=torch.float16), torch.tensor([1])) == 1.0
    # exactly at the tolerance in float64: -1e-3 and 1 + 1e-3 are accepted
    assert metrics.accuracy(torch.tensor([[-0.001, 1 + 0.001]], dtype=torch.float64), torch.tensor([1])) == 1.0


def test_num_bins_is_checked_by_name():
    probs, labels = _calibrated(n=10)
    for fn in (metrics.reliability, metrics.ece, metrics.adaptive_ece):
        with pytest.raises(ValueError, match=r"^num_bins must be an integer >= 1, got 0$"):
            fn(probs, labels, 0)


def test_nll_refuses_log_probs_of_another_shape():
    with pytest.raises(ValueError, match=r"^log_probs must have the shape of probs \(3, 2\), got \(3, 3\)$"):
        metrics.nll(torch.full((3, 2), 0.5), torch.tensor([0, 1, 0]), torch.zeros(3, 3))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: metrics.ood_auroc(torch.zeros(0), torch.ones(2)), "ood_auroc needs at least one in- and one out-"),
        (lambda: metrics.ood_auroc(torch.ones(2), torch.zeros(0)), "ood_auroc needs at least one in- and one out-"),
        (lambda: metrics.ood_auroc(torch.tensor([0.0, float("nan")]), torch.ones(1)), "ood_auroc: the scores contain"),
        (lambda: metrics.fpr_at_tpr(torch.zeros(0), torch.ones(2)), "fpr_at_tpr needs at least one in- and one out-"),
        (lambda: metrics.fpr_at_tpr(torch.ones(2), torch.zeros(0)), "fpr_at_tpr needs at least one in- and one out-"),
        (lambda: metrics.fpr_at_tpr(torch.ones(2), torch.ones(2), tpr=0.0), r"tpr must be in \(0, 1\], got 0\.0$"),
        (lambda: metrics.fpr_at_tpr(torch.ones(2), torch.ones(2), tpr=1.5), r"tpr must be in \(0, 1\], got 1\.5$"),
        (lambda: metrics.aurc(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)), "aurc needs at least one example$"),
    ],
)
def test_score_metrics_refuse_empty_or_bad_arguments(call, message):
    with pytest.raises(ValueError, match="^" + message):
        call()


# selective prediction: the k most confident predictions, ties broken by the examples' order
def _ranked_errors_by_hand(probs, labels):
    conf = probs.max(-1).values.tolist()
    pred = probs.argmax(-1).tolist()
    order = sorted(range(len(conf)), key=lambda i: (-conf[i], i))
    return [float(pred[i] != int(labels[i])) for i in order]


def _selective_data():
    g = torch.Generator().manual_seed(7)
    probs = torch.softmax(torch.randn(40, 3, generator=g, dtype=torch.float64), -1)
    probs[10:20] = probs[5]  # ties in confidence, with different labels
    labels = torch.randint(0, 3, (40,), generator=g)
    pred = probs.argmax(-1)
    first, second = (-probs.max(-1).values).argsort(stable=True)[:2].tolist()
    labels[first], labels[second] = pred[first], (pred[second] + 1) % 3  # a hit, then an error
    return probs, labels


def test_aurc_is_the_mean_selective_risk_by_hand():
    probs, labels = _selective_data()
    errors = _ranked_errors_by_hand(probs, labels)
    expected = np.mean([np.mean(errors[:k]) for k in range(1, len(errors) + 1)])
    assert metrics.aurc(probs, labels) == pytest.approx(expected, rel=1e-12)
    assert metrics.aurc(probs, probs.argmax(-1)) == 0.0  # no errors: no risk at any coverage
    assert metrics.aurc(probs, (probs.argmax(-1) + 1) % 3) == 1.0


def test_aurc_breaks_ties_by_order():
    probs = torch.full((3, 2), 0.5, dtype=torch.float64)  # equal confidence, prediction 0 everywhere
    # errors in order: 1, 0, 0 -> risks 1, 1/2, 1/3
    assert metrics.aurc(probs, torch.tensor([1, 0, 0])) == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    assert metrics.aurc(probs, torch.tensor([0, 0, 1])) == pytest.approx((0 + 0 + 1 / 3) / 3)


@pytest.mark.parametrize("coverage", [None, 0.7, 1.0, 0.33, 1e-12])
def test_selective_accuracy_by_hand(coverage):
    probs, labels = _selective_data()
    errors = _ranked_errors_by_hand(probs, labels)
    k = {None: 32, 0.7: 28, 1.0: 40, 0.33: 14, 1e-12: 1}[coverage]  # ceil(coverage * 40), at least 1
    expected = 1.0 - np.mean(errors[:k])
    got = (
        metrics.selective_accuracy(probs, labels)
        if coverage is None
        else metrics.selective_accuracy(probs, labels, coverage)
    )
    assert got == pytest.approx(expected, rel=1e-12)
    if k < 40:
        assert 1.0 - np.mean(errors[: k + 1]) != pytest.approx(expected)  # the data tell k from k + 1
    if k > 1:
        assert 1.0 - np.mean(errors[: k - 1]) != pytest.approx(expected)


def test_selective_accuracy_refuses_coverage_outside_zero_one():
    probs, labels = _selective_data()
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match=rf"^coverage must be in \(0, 1\], got {bad}$"):
            metrics.selective_accuracy(probs, labels, bad)


def test_adaptive_ece_against_equal_mass_bins_and_closed_forms():
    probs, labels = _calibrated(n=100, c=3)
    conf = probs.max(-1).values.numpy()
    correct = (probs.argmax(-1) == labels).numpy().astype(float)
    order = np.argsort(conf, kind="stable")

    def by_hand(m):
        return sum(len(b) / 100 * abs(correct[b].mean() - conf[b].mean()) for b in np.array_split(order, m))

    assert metrics.adaptive_ece(probs, labels) == pytest.approx(by_hand(15), rel=1e-12)  # 15 bins by default
    assert metrics.adaptive_ece(probs, labels, 7) == pytest.approx(by_hand(7), rel=1e-12)
    assert by_hand(15) != pytest.approx(by_hand(16)) and by_hand(15) != pytest.approx(by_hand(14))
    # one bin: |accuracy - mean confidence|; one bin per example (more bins than examples): mean |correct - conf|
    assert metrics.adaptive_ece(probs, labels, 1) == pytest.approx(abs(correct.mean() - conf.mean()), rel=1e-12)
    assert metrics.adaptive_ece(probs, labels, 500) == pytest.approx(np.abs(correct - conf).mean(), rel=1e-12)


def test_adaptive_ece_ties_in_confidence_keep_the_examples_order():
    probs = torch.full((4, 2), 0.5, dtype=torch.float64)  # equal confidence 0.5, prediction 0
    # correct 1, 1, 0, 0: two bins of accuracy 1 and 0, each 0.5 away from the confidence
    assert metrics.adaptive_ece(probs, torch.tensor([0, 0, 1, 1]), 2) == pytest.approx(0.5)


def _fpr_by_hand(score_in, score_out, tpr):
    """The highest threshold t with #(in >= t) >= tpr * N_in, then the fraction of out >= t."""
    ins, outs = score_in.reshape(-1).tolist(), score_out.reshape(-1).tolist()
    for t in sorted(set(ins), reverse=True):
        if sum(s >= t for s in ins) >= tpr * len(ins) - 1e-9:
            return sum(s >= t for s in outs) / len(outs)
    raise AssertionError


@pytest.mark.parametrize("tpr", [None, 0.5, 0.9, 1.0, 0.01])
def test_fpr_at_tpr_by_hand(tpr):
    g = torch.Generator().manual_seed(8)
    score_in = (torch.randn(20, generator=g) + 1.0).round(decimals=1)  # ties, and 0.95 * 20 = 19 exactly
    score_out = torch.randn(30, generator=g).round(decimals=1)
    expected = _fpr_by_hand(score_in, score_out, 0.95 if tpr is None else tpr)
    got = metrics.fpr_at_tpr(score_in, score_out) if tpr is None else metrics.fpr_at_tpr(score_in, score_out, tpr)
    assert got == pytest.approx(expected)
    shaped = metrics.fpr_at_tpr(score_in.reshape(4, 5), score_out.reshape(3, 10), 0.95 if tpr is None else tpr)
    assert shaped == pytest.approx(expected)  # any shape: the scores are flattened


def test_fpr_at_tpr_closed_forms():
    # separated scores: every out-of-distribution score is below the threshold; reversed: every one above
    assert metrics.fpr_at_tpr(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 0.0
    assert metrics.fpr_at_tpr(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])) == 1.0
    assert metrics.fpr_at_tpr(torch.tensor([1.0]), torch.tensor([1.0])) == 1.0  # a tie is accepted (>=)
    # tpr 0.5 of four: the two highest in-scores are accepted, threshold 3 -> out-scores 3 and 4 of four
    assert metrics.fpr_at_tpr(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.0, 3.0, 4.0, 2.5]), 0.5) == 0.5


def test_selective_metrics_by_hand():
    probs, labels = _selective_data()
    errors = _ranked_errors_by_hand(probs, labels)
    out = metrics.selective_metrics(probs, labels)
    assert list(out) == ["aece", "aurc", "sel_acc@80"]
    assert out["aurc"] == pytest.approx(np.mean([np.mean(errors[:k]) for k in range(1, 41)]), rel=1e-12)
    assert out["sel_acc@80"] == pytest.approx(1.0 - np.mean(errors[:32]), rel=1e-12)
    conf = probs.max(-1).values.numpy()
    correct = (probs.argmax(-1) == labels).numpy().astype(float)
    bins = np.array_split(np.argsort(conf, kind="stable"), 15)
    assert out["aece"] == pytest.approx(sum(len(b) / 40 * abs(correct[b].mean() - conf[b].mean()) for b in bins))
    assert list(metrics.selective_metrics(probs, labels, 0.7)) == ["aece", "aurc", "sel_acc@70"]
    assert metrics.selective_metrics(probs, labels, 0.7)["sel_acc@70"] == pytest.approx(1.0 - np.mean(errors[:28]))


def test_adaptive_ece_of_no_examples_is_undefined():
    """No examples: NaN, as the accuracy and NLL of no examples are (not an error from torch)."""
    none, labels = torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)
    assert np.isnan(metrics.adaptive_ece(none, labels)) and np.isnan(metrics.accuracy(none, labels))
