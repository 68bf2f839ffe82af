r"""Training checkpoints that lose nothing: atomic on disk, exact to resume, safe to load.

A checkpoint is one file (by default ``<checkpoint_dir>/checkpoint.pt``) holding everything the
training loop needs to go on as if it had never stopped:

====================  ==========================================================================
key                   content
====================  ==========================================================================
``format``            ``"rank1-pyro-checkpoint"`` and ``version`` (:data:`FORMAT`, :data:`VERSION`)
``model``, ``guide``  state dicts: W, biases, BatchNorm buffers; the variational parameters
``optimizer``         the torch optimizer's state dict (momenta, Adam moments, learning rates)
``scheduler``         the learning-rate scheduler's state dict
``position``          ``step`` (global), ``epoch``, ``batch`` (batches of that epoch consumed)
``rng``               torch CPU, CUDA (training device), python ``random`` and numpy states
``data_seed``         the shuffling seed: epoch e's order is a function of (data_seed, e), which
                      is the whole state of the data loader's shuffling (see
                      :class:`~rank1_pyro.inference.distributed.ShardedSampler`)
``config``            the training arguments (plain values), ``world_size``
``history``           finished epochs' records, the running sums of the current epoch, seconds
====================  ==========================================================================

**Atomic writes** (:func:`atomic_save`): the file is written to a temporary file in the same
directory, flushed and ``fsync``-ed, then moved over the old one with ``os.replace`` (atomic on
POSIX and Windows) and the directory is ``fsync``-ed. A crash at any moment leaves either the
previous checkpoint or the new one, never a torn file.

**Safe loading** (:func:`read_checkpoint`): ``torch.load(weights_only=True)``: only tensors,
plain containers and primitive values are unpickled, never code; RNG states are stored as
tensors and lists for that reason. A truncated, corrupt or foreign file raises
:class:`CheckpointError` naming the file; loading into a model of another architecture raises
:class:`CheckpointError` naming the missing, unexpected and mis-shaped keys, before anything is
changed.

**In training** (:class:`Checkpointer`): :func:`~rank1_pyro.inference.train.train` writes the
state at the end of every epoch and every ``checkpoint_every`` steps, only while every parameter
and buffer is finite (so the file on disk is always a good state), and resumes only a run of the
same data and batch layout (:func:`check_resumable`).

One concept, one module (hence over 400 lines): training checkpoints: writing, checking, resuming (the whole state of a run, bit-exact).
"""

from __future__ import annotations

import contextlib
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import atomic
from ..atomic import temp_prefix
from .distributed import sum_over_ranks
from .progress import on_host

__all__ = [
    "CheckpointError",
    "CHECKPOINT_NAME",
    "FORMAT",
    "VERSION",
    "atomic_save",
    "read_checkpoint",
    "rng_state",
    "set_rng_state",
    "check_state_dict",
    "load_weights",
    "training_state",
    "restore_training",
    "remove_stale_temporaries",
    "data_fingerprint",
    "check_resumable",
    "Checkpointer",
    "Resumed",
]

#: file name of the checkpoint inside a run's checkpoint directory
CHECKPOINT_NAME = "checkpoint.pt"
#: marker stored in every checkpoint (a foreign ``.pt`` file lacks it)
FORMAT = "rank1-pyro-checkpoint"
VERSION = 1
_REQUIRED = ("model", "guide", "optimizer", "scheduler", "position", "rng", "data_seed", "config", "history")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unreadable, foreign, or for another model."""


# ------------------------------------------------------------------------------------------
# Writing and reading files
# ------------------------------------------------------------------------------------------
def atomic_save(obj, path) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (:func:`~rank1_pyro.atomic.atomic_write`: temp file +
    fsync + ``os.replace`` + dir fsync)."""
    return atomic.atomic_write(path, lambda f: torch.save(obj, f))


def remove_stale_temporaries(path) -> list[Path]:
    """Delete temporary files that a process killed during :func:`atomic_save` left next to ``path``."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    stale = sorted(path.parent.glob(f"{temp_prefix(path)}*.tmp"))
    for f in stale:
        with contextlib.suppress(FileNotFoundError):
            f.unlink()
    return stale


def read_checkpoint(path) -> dict:
    """Load and check a checkpoint file (``torch.load(weights_only=True)``, on the CPU).

    Raises :class:`FileNotFoundError` when there is no file and :class:`CheckpointError`
    naming the file when it is truncated, corrupt, holds code, or is not a rank1-pyro checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for broken files
        text = str(e).strip()
        code = re.search(r"GLOBAL ([\w.]+)", text)  # weights_only refused to import a Python object
        if code:
            raise CheckpointError(
                f"{path} is not a rank1-pyro checkpoint: it holds Python objects other than tensors and plain "
                f"containers ({code.group(1)}), and loading it would run code"
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)  # the unpickler's own words
        reason = detail.group(1) if detail else (text.splitlines()[0] if text else type(e).__name__)
        raise CheckpointError(f"{path} is not a rank1-pyro checkpoint (truncated or corrupt): {reason}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        what = (
            f"a dict with keys {sorted(map(str, ckpt))[:8]}" if isinstance(ckpt, dict) else f"a {type(ckpt).__name__}"
        )
        raise CheckpointError(f"{path} is not a rank1-pyro checkpoint (no {FORMAT!r} marker; it holds {what})")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {ckpt.get('version')!r} is not supported (expected {VERSION})"
        )
    missing = [k for k in _REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a complete rank1-pyro checkpoint: missing {missing}")
    return ckpt


# ------------------------------------------------------------------------------------------
# Random number generator states as tensors and plain values
# ------------------------------------------------------------------------------------------
def rng_state(device=None) -> dict:
    """The states of torch (CPU, and CUDA when ``device`` is a CUDA device), ``random`` and numpy."""
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "random": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }
    if device is not None and torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(torch.device(device))
    return state


def set_rng_state(state: dict, device=None) -> None:
    """Restore what :func:`rng_state` returned (the CUDA state only onto a CUDA ``device``)."""
    torch.set_rng_state(state["torch"])
    r = state["random"]
    random.setstate((int(r["version"]), tuple(int(v) for v in r["internal"].tolist()), r["gauss_next"]))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "cuda" in state and device is not None and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], torch.device(device))


# ------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------
def check_state_dict(path, what: str, module: nn.Module, saved: dict) -> None:
    """Raise :class:`CheckpointError` naming every key that does not fit ``module``."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(saved[k].shape)} vs {what} {tuple(v.shape)}"
        for k, v in expected.items()
        if k in saved and torch.is_tensor(saved[k]) and torch.is_tensor(v) and saved[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        if shapes:
            parts.append("shape mismatches " + "; ".join(shapes))
        raise CheckpointError(f"{path} does not match the {what}'s architecture: " + "; ".join(parts))


def _load_modules(path, ckpt: dict, model: nn.Module, guide, guide_required: bool = True) -> None:
    pairs = [("model", model, ckpt["model"])]
    if isinstance(guide, nn.Module):
        if ckpt["guide"] is None:
            raise CheckpointError(f"{path} has no guide state but a guide ({type(guide).__name__}) was given")
        pairs.append(("guide", guide, ckpt["guide"]))
    elif ckpt["guide"] and guide_required:
        raise CheckpointError(f"{path} holds a guide's state but no guide module was given")
    for what, module, saved in pairs:  # check everything before changing anything
        check_state_dict(path, what, module, saved)
    for _, module, saved in pairs:
        module.load_state_dict(saved)


def load_weights(path, model: nn.Module, guide=None) -> dict:
    """Load a checkpoint's model (and, when given, guide) state, e.g. for prediction; returns the checkpoint.

    ``path`` is a rank1-pyro checkpoint (:func:`read_checkpoint`) or a plain ``state_dict`` file, a
    dict of tensors saved with ``torch.save(model.state_dict(), path)``: it is checked against
    ``model`` (names and shapes) and loaded into it; it holds no guide state, so a guide with
    parameters is refused. Anything else raises :class:`CheckpointError` saying what the file holds.
    """
    try:
        ckpt = read_checkpoint(path)
    except CheckpointError as error:
        state = _plain_state_dict(path)
        if state is None:
            raise CheckpointError(
                f"{error}; load_weights reads a rank1-pyro checkpoint or a plain state_dict (a dict of tensors "
                "saved with torch.save(model.state_dict(), path))"
            ) from None
        if isinstance(guide, nn.Module) and guide.state_dict():
            raise CheckpointError(
                f"{path} is a plain state_dict of one module (the model): it has no state for the guide "
                f"({type(guide).__name__}); load a rank1-pyro checkpoint, or pass guide=None"
            )
        check_state_dict(path, "model", model, state)
        model.load_state_dict(state)
        return {"format": "state_dict", "model": state, "guide": None}
    _load_modules(path, ckpt, model, guide, guide_required=False)
    return ckpt


def _plain_state_dict(path) -> dict | None:
    """The file's contents when it is a non-empty dict of named tensors (``torch.save(module.state_dict())``)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # broken or holding code: read_checkpoint's error says why
        return None
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        return obj
    return None


# ------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------
def _hash_tensor(h, t) -> None:
    if not torch.is_tensor(t):
        t = torch.as_tensor(np.asarray(t))
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def data_fingerprint(data) -> str | None:
    """SHA-256 of a training set's contents, to refuse resuming on other data of the same size.

    Handles ``(x, y)`` tensors, a ``TensorDataset``, a ``Subset`` of a handled data set, data sets
    with ``data``/``targets`` arrays (torchvision's CIFAR, MNIST) or ``samples`` (``ImageFolder``);
    ``None`` for anything else (then the contents are not checked on resume).
    """
    import hashlib

    from torch.utils.data import DataLoader, Subset, TensorDataset

    h = hashlib.sha256()
    if isinstance(data, DataLoader):
        data = data.dataset
    if isinstance(data, Subset):
        inner = data_fingerprint(data.dataset)
        if inner is None:
            return None
        h.update(inner.encode())
        _hash_tensor(h, torch.as_tensor(list(data.indices), dtype=torch.int64))
        return h.hexdigest()
    if isinstance(data, (tuple, list)) and data and all(torch.is_tensor(t) for t in data):
        tensors = data
    elif isinstance(data, TensorDataset):
        tensors = data.tensors
    elif hasattr(data, "data") and hasattr(data, "targets"):
        tensors = (data.data, data.targets)
    elif hasattr(data, "samples"):
        h.update(repr(list(data.samples)).encode())
        return h.hexdigest()
    else:
        return None
    try:
        for t in tensors:
            _hash_tensor(h, t)
    except (TypeError, ValueError, RuntimeError):
        return None
    return h.hexdigest()


# ------------------------------------------------------------------------------------------
# The training loop's state
# ------------------------------------------------------------------------------------------
def training_state(
    *,
    model: nn.Module,
    guide,
    optimizer: torch.optim.Optimizer,
    scheduler,
    step: int,
    epoch: int,
    batch: int,
    data_seed: int,
    config: dict,
    history: dict,
    device=None,
) -> dict:
    """Everything to save (see the module docstring); values are tensors and plain values only."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": model.state_dict(),
        "guide": guide.state_dict() if isinstance(guide, nn.Module) else None,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "position": {"step": int(step), "epoch": int(epoch), "batch": int(batch)},
        "rng": rng_state(device),
        "data_seed": int(data_seed),
        "config": dict(config),
        "history": history,
    }


def _check_optimizer(path, optimizer, saved: dict) -> None:
    ours = [len(g["params"]) for g in optimizer.param_groups]
    theirs = [len(g.get("params", ())) for g in saved.get("param_groups", ())] if isinstance(saved, dict) else None
    if ours != theirs:
        raise CheckpointError(
            f"{path}: the optimizer state does not fit this optimizer: parameter groups of sizes {theirs} "
            f"in the checkpoint vs {ours} here"
        )


def restore_training(path, ckpt: dict, *, model: nn.Module, guide, optimizer, scheduler, device=None) -> None:
    """Put a checkpoint's state into the modules, optimizer, scheduler and RNGs (all checked first)."""
    _check_optimizer(path, optimizer, ckpt["optimizer"])
    _load_modules(path, ckpt, model, guide)
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    set_rng_state(ckpt["rng"], device)


def check_resumable(path, saved: dict, record: dict) -> None:
    """The interrupted run's data and batch layout must be this run's, or the position means nothing."""
    keys = ("num_data", "batch_size", "steps_per_epoch", "optimizer")
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs now {record[k]!r}" for k in keys if saved.get(k) != record[k]]
    theirs, ours = saved.get("data_fingerprint"), record.get("data_fingerprint")
    if theirs and ours and theirs != ours:
        diff.append("training data: the checkpoint was trained on other data of the same size (contents differ)")
    if diff:
        raise CheckpointError(f"{path} cannot resume this run: " + "; ".join(diff))


def _all_finite(tensors) -> bool:
    tensors = list(tensors)
    return not tensors or bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


@dataclass
class Resumed:
    """Where a resumed run goes on: the global ``step``, ``batch`` batches of ``epoch`` consumed, the
    data-order seed, the finished epochs' records, this epoch's running sums (over all ranks, held
    by the main process only; ``None`` on the others) and the seconds trained so far."""

    step: int
    epoch: int
    batch: int
    data_seed: int
    epochs: list
    totals: dict | None
    seconds: float


class Checkpointer:
    """Saves a training run to ``checkpoint_dir/checkpoint.pt`` and resumes it from there.

    Every rank holds one and calls :meth:`start` and :meth:`save` at the same points (the running
    sums are summed over the ranks there); rank 0 writes. ``record`` is the run's settings and
    layout in plain values (:meth:`~rank1_pyro.inference.train_config.TrainConfig.record`), stored in
    every checkpoint and compared on resuming; ``ctx`` is the
    :class:`~rank1_pyro.inference.distributed.DistributedContext`; ``write(state, path)`` writes the
    file (:func:`atomic_save` when ``None``). The trained parameters and every buffer of model and
    guide must be finite for a write. With ``checkpoint_dir=None`` nothing is saved or resumed.
    """

    def __init__(self, checkpoint_dir, model, guide, optimizer, scheduler, record: dict, ctx, device, write=None):
        self.path = None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT_NAME
        self.model, self.guide, self.optimizer, self.scheduler = model, guide, optimizer, scheduler
        self.record, self.ctx, self.device, self.write = record, ctx, device, write
        modules = [m for m in (model, guide) if isinstance(m, nn.Module)]
        params = [p for m in modules for p in m.parameters() if p.requires_grad]
        self.tensors = [*params, *(b for m in modules for b in m.buffers())]
        if self.path is not None and ctx.is_main:
            remove_stale_temporaries(self.path)

    @staticmethod
    def check_directory(checkpoint_dir) -> None:
        """Raise unless ``checkpoint_dir`` (``None``, or a path) is a directory or can be created as one."""
        if checkpoint_dir is None:
            return
        where = Path(checkpoint_dir)
        while not where.exists() and where != where.parent:
            where = where.parent
        if where.exists() and not where.is_dir():
            what = "is a file" if where == Path(checkpoint_dir) else f"cannot be created: {where} is a file"
            raise ValueError(f"checkpoint_dir {checkpoint_dir} {what}, not a directory")

    def start(self, resume: bool, ordered: bool = True) -> Resumed | None:
        """Restore the checkpoint into model, guide, optimizer, scheduler and RNGs when ``resume`` and
        the file exists (else start afresh: ``None``); then wait for every rank, so that all have read
        it before rank 0 may write a new one. ``ordered=False`` (a loader train cannot re-order) warns
        when resuming mid-epoch."""
        resumed = None
        if resume and self.path is not None and self.path.is_file():
            ckpt = read_checkpoint(self.path)
            check_resumable(self.path, ckpt["config"], self.record)
            restore_training(
                self.path,
                ckpt,
                model=self.model,
                guide=self.guide,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                device=self.device,
            )
            position, saved = ckpt["position"], ckpt["history"]
            resumed = Resumed(
                step=position["step"],
                epoch=position["epoch"],
                batch=position["batch"],
                data_seed=ckpt["data_seed"],
                epochs=list(saved["epochs"]),
                totals=dict(saved["totals"]) if self.ctx.is_main else None,  # the sums over all ranks, counted once
                seconds=float(saved["seconds"]),
            )
            if not ordered and resumed.batch:
                warnings.warn(
                    f"resuming mid-epoch from {self.path} with a DataLoader whose order train cannot control: "
                    "the consumed batches are skipped by reading them, which is exact only if the loader "
                    "yields the same batches in every pass",
                    stacklevel=3,
                )
        if self.ctx.enabled:
            torch.distributed.barrier()
        return resumed

    def save(self, *, step: int, epoch: int, batch: int, data_seed: int, epochs: list, totals: dict, seconds: float):
        """Write the state after ``batch`` batches of ``epoch`` (global ``step``): every rank calls it, rank 0
        writes. ``totals`` are this rank's running sums of the epoch (device tensors or floats). Returns
        ``False``, writing nothing, when a parameter or buffer is not finite (the same on every rank)."""
        if self.path is None:
            return True
        if not _all_finite(self.tensors):
            return False
        sums = sum_over_ranks(on_host(totals), self.ctx, self.device)  # the epoch's running sums, over all ranks
        if not self.ctx.is_main:
            return True
        state = training_state(
            model=self.model,
            guide=self.guide,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            step=step,
            epoch=epoch,
            batch=batch,
            data_seed=data_seed,
            config=self.record,
            history={"epochs": epochs, "totals": sums, "seconds": seconds},
            device=self.device,
        )
        (self.write or atomic_save)(state, self.path)
        return True
