"""A data-parallel training script for tests/test_distributed.py (not collected by pytest).

    python -m torch.distributed.run --nproc_per_node=2 --standalone distributed_worker.py OUT_DIR

Every rank trains the same rank-1 MLP on its shard of each global batch (``distributed=True``,
gloo on the CPU) and writes its final state to ``OUT_DIR/rank<r>.pt``; rank 0 also writes a
checkpoint to ``OUT_DIR/ckpt``. A second model with BatchNorm (flat-batch layout) checks that
buffers end equal on all ranks too. :func:`run` with ``distributed=False`` is the
single-process reference on the same global batches.
"""

import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

from faulty_objectives import StopAt  # noqa: E402
from torch import nn  # noqa: E402

from rank1_pyro import MixtureELBO, MixtureGuide, Rank1Linear, Rank1Model, rank1_mlp  # noqa: E402
from rank1_pyro.inference.train import NonFiniteLossError, train  # noqa: E402

N, BATCH, EPOCHS, SEED = 128, 32, 2, 3  # 4 global steps per epoch


def data(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    return x, (x[:, 0] - x[:, 2] > 0).long()


def state(*modules) -> dict:
    return {f"{i}.{k}": v.detach().clone() for i, m in enumerate(modules) for k, v in m.state_dict().items()}


def run(distributed, checkpoint_dir=None, **kwargs):
    """Train the MLP; returns ``(state, history records)``."""
    torch.manual_seed(SEED)
    model = rank1_mlp(3, [8], 2, ensemble_size=2)
    guide = MixtureGuide(model)
    kwargs.setdefault("objective", "mixture")  # the interrupting StopAt (tests/faulty_objectives.py) is one
    history = train(
        model,
        guide,
        data(),
        epochs=EPOCHS,
        batch_size=BATCH,
        optimizer="sgd",
        lr=0.25,
        seed=SEED,
        progress=False,
        distributed=distributed,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=3 if checkpoint_dir else None,
        **kwargs,
    )
    return state(model, guide), history.epochs


def run_interrupted_then_resumed(checkpoint_dir):
    """Stopped in step 8 (the last checkpoint: step 6, mid-epoch 1), then resumed: returns run()'s result."""
    try:
        run(True, checkpoint_dir, objective=StopAt(8))
    except KeyboardInterrupt:
        pass
    position = torch.load(checkpoint_dir / "checkpoint.pt", weights_only=True)["position"]
    return (*run(True, checkpoint_dir, resume=True), position)


def run_batchnorm(distributed):
    torch.manual_seed(SEED)
    net = nn.Sequential(
        Rank1Linear(3, 8, ensemble_size=2), nn.BatchNorm1d(8), nn.ReLU(), Rank1Linear(8, 2, ensemble_size=2)
    )
    model = Rank1Model(net, flat_batch=True)
    guide = MixtureGuide(model)
    train(model, guide, data(), epochs=1, batch_size=BATCH, lr=0.02, seed=SEED, progress=False, distributed=distributed)
    return state(model, guide)


class NaNOnRank1(MixtureELBO):
    """The loss turns NaN on rank 1 only, from its third step on."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def loss_terms(self, *args, **kwargs):
        terms = super().loss_terms(*args, **kwargs)
        self.calls += 1
        if torch.distributed.get_rank() == 1 and self.calls >= 3:
            return terms._replace(loss=terms.loss * float("nan"))
        return terms


def run_nan():
    """Both ranks must stop at the same step, before the update: returns (message, params unchanged)."""
    torch.manual_seed(SEED)
    model = rank1_mlp(3, [8], 2, ensemble_size=2)
    guide = MixtureGuide(model)
    snapshots = []

    class Recording(NaNOnRank1):
        def loss_terms(self, *args, **kwargs):
            snapshots.append(state(model, guide))
            return super().loss_terms(*args, **kwargs)

    try:
        train(
            model,
            guide,
            data(),
            objective=Recording(),
            epochs=1,
            batch_size=BATCH,
            seed=SEED,
            progress=False,
            distributed=True,
        )
    except NonFiniteLossError as e:
        now = state(model, guide)
        return str(e), all(torch.equal(now[k], snapshots[-1][k]) for k in now)
    return "no error", False


if __name__ == "__main__":
    out = Path(sys.argv[1])
    result, history = run(True, checkpoint_dir=out / "ckpt")
    resumed, resumed_history, position = run_interrupted_then_resumed(out / "interrupted")
    bn = run_batchnorm(True)
    nan_message, nan_unchanged = run_nan()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.save(
        {
            "state": result,
            "history": history,
            "batchnorm": bn,
            "world_size": world,
            "nan_message": nan_message,
            "nan_unchanged": nan_unchanged,
            "resumed": resumed,
            "resumed_history": resumed_history,
            "interrupted_at": position,
        },
        out / f"rank{rank}.pt",
    )
    torch.distributed.destroy_process_group()
