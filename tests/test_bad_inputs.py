"""Bad input anywhere in the public API gives one clear error, and never a half-written file.

One table per entry point (layers, priors, guides, objectives, model, train, predict, metrics,
data, configs, checkpoints, CLI); each row asserts the message with ``match=``. Then the
numerical guards: factors clipped to [-10, 10] whatever the prior or guide draws.
"""

import math
import re

import pyro
import pyro.poutine as poutine
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rank1_pyro import (
    AveragedELBO,
    Cauchy,
    CauchyGuide,
    Gaussian,
    HalfCauchy,
    MixtureELBO,
    MixtureGuide,
    PriorMap,
    Rank1Conv2d,
    Rank1Linear,
    Rank1LSTM,
    Rank1Model,
    make_prior,
    metrics,
    rank1_mlp,
    set_prior,
)
from rank1_pyro.cli import main
from rank1_pyro.config import RunConfig, load_config
from rank1_pyro.data import corrupt, load_dataset, rotate, to_loader
from rank1_pyro.inference.checkpoint import read_checkpoint
from rank1_pyro.inference.predictive import Rank1Posterior, predict
from rank1_pyro.inference.train import train
from rank1_pyro.layers import FACTOR_CLIP


def model(likelihood="categorical", out=2):
    return rank1_mlp(2, [4], out, ensemble_size=2, likelihood=likelihood)


X = torch.randn(4, 2)
Y = torch.tensor([0, 1, 1, 0])


def with_nan(t, row=1):
    t = t.clone()
    t[row, 0] = float("nan")
    return t


def call_model(x, y=None, **kwargs):
    m = model(**kwargs)
    return m(x, y)


def set_num_data(value, batch=None):
    m = model()
    m.num_data = value
    return m(X[:batch] if batch else X, Y[:batch] if batch else Y)


def posterior():
    m = model()
    return Rank1Posterior(m, MixtureGuide(m))


def cifar_config(**changes):
    return RunConfig(**{"name": "x", "dataset": "cifar10", "model": "resnet20_cifar", "num_classes": 10, **changes})


P = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
L = torch.tensor([0, 1, 1])

# (id, thunk, error, match), one row per bad input
CASES = [
    # layers
    (
        "layer-zero-features",
        lambda: Rank1Linear(0, 3),
        ValueError,
        r"Rank1Linear: in_features must be an integer >= 1, got 0",
    ),
    (
        "layer-float-features",
        lambda: Rank1Linear(2, 1.5),
        ValueError,
        r"Rank1Linear: out_features must be an integer >= 1, got 1\.5",
    ),
    (
        "conv-negative-channels",
        lambda: Rank1Conv2d(-1, 4, 3),
        ValueError,
        r"Rank1Conv2d: in_channels must be an integer >= 1, got -1",
    ),
    ("conv-groups", lambda: Rank1Conv2d(3, 4, 3, groups=2), ValueError, r"divisible by groups=2"),
    ("lstm-hidden", lambda: Rank1LSTM(3, 0), ValueError, r"Rank1LSTM: hidden_size must be an integer >= 1, got 0"),
    (
        "layer-ensemble-size",
        lambda: Rank1Linear(2, 3, ensemble_size=0),
        ValueError,
        r"ensemble_size must be an integer >= 1, got 0",
    ),
    ("layer-prior-string", lambda: Rank1Linear(2, 3, prior="gaussian"), ValueError, r"prior: expected a prior spec"),
    (
        "layer-int-input",
        lambda: Rank1Linear(2, 3)(torch.ones(4, 2, 3, 2, dtype=torch.long)),
        TypeError,
        r"Rank1Linear: expected a floating-point tensor, got torch.int64",
    ),
    (
        "layer-wrong-features",
        lambda: Rank1Linear(2, 3)(torch.randn(4, 5, 3)),
        ValueError,
        r"with in_features=2, got \(4, 5, 3\)",
    ),
    (
        "layer-member-dim",
        lambda: Rank1Linear(2, 3, ensemble_size=4)(torch.randn(3, 5, 2)),
        ValueError,
        r"must be the member dim \(size 1 or K=4\)",
    ),
    (
        "flat-batch-not-a-tiling-of-K",
        lambda: Rank1Linear(2, 3, ensemble_size=4)(torch.randn(6, 2)),
        ValueError,
        r"flat input of 6 rows is not a tiling of the factors' leading dims \(4,\)",
    ),
    # priors
    (
        "prior-negative-scale",
        lambda: Gaussian(scale=-1.0),
        ValueError,
        r"Gaussian: scale must be a positive finite number, got -1\.0",
    ),
    ("prior-nan-loc", lambda: Cauchy(loc=math.nan), ValueError, r"Cauchy: loc must be a finite number, got nan"),
    ("prior-string-scale", lambda: Gaussian(scale="0.1"), ValueError, r"Gaussian: scale must be a number, got '0\.1'"),
    ("hyperprior-zero", lambda: HalfCauchy(0.0), ValueError, r"HalfCauchy: scale must be a positive finite number"),
    (
        "prior-unknown-family",
        lambda: make_prior("laplace"),
        ValueError,
        r"prior family: unknown name 'laplace'; valid: \['cauchy', 'gaussian', 'normal'\]",
    ),
    (
        "prior-unknown-scale-family",
        lambda: make_prior("gaussian", scale={"family": "gamma"}),
        ValueError,
        r"prior scale family: unknown name 'gamma'",
    ),
    ("priormap-bad-default", lambda: PriorMap("cauchy"), ValueError, r"PriorMap: default must be a prior spec"),
    (
        "prior-override-typo",
        lambda: set_prior(model().net, PriorMap(Gaussian(), {"nett.*": Cauchy()})),
        ValueError,
        r"prior override 'nett\.\*' matches no factor site",
    ),
    # guides
    (
        "guide-init-scale",
        lambda: MixtureGuide(model(), init_scale=0.0),
        ValueError,
        r"init_scale must be > 0, got 0\.0",
    ),
    (
        "guide-sign-prob",
        lambda: MixtureGuide(model(), init_sign_prob=1.5),
        ValueError,
        r"init_sign_prob must be in \[0, 1\] or None, got 1\.5",
    ),
    (
        "guide-no-rank1-layers",
        lambda: CauchyGuide(nn.Linear(2, 2)),
        ValueError,
        r"CauchyGuide: the model has no rank-1 layers",
    ),
    (
        "guide-scale-guide",
        lambda: MixtureGuide(model(), scale_guide="gamma"),
        ValueError,
        r"scale_guide: unknown name 'gamma'",
    ),
    # objectives
    (
        "elbo-estimator",
        lambda: MixtureELBO(estimator="sample"),
        ValueError,
        r"estimator: unknown name 'sample'; valid: \['member', 'example', 'split'\]",
    ),
    (
        "elbo-particles",
        lambda: AveragedELBO(num_particles=0),
        ValueError,
        r"num_particles must be an integer >= 1, got 0",
    ),
    (
        "elbo-kl-weight-negative",
        lambda: MixtureELBO(kl_weight=-1),
        ValueError,
        r"kl_weight must be a finite number >= 0, got -1",
    ),
    (
        "elbo-kl-weight-nan",
        lambda: AveragedELBO(kl_weight=float("nan")),
        ValueError,
        r"kl_weight must be a finite number >= 0, got nan",
    ),
    # model
    (
        "model-likelihood",
        lambda: rank1_mlp(2, [4], 2, likelihood="poisson"),
        ValueError,
        r"likelihood: unknown name 'poisson'",
    ),
    (
        "model-net-not-module",
        lambda: Rank1Model("mlp"),
        TypeError,
        r"Rank1Model: net must be a torch\.nn\.Module, got str",
    ),
    (
        "model-K-mismatch",
        lambda: Rank1Model(nn.Sequential(Rank1Linear(2, 2, ensemble_size=4)), ensemble_size=2),
        ValueError,
        r"ensemble_size=2 but the rank-1 layers have sizes \{4\}",
    ),
    (
        "model-hidden-size",
        lambda: rank1_mlp(2, [0], 2),
        ValueError,
        r"layer sizes must be positive integers, got \[2, 0, 2\]",
    ),
    ("model-nan-x", lambda: call_model(with_nan(X), Y), ValueError, r"x contains NaN or infinite values"),
    (
        "model-labels-range",
        lambda: call_model(X, torch.tensor([0, 1, 2, 0])),
        ValueError,
        r"labels out of range: expected 0\.\.1, got min 0, max 2",
    ),
    (
        "model-float-labels",
        lambda: call_model(X, Y.float()),
        TypeError,
        r"y must hold integer class labels, got dtype torch\.float32",
    ),
    ("model-label-shape", lambda: call_model(X, Y[:3]), ValueError, r"y must have shape \(4,\) to match x, got \(3,\)"),
    ("model-empty-x", lambda: call_model(torch.randn(0, 2)), ValueError, r"x must be a non-empty batch"),
    ("model-not-tensor", lambda: call_model([[1.0, 2.0]]), TypeError, r"x must be a tensor, got list"),
    (
        "model-normal-width",
        lambda: call_model(X, torch.randn(4), likelihood="normal", out=2),
        ValueError,
        r"likelihood='normal' needs one output per example",
    ),
    ("model-num-data-zero", lambda: set_num_data(0), ValueError, r"num_data must be a positive integer or None, got 0"),
    ("model-num-data-below-batch", lambda: set_num_data(2), ValueError, r"num_data=2 is smaller than the batch size 4"),
    # predict
    (
        "predict-num-samples",
        lambda: predict(posterior(), X, num_samples=0),
        ValueError,
        r"num_samples must be an integer >= 1, got 0",
    ),
    (
        "predict-batch-size",
        lambda: predict(posterior(), X, batch_size=0),
        ValueError,
        r"batch_size must be an integer >= 1, got 0",
    ),
    (
        "predict-not-posterior",
        lambda: predict(object(), X),
        TypeError,
        r"posterior must provide likelihood and sample_predictions",
    ),
    ("predict-empty", lambda: predict(posterior(), torch.randn(0, 2)), ValueError, r"data must be a non-empty batch"),
    (
        "predict-wrong-features",
        lambda: predict(posterior(), torch.randn(5, 3), num_samples=2),
        ValueError,
        r"Rank1Linear: expected input of shape .* in_features=2",
    ),
    # metrics
    (
        "metrics-probs-1d",
        lambda: metrics.accuracy(P[:, 0], L),
        ValueError,
        r"probs must have shape \(N, C\), got \(3,\)",
    ),
    (
        "metrics-labels-range",
        lambda: metrics.nll(P, torch.tensor([0, 1, 2])),
        ValueError,
        r"labels out of range 0\.\.1",
    ),
    (
        "metrics-float-labels",
        lambda: metrics.accuracy(P, L.float()),
        TypeError,
        r"labels must be integer class indices, got dtype torch\.float32",
    ),
    ("metrics-nan-probs", lambda: metrics.nll(with_nan(P), L), ValueError, r"probs contains NaN or infinite values"),
    ("metrics-ece-bins", lambda: metrics.ece(P, L, num_bins=0), ValueError, r"num_bins must be an integer >= 1, got 0"),
    (
        "metrics-level",
        lambda: metrics.interval_coverage(torch.zeros(2), torch.ones(2), torch.zeros(2), level=1.5),
        ValueError,
        r"level must be in \(0, 1\), got 1\.5",
    ),
    (
        "metrics-ood-empty",
        lambda: metrics.ood_auroc(torch.tensor([]), torch.tensor([1.0])),
        ValueError,
        r"at least one in- and one out-of-distribution score",
    ),
    ("metrics-member-probs", lambda: metrics.disagreement(P), ValueError, r"member_probs must have shape \(K, N, C\)"),
    # data
    ("data-unknown-name", lambda: load_dataset("cifar11"), ValueError, r"unknown dataset 'cifar11'; valid names:"),
    (
        "data-loader-batch",
        lambda: to_loader(X, Y, batch_size=0),
        ValueError,
        r"batch_size must be a positive int, got 0",
    ),
    ("data-rotate-vectors", lambda: rotate(X, 30), ValueError, r"rotate expects a float image batch \(N, C, H, W\)"),
    (
        "data-corruption-kind",
        lambda: corrupt(torch.rand(2, 1, 8, 8), "fog2", 1),
        ValueError,
        r"unknown corruption kind 'fog2'",
    ),
    (
        "data-severity",
        lambda: corrupt(torch.rand(2, 1, 8, 8), "contrast", 6),
        ValueError,
        r"severity must be one of 1, 2, 3, 4, 5, got 6",
    ),
    # configs
    (
        "config-batch-below-K",
        lambda: cifar_config(ensemble_size=8, per_core_batch_size=4),
        ValueError,
        r"per_core_batch_size \(4\) counts tiled rows and must be >= ensemble_size \(8\)",
    ),
    ("config-unknown-model", lambda: cifar_config(model="vgg16"), ValueError, r"model: unknown name 'vgg16'"),
    (
        "config-split-mixture",
        lambda: cifar_config(objective="mixture", estimator="split"),
        ValueError,
        r"estimator 'split' gives each member different examples; objective 'mixture'",
    ),
    # checkpoints
    (
        "checkpoint-missing",
        lambda: read_checkpoint("/nonexistent/run/checkpoint.pt"),
        FileNotFoundError,
        r"no checkpoint file at /nonexistent/run/checkpoint\.pt",
    ),
]


@pytest.mark.parametrize("thunk, error, match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clear_error(thunk, error, match):
    with pytest.raises(error, match=match):
        thunk()


# ------------------------------------------------------------------------------------------
# train: every bad input fails before anything is written
# ------------------------------------------------------------------------------------------
XT = torch.randn(32, 2)
YT = (XT[:, 0] > 0).long()

TRAIN_CASES = [
    (
        "nan-x",
        dict(data=(with_nan(XT, 3), YT)),
        ValueError,
        r"x contains NaN or infinite values \(1 examples, the first at index 3\)",
    ),
    (
        "inf-regression-y",
        dict(data=(XT, torch.full((32,), math.inf)), likelihood="normal"),
        ValueError,
        r"y contains NaN or infinite values",
    ),
    (
        "labels-out-of-range",
        dict(data=(XT, YT + 4)),
        ValueError,
        r"labels out of range: expected 0\.\.1, got min 4, max 5",
    ),
    ("float-labels", dict(data=(XT, YT.float())), TypeError, r"y must hold integer class labels"),
    (
        "wrong-input-width",
        dict(data=(torch.randn(32, 5), YT)),
        ValueError,
        r"Rank1Linear: expected input of shape .* in_features=2, got \(2, 1, 5\)",
    ),
    ("scalar-data", dict(data=(torch.tensor(1.0), YT)), ValueError, r"x and y need a leading example dim"),
    (
        "val-data-mismatch",
        dict(val_data=(XT, YT[:5])),
        ValueError,
        r"x and y of val_data have different numbers of examples: 32 vs 5",
    ),
    ("val-data-nan", dict(val_data=(with_nan(XT), YT)), ValueError, r"x of val_data contains NaN or infinite values"),
    (
        "val-data-type",
        dict(val_data=XT),
        TypeError,
        r"val_data must be a DataLoader or a pair of tensors \(x, y\), got Tensor",
    ),
    ("lr-inf", dict(lr=math.inf), ValueError, r"lr must be > 0, got inf"),
    ("momentum", dict(momentum=-0.5), ValueError, r"momentum must be >= 0, got -0\.5"),
    ("weight-decay", dict(weight_decay=math.nan), ValueError, r"weight_decay must be a finite number, got nan"),
    ("decay-rate", dict(decay_rate=0.0), ValueError, r"decay_rate must be > 0, got 0\.0"),
    ("decay-epochs", dict(decay_epochs="10"), ValueError, r"decay_epochs must be a sequence of epochs, got '10'"),
    ("eval-samples", dict(eval_samples=0), ValueError, r"eval_samples must be >= 1, got 0"),
    ("seed", dict(seed=-1), ValueError, r"seed must be an integer >= 0 or None, got -1"),
    ("checkpoint-every", dict(checkpoint_every=0), ValueError, r"checkpoint_every must be >= 1, got 0"),
    ("resume-type", dict(resume="yes"), ValueError, r"resume must be True or False, got 'yes'"),
    ("distributed-mode", dict(distributed="yes"), ValueError, r"distributed must be False, True or 'auto', got 'yes'"),
    ("device", dict(device="tpu9"), ValueError, r"device"),
    ("objective", dict(objective=42), TypeError, r"objective must be a name or a Pyro ELBO, got int"),
]


@pytest.mark.parametrize("kwargs, error, match", [c[1:] for c in TRAIN_CASES], ids=[c[0] for c in TRAIN_CASES])
def test_bad_training_input_writes_nothing(tmp_path, kwargs, error, match):
    kwargs = dict(kwargs)
    likelihood = kwargs.pop("likelihood", "categorical")
    m = model(likelihood, out=1 if likelihood == "normal" else 2)
    data = kwargs.pop("data", (XT, YT))
    run = tmp_path / "run"
    with pytest.raises(error, match=match):
        train(m, MixtureGuide(m), data, epochs=1, batch_size=8, progress=False, checkpoint_dir=run, **kwargs)
    assert not run.exists()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(checkpoint_every=5), r"checkpoint_every needs checkpoint_dir"),
        (dict(resume=True), r"resume=True needs checkpoint_dir"),
        (dict(checkpoint_dir=7), r"checkpoint_dir must be a path \(str or pathlib\.Path\), got int"),
    ],
)
def test_checkpoint_arguments_need_a_directory(kwargs, match):
    m = model()
    with pytest.raises((ValueError, TypeError), match=match):
        train(m, MixtureGuide(m), (XT, YT), epochs=1, progress=False, **kwargs)


# ------------------------------------------------------------------------------------------
# configs and the command line
# ------------------------------------------------------------------------------------------
def test_config_file_with_an_unknown_key_names_it(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        'name = "x"\ndataset = "cifar10"\nmodel = "resnet20_cifar"\nnum_classes = 10\nlearning_rate = 0.1\n'
    )
    with pytest.raises(ValueError, match=r"run\.toml: unknown config key\(s\) \['learning_rate'\]; valid keys:"):
        load_config(path)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["params", "vgg16"], r"rank1-pyro params: error: unknown model 'vgg16': not a network \(lenet5, "),
        (["demo", "--epochs", "0"], r"rank1-pyro demo: error: --epochs must be >= 1, got 0"),
        (["demo", "--epochs", "1", "--device", "tpu9"], r"rank1-pyro demo: error: device"),
    ],
)
def test_cli_reports_one_line_and_writes_nothing(argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*argv, *(["--out", str(out)] if argv[0] == "demo" else [])]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.match(message, err), err
    assert not out.exists()


def test_cli_unknown_command_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit"])
    assert e.value.code == 2
    assert "invalid choice: 'fit'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# Numerical guards: heavy-tailed factor draws are clipped to [-10, 10]
# ------------------------------------------------------------------------------------------
def test_cauchy_prior_draws_are_clipped_before_use():
    layer = Rank1Linear(3, 200, ensemble_size=2, prior=Cauchy(loc=1.0, scale=100.0))
    x = torch.randn(2, 5, 3)
    trace = poutine.trace(layer).get_trace(x)
    r, s = trace.nodes["r"]["value"], trace.nodes["s"]["value"]
    assert s.abs().max() > FACTOR_CLIP  # the prior does draw beyond the clip...
    out = trace.nodes["_RETURN"]["value"]
    expected = F.linear(x * r.clamp(-10, 10), layer.weight) * s.clamp(-10, 10) + layer.bias.unsqueeze(-2)
    torch.testing.assert_close(out, expected)  # ... and the layer uses the clipped values


def test_extreme_guide_draws_give_a_finite_loss():
    m = model()
    guide = CauchyGuide(m, init_scale=1e6)  # heavy-tailed, absurdly wide components
    sizes = {"net.0.r": 2, "net.0.s": 4, "net.2.r": 4, "net.2.s": 2}
    huge = {site: torch.full((2, 1, size), 1e30) for site, size in sizes.items()}
    out = poutine.condition(m.outputs, data=huge)(X)
    assert torch.isfinite(out).all()
    clipped = {k: v.clamp(-10, 10) for k, v in huge.items()}
    torch.testing.assert_close(out, poutine.condition(m.outputs, data=clipped)(X))
    loss = MixtureELBO().differentiable_loss(m, guide, X, Y)
    assert torch.isfinite(loss)


def test_value_checks_of_the_model_follow_pyros_validation_flag():
    """Checks that read data back to the host (NaN inputs, label range) run only under Pyro's
    validation, as Pyro's own distribution checks do; shape and dtype checks always run."""
    with pyro.validation_enabled(False):
        out = model().outputs(with_nan(X))
        assert torch.isnan(out[:, 1]).all() and torch.isfinite(out[:, 0]).all()
        with pytest.raises(ValueError, match=r"y must have shape \(4,\)"):
            call_model(X, Y[:3])
    with pyro.validation_enabled(True), pytest.raises(ValueError, match="x contains NaN"):
        model().outputs(with_nan(X))


def test_the_shared_name_check_returns_valid_names_and_lists_the_valid_ones_in_order():
    from rank1_pyro._checks import one_of

    assert one_of("solver", "cg", ("cg", "alternating")) == "cg"
    assert one_of("likelihood", "regression", {"classification": 0, "regression": 1}) == "regression"
    with pytest.raises(ValueError, match=r"^solver: unknown name 'lu'; valid: \['cg', 'alternating'\]$"):
        one_of("solver", "lu", ("cg", "alternating"))
