"""Data-parallel training: torchrun with 2 gloo processes equals one process on the same global batch, and resumes exactly."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from faulty_objectives import FailingELBO, InfiniteGradientELBO
from torch.utils.data import DataLoader, TensorDataset

from rank1_pyro import MixtureELBO, MixtureGuide, rank1_mlp
from rank1_pyro.inference import distributed as D
from rank1_pyro.inference.distributed import training_loader as _training_loader
from rank1_pyro.inference.train import NonFiniteLossError, train

HERE = Path(__file__).resolve().parent
WORKER = HERE / "distributed_worker.py"
gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)


def _worker():
    spec = importlib.util.spec_from_file_location("distributed_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _clean_env():
    torchrun_keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in torchrun_keys}
    env["OMP_NUM_THREADS"] = "1"
    return env


@gloo
def test_torchrun_two_processes_equal_one_process_on_the_global_batch(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        str(WORKER),
        str(tmp_path),
    ]
    done = subprocess.run(cmd, env=_clean_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]

    # both ranks hold the same model, bit for bit (parameters and BatchNorm buffers)
    for key in ("state", "batchnorm"):
        a, b = ranks[0][key], ranks[1][key]
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), key

    # ... and it is the model one process trains on the same global batches (float tolerance)
    worker = _worker()
    single, single_history = worker.run(distributed=False)
    initial = worker.state(*_initial_model(worker))
    moved = 0
    for k, v in single.items():
        torch.testing.assert_close(ranks[0]["state"][k], v, rtol=1e-5, atol=1e-6, msg=k)
        moved += not torch.equal(v, initial[k])
    assert moved >= len(single) - 1  # training changed (nearly) every tensor, so the equality says something
    for dist_record, one_record in zip(ranks[0]["history"], single_history, strict=True):
        assert dist_record.keys() == one_record.keys()
        for k in one_record:  # loss, NLL, KL, accuracy summed over the ranks = the single process's
            assert dist_record[k] == pytest.approx(one_record[k], rel=1e-5), k

    # rank 0 wrote the checkpoint of the final state
    ckpt = torch.load(tmp_path / "ckpt" / "checkpoint.pt", weights_only=True)
    assert ckpt["position"] == {"step": 8, "epoch": 2, "batch": 0}
    assert ckpt["config"]["world_size"] == 2 and ckpt["config"]["batch_size"] == 32
    final = {**{f"0.{k}": v for k, v in ckpt["model"].items()}, **{f"1.{k}": v for k, v in ckpt["guide"].items()}}
    assert all(torch.equal(final[k], ranks[0]["state"][k]) for k in final)

    # a job interrupted mid-epoch and resumed under torchrun ends exactly where the uninterrupted job does
    for r in ranks:
        assert r["interrupted_at"] == {"step": 6, "epoch": 1, "batch": 2}
        assert all(torch.equal(r["resumed"][k], r["state"][k]) for k in r["state"])
        assert r["resumed_history"] == r["history"]

    # a NaN loss on rank 1 alone stops both ranks at the same step, before the update
    for r in ranks:
        assert r["nan_message"].startswith("loss is not finite on 1 of 2 processes at epoch 0, step 2 (global step 2)")
        assert r["nan_unchanged"]


def _initial_model(worker):
    torch.manual_seed(worker.SEED)
    model = rank1_mlp(3, [8], 2, ensemble_size=2)
    return model, MixtureGuide(model)


@gloo
def test_one_process_group_trains_exactly_like_no_group(tmp_path):
    """The distributed code path (all-reduce, broadcasts, sharded sampler) changes nothing with one process."""
    worker = _worker()
    single, single_history = worker.run(distributed=False)
    single_bn = worker.run_batchnorm(distributed=False)  # BatchNorm buffers: broadcast every step in a group
    dist.init_process_group("gloo", init_method=(tmp_path / "store").as_uri(), rank=0, world_size=1)
    try:
        grouped, grouped_history = worker.run(distributed="auto")  # "auto" picks up the initialised group
        grouped_bn = worker.run_batchnorm(distributed="auto")
    finally:
        dist.destroy_process_group()
    assert all(torch.equal(single[k], grouped[k]) for k in single)
    assert grouped_history == single_history
    assert single_bn.keys() == grouped_bn.keys() and any("running_mean" in k for k in single_bn)
    assert all(torch.equal(single_bn[k], grouped_bn[k]) for k in single_bn)


def test_sharded_batches_are_the_single_process_batches():
    """Global batch j over W ranks = positions [jB, (j+1)B) of randperm(N, seed + epoch)."""
    n, world, batch, seed, epoch = 96, 3, 12, 5, 2
    expected = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    shards = []
    for rank in range(world):
        sampler = D.ShardedSampler(range(n), num_replicas=world, rank=rank, seed=seed)
        sampler.set_epoch(epoch)
        shards.append(list(sampler))
    local = batch // world
    for j in range(n // batch):
        union = sorted(i for shard in shards for i in shard[j * local : (j + 1) * local])
        assert union == sorted(expected[j * batch : (j + 1) * batch].tolist())
    # starting mid-epoch skips exactly the consumed examples
    sampler = D.ShardedSampler(range(n), num_replicas=world, rank=1, seed=seed)
    sampler.set_position(epoch, start=2 * local)
    assert list(sampler) == shards[1][2 * local :] and len(sampler) == len(shards[1]) - 2 * local


def test_mode_detection(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    cpu = torch.device("cpu")
    assert D.setup(False, cpu) == (D.SINGLE_PROCESS, cpu)
    assert D.setup("auto", cpu) == (D.SINGLE_PROCESS, cpu)
    with pytest.raises(ValueError, match="distributed=True needs torchrun's environment"):
        D.setup(True, cpu)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert D.torchrun_env() == {"RANK": 0, "WORLD_SIZE": 1, "LOCAL_RANK": 0}
    assert D.setup("auto", cpu) == (D.SINGLE_PROCESS, cpu)  # a world of one is not worth a process group
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="inconsistent RANK, WORLD_SIZE, LOCAL_RANK"):
        D.torchrun_env()
    monkeypatch.setenv("RANK", "zero")
    with pytest.raises(ValueError, match="must be integers"):
        D.torchrun_env()


def test_global_batch_must_split_evenly_over_processes():
    x, y = torch.randn(40, 2), torch.zeros(40, dtype=torch.long)
    expected = r"batch_size=15 is the global batch and must be divisible by the number of processes \(2\)"
    with pytest.raises(ValueError, match=expected):
        _training_loader((x, y), 15, D.DistributedContext(world_size=2, rank=0, enabled=True), data_seed=0)
    loader, sampler = _training_loader(
        (x, y), 16, D.DistributedContext(world_size=2, rank=1, enabled=True), data_seed=0
    )
    assert loader.batch_size == 8 and len(sampler) == 20


def test_distributed_true_outside_torchrun_is_a_clear_error(monkeypatch, tmp_path):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    model = rank1_mlp(2, [4], 2, ensemble_size=2)
    x, y = torch.randn(8, 2), torch.zeros(8, dtype=torch.long)
    with pytest.raises(ValueError, match="launch with `torchrun --nproc_per_node=N script.py`"):
        train(
            model,
            MixtureGuide(model),
            (x, y),
            epochs=1,
            distributed=True,
            checkpoint_dir=tmp_path / "c",
            progress=False,
        )
    assert not (tmp_path / "c").exists()


@pytest.fixture
def group_of_one(tmp_path):
    """An initialised gloo process group of one process: ``train`` takes the data-parallel path (the
    all-reduce of gradients and of the non-finite flag, the broadcasts), in this process."""
    dist.init_process_group("gloo", init_method=(tmp_path / "store").as_uri(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


STOPPED = "training stopped before the update, parameters hold their last good values"


@gloo
@pytest.mark.parametrize(
    ("failure", "error", "message"),
    [
        ("loss", NonFiniteLossError, "loss is not finite on 1 of 1 processes at epoch 1, step 1 (global step 5) "),
        ("gradient", NonFiniteLossError, "gradient norm is nan at epoch 1, step 2 (global step 6); "),
        ("label", ValueError, "labels out of range at epoch 0, step 2 (global step 2) on rank 0: expected 0..1; "),
    ],
)
def test_in_a_process_group_a_bad_step_stops_before_the_update(group_of_one, failure, error, message):
    """Data-parallel training reads the loss's finiteness through the gradients' all-reduce: a NaN
    loss (this rank's value in the message), a NaN gradient or an out-of-range label stops training
    with its own message before the update; the parameters hold the values the bad step started
    from, and no gradient is left behind."""
    from test_train import _recording, separable

    x, y = separable(64)
    model = rank1_mlp(2, [4], 2, ensemble_size=2)
    guide = MixtureGuide(model)
    params, snapshots = [*model.parameters(), *guide.parameters()], []
    if failure == "loss":
        objective, bad = _recording(FailingELBO, model, guide, snapshots)(fail_at=5), 5
        message += "(this rank's: nan); "
    elif failure == "gradient":
        objective, bad = _recording(InfiniteGradientELBO, model, guide, snapshots)(params, fail_at=6), 6
    else:
        y = y.clone()
        y[40] = 2  # the third batch of 16 of a DataLoader, past the up-front check of a pair
        objective, bad = _recording(MixtureELBO, model, guide, snapshots)(), 2
    data = DataLoader(TensorDataset(x, y), batch_size=16) if failure == "label" else (x, y)
    with pytest.raises(error, match=f"^{re.escape(message + STOPPED)}$"):
        train(model, guide, data, objective=objective, epochs=3, batch_size=16, progress=False, distributed=True)
    assert all(torch.equal(a, b) for a, b in zip(params, snapshots[bad], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(params, snapshots[0], strict=True))  # the good steps did update
    assert all(p.grad is None for p in params)
