"""The training loop: it learns, anneals the KL, schedules the learning rate, and guards against NaN."""

import pytest
import torch

from rank1_pyro import MixtureGuide, Rank1Model, mlp, rank1_mlp
from rank1_pyro.inference.train import NonFiniteLossError, _lr_factor, evaluate, resolve_device, train

from faulty_objectives import FailingELBO


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
    factors = [_lr_factor(step, 10, warmup_epochs=1, decay_epochs=(2, 3), decay_rate=0.1) for step in range(40)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[19] == pytest.approx(1.0) and factors[20] == pytest.approx(0.1) and factors[30] == pytest.approx(0.01)


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


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(epochs=-1), ValueError, "epochs"),
        (dict(lr=0.0), ValueError, "lr"),
        (dict(optimizer="rmsprop"), ValueError, "optimizer: unknown name"),
        (dict(objective="elbo"), ValueError, "objective: unknown name"),
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(data=(torch.randn(3, 2), torch.zeros(4, dtype=torch.long))), ValueError, "different numbers"),
        (dict(data=(torch.randn(0, 2), torch.zeros(0, dtype=torch.long))), ValueError, "empty"),
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
