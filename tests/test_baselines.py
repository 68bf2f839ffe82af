"""Deep ensemble and MC dropout against hand computations, parameter counts, and the experiment
pipeline (methods registry, evaluation sets, resumable jobs, summaries) on tiny digits images."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rank1_pyro.baselines import DeepEnsemble, MCDropout, insert_dropout, lenet5_dropout_net, member_seeds
from rank1_pyro.data import Split, load_digits
from rank1_pyro.experiments import (
    EvalSets,
    convergence,
    evaluate,
    markdown_table,
    plan_jobs,
    run_job,
    run_jobs,
    shift_sets,
    summarize,
)
from rank1_pyro.inference import MixtureGuide, Posterior, Rank1Posterior, predict
from rank1_pyro.inference.predictive import empty_guide
from rank1_pyro.inference.train import train
from rank1_pyro.inference.train_config import TrainConfig
from rank1_pyro.methods import METHODS, Architecture, MethodSettings, check_methods, fit_method
from rank1_pyro.models import Rank1Model, lenet5_net, mlp, rank1_network
from rank1_pyro.models.params import count_parameters


def _data(n=24, d=4, c=3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g)


def _flat_params(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


# ----------------------------------------------------------------------------- deep ensemble


def test_deep_ensemble_members_are_independently_initialised_and_seeded():
    before = torch.get_rng_state()
    ens = DeepEnsemble.from_builder(lambda: mlp(4, [8], 3), ensemble_size=3, seed=5)
    assert torch.equal(torch.get_rng_state(), before)  # the global random state is untouched
    params = [_flat_params(m.net) for m in ens.members]
    assert all(not torch.allclose(params[i], params[j]) for i in range(3) for j in range(i + 1, 3))
    # member k is the network built under its own seed, whatever the other members are
    for k, seed in enumerate(member_seeds(5, 3)):
        torch.manual_seed(seed)
        torch.testing.assert_close(params[k], _flat_params(mlp(4, [8], 3)))
    again = DeepEnsemble.from_builder(lambda: mlp(4, [8], 3), ensemble_size=3, seed=5)
    torch.testing.assert_close(_flat_params(again), _flat_params(ens))
    other = DeepEnsemble.from_builder(lambda: mlp(4, [8], 3), ensemble_size=3, seed=6)
    assert not any(torch.allclose(_flat_params(a), _flat_params(b)) for a in ens.members for b in other.members)


def test_member_seeds_do_not_collide_across_runs():
    seeds = [s for run in range(5) for s in member_seeds(run, 4)]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= s < 2**31 for s in seeds)
    with pytest.raises(ValueError, match="seed"):
        member_seeds(-1, 4)
    with pytest.raises(ValueError, match="ensemble_size"):
        member_seeds(0, 0)


def test_deep_ensemble_fit_trains_each_member_alone():
    x, y = _data()
    ens = DeepEnsemble.from_builder(lambda: mlp(4, [8], 3), ensemble_size=2, seed=0)
    init = [Rank1Model(mlp(4, [8], 3), ensemble_size=1, flat_batch=True) for _ in range(2)]
    for copy, member in zip(init, ens.members):
        copy.load_state_dict(member.state_dict())
    histories = ens.fit((x, y), seed=3, epochs=3, batch_size=8, lr=1e-2, progress=False)
    assert len(histories) == 2
    # the same training run on a lone copy of member k (its own seed) ends in the same weights
    for copy, member, seed in zip(init, ens.members, member_seeds(3, 2)):
        train(copy, None, (x, y), seed=seed, epochs=3, batch_size=8, lr=1e-2, progress=False)
        torch.testing.assert_close(_flat_params(copy), _flat_params(member))
    assert not torch.allclose(_flat_params(ens.members[0]), _flat_params(ens.members[1]))


def test_deep_ensemble_predictive_is_the_average_of_member_softmaxes():
    x, _ = _data(n=7)
    ens = DeepEnsemble.from_builder(lambda: mlp(4, [8], 3), ensemble_size=3, seed=0)
    assert isinstance(ens, Posterior) and ens.likelihood == "categorical"
    samples = ens.sample_predictions(x, num_samples=5)
    assert samples.shape == (1, 3, 7, 3)  # deterministic members: one sample each
    with torch.no_grad():
        by_hand = torch.stack([torch.softmax(m.net(x), dim=-1) for m in ens.members]).mean(0)
    torch.testing.assert_close(predict(ens, x, num_samples=5, batch_size=3).probs, by_hand)


def test_deep_ensemble_regression_members_keep_their_noise():
    x, y = _data()
    ens = DeepEnsemble.from_builder(lambda: mlp(4, [8], 1), ensemble_size=2, seed=0, likelihood="normal")
    with torch.no_grad():
        ens.members[1].noise_raw.fill_(2.0)
    out = ens.sample_predictions(x, 1)
    assert out.shape == (1, 2, 24, 2)
    with torch.no_grad():
        torch.testing.assert_close(out[0, 1, :, 0], ens.members[1].net(x).squeeze(-1))
        torch.testing.assert_close(out[0, 1, :, 1], F.softplus(torch.tensor(2.0)).pow(2).expand(24))


def test_deep_ensemble_bad_input():
    with pytest.raises(ValueError, match="members"):
        DeepEnsemble([])
    with pytest.raises(ValueError, match="likelihood"):
        DeepEnsemble([mlp(2, [], 2)], likelihood="poisson")
    with pytest.raises(ValueError, match="ensemble_size 1"):
        DeepEnsemble([rank1_network("lenet5", ensemble_size=2)])
    with pytest.raises(TypeError, match="build"):
        DeepEnsemble.from_builder(mlp(2, [], 2))


# ----------------------------------------------------------------------------- MC dropout


def test_insert_dropout_places_dropout_before_hidden_weight_layers():
    net = lenet5_net()
    dropped = insert_dropout(net, 0.3)
    kinds = [type(m).__name__ for m in dropped]
    assert kinds.count("Dropout") == 4  # before conv2 and the three dense layers, never on the input
    for i, kind in enumerate(kinds):
        if kind == "Dropout":
            assert kinds[i + 1] in ("Conv2d", "Linear") and dropped[i].p == 0.3
    assert kinds[0] == "Conv2d"
    assert len(net) == 12  # the original is not modified
    torch.testing.assert_close(_flat_params(dropped), _flat_params(net))  # same weights, copied
    with pytest.raises(TypeError, match="Sequential"):
        insert_dropout(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="probability"):
        insert_dropout(net, 1.0)


@pytest.mark.parametrize("max_rows", [8192, 7])  # 7 rows: draws in chunks of two
def test_mc_dropout_samples_use_fresh_masks_and_eval_mode_elsewhere(max_rows):
    # identity layers around the dropout: every output entry is 0 or x / (1 - p)
    net = nn.Sequential(nn.Linear(5, 5), nn.Dropout(0.5), nn.Linear(5, 5))
    with torch.no_grad():
        for layer in (net[0], net[2]):
            layer.weight.copy_(torch.eye(5))
            layer.bias.zero_()
    mc = MCDropout(net, likelihood="normal", max_rows=max_rows)
    x = torch.rand(3, 5) + 0.5
    mc.model.eval()
    out = mc.sample_outputs(x, 400)
    assert out.shape == (400, 1, 3, 5)
    kept = torch.isclose(out[:, 0], 2 * x.expand_as(out[:, 0]))
    assert (kept | (out[:, 0] == 0)).all()
    assert 0.4 < kept.double().mean() < 0.6  # P(keep) = 1 - p
    assert not torch.equal(kept[0], kept[1]) and not torch.equal(kept[1], kept[2])  # masks differ between samples
    assert not mc.model.net[1].training  # the dropout layer is back in eval mode


def test_mc_dropout_predictions_vary_and_equal_the_plain_net_without_dropout():
    x = torch.randn(6, 1, 28, 28)
    torch.manual_seed(0)
    base = lenet5_net()
    plain = Rank1Posterior(Rank1Model(base, ensemble_size=1, flat_batch=True), empty_guide)
    expected = plain.sample_predictions(x, 1)[0, 0]
    with torch.no_grad():
        torch.testing.assert_close(expected, torch.softmax(base.eval()(x), -1))
    no_dropout = MCDropout(insert_dropout(base, 0.0)).sample_predictions(x, 4)
    assert no_dropout.shape == (4, 1, 6, 10)
    torch.testing.assert_close(no_dropout, expected.expand(4, 1, 6, 10))
    mc = MCDropout(insert_dropout(base, 0.5))
    samples = mc.sample_predictions(x, 8)
    assert samples.shape == (8, 1, 6, 10)
    assert samples.std(dim=0).max() > 1e-3  # dropout is on at prediction
    assert mc.model.training  # the model's mode is restored
    with pytest.raises(ValueError, match="no dropout"):
        MCDropout(lenet5_net())


def test_mc_dropout_fit_trains_the_network():
    x, y = _data(n=64)
    mc = MCDropout(insert_dropout(mlp(4, [32], 3), 0.1))
    before = mc.model.net[0].weight.detach().clone()
    history = mc.fit((x, y), epochs=30, batch_size=16, lr=1e-2, progress=False, seed=0)
    assert not torch.equal(before, mc.model.net[0].weight)
    assert history.epochs[-1]["loss"] < history.epochs[0]["loss"]


# ----------------------------------------------------------------------------- parameter counts


def test_parameter_counts_of_the_benchmark_models():
    # LeNet-5 by hand: conv 1->6 (5x5), conv 6->16 (5x5), dense 400-120-84-10, all with biases
    lenet = (6 * 25 + 6) + (16 * 6 * 25 + 16) + (400 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10)
    assert lenet == 61_706 == count_parameters(lenet5_net())
    assert count_parameters(lenet5_dropout_net(p=0.1)) == lenet  # dropout has no parameters
    ens = DeepEnsemble.from_builder(lenet5_net, ensemble_size=4)
    assert count_parameters(ens) == 4 * lenet
    # rank-1 LeNet-5, K = 4: shared W, per-member biases, a mean and a scale per factor entry and member
    k, biases = 4, 6 + 16 + 120 + 84 + 10
    factors = (1 + 6) + (6 + 16) + (400 + 120) + (120 + 84) + (84 + 10)
    model = rank1_network("lenet5", ensemble_size=k)
    assert count_parameters(model, MixtureGuide(model)) == (lenet - biases) + k * biases + 2 * k * factors
    assert count_parameters(model, MixtureGuide(model)) < 0.3 * count_parameters(ens)  # "a quarter"


# ----------------------------------------------------------------------------- the experiment pipeline


SETTINGS = MethodSettings(
    TrainConfig(
        epochs=1,
        batch_size=32,
        weight_decay=1e-4,
        kl_annealing_epochs=0.8,
        objective="averaged",
        device="cpu",
        progress=False,
    ),
    laplace_subnetwork=16,
    projected_fit_examples=8,
    projected_iterations=2,
    projected_probes=2,
    projected_samples=2,
    rank1_laplace_fit_examples=2,
    rank1_samples=2,
    dropout_samples=2,
)


def _tiny_data():
    digits = load_digits()
    up = lambda x: F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)  # noqa: E731 (LeNet: >= 12x12)
    split = Split(up(digits.x_train[:96]), digits.y_train[:96], up(digits.x_test[:40]), digits.y_test[:40], 10, "tiny")
    ood = up(digits.x_test[40:60]).transpose(-1, -2)
    data = shift_sets(
        split,
        ood,
        test_examples=30,
        shift_examples=8,
        ood_examples=12,
        rotations=(90.0, 180.0),
        corruptions=("gaussian_noise", "contrast"),
        severities=(1, 5),
    )
    return Architecture.from_zoo("lenet5", 10, (1, 16, 16)), data


def _run(arch, data, methods, seeds, jobs_dir=None, log=lambda s: None, settings=SETTINGS):
    jobs = plan_jobs(methods, seeds)
    run = lambda *job: run_job(arch, settings, data, *job)  # noqa: E731
    return run_jobs(jobs, run, {"settings": repr(settings)}, jobs_dir, log)


def test_every_method_runs_on_tiny_digits_and_seeds_summarize():
    arch, data = _tiny_data()
    assert data.sets["clean"][0] == slice(0, 30) and data.sets["ood"][1] is None
    assert data.x_eval.shape[0] == 30 + 2 * 8 + 2 * 2 * 8 + 12
    # standardised with the training statistics
    torch.testing.assert_close(data.x_train.mean(), torch.tensor(0.0), atol=1e-5, rtol=0)
    runs = _run(arch, data, METHODS, (0, 1))
    assert set(runs) == set(METHODS)
    for method in METHODS:
        assert set(runs[method]) == {"0", "1"}
        for row in runs[method].values():
            for key in (
                "clean_accuracy",
                "clean_nll",
                "clean_ece",
                "clean_brier",
                "rotation_nll",
                "corruption_ece",
                "ood_auroc",
            ):
                assert 0.0 <= row[key] < float("inf"), (method, key, row[key])
        stats = summarize(runs[method])["clean_nll"]
        values = [r["clean_nll"] for r in runs[method].values()]
        assert stats["mean"] == pytest.approx(sum(values) / 2)
        assert stats["std"] == pytest.approx(abs(values[0] - values[1]) / 2**0.5)
    # the rotation average is the mean of the per-angle metrics
    row = runs["deterministic"]["0"]
    assert row["rotation_nll"] == pytest.approx((row["sets"]["rot90"]["nll"] + row["sets"]["rot180"]["nll"]) / 2)
    assert runs["deep-ensemble"]["0"]["parameters"] == 4 * runs["deterministic"]["0"]["parameters"]
    text = markdown_table({m: summarize(runs[m]) for m in METHODS}, [("clean_nll", "NLL", 1.0, 3)])
    assert "| rank1-gaussian-mix |" in text and "±" in text and text.count("\n") == len(METHODS) + 1


def test_post_hoc_methods_start_from_their_trained_base():
    assert plan_jobs(["subnet-laplace", "projected"], [0]) == [
        (0, "deterministic", ("subnet-laplace", "projected"), False)
    ]
    arch, data = _tiny_data()
    base = fit_method("deterministic", arch, (data.x_train, data.y_train), SETTINGS, seed=0)
    with pytest.raises(ValueError, match="pass base="):
        fit_method("projected", arch, (data.x_train, data.y_train), SETTINGS, seed=0)
    la = fit_method("subnet-laplace", arch, (data.x_train, data.y_train), SETTINGS, seed=0, base=base)
    assert la.posterior.model is base.model.net and la.seconds >= base.seconds
    with pytest.raises(ValueError, match="unknown methods"):
        check_methods(["rank1-laplace-avg"])


def test_experiment_jobs_resume_and_rerun_changed_ones(tmp_path, monkeypatch):
    from rank1_pyro import experiments

    arch, data = _tiny_data()
    methods, jobs_dir = ["deterministic", "subnet-laplace"], tmp_path / "jobs"
    first = _run(arch, data, methods, (0,), jobs_dir)
    assert len(list(jobs_dir.glob("seed0-deterministic-*.json"))) == 1  # one job: the net and its Laplace

    def no_training(*args, **kwargs):
        raise AssertionError("a finished job ran again")

    monkeypatch.setattr(experiments, "run_job", no_training)
    messages = []
    again = _run(arch, data, methods, (0,), jobs_dir, messages.append)
    assert messages == [f"resuming: 1 of 1 jobs already done in {jobs_dir}"]
    for method in methods:
        assert again[method]["0"]["clean_nll"] == first[method]["0"]["clean_nll"]
    # other settings are another job: it runs
    with pytest.raises(AssertionError, match="ran again"):
        jobs = plan_jobs(methods, (0,))
        key = {"settings": repr(replace(SETTINGS, train=SETTINGS.train.replace(epochs=2)))}
        experiments.run_jobs(jobs, lambda *job: experiments.run_job(arch, SETTINGS, data, *job), key, jobs_dir)


def test_shift_sets_hold_out_the_last_training_images_for_validation():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(20, 1, 4, 4, generator=g), torch.arange(20) % 3
    split = Split(x, y, torch.rand(6, 1, 4, 4, generator=g), torch.arange(6) % 3, 3, "toy")
    data = shift_sets(split, train_examples=16, val_examples=5, test_examples=6)
    (x_val, y_val) = data.val
    assert data.x_train.shape[0] == 11 and torch.equal(y_val, y[11:16])
    mean, std = (
        x[:11].mean(),
        x[:11].std(correction=0),
    )  # the statistics of the images that train, not of the held-out ones
    torch.testing.assert_close(x_val, (x[11:16] - mean) / std, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(data.x_train, (x[:11] - mean) / std, atol=1e-5, rtol=1e-4)
    assert shift_sets(split, test_examples=6).val is None
    for bad in (-1, 16):
        with pytest.raises(ValueError, match=r"val_examples must lie in \[0, 16\)"):
            shift_sets(split, train_examples=16, val_examples=bad)


def test_training_curve_is_the_history_or_the_members_mean():
    from rank1_pyro.inference.train import History
    from rank1_pyro.methods import training_curve

    a = History([{"epoch": 1, "nll": 1.0, "val_nll": 2.0, "loss": 9.0}, {"epoch": 2, "nll": 0.5, "val_nll": 1.0}])
    b = History([{"epoch": 1, "nll": 3.0, "val_nll": 4.0}, {"epoch": 2, "nll": 1.5}])
    assert training_curve([a]) == [{"epoch": 1, "nll": 1.0, "val_nll": 2.0}, {"epoch": 2, "nll": 0.5, "val_nll": 1.0}]
    assert training_curve([a, b]) == [{"epoch": 1, "nll": 2.0, "val_nll": 3.0}, {"epoch": 2, "nll": 1.0}]


def test_trained_methods_record_their_validation_curve_and_estimator(monkeypatch):
    from rank1_pyro.layers import SplitBatch

    arch, data = _tiny_data()
    xy, val = (data.x_train[:64], data.y_train[:64]), (data.x_train[64:], data.y_train[64:])
    settings = replace(SETTINGS, train=SETTINGS.train.replace(epochs=2), averaged_estimator="split")
    calls = []
    rows = SplitBatch.rows
    monkeypatch.setattr(SplitBatch, "rows", lambda self, x, k: calls.append(x.shape[0]) or rows(self, x, k))
    for method in ("rank1-gaussian-avg", "deep-ensemble"):
        fitted = fit_method(method, arch, xy, settings, seed=0, val_data=val)
        assert [e["epoch"] for e in fitted.curve] == [1, 2]
        assert all(0 < e["val_nll"] < 10 and 0 <= e["val_accuracy"] <= 1 for e in fitted.curve)
    assert set(calls) == {32}  # the rank-1 model split its batches of 32 (x and y)
    calls.clear()
    fit_method("rank1-gaussian-mix", arch, xy, settings, seed=0)  # the mixture ELBO always tiles
    assert calls == []
    with pytest.raises(ValueError, match="averaged_estimator: unknown name 'tiled'"):
        MethodSettings(averaged_estimator="tiled")


# ----------------------------------------------------------------------------- mutation-tested behaviour (issue #21)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (
            lambda: MCDropout(insert_dropout(mlp(2, [4], 2)), likelihood="poisson"),
            ValueError,
            r"^likelihood: unknown name",
        ),
        (
            lambda: DeepEnsemble([mlp(2, [], 2)], likelihood="poisson"),
            ValueError,
            r"^likelihood: unknown name 'poisson'",
        ),
        (lambda: MCDropout("net"), TypeError, r"^expected an nn.Module, got str$"),
        (lambda: DeepEnsemble(5), ValueError, r"^members must be a non-empty sequence of networks, got int$"),
        (lambda: DeepEnsemble(m for m in [mlp(2, [], 2)]), ValueError, r"^members must be a non-empty sequence"),
        (
            lambda: DeepEnsemble([Rank1Model(mlp(2, [], 1), ensemble_size=1, likelihood="normal", flat_batch=True)]),
            ValueError,
            r"^every member must have likelihood 'categorical'$",
        ),
        (
            lambda: DeepEnsemble.from_builder(5),
            TypeError,
            r"^build must be a function returning a new network, got int$",
        ),
        (lambda: member_seeds(True, 2), ValueError, r"^seed must be an integer >= 0, got True$"),
        (lambda: member_seeds(1.5, 2), ValueError, r"^seed must be an integer >= 0, got 1.5$"),
        (lambda: member_seeds(0, 0), ValueError, r"^ensemble_size must be an integer >= 1, got 0$"),
        (lambda: insert_dropout(nn.Linear(2, 2)), TypeError, r"^insert_dropout needs an nn.Sequential, got Linear$"),
        (
            lambda: insert_dropout(nn.Sequential(nn.ReLU()), 0.1),
            ValueError,
            r"^insert_dropout: the network has no Linear or Conv layer$",
        ),
        (
            lambda: insert_dropout(mlp(2, [4], 2), False),
            ValueError,
            r"^p must be a dropout probability in \[0, 1\), got False$",
        ),
        (lambda: insert_dropout(mlp(2, [4], 2), "0.1"), ValueError, r"^p must be a dropout probability"),
        (
            lambda: MCDropout(mlp(2, [4], 2)),
            ValueError,
            r"^MCDropout: the network has no dropout layer \(torch.nn.Dropout, Dropout2d, ...\)$",
        ),
    ],
)
def test_baseline_argument_errors_are_exact(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_member_seeds_use_all_31_bits():
    seeds = member_seeds(0, 64)
    assert max(seeds) < 2**31 and max(seeds) >= 2**30  # 64 draws all below 2**30 would have probability 2**-64


def test_insert_dropout_defaults_copy_and_lenet5_arguments():
    net = mlp(4, [8, 8], 3)
    dropped = insert_dropout(net)
    assert [m.p for m in dropped if isinstance(m, nn.Dropout)] == [0.1, 0.1]
    first = next(m for m in dropped if isinstance(m, nn.Linear))
    assert first is not net[0] and first.weight.data_ptr() != net[0].weight.data_ptr()  # a deep copy
    lenet = lenet5_dropout_net(num_classes=7, in_channels=3, p=0.3)
    assert lenet[0].in_channels == 3 and lenet[-1].out_features == 7
    assert [m.p for m in lenet if isinstance(m, nn.Dropout)] == [0.3] * 4
    assert [m.p for m in lenet5_dropout_net() if isinstance(m, nn.Dropout)] == [0.1] * 4


def test_mc_dropout_max_rows_default_and_argument():
    net = insert_dropout(mlp(4, [8], 3))
    assert MCDropout(net).max_rows == Rank1Posterior(Rank1Model(mlp(4, [8], 3), ensemble_size=1), empty_guide).max_rows
    assert MCDropout(net, max_rows=7).max_rows == 7


def test_deep_ensemble_defaults_config_and_no_guide():
    x, y = _data(n=16)
    build = lambda: mlp(4, [6], 3)  # noqa: E731
    default = DeepEnsemble.from_builder(build)
    assert default.ensemble_size == 4
    torch.testing.assert_close(_flat_params(default), _flat_params(DeepEnsemble.from_builder(build, seed=0)))
    a = DeepEnsemble.from_builder(build, ensemble_size=2)
    b = DeepEnsemble.from_builder(build, ensemble_size=2)
    config = TrainConfig(epochs=2, batch_size=8, lr=1e-2, progress=False)
    histories = a.fit((x, y), config)  # default seed 0, positional config
    assert [len(h.epochs) for h in histories] == [2, 2]
    b.fit((x, y), config, seed=0)
    torch.testing.assert_close(_flat_params(a), _flat_params(b))
    with pytest.raises(TypeError, match=r"^DeepEnsemble.fit: the members are deterministic and take no guide$"):
        a.fit((x, y), guide=None)


def test_mc_dropout_fit_passes_config_and_overrides():
    x, y = _data(n=16)
    mc = MCDropout(insert_dropout(mlp(4, [8], 3), 0.1))
    assert len(mc.fit((x, y), TrainConfig(epochs=2, batch_size=8, progress=False)).epochs) == 2
    assert len(mc.fit((x, y), epochs=3, batch_size=8, progress=False).epochs) == 3
    with pytest.raises(TypeError, match=r"^MCDropout.fit: the network is deterministic and takes no guide$"):
        mc.fit((x, y), guide=None)


def test_methods_fit_and_evaluate_a_regression_architecture():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(160, 3, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(160, generator=g)
    data = EvalSets.from_parts(x[:128], y[:128], [("clean", x[128:], y[128:])], "linear")
    xy = (data.x_train, data.y_train)
    arch = Architecture.from_zoo("mlp", 1, (3,), likelihood="normal", hidden=(16,))
    settings = replace(
        SETTINGS,
        train=replace(SETTINGS.train, epochs=25, lr=2e-2),
        laplace_subnetwork=20,
        projected_fit_examples=128,
        projected_iterations=10,
        projected_probes=4,
        projected_samples=8,
    )
    base = fit_method("deterministic", arch, xy, settings, seed=0)
    noise = float(base.model.noise_scale().detach())
    assert noise < 0.9  # learned from its initial 1
    fitted = {
        "deterministic": base,
        "subnet-laplace": fit_method("subnet-laplace", arch, xy, settings, seed=0, base=base),
        "projected": fit_method("projected", arch, xy, settings, seed=0, base=base),
        "rank1-gaussian-avg": fit_method("rank1-gaussian-avg", arch, xy, settings, seed=0),
        "deep-ensemble": fit_method("deep-ensemble", arch, xy, settings, seed=0),
    }
    # the post-hoc posteriors take the trained model's learned noise
    assert fitted["subnet-laplace"].posterior.sigma_noise == pytest.approx(noise)
    assert fitted["projected"].posterior.noise_scale == pytest.approx(noise)
    for method, fit in fitted.items():
        torch.manual_seed(0)
        row = evaluate(fit.posterior, data, fit.num_samples)
        assert set(row["sets"]["clean"]) == {"rmse", "nll", "coverage95"}, method
        torch.manual_seed(0)  # the same draws: the NLL is the mixture predictive's own
        prediction = predict(fit.posterior, x[128:], num_samples=fit.num_samples)
        assert row["clean_nll"] == pytest.approx(-prediction.log_density(y[128:]).mean().item(), rel=1e-6)
        assert row["clean_rmse"] < 0.5 * y.std().item(), (method, row["clean_rmse"])  # learned the linear map
        assert row["clean_nll"] == row["sets"]["clean"]["nll"] and 0.0 <= row["clean_coverage95"] <= 1.0
    # every trained method builds a regression model
    for method in ("mc-dropout", "batchensemble", "rank1-cauchy-mix"):
        assert fit_method(method, arch, xy, SETTINGS).posterior.likelihood == "normal", method
    with pytest.raises(ValueError, match="likelihood"):
        Architecture.from_zoo("mlp", 1, (3,), likelihood="poisson")


def test_markdown_table_cells_by_hand():
    rows = {"a": {"n": 1234, "x": {"mean": 0.5, "std": 0.25}, "y": 0.123456, "s": "3/5"}, "b": {"n": 7, "x": 1.0}}
    rows["b"].update(y={"mean": 2.0, "std": 0.0})  # no "s": a dash
    columns = [("n", "count", None, 0), ("x", "X", 10.0, 1), ("y", "Y", 1.0, 2), ("s", "lower on", None, 0)]
    assert markdown_table(rows, columns).splitlines() == [
        "| method | count | X | Y | lower on |",
        "|---|---:|---:|---:|---:|",
        "| a | 1,234 | 5.0 ± 2.5 | 0.12 | 3/5 |",
        "| b | 7 | 10.0 | 2.00 ± 0.00 | – |",
    ]


def test_convergence_summarises_the_validation_curve_by_hand():
    curve = [{"epoch": i + 1, "val_nll": v} for i, v in enumerate([1.0, 0.8, 0.7, 0.71, 0.69, 0.695])]
    row = convergence({"clean_nll": 0.5, "curve": curve}, last_epochs=3)
    assert row["clean_nll"] == 0.5 and row["curve"] is curve
    assert (row["best_val_epoch"], row["best_val_nll"], row["last_val_nll"]) == (5, 0.69, 0.695)
    assert row["last_epochs_gain"] == pytest.approx((0.7 - 0.69) / 0.7)
    # a curve still falling before the last epochs and worse after them: a negative gain
    assert convergence({"curve": curve}, last_epochs=1)["last_epochs_gain"] == pytest.approx((0.69 - 0.695) / 0.69)
    assert convergence({"curve": curve[:4]}, last_epochs=1)["last_epochs_gain"] == pytest.approx((0.7 - 0.71) / 0.7)
    # too short a curve, or none: the row as it is
    assert convergence({"curve": curve[:3]}, last_epochs=3) == {"curve": curve[:3]}
    assert convergence({"clean_nll": 1.0}) == {"clean_nll": 1.0}
    with pytest.raises(ValueError, match="last_epochs"):
        convergence({"curve": curve}, last_epochs=0)


def test_deep_ensemble_repr_names_its_size_and_likelihood():
    from rank1_pyro import mlp

    ensemble = DeepEnsemble([mlp(2, [], 2), mlp(2, [], 2), mlp(2, [], 2)], likelihood="normal")
    assert repr(ensemble).startswith("DeepEnsemble(\n  ensemble_size=3, likelihood='normal'\n")
