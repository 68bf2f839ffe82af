"""The training step reads nothing back to the host: running sums and the non-finite guard stay on the
device and are read once per epoch (or every GUARD_READ_EVERY steps), which keeps a GPU pipeline full."""

import contextlib

import pytest
import torch

from rank1_pyro import MixtureGuide, rank1_mlp
from rank1_pyro.inference.train import train


@contextlib.contextmanager
def count_host_reads():
    """Count the Tensor methods that copy a value to the host (item, bool, float, int, tolist)."""
    counts = {"n": 0}
    names = ["item", "__bool__", "__float__", "__int__", "tolist", "__index__"]
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def wrap(name):
        original = saved[name]

        def counted(self, *args, **kwargs):
            counts["n"] += 1
            return original(self, *args, **kwargs)

        return counted

    for name in names:
        setattr(torch.Tensor, name, wrap(name))
    try:
        yield counts
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)


def _reads(epochs, steps_per_epoch, **kwargs):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16 * steps_per_epoch, 2, generator=g), torch.randint(0, 2, (16 * steps_per_epoch,), generator=g)
    model = rank1_mlp(2, [8], 2, ensemble_size=2)
    guide = MixtureGuide(model)
    with count_host_reads() as counts:
        train(model, guide, (x, y), epochs=epochs, batch_size=16, progress=False, seed=0, **kwargs)
    return counts["n"]


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_training_steps_make_no_host_reads(optimizer):
    """Host reads grow with the epochs (a fixed number each), not with the steps."""
    few = _reads(epochs=2, steps_per_epoch=4, optimizer=optimizer, lr=1e-2)
    many = _reads(epochs=2, steps_per_epoch=24, optimizer=optimizer, lr=1e-2)
    # 40 more steps in all: the reads must not grow with them (a per-step read would add 40 or more;
    # the counts differ by a few reads that depend on the data set's size, not on the steps)
    assert abs(many - few) <= 8, (few, many)


def test_bf16_precision_gives_the_fp32_loss_within_tolerance_and_finite_gradients():
    from rank1_pyro import AveragedELBO
    from rank1_pyro.inference.train import _autocast

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
    model = rank1_mlp(8, [64, 64], 3, ensemble_size=4, num_data=64)
    guide = MixtureGuide(model)
    losses = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(1)  # the same factor draws
        with _autocast(torch.device("cpu"), precision):
            loss = AveragedELBO().differentiable_loss(model, guide, x, y)
        model.zero_grad()
        guide.zero_grad()
        loss.backward()
        grads = [p.grad for p in [*model.parameters(), *guide.parameters()] if p.grad is not None]
        assert grads and all(torch.isfinite(t).all() for t in grads)
        assert loss.dtype == torch.float32  # the loss (and the KL) stay float32
        losses[precision] = loss.detach()
    torch.testing.assert_close(losses["bf16"], losses["fp32"], rtol=2e-2, atol=0.0)
    assert not torch.equal(losses["bf16"], losses["fp32"])  # autocast did run the matmuls in bf16
    history = train(model, guide, (x, y), epochs=2, batch_size=32, precision="bf16", progress=False, seed=0)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in history.epochs)
    with pytest.raises(ValueError, match="precision: unknown name 'fp8'"):
        train(model, guide, (x, y), epochs=1, precision="fp8", progress=False)
