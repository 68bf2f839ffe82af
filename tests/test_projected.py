"""Null-space projected posterior: iterated projections against dense projectors, sampling, α, predictives."""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from rank1_pyro import DeltaGuide, Rank1Linear, Rank1Model, mlp, rank1_mlp
from rank1_pyro.inference import predict
from rank1_pyro.laplace import FlatFunctional, ProjectedPosterior, rank1_point_network


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these small problems gain nothing from more, and on a CPU shared with
    other jobs OpenMP threads oversubscribe it (the digits test ran 40x slower with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def null_space_projector(rows: torch.Tensor, rtol: float = 1e-10) -> torch.Tensor:
    """``I - V Vᵀ`` from a dense SVD of ``rows`` (the constraints, one per row)."""
    _, s, vh = torch.linalg.svd(rows, full_matrices=False)
    v = vh[s > rtol * s[0]]
    return torch.eye(rows.shape[1], dtype=rows.dtype) - v.T @ v


def small_problem(num_examples=12):
    """A 3-8-3 tanh MLP in float64. With 12 examples J is 36 × 59 (rank 36 < P); with 20
    examples J would be 60 × 59 and of full column rank, leaving no null space."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(num_examples, 3, dtype=torch.float64)
    J = FlatFunctional(net).jacobian(x).reshape(-1, 59)
    return net, x, J


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_projection_matches_dense_projector():
    net, x, J = small_problem()
    exact = null_space_projector(J)
    assert torch.linalg.matrix_rank(J) == 36  # a 23-dimensional null space
    post = ProjectedPosterior(net, alpha=1.0, micro_batch_size=4, num_iterations=200).fit(x)
    assert len(post._blocks) == 3 and post._blocks[0].eigvecs.shape[0] == 4 * 3  # (S·O)² Gram per micro-batch
    projected = post.project(torch.eye(59, dtype=torch.float64))  # rows: P e_i
    assert relative_error(projected, exact) < 1e-6
    # the convergence report: ||J v|| / ||v|| on the monitor batch, before and after each iteration
    history = post.convergence
    assert history.shape[0] >= 2 and history[-1] < 1e-8 * history[0]
    # a row-space vector projects to ~0, a null-space vector to itself
    row = J.T @ torch.randn(36, dtype=torch.float64)
    assert post.project(row).norm() / row.norm() < 1e-6
    null = exact @ torch.randn(59, dtype=torch.float64)
    assert relative_error(post.project(null), null) < 1e-6


def test_alternating_sweeps_converge_and_over_relaxation_helps():
    net, x, J = small_problem(num_examples=6)
    exact = null_space_projector(J)
    eye = torch.eye(59, dtype=torch.float64)
    errors = {}
    for relax in (True, False):
        post = ProjectedPosterior(
            net, alpha=1.0, micro_batch_size=3, solver="alternating", over_relaxation=relax, num_iterations=40
        ).fit(x)
        errors[relax] = relative_error(post.project(eye), exact)
        assert post.convergence.shape == (41,)
    assert errors[True] < 1e-3
    assert errors[True] < 0.1 * errors[False]  # the Gearhart–Koshy step accelerates the sweeps


def test_projected_samples_keep_linearized_training_predictions():
    net, x, J = small_problem()
    post = ProjectedPosterior(net, alpha=4.0, micro_batch_size=4, num_iterations=200).fit(x)
    gen = torch.Generator().manual_seed(1)
    theta = post.sample(8, generator=gen)
    eps = torch.randn(8, 59, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    moved = (J @ (theta - post.theta_map).T).abs().max()
    unprojected = (J @ (eps / 2.0).T).abs().max()  # what α^{-1/2} ε without the projection does
    assert moved < 1e-4 * unprojected
    assert ((theta - post.theta_map) - post.project(eps) / 2.0).abs().max() < 1e-10  # θ = θ* + α^{-1/2} P ε
    # through the Posterior protocol: linearized outputs on the training inputs are the MAP's
    out = post.sample_outputs(x, 16)
    assert out.shape == (16, 1, 12, 3)
    assert (out - net(x)).abs().max() < 1e-4 * unprojected
    probs = post.sample_predictions(x, 16)
    torch.testing.assert_close(probs.sum(-1), torch.ones(16, 1, 12, dtype=torch.float64))
    # ... while off the data the samples do spread
    x_off = 3 * torch.randn(12, 3, dtype=torch.float64)
    assert post.sample_outputs(x_off, 16).std(0).mean() > 1e-2


def test_trace_estimate_matches_nullity():
    net, x, J = small_problem()
    exact = null_space_projector(J)
    num_probes = 300
    post = ProjectedPosterior(net, micro_batch_size=4, num_iterations=200, num_trace_probes=num_probes).fit(x)
    nullity = 59 - 36
    # Rademacher Hutchinson: Var(zᵀPz) = 2 (‖P‖_F² - Σ P_ii²) = 2 (tr P - Σ P_ii²) for a projector
    sd = math.sqrt(2 * (nullity - exact.diagonal().pow(2).sum().item()) / num_probes)
    assert abs(post.trace_estimate - nullity) < 4 * sd
    assert 0.5 * sd < post.trace_stderr < 2 * sd
    norm2 = post.theta_map.pow(2).sum().item()
    assert post.alpha == pytest.approx((59 - post.trace_estimate) / norm2)


def test_alpha_closed_form_by_hand():
    # f(θ, x) = xᵀθ with θ_MAP = (1, 2, 2, 0) and data e_1, e_2: J = [e_1; e_2], P = diag(0, 0, 1, 1),
    # so every Rademacher probe gives zᵀPz = 2 exactly, and α = (4 - 2) / ||θ||² = 2 / 9.
    net = nn.Linear(4, 1, bias=False).double()
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, 2.0, 2.0, 0.0]]))
    x = torch.eye(4, dtype=torch.float64)[:2]
    post = ProjectedPosterior(
        net, likelihood="normal", noise_scale=0.5, micro_batch_size=1, num_iterations=3, num_trace_probes=5
    ).fit(x)
    assert post.trace_estimate == pytest.approx(2.0, abs=1e-12)
    assert post.alpha == pytest.approx(2.0 / 9.0)
    theta = post.sample(3, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = torch.tensor([1.0, 2.0, 2.0, 0.0], dtype=torch.float64) + (9.0 / 2.0) ** 0.5 * eps * torch.tensor(
        [0.0, 0.0, 1.0, 1.0], dtype=torch.float64
    )
    torch.testing.assert_close(theta, expected)
    # a user-given alpha wins and skips the trace estimate
    fixed = ProjectedPosterior(net, "normal", alpha=3.0, noise_scale=0.5, micro_batch_size=1).fit(x)
    assert fixed.alpha == 3.0 and fixed.trace_estimate is None
    # regression predictive: (mean, variance) pairs, variance = noise_scale²; a linear model's
    # linearized and NN predictives coincide
    pred = post.sample_predictions(torch.eye(4, dtype=torch.float64), 6)
    assert pred.shape == (6, 1, 4, 2)
    torch.testing.assert_close(pred[..., 1], torch.full((6, 1, 4), 0.25, dtype=torch.float64))
    torch.testing.assert_close(pred[:, 0, :2, 0], torch.tensor([[1.0, 2.0]] * 6, dtype=torch.float64))
    post.predictive = "nn"
    torch.testing.assert_close(post.sample_predictions(torch.eye(4, dtype=torch.float64), 6), pred)


def test_loss_projection_matches_dense_gradient_null_space():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 5)).double()  # P = 77
    x = torch.randn(10, 3, dtype=torch.float64)
    y = torch.randint(0, 5, (10,))
    params = {k: v.detach() for k, v in net.named_parameters()}

    def example_loss(p, xi, yi):
        return F.cross_entropy(functional_call(net, p, (xi[None],)), yi[None])

    grads = vmap(grad(example_loss), in_dims=(None, 0, 0))(params, x, y)
    G = torch.cat([grads[k].reshape(10, -1) for k in params], dim=1)  # (N, P) per-example gradients
    exact = null_space_projector(G)
    post = ProjectedPosterior(net, kind="loss", alpha=1.0, micro_batch_size=5, num_iterations=100).fit((x, y))
    assert post._blocks[0].eigvecs.shape[0] == 5  # S×S Gram: independent of the 5 outputs
    eye = torch.eye(77, dtype=torch.float64)
    assert relative_error(post.project(eye), exact) < 1e-6
    # each g_n = J_nᵀ r_n lies in the row space of J, so N(J) (50 constraints) sits inside the
    # loss null space (10 constraints): P_loss P_out = P_out, with tr P_out < tr P_loss
    output_post = ProjectedPosterior(net, alpha=1.0, micro_batch_size=5, num_iterations=100).fit(x)
    p_out = output_post.project(eye)
    assert relative_error(post.project(p_out), p_out) < 1e-6
    assert p_out.diagonal().sum() == pytest.approx(77 - 50, abs=1e-6)
    assert exact.diagonal().sum() == pytest.approx(77 - 10, abs=1e-6)


def test_nn_predictive_evaluates_the_network_at_the_draws():
    net, x, _ = small_problem()
    post = ProjectedPosterior(net, alpha=2.0, micro_batch_size=4, num_iterations=50, predictive="nn").fit(x)
    x_new = torch.randn(5, 3, dtype=torch.float64)
    out = post.sample_outputs(x_new, 4)
    for s, theta in enumerate(post.draws(4)):
        copy = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        torch.nn.utils.vector_to_parameters(theta, copy.parameters())
        torch.testing.assert_close(out[s, 0], copy(x_new))
    # cached draws: the same S samples for every batch, until cleared
    torch.testing.assert_close(post.sample_outputs(x_new, 4), out)
    torch.testing.assert_close(post.sample_outputs(x_new, 2), out[:2])
    post.clear_samples()
    assert not torch.allclose(post.sample_outputs(x_new, 4), out)
    # predict() runs it batch by batch through the Posterior protocol
    pred = predict(post, torch.randn(7, 3, dtype=torch.float64), num_samples=3, batch_size=3)
    assert pred.samples.shape == (3, 1, 7, 3)


def test_data_loader_monitor_and_tolerance():
    net, x, J = small_problem()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=6)  # split into 4 + 2
    post = ProjectedPosterior(net, alpha=1.0, micro_batch_size=4, num_iterations=200, tol=1e-6)
    post.fit(loader, monitor=x)
    assert [b.rows for b in post._blocks] == [4, 2, 4, 2]
    v = torch.randn(3, 59, dtype=torch.float64)
    pv = post.project(v)
    torch.testing.assert_close(pv, v @ null_space_projector(J), rtol=0, atol=1e-4)  # stopped early at tol
    # the history is ||J v|| / ||v|| over the monitor data (here all of it), stopped at tol
    history = post.convergence
    assert history[-1] <= 1e-6 < history[-2] and len(history) < 200
    first = ((v @ J.T).norm(dim=1) / v.norm(dim=1)).mean()
    assert history[0] == pytest.approx(first.item())


@pytest.mark.parametrize("which", ["factors", "both"])
def test_rank1_point_network(which):
    torch.manual_seed(0)
    model = rank1_mlp(3, [6], 2, ensemble_size=3).double()
    guide = DeltaGuide(model, init_loc_std=0.3).double()
    net = rank1_point_network(model, guide)
    names = [n for n, _ in net.named_parameters() if n.startswith("factors.")]
    if which == "both":
        names += ["model.net.0.weight", "model.net.2.weight"]
    x = torch.randn(4, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (4,))
    f = FlatFunctional(net, names)
    J = f.jacobian(x).reshape(-1, f.num_params)  # (K·B·C, P) = (24, P)
    post = ProjectedPosterior(net, param_names=names, alpha=1.0, micro_batch_size=2, num_iterations=100).fit((x, y))
    assert post.num_params == (51 if which == "factors" else 51 + 18 + 12)
    eye = torch.eye(post.num_params, dtype=torch.float64)
    assert relative_error(post.project(eye), null_space_projector(J)) < 1e-6
    probs = post.sample_predictions(x, 5)
    assert probs.shape == (5, 3, 4, 2)  # (S, K, B, C)
    map_probs = torch.softmax(net(x).reshape(3, 4, 2), -1)
    assert (probs - map_probs).abs().max() < 1e-6  # training inputs: the MAP predictive of every member
    # the loss-projected variant tiles the targets over the members (member-major rows)
    loss_post = ProjectedPosterior(
        net, param_names=names, kind="loss", alpha=1.0, micro_batch_size=2, num_iterations=100
    ).fit((x, y))
    params = {n: p.detach() for n, p in net.named_parameters()}

    def member_losses(theta):  # (K·B,) losses, member-major like the network's rows
        chunks = {n: t.view(s) for n, t, s in zip(names, theta.split(f.numels), f.shapes)}
        out = functional_call(net, {**params, **chunks}, (x,))
        return F.cross_entropy(out, y.repeat(3), reduction="none")

    G = torch.func.jacrev(member_losses)(f.theta_map)  # (12, P) per-(member, example) gradients
    assert relative_error(loss_post.project(eye), null_space_projector(G)) < 1e-6


def test_errors():
    net = mlp(3, [4], 2)
    with pytest.raises(ValueError, match="kind"):
        ProjectedPosterior(net, kind="hessian")
    with pytest.raises(ValueError, match="likelihood"):
        ProjectedPosterior(net, likelihood="poisson")
    with pytest.raises(ValueError, match="predictive"):
        ProjectedPosterior(net, predictive="probit")
    with pytest.raises(ValueError, match="solver"):
        ProjectedPosterior(net, solver="lsqr")
    with pytest.raises(ValueError, match="alpha"):
        ProjectedPosterior(net, alpha=-1.0)
    with pytest.raises(ValueError, match="num_iterations"):
        ProjectedPosterior(net, num_iterations=0)
    with pytest.raises(ValueError, match="noise_scale"):
        ProjectedPosterior(net, likelihood="normal")
    with pytest.raises(TypeError, match="model"):
        ProjectedPosterior("net")
    post = ProjectedPosterior(net, alpha=1.0)
    with pytest.raises(RuntimeError, match="fit"):
        post.sample(2)
    with pytest.raises(ValueError, match=r"^kind='loss' needs targets: pass \(x, y\) batches to fit\(\)$"):
        ProjectedPosterior(net, kind="loss", alpha=1.0).fit(torch.randn(4, 3))
    post.fit(torch.randn(4, 3))
    with pytest.raises(ValueError, match="vectors must have shape"):
        post.project(torch.randn(5))
    with pytest.raises(ValueError, match="num_samples"):
        post.sample(0)
    with pytest.raises(ValueError, match="empty"):
        post.fit([])
    with pytest.raises(RuntimeError, match="alpha"):
        ProjectedPosterior(net).alpha


def test_constructor_rejects_bad_numerical_settings():
    """eig_rtol outside (0, 1), a non-positive tol or noise_scale and a non-callable loss_fn are
    refused with their own messages, while values inside the ranges are kept as given."""
    net = mlp(3, [4], 2)
    for bad in (0.0, 1.0, -0.5, 2.0):
        with pytest.raises(ValueError, match=rf"^eig_rtol must lie in \(0, 1\), got {bad!r}$"):
            ProjectedPosterior(net, eig_rtol=bad)
    for bad in (0.0, -1e-6):
        with pytest.raises(ValueError, match=rf"^tol must be > 0 or None, got {bad!r}$"):
            ProjectedPosterior(net, tol=bad)
    with pytest.raises(TypeError, match=r"^loss_fn must be callable, got str$"):
        ProjectedPosterior(net, kind="loss", loss_fn="cross_entropy")
    for likelihood in ("normal", "categorical"):  # checked whatever the likelihood
        with pytest.raises(ValueError, match=r"^noise_scale must be > 0, got -0\.5$"):
            ProjectedPosterior(net, likelihood, noise_scale=-0.5)
    with pytest.raises(ValueError, match=r"^noise_scale must be > 0, got 0\.0$"):
        ProjectedPosterior(net, "normal", noise_scale=0.0)
    post = ProjectedPosterior(net, "normal", eig_rtol=1e-3, tol=1e-8, noise_scale=0.2, loss_fn=F.mse_loss)
    assert (post.eig_rtol, post.tol, post.noise_scale, post.loss_fn) == (1e-3, 1e-8, 0.2, F.mse_loss)


def test_alpha_setter_rescales_draws_and_rejects_bad_values():
    """Setting ``alpha`` replaces the closed form and rescales the cached draws to
    θ* + α^{-1/2} 𝒫ε; zero, negative, non-finite and non-numeric values are refused and leave it unchanged."""
    net = nn.Linear(4, 1, bias=False).double()  # the hand problem above: closed-form α = 2/9, 𝒫 = diag(0, 0, 1, 1)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, 2.0, 2.0, 0.0]]))
    x = torch.eye(4, dtype=torch.float64)[:2]
    post = ProjectedPosterior(net, "normal", noise_scale=1.0, micro_batch_size=1, num_iterations=3, num_trace_probes=2)
    post.fit(x)
    assert post.alpha == pytest.approx(2.0 / 9.0)
    deltas = post.draws(3) - post.theta_map  # at the closed-form α
    assert deltas[:, 2:].abs().min() > 0
    post.alpha = 4
    assert post.alpha == 4.0 and type(post.alpha) is float
    torch.testing.assert_close(post.draws(3) - post.theta_map, deltas * (2.0 / 9.0 / 4.0) ** 0.5)
    assert (post.draws(3) - post.theta_map)[:, :2].abs().max() < 1e-12  # still in the null space of J
    for bad in (0, -1.0, float("nan"), float("inf"), "2", None):
        with pytest.raises(ValueError, match=rf"^alpha must be a positive number, got {re.escape(repr(bad))}$"):
            post.alpha = bad
        assert post.alpha == 4.0


def test_micro_batch_without_constraints_and_degenerate_closed_form_alpha():
    """A micro-batch whose Jacobian is zero keeps no Gram eigenpairs and its projection step returns
    its input untouched; the projection still matches the dense projector. When nothing constrains
    θ (P - tr 𝒫 = 0) or θ* = 0, the closed-form α is refused with a message asking for alpha=."""
    net = nn.Linear(4, 1).double()  # θ = the weight only: J_n = x_nᵀ, zero on a zero input
    x = torch.zeros(2, 4, dtype=torch.float64)
    x[0, 0] = 1.0
    post = ProjectedPosterior(net, "normal", param_names=["weight"], alpha=1.0, noise_scale=1.0, micro_batch_size=1)
    post.fit(x)
    assert post._blocks[0].inv_eigvals.numel() == 1 and post._blocks[1].inv_eigvals.numel() == 0
    V = torch.randn(3, 4, dtype=torch.float64)
    assert post._step(post._blocks[1], V) is V
    torch.testing.assert_close(post.project(V), V @ null_space_projector(x), rtol=0, atol=1e-12)
    # no constraint at all: tr 𝒫 = P exactly, so P - tr 𝒫 = 0
    free = ProjectedPosterior(
        net, "normal", param_names=["weight"], noise_scale=1.0, micro_batch_size=1, num_trace_probes=3
    )
    free.fit(torch.zeros(2, 4, dtype=torch.float64))
    assert free.trace_estimate == 4.0
    with pytest.raises(ValueError, match=r"^cannot set alpha by the closed form: P - tr P = 0, .*; pass alpha=$"):
        free.alpha
    # θ* = 0: ||θ*||² = 0 although the data constrain θ (tr 𝒫 = 3)
    with torch.no_grad():
        net.weight.zero_()
    zero = ProjectedPosterior(
        net, "normal", param_names=["weight"], noise_scale=1.0, micro_batch_size=1, num_trace_probes=3
    ).fit(x)
    assert zero.trace_estimate == pytest.approx(3.0, abs=1e-12)
    with pytest.raises(
        ValueError, match=r"^cannot set alpha by the closed form: P - tr P = 1, \|\|theta_MAP\|\|\^2 = 0;"
    ):
        zero.alpha
    zero.alpha = 2.0  # a given α makes it usable
    assert zero.sample(2).shape == (2, 4)


class _TwoRowsPerExample(nn.Module):
    """A network with two output rows per example: (B, 3) -> (2B, 1)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2).double()

    def forward(self, x):
        return self.lin(x).reshape(-1, 1)


def test_loss_projection_checks_targets_against_outputs():
    """kind="loss": targets with other rows than the inputs, a network giving more output rows than
    targets (not a rank-1 member stack), and regression targets that do not match the outputs'
    size are refused; (B,) and (B, 1) regression targets give the same projection, onto the null
    space of the per-example squared-error gradients (f(x_n) - y_n) [x_n, 1]."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, dtype=torch.float64)
    net = nn.Linear(3, 1).double()
    post = ProjectedPosterior(net, "normal", kind="loss", alpha=1.0, noise_scale=1.0, micro_batch_size=2)
    with pytest.raises(ValueError, match=r"^train_data: targets must be a tensor with 4 rows, got \(3,\)$"):
        post.fit((x, torch.randn(3, dtype=torch.float64)))
    with pytest.raises(ValueError, match=r"^targets of shape \(2, 2\) do not fit outputs of shape \(2, 1\)$"):
        post.fit((x, torch.randn(4, 2, dtype=torch.float64)))
    doubled = ProjectedPosterior(_TwoRowsPerExample(), kind="loss", alpha=1.0, micro_batch_size=2)
    with pytest.raises(ValueError, match=r"^the network gives 4 output rows for 2 targets$"):
        doubled.fit((x, torch.randint(0, 1, (4,))))
    y = torch.randn(4, dtype=torch.float64)
    with torch.no_grad():
        residual = net(x).squeeze(-1) - y
    G = residual[:, None] * torch.cat([x, torch.ones(4, 1, dtype=torch.float64)], dim=1)  # (N, P): [w, b] order
    eye = torch.eye(4, dtype=torch.float64)
    flat = post.fit((x, y)).project(eye)
    torch.testing.assert_close(flat, null_space_projector(G), rtol=0, atol=1e-8)
    torch.testing.assert_close(post.fit((x, y[:, None])).project(eye), flat, rtol=0, atol=1e-12)


class _TwoRows(nn.Module):
    """Reshapes ``(K·B, 4)`` hidden units into ``(2·K·B, 2)`` outputs: two rows per member and example."""

    def forward(self, h):
        return h.reshape(-1, 2)


def test_loss_projection_refuses_a_rank1_network_with_extra_rows():
    """A rank-1 point network whose output rows are not K per example (here 2K) is refused for
    kind="loss" with the rows-for-targets message, instead of tiling the targets K times."""
    torch.manual_seed(0)
    model = Rank1Model(nn.Sequential(Rank1Linear(3, 4, ensemble_size=2), _TwoRows())).double()
    net = rank1_point_network(model, DeltaGuide(model, init_loc_std=0.3).double())
    x = torch.randn(3, 3, dtype=torch.float64)
    assert net(x).shape == (12, 2)
    post = ProjectedPosterior(net, kind="loss", alpha=1.0, micro_batch_size=3)
    with pytest.raises(ValueError, match=r"^the network gives 12 output rows for 3 targets$"):
        post.fit((x, torch.tensor([0, 1, 0])))


def test_loss_projection_checks_labels_only_for_the_default_categorical_loss():
    """kind="loss" with the default categorical loss refuses a label outside [0, C) with the label
    check's message; a custom loss_fn on one-hot (float) targets is not label-checked, and since its
    gradients equal those of the integer labels, it projects as the default loss does."""
    net, x, _ = small_problem(num_examples=6)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    with pytest.raises(ValueError, match=r"^data: labels out of range: expected 0\.\.2, got min 0, max 3$"):
        ProjectedPosterior(net, kind="loss", alpha=1.0).fit((x, torch.tensor([0, 1, 3, 0, 1, 2])))
    default = ProjectedPosterior(net, kind="loss", alpha=1.0, micro_batch_size=3, num_iterations=50).fit((x, y))

    def soft(out, target):
        return F.cross_entropy(out, target, reduction="none")

    custom = ProjectedPosterior(net, kind="loss", alpha=1.0, micro_batch_size=3, num_iterations=50, loss_fn=soft)
    custom.fit((x, F.one_hot(y, 3).double()))
    v = torch.randn(3, 59, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(custom.project(v), default.project(v), rtol=0, atol=1e-10)


def test_fit_refuses_an_empty_monitor():
    """A monitor holding no batches is refused instead of leaving an empty convergence record."""
    net, x, _ = small_problem()
    post = ProjectedPosterior(net, alpha=1.0, micro_batch_size=4)
    with pytest.raises(ValueError, match=r"^monitor is empty$"):
        post.fit(x, monitor=[])


def test_state_dict_and_repr_follow_the_fitted_state():
    """An unfitted posterior has nothing to save (RuntimeError asking for fit); the repr says
    unfitted, then the number of micro-batches, and for a posterior loaded without its
    micro-batches the number of saved draws it can predict with."""
    net, x, _ = small_problem()
    post = ProjectedPosterior(net, alpha=1.0, micro_batch_size=4, num_iterations=5)
    assert repr(post) == (
        "ProjectedPosterior(num_params=59, likelihood='categorical', kind='output', solver='cg', "
        "predictive='linearized', num_iterations=5, micro_batch_size=4, unfitted)"
    )
    with pytest.raises(RuntimeError, match=r"^call fit\(train_data\) first$"):
        post.state_dict()
    post.fit(x)
    assert repr(post).endswith(", 3 micro-batches)")
    before = post.sample_outputs(x[:2], 3)
    loaded = ProjectedPosterior.from_state_dict(net, post.state_dict(micro_batches=False))
    assert loaded.max_samples == 3 and repr(loaded).endswith(", 3 saved draws)")
    assert torch.equal(loaded.sample_outputs(x[:2], 3), before)


def test_rank1_regression_takes_the_noise_scale_of_the_model():
    """A rank-1 point network with likelihood="normal" needs no noise_scale: the predictive variance is
    the model's own noise_scale()² (here softplus(noise_raw) = 0.3), the mean the sampled outputs."""
    torch.manual_seed(0)
    model = rank1_mlp(3, [4], 1, ensemble_size=2, likelihood="normal").double()
    with torch.no_grad():
        model.noise_raw.fill_(math.log(math.expm1(0.3)))  # softplus⁻¹(0.3)
    net = rank1_point_network(model, DeltaGuide(model, init_loc_std=0.3).double())
    names = [n for n, _ in net.named_parameters() if n.startswith("factors.")]
    x = torch.randn(4, 3, dtype=torch.float64)
    post = ProjectedPosterior(net, "normal", param_names=names, alpha=1.0, micro_batch_size=2, num_iterations=20)
    assert post.noise_scale is None
    post.fit(x)
    pred = post.sample_predictions(x, 3)
    assert pred.shape == (3, 2, 4, 2) and not pred.requires_grad  # no graph back to the model's noise parameter
    torch.testing.assert_close(pred[..., 1], torch.full((3, 2, 4), 0.09, dtype=torch.float64))
    torch.testing.assert_close(pred[..., 0], post.sample_outputs(x, 3).squeeze(-1))


def test_gearhart_koshy_step_is_skipped_at_the_rounding_threshold():
    """The over-relaxation step is taken only while ||d||² > eps ||x||² (d = x - Tx), per vector.
    f(θ, x) = xᵀθ with micro-batches e_1 and e_1 + e_2 makes one sweep exact in float64: for
    x = (1, -2, c) with ||c||² = 2^52 - 5 (so eps ||x||² = 1 = ||d||², d = (0, -1, 0)) the step is
    skipped and the result is the plain sweep Tx = (1, -1, c); for x = (1, -2, 0), far above the
    threshold, it is the point of the line x - t d nearest to 𝒫x = 0, t = <x, d>/||d||² = 2: (1, 0, 0)."""
    net = nn.Linear(5, 1, bias=False).double()
    x = torch.tensor([[1.0, 0, 0, 0, 0], [1.0, 1.0, 0, 0, 0]], dtype=torch.float64)
    post = ProjectedPosterior(
        net, "normal", alpha=1.0, noise_scale=1.0, micro_batch_size=1, solver="alternating", num_iterations=1
    ).fit(x)
    c = [-67108863.0, -11561.0, -749.0]  # (2^26 - 1)² + 11561² + 749² = 2^52 - 5, each square exact
    v = torch.tensor([[1.0, -2.0, *c], [1.0, -2.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    assert v[0].pow(2).sum().item() == 2.0**52 and torch.finfo(torch.float64).eps * 2.0**52 == 1.0
    expected = torch.tensor([[1.0, -1.0, *c], [1.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    assert torch.equal(post.project(v), expected)


def test_conjugate_gradients_stop_each_vector_at_the_residual_floor():
    """CG stops a vector once ||r||² <= eps^1.5 ||v||² (r = (TᵀT - I) x), keeps a stopped vector fixed
    while the others go on, and ends as soon as all are stopped. With f(θ, x) = xᵀθ and the one example
    e_1, v = (1, 2^39) sits exactly on the floor (||r||² = 1 = eps^1.5 fl(1 + 2^78)) and is returned as
    given, while (1, 1) reaches its projection (0, 1) in one iteration, after which CG ends."""
    net = nn.Linear(2, 1, bias=False).double()
    x = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    post = ProjectedPosterior(net, "normal", alpha=1.0, noise_scale=1.0, micro_batch_size=1, num_iterations=5).fit(x)
    v = torch.tensor([[1.0, 2.0**39], [1.0, 1.0]], dtype=torch.float64)
    assert torch.finfo(torch.float64).eps ** 1.5 * v[0].pow(2).sum().item() == 1.0
    assert torch.equal(post.project(v), torch.tensor([[1.0, 2.0**39], [0.0, 1.0]], dtype=torch.float64))
    assert post.convergence.shape == (2,)  # before and after the one iteration


def test_conjugate_gradients_stop_when_the_residual_reaches_the_floor():
    """A vector is done as soon as an iteration brings ||r||² down to eps^1.5 ||v||², ties included.
    Micro-batches e_1 and e_1 + e_2 of f(θ, x) = xᵀθ, v = (1, 2, c) with c in the null space: the first
    CG step is x_1 = v + (4/3) r_0, r_0 = (-1, -1, 0), leaving ||r_1||² = 2/9 (rounded), and c is chosen
    so that eps^1.5 ||v||² is that same double; CG then stops after this one iteration."""
    c = [63270843.0 * 2.0**12, 9738.0 * 2.0**12, 120.0 * 2.0**12, 9.0 * 2.0**12]  # ||c||² = 2^78 fl(2/9)
    v = torch.tensor([[1.0, 2.0, *c]], dtype=torch.float64)
    r0, ad = torch.tensor([-1.0, -1.0], dtype=torch.float64), torch.tensor([-1.0, -0.5], dtype=torch.float64)
    step = r0.pow(2).sum() / (r0 * ad).sum()  # rr / (dᵀ A d) = 2 / 1.5
    assert torch.finfo(torch.float64).eps ** 1.5 * v.pow(2).sum() == (r0 - step * ad).pow(2).sum()
    net = nn.Linear(6, 1, bias=False).double()
    x = torch.zeros(2, 6, dtype=torch.float64)
    x[0, 0], x[1, :2] = 1.0, 1.0
    post = ProjectedPosterior(net, "normal", alpha=1.0, noise_scale=1.0, micro_batch_size=1, num_iterations=5).fit(x)
    projected = post.project(v)
    assert post.convergence.shape == (2,)
    torch.testing.assert_close(projected[0, :2], torch.tensor([-1 / 3, 2 / 3], dtype=torch.float64), rtol=0, atol=1e-15)
    assert torch.equal(projected[0, 2:], v[0, 2:])


def test_cg_with_many_micro_batches_matches_the_dense_projector():
    """With six micro-batches (two examples each) the symmetric sweep runs P_1 ... P_6 ... P_1, and CG
    still converges to the dense SVD projector onto the null space of J."""
    net, x, J = small_problem()
    post = ProjectedPosterior(net, alpha=1.0, micro_batch_size=2, num_iterations=150).fit(x)
    assert len(post._blocks) == 6
    v = torch.randn(4, 59, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert relative_error(post.project(v), v @ null_space_projector(J)) < 1e-6


def test_rank1_loss_projection_takes_column_regression_targets():
    """kind="loss" on a rank-1 regression network tiles (B, 1) targets over the K members like (B,)
    targets: both give the same projection."""
    torch.manual_seed(0)
    model = rank1_mlp(3, [4], 1, ensemble_size=2, likelihood="normal").double()
    net = rank1_point_network(model, DeltaGuide(model, init_loc_std=0.3).double())
    names = [n for n, _ in net.named_parameters() if n.startswith("factors.")]
    x = torch.randn(4, 3, dtype=torch.float64)
    y = torch.randn(4, dtype=torch.float64)
    kwargs = dict(param_names=names, kind="loss", alpha=1.0, micro_batch_size=2, num_iterations=30)
    flat = ProjectedPosterior(net, "normal", **kwargs).fit((x, y))
    column = ProjectedPosterior(net, "normal", **kwargs).fit((x, y[:, None]))
    v = torch.randn(3, flat.num_params, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(column.project(v), flat.project(v), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("solver", "iterations", "tol"), [("cg", 100, 1e-8), ("alternating", 40, 1e-2)])
def test_each_vector_is_projected_on_its_own_scale(solver, iterations, tol):
    """The solvers' step and stopping rules are relative to each vector's own norm: a vector stacked
    next to one 1e14 times larger projects as it does alone, and ±v scaled by 1e-8 or 1e16 projects to
    the same multiple of its projection (not left unprojected), all close to the dense SVD projector."""
    net, x, J = small_problem(num_examples=6)
    exact = null_space_projector(J)
    post = ProjectedPosterior(net, alpha=1.0, micro_batch_size=3, solver=solver, num_iterations=iterations).fit(x)
    v = torch.randn(2, 59, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    alone = post.project(v)
    assert relative_error(alone, v @ exact) < tol
    stacked = post.project(torch.stack([1e14 * v[0], v[1]]))
    assert relative_error(stacked[1], alone[1]) < 1e-9
    assert relative_error(stacked[0] / 1e14, alone[0]) < 1e-9
    assert relative_error(post.project(1e-8 * v) / 1e-8, alone) < 1e-9
    big = post.project(1e16 * torch.cat([v, -v])) / 1e16  # ±: whatever the sign of a cubic term
    assert relative_error(big, torch.cat([alone, -alone])) < 1e-9


def test_regression_noise_variance_is_exact_in_the_output_dtype():
    """The Gaussian predictive's variance is the noise scale squared in the outputs' dtype: exactly
    0.3² in float64 for noise_scale=0.3 (not 0.3 rounded to float32 and squared), and for a rank-1
    network with a fixed noise scale, the model's (float32) noise_scale() cast to float64, then squared."""
    net = nn.Linear(2, 1).double()
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    post = ProjectedPosterior(net, "normal", alpha=1.0, noise_scale=0.3, micro_batch_size=3, num_iterations=5).fit(x)
    assert torch.equal(post.sample_predictions(x, 2)[..., 1], torch.full((2, 1, 3), 0.3**2, dtype=torch.float64))
    torch.manual_seed(0)
    model = Rank1Model(
        nn.Sequential(Rank1Linear(2, 3, ensemble_size=2), nn.Tanh(), Rank1Linear(3, 1, ensemble_size=2)),
        likelihood="normal",
        noise_scale=0.3,
    ).double()
    rank1 = rank1_point_network(model, DeltaGuide(model, init_loc_std=0.3).double())
    names = [n for n, _ in rank1.named_parameters() if n.startswith("factors.")]
    post = ProjectedPosterior(rank1, "normal", param_names=names, alpha=1.0, micro_batch_size=3, num_iterations=5)
    variance = post.fit(x).sample_predictions(x, 2)[..., 1]
    scale = float(torch.tensor(0.3, dtype=torch.float32))  # 0.30000001192092896
    assert variance.dtype == torch.float64 and torch.equal(
        variance, torch.full((2, 2, 3), scale**2, dtype=torch.float64)
    )


def test_noise_is_drawn_on_the_model_device_whatever_the_default_device():
    """With another default device (here ``meta``, as after torch.set_default_device("cuda") with a CPU
    model) the noise ε and the Gaussian variance are still made on the model's device: sample() gives
    θ* + α^{-1/2} 𝒫ε for ε drawn from the CPU generator, and predictions are real numbers on the CPU."""
    net = nn.Linear(2, 1).double()
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    post = ProjectedPosterior(net, "normal", alpha=4.0, noise_scale=0.5, micro_batch_size=3, num_iterations=5).fit(x)
    eps = torch.randn(2, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = post.theta_map + post.project(eps) / 2.0
    with torch.device("meta"):
        theta = post.sample(2, generator=torch.Generator().manual_seed(1))
        pred = post.sample_predictions(x, 2)
    assert theta.device.type == "cpu" and torch.equal(theta, expected)
    assert pred.device.type == "cpu" and torch.equal(pred[..., 1], torch.full((2, 1, 3), 0.25, dtype=torch.float64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_runs_on_the_model_device():
    net, x, J = small_problem()
    post = ProjectedPosterior(net.cuda(), alpha=1.0, micro_batch_size=4, num_iterations=200).fit(x)
    assert post.device.type == "cuda"
    projected = post.project(torch.eye(59, dtype=torch.float64)).cpu()
    assert relative_error(projected, null_space_projector(J)) < 1e-6
    assert post.sample_predictions(x, 4).device.type == "cuda"


def _entropy(p):
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


def _digits_problem(seed=0):
    """scikit-learn digits scaled to [0, 1], a seeded 1437 / 360 split, and two OOD sets (shuffled-pixel
    digits, uniform noise): the problem of benchmarks/projected_scaling.py's digits comparison."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(X), generator=g)
    X, y = torch.tensor(X / 16.0, dtype=torch.float32)[perm], torch.tensor(y)[perm]
    x_test = X[1437:]
    ood = {"shuffled": x_test[:, torch.randperm(64, generator=g)], "noise": torch.rand(len(x_test), 64, generator=g)}
    return X[:1437], y[:1437], x_test, y[1437:], ood


def test_no_underfitting_on_digits():
    from laplace import Laplace

    from rank1_pyro.metrics import accuracy, nll, ood_auroc

    x_train, y_train, x_test, y_test, ood = _digits_problem()
    net = mlp(64, [64], 10, activation=nn.Tanh)  # P = 4810
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(200):  # MAP: cross-entropy + a Gaussian prior
        opt.zero_grad()
        loss = F.cross_entropy(net(x_train), y_train) + sum(p.pow(2).sum() for p in net.parameters()) / 1437
        loss.backward()
        opt.step()
    post = ProjectedPosterior(net, micro_batch_size=50, num_iterations=20, num_trace_probes=8).fit((x_train, y_train))
    assert 0 < post.trace_estimate < post.num_params and post.convergence[-1] < 1e-2 * post.convergence[0]
    with torch.no_grad():
        map_probs = {name: net(x).softmax(-1) for name, x in [("train", x_train), ("test", x_test), *ood.items()]}
    probs = {
        name: predict(post, x, num_samples=16, batch_size=512).probs
        for name, x in [("train", x_train), ("test", x_test), *ood.items()]
    }
    for name, y in (("train", y_train), ("test", y_test)):
        assert abs(accuracy(probs[name], y) - accuracy(map_probs[name], y)) <= 1e-3
    assert nll(probs["train"], y_train) == pytest.approx(nll(map_probs["train"], y_train), rel=1e-2)
    # out-of-distribution detection by predictive entropy improves over the MAP's
    for name in ood:
        auroc = ood_auroc(_entropy(probs["test"]), _entropy(probs[name]))
        assert auroc > ood_auroc(_entropy(map_probs["test"]), _entropy(map_probs[name]))

    # a diagonal (GGN) Laplace at the same prior precision, same linearized predictive: it underfits
    # (training NLL several times the MAP's) and loses test accuracy
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_train, y_train), batch_size=256)
    la = Laplace(net, "classification", subset_of_weights="all", hessian_structure="diag", prior_precision=post.alpha)
    la.fit(loader)
    deltas = la.posterior_variance.sqrt() * torch.randn(16, post.num_params)
    f = post.functional
    diag = {}
    with torch.no_grad():
        for name, x in (("train", x_train), ("test", x_test)):
            out, jd = vmap(lambda d: f.jvp(x, d))(deltas)
            diag[name] = (out + jd).softmax(-1).mean(0)
    assert nll(diag["train"], y_train) > 2 * nll(map_probs["train"], y_train)
    assert accuracy(diag["train"], y_train) <= accuracy(map_probs["train"], y_train)
    assert accuracy(diag["test"], y_test) < accuracy(map_probs["test"], y_test) - 5e-3


def test_constructor_errors_name_the_argument():
    """Each bad constructor argument is refused with a message naming that argument exactly (so a
    user sees which one to fix): unknown kind and solver names list the valid ones, a zero α is
    not a positive number, zero counts are not integers >= 1, and a plain network with
    likelihood="normal" asks for noise_scale."""
    net = mlp(3, [4], 2)
    with pytest.raises(ValueError, match=r"^kind: unknown name 'hessian'; valid: \['output', 'loss'\]$"):
        ProjectedPosterior(net, kind="hessian")
    with pytest.raises(ValueError, match=r"^solver: unknown name 'lsqr'; valid: \['cg', 'alternating'\]$"):
        ProjectedPosterior(net, solver="lsqr")
    for zero in (0, 0.0):
        with pytest.raises(ValueError, match=rf"^alpha must be a positive number or None, got {zero!r}$"):
            ProjectedPosterior(net, alpha=zero)
    for name in ("num_iterations", "micro_batch_size", "num_trace_probes", "chunk_size"):
        with pytest.raises(ValueError, match=rf"^{name} must be an integer >= 1, got 0$"):
            ProjectedPosterior(net, **{name: 0})
    with pytest.raises(
        ValueError, match=r"^noise_scale is required for likelihood='normal' \(the network has no noise model\)$"
    ):
        ProjectedPosterior(net, likelihood="normal")


def test_given_alpha_leaves_trace_and_convergence_unset():
    """With α given, fit() runs no Hutchinson estimate and projects nothing: trace_estimate,
    trace_stderr and convergence stay None (in the object and in its saved state) until a
    projection fills in the convergence record."""
    net, x, _ = small_problem(num_examples=6)
    post = ProjectedPosterior(net, alpha=2.0, micro_batch_size=3, num_iterations=5).fit(x)
    assert post.trace_estimate is None and post.trace_stderr is None and post.convergence is None
    state = post.state_dict()["state"]
    assert state["trace_estimate"] is None and state["trace_stderr"] is None and state["convergence"] is None
    post.project(torch.ones(59, dtype=torch.float64))
    assert post.convergence is not None and post.trace_stderr is None


def test_default_micro_batch_size_and_iterations():
    """Defaults as documented: micro-batches of 32 examples (33 examples make micro-batches of 32
    and 1), 100 iterations per projection (an alternating projection without tol records the
    residual before and after each of 100 sweeps), and the CG projection of f(θ, x) = xᵀθ matches
    the dense SVD projector onto the null space of the 33 × 40 data matrix."""
    net = nn.Linear(40, 1, bias=False).double()
    x = torch.randn(33, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = null_space_projector(x)
    v = torch.randn(3, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    post = ProjectedPosterior(net, "normal", alpha=1.0, noise_scale=1.0).fit(x)
    assert [b.rows for b in post._blocks] == [32, 1]
    assert relative_error(post.project(v), v @ exact) < 1e-8
    sweeps = ProjectedPosterior(net, "normal", alpha=1.0, noise_scale=1.0, solver="alternating").fit(x)
    sweeps.project(v)
    assert sweeps.convergence.shape == (101,)


def test_default_trace_estimate_uses_32_probes():
    """By default tr 𝒫 is estimated from 32 Rademacher probes. For f(θ, x) = xᵀθ with the one
    example (1, 1), 𝒫 = ½ [[1, -1], [-1, 1]], so each probe gives zᵀ𝒫z = 0 (z = ±(1, 1)) or 2
    (z = ±(1, -1)): the estimate is 2k/32 for the number k of probes of the second kind, and its
    standard error is the sample standard deviation of k twos and 32 - k zeros over √32."""
    net = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        net.weight.fill_(1.0)
    x = torch.ones(1, 2, dtype=torch.float64)
    torch.manual_seed(0)
    post = ProjectedPosterior(net, "normal", noise_scale=1.0, num_iterations=5).fit(x)
    k = post.trace_estimate * 32 / 2
    assert k == round(k) and 0 < k < 32
    values = torch.tensor([2.0] * round(k) + [0.0] * (32 - round(k)), dtype=torch.float64)
    assert post.trace_stderr == pytest.approx((values.std() / math.sqrt(32)).item(), rel=1e-12)


def test_default_chunk_size_bounds_vectors_per_step():
    """By default at most 64 vectors go through one projection step at a time: projecting 130
    vectors pushes chunks of 64, 64 and 2 through each micro-batch's step, and the result is still
    the dense SVD projector applied to every vector."""
    net, x, J = small_problem(num_examples=6)
    post = ProjectedPosterior(net, alpha=1.0, micro_batch_size=3, num_iterations=100).fit(x)
    sizes = []
    step = post._step

    def recording_step(block, V):
        sizes.append(V.shape[0])
        return step(block, V)

    post._step = recording_step
    v = torch.randn(130, 59, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert relative_error(post.project(v), v @ null_space_projector(J)) < 1e-6
    assert max(sizes) == 64 and set(sizes) == {64, 2}


def test_gram_basis_is_built_on_the_model_device_whatever_the_default_device():
    """With another default device (here ``meta``, as after torch.set_default_device("cuda") with a CPU
    model) fit() still builds the Gram matrices on the model's device, and the projection matches
    the dense SVD projector."""
    net, x, J = small_problem(num_examples=6)
    post = ProjectedPosterior(net, alpha=1.0, micro_batch_size=3, num_iterations=100)
    with torch.device("meta"):
        post.fit(x)
    assert all(b.eigvecs.device.type == "cpu" for b in post._blocks)
    v = torch.randn(2, 59, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert relative_error(post.project(v), v @ null_space_projector(J)) < 1e-6


@pytest.mark.parametrize(("eig_rtol", "kept"), [(0.25, 1), (0.2, 2)])
def test_eig_rtol_keeps_eigenvalues_strictly_above_the_cutoff(eig_rtol, kept):
    """A given eig_rtol keeps the Gram eigenvalues λ > eig_rtol · λ_max, strictly. For f(θ, x) = xᵀθ and
    one micro-batch of the examples e_1 and 2 e_2 the Gram matrix is diag(1, 4): with eig_rtol = 1/4
    the eigenvalue 1 sits exactly on the cut-off 1/4 · 4 and is dropped, so only e_2 is projected
    out (the dense SVD projector keeping singular values s > 1/2 · s_max); with 0.2 both are kept."""
    net = nn.Linear(3, 1, bias=False).double()
    x = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]], dtype=torch.float64)
    post = ProjectedPosterior(net, "normal", alpha=1.0, noise_scale=1.0, micro_batch_size=2, eig_rtol=eig_rtol)
    post.fit(x)
    assert post._blocks[0].inv_eigvals.numel() == kept
    exact = null_space_projector(x, rtol=math.sqrt(eig_rtol))
    torch.testing.assert_close(exact.diagonal(), torch.tensor([0.0 if kept == 2 else 1.0, 0.0, 1.0]).double())
    v = torch.tensor([[1.0, 1.0, 1.0], [2.0, -3.0, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(post.project(v), v @ exact, rtol=0, atol=1e-15)


@pytest.mark.parametrize("second", ["empty", "empty monitor"])
def test_a_refused_fit_leaves_the_posterior_as_it_was(second):
    """A fit refused for empty data keeps the last complete fit (it still projects exactly as the
    dense projector of its data), and on a fresh posterior leaves it unfitted with the usual message."""
    net = nn.Linear(3, 1, bias=False).double()
    x = torch.eye(3, dtype=torch.float64)[:2]
    post = ProjectedPosterior(net, "normal", alpha=1.0, noise_scale=1.0, micro_batch_size=1).fit(x)
    with pytest.raises(ValueError, match="train_data is empty" if second == "empty" else "monitor is empty"):
        post.fit([]) if second == "empty" else post.fit(x, monitor=[])
    v = torch.ones(3, dtype=torch.float64)
    torch.testing.assert_close(post.project(v), v @ null_space_projector(x))
    assert repr(post).endswith("2 micro-batches)")
    fresh = ProjectedPosterior(net, "normal", alpha=1.0, noise_scale=1.0)
    with pytest.raises(ValueError, match="train_data is empty"):
        fresh.fit([])
    with pytest.raises(RuntimeError, match=r"call fit\(train_data\) first"):
        fresh.project(v)


def test_the_convergence_record_is_on_the_cpu_whatever_the_default_device():
    """``convergence`` holds the residuals as numbers on the CPU even under another default device."""
    net, x, J = small_problem(num_examples=4)
    post = ProjectedPosterior(net, alpha=1.0, micro_batch_size=2, num_iterations=3).fit(x)
    v = torch.randn(59, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.device("meta"):
        post.project(v)
    assert post.convergence.device.type == "cpu" and len(post.convergence) == 4
    assert post.convergence[0].item() == pytest.approx(((J[:6] @ v).norm() / v.norm()).item())  # first micro-batch
