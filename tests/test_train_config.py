"""TrainConfig: one validated, frozen description of how train() trains; the keyword form is the same run."""

import dataclasses
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO

import rank1_pyro
from rank1_pyro import AveragedELBO, MixtureELBO, MixtureGuide, rank1_mlp
from rank1_pyro._checks import number
from rank1_pyro.inference import TrainConfig
from rank1_pyro.inference.objectives import PlainELBO, training_objective
from rank1_pyro.inference.train import train


def data(n=64, seed=0, classes=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g), torch.randint(0, classes, (n,), generator=g)


def tiny(classes=2):
    model = rank1_mlp(2, [8], classes, ensemble_size=2)
    return model, MixtureGuide(model)


def state(model, guide):
    return [t.detach().clone() for m in (model, guide) for t in m.state_dict().values()]


# ------------------------------------------------------------------------------------------
# Validation: every field, the same message from TrainConfig and from train's keywords
# ------------------------------------------------------------------------------------------
BAD = [
    (dict(epochs=-1), ValueError, r"epochs must be an integer >= 0, got -1"),
    (dict(epochs=2.0), ValueError, r"epochs must be an integer >= 0, got 2\.0"),
    (dict(batch_size=0), ValueError, r"batch_size must be an integer >= 1, got 0"),
    (dict(optimizer="rmsprop"), ValueError, r"optimizer: unknown name 'rmsprop'; valid: \['adam', 'sgd'\]"),
    (dict(lr=0.0), ValueError, r"lr must be > 0, got 0\.0"),
    (dict(lr=math.inf), ValueError, r"lr must be > 0, got inf"),
    (dict(lr="0.1"), ValueError, r"lr must be > 0, got '0\.1'"),
    (dict(momentum=-0.5), ValueError, r"momentum must be >= 0, got -0\.5"),
    (dict(weight_decay=math.nan), ValueError, r"weight_decay must be a finite number, got nan"),
    (dict(warmup_epochs=-1), ValueError, r"warmup_epochs must be >= 0, got -1"),
    (dict(decay_epochs="10"), ValueError, r"decay_epochs must be a sequence of epochs, got '10'"),
    (dict(decay_epochs=(1, -2)), ValueError, r"decay_epochs entries must be >= 0, got -2"),
    (dict(decay_rate=0.0), ValueError, r"decay_rate must be > 0, got 0\.0"),
    (dict(kl_annealing_epochs=True), ValueError, r"kl_annealing_epochs must be a finite number, got True"),
    (dict(grad_clip=0), ValueError, r"grad_clip must be > 0 or None, got 0"),
    (dict(device="tpu9"), ValueError, r"device: "),
    (dict(eval_samples=0), ValueError, r"eval_samples must be >= 1, got 0"),
    (dict(eval_samples=1.5), ValueError, r"eval_samples must be a finite integer, got 1\.5"),
    (dict(progress="verbose"), ValueError, r"progress must be None \(auto\), True, False, 'bar' or 'lines'"),
    (dict(seed=-1), ValueError, r"seed must be an integer >= 0 or None, got -1"),
    (dict(checkpoint_dir=7), TypeError, r"checkpoint_dir must be a path \(str or pathlib\.Path\), got int"),
    (dict(checkpoint_dir="ck", checkpoint_every=0), ValueError, r"checkpoint_every must be >= 1, got 0"),
    (dict(checkpoint_every=5), ValueError, r"checkpoint_every needs checkpoint_dir"),
    (dict(checkpoint_dir="ck", resume="yes"), ValueError, r"resume must be True or False, got 'yes'"),
    (dict(resume=True), ValueError, r"resume=True needs checkpoint_dir"),
    (dict(distributed="yes"), ValueError, r"distributed must be False, True or 'auto', got 'yes'"),
    (dict(precision="fp8"), ValueError, r"precision: unknown name 'fp8'; valid: \['fp32', 'bf16'\]"),
    (dict(log_csv=3), TypeError, r"log_csv must be a path \(str or pathlib\.Path\), got int"),
    (dict(objective="elbo"), ValueError, r"objective: unknown name 'elbo'; valid: \['averaged', 'mixture'\]"),
    (dict(objective=42), TypeError, r"objective must be a name or a Pyro ELBO, got int"),
    (
        dict(objective=Trace_ELBO(), kl_annealing_epochs=2),
        ValueError,
        r"kl_annealing_epochs=2 needs a rank-1 objective \(AveragedELBO or MixtureELBO\), which has a KL weight; "
        r"Trace_ELBO has none",
    ),
]


@pytest.mark.parametrize("fields, error, match", BAD, ids=[next(iter(b[0])) + f"-{i}" for i, b in enumerate(BAD)])
def test_each_bad_field_gives_its_message_from_the_config_and_from_train(tmp_path, monkeypatch, fields, error, match):
    monkeypatch.chdir(tmp_path)  # "ck" is never created: nothing runs
    with pytest.raises(error, match=match):
        TrainConfig(**fields)
    with pytest.raises(error, match=match):
        TrainConfig().replace(**fields)
    model, guide = tiny()
    before = state(model, guide)
    with pytest.raises(error, match=match):
        train(model, guide, data(), **{"epochs": 1, "progress": False, **fields})
    assert all(torch.equal(a, b) for a, b in zip(before, state(model, guide)))
    assert not (tmp_path / "ck").exists()


def test_a_valid_config_is_frozen_and_normalised():
    config = TrainConfig(decay_epochs=[3, 5], objective="averaged", device="cpu", checkpoint_dir="x", resume=True)
    assert config.decay_epochs == (3, 5)  # any iterable becomes a tuple
    assert TrainConfig(decay_epochs=(e for e in (1, 2))).decay_epochs == (1, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 0.1
    assert config.replace(lr=0.1).lr == 0.1 and config.lr == 1e-3
    assert config.replace() == config
    assert TrainConfig.fields()[:3] == ("objective", "epochs", "batch_size")


def test_a_checkpoint_dir_that_is_a_file_is_refused_when_training_starts(tmp_path):
    (tmp_path / "f").write_text("x")
    config = TrainConfig(checkpoint_dir=tmp_path / "f", epochs=1, progress=False)  # the disk is checked by train
    model, guide = tiny()
    with pytest.raises(ValueError, match=r"checkpoint_dir .*f is a file, not a directory"):
        train(model, guide, data(), config)
    with pytest.raises(ValueError, match=r"cannot be created: .*f is a file, not a directory"):
        train(model, guide, data(), config, checkpoint_dir=tmp_path / "f" / "sub")


def test_number_check_has_one_wording():
    assert number("n", 3, minimum=1, integer=True) == 3
    for value, message in [
        (math.nan, "n must be a finite number, got nan"),
        ("1", "n must be a finite number, got '1'"),
        (False, "n must be a finite number, got False"),
        (-1, "n must be >= 0, got -1"),
    ]:
        with pytest.raises(ValueError, match=f"^{message}$".replace("(", r"\(")):
            number("n", value)
    with pytest.raises(ValueError, match=r"^n must be > 0, got 0$"):
        number("n", 0, strict=True)
    with pytest.raises(ValueError, match=r"^n must be a finite integer, got 1\.0$"):
        number("n", 1.0, integer=True)


# ------------------------------------------------------------------------------------------
# The two forms of train are one run
# ------------------------------------------------------------------------------------------
def test_keyword_overrides_train_exactly_as_the_config_form():
    settings = dict(
        epochs=2,
        batch_size=16,
        optimizer="sgd",
        lr=0.05,
        warmup_epochs=0.5,
        decay_epochs=[1],
        weight_decay=1e-3,
        kl_annealing_epochs=1,
        grad_clip=5.0,
        progress=False,
        seed=3,
    )
    config = TrainConfig(**settings)
    runs = []
    for form in ("keywords", "config", "config and overrides"):
        torch.manual_seed(0)  # the same initial parameters
        model, guide = tiny()
        if form == "keywords":
            history = train(model, guide, data(), **settings)
        elif form == "config":
            history = train(model, guide, data(), config)
        else:
            history = train(model, guide, data(), config.replace(epochs=1, seed=0, lr=1.0), epochs=2, seed=3, lr=0.05)
        runs.append((state(model, guide), history.epochs))
    for params, epochs in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0][0], params))
        assert epochs == runs[0][1]
    assert len(runs[0][1]) == 2


def test_an_unknown_keyword_is_named_with_every_valid_one():
    model, guide = tiny()
    with pytest.raises(
        TypeError, match=r"train: unknown keyword argument 'lrr' \(did you mean 'lr'\?\); valid: \["
    ) as e:
        train(model, guide, data(), lrr=0.1)
    for name in (*TrainConfig.fields(), "val_data", "on_epoch"):
        assert repr(name) in str(e.value)
    with pytest.raises(TypeError, match=r"TrainConfig: unknown field 'epoch' \(did you mean 'epochs'\?\), 'zzz';"):
        TrainConfig().replace(epoch=3, zzz=1)
    with pytest.raises(TypeError, match="train: config must be a TrainConfig, got dict"):
        train(model, guide, data(), {"epochs": 1})


def test_train_config_is_exported():
    from rank1_pyro.inference import train as train_module
    from rank1_pyro.inference.predictive import evaluate

    assert rank1_pyro.TrainConfig is TrainConfig is train_module.TrainConfig
    assert train_module.evaluate is evaluate  # callers import evaluate from train


# ------------------------------------------------------------------------------------------
# The schedules, against hand computations
# ------------------------------------------------------------------------------------------
def test_learning_rate_factor_is_linear_warmup_then_step_decay():
    config = TrainConfig(warmup_epochs=1.5, decay_epochs=(2, 2.5), decay_rate=0.5)
    # S = 4 steps per epoch: warm-up min(1, (t + 1) / 6); x0.5 from epoch 2 (t = 8), again from 2.5 (t = 10)
    hand = {0: 1 / 6, 2: 3 / 6, 4: 5 / 6, 5: 1.0, 7: 1.0, 8: 0.5, 9: 0.5, 10: 0.25, 11: 0.25, 40: 0.25}
    assert {t: config.lr_factor(t, 4) for t in hand} == pytest.approx(hand)
    assert TrainConfig().lr_factor(0, 4) == 1.0  # no warm-up, no decay


def test_training_follows_the_learning_rate_schedule():
    model, guide = tiny()
    history = train(
        model,
        guide,
        data(),
        optimizer="sgd",
        lr=0.2,
        epochs=3,
        batch_size=16,
        warmup_epochs=1.5,
        decay_epochs=(2, 2.5),
        decay_rate=0.5,
        progress=False,
        seed=0,
    )
    # the learning rate after each epoch's 4 steps: lr x f(4), f(8), f(12) of the hand computation above
    assert history.column("lr") == pytest.approx([0.2 * 5 / 6, 0.2 * 0.5, 0.2 * 0.25])


def test_kl_factor_anneals_linearly_on_top_of_the_objectives_weight():
    config = TrainConfig(kl_annealing_epochs=1.5)
    assert [config.kl_factor(t, 4) for t in (0, 3, 4, 5, 9)] == pytest.approx([1 / 6, 4 / 6, 5 / 6, 1.0, 1.0])
    assert TrainConfig().kl_factor(0, 4) == 1.0
    model, guide = tiny()
    history = train(
        model, guide, data(), config.replace(objective=AveragedELBO(kl_weight=2.0), epochs=2, batch_size=16, seed=0)
    )
    assert history.column("kl_weight") == pytest.approx([2.0 * 4 / 6, 2.0])  # beta of each epoch's last step


# ------------------------------------------------------------------------------------------
# The objective hands the loop its logits; any other Pyro ELBO trains through PlainELBO
# ------------------------------------------------------------------------------------------
def test_elbo_terms_logits_are_the_models_forward_logits():
    model, guide = tiny(classes=3)
    x, y = data(classes=3)
    outputs = []

    def forward(x, y=None):
        out = model(x, y)
        outputs.append(out)
        return out

    terms = MixtureELBO().loss_terms(forward, guide, x, y)
    assert terms.logits.shape == outputs[-1].shape == (2, 64, 3)
    torch.testing.assert_close(terms.logits, torch.log_softmax(outputs[-1], -1))
    assert torch.equal(terms.logits.argmax(-1), outputs[-1].argmax(-1))


def test_logits_come_from_the_categorical_observation_whatever_its_name():
    net = torch.nn.Linear(2, 3)
    x, y = data(classes=3)

    def model(x, y=None):
        out = net(x).expand(2, *x.shape[:1], 3)  # two identical "members"
        with pyro.plate("members", 2, dim=-2), pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("label", dist.Categorical(logits=out), obs=y)
        return out

    def regression(x, y=None):
        with pyro.plate("members", 2, dim=-2), pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("target", dist.Normal(net(x)[:, 0], 1.0), obs=y)

    terms = AveragedELBO().loss_terms(model, lambda x, y=None: None, x, y)
    torch.testing.assert_close(terms.logits, torch.log_softmax(model(x), -1))
    assert AveragedELBO().loss_terms(regression, lambda x, y=None: None, x, y.float()).logits is None


def test_other_pyro_elbos_train_on_their_loss_alone():
    model, guide = tiny()
    objective = training_objective(Trace_ELBO(max_plate_nesting=2))
    assert isinstance(objective, PlainELBO) and not objective.has_parts
    x, y = data()
    pyro.set_rng_seed(0)
    terms = objective.loss_terms(model, guide, x, y)
    pyro.set_rng_seed(0)
    expected = Trace_ELBO(max_plate_nesting=2).differentiable_loss(model, guide, x, y)
    assert torch.equal(terms.loss, expected) and terms[1:] == (None, None, None)
    objective.annealing = 1.0
    with pytest.raises(ValueError, match="Trace_ELBO has no KL weight to anneal"):
        objective.annealing = 0.5
    history = train(model, guide, data(), objective=Trace_ELBO(max_plate_nesting=2), epochs=1, progress=False, seed=0)
    assert set(history.last) == {"epoch", "loss", "lr", "kl_weight"} and history.last["kl_weight"] == 1.0
    default = training_objective(None)  # the averaged ELBO, the batch tiled over the members
    assert type(default) is AveragedELBO and default.estimator == "member" and default.kl_weight == 1.0
    assert type(training_objective("mixture")) is MixtureELBO and type(training_objective("averaged")) is AveragedELBO
    elbo = AveragedELBO()
    assert training_objective(elbo) is elbo  # trained (and annealed) as it is


def test_training_accuracy_is_read_from_each_steps_logits():
    steps = []

    class Recording(MixtureELBO):
        def loss_terms(self, model, guide, x, y):
            terms = super().loss_terms(model, guide, x, y)
            steps.append((terms.logits.detach(), y))
            return terms

    model, guide = tiny(classes=3)
    history = train(model, guide, data(classes=3), objective=Recording(), epochs=1, batch_size=16, progress=False)
    assert len(steps) == 4
    correct = sum(int((torch.softmax(lg, -1).mean(0).argmax(-1) == y).sum()) for lg, y in steps)
    assert history.last["accuracy"] == pytest.approx(correct / 64)
