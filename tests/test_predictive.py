"""The vectorized Monte Carlo predictive against a slow loop, and its uncertainty split."""

import pyro
import pytest
import torch

from rank1_pyro import DeltaGuide, Gaussian, HalfCauchy, MixtureGuide, rank1_mlp
from rank1_pyro.inference import Prediction, Rank1Posterior, predict
from rank1_pyro.inference.train import train


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
