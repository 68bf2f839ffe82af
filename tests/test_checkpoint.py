"""Checkpoints: a SIGKILLed run resumes bit-identically; broken files give clear errors; writes are atomic."""

import os
import random
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from faulty_objectives import FailingELBO, StopAt
from torch.utils.data import DataLoader, TensorDataset

from rank1_pyro import AveragedELBO, MixtureELBO, MixtureGuide, rank1_mlp
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
    # the mixture ELBO, as the interrupting objectives (tests/faulty_objectives.py) are
    args = dict(epochs=2, batch_size=8, seed=1, progress=False, checkpoint_dir=tmp_path / "ckpt", objective="mixture")
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


# ------------------------------------------------------------------------------------------
# Mutation-testing pass (issue #21): the pieces on their own, against hand-built states
# ------------------------------------------------------------------------------------------
RECORD = {"num_data": 48, "batch_size": 8, "steps_per_epoch": 6, "optimizer": "adam", "data_fingerprint": "abc"}


def _parts(hidden=4, lr=0.1):
    model, guide = fresh(hidden)
    guide(torch.zeros(1, 2))  # the guide's parameters exist
    optimizer = torch.optim.Adam([*model.parameters(), *guide.parameters()], lr=lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    return model, guide, optimizer, scheduler


def _step(model, guide, optimizer, scheduler):
    optimizer.zero_grad()
    loss = sum((p**2).sum() for p in [*model.parameters(), *guide.parameters()])
    loss.backward()
    optimizer.step()
    scheduler.step()


def _state(model, guide, optimizer, scheduler, **overrides):
    args = dict(step=7, epoch=1, batch=3, data_seed=11, config=dict(RECORD), history={"epochs": [{"loss": 1.5}]})
    args.update(overrides)
    return C.training_state(model=model, guide=guide, optimizer=optimizer, scheduler=scheduler, **args)


def test_training_state_holds_everything_in_plain_values(tmp_path):
    model, guide, opt, sched = _parts()
    _step(model, guide, opt, sched)
    config = dict(RECORD)
    state = _state(
        model, guide, opt, sched, step=np.int64(7), epoch=torch.tensor(1), data_seed=np.int32(11), config=config
    )
    assert list(state) == ["format", "version", *C._REQUIRED]
    assert state["format"] == "rank1-pyro-checkpoint" and state["version"] == 1
    assert state["position"] == {"step": 7, "epoch": 1, "batch": 3}
    assert all(type(v) is int for v in state["position"].values()) and type(state["data_seed"]) is int
    assert state["config"] == RECORD and state["config"] is not config  # a copy
    assert state["history"] == {"epochs": [{"loss": 1.5}]}
    assert state["guide"].keys() == guide.state_dict().keys() and state["model"].keys() == model.state_dict().keys()
    assert state["scheduler"]["last_epoch"] == 1 and len(state["optimizer"]["state"]) == len(
        opt.param_groups[0]["params"]
    )
    assert set(state["rng"]) == {"torch", "random", "numpy"}  # no CUDA state for a CPU run
    assert _state(model, lambda *a: None, opt, sched)["guide"] is None  # a guide function has no state
    path = C.atomic_save(state, tmp_path / "c.pt")
    assert path == tmp_path / "c.pt" and read_checkpoint(path)["position"] == state["position"]


def test_restore_training_puts_back_modules_optimizer_scheduler_and_rngs(tmp_path):
    model, guide, opt, sched = _parts()
    _step(model, guide, opt, sched)
    state = _state(model, guide, opt, sched)
    expected_draw = torch.rand(3)  # the torch RNG right after the state was taken
    path = C.atomic_save(state, tmp_path / "c.pt")
    ckpt = read_checkpoint(path)
    model2, guide2, opt2, sched2 = _parts()
    C.restore_training(path, ckpt, model=model2, guide=guide2, optimizer=opt2, scheduler=sched2)
    assert torch.equal(torch.rand(3), expected_draw)
    assert all(torch.equal(a, b) for a, b in zip(params(model, guide), params(model2, guide2), strict=True))
    assert sched2.last_epoch == 1 and opt2.param_groups[0]["lr"] == pytest.approx(0.05)
    for p, p2 in zip(opt.param_groups[0]["params"], opt2.param_groups[0]["params"]):
        assert torch.equal(opt.state[p]["exp_avg"], opt2.state[p2]["exp_avg"])
    # an optimizer over other parameters is refused before anything changes
    model3, guide3, _, _ = _parts()
    before = params(model3, guide3)
    opt3 = torch.optim.Adam(list(model3.parameters()), lr=0.1)
    n_ckpt, n_here = len(opt.param_groups[0]["params"]), len(list(model3.parameters()))
    with pytest.raises(
        CheckpointError,
        match=re.escape(
            f"{path}: the optimizer state does not fit this optimizer: parameter groups of sizes [{n_ckpt}] in the "
            f"checkpoint vs [{n_here}] here"
        ),
    ):
        C.restore_training(path, ckpt, model=model3, guide=guide3, optimizer=opt3, scheduler=sched2)
    assert all(torch.equal(a, b) for a, b in zip(before, params(model3, guide3)))
    with pytest.raises(CheckpointError, match="parameter groups of sizes None in the checkpoint"):
        C._check_optimizer(path, opt3, ["not a state dict"])


def test_guide_state_must_match_the_guide_given(tmp_path):
    model, guide, opt, sched = _parts()
    with_guide = C.atomic_save(_state(model, guide, opt, sched), tmp_path / "with.pt")
    without = C.atomic_save(_state(model, lambda *a: None, opt, sched), tmp_path / "without.pt")
    model2, guide2, opt2, sched2 = _parts()
    with pytest.raises(
        CheckpointError, match=re.escape(f"{without} has no guide state but a guide (MixtureGuide) was given")
    ):
        load_weights(without, model2, guide2)
    with pytest.raises(
        CheckpointError, match=re.escape(f"{with_guide} holds a guide's state but no guide module was given")
    ):
        C.restore_training(
            with_guide, read_checkpoint(with_guide), model=model2, guide=None, optimizer=opt2, scheduler=sched2
        )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    C.atomic_save(_state(model, guide, opt, sched), with_guide)
    assert load_weights(with_guide, model2)["format"] == C.FORMAT  # for prediction the guide may be left out
    assert all(torch.equal(a, b) for a, b in zip(params(model), params(model2)))
    # a guide of another architecture: nothing is loaded, the model included
    model3, _ = fresh()
    other_guide = fresh(hidden=8)[1]
    other_guide(torch.zeros(1, 2))
    before = params(model3)
    with pytest.raises(CheckpointError, match=re.escape(f"{with_guide} does not match the guide's architecture")):
        load_weights(with_guide, model3, other_guide)
    assert all(torch.equal(a, b) for a, b in zip(before, params(model3)))


class _Two(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(3))
        self.b = torch.nn.Parameter(torch.zeros(2, 2))


def test_check_state_dict_names_every_key_that_does_not_fit():
    module = _Two()
    C.check_state_dict("f.pt", "model", module, {"a": torch.ones(3), "b": torch.ones(2, 2)})  # fits
    cases = [
        ({"a": torch.ones(3)}, "missing keys ['b']"),
        ({"a": torch.ones(3), "b": torch.ones(2, 2), "c": torch.ones(1)}, "unexpected keys ['c']"),
        ({"a": torch.ones(2), "b": torch.ones(2, 2)}, "shape mismatches a: checkpoint (2,) vs model (3,)"),
        (
            {"a": torch.ones(2), "c": 1},
            "missing keys ['b']; unexpected keys ['c']; shape mismatches a: checkpoint (2,) vs model (3,)",
        ),
        (
            {"a": torch.ones(4), "b": torch.ones(1)},
            "shape mismatches a: checkpoint (4,) vs model (3,); b: checkpoint (1,) vs model (2, 2)",
        ),
    ]
    for saved, detail in cases:
        with pytest.raises(
            CheckpointError, match="^" + re.escape(f"f.pt does not match the model's architecture: {detail}") + "$"
        ):
            C.check_state_dict("f.pt", "model", module, saved)


@pytest.mark.parametrize(
    "content, detail",
    [
        ([1, 2], "(no 'rank1-pyro-checkpoint' marker; it holds a list)"),
        (
            {k: 0 for k in "jihgfedcba"},
            "(no 'rank1-pyro-checkpoint' marker; it holds a dict with keys ['a', 'b', 'c', 'd', 'e', 'f', 'g', 'h'])",
        ),
        ({"format": "other", 3: 0}, "(no 'rank1-pyro-checkpoint' marker; it holds a dict with keys ['3', 'format'])"),
    ],
)
def test_foreign_files_say_what_they_hold(tmp_path, content, detail):
    path = tmp_path / "f.pt"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match="^" + re.escape(f"{path} is not a rank1-pyro checkpoint {detail}") + "$"):
        read_checkpoint(path)


def test_version_and_completeness_are_checked(tmp_path):
    path = tmp_path / "c.pt"
    base = {"format": C.FORMAT, "version": C.VERSION, **{k: {} for k in C._REQUIRED}}
    for version, shown in [(2, "2"), (None, "None"), ("1", "'1'")]:
        torch.save({**base, "version": version}, path)
        with pytest.raises(
            CheckpointError,
            match="^" + re.escape(f"{path}: checkpoint version {shown} is not supported (expected 1)") + "$",
        ):
            read_checkpoint(path)
    torch.save({k: v for k, v in base.items() if k not in ("scheduler", "rng")}, path)
    with pytest.raises(
        CheckpointError,
        match="^" + re.escape(f"{path} is not a complete rank1-pyro checkpoint: missing ['scheduler', 'rng']") + "$",
    ):
        read_checkpoint(path)
    torch.save(base, path)
    assert read_checkpoint(path) == base
    with pytest.raises(FileNotFoundError, match="^" + re.escape(f"no checkpoint file at {tmp_path}") + "$"):
        read_checkpoint(tmp_path)  # a directory is no checkpoint file


def test_rng_state_round_trip_with_cached_gaussians():
    random.gauss(0, 1)  # python caches the second normal of a pair
    np.random.seed(3)
    np.random.randn()  # so does numpy's legacy generator
    state = torch.load(_saved(C.rng_state()), weights_only=True)
    assert state["numpy"]["has_gauss"] == 1 and state["random"]["gauss_next"] is not None
    assert state["numpy"]["keys"].dtype == torch.int64 and state["numpy"]["name"] == "MT19937"
    first = (random.gauss(0, 1), np.random.randn(), random.random(), np.random.rand())
    C.set_rng_state(state)
    assert (random.gauss(0, 1), np.random.randn(), random.random(), np.random.rand()) == first
    # a CPU device keeps (and restores) no CUDA state; a stored CUDA state is ignored off CUDA
    assert "cuda" not in C.rng_state("cpu") and "cuda" not in C.rng_state(torch.device("cpu"))
    C.set_rng_state({**state, "cuda": torch.zeros(8, dtype=torch.uint8)}, "cpu")
    C.set_rng_state({**state, "cuda": torch.zeros(8, dtype=torch.uint8)})
    assert (random.gauss(0, 1), np.random.randn()) == first[:2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rng_state_of_a_cuda_device_round_trips():
    state = C.rng_state("cuda")
    first = torch.rand(3, device="cuda")
    C.set_rng_state(state, "cuda")
    assert torch.equal(torch.rand(3, device="cuda"), first)


def test_data_fingerprint_depends_on_the_contents_only():
    from torch.utils.data import Subset

    x, y = data()
    fp = C.data_fingerprint((x, y))
    assert len(fp) == 64 and fp == C.data_fingerprint([x.clone(), y.clone()])
    assert fp == C.data_fingerprint(TensorDataset(x, y)) == C.data_fingerprint(DataLoader(TensorDataset(x, y)))
    changed = x.clone()
    changed[17, 1] += 1e-6
    assert C.data_fingerprint((changed, y)) != fp
    assert C.data_fingerprint((x.double(), y)) != fp  # the dtype counts
    assert C.data_fingerprint((x.reshape(2, 24, 2), y)) != fp  # and the shape, for the same bytes
    assert C.data_fingerprint((x[:0], y[:0])) != C.data_fingerprint((x[:0].double(), y[:0]))  # empty, typed

    class Arrays:  # torchvision's layout: data and targets (numpy or tensors)
        def __init__(self, data, targets):
            self.data, self.targets = data, targets

    assert C.data_fingerprint(Arrays(x, y)) == fp
    assert C.data_fingerprint(Arrays(x.numpy(), y.numpy())) == fp  # arrays are hashed as tensors
    assert C.data_fingerprint(Arrays(["a", "b"], [0, 1])) is None  # not tensor-like: not checked

    class Folder:  # ImageFolder's layout: (path, label) samples
        def __init__(self, samples):
            self.samples = samples

    a = C.data_fingerprint(Folder([("a.png", 0), ("b.png", 1)]))
    assert a == C.data_fingerprint(Folder([("a.png", 0), ("b.png", 1)]))
    assert a != C.data_fingerprint(Folder([("a.png", 0), ("b.png", 0)])) and a != fp
    sub = C.data_fingerprint(Subset(TensorDataset(x, y), [0, 2, 4]))
    assert sub not in (None, fp) and sub == C.data_fingerprint(Subset(TensorDataset(x, y), [0, 2, 4]))
    assert sub != C.data_fingerprint(Subset(TensorDataset(x, y), [0, 2, 5]))
    assert C.data_fingerprint(Subset(list(range(5)), [0])) is None and C.data_fingerprint(object()) is None
    assert C.data_fingerprint(()) is None and C.data_fingerprint([x, "y"]) is None


def test_check_resumable_names_every_difference():
    C.check_resumable("c.pt", dict(RECORD), dict(RECORD, lr=0.5))  # other settings may change
    C.check_resumable("c.pt", dict(RECORD, data_fingerprint=None), dict(RECORD, data_fingerprint="x"))  # unknown
    C.check_resumable("c.pt", dict(RECORD), dict(RECORD, data_fingerprint=None))
    now = dict(RECORD, num_data=50, batch_size=16, steps_per_epoch=4, optimizer="sgd", data_fingerprint="xyz")
    message = (
        "c.pt cannot resume this run: num_data: checkpoint 48 vs now 50; batch_size: checkpoint 8 vs now 16; "
        "steps_per_epoch: checkpoint 6 vs now 4; optimizer: checkpoint 'adam' vs now 'sgd'; training data: the "
        "checkpoint was trained on other data of the same size (contents differ)"
    )
    with pytest.raises(CheckpointError, match="^" + re.escape(message) + "$"):
        C.check_resumable("c.pt", dict(RECORD), now)
    with pytest.raises(
        CheckpointError, match=re.escape("c.pt cannot resume this run: num_data: checkpoint None vs now 48")
    ):
        C.check_resumable("c.pt", {k: v for k, v in RECORD.items() if k != "num_data"}, dict(RECORD))


def test_remove_stale_temporaries_removes_only_this_files_temporaries(tmp_path):
    target = tmp_path / "checkpoint.pt"
    stale = [tmp_path / ".checkpoint.pt.b2.tmp", tmp_path / ".checkpoint.pt.a1.tmp"]
    keep = [tmp_path / ".other.pt.a1.tmp", tmp_path / "checkpoint.pt.tmp", tmp_path / "notes.txt"]
    for f in stale + keep:
        f.write_text("x")
    assert C.remove_stale_temporaries(target) == sorted(stale)
    assert all(f.exists() for f in keep) and not any(f.exists() for f in stale)
    assert C.remove_stale_temporaries(tmp_path / "missing" / "checkpoint.pt") == []


class _Buffered(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2))
        self.frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
        self.register_buffer("stat", torch.zeros(2))


def _checkpointer(tmp_path, model, guide=None, ctx=None, write=None, record=None):
    from rank1_pyro.inference.distributed import DistributedContext

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    ckpt_dir = None if tmp_path is None else tmp_path
    ctx = ctx or DistributedContext()
    return C.Checkpointer(ckpt_dir, model, guide, opt, sched, record or dict(RECORD), ctx, "cpu", write)


def test_checkpointer_writes_only_finite_states_and_only_on_the_main_process(tmp_path):
    from rank1_pyro.inference.distributed import DistributedContext

    model = _Buffered()
    ck = _checkpointer(tmp_path, model)
    assert ck.path == tmp_path / "checkpoint.pt"
    totals = {"loss": torch.tensor(2.5), "n": 4}
    assert ck.save(step=3, epoch=0, batch=3, data_seed=5, epochs=[], totals=totals, seconds=1.25) is True
    saved = read_checkpoint(ck.path)
    assert saved["history"] == {"epochs": [], "totals": {"loss": 2.5, "n": 4}, "seconds": 1.25}
    assert saved["position"] == {"step": 3, "epoch": 0, "batch": 3} and saved["config"] == RECORD
    for name in ("stat", "frozen", "w"):  # a buffer, a frozen parameter... any tensor the run restores
        model = _Buffered()
        getattr(model, name).data[0] = float("nan") if name != "stat" else float("inf")
        ck = _checkpointer(tmp_path / name, model)
        expected = name == "frozen"  # a frozen parameter is not trained: it is not checked
        assert ck.save(step=1, epoch=0, batch=1, data_seed=5, epochs=[], totals={}, seconds=0.0) is expected
        assert ck.path.exists() is expected
    other = _checkpointer(tmp_path / "rank1", _Buffered(), ctx=DistributedContext(world_size=1, rank=1))
    assert other.save(step=1, epoch=0, batch=1, data_seed=5, epochs=[], totals={}, seconds=0.0) is True
    assert not (tmp_path / "rank1" / "checkpoint.pt").exists()
    nothing = _checkpointer(None, _Buffered())
    assert nothing.path is None and nothing.start(resume=True) is None
    assert nothing.save(step=1, epoch=0, batch=1, data_seed=5, epochs=[], totals={}, seconds=0.0) is True
    written = []
    custom = _checkpointer(tmp_path / "custom", _Buffered(), write=lambda state, path: written.append((state, path)))
    custom.save(step=2, epoch=0, batch=2, data_seed=5, epochs=[], totals={}, seconds=0.0)
    assert written[0][1] == tmp_path / "custom" / "checkpoint.pt" and written[0][0]["position"]["step"] == 2
    assert not written[0][1].exists()
    assert C._all_finite([]) is True


def test_checkpointer_start_resumes_the_saved_position(tmp_path):
    from rank1_pyro.inference.distributed import DistributedContext

    ck = _checkpointer(tmp_path, _Buffered())
    epochs = [{"epoch": 0, "loss": 1.0}]
    ck.save(step=9, epoch=1, batch=3, data_seed=7, epochs=epochs, totals={"loss": 0.5}, seconds=2.0)
    model = _Buffered()
    fresh_start = _checkpointer(tmp_path, model)
    assert fresh_start.start(resume=False) is None
    resumed = _checkpointer(tmp_path, model).start(resume=True)
    assert resumed == C.Resumed(step=9, epoch=1, batch=3, data_seed=7, epochs=epochs, totals={"loss": 0.5}, seconds=2.0)
    assert type(resumed.seconds) is float
    other = _checkpointer(tmp_path, _Buffered(), ctx=DistributedContext(world_size=1, rank=1)).start(resume=True)
    assert other.totals is None and other.step == 9  # the sums are counted once, on the main process
    with pytest.warns(
        UserWarning, match=re.escape(f"resuming mid-epoch from {tmp_path / 'checkpoint.pt'} with a DataLoader")
    ):
        _checkpointer(tmp_path, _Buffered()).start(resume=True, ordered=False)
    ck.save(step=12, epoch=2, batch=0, data_seed=7, epochs=epochs, totals={}, seconds=3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # at an epoch boundary nothing is skipped: no warning
        assert _checkpointer(tmp_path, _Buffered()).start(resume=True, ordered=False).epoch == 2
    with pytest.raises(CheckpointError, match="cannot resume this run: batch_size: checkpoint 8 vs now 4"):
        _checkpointer(tmp_path, _Buffered(), record=dict(RECORD, batch_size=4)).start(resume=True)


def test_check_directory(tmp_path):
    C.Checkpointer.check_directory(None)
    C.Checkpointer.check_directory(tmp_path)
    C.Checkpointer.check_directory(tmp_path / "new" / "deeper")  # can be created
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="^" + re.escape(f"checkpoint_dir {f} is a file, not a directory") + "$"):
        C.Checkpointer.check_directory(f)
    with pytest.raises(
        ValueError,
        match="^" + re.escape(f"checkpoint_dir {f / 'sub'} cannot be created: {f} is a file, not a directory") + "$",
    ):
        C.Checkpointer.check_directory(f / "sub")


# ------------------------------------------------------------------------------------------
# Mutation-testing pass 2: what the first pass left surviving
# ------------------------------------------------------------------------------------------
def test_an_optimizer_state_without_param_groups_is_refused(tmp_path):
    model, guide, opt, _ = _parts()
    n_here = len(opt.param_groups[0]["params"])
    message = f"c.pt: the optimizer state does not fit this optimizer: parameter groups of sizes [] in the checkpoint vs [{n_here}] here"
    with pytest.raises(CheckpointError, match="^" + re.escape(message) + "$"):
        C._check_optimizer("c.pt", opt, {"state": {}})  # a dict, but no "param_groups": zero groups


def test_data_fingerprint_of_tensors_that_need_grad_or_numpy_cannot_hold(tmp_path):
    from torch.utils.data import Subset

    x, y = data()
    fp = C.data_fingerprint((x, y))
    assert C.data_fingerprint((x.clone().requires_grad_(), y)) == fp  # the same contents, hashed as tensors
    half = x.to(torch.bfloat16)  # numpy has no bfloat16: a tensor must not go through numpy
    assert C.data_fingerprint((half, y)) == C.data_fingerprint((half.clone(), y.clone())) not in (None, fp)
    ds = TensorDataset(x, y)
    by_list = C.data_fingerprint(Subset(ds, [1, 3, 5]))
    assert C.data_fingerprint(Subset(ds, np.array([1, 3, 5], dtype=np.int32))) == by_list  # the same subset
    assert C.data_fingerprint(Subset(ds, torch.tensor([1, 3, 5], dtype=torch.int16).tolist())) == by_list

    class OnlyData:  # a "data" attribute but no "targets": not torchvision's layout
        def __init__(self, data):
            self.data = data

    assert C.data_fingerprint(OnlyData(x)) is None
    only_targets = OnlyData(x)
    del only_targets.data
    only_targets.targets = y
    assert C.data_fingerprint(only_targets) is None


def test_load_weights_messages_for_a_plain_state_dict(tmp_path):
    trained, _ = fresh()
    path = tmp_path / "weights.pt"
    torch.save(trained.state_dict(), path)
    model, guide = fresh()
    result = load_weights(path, model)
    assert sorted(result) == ["format", "guide", "model"]
    assert result["model"].keys() == trained.state_dict().keys()
    assert all(torch.equal(result["model"][k], v) for k, v in trained.state_dict().items())
    wider, _ = fresh(hidden=8)
    message = (
        f"{path} does not match the model's architecture: shape mismatches "
        "net.0.weight: checkpoint (4, 2) vs model (8, 2)"
    )
    with pytest.raises(CheckpointError, match="^" + re.escape(message)):
        load_weights(path, wider)
    message = (
        f"{path} is a plain state_dict of one module (the model): it has no state for the guide "
        "(MixtureGuide); load a rank1-pyro checkpoint, or pass guide=None"
    )
    with pytest.raises(CheckpointError, match="^" + re.escape(message) + "$"):
        load_weights(path, model, guide)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(
        CheckpointError,
        match=re.escape(
            "; load_weights reads a rank1-pyro checkpoint or a plain state_dict (a dict of tensors "
            "saved with torch.save(model.state_dict(), path))"
        )
        + "$",
    ):
        load_weights(tmp_path / "list.pt", model)


def test_code_is_never_run_even_when_the_environment_turns_off_weights_only(tmp_path, monkeypatch):
    # torch.load's default (weights_only=None) follows this variable; an explicit True does not
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    sentinel = tmp_path / "code-ran"
    for name, content in [
        ("ckpt.pt", {"format": C.FORMAT, "payload": _Exploit(str(sentinel))}),
        ("plain.pt", {"a": _Exploit(str(sentinel)), "b": torch.zeros(2, 2)}),
    ]:
        torch.save(content, tmp_path / name)
        with pytest.raises(CheckpointError, match="loading it would run code"):
            read_checkpoint(tmp_path / name)
        with pytest.raises(CheckpointError, match="or a plain state_dict"):
            load_weights(tmp_path / name, _Two())
        assert not sentinel.exists()


@pytest.fixture
def elsewhere(monkeypatch):
    """Files whose tensors were saved on a device this machine lacks (as a GPU run's on a CPU-only host)."""
    import torch.serialization as S

    tagging = []

    def tagger(storage):
        return "elsewhere" if tagging else None

    def deserializer(storage, location):
        if location == "elsewhere":
            raise RuntimeError("no 'elsewhere' device on this machine")
        return None

    monkeypatch.setattr(S, "_package_registry", list(S._package_registry))  # registered for this test only
    S.register_package(1, tagger, deserializer)

    def save(obj, path):
        tagging.append(True)
        try:
            torch.save(obj, path)
        finally:
            tagging.clear()
        with pytest.raises(RuntimeError, match="no 'elsewhere' device"):  # torch.load's default restore fails
            torch.load(path, weights_only=True)

    return save


def test_files_saved_on_another_device_load_onto_the_cpu(tmp_path, elsewhere):
    model, guide, opt, sched = _parts()
    elsewhere(_state(model, guide, opt, sched), tmp_path / "c.pt")
    ckpt = read_checkpoint(tmp_path / "c.pt")
    assert all(v.device.type == "cpu" for v in ckpt["model"].values())
    assert all(torch.equal(a, b) for a, b in zip(ckpt["model"].values(), model.state_dict().values(), strict=True))
    trained = _Two()
    with torch.no_grad():
        trained.a.add_(2.0)
    elsewhere(trained.state_dict(), tmp_path / "plain.pt")
    other = _Two()
    assert load_weights(tmp_path / "plain.pt", other)["format"] == "state_dict"
    assert torch.equal(other.a, torch.full((3,), 2.0))


def _bad_pickle_zip(path):
    """A torch zip file whose pickle uses opcode 130 (EXT1), which the weights-only unpickler does not know."""
    import zipfile

    good = path.with_suffix(".good")
    torch.save({"a": 1}, good)
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zout:
        for name in zin.namelist():
            zout.writestr(name, b"\x80\x02\x82\x01." if name.endswith("data.pkl") else zin.read(name))


def test_a_broken_file_s_message_gives_the_loader_s_reason(tmp_path):
    bad_op = tmp_path / "op.pt"
    _bad_pickle_zip(bad_op)
    message = f"{bad_op} is not a rank1-pyro checkpoint (truncated or corrupt): Unsupported operand 130"
    with pytest.raises(CheckpointError, match="^" + re.escape(message) + "$"):
        read_checkpoint(bad_op)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x80\x02}q\x00.garbage")  # a legacy pickle of {}, where torch's magic number goes
    with pytest.raises(Exception) as raw:  # torch's own first line is the reason
        torch.load(garbage, weights_only=True)
    first = str(raw.value).strip().splitlines()[0]
    assert first and "WeightsUnpickler" not in str(raw.value)
    message = f"{garbage} is not a rank1-pyro checkpoint (truncated or corrupt): {first}"
    with pytest.raises(CheckpointError, match="^" + re.escape(message) + "$"):
        read_checkpoint(garbage)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(EOFError) as raw:  # no words at all: the exception's type is the reason
        torch.load(empty, weights_only=True)
    assert str(raw.value) == ""
    message = f"{empty} is not a rank1-pyro checkpoint (truncated or corrupt): EOFError"
    with pytest.raises(CheckpointError, match="^" + re.escape(message) + "$"):
        read_checkpoint(empty)


def test_a_temporary_removed_by_someone_else_meanwhile_is_no_error(tmp_path, monkeypatch):
    stale = [tmp_path / ".checkpoint.pt.a1.tmp", tmp_path / ".checkpoint.pt.b2.tmp"]
    for f in stale:
        f.write_text("x")
    unlink = Path.unlink

    def raced(self, *args, **kwargs):  # another process deletes the file between the listing and the unlink
        os.remove(self)
        return unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", raced)
    assert C.remove_stale_temporaries(tmp_path / "checkpoint.pt") == stale
    assert not any(f.exists() for f in stale)


@pytest.fixture
def fake_cuda_rng(monkeypatch):
    """torch.cuda's RNG state functions, recorded (the CUDA code paths without a GPU)."""
    calls = {"get": [], "set": []}

    def get_rng_state(device="cuda"):
        calls["get"].append(device)
        return torch.full((4,), 7, dtype=torch.uint8)

    def set_rng_state(new_state, device="cuda"):
        calls["set"].append((new_state.clone(), device))

    monkeypatch.setattr(torch.cuda, "get_rng_state", get_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    return calls


def test_the_cuda_rng_state_is_kept_and_restored_for_a_cuda_device_only(fake_cuda_rng):
    seven = torch.full((4,), 7, dtype=torch.uint8)
    state = C.rng_state("cuda:1")
    assert fake_cuda_rng["get"] == [torch.device("cuda:1")]
    assert set(state) == {"torch", "random", "numpy", "cuda"} and torch.equal(state["cuda"], seven)
    C.set_rng_state(state, torch.device("cuda:1"))
    assert len(fake_cuda_rng["set"]) == 1
    restored, device = fake_cuda_rng["set"][0]
    assert torch.equal(restored, seven) and device == torch.device("cuda:1")
    C.set_rng_state(state, "cpu")  # not onto a CPU device
    C.set_rng_state(state)  # nor without a device
    C.set_rng_state({k: v for k, v in state.items() if k != "cuda"}, "cuda:1")  # nor when none was saved
    assert len(fake_cuda_rng["set"]) == 1


def test_a_cuda_run_s_checkpoint_holds_and_restores_its_cuda_rng_state(tmp_path, fake_cuda_rng):
    from rank1_pyro.inference.distributed import DistributedContext

    model, guide, opt, sched = _parts()
    assert "cuda" in _state(model, guide, opt, sched, device="cuda:0")["rng"]
    cuda = torch.device("cuda:0")

    def checkpointer(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
        return C.Checkpointer(tmp_path, model, None, opt, sched, dict(RECORD), DistributedContext(), cuda)

    checkpointer(_Buffered()).save(step=2, epoch=0, batch=2, data_seed=5, epochs=[], totals={}, seconds=0.0)
    assert fake_cuda_rng["get"][-1] == cuda
    ckpt = read_checkpoint(tmp_path / "checkpoint.pt")
    assert torch.equal(ckpt["rng"]["cuda"], torch.full((4,), 7, dtype=torch.uint8))
    assert checkpointer(_Buffered()).start(resume=True).step == 2
    assert [device for _, device in fake_cuda_rng["set"]] == [cuda]
    ck = checkpointer(_Buffered())
    C.restore_training(
        ck.path, ckpt, model=ck.model, guide=None, optimizer=ck.optimizer, scheduler=ck.scheduler, device=cuda
    )
    assert [device for _, device in fake_cuda_rng["set"]] == [cuda, cuda]


def test_data_parallel_sums_are_reduced_on_the_training_device(tmp_path, monkeypatch):
    from rank1_pyro.inference import distributed
    from rank1_pyro.inference.distributed import DistributedContext

    reduced = []

    def all_reduce_sum(values, device):  # a world of two ranks, the other holding the same sums
        reduced.append(device)
        return [2 * v for v in values]

    monkeypatch.setattr(distributed, "all_reduce_sum", all_reduce_sum)
    ck = _checkpointer(tmp_path, _Buffered(), ctx=DistributedContext(world_size=2, rank=0, enabled=True))
    assert ck.save(step=1, epoch=0, batch=1, data_seed=5, epochs=[], totals={"loss": 1.5, "n": 4}, seconds=0.0)
    assert reduced == ["cpu"]  # the checkpointer's device (NCCL reduces CUDA tensors only)
    assert read_checkpoint(ck.path)["history"]["totals"] == {"loss": 3.0, "n": 8.0}


def test_start_errors_name_the_checkpoint_file(tmp_path):
    ck = _checkpointer(tmp_path, _Buffered())
    ck.save(step=3, epoch=0, batch=3, data_seed=7, epochs=[], totals={}, seconds=1.0)
    path = tmp_path / "checkpoint.pt"
    with pytest.raises(CheckpointError, match="^" + re.escape(f"{path} cannot resume this run: batch_size")):
        _checkpointer(tmp_path, _Buffered(), record=dict(RECORD, batch_size=4)).start(resume=True)
    with pytest.raises(CheckpointError, match="^" + re.escape(f"{path} does not match the model's architecture")):
        _checkpointer(tmp_path, _Two()).start(resume=True)  # two parameters as well: the optimizer fits


def test_resuming_mid_epoch_warns_only_for_an_unordered_loader_at_the_caller_of_train(tmp_path):
    _checkpointer(tmp_path, _Buffered()).save(step=3, epoch=0, batch=3, data_seed=7, epochs=[], totals={}, seconds=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ordered by default: train re-orders its own batches
        assert _checkpointer(tmp_path, _Buffered()).start(resume=True).batch == 3

    def train_like():  # stands for train, which calls start for the user's call of train
        return _checkpointer(tmp_path, _Buffered()).start(resume=True, ordered=False)  # start's caller

    start_line = train_like.__code__.co_firstlineno + 1
    with pytest.warns(UserWarning, match="resuming mid-epoch") as caught:
        train_like()
        user_line = sys._getframe().f_lineno - 1
    (warning,) = caught.list
    assert str(warning.message) == (
        f"resuming mid-epoch from {tmp_path / 'checkpoint.pt'} with a DataLoader whose order train cannot control: "
        "the consumed batches are skipped by reading them, which is exact only if the loader yields the same "
        "batches in every pass"
    )
    assert warning.filename != C.__file__  # not the library's own line
    assert (warning.filename, warning.lineno) != (__file__, start_line)  # nor train's call of start
    if not hasattr(C.Checkpointer.start, "__wrapped__"):  # (mutmut's trampoline adds two frames around start)
        assert (warning.filename, warning.lineno) == (__file__, user_line)  # but the user's call of train


def test_a_checkpoint_records_the_layout_train_actually_used(tmp_path):
    """The run's layout in the file is the one training used (a DataLoader's own batch size, not the
    config's; the set's size and fingerprint; steps per epoch; one process; the objective), with the
    seconds trained so far, and a
    resume on other data of the same size is refused by its fingerprint."""
    loader = DataLoader(TensorDataset(*data()), batch_size=8, shuffle=True)
    begin = time.perf_counter()
    run(tmp_path, train_data=loader, batch_size=32, epochs=1, objective=AveragedELBO(kl_weight=0.5))
    took = time.perf_counter() - begin
    ckpt = read_checkpoint(tmp_path / "ckpt" / "checkpoint.pt")
    assert 0 < ckpt["history"]["seconds"] <= took  # the time trained so far
    saved = ckpt["config"]
    expected = dict(batch_size=8, num_data=48, steps_per_epoch=6, world_size=1, objective="averaged", kl_weight=0.5)
    assert {k: saved[k] for k in expected} == expected
    assert saved["data_fingerprint"] == C.data_fingerprint(TensorDataset(*data()))
    x, y = data()
    other = DataLoader(TensorDataset(x.flip(0), y.flip(0)), batch_size=8, shuffle=True)  # the same size and batches
    message = "the checkpoint was trained on other data of the same size (contents differ)"
    with pytest.raises(CheckpointError, match=re.escape(message)):
        run(tmp_path, train_data=other, batch_size=32, epochs=2, objective=AveragedELBO(kl_weight=0.5), resume=True)


def test_a_checkpoint_follows_every_nth_step_but_an_epochs_last_and_resumes_at_its_position(tmp_path, monkeypatch):
    """With ``checkpoint_every=1`` and 6 steps per epoch a checkpoint is written after steps 1..5 of
    each epoch (mid-epoch) and at each epoch's end (the next epoch, batch 0), never twice for one
    step; a run interrupted twice mid-epoch resumes each time at the written position and ends
    where the uninterrupted run does."""
    written = []
    atomic_save = C.atomic_save

    def recording(state, path):
        written.append((state["position"]["epoch"], state["position"]["batch"]))
        return atomic_save(state, path)

    monkeypatch.setattr(C, "atomic_save", recording)
    ref_model, ref_guide, ref_history = run(tmp_path / "a", checkpoint_every=1)
    assert written == [(0, b) for b in range(1, 6)] + [(1, b) for b in range(6)] + [(2, 0)]
    model, guide = fresh()
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", model, guide, checkpoint_every=1, objective=StopAt(2))
    position = read_checkpoint(tmp_path / "b" / "ckpt" / "checkpoint.pt")["position"]
    assert position == {"step": 1, "epoch": 0, "batch": 1}
    model, guide = fresh()
    with pytest.raises(KeyboardInterrupt):  # resumed at batch 1, stopped again in its second step
        run(tmp_path / "b", model, guide, checkpoint_every=1, objective=StopAt(2), resume=True)
    position = read_checkpoint(tmp_path / "b" / "ckpt" / "checkpoint.pt")["position"]
    assert position == {"step": 2, "epoch": 0, "batch": 2}
    model, guide = fresh()
    _, _, history = run(tmp_path / "b", model, guide, checkpoint_every=1, resume=True)
    assert all(torch.equal(a, b) for a, b in zip(params(ref_model, ref_guide), params(model, guide), strict=True))
    assert history.epochs == ref_history.epochs
