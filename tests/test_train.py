"""The training loop: it learns, anneals the KL, schedules the learning rate, and guards against NaN."""

import re
import sys

import pytest
import torch
from faulty_objectives import FailingELBO, InfiniteGradientELBO, StopAt
from torch.utils.data import DataLoader, TensorDataset

from rank1_pyro import MixtureELBO, MixtureGuide, Rank1Model, mlp, rank1_mlp
from rank1_pyro.inference.distributed import resolve_device
from rank1_pyro.inference.predictive import evaluate
from rank1_pyro.inference.train import NonFiniteLossError, TrainConfig, train


def separable(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    y = (x[:, 0] - 0.5 * x[:, 1] > 0).long()
    return x, y


def test_rank1_mlp_reaches_the_deterministic_accuracy():
    x, y = separable()
    xt, yt = separable(seed=1)
    det = Rank1Model(mlp(2, [16], 2), ensemble_size=1)
    train(det, None, (x, y), epochs=25, lr=1e-2, progress=False, seed=0)
    model = rank1_mlp(2, [16], 2, ensemble_size=4)
    guide = MixtureGuide(model)
    history = train(model, guide, (x, y), epochs=25, lr=1e-2, val_data=(xt, yt), progress=False, seed=0)
    det_acc = evaluate(det, None, (xt, yt))["accuracy"]
    rank1_acc = evaluate(model, guide, (xt, yt), num_samples=8)["accuracy"]
    assert det_acc > 0.95
    assert rank1_acc >= det_acc - 0.02
    record = history.last
    assert {"loss", "nll", "kl", "accuracy", "val_accuracy", "val_nll", "val_ece"} <= set(record)
    assert history.column("loss")[-1] < history.column("loss")[0]
    assert model.num_data == 300  # the data plate scales minibatches by N / B


def test_kl_annealing_schedule():
    x, y = separable(64)
    model = rank1_mlp(2, [4], 2, ensemble_size=2)
    history = train(model, MixtureGuide(model), (x, y), epochs=4, batch_size=16, kl_annealing_epochs=2, progress=False)
    # 4 steps per epoch, annealing over 8 steps: beta = min(1, step / 8) at the last step of each epoch
    assert history.column("kl_weight") == pytest.approx([0.5, 1.0, 1.0, 1.0])


def test_learning_rate_warmup_and_step_decay():
    config = TrainConfig(warmup_epochs=1, decay_epochs=(2, 3), decay_rate=0.1)
    factors = [config.lr_factor(step, 10) for step in range(40)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert (
        factors[19] == pytest.approx(1.0) and factors[20] == pytest.approx(0.1) and factors[30] == pytest.approx(0.01)
    )


def test_nan_loss_stops_before_the_update_and_names_the_step():
    x, y = separable(64)
    model = rank1_mlp(2, [4], 2, ensemble_size=2)
    guide = MixtureGuide(model)
    snapshots = []

    class Recording(FailingELBO):
        def loss_terms(self, model_, guide_, *args, **kwargs):
            snapshots.append([p.detach().clone() for p in [*model.parameters(), *guide.parameters()]])
            return super().loss_terms(model_, guide_, *args, **kwargs)

    with pytest.raises(NonFiniteLossError, match=r"loss is nan at epoch 1, step 1 \(global step 5\)"):
        train(model, guide, (x, y), objective=Recording(fail_at=5), epochs=3, batch_size=16, progress=False)
    now = [p.detach() for p in [*model.parameters(), *guide.parameters()]]
    assert all(torch.equal(a, b) for a, b in zip(now, snapshots[-1]))  # the last good values
    assert all(torch.isfinite(p).all() for p in now)


@pytest.fixture(params=["fused", "unfused"])
def kernels(request, monkeypatch):
    """Both guards of the training step: with fused optimizer kernels the non-finite flags stay on
    the device (read every few steps); where the optimizer has none (a device or dtype without
    them: here an Adam that refuses ``fused=True``) the loss and the gradient norm are read every step."""
    if request.param == "unfused":
        adam = torch.optim.Adam

        def without_fused(*args, fused=None, **kwargs):
            if fused:
                raise RuntimeError("fused=True requires a device and dtype with fused kernels")
            return adam(*args, **kwargs)

        monkeypatch.setattr(torch.optim, "Adam", without_fused)
    return request.param


def _recording(base, model, guide, snapshots):
    class Recording(base):
        def loss_terms(self, *args, **kwargs):
            snapshots.append([p.detach().clone() for p in [*model.parameters(), *guide.parameters()]])
            return super().loss_terms(*args, **kwargs)

    return Recording


@pytest.mark.parametrize("failure", ["loss", "gradient"])
def test_either_guard_stops_a_nan_loss_or_gradient_before_the_update(kernels, failure):
    """A NaN loss, and a finite loss with a NaN gradient, stop training before the update, naming the
    step, with or without fused kernels; the parameters hold the values the bad step started from
    (the fused guard reads its flag at the epoch's end: the steps after the bad one are skipped)."""
    x, y = separable(64)
    model = rank1_mlp(2, [4], 2, ensemble_size=2)
    guide = MixtureGuide(model)
    snapshots = []
    if failure == "loss":
        objective = _recording(FailingELBO, model, guide, snapshots)(fail_at=5)
        match = r"loss is nan at epoch 1, step 1 \(global step 5\)"
    else:
        params = [*model.parameters(), *guide.parameters()]
        objective = _recording(InfiniteGradientELBO, model, guide, snapshots)(params, fail_at=6)
        match = r"gradient norm is nan at epoch 1, step 2 \(global step 6\)"
    with pytest.raises(NonFiniteLossError, match=match):
        train(model, guide, (x, y), objective=objective, epochs=3, batch_size=16, progress=False)
    now = [p.detach() for p in [*model.parameters(), *guide.parameters()]]
    bad = 5 if failure == "loss" else 6  # snapshots[i]: the parameters global step i starts from
    assert all(torch.equal(a, b) for a, b in zip(now, snapshots[bad], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(now, snapshots[0], strict=True))  # the good steps did update


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_training_without_fused_kernels_takes_the_same_steps(monkeypatch, optimizer):
    """Where the optimizer has no fused kernels (here one that refuses ``fused=True``), training falls
    back to the plain one and reaches the same parameters from the same seed (SGD: the step scales
    with the gradient, so the per-example loss ``loss / N`` is checked too)."""
    x, y = separable(64)

    def trained():
        torch.manual_seed(0)
        model = rank1_mlp(2, [4], 2, ensemble_size=2)
        guide = MixtureGuide(model)
        train(model, guide, (x, y), epochs=2, batch_size=16, progress=False, seed=0, optimizer=optimizer, lr=0.05)
        return torch.cat([p.detach().flatten() for p in [*model.parameters(), *guide.parameters()]])

    fused = trained()
    name = {"adam": "Adam", "sgd": "SGD"}[optimizer]
    cls, calls = getattr(torch.optim, name), []

    def without_fused(*args, fused=None, **kwargs):
        calls.append(fused)
        if fused:
            raise RuntimeError("fused=True requires a device and dtype with fused kernels")
        return cls(*args, **kwargs)

    monkeypatch.setattr(torch.optim, name, without_fused)
    unfused = trained()
    assert calls == [True, None]
    torch.testing.assert_close(unfused, fused, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(epochs=-1), ValueError, "epochs"),
        (dict(lr=0.0), ValueError, "lr"),
        (dict(optimizer="rmsprop"), ValueError, "optimizer: unknown name"),
        (dict(objective="elbo"), ValueError, "objective: unknown name"),
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(data=(torch.randn(3, 2), torch.zeros(4, dtype=torch.long))), ValueError, "different numbers"),
        (dict(data=(torch.randn(0, 2), torch.zeros(0, dtype=torch.long))), ValueError, "the data set is empty"),
        (
            dict(data=DataLoader(TensorDataset(torch.randn(0, 2)), batch_size=4)),
            ValueError,
            "training data set is empty",
        ),
        (dict(data=[1, 2, 3]), TypeError, "DataLoader or a pair"),
    ],
)
def test_bad_training_arguments(kwargs, error, match):
    model = rank1_mlp(2, [4], 2, ensemble_size=2)
    args = dict(data=separable(16))
    args.update(kwargs)
    data = args.pop("data")
    with pytest.raises(error, match=match):
        train(model, MixtureGuide(model), data, progress=False, **args)


def test_device_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="device"):
        resolve_device("tpu9")


# ------------------------------------------------------------------------------------------
# Progress and per-epoch logging
# ------------------------------------------------------------------------------------------
def _tiny(steps_per_epoch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16 * steps_per_epoch, 2, generator=g), torch.randint(0, 2, (16 * steps_per_epoch,), generator=g)
    model = rank1_mlp(2, [8], 2, ensemble_size=2)
    return model, MixtureGuide(model), (x, y)


def test_without_a_terminal_progress_is_one_line_per_epoch_on_stderr(capsys):
    model, guide, data = _tiny()
    train(model, guide, data, epochs=3, batch_size=16, seed=0)  # progress=None; pytest's stderr is no terminal
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 3, err
    for i, line in enumerate(lines, start=1):
        assert line.startswith(f"epoch {i}/3  loss ") and "  kl " in line and "  accuracy " in line, line
    train(model, guide, data, epochs=1, batch_size=16, seed=0, progress=False)
    assert capsys.readouterr().err == ""


def test_the_progress_bar_shows_loss_accuracy_and_kl_and_reads_the_device_every_few_steps(capsys):
    from test_host_sync import count_host_reads

    from rank1_pyro.inference.progress import refresh_every

    assert [refresh_every(n) for n in (1, 4, 10, 24, 200, 1000)] == [1, 4, 10, 10, 10, 50]
    reads = {}
    for progress in (False, "bar"):
        model, guide, data = _tiny(steps_per_epoch=24)
        with count_host_reads() as counts:
            train(model, guide, data, epochs=2, batch_size=16, seed=0, progress=progress)
        reads[progress] = counts["n"]
    assert reads["bar"] - reads[False] == 2 * (24 // 10)  # one read per refresh, not one per step
    err = capsys.readouterr().err
    assert "epoch 2/2" in err and "48/48" in err
    for key in ("loss=", "nll=", "kl=", "accuracy="):
        assert key in err, err[-500:]


def test_on_epoch_and_log_csv_see_every_epoch_as_it_ends(tmp_path):
    import csv

    seen = []

    def on_epoch(history):
        rows = list(csv.DictReader(open(tmp_path / "log.csv")))  # the CSV row is already there
        seen.append((history.last["epoch"], len(history.epochs), len(rows), history.seconds > 0))

    model, guide, data = _tiny()
    history = train(
        model,
        guide,
        data,
        epochs=3,
        batch_size=16,
        seed=0,
        progress=False,
        on_epoch=on_epoch,
        log_csv=tmp_path / "log.csv",
    )
    assert seen == [(1, 1, 1, True), (2, 2, 2, True), (3, 3, 3, True)]
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert [float(r["loss"]) for r in rows] == history.column("loss")
    assert [float(r["kl"]) for r in rows] == history.column("kl")
    with pytest.raises(TypeError, match="^on_epoch must be a callable taking the History, got str$"):
        train(model, guide, data, epochs=1, progress=False, on_epoch="print")
    with pytest.raises(ValueError, match="progress"):
        train(model, guide, data, epochs=1, progress="verbose")


def test_resuming_an_unordered_loader_mid_epoch_warns_at_the_caller_of_train(tmp_path):
    from torch.utils.data import DataLoader, Sampler, TensorDataset

    class Backwards(Sampler):  # a sampler train cannot re-order: resuming skips batches by reading them
        def __iter__(self):
            return iter(range(31, -1, -1))

        def __len__(self):
            return 32

    def loader():
        return DataLoader(TensorDataset(*separable(32)), batch_size=4, sampler=Backwards())

    model = rank1_mlp(2, [4], 2, ensemble_size=2)
    guide = MixtureGuide(model)
    options = dict(epochs=1, progress=False, seed=0, checkpoint_dir=tmp_path, checkpoint_every=2)
    with pytest.raises(KeyboardInterrupt):
        train(model, guide, loader(), objective=StopAt(4), **options)
    with pytest.warns(UserWarning, match="consumed batches are skipped by reading them") as caught:
        train(model, guide, loader(), resume=True, **options)
    import rank1_pyro.inference.train as T

    caller = __file__  # the user's call of train; under mutmut its trampoline sits between them
    if hasattr(T.train, "__wrapped__"):
        caller = sys.modules["mutmut.mutation.trampoline"].__file__
    assert [w.filename for w in caught] == [caller]


def test_without_a_seed_every_rank_draws_from_rank_0s_seed(monkeypatch):
    import pyro

    from rank1_pyro.inference import distributed as D

    monkeypatch.setattr(D, "broadcast_int", lambda value, device, src=0: 1234)  # rank 0's draw, on every rank
    data_seed = D.seed_ranks(None, D.DistributedContext(world_size=2, rank=1, enabled=True), torch.device("cpu"))
    draw = torch.rand(3)
    pyro.set_rng_seed(1234)
    assert data_seed == int(torch.randint(0, 2**31, ()).item())  # the data order's seed: the same on every rank
    assert torch.equal(draw, torch.rand(3))
    assert D.seed_ranks(7, D.SINGLE_PROCESS, torch.device("cpu")) == 7


def test_factor_lr_scales_the_step_of_the_guide_parameters_only():
    """One plain SGD step (no momentum) from the same start and draws: the guide's parameters move
    factor_lr times as far, the network's weights exactly as far."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, generator=g), torch.randint(0, 2, (32,), generator=g)

    def one_step(factor_lr):
        torch.manual_seed(0)
        model = rank1_mlp(3, [8], 2, ensemble_size=2)
        guide = MixtureGuide(model)
        guide(x)  # parameters exist before training starts
        start = [p.detach().clone() for p in [*model.parameters(), *guide.parameters()]]
        config = TrainConfig(epochs=1, batch_size=32, optimizer="sgd", momentum=0.0, lr=0.1, seed=0, progress=False)
        train(model, guide, (x, y), config, factor_lr=factor_lr)
        moved = [p.detach() - s for p, s in zip([*model.parameters(), *guide.parameters()], start)]
        return moved[: len(list(model.parameters()))], moved[len(list(model.parameters())) :]

    net_1, guide_1 = one_step(1.0)
    net_q, guide_q = one_step(0.25)
    for a, b in zip(net_1, net_q):
        torch.testing.assert_close(b, a)
    assert any(a.abs().max() > 0 for a in guide_1)
    for a, b in zip(guide_1, guide_q):
        torch.testing.assert_close(b, 0.25 * a)
    with pytest.raises(ValueError, match="factor_lr must be > 0, got 0"):
        TrainConfig(factor_lr=0)


def test_a_model_and_guide_without_parameters_is_refused_before_training():
    """A model with nothing to learn (no parameters, no ``outputs`` or ``num_data`` of a rank-1
    network) and the default empty guide: train says so instead of stepping an empty optimizer."""
    import pyro
    import pyro.distributions as dist
    from torch import nn

    class Fixed(nn.Module):
        def forward(self, x, y=None):
            with pyro.plate("data", x.shape[0]):
                pyro.sample("obs", dist.Categorical(logits=torch.zeros(x.shape[0], 2)), obs=y)

    with pytest.raises(ValueError, match="^nothing to train: the model and guide have no trainable parameters$"):
        train(Fixed(), None, separable(16), epochs=1, batch_size=8, progress=False)


def test_either_guard_names_a_late_out_of_range_label_before_the_update(kernels):
    """A label outside 0..C-1 in a later batch of a DataLoader (not seen by the up-front check)
    stops training with the labels' message, not a NaN-loss one, naming the step, with or without
    fused kernels; the parameters hold the values that step started from."""
    x, y = separable(64)
    y = y.clone()
    y[40] = 2  # the third batch of 16 (global step 2) of a two-class model
    model = rank1_mlp(2, [4], 2, ensemble_size=2)
    guide = MixtureGuide(model)
    snapshots = []
    objective = _recording(MixtureELBO, model, guide, snapshots)()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    message = (
        "labels out of range at epoch 0, step 2 (global step 2): expected 0..1; "
        "training stopped before the update, parameters hold their last good values"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        train(model, guide, loader, objective=objective, epochs=1, progress=False)
    now = [p.detach() for p in [*model.parameters(), *guide.parameters()]]
    assert all(torch.equal(a, b) for a, b in zip(now, snapshots[2], strict=True))


@pytest.mark.parametrize(
    ("y", "flag", "clamped"),
    [
        (torch.tensor([0, 1, 1]), False, [0, 1, 1]),
        (torch.tensor([-1, 0, 2]), True, [0, 0, 1]),
        (torch.tensor([0, 3]), True, [0, 1]),
    ],
)
def test_integer_labels_are_flagged_and_clamped_into_range(y, flag, clamped):
    """The step's label check (no host read): a flag true iff a label lies outside 0..C-1, and the
    labels clamped into range so no indexing kernel sees one; other targets pass through unflagged."""
    from rank1_pyro.inference.train import _label_flag

    got, out = _label_flag(y, 2)
    assert bool(got) is flag and out.tolist() == clamped
    for target in (y.float(), y > 0, y.to(torch.complex64)):
        got, out = _label_flag(target, 2)
        assert got is None and out is target
    got, out = _label_flag(y, None)
    assert got is None and out is y


def test_precision_fp32_computes_in_full_precision_and_bf16_under_autocast():
    """``precision="fp32"`` runs the step without autocast; ``"bf16"`` under CPU autocast to bfloat16
    (a matmul then returns bfloat16)."""
    from rank1_pyro.inference.train import _autocast

    a = torch.randn(3, 3, generator=torch.Generator().manual_seed(0))
    with _autocast(torch.device("cpu"), "fp32"):
        assert not torch.is_autocast_enabled("cpu") and (a @ a).dtype == torch.float32
    with _autocast(torch.device("cpu"), "bf16"):
        assert torch.is_autocast_enabled("cpu") and (a @ a).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "options",
    [
        dict(momentum=0.9, nesterov=True, weight_decay=0.05),
        dict(momentum=0.9, nesterov=False, weight_decay=0.0),
        dict(momentum=0.5, nesterov=True, weight_decay=0.0, grad_clip=0.1),
    ],
    ids=["nesterov-decay", "heavy-ball", "clipped"],
)
def test_sgd_steps_of_a_deterministic_network_are_a_plain_pytorch_loop(options):
    """A network without factors and no guide (MAP training) takes, batch for batch, the steps of a
    hand-written PyTorch loop: the mean cross-entropy of the batch (the per-example loss −ELBO / N),
    its gradient norm clipped to ``grad_clip``, then ``torch.optim.SGD`` with the same momentum,
    Nesterov flag and L2 weight decay."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 3, generator=g), torch.randint(0, 3, (24,), generator=g)
    torch.manual_seed(0)
    net = mlp(3, [5], 3)
    reference = mlp(3, [5], 3)
    reference.load_state_dict(net.state_dict())
    start = {k: v.clone() for k, v in net.state_dict().items()}
    model = Rank1Model(net, ensemble_size=1)
    # full batches of the whole set: the data order cannot matter
    train(model, None, (x, y), epochs=3, batch_size=24, optimizer="sgd", lr=0.2, progress=False, seed=0, **options)

    options = dict(options)  # the parametrization's own dict is shared by every run of the test in a process
    clip = options.pop("grad_clip", None)
    opt = torch.optim.SGD(reference.parameters(), lr=0.2, **options)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(reference(x), y).backward()
        if clip is not None:
            assert torch.nn.utils.clip_grad_norm_(reference.parameters(), clip) > 2 * clip  # clipping acts
        opt.step()
    for (name, a), b in zip(net.named_parameters(), reference.parameters(), strict=True):
        assert not torch.equal(a, start[name]), name  # every tensor moved, so the equality says something
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("loader", [False, True], ids=["pair", "loader"])
def test_inputs_of_another_float_dtype_train_as_the_model_dtype(model_dtype, loader):
    """Floating-point inputs of another dtype (numpy's float64 into a float32 network, float32 into a
    float64 one), given as a pair or by a DataLoader, are cast to the parameters' dtype at the
    boundary: training takes exactly the steps it takes on inputs of the model's own dtype."""
    x, y = separable(48)
    other = torch.float64 if model_dtype == torch.float32 else torch.float32

    def trained(inputs):
        torch.manual_seed(0)
        model = rank1_mlp(2, [4], 2, ensemble_size=2).to(model_dtype)
        guide = MixtureGuide(model).to(model_dtype)
        data = DataLoader(TensorDataset(inputs, y), batch_size=16) if loader else (inputs, y)
        train(model, guide, data, epochs=2, batch_size=16, progress=False, seed=0)
        return [p.detach() for p in [*model.parameters(), *guide.parameters()]]

    own = trained(x.to(model_dtype))
    cast = trained(x.to(other).numpy() if not loader else x.to(other))
    assert all(p.dtype == model_dtype for p in own)
    assert all(torch.equal(a, b) for a, b in zip(own, cast, strict=True))


def test_a_pyro_autoguide_never_called_before_is_trained():
    """An autoguide builds its parameters on its first call: ``train`` calls it on the first batch
    before it builds the optimizer, so those parameters are trained (they move every epoch)."""
    from pyro.infer.autoguide import AutoNormal

    from rank1_pyro.layers import factor_sites

    x, y = separable(64)
    model = rank1_mlp(2, [4], 2, ensemble_size=2)
    guide = AutoNormal(model)
    seen = []
    train(
        model,
        guide,
        (x, y),
        epochs=2,
        batch_size=16,
        lr=0.05,
        progress=False,
        seed=0,
        on_epoch=lambda h: seen.append([p.detach().clone() for p in guide.parameters()]),
    )
    assert len(seen) == 2 and len(seen[0]) == 2 * len(factor_sites(model))  # a loc and a scale per factor
    assert all(not torch.equal(a, b) for a, b in zip(*seen, strict=True))


def test_batches_with_more_tensors_train_on_the_first_two_and_time_is_the_runs_own(tmp_path):
    """A DataLoader whose batches carry more than ``(x, y)`` (here each example's index) trains on the
    first two, as the same pair does; ``history.seconds`` of a new run is the time spent inside ``train``; a run
    resumed mid-epoch on tensors (whose order ``train`` controls) gives no warning."""
    import time
    import warnings

    from faulty_objectives import StopAt

    x, y = separable(64)

    def trained(data, **options):
        torch.manual_seed(0)
        model = rank1_mlp(2, [4], 2, ensemble_size=2)
        guide = MixtureGuide(model)
        begin = time.perf_counter()
        history = train(model, guide, data, epochs=2, batch_size=16, progress=False, seed=0, **options)
        if not options.get("resume"):  # a resumed run's time includes the interrupted run's
            assert 0 < history.seconds <= time.perf_counter() - begin
        return [p.detach() for p in [*model.parameters(), *guide.parameters()]]

    pair = trained((x, y))
    loader = DataLoader(TensorDataset(x, y, torch.arange(64)), batch_size=16, shuffle=True)
    assert all(torch.equal(a, b) for a, b in zip(pair, trained(loader), strict=True))
    options = dict(checkpoint_dir=tmp_path, checkpoint_every=2, objective="mixture")
    with pytest.raises(KeyboardInterrupt):
        trained((x, y), **{**options, "objective": StopAt(4)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed = trained((x, y), resume=True, **options)
    assert all(torch.equal(a, b) for a, b in zip(trained((x, y), objective="mixture"), resumed, strict=True))


def test_a_regression_network_takes_integer_targets_as_numbers_not_labels():
    """Only a categorical network's targets are class labels checked against its outputs: a
    ``likelihood="normal"`` network trains on integer-valued targets exactly as on the same floats
    (and on float64 targets, cast to its float32, too)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 2, generator=g)
    y = (3 * x[:, 0]).round().long()  # values from about -7 to 7 for a network with one output

    def trained(targets):
        torch.manual_seed(0)
        model = rank1_mlp(2, [4], 1, ensemble_size=2, likelihood="normal")
        guide = MixtureGuide(model)
        train(model, guide, (x, targets), epochs=2, batch_size=8, progress=False, seed=0)
        return [p.detach() for p in [*model.parameters(), *guide.parameters()]]

    floats = trained(y.float())
    assert all(torch.equal(a, b) for a, b in zip(trained(y), floats, strict=True))
    noisy = y.double() + 0.1 * torch.randn(32, generator=g, dtype=torch.float64)
    floats = trained(noisy.float())
    assert all(torch.equal(a, b) for a, b in zip(trained(noisy.numpy()), floats, strict=True))  # cast to float32


def test_the_device_guard_stops_a_long_epoch_at_its_next_periodic_read():
    """With fused kernels the guard reads its device flag every ``GUARD_READ_EVERY`` (100) steps: a NaN
    loss in step 10 of a 200-step epoch stops training at the read after step 100, not at the epoch's
    end (the skipped steps between change nothing); the error names step 10."""
    from rank1_pyro.inference.train import GUARD_READ_EVERY

    assert GUARD_READ_EVERY == 100
    x, y = separable(200)
    model = rank1_mlp(2, [4], 2, ensemble_size=2)
    objective = FailingELBO(fail_at=10)
    with pytest.raises(NonFiniteLossError, match=r"^loss is nan at epoch 0, step 10 \(global step 10\); "):
        train(model, MixtureGuide(model), (x, y), objective=objective, epochs=1, batch_size=1, progress=False)
    assert objective.calls == 100


def test_any_pyro_model_and_guide_train():
    """``train`` is not tied to rank-1 networks: a plain Pyro model (Bayesian linear regression, no
    ``likelihood`` or ``outputs``) with an autoguide trains, and its posterior mean of the slope
    approaches the exact conjugate one."""
    import pyro
    import pyro.distributions as dist
    from pyro.infer.autoguide import AutoNormal
    from torch import nn

    class Regression(nn.Module):
        def forward(self, x, y=None):
            w = pyro.sample("w", dist.Normal(0.0, 1.0))
            with pyro.plate("data", x.shape[0]):
                pyro.sample("obs", dist.Normal(w * x, 0.5), obs=y)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, generator=g)
    y = 1.5 * x + 0.5 * torch.randn(64, generator=g)
    guide = AutoNormal(Regression())
    history = train(Regression(), guide, (x, y), epochs=300, batch_size=64, lr=0.05, progress=False, seed=0)
    precision = 1.0 + (x @ x) / 0.25  # the exact posterior of w: N(mean, 1 / precision)
    mean = (x @ y) / 0.25 / precision
    assert guide.median()["w"].item() == pytest.approx(mean.item(), abs=0.05)  # within one posterior std (0.06)
    assert history.last["loss"] < history.epochs[0]["loss"]


def test_validation_is_the_monte_carlo_predictive_of_model_and_guide_with_eval_samples():
    """Each epoch's ``val_*`` entries are :func:`evaluate` of the model *and guide* with
    ``eval_samples`` draws, on a fork of the random state: called from ``on_epoch`` (the state is the
    one validation started from), ``evaluate`` returns the same numbers; ``history.seconds`` there is
    the time trained so far."""
    import time

    model, guide, data = _tiny()
    val = separable(40, seed=3)
    seen = []

    def on_epoch(history):
        with torch.random.fork_rng():
            again = evaluate(model, guide, val, num_samples=3)
        seen.append(({f"val_{k}": v for k, v in again.items()}, history.seconds <= time.perf_counter() - begin))

    begin = time.perf_counter()
    history = train(
        model,
        guide,
        data,
        epochs=2,
        batch_size=16,
        seed=0,
        progress=False,
        val_data=val,
        eval_samples=3,
        on_epoch=on_epoch,
    )
    assert [ok for _, ok in seen] == [True, True]
    for (expected, _), record in zip(seen, history.epochs, strict=True):
        assert expected.keys() <= record.keys() and {k: record[k] for k in expected} == expected
    assert seen[0][0] != seen[1][0]


def test_a_parameter_without_a_gradient_in_a_step_is_not_stepped():
    """Gradients are reset to ``None`` before each step, so a parameter the loss of a step does not
    reach is left alone by the optimizer (Adam's momentum does not move it on)."""
    x, y = separable(64)
    model = rank1_mlp(2, [4], 2, ensemble_size=2)
    guide = MixtureGuide(model)
    guide.register_parameter("extra", torch.nn.Parameter(torch.ones(3)))
    after = []

    class FirstStepOnly(MixtureELBO):  # the extra parameter is in the loss of the first step only
        calls = 0

        def loss_terms(self, *args, **kwargs):
            terms = super().loss_terms(*args, **kwargs)
            FirstStepOnly.calls += 1
            after.append(guide.extra.detach().clone())
            if FirstStepOnly.calls == 1:
                return terms._replace(loss=terms.loss + 64 * (guide.extra**2).sum())
            return terms

    train(model, guide, (x, y), objective=FirstStepOnly(), epochs=1, batch_size=16, lr=0.1, progress=False)
    assert FirstStepOnly.calls == 4
    assert not torch.equal(after[1], after[0])  # the first step moved it
    assert all(torch.equal(a, after[1]) for a in after[2:]) and torch.equal(guide.extra.detach(), after[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_on_cuda_moves_everything_there_and_takes_the_cpu_steps():
    """On a CUDA device (``make gpu-check``) model, guide, batches, the guard's flags and validation
    run there, from CPU data of another dtype, and training takes the CPU's steps (float tolerance);
    ``precision="bf16"`` autocasts to bfloat16 there too (CUDA's own default would be float16)."""
    from rank1_pyro.inference.train import _autocast

    x, y = separable(64)
    val = separable(32, seed=1)

    def trained(device):
        torch.manual_seed(0)
        model = rank1_mlp(2, [4], 2, ensemble_size=2)
        guide = MixtureGuide(model)
        data = DataLoader(TensorDataset(x.double(), y), batch_size=16)
        history = train(model, guide, data, epochs=2, progress=False, seed=0, device=device, val_data=val)
        params = [p.detach() for p in [*model.parameters(), *guide.parameters()]]
        return params, history

    cpu, cpu_history = trained("cpu")
    gpu, gpu_history = trained("cuda")
    assert all(p.device.type == "cuda" for p in gpu)
    for a, b in zip(cpu, gpu, strict=True):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-5)
    assert gpu_history.last["loss"] == pytest.approx(cpu_history.last["loss"], rel=1e-4)
    a = torch.randn(3, 3, device="cuda")
    with _autocast(torch.device("cuda"), "bf16"):
        assert (a @ a).dtype == torch.bfloat16


def test_the_bar_shows_the_running_nll_kl_and_accuracy_mid_epoch(capsys):
    """Between epochs' ends the bar's postfix holds the epoch's running means: NLL and KL (the
    objective reports them) and accuracy (a categorical network), here after the refresh at step 10
    of an epoch interrupted at step 15."""
    from faulty_objectives import StopAt

    model, guide, data = _tiny(steps_per_epoch=24)
    with pytest.raises(KeyboardInterrupt):
        train(model, guide, data, epochs=1, batch_size=16, seed=0, progress="bar", objective=StopAt(16))
    err = capsys.readouterr().err
    assert "10/24" in err and "epoch 1/1" in err
    for key in ("loss=", "nll=", "kl=", "accuracy="):
        assert key in err, err[-500:]


def test_pyro_checks_the_model_on_the_first_step_only():
    """Pyro's argument and support checks run on the first step: an invalid distribution parameter is
    a ValueError naming it there, not a NaN loss later."""
    import pyro
    import pyro.distributions as dist
    from torch import nn

    class BadScale(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(-1.0))

        def forward(self, x, y=None):
            with pyro.plate("data", x.shape[0]):
                pyro.sample("obs", dist.Normal(x[:, 0], self.scale), obs=y)

    x, y = separable(32)
    assert pyro.infer.util.is_validation_enabled()
    with pytest.raises(ValueError, match="scale"):
        train(BadScale(), None, (x, y.float()), epochs=1, batch_size=8, progress=False)
