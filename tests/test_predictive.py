"""The vectorized Monte Carlo predictive against a slow loop, and its uncertainty split."""

import math
import re

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.functional.classification import multiclass_calibration_error

from rank1_pyro import DeltaGuide, Gaussian, HalfCauchy, MixtureGuide, rank1_mlp
from rank1_pyro.inference import Prediction, Rank1Posterior, predict, predictive
from rank1_pyro.inference.predictive import check_pair, evaluate
from rank1_pyro.inference.train import train
from rank1_pyro.layers import Rank1Linear
from rank1_pyro.models import Rank1Model


def test_vectorized_predictive_equals_a_loop_over_samples():
    model = rank1_mlp(4, [8], 3, ensemble_size=2, prior=Gaussian(1.0, HalfCauchy(0.1)))
    guide = MixtureGuide(model, init_scale=0.3)
    posterior = Rank1Posterior(model, guide)
    x = torch.randn(5, 4)
    latents = posterior.sample_latents(x, 6)
    assert latents["net.0.r"].shape == (6, 2, 1, 4) and latents["net.0.r_scale"].shape == (6, 1, 1)
    with pyro.plate("samples", 6, dim=-3):
        vectorized = posterior.outputs_given(x, latents)
    loop = torch.stack([posterior.outputs_given(x, {k: v[s] for k, v in latents.items()}) for s in range(6)])
    torch.testing.assert_close(vectorized, loop)
    # and the draws differ between samples and members (a real Monte Carlo predictive)
    assert not torch.allclose(vectorized[0], vectorized[1]) and not torch.allclose(vectorized[:, 0], vectorized[:, 1])


@pytest.mark.parametrize("max_rows", [1, 25, 10**6])
def test_chunked_evaluation_of_the_draws_equals_one_vectorized_forward(max_rows):
    """max_rows splits the draws into chunks (1 row: one draw at a time; 25 rows: 2 draws of K·B = 10),
    after all S draws are sampled at once: the predictions are the same, hierarchical scales included."""
    model = rank1_mlp(4, [8], 3, ensemble_size=2, prior=Gaussian(1.0, HalfCauchy(0.1)))
    guide = MixtureGuide(model, init_scale=0.3)
    x = torch.randn(5, 4)
    pyro.set_rng_seed(3)
    reference = Rank1Posterior(model, guide, max_rows=10**6).sample_predictions(x, 7)
    pyro.set_rng_seed(3)
    chunked = Rank1Posterior(model, guide, max_rows=max_rows).sample_predictions(x, 7)
    assert chunked.shape == (7, 2, 5, 3)
    torch.testing.assert_close(chunked, reference)
    assert not torch.allclose(chunked[0], chunked[-1])


def test_sample_predictions_shapes_and_probabilities():
    model = rank1_mlp(4, [8], 3, ensemble_size=2)
    guide = MixtureGuide(model)
    probs = Rank1Posterior(model, guide).sample_predictions(torch.randn(5, 4), 7)
    assert probs.shape == (7, 2, 5, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(7, 2, 5))
    assert model.training and guide.training  # eval mode was restored


def test_predict_minibatches_like_one_batch():
    model = rank1_mlp(4, [8], 3, ensemble_size=3)
    guide = DeltaGuide(model)  # deterministic draws: batching must not change anything
    x = torch.randn(23, 4)
    posterior = Rank1Posterior(model, guide)
    one = predict(posterior, x, num_samples=2, batch_size=100)
    many = predict(posterior, x, num_samples=2, batch_size=4)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(23)), batch_size=5)
    from_loader = predict(posterior, loader, num_samples=2)
    torch.testing.assert_close(many.samples, one.samples)
    torch.testing.assert_close(from_loader.samples, one.samples)


def test_uncertainty_split_matches_hand_computation():
    samples = torch.softmax(torch.randn(4, 3, 10, 5), -1)
    p = Prediction(samples, "categorical")
    mix = samples.mean((0, 1))
    total = -(mix * mix.log()).sum(-1)
    expected = -(samples * samples.log()).sum(-1).mean((0, 1))
    torch.testing.assert_close(p.total_entropy, total)
    torch.testing.assert_close(p.expected_entropy, expected)
    torch.testing.assert_close(p.mutual_information, total - expected)
    assert (p.mutual_information >= 0).all()


def test_regression_predictive_uses_the_law_of_total_variance():
    means, variances = torch.randn(6, 2, 4), torch.rand(6, 2, 4)
    p = Prediction(torch.stack([means, variances], -1), "normal")
    torch.testing.assert_close(p.mean, means.mean((0, 1)))
    draws = means.reshape(12, 4)
    torch.testing.assert_close(p.variance, variances.mean((0, 1)) + draws.var(0, unbiased=False))


def test_regression_log_density_is_the_mixture_density_by_hand():
    g = torch.Generator().manual_seed(3)
    means, variances = torch.randn(5, 3, 7, generator=g), torch.rand(5, 3, 7, generator=g) + 0.05
    y = torch.randn(7, generator=g)
    p = Prediction(torch.stack([means, variances], -1), "normal")
    # the average of the 15 component densities, in numpy float64
    m, v, t = means.double().numpy(), variances.double().numpy(), y.double().numpy()
    density = (np.exp(-((t - m) ** 2) / (2 * v)) / np.sqrt(2 * np.pi * v)).mean(axis=(0, 1))
    np.testing.assert_allclose(p.log_density(y).numpy(), np.log(density), rtol=1e-10)
    # one component: the Gaussian log density itself
    single = Prediction(torch.stack([means[:1, :1], variances[:1, :1]], -1), "normal")
    torch.testing.assert_close(
        single.log_density(y),
        torch.distributions.Normal(means[0, 0].double(), variances[0, 0].double().sqrt()).log_prob(y.double()),
    )
    with pytest.raises(ValueError, match=r"targets must have shape \(7,\)"):
        p.log_density(y[:3])
    with pytest.raises(ValueError, match="for regression predictions"):
        Prediction(torch.rand(2, 1, 3, 4), "categorical").log_density(torch.zeros(3))


def test_regression_model_predictive_moments():
    x = torch.linspace(-1, 1, 32)[:, None]
    model = rank1_mlp(1, [8], 1, ensemble_size=2, likelihood="normal")
    guide = MixtureGuide(model)
    samples = Rank1Posterior(model, guide).sample_predictions(x, 3)
    assert samples.shape == (3, 2, 32, 2)
    torch.testing.assert_close(samples[..., 1], torch.full((3, 2, 32), model.noise_scale().item() ** 2))


def test_mixture_nll_is_at_most_the_mean_member_nll():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 2, generator=g)
    y = (x[:, 0] * x[:, 1] > 0).long()
    model = rank1_mlp(2, [16], 2, ensemble_size=4)
    guide = MixtureGuide(model)
    train(model, guide, (x, y), epochs=5, lr=1e-2, progress=False, seed=0)
    prediction = predict(Rank1Posterior(model, guide), x, num_samples=8)
    mixture_nll = -prediction.probs.gather(1, y[:, None]).log().mean()
    member_nll = -prediction.samples.gather(-1, y.expand(8, 4, 200)[..., None]).log().mean()
    assert mixture_nll <= member_nll


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(num_samples=0), ValueError, "num_samples"),
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(data=torch.zeros(0, 4)), ValueError, "non-empty"),
        (dict(posterior=object()), TypeError, "posterior must provide"),
    ],
)
def test_bad_predict_arguments(kwargs, error, match):
    model = rank1_mlp(4, [8], 3, ensemble_size=2)
    args = dict(posterior=Rank1Posterior(model, MixtureGuide(model)), data=torch.randn(3, 4))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        predict(**args)


# ------------------------------------------------------------------------------------------
# Mutation-testing pass (issue #21): the predictive against dense computations and spies
# ------------------------------------------------------------------------------------------
def _guide_draws(guide, x, num_samples, seed):
    """The guide's S draws, traced directly with Pyro (not through the posterior under test)."""
    pyro.set_rng_seed(seed)
    with pyro.plate("samples", num_samples, dim=-3):
        trace = poutine.trace(guide).get_trace(x)
    return {n: s["value"] for n, s in trace.nodes.items() if s["type"] == "sample" and not s["is_observed"]}


def _dense_logits(model, draws, x, first="net.0", last="net.3"):
    """A hand-written forward of Linear -> ReLU -> (Dropout: identity in eval mode) -> Linear, per draw and member:
    ((x ∘ r) Wᵀ) ∘ s + b_k. Returns (S, K, B, C)."""
    lin0, lin1 = model.get_submodule(first), model.get_submodule(last)
    r0, s0, r1, s1 = (draws[f"{first}.r"], draws[f"{first}.s"], draws[f"{last}.r"], draws[f"{last}.s"])
    S, K = r0.shape[:2]
    out = torch.empty(S, K, x.shape[0], lin1.out_features, dtype=torch.float64)
    for s in range(S):
        for k in range(K):
            h = torch.relu(((x * r0[s, k, 0]) @ lin0.weight.T) * s0[s, k, 0] + lin0.bias[k])
            out[s, k] = (((h * r1[s, k, 0]) @ lin1.weight.T) * s1[s, k, 0] + lin1.bias[k]).double()
    return out


def _dropout_model(flat_batch=False, likelihood="categorical", out=3):
    net = torch.nn.Sequential(
        Rank1Linear(4, 8, ensemble_size=2), torch.nn.ReLU(), torch.nn.Dropout(0.5), Rank1Linear(8, out, ensemble_size=2)
    )
    return Rank1Model(net, likelihood=likelihood, flat_batch=flat_batch)


@pytest.mark.parametrize("flat_batch, max_rows", [(False, 8192), (True, 20)])  # 20 rows: 2 chunks of 2 draws
def test_monte_carlo_predictive_equals_a_dense_forward_in_eval_mode(flat_batch, max_rows):
    """The dropout layer must be off (eval mode) in the predictive; in training mode half the units vanish."""
    model = _dropout_model(flat_batch)
    guide = MixtureGuide(model, init_scale=0.3)
    x = torch.randn(5, 4)
    with torch.no_grad():
        expected = torch.log_softmax(_dense_logits(model, _guide_draws(guide, x, 4, seed=1), x), -1)
    posterior = Rank1Posterior(model, guide, max_rows=max_rows)
    pyro.set_rng_seed(1)
    torch.testing.assert_close(posterior.sample_log_predictions(x, 4).double(), expected, rtol=1e-5, atol=1e-5)
    pyro.set_rng_seed(1)
    torch.testing.assert_close(posterior.sample_predictions(x, 4).double(), expected.exp(), rtol=1e-5, atol=1e-6)
    pyro.set_rng_seed(1)
    prediction = predict(posterior, x, num_samples=4)
    assert prediction.likelihood == "categorical"
    torch.testing.assert_close(prediction.log_samples.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(prediction.samples.double(), expected.exp(), rtol=1e-5, atol=1e-6)
    assert model.training and guide.training  # the modes are restored


def test_regression_predict_equals_a_dense_forward_and_the_law_of_total_variance():
    model = _dropout_model(likelihood="normal", out=1)
    guide = DeltaGuide(model)
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(0.3 * torch.randn_like(p))  # members differ
    x = torch.randn(6, 4)
    with torch.no_grad():
        means = _dense_logits(model, _guide_draws(guide, x, 3, seed=2), x).squeeze(-1)  # (S, K, B)
    noise = model.noise_scale().item() ** 2
    prediction = predict(Rank1Posterior(model, guide), x, num_samples=3)
    assert prediction.likelihood == "normal" and prediction.log_samples is None
    torch.testing.assert_close(prediction.samples[..., 0].double(), means, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(prediction.samples[..., 1], torch.full((3, 2, 6), noise))
    member = means[0]  # point masses: every draw the same
    torch.testing.assert_close(prediction.mean.double(), member.mean(0), rtol=1e-5, atol=1e-6)
    total = noise + ((member - member.mean(0)) ** 2).mean(0)
    torch.testing.assert_close(prediction.variance.double(), total, rtol=1e-5, atol=1e-6)


def test_predict_stays_in_log_space_where_probabilities_underflow():
    model = _dropout_model()
    guide = DeltaGuide(model)
    with torch.no_grad():
        model.net[3].weight.mul_(2000.0)  # logits hundreds apart: float32 probabilities underflow to 0
    x = torch.randn(5, 4)
    with torch.no_grad():
        log_p = torch.log_softmax(_dense_logits(model, _guide_draws(guide, x, 2, seed=0), x), -1)
    prediction = predict(Rank1Posterior(model, guide), x, num_samples=2)
    assert (prediction.probs == 0).any()
    expected = torch.logsumexp(log_p.flatten(0, 1), 0) - math.log(4)
    assert torch.isfinite(prediction.log_probs).all()
    torch.testing.assert_close(prediction.log_probs, expected, rtol=1e-4, atol=1e-3)


class _ShiftModel(torch.nn.Module):
    """A model with one latent shift z of the logits and no ``ensemble_size`` (K = 1): logits = x W + z."""

    likelihood = "categorical"

    def __init__(self, features=4, classes=3):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(features, classes))

    def outputs(self, x):
        z = pyro.sample("z", dist.Normal(torch.zeros(self.w.shape[1]), 1.0).to_event(1))
        out = x @ self.w + z  # z: (S, 1, 1, C) under the samples plate, (C,) alone
        return out if out.dim() >= 3 else out.unsqueeze(0)


def _shift_guide(x):
    pyro.sample("z", dist.Normal(torch.tensor([0.5, -0.5, 0.0]), 0.1).to_event(1))


def _chunk_sizes(posterior, x, num_samples):
    sizes, inner = [], posterior.outputs_given

    def spy(x, latents):
        sizes.append({name: v.shape[0] for name, v in latents.items() if v.dim() == 4})
        return inner(x, latents)

    posterior.outputs_given = spy
    posterior.sample_outputs(x, num_samples)
    return [sorted(set(s.values())) for s in sizes]


def test_draws_are_evaluated_in_chunks_of_at_most_max_rows():
    model = rank1_mlp(4, [8], 3, ensemble_size=2)
    guide = MixtureGuide(model)
    x = torch.randn(5, 4)  # K·B = 10 rows per draw
    assert _chunk_sizes(Rank1Posterior(model, guide, max_rows=25), x, 7) == [[2], [2], [2], [1]]
    assert _chunk_sizes(Rank1Posterior(model, guide, max_rows=1), x, 3) == [[1], [1], [1]]  # at least one draw
    assert _chunk_sizes(Rank1Posterior(model, guide, max_rows=40), x, 7) == [[4], [3]]
    assert Rank1Posterior(model, guide).max_rows == 8192
    # without ensemble_size a model has one member: B = 5 rows per draw
    shift = Rank1Posterior(_ShiftModel(), _shift_guide, max_rows=10)
    assert _chunk_sizes(shift, x, 5) == [[2], [2], [1]]
    pyro.set_rng_seed(3)
    draws = _guide_draws(_shift_guide, x, 5, seed=3)["z"]
    pyro.set_rng_seed(3)
    out = shift.sample_outputs(x, 5)
    assert draws.shape == (5, 1, 1, 3)
    torch.testing.assert_close(out, (x @ shift.model.w + draws[:, :, 0]).unsqueeze(1).detach())  # (S, K=1, B, C)


def test_the_guide_is_called_with_the_batch():
    model = rank1_mlp(4, [8], 3, ensemble_size=2)
    inner, seen = MixtureGuide(model), []

    def guide(x):
        seen.append(x)
        return inner(x)

    x = torch.randn(5, 4)
    posterior = Rank1Posterior(model, guide)
    posterior.sample_latents(x, 2)
    posterior.sample_predictions(x, 2)
    assert len(seen) == 2 and all(s is x for s in seen)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda p, x: Rank1Posterior(p.model, p.guide, max_rows=0), "max_rows must be an integer >= 1, got 0"),
        (lambda p, x: p.sample_latents(x, 0), "num_samples must be an integer >= 1, got 0"),
        (lambda p, x: predict(p, x, num_samples=0), "num_samples must be an integer >= 1, got 0"),
        (lambda p, x: predict(p, x, batch_size=0), "batch_size must be an integer >= 1, got 0"),
        (lambda p, x: predict(p, torch.tensor(1.0)), "data must be a non-empty batch (N, ...), got shape ()"),
        (lambda p, x: predict(p, []), "data is empty"),
    ],
)
def test_argument_messages(call, message):
    model = rank1_mlp(4, [8], 3, ensemble_size=2)
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        call(Rank1Posterior(model, MixtureGuide(model)), torch.randn(3, 4))


def test_predict_refuses_what_is_not_a_posterior_by_type_name():
    with pytest.raises(TypeError, match=r"sample_predictions\(x, num_samples\), got object$"):
        predict(object(), torch.randn(3, 4))


class _Recorder:
    """A posterior that records what predict hands it: (device, dtype, shape, num_samples) per call."""

    def __init__(self, likelihood="normal", **modules):
        self.likelihood, self.calls = likelihood, []
        for name, module in modules.items():
            setattr(self, name, module)

    def sample_predictions(self, x, num_samples):
        self.calls.append((x.device.type, x.dtype, tuple(x.shape), num_samples))
        b = x.shape[0]
        value = torch.arange(b, dtype=torch.float32) if x.device.type == "cpu" else torch.zeros(b)
        if self.likelihood == "categorical":
            return torch.full((num_samples, 1, b, 2), 0.5)
        return torch.stack([value, torch.ones(b)], -1).expand(num_samples, 1, b, 2)


class _OnDevice(_Recorder):
    def __init__(self, device, **kwargs):
        super().__init__(**kwargs)
        self.device = torch.device(device)


def test_predict_defaults_batches_and_inputs():
    rec = _Recorder()
    out = predict(rec, torch.randn(300, 2))  # 32 samples, batches of 256
    assert [c[2:] for c in rec.calls] == [((256, 2), 32), ((44, 2), 32)] and out.samples.shape == (32, 1, 300, 2)
    assert all(c[:2] == ("cpu", torch.float32) for c in rec.calls)  # no module: no dtype, the CPU
    rec = _Recorder()
    one_d = predict(rec, torch.arange(5.0), num_samples=2, batch_size=2)  # 1-D data: N scalar inputs
    assert [c[2] for c in rec.calls] == [(2,), (2,), (1,)]
    torch.testing.assert_close(one_d.mean, torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0]))
    x = torch.randn(7, 2)
    whole = predict(_Recorder(), x, num_samples=2)
    from_list = predict(_Recorder(), [x[:3], x[3:]], num_samples=2)  # an iterable of plain input batches
    assert from_list.samples.shape == whole.samples.shape
    rec = _Recorder()
    predict(rec, [x[:3], x[3:]], num_samples=2)
    assert [c[2] for c in rec.calls] == [(3, 2), (4, 2)]
    rec = _Recorder()
    predict(rec, x.numpy(), num_samples=2, batch_size=4)  # numpy: as a tensor
    assert [c[1:3] for c in rec.calls] == [(torch.float32, (4, 2)), (torch.float32, (3, 2))]
    rec = _Recorder(likelihood="categorical")  # no sample_log_predictions: probabilities, no log space
    p = predict(rec, x, num_samples=2)
    assert p.log_samples is None and p.likelihood == "categorical"
    torch.testing.assert_close(p.log_probs, torch.full((7, 2), math.log(0.5), dtype=torch.float64))


@pytest.mark.parametrize("attribute", ["model", "net", "network"])
def test_predict_casts_floating_inputs_to_the_networks_dtype(attribute):
    rec = _Recorder(**{attribute: torch.nn.Linear(2, 1).double()})
    predict(rec, torch.randn(3, 2), num_samples=1)
    predict(rec, torch.arange(6).reshape(3, 2), num_samples=1)  # integer inputs (token ids) are kept
    assert [c[1] for c in rec.calls] == [torch.float64, torch.int64]


def test_predict_moves_batches_to_the_posteriors_or_the_given_device():
    net = torch.nn.Linear(2, 1).double()
    rec = _OnDevice("meta", net=net)
    predict(rec, torch.randn(3, 2), num_samples=1)  # the posterior's device (meta: no computation needed)
    predict(rec, torch.arange(6).reshape(3, 2), num_samples=1)
    assert [c[:2] for c in rec.calls] == [("meta", torch.float64), ("meta", torch.int64)]
    rec = _OnDevice("cpu")
    predict(rec, torch.randn(3, 2), num_samples=1, device=torch.device("meta"))  # the argument wins
    predict(rec, torch.randn(3, 2), num_samples=1)
    assert [c[0] for c in rec.calls] == ["meta", "cpu"]
    rec = _Recorder()  # no device attribute: the CPU
    predict(rec, torch.randn(3, 2), num_samples=1)
    assert rec.calls[0][0] == "cpu"


def test_device_of_modules_without_parameters_is_the_cpu():
    assert predictive._device_of(torch.nn.ReLU(), object()) == torch.device("cpu")
    assert predictive._device_of(object(), torch.nn.Linear(2, 2).to("meta")) == torch.device("meta")


@pytest.mark.parametrize(
    "data, message",
    [
        (np.array([object(), object()]), "data: cannot use a numpy array of dtype object"),
        ([np.array([object()])], "data: cannot use a numpy array of dtype object"),
        (["ab"], "data: every batch must be a tensor or numpy array of inputs, got str"),
    ],
)
def test_predict_names_inputs_it_cannot_use(data, message):
    with pytest.raises(TypeError, match="^" + re.escape(message)):
        predict(_Recorder(), data, num_samples=1)


# ------------------------------------------------------------------------------------------
# check_pair: the (x, y) check of train and evaluate
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "data, name, error, message",
    [
        ([torch.zeros(2)], "data", TypeError, "data must be a DataLoader or a pair of tensors (x, y), got list "),
        (np.zeros((2, 3)), "data", TypeError, "data must be a DataLoader or a pair of tensors (x, y), got ndarray "),
        ((torch.zeros(2),) * 3, "val_data", TypeError, "val_data must be a DataLoader or a pair of tensors (x, y), "),
        (([1, 2], [3, 4]), "data", TypeError, "got tuple (numpy arrays are accepted as tensors)"),
        (
            (torch.tensor(1.0), torch.zeros(1)),
            "data",
            ValueError,
            "x and y need a leading example dim, got shapes () and (1,)",
        ),
        (
            (torch.zeros(2), torch.tensor(1)),
            "val_data",
            ValueError,
            "x and y of val_data need a leading example dim, got shapes (2,) and ()",
        ),
        ((torch.zeros(3, 2), torch.zeros(4)), "data", ValueError, "x and y have different numbers of examples: 3 vs 4"),
        ((torch.zeros(0, 2), torch.zeros(0)), "data", ValueError, "the data set is empty"),
        ((torch.zeros(0, 2), torch.zeros(0)), "val_data", ValueError, "the data set of val_data is empty"),
        (
            (torch.tensor([[0.0, 1.0], [0.0, float("nan")], [0.0, 0.0], [float("inf"), 0.0]]), torch.zeros(4)),
            "data",
            ValueError,
            "x contains NaN or infinite values (2 examples, the first at index 1)",
        ),
        (
            (torch.zeros(3, 4), torch.tensor([0.0, 0.0, float("nan")])),
            "test_data",
            ValueError,
            "y of test_data contains NaN or infinite values (1 examples, the first at index 2)",
        ),
        (
            (np.array([object()]), np.zeros(1)),
            "val_data",
            TypeError,
            "val_data: cannot use a numpy array of dtype object",
        ),
    ],
)
def test_check_pair_messages(data, name, error, message):
    with pytest.raises(error, match=re.escape(message)):
        check_pair(data, name)


def test_check_pair_accepts_numpy_one_dim_and_single_example_data():
    x, y = check_pair((np.ones((2, 3), dtype=np.float32), np.array([0, 1])))
    assert torch.is_tensor(x) and x.shape == (2, 3) and y.tolist() == [0, 1]
    x, y = check_pair((torch.arange(3.0), torch.arange(3)))  # 1-D inputs
    assert x.shape == (3,)
    x, y = check_pair([torch.zeros(1, 0), torch.zeros(1)])  # one example, no features
    assert x.shape == (1, 0)
    x, _ = check_pair((torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, float("nan")]])[:1], torch.zeros(1)))
    assert x.shape == (1, 4)
    with pytest.raises(ValueError, match=r"x contains NaN or infinite values \(1 examples, the first at index 3\)"):
        check_pair((torch.tensor([[0.0] * 3] * 3 + [[0.0, 0.0, float("inf")]]), torch.zeros(4)))


# ------------------------------------------------------------------------------------------
# evaluate: the training loop's validation metrics
# ------------------------------------------------------------------------------------------
class _Deterministic(torch.nn.Module):
    """A network without latent variables (one member): evaluate with guide=None."""

    likelihood = "categorical"
    ensemble_size = 1

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def outputs(self, x):
        return self.lin(x).unsqueeze(-3)


def test_evaluate_a_deterministic_network_against_dense_metrics():
    model = _Deterministic()
    with torch.no_grad():
        model.lin.bias.copy_(torch.tensor([0.0, 0.0, -200.0]))  # class 2 underflows in float32
    g = torch.Generator().manual_seed(9)
    x = torch.randn(40, 4, generator=g)
    y = torch.randint(0, 3, (40,), generator=g)
    y[0] = 2
    logits = model.lin(x).detach().double()
    probs = torch.softmax(logits, -1)
    expected = {
        "accuracy": (logits.argmax(-1) == y).double().mean().item(),
        "nll": torch.nn.functional.cross_entropy(logits, y).item(),
        "ece": multiclass_calibration_error(probs, y, num_classes=3, n_bins=15, norm="l1").item(),
        "brier": ((probs - torch.eye(3, dtype=torch.float64)[y]) ** 2).sum(-1).mean().item(),
    }
    for data in [(x, y), DataLoader(TensorDataset(x, y), batch_size=16)]:
        got = evaluate(model, None, data, num_samples=2)
        assert list(got) == list(expected)
        for key in expected:
            assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key


def test_evaluate_a_regression_model_against_the_mixture_moments():
    model = _dropout_model(likelihood="normal", out=1)
    guide = DeltaGuide(model)
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x, y = torch.randn(30, 4), torch.randn(30)
    with torch.no_grad():
        member = _dense_logits(model, _guide_draws(guide, x, 1, seed=0), x)[0, :, :, 0]  # (K, B)
    mean = member.mean(0)
    var = model.noise_scale().item() ** 2 + ((member - mean) ** 2).mean(0)
    got = evaluate(model, guide, (x, y))
    assert list(got) == ["rmse", "nll"]
    assert got["rmse"] == pytest.approx(((mean - y) ** 2).mean().sqrt().item(), rel=1e-5)
    nll = -torch.distributions.Normal(mean, var.sqrt()).log_prob(y.double()).mean().item()
    assert got["nll"] == pytest.approx(nll, rel=1e-5)


def test_evaluate_passes_its_settings_to_predict(monkeypatch):
    calls, inner = [], predictive.predict

    def spy(posterior, data, **kwargs):
        calls.append((posterior.model, posterior.guide, data.shape, kwargs))
        return inner(posterior, data, **kwargs)

    monkeypatch.setattr(predictive, "predict", spy)
    model = rank1_mlp(4, [8], 3, ensemble_size=2)
    guide = DeltaGuide(model)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    evaluate(model, guide, (x, y))
    evaluate(model, guide, (x, y), num_samples=3, batch_size=4, device=torch.device("cpu"))
    assert calls[0][:3] == (model, guide, (6, 4))
    assert calls[0][3] == dict(num_samples=8, batch_size=512, device=None)
    assert calls[1][3] == dict(num_samples=3, batch_size=4, device=torch.device("cpu"))
    evaluate(model, None, (x, y))
    assert calls[2][1] is predictive.empty_guide


def test_as_tensor_shares_numpy_memory_and_names_the_argument():
    a = np.arange(6.0).reshape(2, 3)[:, ::2]  # not contiguous: copied once, then a tensor
    t = predictive.as_tensor(a)
    assert torch.is_tensor(t) and t.tolist() == [[0.0, 2.0], [3.0, 5.0]]
    b = np.zeros(3)
    predictive.as_tensor(b)[0] = 7.0  # a contiguous array is shared, not copied
    assert b[0] == 7.0
    with pytest.raises(TypeError, match=r"^data: cannot use a numpy array of dtype object"):
        predictive.as_tensor(np.array([object()]))
    with pytest.raises(TypeError, match=r"^labels: cannot use a numpy array of dtype object"):
        predictive.as_tensor(np.array([object()]), "labels")
    assert predictive.as_tensor([1, 2]) == [1, 2]  # anything else as it is


def test_floating_dtype_is_that_of_the_first_floating_point_parameter():
    """Modules without parameters, and integer parameters, are skipped; ``None`` when there is none."""
    from rank1_pyro.inference.predictive import floating_dtype

    counter = nn.Module()
    counter.count = nn.Parameter(torch.zeros(1, dtype=torch.int64), requires_grad=False)
    counter.weight = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    assert floating_dtype(nn.Identity(), "not a module", counter, nn.Linear(1, 1)) == torch.float64
    assert floating_dtype(nn.Identity(), nn.Linear(1, 1).half()) == torch.float16
    assert floating_dtype(nn.Identity(), print) is None


def test_log_predictions_are_for_classification_only():
    model = rank1_mlp(1, [8], 1, ensemble_size=2, likelihood="normal")
    with pytest.raises(ValueError, match="sample_log_predictions: only for likelihood='categorical'"):
        Rank1Posterior(model, MixtureGuide(model)).sample_log_predictions(torch.zeros(3, 1), 2)
