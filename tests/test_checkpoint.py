"""Checkpoints: a SIGKILLed run resumes bit-identically; broken files give clear errors; writes are atomic."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from faulty_objectives import FailingELBO, StopAt
from torch.utils.data import DataLoader, TensorDataset

from rank1_pyro import MixtureELBO, MixtureGuide, rank1_mlp
from rank1_pyro.inference import checkpoint as C
from rank1_pyro.inference.checkpoint import CheckpointError, load_weights, read_checkpoint
from rank1_pyro.inference.train import NonFiniteLossError, train

WORKER = Path(__file__).resolve().parent / "checkpoint_worker.py"


def _run_worker(mode, run_dir, out):
    done = subprocess.run(
        [sys.executable, str(WORKER), mode, str(run_dir), str(out)],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out, weights_only=True)


def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path):
    reference = _run_worker("reference", tmp_path / "reference", tmp_path / "reference.pt")

    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), "interrupt", str(run), str(tmp_path / "never.pt")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        while not (run / "blocked").exists():  # the worker blocks inside step 15, three steps after a checkpoint
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the worker never reached its stop step"
            time.sleep(0.05)
        assert (run / "ckpt" / "checkpoint.pt").is_file()
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        proc.stderr.close()
    assert not (tmp_path / "never.pt").exists()
    ckpt = read_checkpoint(run / "ckpt" / "checkpoint.pt")
    # 8 steps per epoch, a checkpoint every 3 steps: the last one before step 15 is step 12, mid-epoch 1
    assert ckpt["position"] == {"step": 12, "epoch": 1, "batch": 4}
    assert len(ckpt["history"]["epochs"]) == 1

    resumed = _run_worker("resume", run, tmp_path / "resumed.pt")
    assert reference["state"].keys() == resumed["state"].keys()
    for k, v in reference["state"].items():
        assert torch.equal(v, resumed["state"][k]), k
    initial = ckpt["model"]["net.0.weight"]
    assert not torch.equal(initial, resumed["state"]["model.net.0.weight"])  # it did train after resuming
    assert resumed["history"] == reference["history"]  # every epoch's record, including the interrupted one


# ------------------------------------------------------------------------------------------
# In-process tests on a tiny run
# ------------------------------------------------------------------------------------------
def data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    return x, (x[:, 0] > x[:, 1]).long()


def fresh(hidden=4):
    torch.manual_seed(0)
    model = rank1_mlp(2, [hidden], 2, ensemble_size=2)
    return model, MixtureGuide(model)


def run(tmp_path, model=None, guide=None, train_data=None, **kwargs):
    if model is None:
        model, guide = fresh()
    args = dict(epochs=2, batch_size=8, seed=1, progress=False, checkpoint_dir=tmp_path / "ckpt")
    args.update(kwargs)
    history = train(model, guide, data() if train_data is None else train_data, **args)
    return model, guide, history


def params(*modules):
    return [p.detach().clone() for m in modules for p in m.state_dict().values()]


@pytest.mark.parametrize("loader", [False, True], ids=["tensors", "dataloader"])
def test_in_process_interrupt_and_resume_equal_an_uninterrupted_run(tmp_path, loader):
    def source():  # (x, y) tensors, or a user's shuffling DataLoader (train re-orders it by (seed, epoch))
        return DataLoader(TensorDataset(*data()), batch_size=8, shuffle=True) if loader else data()

    ref_model, ref_guide, ref_history = run(
        tmp_path / "a", train_data=source(), checkpoint_dir=None, val_data=data(16, 1)
    )
    model, guide = fresh()
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", model, guide, source(), objective=StopAt(9), checkpoint_every=2, val_data=data(16, 1))
    assert read_checkpoint(tmp_path / "b" / "ckpt" / "checkpoint.pt")["position"] == {"step": 8, "epoch": 1, "batch": 2}
    model, guide = fresh()  # a new process would rebuild the model from scratch
    _, _, history = run(tmp_path / "b", model, guide, source(), checkpoint_every=2, resume=True, val_data=data(16, 1))
    assert all(torch.equal(a, b) for a, b in zip(params(ref_model, ref_guide), params(model, guide), strict=True))
    assert history.epochs == ref_history.epochs


class EveryOther(torch.utils.data.Sampler):
    """A custom sampler: train cannot re-order it, so it is used as it is."""

    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return iter(range(0, self.n, 2))

    def __len__(self):
        return self.n // 2


def test_a_custom_sampler_resumes_by_skipping_batches_with_a_warning(tmp_path):
    def source():
        return DataLoader(TensorDataset(*data()), batch_size=4, sampler=EveryOther(48))

    ref = params(*run(tmp_path / "a", train_data=source(), checkpoint_dir=None)[:2])
    model, guide = fresh()
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", model, guide, source(), objective=StopAt(4), checkpoint_every=2)
    model, guide = fresh()
    with pytest.warns(UserWarning, match="consumed batches are skipped by reading them"):
        run(tmp_path / "b", model, guide, source(), checkpoint_every=2, resume=True)
    assert all(torch.equal(a, b) for a, b in zip(ref, params(model, guide)))  # exact here: the order is fixed


def test_resume_without_a_checkpoint_starts_afresh_and_a_finished_run_does_nothing(tmp_path):
    ref = params(*run(tmp_path / "a", checkpoint_dir=None)[:2])
    model, guide, history = run(tmp_path / "b", resume=True)
    assert all(torch.equal(a, b) for a, b in zip(ref, params(model, guide)))
    again_model, again_guide = fresh()
    _, _, again = run(tmp_path / "b", again_model, again_guide, resume=True)  # already at epoch 2 of 2
    assert all(torch.equal(a, b) for a, b in zip(ref, params(again_model, again_guide)))
    assert again.epochs == history.epochs


def test_rng_state_round_trip_covers_torch_random_and_numpy():
    state = C.rng_state()
    first = (torch.rand(3), random.random(), np.random.rand(2), np.random.randn())
    C.set_rng_state(torch.load(_saved(state), weights_only=True))  # through a weights_only file
    again = (torch.rand(3), random.random(), np.random.rand(2), np.random.randn())
    assert torch.equal(first[0], again[0]) and first[1] == again[1]
    assert np.array_equal(first[2], again[2]) and first[3] == again[3]


def _saved(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


# ------------------------------------------------------------------------------------------
# Broken and foreign files
# ------------------------------------------------------------------------------------------
@pytest.fixture
def good_checkpoint(tmp_path):
    run(tmp_path, epochs=1)
    return tmp_path / "ckpt" / "checkpoint.pt"


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_truncated_or_corrupt_checkpoint_names_the_file(good_checkpoint, damage):
    raw = good_checkpoint.read_bytes()
    broken = {"truncate": raw[: len(raw) // 2], "garbage": b"not a checkpoint\n" * 10, "empty": b""}
    good_checkpoint.write_bytes(broken[damage])
    expected = rf"{good_checkpoint} is not a rank1-pyro checkpoint \(truncated or corrupt\): "
    with pytest.raises(CheckpointError, match=expected):
        read_checkpoint(good_checkpoint)
    model, guide = fresh()
    before = params(model, guide)
    with pytest.raises(CheckpointError, match=expected):  # also from train(resume=True), before any change
        run(good_checkpoint.parent.parent, model, guide, resume=True)
    assert all(torch.equal(a, b) for a, b in zip(before, params(model, guide)))


def test_foreign_torch_file_is_refused(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"net.0.weight": torch.zeros(2)}, path)
    expected = r"weights.pt is not a rank1-pyro checkpoint \(no 'rank1-pyro-checkpoint' marker"
    with pytest.raises(CheckpointError, match=expected):
        read_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="no checkpoint file at"):
        read_checkpoint(tmp_path / "missing.pt")


class _Exploit:
    """Unpickling this would call os.mkdir: a stand-in for arbitrary code in a file."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_a_file_with_code_is_never_executed(tmp_path):
    sentinel = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        torch.save({"format": C.FORMAT, "payload": _Exploit(str(sentinel))}, f)
    expected = r"evil.pt is not a rank1-pyro checkpoint: .*\(posix.mkdir\), and loading it would run code"
    with pytest.raises(CheckpointError, match=expected):
        read_checkpoint(path)
    assert not sentinel.exists()


def test_other_architecture_names_the_mismatched_keys(good_checkpoint):
    wider, wider_guide = fresh(hidden=8)
    before = params(wider, wider_guide)
    with pytest.raises(
        CheckpointError,
        match=r"does not match the model's architecture: shape mismatches "
        r"net\.0\.weight: checkpoint \(4, 2\) vs model \(8, 2\)",
    ):
        load_weights(good_checkpoint, wider, wider_guide)
    assert all(torch.equal(a, b) for a, b in zip(before, params(wider, wider_guide)))  # nothing loaded
    torch.manual_seed(0)
    deeper = rank1_mlp(2, [4, 4], 2, ensemble_size=2)
    with pytest.raises(CheckpointError, match=r"missing keys \['net\.4\.weight', 'net\.4\.bias'\]"):
        load_weights(good_checkpoint, deeper)
    with pytest.raises(CheckpointError, match="does not match the model's architecture"):
        run(good_checkpoint.parent.parent, *fresh(hidden=8), resume=True)
    model, guide = fresh()
    load_weights(good_checkpoint, model, guide)  # the same architecture loads


def test_resuming_with_another_batch_size_is_refused(good_checkpoint):
    with pytest.raises(
        CheckpointError, match=r"cannot resume this run: num_data: .*|batch_size: checkpoint 8 vs now 16"
    ):
        run(good_checkpoint.parent.parent, batch_size=16, resume=True)


# ------------------------------------------------------------------------------------------
# Atomic writes and the last good state
# ------------------------------------------------------------------------------------------
def test_a_crash_during_a_write_keeps_the_previous_checkpoint(good_checkpoint, monkeypatch):
    before = good_checkpoint.read_bytes()

    def torn_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")  # the start of a write, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(C.torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        C.atomic_save({"x": 1}, good_checkpoint)
    assert good_checkpoint.read_bytes() == before
    assert sorted(p.name for p in good_checkpoint.parent.iterdir()) == ["checkpoint.pt"]  # no temp file left


def test_stale_temp_files_of_a_killed_writer_are_removed(good_checkpoint):
    stale = good_checkpoint.parent / ".checkpoint.pt.deadbeef.tmp"
    stale.write_bytes(b"half")
    other = good_checkpoint.parent / "notes.txt"
    other.write_text("keep me")
    run(good_checkpoint.parent.parent, epochs=2, resume=True)
    assert not stale.exists() and other.exists()
    assert read_checkpoint(good_checkpoint)["position"]["epoch"] == 2


def test_nan_loss_keeps_the_last_good_checkpoint_on_disk(tmp_path):
    model, guide = fresh()
    snapshots = []

    class Recording(FailingELBO):
        def loss_terms(self, *args, **kwargs):
            snapshots.append(params(model, guide))  # the state before step len(snapshots) - 1
            return super().loss_terms(*args, **kwargs)

    with pytest.raises(NonFiniteLossError, match=r"loss is nan at epoch 0, step 5 \(global step 5\)"):
        run(tmp_path, model, guide, objective=Recording(fail_at=5), checkpoint_every=2)
    ckpt = read_checkpoint(tmp_path / "ckpt" / "checkpoint.pt")
    assert ckpt["position"] == {"step": 4, "epoch": 0, "batch": 4}
    saved = [*ckpt["model"].values(), *ckpt["guide"].values()]
    assert all(torch.equal(a, b) for a, b in zip(saved, snapshots[4], strict=True))  # after 4 updates
    assert all(torch.isfinite(t).all() for t in saved)


class PoisonAt(MixtureELBO):
    """A finite loss, but a parameter is set to inf during step ``at``: the update leaves it inf."""

    def __init__(self, model, at):
        super().__init__()
        self.model, self.at, self.calls = model, at, 0

    def loss_terms(self, *args, **kwargs):
        self.calls += 1
        terms = super().loss_terms(*args, **kwargs)
        if self.calls == self.at:
            with torch.no_grad():
                self.model.net[2].bias[0, 0] = float("inf")  # the bias is not needed by backward
        return terms


def test_non_finite_parameters_are_never_written(tmp_path):
    model, guide = fresh()
    with pytest.raises(
        NonFiniteLossError, match=r"parameters are not finite after global step 3; checkpoint not written"
    ):
        run(tmp_path, model, guide, objective=PoisonAt(model, at=3), checkpoint_every=1)
    ckpt = read_checkpoint(tmp_path / "ckpt" / "checkpoint.pt")
    assert ckpt["position"]["step"] == 2
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())


def test_load_weights_accepts_a_plain_state_dict_and_refuses_anything_else(tmp_path):
    trained, _ = fresh()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)
    path = tmp_path / "weights.pt"
    torch.save(trained.state_dict(), path)
    model, guide = fresh()
    result = load_weights(path, model)
    assert result["format"] == "state_dict" and result["guide"] is None
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), trained.state_dict().values()))
    wider, _ = fresh(hidden=8)
    with pytest.raises(CheckpointError, match=r"shape mismatches net\.0\.weight"):
        load_weights(path, wider)  # checked against the model like a checkpoint
    with pytest.raises(CheckpointError, match="plain state_dict of one module .* no state for the guide"):
        load_weights(path, model, guide)
    for name, obj in [("list.pt", [torch.zeros(2)]), ("mixed.pt", {"w": torch.zeros(2), "step": 3}), ("empty.pt", {})]:
        torch.save(obj, tmp_path / name)
        with pytest.raises(CheckpointError, match=rf"{name} is not a rank1-pyro checkpoint.*or a plain state_dict"):
            load_weights(tmp_path / name, model)
