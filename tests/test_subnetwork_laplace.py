"""Subnetwork linearized Laplace: exact Bayesian linear regression, laplace-torch, dense Jacobians,
selection strategies, marginal likelihood, predictives through the Posterior protocol, digits."""

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev
from torch.utils.data import DataLoader, TensorDataset

from rank1_pyro import DeltaGuide, metrics, rank1_mlp
from rank1_pyro.data import load_digits, rotate
from rank1_pyro.inference import Posterior, predict
from rank1_pyro.laplace import (
    SUBNETWORK_STRATEGIES,
    FlatFunctional,
    SubnetLaplace,
    ggn,
    jacobian_columns,
    rank1_point_network,
    select_subnetwork,
)
from rank1_pyro.laplace.curvature import (
    JacobianColumns,
    ggn_factor,
    jacobian_blocks,
    log_likelihood,
    narrow,
    supports_per_example,
)

# ----------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _one_thread():
    """Small problems: one intra-op thread (OpenMP threads spin-wait badly on a busy shared CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def softmax_ggn_dense(f: FlatFunctional, x: torch.Tensor, members: int = 1) -> torch.Tensor:
    """(1/K) Σ_r J_rᵀ (diag p_r − p_r p_rᵀ) J_r from the dense jacrev Jacobian."""
    J = f.jacobian(x)  # (R, O, M)
    p = torch.softmax(f(f.theta_map, x), -1)
    lam = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    return torch.einsum("rop,roq,rqm->pm", J, lam, J) / members


def offsets(module: nn.Module) -> dict[str, torch.Tensor]:
    """Indices of every parameter's entries in the flat θ (parameters_to_vector order)."""
    out, start = {}, 0
    for name, p in module.named_parameters():
        out[name] = torch.arange(start, start + p.numel())
        start += p.numel()
    return out


@pytest.fixture
def linreg():
    """Bayesian linear regression y = X w + N(0, σ²), w ~ N(0, δ⁻¹ I), float64."""
    g = torch.Generator().manual_seed(1)
    n, d, sigma, delta = 40, 4, 0.5, 2.0
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    w_true = torch.randn(d, generator=g, dtype=torch.float64)
    y = X @ w_true + sigma * torch.randn(n, generator=g, dtype=torch.float64)
    return X, y, sigma, delta


def ridge(X, y, sigma, delta):
    """Exact posterior mean and covariance of the Bayesian linear regression."""
    cov = torch.linalg.inv(X.T @ X / sigma**2 + delta * torch.eye(X.shape[1], dtype=X.dtype))
    return cov @ X.T @ y / sigma**2, cov


def linear_net(w: torch.Tensor) -> nn.Linear:
    net = nn.Linear(w.numel(), 1, bias=False).double()
    with torch.no_grad():
        net.weight.copy_(w.reshape(1, -1))
    return net


def exact_log_evidence(X, y, sigma, delta) -> float:
    """log N(y | 0, σ²I + X Xᵀ/δ)."""
    cov = sigma**2 * torch.eye(len(y), dtype=X.dtype) + X @ X.T / delta
    return torch.distributions.MultivariateNormal(torch.zeros_like(y), cov).log_prob(y).item()


def exact_log_evidence_grid(X, y, sigma, deltas: torch.Tensor) -> torch.Tensor:
    """The same for many δ at once, through the eigendecomposition X Xᵀ = U diag(s) Uᵀ."""
    s, U = torch.linalg.eigh(X @ X.T)
    z2 = (U.T @ y) ** 2
    var = sigma**2 + s / deltas.unsqueeze(-1)  # (G, N)
    return -0.5 * (len(y) * math.log(2 * math.pi) + var.log().sum(-1) + (z2 / var).sum(-1))


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-4) -> None:
    """Relative agreement: in Frobenius norm and entrywise against the largest entry."""
    assert (actual - expected).norm() <= tol * expected.norm()
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * expected.abs().max().item())


# ----------------------------------------------------------------------------- exact linear-Gaussian case


def test_linear_regression_equals_the_exact_gaussian_posterior(linreg):
    X, y, sigma, delta = linreg
    mean, cov = ridge(X, y, sigma, delta)
    net = linear_net(mean)
    loader = DataLoader(TensorDataset(X, y), batch_size=7)  # minibatched
    la = SubnetLaplace(net, "regression", torch.arange(4), prior_precision=delta, sigma_noise=sigma).fit(loader)
    assert la.num_data == 40 and la.num_params == 4
    torch.testing.assert_close(la.posterior_covariance, cov, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(la.posterior_precision, torch.linalg.inv(cov), rtol=1e-10, atol=1e-10)
    assert la.log_marginal_likelihood().item() == pytest.approx(exact_log_evidence(X, y, sigma, delta), rel=1e-10)

    x_new = torch.randn(6, 4, dtype=torch.float64)
    pred = predict(la, x_new)  # the closed-form GLM predictive (S = 1)
    assert pred.samples.shape == (1, 1, 6, 2)
    torch.testing.assert_close(pred.mean, x_new @ mean)
    torch.testing.assert_close(pred.variance, ((x_new @ cov) * x_new).sum(-1) + sigma**2)

    # a linear network: the NN predictive equals the linearized one draw by draw
    la.predictive = "glm-mc"
    glm = la.sample_predictions(x_new, 4000)
    la.predictive = "nn"
    torch.testing.assert_close(la.sample_predictions(x_new, 4000), glm)
    mc = predict(la, x_new, num_samples=4000)
    torch.testing.assert_close(mc.mean, x_new @ mean, atol=0.05, rtol=0)
    torch.testing.assert_close(mc.variance, ((x_new @ cov) * x_new).sum(-1) + sigma**2, rtol=0.1, atol=0)
    draws = la.sample(20000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(draws.mean(0), mean, atol=0.02, rtol=0)
    torch.testing.assert_close(torch.cov(draws.T), cov, atol=0.01, rtol=0)


def test_marglik_prior_precision_maximises_the_exact_evidence(linreg):
    X, y, sigma, _ = linreg
    # at a fixed MAP point, the bisection lands on the maximiser of the closed-form log evidence
    mean, _ = ridge(X, y, sigma, 1.0)
    la = SubnetLaplace(linear_net(mean), "regression", torch.arange(4), sigma_noise=sigma).fit((X, y))
    grid = torch.logspace(-3, 3, 6001, dtype=torch.float64)
    values = la.log_marginal_likelihood(grid)
    assert values[1234].item() == pytest.approx(la.log_marginal_likelihood(grid[1234].item()).item(), rel=1e-12)
    assert math.log10(la.prior_precision) == pytest.approx(math.log10(grid[values.argmax()]), abs=1.5e-3)
    # MacKay's fixed point (refit the MAP at the chosen δ) is the maximiser of the exact evidence
    delta = 1.0
    for _ in range(200):
        mean, _ = ridge(X, y, sigma, delta)
        new = (
            SubnetLaplace(linear_net(mean), "regression", torch.arange(4), sigma_noise=sigma)
            .fit((X, y))
            .prior_precision
        )
        if abs(math.log(new / delta)) < 1e-12:
            break
        delta = new
    exact = exact_log_evidence_grid(X, y, sigma, grid)
    assert exact[777].item() == pytest.approx(exact_log_evidence(X, y, sigma, grid[777].item()), rel=1e-10)
    assert math.log10(delta) == pytest.approx(math.log10(grid[exact.argmax()]), abs=1.5e-3)


# ----------------------------------------------------------------------------- against laplace-torch


def _classification_problem():
    g = torch.Generator().manual_seed(3)
    net = nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 4)).double()
    X = torch.randn(60, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (60,), generator=g)
    return net, DataLoader(TensorDataset(X, y), batch_size=16), torch.randn(9, 5, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("subset", ["all", "subnetwork"])
def test_matches_laplace_torch_classification(subset):
    laplace = pytest.importorskip("laplace")
    net, loader, x_new = _classification_problem()
    P = sum(p.numel() for p in net.parameters())
    if subset == "all":
        idx = torch.arange(P)
        ref = laplace.Laplace(
            net, "classification", subset_of_weights="all", hessian_structure="full", prior_precision=0.7
        )
    else:
        idx = torch.randperm(P, generator=torch.Generator().manual_seed(0))[:25].sort().values
        ref = laplace.Laplace(
            net,
            "classification",
            subset_of_weights="subnetwork",
            hessian_structure="full",
            subnetwork_indices=idx,
            prior_precision=0.7,
        )
    ref.fit(loader)
    ours = SubnetLaplace(net, "classification", idx, prior_precision=0.7).fit(loader)
    # (laplace-torch's all-weights GGN goes through curvlinops with a float32 identity: ~1e-8 relative)
    assert_rel(ours.posterior_covariance, ref.posterior_covariance)
    probit = ref(x_new, pred_type="glm", link_approx="probit")
    assert_rel(ours.sample_predictions(x_new, 1)[0, 0], probit)
    assert ours.log_marginal_likelihood().item() == pytest.approx(ref.log_marginal_likelihood().item(), rel=1e-6)


def test_matches_laplace_torch_regression_subnetwork():
    laplace = pytest.importorskip("laplace")
    g = torch.Generator().manual_seed(4)
    net = nn.Sequential(nn.Linear(3, 10), nn.Tanh(), nn.Linear(10, 1)).double()
    X = torch.randn(50, 3, generator=g, dtype=torch.float64)
    y = torch.sin(X.sum(-1, keepdim=True)) + 0.1 * torch.randn(50, 1, generator=g, dtype=torch.float64)
    loader = DataLoader(TensorDataset(X, y), batch_size=20)
    idx = torch.tensor([0, 4, 7, 11, 20, 31, 33, 40, 50])
    ref = laplace.Laplace(
        net,
        "regression",
        subset_of_weights="subnetwork",
        hessian_structure="full",
        subnetwork_indices=idx,
        prior_precision=1.3,
        sigma_noise=0.3,
    )
    ref.fit(loader)
    ours = SubnetLaplace(net, "regression", idx, prior_precision=1.3, sigma_noise=0.3).fit(loader)
    assert_rel(ours.posterior_covariance, ref.posterior_covariance)
    x_new = torch.randn(7, 3, generator=g, dtype=torch.float64)
    f_mu, f_var = ref(x_new, pred_type="glm")
    pred = ours.sample_predictions(x_new, 1)[0, 0]
    torch.testing.assert_close(pred[:, 0], f_mu.squeeze(-1))
    assert_rel(pred[:, 1], f_var.reshape(-1) + 0.3**2)
    assert ours.log_marginal_likelihood().item() == pytest.approx(ref.log_marginal_likelihood().item(), rel=1e-6)


# ----------------------------------------------------------------------------- Jacobian columns and GGN


class Mixed(nn.Module):
    """Conv2d, LayerNorm (no layer rule), a Linear on a 3-D input, a Linear used twice."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, stride=2)
        self.norm = nn.LayerNorm(16)
        self.seq = nn.Linear(16, 4)
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).flatten(2)  # (B, 3, 16)
        h = torch.tanh(self.seq(self.norm(h)))  # (B, 3, 4)
        h = self.shared(torch.tanh(self.shared(h)))
        return self.head(h.flatten(1))


@pytest.mark.parametrize(
    "mode,per_example,layer_rules",
    [
        ("forward", None, True),
        ("reverse", None, True),
        ("reverse", None, False),
        ("reverse", False, True),
        ("reverse", False, False),
    ],
)
def test_jacobian_columns_equal_the_dense_jacrev_columns(mode, per_example, layer_rules):
    net = Mixed().double()
    f = FlatFunctional(net)
    x = torch.randn(7, 2, 8, 8, dtype=torch.float64)
    idx = torch.randperm(f.num_params, generator=torch.Generator().manual_seed(0))[:70]
    dense = f.jacobian(x)  # (B, O, P) by jacrev
    out, J = jacobian_columns(
        f.restrict(idx), x, mode=mode, per_example=per_example, layer_rules=layer_rules, max_elements=3000
    )  # small blocks: several sub-batches
    torch.testing.assert_close(J, dense[..., idx], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out, net(x))
    # all of θ at once (reverse by default)
    torch.testing.assert_close(jacobian_columns(f, x)[1], dense, rtol=1e-10, atol=1e-12)


class RowMixing(nn.Module):
    """Examples interact after ``first`` (a batch mean): its layer rule must not be used."""

    def __init__(self):
        super().__init__()
        self.first, self.last = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.first(x))
        return self.last(h + h.mean(0, keepdim=True))


def test_layer_rules_are_not_used_on_layers_whose_rows_interact():
    net = RowMixing().double()
    f = FlatFunctional(net)
    x = torch.randn(5, 3, dtype=torch.float64)
    out, J = jacobian_columns(f, x, mode="reverse", per_example=False)
    torch.testing.assert_close(J, f.jacobian(x), rtol=1e-10, atol=1e-12)


def test_narrow_keeps_theta_and_drops_untouched_tensors():
    net = Mixed().double()
    f = FlatFunctional(net)
    idx = offsets(net)["head.weight"][[3, 0, 7]]
    sub = narrow(f.restrict(idx))
    assert sub.param_names == ["head.weight"]
    torch.testing.assert_close(sub.theta_map, f.full_map[idx])


def test_rank1_point_network_columns_and_member_averaged_ggn():
    model = rank1_mlp(3, [6], 4, ensemble_size=3)
    guide = DeltaGuide(model, init_loc_std=0.3)
    x = torch.randn(9, 3)
    y = torch.randint(0, 4, (9,))
    guide(x)
    net = rank1_point_network(model, guide)
    f = FlatFunctional(net)
    factors = select_subnetwork("rank1-factors", f)
    idx = torch.cat([factors, torch.tensor([0, 5, 40])]).sort().values
    dense = f.jacobian(x)[..., idx]  # (K·B, O, M), member-major
    for mode in ("forward", "reverse"):
        torch.testing.assert_close(
            jacobian_columns(f.restrict(idx), x, mode=mode, max_elements=500)[1], dense, rtol=1e-5, atol=1e-6
        )
    curv = ggn(f.restrict(idx), (x, y), "classification", max_elements=500)
    assert (curv.num_members, curv.num_outputs, curv.num_data) == (3, 4, 9)
    torch.testing.assert_close(curv.matrix, softmax_ggn_dense(f.restrict(idx), x, members=3), rtol=1e-4, atol=1e-6)
    logp = torch.log_softmax(net(x), -1).reshape(3, 9, 4)
    expected = logp.gather(-1, y.expand(3, 9).unsqueeze(-1)).sum().item() / 3
    assert curv.log_likelihood == pytest.approx(expected, rel=1e-5)


def test_diagonal_ggn_equals_the_dense_diagonal():
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(11, 4, dtype=torch.float64)
    f = FlatFunctional(net)
    diag = ggn(f, x, "categorical", diagonal=True).matrix
    torch.testing.assert_close(diag, softmax_ggn_dense(f, x).diagonal())


# ----------------------------------------------------------------------------- selection strategies


@pytest.fixture
def tanh_net():
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def test_sizes_and_registry(tanh_net):
    f = FlatFunctional(tanh_net)  # 67 weights
    assert select_subnetwork("random", f, 10).numel() == 10
    assert select_subnetwork("random", f, 0.25).numel() == round(0.25 * 67)
    assert select_subnetwork("largest-magnitude", f, 1.0).tolist() == list(range(67))
    with pytest.raises(ValueError, match="valid:.*largest-variance"):
        select_subnetwork("biggest", f, 3)
    with pytest.raises(ValueError, match="fraction"):
        select_subnetwork("random", f, 1.5)
    with pytest.raises(ValueError, match=r"\[1, 67\]"):
        select_subnetwork("random", f, 68)
    with pytest.raises(ValueError, match="leave the size unset"):
        select_subnetwork("last-layer", f, 5)
    with pytest.raises(ValueError, match="needs the training data"):
        select_subnetwork("largest-variance", f, 5)
    assert set(SUBNETWORK_STRATEGIES) == {
        "largest-variance",
        "largest-swag-variance",
        "largest-magnitude",
        "random",
        "by-name",
        "last-layer",
        "rank1-factors",
    }


def test_largest_magnitude_random_name_and_last_layer(tanh_net):
    f = FlatFunctional(tanh_net)
    idx = select_subnetwork("largest-magnitude", f, 9)
    assert idx.tolist() == sorted(torch.argsort(f.full_map.abs(), descending=True)[:9].tolist())
    a, b = (select_subnetwork("random", f, 12, seed=s) for s in (0, 0))
    c = select_subnetwork("random", f, 12, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.unique().numel() == 12 and torch.equal(a, a.sort().values) and a.max() < 67
    off = offsets(tanh_net)
    assert torch.equal(select_subnetwork("by-name", f, pattern="*.bias"), torch.cat([off["0.bias"], off["2.bias"]]))
    assert torch.equal(select_subnetwork("by-name", f, pattern="2.*"), torch.cat([off["2.weight"], off["2.bias"]]))
    assert torch.equal(select_subnetwork("last-layer", f), torch.cat([off["2.weight"], off["2.bias"]]))
    with pytest.raises(ValueError, match="no parameter selected"):
        select_subnetwork("by-name", f, pattern="nothing.*")
    with pytest.raises(ValueError, match="factors"):
        select_subnetwork("rank1-factors", f)


def test_rank1_factors_and_last_layer_of_a_rank1_point_network():
    model = rank1_mlp(3, [5], 2, ensemble_size=2)
    net = rank1_point_network(model, DeltaGuide(model))
    f = FlatFunctional(net)
    off = offsets(net)
    factors = torch.cat([v for k, v in off.items() if k.startswith("factors.")])
    assert torch.equal(select_subnetwork("rank1-factors", f), factors)
    assert torch.equal(
        select_subnetwork("last-layer", f), torch.cat([off["model.net.2.weight"], off["model.net.2.bias"]])
    )


def test_largest_variance_against_a_dense_diagonal_laplace(tanh_net):
    x = torch.randn(30, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (30,))
    f = FlatFunctional(tanh_net)
    variance = 1.0 / (softmax_ggn_dense(f, x).diagonal() + 0.5)
    idx = select_subnetwork(
        "largest-variance", f, 15, {"data": DataLoader(TensorDataset(x, y), batch_size=8), "prior_precision": 0.5}
    )
    assert idx.tolist() == sorted(torch.argsort(variance, descending=True)[:15].tolist())


def test_largest_swag_variance_against_a_plain_sgd_run(tanh_net):
    x = torch.randn(32, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (32,))
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    before = copy.deepcopy(tanh_net.state_dict())
    idx = select_subnetwork(
        "largest-swag-variance", FlatFunctional(tanh_net), 10, {"data": loader}, epochs=3, lr=0.05, momentum=0.9
    )
    for k, v in tanh_net.state_dict().items():  # the network is left alone
        assert torch.equal(v, before[k])
    twin = copy.deepcopy(tanh_net)
    opt = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9)
    snaps = []
    for _ in range(3):
        for xb, yb in loader:
            opt.zero_grad()
            F.cross_entropy(twin(xb), yb).backward()
            opt.step()
            snaps.append(torch.nn.utils.parameters_to_vector(twin.parameters()).detach().clone())
    variance = torch.stack(snaps).var(0, unbiased=False)
    assert idx.tolist() == sorted(torch.argsort(variance, descending=True)[:10].tolist())


# ----------------------------------------------------------------------------- posterior API


def test_gridsearch_picks_the_lowest_validation_nll():
    net, loader, _ = _classification_problem()
    g = torch.Generator().manual_seed(9)
    xv, yv = torch.randn(30, 5, generator=g, dtype=torch.float64), torch.randint(0, 4, (30,), generator=g)
    la = SubnetLaplace(net, "classification", "largest-magnitude", subnetwork_size=20, prior_precision=1.0).fit(loader)
    grid = [0.01, 0.1, 1.0, 10.0, 100.0]
    chosen = la.optimize_prior_precision(
        "gridsearch", val_loader=DataLoader(TensorDataset(xv, yv), batch_size=7), grid=grid
    )
    assert la.prior_precision == chosen
    nlls = []
    for d in grid:
        la.prior_precision = d
        nlls.append(metrics.nll(predict(la, xv).probs, yv))
    assert chosen == grid[min(range(len(grid)), key=nlls.__getitem__)]


def test_rank1_predictions_keep_the_members_and_match_dense_glm():
    model = rank1_mlp(3, [6], 4, ensemble_size=3)
    guide = DeltaGuide(model, init_loc_std=0.3)
    x, y = torch.randn(20, 3), torch.randint(0, 4, (20,))
    guide(x)
    net = rank1_point_network(model, guide)
    la = SubnetLaplace(net, "classification", "rank1-factors", prior_mean=1.0).fit(
        DataLoader(TensorDataset(x, y), batch_size=8)
    )
    assert isinstance(la, Posterior) and la.likelihood == "categorical" and la.ensemble_size == 3
    x_new = torch.randn(5, 3)
    J = la.full.restrict(la.subnetwork_indices).jacobian(x_new)  # (K·B, O, M) dense
    var = torch.einsum("rom,mn,ron->ro", J, la.posterior_covariance, J).reshape(3, 5, 4)
    mean, v = la.glm_mean_variance(x_new)
    torch.testing.assert_close(v, var, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(mean, net(x_new).reshape(3, 5, 4))
    for predictive, s in (("glm", 1), ("glm-mc", 6), ("nn", 6)):
        la.predictive = predictive
        p = la.sample_predictions(x_new, 6)
        assert p.shape == (s, 3, 5, 4)
        torch.testing.assert_close(p.sum(-1), torch.ones(s, 3, 5))
        assert predict(la, x_new, num_samples=6, batch_size=2).member_probs.shape == (3, 5, 4)
    # the cached draws: every batch of one predict call sees the same posterior samples
    la.predictive = "nn"
    whole = la.sample_predictions(x_new, 6)
    torch.testing.assert_close(predict(la, x_new, num_samples=6, batch_size=2).samples, whole)


def test_errors_and_unfitted_state(tanh_net):
    with pytest.raises(ValueError, match="likelihood"):
        SubnetLaplace(tanh_net, "poisson")
    with pytest.raises(ValueError, match="sigma_noise must be 1"):
        SubnetLaplace(tanh_net, "classification", sigma_noise=2.0)
    with pytest.raises(ValueError, match="unknown strategy"):
        SubnetLaplace(tanh_net, subnetwork="nope")
    with pytest.raises(ValueError, match="predictive"):
        SubnetLaplace(tanh_net, predictive="laplace-bridge")
    la = SubnetLaplace(tanh_net, "classification", torch.tensor([1, 2, 3]))
    with pytest.raises(RuntimeError, match="fit"):
        la.posterior_covariance
    with pytest.raises(RuntimeError, match="fit"):
        SubnetLaplace(tanh_net).subnetwork_indices
    la.fit((torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))))
    with pytest.raises(ValueError, match="val_loader"):
        la.optimize_prior_precision("gridsearch")
    with pytest.raises(ValueError, match="prior_precision must be a positive"):
        la.prior_precision = -1.0


# ----------------------------------------------------------------------------- digits under rotation


def test_subnetwork_laplace_improves_nll_and_ece_on_rotated_digits():
    split = load_digits(seed=0)
    x_train, y_train = split.x_train.flatten(1), split.y_train
    x_shift, y_shift = rotate(split.x_test, 40.0).flatten(1), split.y_test
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(150):  # full-batch MAP
        opt.zero_grad()
        F.cross_entropy(net(x_train), y_train).backward()
        opt.step()
    la = SubnetLaplace(net, "classification", "largest-variance", subnetwork_size=500)
    la.fit(DataLoader(TensorDataset(x_train, y_train), batch_size=256))
    with torch.no_grad():
        map_probs = torch.softmax(net(x_shift), -1)
        map_clean = torch.softmax(net(split.x_test.flatten(1)), -1)
    probs = predict(la, x_shift).probs
    assert metrics.accuracy(map_probs, y_shift) < 0.5  # a real shift
    assert metrics.nll(probs, y_shift) < 0.6 * metrics.nll(map_probs, y_shift)
    # (< 0.5 while largest-variance chose digits' 256 zero-curvature corner-pixel weights, whose
    # prior-only variance the rotation lights up; they are skipped since issue 20)
    assert metrics.ece(probs, y_shift) < 0.85 * metrics.ece(map_probs, y_shift)
    clean = predict(la, split.x_test.flatten(1)).probs  # in distribution: no worse than the MAP net
    assert metrics.accuracy(clean, y_shift) >= metrics.accuracy(map_clean, y_shift) - 0.01
    assert metrics.nll(clean, y_shift) < 1.1 * metrics.nll(map_clean, y_shift)


# The `rank1-pyro laplace` command (on a trained run, saving the posterior for `predict --posterior laplace`)
# is tested in tests/test_posthoc_save.py.


# ----------------------------------------------------------------------------- input checks and fallbacks


def _regression_la(**kwargs) -> SubnetLaplace:
    """A fitted 2-weight linear regression (indices 0, 1) with δ = 1."""
    g = torch.Generator().manual_seed(11)
    X = torch.randn(12, 2, generator=g, dtype=torch.float64)
    y = torch.randn(12, generator=g, dtype=torch.float64)
    return SubnetLaplace(
        linear_net(torch.tensor([0.5, -1.0], dtype=torch.float64)), "regression", torch.arange(2), **kwargs
    ).fit((X, y))


def test_constructor_rejects_bad_settings(tanh_net):
    """dtype, selection_options, subnetwork_size with indices and the indices' dtype/shape are checked up front."""
    with pytest.raises(ValueError, match=r"dtype must be torch.float32 or torch.float64, got torch.float16"):
        SubnetLaplace(tanh_net, dtype=torch.float16)
    with pytest.raises(TypeError, match="selection_options must be a dict, got list"):
        SubnetLaplace(tanh_net, selection_options=[("seed", 1)])
    with pytest.raises(ValueError, match="subnetwork_size is only used with a strategy name; got indices"):
        SubnetLaplace(tanh_net, "classification", torch.arange(3), subnetwork_size=3)
    with pytest.raises(ValueError, match=r"1-D integer tensor, got torch.float32 \(2,\)"):
        SubnetLaplace(tanh_net, "classification", torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"1-D integer tensor, got torch.int64 \(1, 2\)"):
        SubnetLaplace(tanh_net, "classification", torch.tensor([[0, 1]]))
    # int32 indices are accepted (and stored as int64)
    la = SubnetLaplace(tanh_net, "classification", torch.tensor([4, 2], dtype=torch.int32))
    assert la.subnetwork_indices.dtype == torch.int64 and la.subnetwork_indices.tolist() == [4, 2]


def test_prior_mean_shape_and_unset_prior_precision(tanh_net):
    """A prior mean of neither M nor P entries is refused; an unset δ raises until fit sets it."""
    la = SubnetLaplace(tanh_net, "classification", torch.arange(3), prior_mean=torch.zeros(5))
    with pytest.raises(ValueError, match=r"prior_mean must be a number, a \(3,\) tensor .* \(67,\) tensor .* \(5,\)"):
        la.prior_mean
    la = SubnetLaplace(tanh_net, "classification", torch.arange(3), prior_mean=torch.zeros(3, 1))
    with pytest.raises(ValueError, match=r"got shape \(3, 1\)"):
        la.prior_mean
    la = SubnetLaplace(tanh_net, "classification", torch.arange(3), prior_mean=torch.tensor([1.0, 2.0, 3.0]))
    assert la.prior_mean.tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(RuntimeError, match=r"prior_precision is not set: pass it, call fit\(\)"):
        la.prior_precision


class TwoRows(nn.Module):
    """A plain network that returns two output rows per input (as a rank-1 network with K = 2 would)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        h = self.lin(x)
        return torch.cat([h, 2 * h])


def test_fit_needs_targets_and_one_row_per_input(tanh_net):
    """fit() refuses unlabelled data and a network whose row count does not match its ensemble size."""
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    with pytest.raises(ValueError, match=r"train_loader must yield \(x, y\) batches"):
        SubnetLaplace(tanh_net, "classification", torch.arange(5), prior_precision=1.0).fit(x)
    with pytest.raises(ValueError, match="the network gives 2 output rows per input, expected 1"):
        SubnetLaplace(TwoRows().double(), "classification", torch.arange(5), prior_precision=1.0).fit((x, y))


def test_log_marginal_likelihood_and_gridsearch_reject_bad_arguments():
    """δ must be a number or a tensor (not a bool or a string); the grid must be 1-D, non-empty and positive;
    gridsearch needs labelled validation data."""
    la = _regression_la(prior_precision=1.0)
    for bad, name in (("1.0", "str"), (True, "bool"), ([1.0], "list")):
        with pytest.raises(TypeError, match=f"prior_precision must be a number or a tensor, got {name}"):
            la.log_marginal_likelihood(bad)
    assert la.log_marginal_likelihood(2).item() == pytest.approx(la.log_marginal_likelihood(2.0).item(), rel=1e-15)
    x = torch.randn(4, 2, dtype=torch.float64)
    y = torch.randn(4, dtype=torch.float64)
    for grid in ([], [1.0, -1.0], [1.0, 0.0], [[1.0, 2.0]]):
        with pytest.raises(ValueError, match="grid must be a non-empty 1-D sequence of positive numbers"):
            la.optimize_prior_precision("gridsearch", val_loader=(x, y), grid=grid)
    with pytest.raises(ValueError, match=r"val_loader must yield \(x, y\) batches"):
        la.optimize_prior_precision("gridsearch", val_loader=x, grid=[1.0])
    assert la.prior_precision == 1.0  # left alone by the failed searches


def test_marglik_refuses_an_unbounded_evidence():
    """θ_MAP equal to the prior mean, or H = 0 on the subnetwork, makes log Z unbounded in δ: a clear error."""
    g = torch.Generator().manual_seed(12)
    X = torch.randn(10, 2, generator=g, dtype=torch.float64)
    y = torch.randn(10, generator=g, dtype=torch.float64)
    net = linear_net(torch.tensor([0.7, -0.3], dtype=torch.float64))
    theta = net.weight.detach().flatten().clone()
    with pytest.raises(ValueError, match="grows without bound in delta: theta_MAP equals the prior mean"):
        SubnetLaplace(net, "regression", torch.arange(2), prior_mean=theta).fit((X, y))
    X[:, 0] = 0.0  # the first weight sees no input: no curvature
    la = SubnetLaplace(net, "regression", torch.tensor([0]), prior_precision=1.0).fit((X, y))
    assert la.H.abs().max().item() == 0.0
    with pytest.raises(ValueError, match=r"grows without bound as delta -> 0: H is zero on the subnetwork"):
        la.optimize_prior_precision("marglik")


@pytest.mark.parametrize("scale,w", [(1e-7, 3.0), (1e140, 1e-115)], ids=["tiny-delta", "huge-delta"])
def test_marglik_root_far_outside_the_initial_bracket(scale, w):
    r"""For one weight the root of d log Z / d log δ is closed form, δ = 2λ / (λs + sqrt(λ²s² + 4λs)) (λ = H,
    s = θ²); the bisection widens its bracket until it holds the root, e^-15.6 below it or e^529.6 above it,
    and (where float64 steps in log δ exceed its 1e-13 tolerance) stops after its 200 steps."""
    g = torch.Generator().manual_seed(13)
    X = scale * (1 + torch.rand(10, 1, generator=g, dtype=torch.float64))
    net = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        net.weight.fill_(w)
    la = SubnetLaplace(net, "regression", torch.arange(1)).fit((X, torch.zeros(10, dtype=torch.float64)))
    lam, s = (X**2).sum().item(), w * w
    assert la.H.item() == pytest.approx(lam, rel=1e-12)
    expected = 2 * lam / (lam * s + math.sqrt((lam * s) ** 2 + 4 * lam * s))
    assert not math.exp(-10) < expected < math.exp(10)
    assert la.prior_precision == pytest.approx(expected, rel=1e-9)


def test_gridsearch_regression_with_cached_validation_jacobians():
    """Regression gridsearch whose validation Jacobians fit the M²/4 cache: each δ's summed NLL equals that of
    the exact Gaussian predictive N(x w, x Σ_δ xᵀ + σ²) of Bayesian linear regression, from one pass over the
    validation data."""
    g = torch.Generator().manual_seed(14)
    d, sigma = 20, 0.5
    X = torch.randn(25, d, generator=g, dtype=torch.float64)  # few examples: the epistemic variance matters
    w_true = torch.randn(d, generator=g, dtype=torch.float64)
    y = X @ w_true + sigma * torch.randn(25, generator=g, dtype=torch.float64)
    mean, _ = ridge(X, y, sigma, 1.0)
    la = SubnetLaplace(linear_net(mean), "regression", torch.arange(d), prior_precision=1.0, sigma_noise=sigma)
    la.fit((X, y))
    xv = torch.randn(5, d, generator=g, dtype=torch.float64)  # 5 rows x 20 columns = 100 = M²/4: cached
    yv = xv @ w_true + sigma * torch.randn(5, generator=g, dtype=torch.float64)
    grid = torch.tensor([1e-3, 1.0, 30.0, 1e3, 1e5], dtype=torch.float64)
    expected = []
    for delta in grid.tolist():
        _, cov = ridge(X, y, sigma, delta)
        var = ((xv @ cov) * xv).sum(-1) + sigma**2
        expected.append(-torch.distributions.Normal(xv @ mean, var.sqrt()).log_prob(yv).sum())
    expected = torch.stack(expected)
    val = DataLoader(TensorDataset(xv, yv), batch_size=2)
    jacobian_blocks_of = la._jac.blocks
    calls = []
    la._jac.blocks = lambda x: calls.append(x.shape[0]) or jacobian_blocks_of(x)
    torch.testing.assert_close(la._grid_nll(val, grid), expected, rtol=1e-10, atol=1e-10)
    assert calls == [2, 2, 1]  # one pass over the validation batches, not one per δ: the blocks were cached
    best = int(expected.argmin())
    assert 0 < best < len(grid) - 1  # an interior minimum: not what an all-zero or all-equal NLL would give
    assert la.optimize_prior_precision("gridsearch", val_loader=val, grid=grid.tolist()) == grid[best].item()


def test_eigenvalue_fallbacks_keep_the_exact_evidence(linreg, monkeypatch):
    """If eigvalsh fails on H (simulated: it refuses matrices with a zero row, a weight without curvature), the
    eigenvalues of the block of nonzero rows plus zeros are used, and if it fails on that block too, its
    singular values: either way log Z(δ) is the exact evidence log N(y | 0, σ²I + X Xᵀ/δ). An H without nonzero
    rows has eigenvalues 0."""
    X, y, sigma, delta = linreg
    X = X.clone()
    X[:, 1] = 0.0
    mean, _ = ridge(X, y, sigma, delta)
    expected = exact_log_evidence(X, y, sigma, delta)
    real = torch.linalg.eigvalsh
    calls = []

    def fails_on_zero_rows(A, *args, **kwargs):
        calls.append(A.shape[0])
        if bool((A == 0).all(0).any()):
            raise torch.linalg.LinAlgError("simulated: failed to converge")
        return real(A, *args, **kwargs)

    def always_fails(A, *args, **kwargs):
        calls.append(A.shape[0])
        raise torch.linalg.LinAlgError("simulated: failed to converge")

    for fake, tried in ((fails_on_zero_rows, [4, 3]), (always_fails, [4, 3])):
        calls.clear()
        monkeypatch.setattr(torch.linalg, "eigvalsh", fake)
        la = SubnetLaplace(linear_net(mean), "regression", torch.arange(4), prior_precision=delta, sigma_noise=sigma)
        la.fit((X, y))
        assert la.log_marginal_likelihood().item() == pytest.approx(expected, rel=1e-10)
        assert calls == tried  # H, then its 3 x 3 block of nonzero rows
        monkeypatch.setattr(torch.linalg, "eigvalsh", real)
        reference = torch.linalg.eigvalsh(la.H).clamp_min(0.0)
        torch.testing.assert_close(la._eigenvalues().sort().values, reference, rtol=1e-10, atol=1e-10)
    # H = 0 (only the weight without curvature) and eigvalsh failing: all eigenvalues 0, log Z = log p(y | θ) - δθ²/2
    calls.clear()
    monkeypatch.setattr(torch.linalg, "eigvalsh", always_fails)
    la = SubnetLaplace(linear_net(mean), "regression", torch.tensor([1]), prior_precision=delta, sigma_noise=sigma)
    la.fit((X, y))
    loglik = torch.distributions.Normal(X @ mean, sigma).log_prob(y).sum().item()
    assert la.log_marginal_likelihood().item() == pytest.approx(loglik - 0.5 * delta * mean[1].item() ** 2, rel=1e-12)
    assert calls == [1] and la._eigenvalues().tolist() == [0.0]


def test_cholesky_of_a_torch_that_does_not_factor_in_place(linreg, monkeypatch):
    """If cholesky_ex returns the factor in a new tensor instead of writing it into ``out``, it is copied into
    the buffer: the covariance is still the exact (XᵀX/σ² + δI)⁻¹."""
    X, y, sigma, delta = linreg
    mean, cov = ridge(X, y, sigma, delta)
    real = torch.linalg.cholesky_ex

    def not_in_place(A, *, out=None, **kwargs):
        return real(A.clone(), **kwargs)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", not_in_place)
    la = SubnetLaplace(linear_net(mean), "regression", torch.arange(4), prior_precision=delta, sigma_noise=sigma)
    la.fit((X, y))
    torch.testing.assert_close(la.posterior_covariance, cov, rtol=1e-10, atol=1e-12)


def test_float32_cholesky_failure_names_its_remedies():
    """H + δI that is singular in float32 (two identical large input columns, δ below H's float32 resolution)
    raises LinAlgError naming dtype and δ; in float64 the same posterior factors and equals the exact inverse."""
    g = torch.Generator().manual_seed(15)
    X = 1e4 * torch.randn(20, 1, generator=g, dtype=torch.float64).repeat(1, 2)
    y = torch.randn(20, generator=g, dtype=torch.float64)
    net = linear_net(torch.tensor([0.1, 0.2], dtype=torch.float64))
    la = SubnetLaplace(net, "regression", torch.arange(2), prior_precision=1.0, dtype=torch.float32).fit((X, y))
    with pytest.raises(
        torch.linalg.LinAlgError,
        match=r"H \+ 1 I is not positive definite in torch.float32 \(leading minor 2\): use dtype=torch.float64",
    ):
        la.posterior_covariance
    la64 = SubnetLaplace(net, "regression", torch.arange(2), prior_precision=1.0).fit((X, y))
    exact = torch.linalg.inv(X.T @ X + torch.eye(2, dtype=torch.float64))
    torch.testing.assert_close(la64.posterior_covariance, exact, rtol=1e-6, atol=0)


def test_loading_checks_saved_h_and_dtype():
    """A saved H of the wrong shape and a saved dtype other than float32/float64 are refused; a dtype given as a
    torch.dtype override is used as is."""
    la = _regression_la(prior_precision=1.0)
    state = la.state_dict()
    bad = copy.deepcopy(state)
    bad["state"]["H"] = torch.zeros(3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"saved H must be a \(2, 2\) tensor"):
        SubnetLaplace.from_state_dict(la.model, bad)
    bad["state"]["H"] = [[1.0, 0.0], [0.0, 1.0]]
    with pytest.raises(ValueError, match=r"saved H must be a \(2, 2\) tensor"):
        SubnetLaplace.from_state_dict(la.model, bad)
    bad = copy.deepcopy(state)
    bad["settings"]["dtype"] = "float16"
    with pytest.raises(ValueError, match="saved dtype must be 'float32' or 'float64', got 'float16'"):
        SubnetLaplace.from_state_dict(la.model, bad)
    loaded = SubnetLaplace.from_state_dict(la.model, state, dtype=torch.float32)
    assert loaded.dtype == torch.float32 and loaded.H.dtype == torch.float32
    torch.testing.assert_close(loaded.H, la.H.float())
    torch.testing.assert_close(loaded.posterior_covariance, la.posterior_covariance, rtol=1e-5, atol=1e-7)


class Branchy(nn.Module):
    """Data-dependent Python control flow (cannot be vmapped over examples) and a parameter without a layer rule."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        h = self.lin(x)
        return h * self.scale if h.sum() > 0 else h / self.scale


def test_jacobians_of_a_network_that_cannot_be_vmapped():
    """supports_per_example is False for data-dependent control flow, and reverse mode then takes jacrev of
    sub-batches: the columns equal the dense jacrev Jacobian."""
    torch.manual_seed(16)
    net = Branchy().double()
    f = FlatFunctional(net)
    x = torch.randn(5, 3, dtype=torch.float64)
    assert not supports_per_example(f, x)
    out, J = jacobian_columns(f, x, mode="reverse")
    torch.testing.assert_close(J, f.jacobian(x), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out, net(x))


def test_jacobian_blocks_and_empty_batches():
    """jacobian_blocks yields consecutive (start, out, J) sub-batches that tile the dense Jacobian; an empty or
    0-d x is refused."""
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    f = FlatFunctional(net)
    x = torch.randn(7, 4, dtype=torch.float64)
    idx = torch.tensor([0, 3, 9, 21, 30, 40])
    blocks = list(jacobian_blocks(f.restrict(idx), x, mode="forward", max_elements=3 * 3 * 6))
    assert [start for start, _, _ in blocks] == [0, 3, 6]
    assert [J.shape for _, _, J in blocks] == [(1, 3, 3, 6), (1, 3, 3, 6), (1, 1, 3, 6)]
    torch.testing.assert_close(torch.cat([J[0] for _, _, J in blocks]), f.jacobian(x)[..., idx], rtol=1e-10, atol=0)
    torch.testing.assert_close(torch.cat([o[0] for _, o, _ in blocks]), net(x))
    for bad in (torch.empty(0, 4, dtype=torch.float64), torch.tensor(1.0), [[1.0] * 4]):
        with pytest.raises(ValueError, match=r"x must be a non-empty batch \(B, \.\.\.\)"):
            next(jacobian_blocks(f, bad))


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
def test_a_zero_input_linear_layer_gets_its_bias_columns_by_the_layer_rule():
    """A Linear with no inputs has a zero-element weight: the reverse layer rule plans no part for it and gives
    the bias columns (no entry left to jacrev), equal to the dense jacrev ones (this crashed on a reshape before)."""
    torch.manual_seed(17)
    net = nn.Sequential(nn.Linear(0, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    with torch.no_grad():
        net[0].bias.uniform_(-1, 1)
    f = FlatFunctional(net)
    assert f.num_params == 3 + 6 + 2
    x = torch.zeros(4, 0, dtype=torch.float64)
    columns = JacobianColumns(f, mode="reverse", per_example=False)
    out, J = columns(x)
    assert [(path, kind, [attr for _, _, attr in parts]) for path, _, kind, parts in columns.layers] == [
        ("0", "linear", ["bias"]),
        ("2", "linear", ["weight", "bias"]),
    ]
    assert columns.generic is None
    torch.testing.assert_close(J, f.jacobian(x), rtol=1e-10, atol=1e-12)
    assert J[..., :3].abs().sum() > 0  # the first layer's bias does move the outputs


def test_ggn_rejects_bad_arguments():
    """ggn checks σ > 0, a floating accumulation dtype, integer class labels and non-empty data."""
    net = nn.Sequential(nn.Linear(4, 3)).double()
    f = FlatFunctional(net)
    x = torch.randn(5, 4, dtype=torch.float64)
    for sigma in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="sigma_noise must be > 0, got"):
            ggn(f, x, "regression", sigma_noise=sigma)
    with pytest.raises(TypeError, match="dtype must be a floating dtype, got torch.int64"):
        ggn(f, x, "classification", dtype=torch.int64)
    for y in (torch.tensor([0.0, 1.0, 2.0, 0.0, 1.0]), torch.tensor([True, False, True, False, True])):
        with pytest.raises(TypeError, match=f"class labels must be integers, got dtype {y.dtype}"):
            ggn(f, (x, y), "classification")
    with pytest.raises(ValueError, match="data is empty"):
        ggn(f, [], "classification")
    # float32 accumulation of a float64 network: the same H, rounded
    torch.testing.assert_close(
        ggn(f, x, "classification", dtype=torch.float32).matrix, softmax_ggn_dense(f, x).float(), rtol=1e-5, atol=1e-6
    )


# ----------------------------------------------------------------------------- exact messages, defaults, devices


def _exactly(message: str) -> str:
    """A pattern matching ``message`` and nothing more (pytest.raises searches)."""
    return "^" + re.escape(message) + "$"


def test_positive_settings_are_refused_with_the_exact_message():
    """δ and σ must be positive finite real numbers: a string, None, a bool, 0, a negative, NaN or infinity is a
    ValueError naming the setting and the value (not a TypeError, and 0 and True are not accepted)."""
    la = _regression_la(prior_precision=1.0)
    net = linear_net(torch.tensor([0.5, -1.0], dtype=torch.float64))
    for bad in ("1.0", None, True, 0, 0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=_exactly(f"prior_precision must be a positive number, got {bad!r}")):
            la.prior_precision = bad
        if bad is not None:  # (None: the default σ)
            with pytest.raises(ValueError, match=_exactly(f"sigma_noise must be a positive number, got {bad!r}")):
                SubnetLaplace(net, "regression", torch.arange(2), sigma_noise=bad)
    assert la.prior_precision == 1.0
    la.prior_precision = 3  # an int is a number
    assert la.prior_precision == 3.0 and isinstance(la.prior_precision, float)


def test_log_marginal_likelihood_refuses_nonpositive_or_infinite_delta_exactly():
    """log Z(δ) is only defined for finite δ > 0: 0, a negative, NaN, infinity, or a tensor holding one of them,
    is a ValueError listing the values."""
    la = _regression_la(prior_precision=1.0)
    for bad, shown in (
        (0.0, "0.0"),
        (-1.0, "-1.0"),
        (float("nan"), "nan"),
        (float("inf"), "inf"),
        (torch.tensor([1.0, 0.0]), "[1.0, 0.0]"),
        (torch.tensor([2.0, -3.0]), "[2.0, -3.0]"),
    ):
        with pytest.raises(ValueError, match=_exactly(f"prior_precision must be > 0 and finite, got {shown}")):
            la.log_marginal_likelihood(bad)


def test_prior_precision_errors_are_exact():
    """The unbounded-evidence refusals, an unknown method, gridsearch without data and a bad grid raise exactly
    their documented messages."""
    g = torch.Generator().manual_seed(12)
    X = torch.randn(10, 2, generator=g, dtype=torch.float64)
    y = torch.randn(10, generator=g, dtype=torch.float64)
    net = linear_net(torch.tensor([0.7, -0.3], dtype=torch.float64))
    theta = net.weight.detach().flatten().clone()
    with pytest.raises(
        ValueError,
        match=_exactly("the marginal likelihood grows without bound in delta: theta_MAP equals the prior mean"),
    ):
        SubnetLaplace(net, "regression", torch.arange(2), prior_mean=theta).fit((X, y))
    X[:, 0] = 0.0
    la = SubnetLaplace(net, "regression", torch.tensor([0]), prior_precision=1.0).fit((X, y))
    with pytest.raises(
        ValueError,
        match=_exactly("the marginal likelihood grows without bound as delta -> 0: H is zero on the subnetwork"),
    ):
        la.optimize_prior_precision("marglik")
    with pytest.raises(ValueError, match=_exactly("method: unknown name 'mackay'; valid: ['marglik', 'gridsearch']")):
        la.optimize_prior_precision("mackay")
    with pytest.raises(ValueError, match=_exactly("method='gridsearch' needs val_loader")):
        la.optimize_prior_precision("gridsearch")
    with pytest.raises(ValueError, match=_exactly("grid must be a non-empty 1-D sequence of positive numbers")):
        la.optimize_prior_precision("gridsearch", val_loader=(X, y), grid=[1.0, -1.0])
    assert la.prior_precision == 1.0


def test_optimize_prior_precision_defaults_to_the_marginal_likelihood():
    """Called without arguments, optimize_prior_precision maximises the evidence: for one weight the root of
    d log Z / d log δ is closed form, δ = 2λ / (λs + sqrt(λ²s² + 4λs)) (λ = H, s = θ²)."""
    g = torch.Generator().manual_seed(21)
    X = 1 + torch.rand(10, 1, generator=g, dtype=torch.float64)
    w = 0.8
    net = linear_net(torch.tensor([w], dtype=torch.float64))
    la = SubnetLaplace(net, "regression", torch.arange(1), prior_precision=123.0).fit((X, torch.zeros(10)))
    lam, s = (X**2).sum().item(), w * w
    expected = 2 * lam / (lam * s + math.sqrt((lam * s) ** 2 + 4 * lam * s))
    assert la.optimize_prior_precision() == pytest.approx(expected, rel=1e-10)
    assert la.prior_precision == pytest.approx(expected, rel=1e-10)


def test_gridsearch_default_grid_is_logspace_minus4_4_41():
    """Without a grid, gridsearch picks the δ of torch.logspace(-4, 4, 41) (float64) with the lowest validation
    NLL of the exact Gaussian predictive N(x w, x Σ_δ xᵀ + σ²) of Bayesian linear regression: here 10^(26/5 - 4),
    an interior point that is no power of 10 and lies on no other nearby grid."""
    g = torch.Generator().manual_seed(23)
    d, sigma = 20, 0.5
    X = torch.randn(25, d, generator=g, dtype=torch.float64)
    w_true = torch.randn(d, generator=g, dtype=torch.float64)
    y = X @ w_true + sigma * torch.randn(25, generator=g, dtype=torch.float64)
    mean, _ = ridge(X, y, sigma, 1.0)
    xv = torch.randn(30, d, generator=g, dtype=torch.float64)
    yv = xv @ w_true + sigma * torch.randn(30, generator=g, dtype=torch.float64)
    grid = torch.tensor([10.0 ** (-4 + 0.2 * i) for i in range(41)], dtype=torch.float64)
    nll = []
    for delta in grid.tolist():
        _, cov = ridge(X, y, sigma, delta)
        var = ((xv @ cov) * xv).sum(-1) + sigma**2
        nll.append(-torch.distributions.Normal(xv @ mean, var.sqrt()).log_prob(yv).sum().item())
    best = min(range(41), key=nll.__getitem__)
    assert best == 26
    la = SubnetLaplace(linear_net(mean), "regression", torch.arange(d), prior_precision=1.0, sigma_noise=sigma)
    la.fit((X, y))
    chosen = la.optimize_prior_precision("gridsearch", val_loader=(xv, yv))
    assert chosen == la.prior_precision
    assert chosen == pytest.approx(grid[best].item(), rel=1e-14)
    assert chosen == torch.logspace(-4, 4, 41, dtype=torch.float64)[best].item()


def test_gridsearch_classification_nll_equals_the_dense_probit_predictive():
    """Each δ's classification NLL is −Σ log softmax(f / sqrt(1 + π/8 diag(J Σ_δ Jᵀ)))[y] with the dense jacrev
    Jacobian J and Σ_δ = (H + δI)⁻¹ from the dense GGN, and gridsearch picks its (interior) minimiser."""
    net, loader, _ = _classification_problem()
    g = torch.Generator().manual_seed(22)
    xv = torch.randn(40, 5, generator=g, dtype=torch.float64)
    with torch.no_grad():
        net[2].weight.mul_(8.0)  # confident logits
        net[2].bias.mul_(8.0)
        logits = net(xv)
    # mostly the network's own labels, a quarter random: neither the smallest nor the largest δ is best
    yv = torch.where(torch.rand(40, generator=g) < 0.25, torch.randint(0, 4, (40,), generator=g), logits.argmax(-1))
    idx = torch.randperm(sum(p.numel() for p in net.parameters()), generator=g)[:20].sort().values
    la = SubnetLaplace(net, "classification", idx, prior_precision=1.0).fit(loader)
    f = FlatFunctional(net).restrict(idx)
    X = torch.cat([x for x, _ in loader])
    H = softmax_ggn_dense(f, X)
    J = f.jacobian(xv)  # (B, C, M)
    grid = torch.logspace(-3, 3, 13, dtype=torch.float64)
    expected = []
    for delta in grid.tolist():
        cov = torch.linalg.inv(H + delta * torch.eye(20, dtype=torch.float64))
        var = torch.einsum("bcm,mn,bcn->bc", J, cov, J)
        probs = torch.softmax(logits / torch.sqrt(1 + math.pi / 8 * var), -1)
        expected.append(-probs[torch.arange(40), yv].log().sum())
    expected = torch.stack(expected)
    val = DataLoader(TensorDataset(xv, yv), batch_size=16)
    torch.testing.assert_close(la._grid_nll(val, grid), expected, rtol=1e-8, atol=1e-8)
    best = int(expected.argmin())
    assert 0 < best < len(grid) - 1
    assert la.optimize_prior_precision("gridsearch", val_loader=val, grid=grid) == grid[best].item()


def test_gridsearch_regression_nll_is_exact_for_targets_far_in_the_tails():
    """Validation targets 20 predictive standard deviations off (each density ~e^-200, their product below the
    smallest float64): the summed NLL is still the exact −Σ log N(y | x w, x Σ_δ xᵀ + σ²), per example."""
    g = torch.Generator().manual_seed(24)
    d, sigma, delta = 3, 0.5, 2.0
    X = torch.randn(30, d, generator=g, dtype=torch.float64)
    y = X @ torch.randn(d, generator=g, dtype=torch.float64) + sigma * torch.randn(30, generator=g, dtype=torch.float64)
    mean, cov = ridge(X, y, sigma, delta)
    la = SubnetLaplace(linear_net(mean), "regression", torch.arange(d), prior_precision=delta, sigma_noise=sigma)
    la.fit((X, y))
    xv = torch.randn(8, d, generator=g, dtype=torch.float64)
    sd = (((xv @ cov) * xv).sum(-1) + sigma**2).sqrt()
    yv = xv @ mean + 20 * sd * torch.tensor([1.0, -1.0]).repeat(4).double()
    expected = -torch.distributions.Normal(xv @ mean, sd).log_prob(yv).sum()
    assert expected.item() > 8 * 200  # far beyond -log(1e-300) = 690.8 in total
    nll = la._grid_nll((xv, yv), torch.tensor([delta], dtype=torch.float64))
    torch.testing.assert_close(nll, expected.reshape(1), rtol=1e-10, atol=0)


def test_log_evidence_with_a_nonzero_prior_mean_is_exact(linreg):
    """With the prior N(μ0, δ⁻¹I) and θ_MAP its exact posterior mean, log Z(δ) is the exact evidence
    log N(y | X μ0, σ²I + X Xᵀ/δ), for μ0 given over the subnetwork or over all of θ."""
    X, y, sigma, delta = linreg
    mu0 = torch.tensor([0.5, -1.0, 2.0, 0.3], dtype=torch.float64)
    precision = X.T @ X / sigma**2 + delta * torch.eye(4, dtype=torch.float64)
    mean = torch.linalg.solve(precision, X.T @ y / sigma**2 + delta * mu0)
    cov = sigma**2 * torch.eye(len(y), dtype=torch.float64) + X @ X.T / delta
    expected = torch.distributions.MultivariateNormal(X @ mu0, cov).log_prob(y).item()
    for prior_mean in (mu0, mu0.tolist()):
        la = SubnetLaplace(
            linear_net(mean),
            "regression",
            torch.arange(4),
            prior_precision=delta,
            sigma_noise=sigma,
            prior_mean=prior_mean,
        ).fit((X, y))
        assert la.log_marginal_likelihood().item() == pytest.approx(expected, rel=1e-10)
    # over a subnetwork of 2 of the 4 weights, μ0 given over all of θ is sliced
    sub = SubnetLaplace(
        linear_net(mean), "regression", torch.tensor([1, 3]), prior_precision=delta, sigma_noise=sigma, prior_mean=mu0
    ).fit((X, y))
    Xs, ys = X[:, [1, 3]], y - X[:, [0, 2]] @ mean[[0, 2]]
    Ps = Xs.T @ Xs / sigma**2 + delta * torch.eye(2, dtype=torch.float64)
    diff = mean[[1, 3]] - mu0[[1, 3]]
    loglik = torch.distributions.Normal(Xs @ mean[[1, 3]], sigma).log_prob(ys).sum()
    laplace = loglik - 0.5 * delta * diff.square().sum() + math.log(delta) - 0.5 * torch.logdet(Ps)
    assert sub.log_marginal_likelihood().item() == pytest.approx(laplace.item(), rel=1e-10)


def test_evidence_and_factor_use_the_network_device_not_the_default_one(linreg, monkeypatch):
    """With another default device (meta), log Z(δ) for a number δ, the eigenvalue fallback and the Cholesky
    factor still live on the network's device and equal the exact evidence and covariance."""
    X, y, sigma, delta = linreg
    mean, cov = ridge(X, y, sigma, delta)
    la = SubnetLaplace(linear_net(mean), "regression", torch.arange(4), prior_precision=delta, sigma_noise=sigma)
    la.fit((X, y))
    with torch.device("meta"):
        value = la.log_marginal_likelihood(delta)
        covariance = la.posterior_covariance
    assert value.item() == pytest.approx(exact_log_evidence(X, y, sigma, delta), rel=1e-10)
    torch.testing.assert_close(covariance, cov, rtol=1e-10, atol=1e-12)
    real = torch.linalg.eigvalsh

    def fails_on_all_of_h(A, *args, **kwargs):
        if A.shape[0] == 4:
            raise torch.linalg.LinAlgError("simulated: failed to converge")
        return real(A, *args, **kwargs)

    X = X.clone()
    X[:, 2] = 0.0
    mean, _ = ridge(X, y, sigma, delta)
    la = SubnetLaplace(linear_net(mean), "regression", torch.arange(4), prior_precision=delta, sigma_noise=sigma)
    la.fit((X, y))
    monkeypatch.setattr(torch.linalg, "eigvalsh", fails_on_all_of_h)
    with torch.device("meta"):
        value = la.log_marginal_likelihood(delta)
    assert value.item() == pytest.approx(exact_log_evidence(X, y, sigma, delta), rel=1e-10)


def _eigvalsh_failing_on_a_zero_column(monkeypatch):
    """Make ``torch.linalg.eigvalsh`` fail (as LAPACK may) on a matrix with a zero column, which sends
    ``log_marginal_likelihood`` to its fallback; returns the real ``eigvalsh``."""
    real = torch.linalg.eigvalsh

    def fails_on_zero_columns(A, *args, **kwargs):
        if bool((A == 0).all(0).any()):
            raise torch.linalg.LinAlgError("simulated: failed to converge")
        return real(A, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigvalsh", fails_on_zero_columns)
    return real


def test_eigenvalue_fallback_keeps_eigenvalues_below_one(linreg, monkeypatch):
    """The fallback's eigenvalues of the nonzero block are only clamped at 0: with small inputs (eigenvalues of
    XᵀX/σ² below 1) log Z(δ) is still the exact evidence."""
    X, y, sigma, delta = linreg
    X = 0.02 * X
    X[:, 1] = 0.0
    mean, _ = ridge(X, y, sigma, delta)
    real = _eigvalsh_failing_on_a_zero_column(monkeypatch)
    la = SubnetLaplace(linear_net(mean), "regression", torch.arange(4), prior_precision=delta, sigma_noise=sigma)
    la.fit((X, y))
    assert 0 < float(real(la.H).max()) < 1
    assert la.log_marginal_likelihood().item() == pytest.approx(exact_log_evidence(X, y, sigma, delta), rel=1e-10)


def test_only_the_upper_triangle_of_a_saved_h_is_read(linreg, monkeypatch):
    """A saved H is read through its upper triangle only, by the eigenvalues of log Z (also in the fallback,
    where a weight without curvature is one whose column is zero) as by the Cholesky factor: junk in the lower
    triangle of the row of a weight without curvature leaves log Z the exact evidence and Σ the exact
    (XᵀX/σ² + δI)⁻¹."""
    X, y, sigma, delta = linreg
    X = X.clone()
    X[:, 1] = 0.0
    mean, cov = ridge(X, y, sigma, delta)
    la = SubnetLaplace(linear_net(mean), "regression", torch.arange(4), prior_precision=delta, sigma_noise=sigma)
    state = la.fit((X, y)).state_dict()
    assert state["state"]["H"][1].abs().max().item() == 0.0
    state["state"]["H"][1, 0] = 50.0  # below the diagonal
    expected = exact_log_evidence(X, y, sigma, delta)
    loaded = SubnetLaplace.from_state_dict(la.model, state)
    assert loaded.log_marginal_likelihood().item() == pytest.approx(expected, rel=1e-10)
    torch.testing.assert_close(loaded.posterior_covariance, cov, rtol=1e-10, atol=1e-12)
    _eigvalsh_failing_on_a_zero_column(monkeypatch)
    loaded = SubnetLaplace.from_state_dict(la.model, state)
    assert loaded.log_marginal_likelihood().item() == pytest.approx(expected, rel=1e-10)


def test_one_cholesky_factorisation_per_prior_precision(linreg, monkeypatch):
    """The factor of H + δI is computed once per δ and reused by the covariance, draws and predictives until δ
    changes (each factor equal to the exact one)."""
    X, y, sigma, delta = linreg
    mean, cov = ridge(X, y, sigma, delta)
    real = torch.linalg.cholesky_ex
    calls = []

    def counting(A, *args, **kwargs):
        calls.append(A.shape[0])
        return real(A, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", counting)
    la = SubnetLaplace(linear_net(mean), "regression", torch.arange(4), prior_precision=delta, sigma_noise=sigma)
    la.fit((X, y))
    assert calls == []
    torch.testing.assert_close(la.posterior_covariance, cov, rtol=1e-10, atol=1e-12)
    la.sample(5)
    la.glm_mean_variance(X[:3])
    torch.testing.assert_close(la.posterior_covariance, cov, rtol=1e-10, atol=1e-12)
    assert calls == [4]
    la.prior_precision = 3.0
    torch.testing.assert_close(la.posterior_covariance, ridge(X, y, sigma, 3.0)[1], rtol=1e-10, atol=1e-12)
    la.sample(5)
    assert calls == [4, 4]


def test_draws_follow_a_strongly_correlated_posterior():
    """For nearly collinear inputs the exact posterior covariance (XᵀX/σ² + δI)⁻¹ has correlations near -1:
    the empirical covariance of the draws matches it entrywise (within sampling error), off-diagonal included."""
    g = torch.Generator().manual_seed(25)
    x0 = torch.randn(40, 1, generator=g, dtype=torch.float64)
    X = torch.cat([x0, x0 + 0.05 * torch.randn(40, 1, generator=g, dtype=torch.float64), x0.abs()], 1)
    y = X.sum(-1) + 0.3 * torch.randn(40, generator=g, dtype=torch.float64)
    mean, cov = ridge(X, y, 0.3, 1.0)
    assert cov[0, 1] / (cov[0, 0] * cov[1, 1]).sqrt() < -0.9
    la = SubnetLaplace(linear_net(mean), "regression", torch.arange(3), prior_precision=1.0, sigma_noise=0.3)
    la.fit((X, y))
    draws = la.sample(20000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(draws.mean(0), mean, atol=0.05 * cov.diagonal().max().sqrt().item(), rtol=0)
    torch.testing.assert_close(torch.cov(draws.T), cov, rtol=0, atol=0.05 * cov.abs().max().item())


# ---- the posterior's lifecycle: construction, fit, draws, save/load, repr ----


# ----------------------------------------------------------------------------- helpers


def _linear_problem(n: int = 40, d: int = 4, sigma: float = 0.5, delta: float = 2.0, seed: int = 1):
    """Bayesian linear regression y = X w + N(0, σ²), w ~ N(0, δ⁻¹ I) in float64: the data, the exact
    posterior mean, and the lower Cholesky factor of the exact posterior precision XᵀX/σ² + δI."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = X @ torch.randn(d, generator=g, dtype=torch.float64) + sigma * torch.randn(n, generator=g, dtype=torch.float64)
    precision = X.T @ X / sigma**2 + delta * torch.eye(d, dtype=torch.float64)
    mean = torch.linalg.solve(precision, X.T @ y / sigma**2)
    return X, y, mean, torch.linalg.cholesky(precision)


def _linear_net(w: torch.Tensor) -> nn.Linear:
    """y = x·w without bias, in w's dtype."""
    net = nn.Linear(w.numel(), 1, bias=False).to(w.dtype)
    with torch.no_grad():
        net.weight.copy_(w.reshape(1, -1))
    return net


def _fitted_linear(sigma: float = 0.5, delta: float = 2.0, **kwargs):
    """The linear problem and a SubnetLaplace over all 4 weights of the net at the exact posterior mean."""
    X, y, mean, L = _linear_problem(sigma=sigma, delta=delta)
    la = SubnetLaplace(
        _linear_net(mean), "regression", torch.arange(4), prior_precision=delta, sigma_noise=sigma, **kwargs
    ).fit((X, y))
    return la, X, y, mean, L


def _exact_draws(mean: torch.Tensor, L: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """θ* + L⁻ᵀ ε row by row, for L the Cholesky factor of the exact posterior precision."""
    return mean + torch.linalg.solve_triangular(L.T, eps.T, upper=True).T


class RowRecorder(nn.Module):
    """A small tanh net that records how many input rows each of its forward calls sees."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
        self.rows: list[int] = []

    def forward(self, x):
        self.rows.append(x.shape[0])
        return self.body(x)


# ----------------------------------------------------------------------------- constructor


def test_constructor_messages_are_exact():
    """Each bad setting is refused with the exact message naming the argument (and nothing else)."""
    net = _linear_net(torch.zeros(4, dtype=torch.float64))
    cases = [
        ({"sigma_noise": -1.0}, "sigma_noise must be a positive number, got -1.0"),
        ({"sigma_noise": math.inf}, "sigma_noise must be a positive number, got inf"),
        ({"prior_precision": 0}, "prior_precision must be a positive number, got 0"),
        (
            {"jacobian_mode": "sideways"},
            "jacobian_mode: unknown name 'sideways'; valid: ['auto', 'forward', 'reverse']",
        ),
        ({"max_block_elements": 0}, "max_block_elements must be an integer >= 1, got 0"),
        ({"subnetwork_size": 2}, "subnetwork_size is only used with a strategy name; got indices"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=_exactly(message)):
            SubnetLaplace(net, "regression", torch.arange(4), **kwargs)


def test_constructor_defaults_chunk_size_and_classification_noise():
    """chunk_size defaults to 32 and a classification posterior has σ = 1, which also survives a save/load."""
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    la = SubnetLaplace(net, "classification", torch.arange(5), prior_precision=1.0)
    assert la.chunk_size == 32 and la.sigma_noise == 1.0
    assert SubnetLaplace(net, "classification", torch.arange(5), sigma_noise=1).sigma_noise == 1.0
    g = torch.Generator().manual_seed(2)
    la.fit((torch.randn(10, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (10,), generator=g)))
    loaded = SubnetLaplace.from_state_dict(net, la.state_dict())
    assert loaded.sigma_noise == 1.0 and loaded.chunk_size == 32


def test_param_names_choose_the_flat_theta_the_indices_point_into():
    """With ``param_names=["0.bias"]`` index 0 is the bias: its Jacobian column is all ones, so its exact
    posterior variance is 1 / (N/σ² + δ) (index 0 of the default θ would be a weight instead)."""
    g = torch.Generator().manual_seed(4)
    X = torch.randn(20, 3, generator=g, dtype=torch.float64)
    y = torch.randn(20, generator=g, dtype=torch.float64)
    net = nn.Sequential(nn.Linear(3, 1)).double()
    sigma, delta = 0.5, 2.0
    la = SubnetLaplace(
        net, "regression", torch.tensor([0]), prior_precision=delta, sigma_noise=sigma, param_names=["0.bias"]
    ).fit((X, y))
    expected = torch.tensor([[1.0 / (20 / sigma**2 + delta)]], dtype=torch.float64)
    torch.testing.assert_close(la.posterior_covariance, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(la.theta_map, net[0].bias.detach())


def test_rank1_regression_noise_default_and_member_glm_predictive():
    """A rank-1 point network's σ defaults to the model's softplus(noise_raw), and its closed-form GLM
    regression predictive keeps the K members: ``(1, K, B, 2)`` = (f, diag(J Σ Jᵀ) + σ²) with Σ the inverse of
    the member-averaged dense GGN (1/K) Σ_r J_rᵀ J_r / σ² + δI."""
    model = rank1_mlp(3, [5], 1, ensemble_size=2, likelihood="normal")
    with torch.no_grad():
        model.noise_raw.fill_(0.0)  # σ = softplus(0) = log 2
    guide = DeltaGuide(model, init_loc_std=0.3)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(9, 3, generator=g), torch.randn(9, generator=g)
    guide(x)
    net = rank1_point_network(model, guide)
    la = SubnetLaplace(net, "regression", "rank1-factors", prior_precision=1.5, prior_mean=1.0).fit((x, y))
    assert la.sigma_noise == pytest.approx(math.log(2.0), rel=1e-6)
    sigma2 = math.log(2.0) ** 2
    f = FlatFunctional(net).restrict(la.subnetwork_indices)
    J = f.jacobian(x).double()  # (K·B, 1, M)
    M = J.shape[-1]
    H = torch.einsum("rom,ron->mn", J, J) / 2 / sigma2
    cov = torch.linalg.inv(H + 1.5 * torch.eye(M, dtype=torch.float64))
    x_new = torch.randn(4, 3, generator=g)
    Jn = f.jacobian(x_new).double()
    var = torch.einsum("rom,mn,ron->r", Jn, cov, Jn).reshape(2, 4)
    pred = la.sample_predictions(x_new, 1)
    assert pred.shape == (1, 2, 4, 2)
    torch.testing.assert_close(pred[0, ..., 0], net(x_new).detach().reshape(2, 4))
    torch.testing.assert_close(pred[0, ..., 1].double(), var + sigma2, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- unfitted state and repr


def test_unfitted_state_and_its_exact_message():
    """Before fit (and after a fit that failed) H, the log-likelihood and N are None, and everything that needs
    the fit raises exactly "call fit(train_loader) first"."""
    X, y, mean, _ = _linear_problem()
    la = SubnetLaplace(_linear_net(mean), "regression", torch.arange(4), prior_precision=1.0)
    assert la.H is None and la.log_likelihood is None and la.num_data is None
    calls = [
        lambda: la.posterior_covariance,
        lambda: la.posterior_precision,
        lambda: la.log_marginal_likelihood(),
        lambda: la.sample(2),
        lambda: la.sample_predictions(X[:2], 1),
        lambda: la.state_dict(),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match=_exactly("call fit(train_loader) first")):
            call()
    la.fit((X, y))
    assert la.num_data == 40
    message = "train_loader must yield (x, y) batches: the marginal likelihood needs targets"
    with pytest.raises(ValueError, match=_exactly(message)):
        la.fit(X)
    assert la.H is None and la.log_likelihood is None and la.num_data is None
    with pytest.raises(RuntimeError, match=_exactly("call fit(train_loader) first")):
        la.sample(2)


def test_repr_of_unfitted_and_fitted_posteriors():
    """The repr names the subnetwork (strategy, or size once chosen), likelihood, δ (4 significant digits, or
    "unset"), predictive and whether (and on how many examples) it was fitted."""
    net = _linear_net(torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=torch.float64))
    la = SubnetLaplace(net, "classification", "largest-magnitude", 2)
    expected = (
        "SubnetLaplace(strategy='largest-magnitude', likelihood='categorical', prior_precision=unset, "
        "predictive='glm', unfitted)"
    )
    assert repr(la) == expected
    la = SubnetLaplace(net, "regression", torch.arange(3), prior_precision=0.123456, predictive="nn")
    expected = "SubnetLaplace(num_params=3, likelihood='normal', prior_precision=0.1235, predictive='nn', unfitted)"
    assert repr(la) == expected
    la, *_ = _fitted_linear()
    expected = "SubnetLaplace(num_params=4, likelihood='normal', prior_precision=2, predictive='glm', fitted on 40)"
    assert repr(la) == expected


# ----------------------------------------------------------------------------- draws


def test_sample_with_a_seeded_generator_is_the_exact_posterior_draw():
    """``sample(S, generator)`` is θ* + L⁻ᵀ ε for ε the generator's float64 standard normals (S, M) and L the
    Cholesky factor of the exact precision XᵀX/σ² + δI; the global RNG plays no part; and many draws have the
    exact mean and covariance."""
    la, _, _, mean, L = _fitted_linear()
    torch.manual_seed(0)
    draws = la.sample(5, generator=torch.Generator().manual_seed(3))
    eps = torch.randn(5, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(draws, _exact_draws(mean, L, eps), rtol=1e-10, atol=1e-12)
    torch.manual_seed(1)
    torch.testing.assert_close(la.sample(5, generator=torch.Generator().manual_seed(3)), draws, rtol=0, atol=0)
    many = la.sample(20000, generator=torch.Generator().manual_seed(4))
    cov = torch.cholesky_inverse(L)
    torch.testing.assert_close(many.mean(0), mean, rtol=0, atol=4 * cov.diagonal().max().sqrt().item() / 100)
    torch.testing.assert_close(torch.cov(many.T), cov, rtol=0.05, atol=0.05 * cov.abs().max().item())


def test_draws_come_in_the_network_dtype_and_device():
    """A float32 network gets float32 draws (the factor stays float64); with the meta device as the default
    device, draws and predictions (from the same seeds) are still made on the network's device (the CPU), equal
    to those made without it."""
    X, y, mean, _ = _linear_problem()
    la = SubnetLaplace(_linear_net(mean.float()), "regression", torch.arange(4), prior_precision=2.0).fit(
        (X.float(), y.float())
    )
    assert la.sample(3).dtype == torch.float32
    la, *_ = _fitted_linear(sigma=0.3)
    x_new = X[:3]
    expected = la.sample(4, generator=torch.Generator().manual_seed(7))
    outside = {}
    for predictive in ("glm-mc", "nn"):
        la.clear_samples()
        la.predictive = predictive
        torch.manual_seed(0)
        outside[predictive] = la.sample_predictions(x_new, 3)
    gen = torch.Generator().manual_seed(7)
    with torch.device("meta"):
        draws = la.sample(4, generator=gen)
        inside = {}
        for predictive in ("glm-mc", "nn"):
            la.clear_samples()
            la.predictive = predictive
            torch.manual_seed(0)
            inside[predictive] = la.sample_predictions(x_new, 3)
    assert draws.device.type == "cpu"
    torch.testing.assert_close(draws, expected, rtol=0, atol=0)
    for predictive in ("glm-mc", "nn"):
        assert inside[predictive].device.type == "cpu"
        assert inside[predictive].shape == outside[predictive].shape == (3, 1, 3, 2)
        torch.testing.assert_close(inside[predictive], outside[predictive], rtol=0, atol=0)


def test_cached_draws_are_exact_posterior_draws_of_the_global_rng():
    """The draws behind ``sample_predictions`` ("glm-mc") are θ_s = θ* + L⁻ᵀ ε_s with ε the global RNG's float64
    standard normals (S, M): the predictive means are x·θ_s, and every variance is σ² exactly (in float64)."""
    sigma = 0.3
    la, X, _, mean, L = _fitted_linear(sigma=sigma, predictive="glm-mc")
    x_new = X[:5]
    torch.manual_seed(5)
    pred = la.sample_predictions(x_new, 6)
    torch.manual_seed(5)
    thetas = _exact_draws(mean, L, torch.randn(6, 4, dtype=torch.float64))
    assert pred.shape == (6, 1, 5, 2) and pred.dtype == torch.float64
    torch.testing.assert_close(pred[:, 0, :, 0], thetas @ x_new.T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pred[..., 1], torch.full((6, 1, 5), sigma**2, dtype=torch.float64), rtol=0, atol=0)
    la.predictive = "nn"
    pred = la.sample_predictions(x_new, 6)  # the same cached draws
    torch.testing.assert_close(pred[:, 0, :, 0], thetas @ x_new.T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pred[..., 1], torch.full((6, 1, 5), sigma**2, dtype=torch.float64), rtol=0, atol=0)


def test_num_samples_messages_are_exact():
    """``sample`` and ``sample_predictions`` (closed-form "glm" too) refuse a non-positive S by name."""
    la, X, *_ = _fitted_linear()
    for call in (lambda: la.sample(0), lambda: la.sample_predictions(X[:2], 0)):
        with pytest.raises(ValueError, match=_exactly("num_samples must be an integer >= 1, got 0")):
            call()


# ----------------------------------------------------------------------------- what fit hands on


def test_fit_hands_the_likelihood_to_the_variance_strategy():
    """Regression "largest-variance" picks the entries of largest 1/(diag(JᵀJ)/σ² + δ), from a dense Jacobian."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    g = torch.Generator().manual_seed(6)
    X, y = torch.randn(30, 4, generator=g, dtype=torch.float64), torch.randn(30, generator=g, dtype=torch.float64)
    la = SubnetLaplace(net, "regression", "largest-variance", 8, prior_precision=1.0, sigma_noise=0.5).fit((X, y))
    J = FlatFunctional(net).jacobian(X)  # (N, 1, P)
    variance = 1.0 / (J.pow(2).sum((0, 1)) / 0.25 + 1.0)
    assert la.subnetwork_indices.tolist() == sorted(torch.argsort(variance, descending=True)[:8].tolist())


def test_fit_hands_sigma_to_the_swag_strategy():
    """Regression "largest-swag-variance" with σ = 0.2 equals a plain SGD run on ½‖f − y‖²/σ² (mean over rows):
    the entries of largest variance of its iterates."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    g = torch.Generator().manual_seed(8)
    X, y = torch.randn(24, 4, generator=g, dtype=torch.float64), torch.randn(24, generator=g, dtype=torch.float64)
    batches = [(X[i : i + 8], y[i : i + 8]) for i in range(0, 24, 8)]
    options = {"epochs": 2, "lr": 0.01, "momentum": 0.9}
    la = SubnetLaplace(
        net, "regression", "largest-swag-variance", 10, prior_precision=1.0, sigma_noise=0.2, selection_options=options
    ).fit(batches)
    twin = copy.deepcopy(net)
    opt = torch.optim.SGD(twin.parameters(), lr=0.01, momentum=0.9)
    snaps = []
    for _ in range(2):
        for xb, yb in batches:
            opt.zero_grad()
            (0.5 * F.mse_loss(twin(xb).squeeze(-1), yb, reduction="none").mean() / 0.2**2).backward()
            opt.step()
            snaps.append(torch.nn.utils.parameters_to_vector(twin.parameters()).detach().clone())
    variance = torch.stack(snaps).var(0, unbiased=False)
    assert la.subnetwork_indices.tolist() == sorted(torch.argsort(variance, descending=True)[:10].tolist())


def test_fit_hands_selection_options_to_the_strategy():
    """``selection_options={"pattern": "2.*"}`` makes "by-name" choose all entries of module 2 (weight, bias)."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(9)
    data = (torch.randn(10, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (10,), generator=g))
    la = SubnetLaplace(net, "classification", "by-name", prior_precision=1.0, selection_options={"pattern": "2.*"})
    la.fit(data)
    assert la.subnetwork_indices.tolist() == list(range(25, 25 + 15 + 3))


@pytest.mark.parametrize("subnetwork", [torch.tensor([1, 7, 30]), "largest-variance"])
def test_max_block_elements_bounds_every_jacobian_block(subnetwork):
    """With ``max_block_elements=1`` every Jacobian block of the fit (also those of the variance strategy's
    diagonal GGN) is one input row: no forward call sees more than the 2 rows the planning probes, while the
    default block holds the whole batch of 12 (and H is the same)."""
    torch.manual_seed(3)
    g = torch.Generator().manual_seed(10)
    data = (torch.randn(12, 4, generator=g, dtype=torch.float64), torch.randint(0, 2, (12,), generator=g))
    size = None if torch.is_tensor(subnetwork) else 3
    net = RowRecorder().double()
    small = SubnetLaplace(net, "classification", subnetwork, size, prior_precision=1.0, max_block_elements=1)
    small.fit(data)
    assert max(net.rows) <= 2
    net.rows.clear()
    whole = SubnetLaplace(net, "classification", subnetwork, size, prior_precision=1.0).fit(data)
    assert max(net.rows) == 12
    assert whole.subnetwork_indices.tolist() == small.subnetwork_indices.tolist()
    torch.testing.assert_close(small.H, whole.H)


# ----------------------------------------------------------------------------- files


def test_saved_state_records_the_strategy_and_round_trips_the_prior_mean():
    """The saved state records the strategy that chose the subnetwork; a number prior mean (0.1) comes back
    exactly (not rounded through float32), and a tensor prior mean comes back equal."""
    X, y, mean, _ = _linear_problem()
    net = _linear_net(mean)
    la = SubnetLaplace(net, "regression", "largest-magnitude", 2, prior_precision=1.0, prior_mean=0.1).fit((X, y))
    state = la.state_dict()
    assert state["state"]["strategy"] == "largest-magnitude"
    loaded = SubnetLaplace.from_state_dict(net, state)
    torch.testing.assert_close(loaded.prior_mean, torch.full((2,), 0.1, dtype=torch.float64), rtol=0, atol=0)
    prior_mean = torch.tensor([0.1, -0.2, 0.3, 0.05], dtype=torch.float64)
    la = SubnetLaplace(net, "regression", torch.arange(4), prior_precision=1.0, prior_mean=prior_mean).fit((X, y))
    loaded = SubnetLaplace.from_state_dict(net, la.state_dict())
    torch.testing.assert_close(loaded.prior_mean, prior_mean, rtol=0, atol=0)
    assert loaded.log_marginal_likelihood().item() == la.log_marginal_likelihood().item()


def test_saved_dtype_round_trips_and_defaults_to_float64():
    """A float32 posterior loads as float32 with the same H; a state without a saved dtype (older files) loads
    as float64."""
    X, y, mean, _ = _linear_problem()
    net = _linear_net(mean)
    la = SubnetLaplace(net, "regression", torch.arange(4), prior_precision=2.0, dtype=torch.float32).fit((X, y))
    loaded = SubnetLaplace.from_state_dict(net, la.state_dict())
    assert loaded.dtype == torch.float32 and loaded.H.dtype == torch.float32
    torch.testing.assert_close(loaded.H, la.H, rtol=0, atol=0)
    state = SubnetLaplace(net, "regression", torch.arange(4), prior_precision=2.0).fit((X, y)).state_dict()
    del state["settings"]["dtype"]
    loaded = SubnetLaplace.from_state_dict(net, state)
    assert loaded.dtype == torch.float64 and loaded.H.dtype == torch.float64
    torch.testing.assert_close(loaded.H, X.T @ X, rtol=1e-12, atol=1e-12)  # σ = 1


def test_loaded_h_lives_on_the_posterior_device(monkeypatch):
    """Loading moves the saved (CPU) H onto the posterior's device. A network on another device is stood in for
    by reporting "meta" as the posterior's device (a network on "meta" cannot be restricted: its indices hold
    no values), so H, and with it the precision, must land on "meta"."""
    la, *_ = _fitted_linear()
    state = la.state_dict()
    monkeypatch.setattr(SubnetLaplace, "device", property(lambda self: torch.device("meta")))
    loaded = SubnetLaplace.from_state_dict(la.model, state)
    assert loaded.H.device.type == "meta" and loaded.H.shape == (4, 4) and loaded.H.dtype == torch.float64
    assert loaded.posterior_precision.device.type == "meta"


# ---- curvature.py: Jacobian columns, their plan and the GGN, against dense jacrev ----


# ----------------------------------------------------------------------------- helpers


class _CvDoubleLinear(nn.Linear):
    """A Linear subclass with its own forward (weight doubled): no layer rule may apply."""

    def forward(self, x):
        return F.linear(x, 2 * self.weight, self.bias)


class _CvDoubleConv(nn.Conv2d):
    """A Conv2d subclass with its own forward (weight doubled): no layer rule may apply."""

    def forward(self, x):
        return self._conv_forward(x, 2 * self.weight, self.bias)


class _CvNet(nn.Module):
    """Convolutions (stride, padding, dilation, no bias, groups, reflect padding, a subclass),
    LayerNorm, BatchNorm in eval, Linear with and without bias and a Linear subclass."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=2, dilation=2, bias=False)
        self.c3 = nn.Conv2d(4, 4, 1, groups=2)
        self.c4 = nn.Conv2d(4, 3, 3, padding=1, padding_mode="reflect")
        self.c5 = _CvDoubleConv(3, 3, 1)
        self.ln = nn.LayerNorm(27)
        self.l1 = nn.Linear(27, 5)
        self.bn = nn.BatchNorm1d(5)
        self.l2 = _CvDoubleLinear(5, 4, bias=False)
        self.l3 = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.c1(x))
        h = torch.tanh(self.c2(h))
        h = torch.tanh(self.c3(h))
        h = torch.tanh(self.c4(h))
        h = self.c5(h).flatten(1)
        h = self.bn(torch.tanh(self.l1(self.ln(h))))
        return self.l3(torch.tanh(self.l2(h)))


class _CvTwoMembers(nn.Module):
    """K = 2 members, member-major rows: member k sees (k + 1)·x; ``mix`` adds half of the previous
    row of the last layer's output (rows interact)."""

    def __init__(self, mix: bool = False):
        super().__init__()
        self.l1 = nn.Linear(3, 4)
        self.l2 = nn.Linear(4, 3)
        self.mix = mix

    def forward(self, x):
        h = self.l2(torch.tanh(self.l1(torch.cat([x, 2 * x]))))
        return h + 0.5 * h.roll(1, 0) if self.mix else h


def _cv_init(module: nn.Module, seed: int = 0) -> nn.Module:
    """float64, random parameters and BatchNorm statistics, eval mode."""
    g = torch.Generator().manual_seed(seed)
    module = module.double().eval()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g, dtype=b.dtype))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g, dtype=b.dtype))
    return module


def _cv_dense(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs (R, O) and the dense Jacobian (R, O, P) of the whole batch w.r.t. all parameters
    (``named_parameters`` order), by ``jacrev`` of ``functional_call``."""
    named = dict(module.named_parameters())
    names = list(named)
    flat = torch.cat([p.detach().reshape(-1) for p in named.values()])

    def fn(theta):
        params = {n: c.view(named[n].shape) for n, c in zip(names, theta.split([p.numel() for p in named.values()]))}
        out = functional_call(module, params, (x,))
        return out.reshape(out.shape[0], -1)

    with torch.no_grad():
        out = fn(flat)
    return out, jacrev(fn)(flat)


def _cv_starts(functional, x, **kwargs) -> list[int]:
    return [start for start, _, _ in jacobian_blocks(functional, x, **kwargs)]


# ----------------------------------------------------------------------------- Jacobians


@pytest.mark.parametrize("batch", [1, 3])
def test_cv_jacobian_columns_match_dense_jacrev(batch):
    """Every mode, with and without layer rules, on every subset kind (all entries; a random
    subset; entries in only some layers' weight/bias; only generic entries) equals the selected
    columns of the dense whole-batch jacrev Jacobian (float64), outputs included."""
    net = _cv_init(_CvNet())
    x = torch.randn(batch, 2, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref_out, ref_J = _cv_dense(net, x)
    off = offsets(net)
    P = ref_J.shape[-1]
    subsets = [
        None,
        torch.randperm(P, generator=torch.Generator().manual_seed(2))[:40],
        torch.cat([off["l1.weight"][::7], off["c1.bias"][1:3], off["c2.weight"][::13], off["l3.bias"][:1]]),
        torch.cat([off["ln.weight"][::3], off["bn.bias"], off["c3.weight"][:3], off["c5.weight"][::2]]),
        torch.cat([off["c4.weight"][::9], off["l2.weight"][::5], off["c1.weight"][::11]]),
    ]
    full = FlatFunctional(net)
    for idx in subsets:
        f = full if idx is None else full.restrict(idx)
        want = ref_J if idx is None else ref_J[..., idx]
        for mode in ("auto", "forward", "reverse"):
            for rules in (True, False):
                if mode == "forward" and idx is None and not rules:
                    continue
                out, J = jacobian_columns(f, x, mode=mode, layer_rules=rules)
                torch.testing.assert_close(out, ref_out)
                torch.testing.assert_close(J, want, msg=f"mode={mode} rules={rules} subset={idx}")


def test_cv_forward_tiny_network_and_default_mode():
    """A Linear(3, 2) subnetwork (weight entries only) in forward mode, where the narrowed θ and a
    batch's outputs have the same size, and ``JacobianColumns`` with its default mode: dense
    jacrev columns."""
    net = _cv_init(nn.Linear(3, 2))
    x = torch.randn(3, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    _, ref_J = _cv_dense(net, x)
    idx = torch.tensor([0, 2, 4, 5])
    f = FlatFunctional(net).restrict(idx)
    torch.testing.assert_close(jacobian_columns(f, x, mode="forward")[1], ref_J[..., idx])
    torch.testing.assert_close(JacobianColumns(f)(x)[1], ref_J[..., idx])


def test_cv_members_mixing_rows_fall_back_to_whole_batch_jacrev():
    """K = 2 members whose last output row depends on another (not the first) row of the last
    layer's output: the rule is refused, and the Jacobian equals the whole-batch dense one."""
    net = _cv_init(_CvTwoMembers(mix=True))
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ref_out, ref_J = _cv_dense(net, x)
    f = FlatFunctional(net)
    out, J = jacobian_columns(f, x, mode="reverse", per_example=False)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(J, ref_J)


def test_cv_row_check_probes_the_first_two_examples():
    """The row-interaction check runs on the first two examples: a network whose second row mixes
    in the first (and whose third row does not) is refused the rule, so its whole-batch Jacobian
    of three examples is exact (dense jacrev)."""

    class SecondRowMixes(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            h = self.lin(x)
            mask = torch.zeros(h.shape[0], 1, dtype=h.dtype)
            mask[1:2] = 0.5
            return h + mask * h[:1]

    net = _cv_init(SecondRowMixes())
    x = torch.randn(3, 3, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    _, ref_J = _cv_dense(net, x)
    J = jacobian_columns(FlatFunctional(net), x, mode="reverse", per_example=False)[1]
    torch.testing.assert_close(J, ref_J)


def test_cv_layer_rules_switch_and_per_example_flag():
    """Inputs centred over the batch before a Linear: the layer rule gives the whole-batch
    Jacobian (default ``layer_rules``), while ``layer_rules=False, per_example=True`` gives the
    Jacobians of single examples (jacrev of each example alone) -- both for ``jacobian_columns``
    and ``jacobian_blocks``."""
    lin = _cv_init(nn.Linear(3, 2))

    class Centred(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return self.lin(x - x.mean(0, keepdim=True))

    net = Centred()
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    _, batch_J = _cv_dense(net, x)
    single_J = torch.cat([_cv_dense(net, x[i : i + 1])[1] for i in range(4)])
    assert not torch.allclose(batch_J, single_J)
    f = FlatFunctional(net)
    torch.testing.assert_close(jacobian_columns(f, x, mode="reverse")[1], batch_J)
    J = jacobian_columns(f, x, mode="reverse", per_example=True, layer_rules=False)[1]
    torch.testing.assert_close(J, single_J)
    blocks = list(jacobian_blocks(f, x, mode="reverse"))
    torch.testing.assert_close(torch.cat([j[0] for _, _, j in blocks]), batch_J)
    blocks = list(jacobian_blocks(f, x, mode="reverse", per_example=True, layer_rules=False))
    torch.testing.assert_close(torch.cat([j[0] for _, _, j in blocks]), single_J)


# ----------------------------------------------------------------------------- plan


def test_cv_plan_layer_rules_and_mode():
    """Reverse mode gives rules exactly to plain Linear (kind "linear") and plain zero-padded,
    ungrouped Conv2d (kind "conv2d") layers; reflect padding, groups, subclasses with their own
    forward, norm layers take the generic path. Auto mode is forward iff M <= K·O."""
    net = _cv_init(_CvNet())
    x = torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    jc = JacobianColumns(FlatFunctional(net), mode="reverse")
    jc(x)
    assert jc.mode == "reverse"
    assert {path: kind for path, _, kind, _ in jc.layers} == {
        "c1": "conv2d",
        "c2": "conv2d",
        "l1": "linear",
        "l3": "linear",
    }
    assert jc.generic is not None
    # a bare Linear as the whole network (parameter names without a module path)
    lin = _cv_init(nn.Linear(4, 3))
    xl = torch.randn(2, 4, dtype=torch.float64)
    jc = JacobianColumns(FlatFunctional(lin), mode="reverse")
    jc(xl)
    assert [kind for _, _, kind, _ in jc.layers] == ["linear"] and jc.generic is None
    # K = 2 members, rows independent: both Linear layers get their rule
    two = _cv_init(_CvTwoMembers())
    jc = JacobianColumns(FlatFunctional(two), mode="reverse")
    jc(torch.randn(3, 3, dtype=torch.float64))
    assert [path for path, _, _, _ in jc.layers] == ["l1", "l2"] and jc.generic is None
    # auto: M <= K·O (= 3) forward, else reverse
    for M, mode in ((3, "forward"), (4, "reverse"), (1, "forward")):
        jc = JacobianColumns(FlatFunctional(lin).restrict(torch.arange(M)))
        jc(xl)
        assert jc.mode == mode
    for M, mode in ((6, "forward"), (7, "reverse")):
        jc = JacobianColumns(FlatFunctional(two).restrict(torch.arange(M)))
        jc(torch.randn(2, 3, dtype=torch.float64))
        assert jc.mode == mode and jc.members == 2
    jc = JacobianColumns(FlatFunctional(lin), mode="forward")
    jc(xl)
    assert jc.mode == "forward"


def _cv_ln_net():
    return _cv_init(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 3)))


def test_cv_block_sizes():
    """Sub-batch sizes: forward b = max(1, max_elements // (K·O·M)); reverse
    b = max(1, max_elements // (K·O·max(generic tensor size, M·positions, 1))) with positions the
    largest rule layer's positions (Linear: leading dims; Conv2d: H·W), and at most 16 rows when
    jacrev cannot run per example."""
    net = _cv_ln_net()  # params: 0.weight 16, 0.bias 4, 1.weight 4, 1.bias 4, 2.weight 12, 2.bias 3
    full = FlatFunctional(net)
    x = torch.randn(20, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ln_w, l2_w = torch.arange(20, 24), torch.arange(28, 40)
    f = full.restrict(ln_w[:2])  # M = 2, generic only (LayerNorm weight, 4 entries)
    assert _cv_starts(f, x[:5], mode="forward", max_elements=12) == [0, 2, 4]
    assert _cv_starts(f, x[:3], mode="forward", max_elements=1) == [0, 1, 2]
    f = full.restrict(l2_w[:1])  # M = 1 in a Linear weight: rule, positions 1
    assert _cv_starts(f, x[:7], mode="reverse", max_elements=9) == [0, 3, 6]
    assert _cv_starts(f, x[:7], max_elements=9) == [0, 3, 6]
    assert _cv_starts(f, x[:3], mode="reverse", max_elements=1) == [0, 1, 2]
    assert _cv_starts(f, x[:5], mode="reverse", max_elements=72, layer_rules=False) == [0, 2, 4]
    f = full.restrict(torch.cat([ln_w[:1], l2_w[:1]]))  # generic 4 > M·positions = 2
    assert _cv_starts(f, x[:5], mode="reverse", max_elements=24) == [0, 2, 4]
    assert _cv_starts(f, x, mode="reverse") == [0]
    assert _cv_starts(f, x, mode="reverse", per_example=False) == [0, 16]
    jc = JacobianColumns(f, mode="reverse")
    assert [s for s, _, _ in jc.blocks(x)] == [0] and jc.per_example is True

    # Linear on (B, L=5, 4): positions L
    seq = _cv_init(nn.Sequential(nn.Linear(4, 3), nn.Flatten()))  # O = 15
    xs = torch.randn(7, 5, 4, dtype=torch.float64)
    assert _cv_starts(FlatFunctional(seq).restrict(torch.tensor([0])), xs, mode="reverse", max_elements=150) == [
        0,
        2,
        4,
        6,
    ]
    # Conv2d on (B, 2, 4, 5): positions H·W = 20, O = 60
    conv = _cv_init(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten()))
    xc = torch.randn(5, 2, 4, 5, dtype=torch.float64)
    assert _cv_starts(FlatFunctional(conv).restrict(torch.tensor([0])), xc, mode="reverse", max_elements=2400) == [
        0,
        2,
        4,
    ]


def test_cv_supports_per_example():
    """True for an MLP; only the first two examples are tried (an out-of-range embedding index in
    the third does not matter)."""
    net = _cv_ln_net()
    assert supports_per_example(FlatFunctional(net), torch.randn(3, 4, dtype=torch.float64)) is True
    emb = _cv_init(nn.Sequential(nn.Embedding(10, 3), nn.Flatten()))
    assert supports_per_example(FlatFunctional(emb), torch.tensor([[0], [1], [99]])) is True


def test_cv_error_messages():
    """Exact messages for a bad mode, a bad max_elements (also through ``ggn``), an empty batch
    and empty data."""
    f = FlatFunctional(_cv_ln_net())
    with pytest.raises(ValueError, match=r"^mode: unknown name 'bogus'; valid: \['auto', 'forward', 'reverse'\]$"):
        JacobianColumns(f, mode="bogus")
    with pytest.raises(ValueError, match=r"^max_elements must be an integer >= 1, got 0$"):
        JacobianColumns(f, max_elements=0)
    with pytest.raises(ValueError, match=r"^max_elements must be an integer >= 1, got 0$"):
        ggn(f, torch.randn(2, 4, dtype=torch.float64), "categorical", max_elements=0)
    with pytest.raises(ValueError, match=r"^x must be a non-empty batch \(B, \.\.\.\)$"):
        list(JacobianColumns(f).blocks(torch.zeros(0, 4, dtype=torch.float64)))
    with pytest.raises(ValueError, match=r"^data is empty$"):
        ggn(f, [], "categorical")


# ----------------------------------------------------------------------------- GGN


def test_cv_ggn_gaussian_default_sigma_and_log_likelihood():
    """``"normal"`` with the default σ = 1: H = Σ_n J_nᵀ J_n (dense), ``ggn_factor`` is J itself,
    and the log-likelihood is the closed-form Gaussian one."""
    net = _cv_ln_net()
    g = torch.Generator().manual_seed(8)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64)
    y = torch.randn(5, 3, generator=g, dtype=torch.float64)
    out, J = _cv_dense(net, x)
    idx = torch.tensor([1, 5, 17, 21, 30, 38, 41])
    Js = J[..., idx]
    cur = ggn(FlatFunctional(net).restrict(idx), (x, y), "normal")
    torch.testing.assert_close(cur.matrix, torch.einsum("rom,roq->mq", Js, Js))
    want = -0.5 * ((y - out) ** 2).sum() - 0.5 * y.numel() * math.log(2 * math.pi)
    assert cur.log_likelihood == pytest.approx(float(want), rel=1e-12)
    assert float(log_likelihood(out, y, "normal")) == pytest.approx(float(want), rel=1e-12)
    torch.testing.assert_close(ggn_factor(out, Js, "normal"), Js)


def test_cv_ggn_factor_three_dim_softmax():
    """``ggn_factor`` on (R, O, M) blocks: Σ_r A_rᵀ A_r = Σ_r J_rᵀ (diag p_r − p_r p_rᵀ) J_r."""
    g = torch.Generator().manual_seed(9)
    out = torch.randn(4, 3, generator=g, dtype=torch.float64)
    J = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    p = torch.softmax(out, -1)
    lam = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    A = ggn_factor(out, J, "categorical")
    torch.testing.assert_close(torch.einsum("rom,roq->mq", A, A), torch.einsum("rop,roq,rqm->pm", J, lam, J))


def test_cv_ggn_members_diagonal_and_given_jacobians():
    """K = 2 members: the diagonal GGN is (1/K) Σ_r diag(J_rᵀ Λ_r J_r) (dense softmax Λ), and a
    given ``JacobianColumns`` is the one used (it is planned afterwards, in its own mode)."""
    net = _cv_init(_CvTwoMembers())
    x = torch.randn(3, 3, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    out, J = _cv_dense(net, x)
    p = torch.softmax(out, -1)
    lam = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    H = torch.einsum("rop,roq,rqm->pm", J, lam, J) / 2
    f = FlatFunctional(net)
    cur = ggn(f, x, "categorical", diagonal=True)
    torch.testing.assert_close(cur.matrix, torch.diagonal(H))
    assert cur.num_members == 2 and cur.log_likelihood is None
    jc = JacobianColumns(f, mode="forward")
    cur = ggn(f, x, "categorical", jacobians=jc)
    torch.testing.assert_close(cur.matrix, H)
    assert jc.mode == "forward"
