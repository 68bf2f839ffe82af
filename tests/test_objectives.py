"""The averaged and mixture ELBOs against hand computations in plain torch."""

import math
import re

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI, TraceEnum_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.ops.indexing import Vindex
from pyro.poutine.messenger import Messenger
from torch import nn

from rank1_pyro import (
    AveragedELBO,
    Cauchy,
    CauchyGuide,
    DeltaGuide,
    Gaussian,
    HalfCauchy,
    MixtureELBO,
    MixtureGuide,
    Rank1Model,
    members,
    mlp,
    rank1_mlp,
)
from rank1_pyro.inference.train import train

K, N, B = 3, 40, 6


def tiny(prior=None, num_data=N):
    model = rank1_mlp(2, [4], 3, ensemble_size=K, prior=prior, num_data=num_data)
    return model


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, 2, generator=g), torch.randint(0, 3, (B,), generator=g)


def hand_forward(model, values, x):
    """Member logits (K, B, C) computed in plain torch from factor values."""
    h = x.expand(K, *x.shape)
    lin0, lin1 = model.net[0], model.net[2]
    h = torch.relu((h * values["net.0.r"]) @ lin0.weight.T * values["net.0.s"] + lin0.bias[:, None])
    return (h * values["net.2.r"]) @ lin1.weight.T * values["net.2.s"] + lin1.bias[:, None]


def normal_kl(mq, sq, mp, sp):
    return (torch.log(sp / sq) + (sq**2 + (mq - mp) ** 2) / (2 * sp**2) - 0.5).sum()


def guide_draws(guide, x, y, seed):
    pyro.set_rng_seed(seed)
    trace = poutine.trace(guide).get_trace(x, y)
    return {n: s["value"] for n, s in trace.nodes.items() if s["type"] == "sample"}


@pytest.mark.parametrize("objective", [AveragedELBO, MixtureELBO])
def test_gaussian_prior_elbo_matches_hand_computation(objective):
    model = tiny()
    guide = MixtureGuide(model)
    x, y = data()
    pyro.set_rng_seed(7)
    loss = objective(vectorize_particles=False).differentiable_loss(model, guide, x, y)
    values = guide_draws(guide, x, y, seed=7)  # the same draws the objective saw
    log_p = torch.log_softmax(hand_forward(model, values, x), -1).gather(-1, y.expand(K, B)[..., None])[..., 0]
    if objective is AveragedELBO:
        log_lik = (N / B) * log_p.mean(0).sum()
    else:
        log_lik = (N / B) * (torch.logsumexp(log_p, 0) - math.log(K)).sum()
    kl = 0.0
    for name in values:
        key = name.replace(".", "__")
        kl = (
            kl
            + normal_kl(guide.loc[key], torch.nn.functional.softplus(guide.raw_scale[key]), 1.0, torch.tensor(0.1)) / K
        )
    torch.testing.assert_close(loss, -(log_lik - kl))


def test_cauchy_prior_uses_monte_carlo_kl_at_the_same_draws():
    model = tiny(prior=Cauchy(1.0, 0.1))
    guide = MixtureGuide(model)
    x, y = data()
    elbo = MixtureELBO(vectorize_particles=False)
    pyro.set_rng_seed(3)
    log_lik, kl = elbo.elbo_terms(*elbo._get_trace(model, guide, (x, y), {}))
    values = guide_draws(guide, x, y, seed=3)
    hand = 0.0
    for name, v in values.items():
        key = name.replace(".", "__")
        loc, scale = guide.loc[key], torch.nn.functional.softplus(guide.raw_scale[key])
        log_q = (-0.5 * ((v - loc) / scale) ** 2 - scale.log() - 0.5 * math.log(2 * math.pi)).sum()
        log_p = (-math.log(math.pi * 0.1) - torch.log1p(((v - 1.0) / 0.1) ** 2)).sum()
        hand = hand + (log_q - log_p) / K
    torch.testing.assert_close(kl, hand)
    # and it is an unbiased estimate: its average over many draws is close to the mean
    draws = []
    for seed in range(200):
        pyro.set_rng_seed(seed)
        draws.append(elbo.elbo_terms(*elbo._get_trace(model, guide, (x, y), {}))[1])
    draws = torch.stack(draws)
    assert draws.std() / math.sqrt(len(draws)) < 0.05 * draws.mean().abs()


def test_mixture_elbo_is_at_least_the_averaged_elbo_on_the_same_draws():
    model = tiny()
    guide = MixtureGuide(model, init_loc_std=0.5, init_scale=0.3)
    x, y = data()
    for seed in range(5):
        pyro.set_rng_seed(seed)
        averaged = AveragedELBO().differentiable_loss(model, guide, x, y)
        pyro.set_rng_seed(seed)
        mixture = MixtureELBO().differentiable_loss(model, guide, x, y)
        assert mixture <= averaged + 1e-5  # losses are negative ELBOs


class ScaleMemberSites(Messenger):
    """Weight latent sites in the member plate by 1/K, as the mixture ELBO's KL does."""

    def _pyro_sample(self, msg):
        if not msg["is_observed"] and any(f.name == "members" for f in msg["cond_indep_stack"]):
            msg["scale"] = msg["scale"] / K


def test_mixture_elbo_equals_trace_enum_elbo_over_an_enumerated_member_index():
    model = tiny(num_data=None)
    guide = MixtureGuide(model, init_loc_std=0.5, init_scale=0.2)
    x, y = data()

    def enum_model(x, y):
        out = model.outputs(x)  # (K, B, C): factor sites sampled (replayed from the guide)
        with pyro.plate("data", B, dim=-1):
            z = pyro.sample("z", dist.Categorical(logits=torch.zeros(K)), infer={"enumerate": "parallel"})
            pyro.sample("obs", dist.Categorical(logits=Vindex(out)[z, torch.arange(B), :]), obs=y)

    pyro.set_rng_seed(11)
    expected = TraceEnum_ELBO(max_plate_nesting=2).differentiable_loss(
        ScaleMemberSites()(enum_model), ScaleMemberSites()(guide), x, y
    )
    pyro.set_rng_seed(11)
    ours = MixtureELBO(analytic_kl=False, vectorize_particles=False).differentiable_loss(model, guide, x, y)
    torch.testing.assert_close(ours, expected)


def test_minibatch_scaling_by_dataset_size():
    model = tiny(num_data=B)
    guide = DeltaGuide(model)
    x, y = data()
    elbo = AveragedELBO()
    small = elbo.elbo_terms(*elbo._get_trace(model, guide, (x, y), {}))[0]
    model.num_data = 10 * B
    large = elbo.elbo_terms(*elbo._get_trace(model, guide, (x, y), {}))[0]
    torch.testing.assert_close(large, 10 * small)


def test_kl_weight_scales_only_the_kl():
    model = tiny()
    guide = DeltaGuide(model)
    x, y = data()
    terms = MixtureELBO(kl_weight=1.0).loss_terms(model, guide, x, y)
    half = MixtureELBO(kl_weight=0.5).loss_terms(model, guide, x, y)
    torch.testing.assert_close(half.log_likelihood, terms.log_likelihood)
    torch.testing.assert_close(half.loss, -(terms.log_likelihood - 0.5 * terms.kl))


def test_per_example_estimator_draws_per_example_and_counts_the_kl_once():
    model = tiny()
    guide = MixtureGuide(model)
    x, y = data()
    member, example = MixtureELBO(), MixtureELBO(estimator="example")
    model_trace, guide_trace = example._get_trace(model, guide, (x, y), {})
    r = guide_trace.nodes["net.0.r"]["value"]
    assert r.shape == (K, B, 2) and not torch.allclose(r[:, 0], r[:, 1])
    torch.testing.assert_close(model_trace.nodes["net.0.r"]["value"], r)
    # analytic KL is deterministic: both estimators count it exactly once
    kl_member = member.elbo_terms(*member._get_trace(model, guide, (x, y), {}))[1]
    kl_example = example.elbo_terms(model_trace, guide_trace)[1]
    torch.testing.assert_close(kl_example, kl_member)


def test_vectorized_particles_average_the_loss():
    model = tiny()
    guide = MixtureGuide(model)
    x, y = data()
    pyro.set_rng_seed(0)
    losses = torch.stack([MixtureELBO().differentiable_loss(model, guide, x, y) for _ in range(400)])
    pyro.set_rng_seed(1)
    vectorized = MixtureELBO(num_particles=400).differentiable_loss(model, guide, x, y)
    assert abs(vectorized - losses.mean()) < 4 * losses.std() / math.sqrt(400) + 1e-3


PRIORS = {"gaussian": Gaussian(1.0, 0.1), "cauchy": Cauchy(1.0, 0.1), "hierarchical": Gaussian(1.0, HalfCauchy(0.1))}
GUIDES = {
    "mixture": lambda m: MixtureGuide(m, init_sign_prob=None),
    "delta": lambda m: DeltaGuide(m),
    "autonormal": lambda m: AutoNormal(m),
}


@pytest.mark.parametrize("guide_name", GUIDES)
@pytest.mark.parametrize("prior_name", PRIORS)
def test_swapping_prior_or_guide_is_one_argument(prior_name, guide_name):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    model = rank1_mlp(2, [8], 2, ensemble_size=2, prior=PRIORS[prior_name], num_data=64)
    guide = GUIDES[guide_name](model)
    guide(x, y)
    opt = torch.optim.Adam([*model.parameters(), *guide.parameters()], lr=0.02)
    elbo = MixtureELBO(num_particles=4)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = elbo.differentiable_loss(model, guide, x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-10:]) < sum(losses[:10])


def test_trainable_cauchy_guide_and_pyro_svi():
    x, y = data()
    model = tiny(prior=Cauchy(1.0, 0.1))  # a Cauchy guide against a Gaussian prior has an infinite-variance KL
    guide = CauchyGuide(model, init_sign_prob=None)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), loss=MixtureELBO(num_particles=8))
    first = sum(svi.step(x, y) for _ in range(5))
    for _ in range(150):
        svi.step(x, y)
    last = sum(svi.step(x, y) for _ in range(5))
    assert last < first
    # SVI found the guide's and the model's parameters through Pyro's param store
    store = set(pyro.get_param_store().keys())
    assert {"net.0.weight", "net.0.bias"} <= store
    assert {"loc.net__0__r", "raw_scale.net__0__r"} <= store


def test_k1_delta_guide_reduces_to_the_deterministic_network():
    torch.manual_seed(0)
    plain = mlp(5, [7, 7], 3)
    model = rank1_mlp(5, [7, 7], 3, ensemble_size=1)
    with torch.no_grad():
        for i in (0, 2, 4):
            model.net[i].weight.copy_(plain[i].weight)
            model.net[i].bias.copy_(plain[i].bias[None])
    guide = DeltaGuide(model, init_sign_prob=None, init_loc_std=0.0)
    x = torch.randn(9, 5)
    trace = poutine.trace(guide).get_trace(x)
    out = poutine.replay(model.outputs, trace=trace)(x)
    torch.testing.assert_close(out[0], plain(x))


def test_a_model_without_factors_is_a_deterministic_network():
    net = mlp(5, [7], 3)
    model = Rank1Model(net, ensemble_size=1)
    x = torch.randn(4, 5)
    torch.testing.assert_close(model.outputs(x)[0], net(x))


@pytest.mark.parametrize(
    "x, y, error, match",
    [
        (torch.randn(4, 3), torch.zeros(4, dtype=torch.long), ValueError, "in_features=2"),
        (torch.tensor([[0.0, float("nan")]] * 4), torch.zeros(4, dtype=torch.long), ValueError, "NaN"),
        (torch.randn(4, 2), torch.tensor([0, 1, 2, 3]), ValueError, "labels out of range"),
        (torch.randn(4, 2), torch.tensor([0, 1, -1, 0]), ValueError, "labels out of range"),
        (torch.randn(4, 2), torch.zeros(4), TypeError, "integer class labels"),
        (torch.randn(4, 2), torch.zeros(5, dtype=torch.long), ValueError, r"y must have shape \(4,\)"),
        (torch.randn(0, 2), None, ValueError, "non-empty"),
    ],
)
def test_bad_input_raises_a_clear_error(x, y, error, match):
    model = tiny()
    with pytest.raises(error, match=match):
        model(x, y)


def test_bad_configuration_raises_a_clear_error():
    with pytest.raises(ValueError, match="ensemble_size"):
        rank1_mlp(2, [4], 3, ensemble_size=0)
    with pytest.raises(ValueError, match="estimator: unknown name"):
        MixtureELBO(estimator="per-sample")
    with pytest.raises(ValueError, match="likelihood: unknown name"):
        Rank1Model(nn.Linear(2, 2), ensemble_size=1, likelihood="poisson")
    with pytest.raises(ValueError, match="init_sign_prob"):
        MixtureGuide(tiny(), init_sign_prob=1.5)
    with pytest.raises(ValueError, match="no rank-1 layers"):
        MixtureGuide(Rank1Model(nn.Linear(2, 2), ensemble_size=1))


# ------------------------------------------------------------------ the split-batch estimator


def hand_split_log_lik(model, values, x, y, num_data=N):
    """(1/K) Σ_k (N/m) Σ_{i in member k's rows} log p(y_i | x_i, θ_k), m = B // K, in plain torch."""
    m = x.shape[0] // K
    log_p = torch.log_softmax(hand_forward(model, values, x), -1)  # (K, B, C): every member on every row
    rows = torch.arange(K * m).reshape(K, m)
    own = log_p[torch.arange(K)[:, None], rows, y[rows]]  # (K, m): member k on its own rows
    return (num_data / m) * own.sum() / K


@pytest.mark.parametrize("batch", [B, B + 2])  # B + 2 = 8 rows, K = 3: the last 2 rows are left out
def test_split_estimator_matches_hand_computation(batch):
    model = tiny()
    guide = MixtureGuide(model)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(batch, 2, generator=g), torch.randint(0, 3, (batch,), generator=g)
    pyro.set_rng_seed(7)
    terms = AveragedELBO(estimator="split", vectorize_particles=False).loss_terms(model, guide, x, y)
    values = guide_draws(guide, x, y, seed=7)
    torch.testing.assert_close(terms.log_likelihood, hand_split_log_lik(model, values, x, y))
    # the latent terms do not depend on the batch: the member estimator's KL, exactly
    pyro.set_rng_seed(7)
    member = AveragedELBO(vectorize_particles=False).loss_terms(model, guide, x, y)
    torch.testing.assert_close(terms.kl, member.kl)
    m = batch // K
    assert terms.logits.shape == (K, m, 3)


def test_split_estimator_is_unbiased_over_the_splits_of_a_batch():
    """Averaged over every assignment of the batch's rows to the members, the split log-likelihood is
    the tiled (member) estimator's: E over splits of (N/m) Σ_{i∈S_k} ℓ_ik = (N/B) Σ_i ℓ_ik."""
    import itertools

    model = tiny()
    guide = DeltaGuide(model)  # point factors: the only randomness is the split
    x, y = data()
    split = AveragedELBO(estimator="split")
    estimates = [
        split.loss_terms(model, guide, x[list(order)], y[list(order)]).log_likelihood
        for order in itertools.permutations(range(B))
    ]
    tiled = AveragedELBO().loss_terms(model, guide, x, y).log_likelihood
    torch.testing.assert_close(torch.stack(estimates).mean(), tiled)
    assert torch.stack(estimates).std() > 0  # but each split is a noisier estimate


def test_split_estimator_runs_the_network_on_the_batch_once_not_k_times():
    model = tiny()
    guide = MixtureGuide(model)
    x, y = data()
    rows = []
    hook = model.net[0].register_forward_hook(lambda module, inputs, out: rows.append(inputs[0].shape[:-1].numel()))
    AveragedELBO(estimator="split").loss_terms(model, guide, x, y)
    AveragedELBO().loss_terms(model, guide, x, y)
    hook.remove()
    assert rows == [B, K * B]


def test_split_estimator_refuses_what_it_cannot_estimate():
    with pytest.raises(ValueError, match="mixture likelihood needs every member"):
        MixtureELBO(estimator="split")
    model = tiny()
    guide = MixtureGuide(model)
    x, y = data()
    with pytest.raises(ValueError, match="a batch of 2 is too small"):
        AveragedELBO(estimator="split").loss_terms(model, guide, x[:2], y[:2])
    net = rank1_mlp(2, [4], 3, ensemble_size=K).net

    def plain_model(x, y=None):  # tiles its input by itself: the handler cannot split it
        m = members(K)
        logits = net(m.tile(x))
        with m, pyro.plate("data", N, subsample=torch.arange(x.shape[0]), dim=-1):
            pyro.sample("obs", dist.Categorical(logits=logits), obs=y)

    with pytest.raises(ValueError, match="needs a model that splits its batch"):
        AveragedELBO(estimator="split").loss_terms(plain_model, AutoNormal(plain_model), x, y)


def test_split_estimator_trains_and_reports_each_members_accuracy():
    from rank1_pyro.inference.objectives import ELBOTerms
    from rank1_pyro.inference.progress import add_step, zero_totals

    # 2 members, 2 rows each of a batch of 5: member 0 right on 1 of its rows, member 1 on both
    logits = torch.tensor([[[5.0, 0.0], [5.0, 0.0]], [[0.0, 5.0], [5.0, 0.0]]])
    y = torch.tensor([0, 1, 1, 0, 1])
    totals = zero_totals()
    add_step(totals, ELBOTerms(torch.tensor(1.0), None, None, logits), torch.tensor(1.0), y, 10, True)
    assert float(totals["correct"]) == pytest.approx(3 / 4 * 5) and totals["seen"] == 5

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, generator=g)
    y = (x[:, 0] > 0).long()
    model = rank1_mlp(2, [8], 2, ensemble_size=2)
    history = train(model, MixtureGuide(model), (x, y), epochs=30, batch_size=16, lr=0.02, progress=False,
                    objective=AveragedELBO(estimator="split"), seed=0)  # fmt: skip
    assert history.last["accuracy"] > 0.8


def test_per_example_plate_is_a_plate_pyro_checks_and_expands_only_the_last_dim():
    """ExamplePlate adds an ``examples`` plate of size B at dim -1 to each member site: Pyro's shape
    check (validation on) accepts the (K, B) factors only because that plate is recorded, and a
    site under an outer plate keeps its other batch dims."""
    from pyro.poutine.indep_messenger import CondIndepStackFrame

    from rank1_pyro.inference.objectives import ExamplePlate

    model, x_y = tiny(), data()
    guide = MixtureGuide(model)
    elbo = AveragedELBO(estimator="example")
    with pyro.validation_enabled(True):
        pyro.set_rng_seed(0)
        model_trace, guide_trace = elbo._get_trace(model, guide, x_y, {})  # check_site_shape on every site
    for trace in (model_trace, guide_trace):
        frames = [f for f in trace.nodes["net.0.r"]["cond_indep_stack"] if f.name == "examples"]
        assert [(f.dim, f.size) for f in frames] == [(-1, B)]
    frame = CondIndepStackFrame("examples", -1, B, 0)
    assert all(frame not in s["cond_indep_stack"] for s in model_trace.nodes.values() if s.get("is_observed"))

    def outer(x):
        with pyro.plate("outer", 2, dim=-3), members(K):
            return pyro.sample("r", dist.Normal(torch.zeros(2, K, 1, 5), 1.0).to_event(1))

    assert ExamplePlate(B)(outer)(None).shape == (2, K, B, 5)


def test_loss_is_the_differentiable_loss_without_a_graph():
    """``loss`` (Pyro's SVI reads it) is the float of ``differentiable_loss`` at the same draws, and
    builds no graph: no parameter gets a gradient."""
    model, (x, y) = tiny(), data()
    guide = MixtureGuide(model)
    for objective in (AveragedELBO(), MixtureELBO(kl_weight=0.5)):
        pyro.set_rng_seed(3)
        value = objective.loss(model, guide, x, y)
        pyro.set_rng_seed(3)
        expected = objective.differentiable_loss(model, guide, x, y)
        assert isinstance(value, float) and value == pytest.approx(expected.item(), rel=1e-6)
        pyro.set_rng_seed(3)
        assert objective.loss(model, guide, x, y=y) == pytest.approx(value, rel=1e-6)  # y by keyword
        assert all(p.grad is None for p in list(model.parameters()) + list(guide.parameters()))
    grad_modes = []

    def recording(x, y):
        grad_modes.append(torch.is_grad_enabled())
        return model(x, y)

    AveragedELBO().loss(recording, guide, x, y)
    assert grad_modes == [False]


def test_elbo_terms_weigh_a_joint_autoguide_like_the_loss():
    """With an AutoMultivariateNormal over the factors, ``elbo_terms`` given the guide's joint latents
    is the loss's own (log-likelihood, KL) at the same draws; without them the joint log q is
    counted at weight 1 instead of the member weights, and the KL differs."""
    from pyro.infer.autoguide import AutoMultivariateNormal

    from rank1_pyro.inference.joint import joint_latents

    model, (x, y) = tiny(), data()
    guide = AutoMultivariateNormal(model, init_scale=0.2)
    elbo = AveragedELBO(vectorize_particles=False)
    guide(x, y)  # the autoguide sets up its latents on its first call (drawing from the model)
    pyro.set_rng_seed(5)
    terms = elbo.loss_terms(model, guide, x, y)
    pyro.set_rng_seed(5)
    traces = elbo._get_trace(model, guide, (x, y), {})
    log_lik, kl = elbo.elbo_terms(*traces, joint_latents(guide))
    torch.testing.assert_close((log_lik, kl), (terms.log_likelihood, terms.kl))
    assert not torch.allclose(elbo.elbo_terms(*traces)[1], kl)


def test_kl_annealing_weight_is_linear_from_zero_to_one():
    from rank1_pyro.inference.objectives import kl_annealing

    assert [kl_annealing(s, 4) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert kl_annealing(0, 1) == 0.0 and kl_annealing(1, 1) == 1.0  # one step of annealing still starts at 0
    assert kl_annealing(0, 0) == 1.0 and kl_annealing(3, -2) == 1.0  # no annealing: the full KL from the start


def test_loss_and_grads_passes_keyword_arguments_to_model_and_guide():
    """Pyro's SVI calls ``loss_and_grads(model, guide, *args, **kwargs)``: an observation given by
    keyword is in the loss, and the gradients are those of ``differentiable_loss``."""
    model, (x, y) = tiny(), data()
    guide = MixtureGuide(model)
    elbo = AveragedELBO()
    pyro.set_rng_seed(2)
    expected = elbo.differentiable_loss(model, guide, x, y=y)
    grads = torch.autograd.grad(expected, list(guide.parameters()))
    pyro.set_rng_seed(2)
    value = elbo.loss_and_grads(model, guide, x, y=y)
    assert value == pytest.approx(expected.item(), rel=1e-6)
    pyro.set_rng_seed(2)
    torch.testing.assert_close(elbo.differentiable_loss(model, guide, x, y), expected)  # y by position
    for p, g in zip(guide.parameters(), grads):
        torch.testing.assert_close(p.grad, g)


def test_objective_record_names_the_objective_and_its_settings():
    """What a checkpoint records: the OBJECTIVES key of a rank-1 objective (the class name of a
    subclass or of a wrapped Pyro ELBO), its KL weight and estimator (``None`` where it has none)."""
    from pyro.infer import Trace_ELBO

    from rank1_pyro.inference.objectives import PlainELBO, objective_record

    class Tempered(MixtureELBO):
        pass

    assert objective_record(AveragedELBO(kl_weight=0.5, estimator="split")) == {
        "objective": "averaged",
        "kl_weight": 0.5,
        "estimator": "split",
    }
    assert objective_record(MixtureELBO()) == {"objective": "mixture", "kl_weight": 1.0, "estimator": "member"}
    assert objective_record(Tempered(kl_weight=2.0))["objective"] == "Tempered"
    assert objective_record(PlainELBO(Trace_ELBO())) == {
        "objective": "Trace_ELBO",
        "kl_weight": None,
        "estimator": None,
    }


def test_plain_elbo_is_the_pyro_elbo_with_no_kl_weight():
    """Any other Pyro ELBO trains through PlainELBO: its loss is that ELBO's ``differentiable_loss``
    at the same draws, with no parts, and annealing stays 1 (there is no KL weight to anneal)."""
    from pyro.infer import Trace_ELBO

    from rank1_pyro.inference.objectives import PlainELBO

    model, (x, y) = tiny(), data()
    guide = MixtureGuide(model)
    plain = PlainELBO(Trace_ELBO())
    pyro.set_rng_seed(4)
    terms = plain.loss_terms(model, guide, x, y=y)
    pyro.set_rng_seed(4)
    expected = Trace_ELBO().differentiable_loss(model, guide, x, y=y)
    torch.testing.assert_close(terms.loss, expected)
    assert terms.loss.requires_grad and terms[1:] == (None, None, None)
    assert not plain.has_parts and plain.effective_kl_weight == 1.0 and plain.annealing == 1.0
    plain.annealing = 1.0
    with pytest.raises(ValueError, match="Trace_ELBO has no KL weight to anneal"):
        plain.annealing = 0.5


def test_a_masked_observation_counts_nothing():
    """A tensor mask on the likelihood (``poutine.mask``) removes those examples' log-likelihood:
    the loss equals that of the model on the unmasked examples alone, at the same draws."""
    model, (x, y) = tiny(), data()
    guide = MixtureGuide(model)
    keep = torch.tensor([True, False, True, True, False, True])
    elbo = AveragedELBO()

    def masked(x, y):
        with poutine.mask(mask=keep):
            return model(x, y)

    pyro.set_rng_seed(6)
    model_trace, guide_trace = elbo._get_trace(masked, guide, (x, y), {})
    log_lik = elbo.elbo_terms(model_trace, guide_trace)[0]
    values = {n: s["value"] for n, s in guide_trace.nodes.items() if s["type"] == "sample"}
    logits = hand_forward(model, values, x)  # (K, B, C)
    per_example = torch.log_softmax(logits, -1).gather(-1, y.expand(K, B)[..., None])[..., 0].mean(0)
    torch.testing.assert_close(log_lik, N / B * per_example[keep].sum())


def test_per_example_estimator_needs_a_batch_first_tensor():
    model = tiny()
    with pytest.raises(ValueError, match="estimator='example' needs the model's first argument to be a batch-first"):
        AveragedELBO(estimator="example").loss(lambda x=None: model(*data()), MixtureGuide(model))


def test_particles_drawn_one_after_another_average_their_terms():
    """``num_particles=2`` without vectorization: the loss and its parts are the means of two
    single-particle estimates drawn in turn from the same seed."""
    model, (x, y) = tiny(), data()
    guide = MixtureGuide(model)
    pyro.set_rng_seed(8)
    two = AveragedELBO(num_particles=2, vectorize_particles=False).loss_terms(model, guide, x, y)
    pyro.set_rng_seed(8)
    one = AveragedELBO(vectorize_particles=False)
    first, second = one.loss_terms(model, guide, x, y), one.loss_terms(model, guide, x, y)
    assert not torch.allclose(first.loss, second.loss)
    for i in range(3):
        torch.testing.assert_close(two[i], (first[i] + second[i]) / 2)


def test_observed_guide_sites_count_nothing_and_a_parameter_free_loss_needs_no_backward():
    """An observed site in the guide is no latent: it adds nothing to the KL (as in Pyro's own
    ELBOs); a model and guide without parameters give a loss with no graph, which ``loss_and_grads``
    returns without a backward pass. Checked against closed forms: N·log 2 for a uniform two-class
    likelihood."""
    model, (x, y) = tiny(), data()
    guide = MixtureGuide(model)

    def guide_with_an_observation(x, y):
        pyro.sample("aux", dist.Normal(0.0, 1.0), obs=torch.tensor(3.0))
        return guide(x, y)

    for elbo in (AveragedELBO(), AveragedELBO(analytic_kl=False)):  # Monte Carlo KL: every guide site read
        pyro.set_rng_seed(9)
        plain = elbo.loss(model, guide, x, y)
        pyro.set_rng_seed(9)
        assert elbo.loss(model, guide_with_an_observation, x, y) == pytest.approx(plain, rel=1e-6)

    def uniform(x, y):
        with members(K), pyro.plate("data", N, subsample=torch.arange(B), dim=-1):
            pyro.sample("obs", dist.Categorical(logits=torch.zeros(K, B, 2)), obs=y % 2)

    value = AveragedELBO().loss_and_grads(uniform, lambda x, y: None, x, y)
    assert value == pytest.approx(N * math.log(2))


def test_training_objective_resolves_names_and_wraps_other_elbos():
    """``None`` and the names give fresh rank-1 objectives, a rank-1 objective is used as is, any other
    Pyro ELBO is wrapped; anything else, and KL annealing without a KL weight, is refused by name."""
    from pyro.infer import Trace_ELBO

    from rank1_pyro.inference.objectives import PlainELBO, check_objective, training_objective

    assert type(training_objective(None)) is AveragedELBO
    assert type(training_objective("averaged")) is AveragedELBO and type(training_objective("mixture")) is MixtureELBO
    mine, pyros = MixtureELBO(kl_weight=0.3), Trace_ELBO()
    assert training_objective(mine) is mine
    wrapped = training_objective(pyros)
    assert isinstance(wrapped, PlainELBO) and wrapped.elbo is pyros
    with pytest.raises(ValueError, match="objective: unknown name 'elbo'"):
        training_objective("elbo")
    with pytest.raises(TypeError, match="^objective must be a name or a Pyro ELBO, got int$"):
        training_objective(3)
    with pytest.raises(ValueError, match=r"kl_annealing_epochs=2 needs a rank-1 objective .*; Trace_ELBO has none"):
        check_objective(pyros, kl_annealing_epochs=2)
    for ok in (None, "mixture", mine):
        check_objective(ok, kl_annealing_epochs=2)


def test_is_point_mass_sees_through_wrappers():
    from rank1_pyro.inference.objectives import is_point_mass

    delta = dist.Delta(torch.zeros(3))
    assert is_point_mass(delta) and is_point_mass(delta.to_event(1)) and is_point_mass(delta.to_event(1).mask(True))
    assert not is_point_mass(dist.Normal(torch.zeros(3), 1.0).to_event(1))


def test_a_regression_model_reports_no_logits_and_a_nan_loss_warns_under_validation():
    """``ELBOTerms.logits`` is ``None`` without a categorical site; with Pyro's validation on, a NaN
    loss warns (the distribution's own argument check off, so the NaN reaches the loss)."""
    x = torch.randn(B, 2, generator=torch.Generator().manual_seed(2))
    model = rank1_mlp(2, [4], 1, ensemble_size=K, likelihood="normal", num_data=N)
    terms = AveragedELBO().loss_terms(model, MixtureGuide(model), x, x[:, 0])
    assert terms.logits is None and torch.isfinite(terms.loss)

    def nan_mean(x, y):  # the models of this library refuse NaN data: a hand-made one
        with members(K), pyro.plate("data", N, subsample=torch.arange(B), dim=-1):
            pyro.sample("obs", dist.Normal(torch.full((K, B), float("nan")), 1.0, validate_args=False), obs=y)

    with pyro.validation_enabled(True), pytest.warns(UserWarning, match="Encountered NaN: loss"):
        AveragedELBO().loss_terms(nan_mean, lambda x, y: None, x, x[:, 1])


@pytest.mark.parametrize("objective", [AveragedELBO, MixtureELBO])
def test_an_observation_outside_the_members_plate_is_not_reduced_over_members(objective):
    """A likelihood outside the members plate (a deterministic network's) is summed as is, by either
    objective: N·log 2 for a uniform two-class likelihood, with no member dim to average or mix."""
    x, y = data()

    def uniform(x, y):
        with pyro.plate("data", N, subsample=torch.arange(B), dim=-1):
            pyro.sample("obs", dist.Categorical(logits=torch.zeros(B, 2)), obs=y % 2)

    assert objective().loss(uniform, lambda x, y: None, x, y) == pytest.approx(N * math.log(2))


def test_latents_sampled_after_the_observation_still_count():
    """Trace order does not matter: a global latent drawn after the likelihood still adds its
    closed-form KL. Checked against N·log 2 + KL(N(0.5, 0.8²) ‖ N(0, 1))."""
    x, y = data()

    def model(x, y):
        with pyro.plate("data", N, subsample=torch.arange(B), dim=-1):
            pyro.sample("obs", dist.Categorical(logits=torch.zeros(B, 2)), obs=y % 2)
        pyro.sample("z", dist.Normal(0.0, 1.0))

    def guide(x, y):
        pyro.sample("z", dist.Normal(0.5, 0.8))

    kl = normal_kl(torch.tensor(0.5), torch.tensor(0.8), torch.tensor(0.0), torch.tensor(1.0))
    for objective in (AveragedELBO(), MixtureELBO()):
        assert objective.loss(model, guide, x, y) == pytest.approx(N * math.log(2) + kl.item(), rel=1e-6)


# ------------------------------------------------------------------ constructor arguments and their messages


@pytest.mark.parametrize("bad", [-1.0, -1, float("inf"), float("nan"), True, "1", None])
def test_kl_weight_must_be_a_finite_number_at_least_zero(bad):
    """``kl_weight`` refuses negative, infinite and NaN numbers, booleans and non-numbers, with one exact
    message (no upper bound in it), at construction and when set later."""
    message = f"^kl_weight must be a finite number >= 0, got {re.escape(repr(bad))}$"
    with pytest.raises(ValueError, match=message):
        AveragedELBO(kl_weight=bad)
    elbo = MixtureELBO()
    with pytest.raises(ValueError, match=message):
        elbo.kl_weight = bad
    assert elbo.kl_weight == 1.0


@pytest.mark.parametrize("bad", [1.5, -0.25, float("inf"), float("nan"), False, "0.5"])
def test_annealing_must_be_a_finite_number_in_zero_one(bad):
    """``annealing`` (β) refuses anything outside [0, 1], booleans and non-numbers; its message names the
    upper bound 1."""
    elbo = AveragedELBO()
    with pytest.raises(
        ValueError, match=f"^annealing must be a finite number >= 0 and <= 1, got {re.escape(repr(bad))}$"
    ):
        elbo.annealing = bad
    assert elbo.annealing == 1.0


def test_kl_weight_and_annealing_accept_their_bounds_and_zero_removes_the_kl():
    """0 is a valid KL weight and a valid β (the bounds are inclusive), integers are taken as floats,
    and with either at 0 the loss is the negative log-likelihood alone: for a uniform two-class
    likelihood, N·log 2 whatever the latent's KL."""
    x, y = data()

    def model(x, y):
        pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("data", N, subsample=torch.arange(B), dim=-1):
            pyro.sample("obs", dist.Categorical(logits=torch.zeros(B, 2)), obs=y % 2)

    def guide(x, y):
        pyro.sample("z", dist.Normal(2.0, 0.5))

    no_kl = AveragedELBO(kl_weight=0)
    assert no_kl.kl_weight == 0.0 and isinstance(no_kl.kl_weight, float)
    assert no_kl.loss(model, guide, x, y) == pytest.approx(N * math.log(2))
    annealed = MixtureELBO(kl_weight=3)
    assert annealed.kl_weight == 3.0 and isinstance(annealed.kl_weight, float)
    annealed.annealing = 0
    assert annealed.annealing == 0.0 and annealed.effective_kl_weight == 0.0
    assert annealed.loss(model, guide, x, y) == pytest.approx(N * math.log(2))
    annealed.annealing = 1
    kl = normal_kl(torch.tensor(2.0), torch.tensor(0.5), torch.tensor(0.0), torch.tensor(1.0)).item()
    assert annealed.loss(model, guide, x, y) == pytest.approx(N * math.log(2) + 3 * kl, rel=1e-6)


@pytest.mark.parametrize("bad", [0, -2, 1.0, True])
def test_num_particles_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match=f"^num_particles must be an integer >= 1, got {bad!r}$"):
        AveragedELBO(num_particles=bad)


def test_estimator_errors_have_their_exact_messages():
    """The estimator's refusals, word for word: the mixture ELBO's of ``"split"`` (naming the class and
    the objective to use instead), ``"example"`` without a batch-first first argument, and
    ``"split"`` on a model that does not split its batch."""
    with pytest.raises(ValueError) as info:
        MixtureELBO(estimator="split")
    assert str(info.value) == (
        "MixtureELBO: estimator='split' gives each member different examples, but the mixture likelihood needs "
        "every member on every example; use AveragedELBO(estimator='split')"
    )
    model = tiny()
    with pytest.raises(ValueError) as info:
        AveragedELBO(estimator="example").loss(lambda x=None: model(*data()), MixtureGuide(model))
    assert str(info.value) == "estimator='example' needs the model's first argument to be a batch-first tensor"

    x, y = data()
    net = rank1_mlp(2, [4], 3, ensemble_size=K).net

    def tiling_model(x, y=None):
        m = members(K)
        logits = net(m.tile(x))
        with m, pyro.plate("data", N, subsample=torch.arange(x.shape[0]), dim=-1):
            pyro.sample("obs", dist.Categorical(logits=logits), obs=y)

    with pytest.raises(ValueError) as info:
        AveragedELBO(estimator="split").loss_terms(tiling_model, AutoNormal(tiling_model), x, y)
    assert str(info.value) == (
        "estimator='split' needs a model that splits its batch over the members (a Rank1Model); "
        "this model tiled it or ignored the handler"
    )


def test_default_particles_are_vectorized_in_a_plate_left_of_the_models_two():
    """By default ``num_particles`` draws run in one vectorized pass (the model is called once, not once
    per particle), in a particle plate just left of the rank-1 model's two plates (members, data):
    the logits are ``(P, K, B, C)``. With a point-mass guide every particle is the same network,
    so the loss is the hand-computed ELBO and the logits are its log-softmax outputs."""
    model, (x, y) = tiny(), data()
    guide = DeltaGuide(model)
    calls = []

    def counting(x, y):
        calls.append(x.shape)
        return model(x, y)

    terms = AveragedELBO(num_particles=2).loss_terms(counting, guide, x, y)
    assert len(calls) == 1
    values = guide_draws(guide, x, y, seed=0)
    log_softmax = torch.log_softmax(hand_forward(model, values, x), -1)  # (K, B, C)
    assert terms.logits.shape == (2, K, B, 3)
    torch.testing.assert_close(terms.logits, log_softmax.expand(2, K, B, 3))
    log_lik = (N / B) * log_softmax.gather(-1, y.expand(K, B)[..., None])[..., 0].mean(0).sum()
    kl = -sum(dist.Normal(1.0, 0.1).log_prob(v).sum() for v in values.values()) / K
    torch.testing.assert_close(terms.loss, -(log_lik - kl))
    calls.clear()
    AveragedELBO(num_particles=2, vectorize_particles=False).loss_terms(counting, guide, x, y)
    assert len(calls) == 2


def test_per_example_estimator_reads_the_batch_from_the_first_argument_with_y_by_keyword():
    """``estimator="example"`` takes the batch size from the first positional argument alone: with the
    labels passed by keyword it still draws (K, B) factors, and its terms are the hand computation
    at those draws (each example through its own factors; the analytic KL of each member once)."""
    model, (x, y) = tiny(), data()
    guide = MixtureGuide(model)
    elbo = AveragedELBO(estimator="example")
    pyro.set_rng_seed(4)
    model_trace, guide_trace = elbo._get_trace(model, guide, (x,), {"y": y})
    log_lik, kl = elbo.elbo_terms(model_trace, guide_trace)
    values = {n: s["value"] for n, s in guide_trace.nodes.items() if s["type"] == "sample"}
    assert values["net.0.r"].shape == (K, B, 2)
    log_p = torch.log_softmax(hand_forward(model, values, x), -1).gather(-1, y.expand(K, B)[..., None])[..., 0]
    torch.testing.assert_close(log_lik, (N / B) * log_p.mean(0).sum())
    hand_kl = 0.0
    for name in values:
        key = name.replace(".", "__")
        scale = torch.nn.functional.softplus(guide.raw_scale[key])
        hand_kl = hand_kl + normal_kl(guide.loc[key], scale, 1.0, torch.tensor(0.1)) / K
    torch.testing.assert_close(kl, hand_kl)


@pytest.mark.parametrize("validation", [False, True])
def test_keyword_arguments_reach_model_and_guide_with_or_without_validation(validation):
    """Keyword-only arguments reach both the model and the guide, on the fast path (validation off)
    and on Pyro's checked path: the loss is the closed form N·log 2 + KL(N(loc, 0.8²) ‖ N(0, 1))."""
    x, y = data()

    def model(x, *, y, loc):
        pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("data", N, subsample=torch.arange(B), dim=-1):
            pyro.sample("obs", dist.Categorical(logits=torch.zeros(B, 2)), obs=y % 2)

    def guide(x, *, y, loc):
        pyro.sample("z", dist.Normal(loc, 0.8))

    kl = normal_kl(torch.tensor(0.5), torch.tensor(0.8), torch.tensor(0.0), torch.tensor(1.0)).item()
    with pyro.validation_enabled(validation):
        for elbo in (AveragedELBO(), MixtureELBO(analytic_kl=False, num_particles=4000)):
            value = elbo.loss(model, guide, x, y=y, loc=torch.tensor(0.5))
            assert value == pytest.approx(N * math.log(2) + kl, abs=0.05)


class NotReparameterized:
    """A distribution-like callable with no ``has_rsample`` attribute at all."""

    def __call__(self):
        return torch.tensor(0.3)

    def log_prob(self, value):
        return torch.tensor(-1.0)


def test_guide_sites_without_a_reparameterized_sampler_are_refused():
    """The objectives' gradients need reparameterized guide sites: a Bernoulli (``has_rsample`` False)
    and a callable without ``has_rsample`` are both refused, with the site and the type named."""
    x, y = data()

    def model(x, y):
        pyro.sample("z", dist.Bernoulli(0.3))

    def guide(x, y):
        pyro.sample("z", dist.Bernoulli(0.6))

    message = (
        "^guide site 'z': {} has no reparameterized sampler; the rank-1 objectives need reparameterized guide "
        "distributions$"
    )
    with pytest.raises(NotImplementedError, match=message.format("Bernoulli")):
        AveragedELBO(analytic_kl=False).loss(model, guide, x, y)

    def normal_model(x, y):
        pyro.sample("z", dist.Normal(0.0, 1.0))

    def duck_guide(x, y):
        pyro.sample("z", NotReparameterized())

    with pyro.validation_enabled(False), pytest.raises(NotImplementedError, match=message.format("NotReparameterized")):
        AveragedELBO().loss(normal_model, duck_guide, x, y)


def test_a_scaled_joint_autoguide_scales_every_term():
    """``poutine.scale`` around model and guide multiplies every log density by the scale, so both terms
    double at the same draws, including the joint autoguide's global marginal (a hierarchical
    prior's scale site, weighted 1 rather than 1/K)."""
    from pyro.infer.autoguide import AutoMultivariateNormal

    from rank1_pyro.inference.joint import joint_latents

    model, (x, y) = tiny(prior=Gaussian(1.0, HalfCauchy(0.1))), data()
    guide = AutoMultivariateNormal(model, init_scale=0.2)
    guide(x, y)
    joints = joint_latents(guide)
    assert all(j.global_idx.numel() for j in joints.values())  # the hierarchical scale is a global latent
    elbo = AveragedELBO(vectorize_particles=False)
    pyro.set_rng_seed(5)
    log_lik, kl = elbo.elbo_terms(*elbo._get_trace(model, guide, (x, y), {}), joints)
    pyro.set_rng_seed(5)
    traces = elbo._get_trace(poutine.scale(model, scale=2.0), poutine.scale(guide, scale=2.0), (x, y), {})
    torch.testing.assert_close(elbo.elbo_terms(*traces, joints), (2 * log_lik, 2 * kl))


def test_a_likelihood_outside_the_members_plate_with_a_member_dim_is_explained():
    """With Pyro's validation on, a likelihood that carries the member dim but is sampled outside the
    members plate fails Pyro's shape check; the error keeps Pyro's message and adds, word for word,
    where a rank-1 model's member dim goes. Any other ValueError passes through unchanged."""
    x, y = data()

    def outside(x, y):
        with pyro.plate("data", N, subsample=torch.arange(B), dim=-1):
            pyro.sample("obs", dist.Categorical(logits=torch.zeros(K, B, 3)), obs=y)

    with pyro.validation_enabled(True), pytest.raises(ValueError) as info:
        AveragedELBO().loss(outside, lambda x, y: None, x, y)
    message = str(info.value)
    assert message.startswith('at site "obs", invalid log_prob shape\n  Expected [6], actual [3, 6]\n')
    assert message.endswith(
        "\nA rank-1 model's sites carry the member dim (K) at dim -2: sample the observations inside the members "
        "plate, e.g. `with rank1_pyro.members(K) as m:` around the likelihood (see the how-to 'Define a model')."
    )

    def failing(x, y):
        raise ValueError("something else")

    with pyro.validation_enabled(True), pytest.raises(ValueError, match="^something else") as info:
        AveragedELBO().loss(failing, lambda x, y: None, x, y)
    assert "rank-1 model" not in str(info.value)  # Pyro adds the trace's shapes, this library nothing
