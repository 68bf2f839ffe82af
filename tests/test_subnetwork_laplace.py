"""Subnetwork linearized Laplace: exact Bayesian linear regression, laplace-torch, dense Jacobians,
selection strategies, marginal likelihood, predictives through the Posterior protocol, digits."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
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
from rank1_pyro.laplace.curvature import narrow

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
