r"""One training loop for every model, guide and objective.

:func:`train` minimises an objective's ``differentiable_loss`` (the negative ELBO) with a torch
optimizer over the model's point estimates (W, biases, BatchNorm) and the guide's variational
parameters. It implements the reference recipe of Dusenberry et al. (2020):

* SGD with Nesterov momentum, linear warm-up and step decay (``lr × decay_rate`` at each of
  ``decay_epochs``), or Adam for small models;
* L2 weight decay on the model's parameters only (W and BatchNorm), never on the guide's;
* KL annealing: β = min(1, step / (``kl_annealing_epochs`` × steps per epoch)) multiplies the KL;
* an optional gradient-norm clip;
* ``device="auto"``: CUDA when available, else the CPU; model, guide and every batch move there;
* gradients of the per-example loss −ELBO / N (the same optimum as −ELBO; learning rates are
  those of ordinary per-example training losses, as in the reference);
* a guard against non-finite losses or gradients: training stops *before* the bad update with
  :class:`NonFiniteLossError`, naming the epoch and step, so model and guide keep their last good
  parameters;
* per-epoch history (loss, NLL, KL, training accuracy, and validation accuracy / NLL / ECE from
  the Monte Carlo predictive), and a tqdm progress bar when the output is a terminal;
* checkpoints (``checkpoint_dir``, ``checkpoint_every``, ``resume``): atomic files holding the
  whole training state, from which a killed run continues *exactly* -- the same batches in
  the same order from the interrupted position and the same random draws, so on the CPU the
  final parameters are bit-identical to an uninterrupted run's (:mod:`.checkpoint`);
* data-parallel training under ``torchrun`` (``distributed="auto"``): the data is sharded, the
  gradients are averaged, and a step equals a single-process step on the same global batch
  (:mod:`.distributed`).

Data order: the examples of epoch e are read in the order ``randperm(N, seed + e)`` (a
:class:`~.distributed.ShardedSampler`), a function of the seed and the epoch alone; that is
what lets a resumed run skip the batches already consumed. Validation runs on a fork of the
random state, so ``val_data`` never changes the training trajectory.

A deterministic network is the special case of a model without factors and ``guide=None``
(maximum a posteriori training with weight decay).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import numbers
import sys
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pyro
import pyro.poutine as poutine
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, RandomSampler, SequentialSampler, TensorDataset
from tqdm.auto import tqdm

from .._checks import one_of, positive_int
from .. import metrics
from . import distributed as dist_utils
from .checkpoint import CHECKPOINT_NAME, CheckpointError, atomic_save, read_checkpoint, remove_stale_temporaries
from .checkpoint import data_fingerprint
from .checkpoint import restore_training, training_state
from .objectives import OBJECTIVES, MixtureELBO, Rank1ELBO, kl_annealing
from .predictive import Rank1Posterior, as_tensor, floating_dtype, predict

__all__ = ["train", "History", "NonFiniteLossError", "resolve_device", "empty_guide"]


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient became NaN/inf; parameters hold the last good values."""


def resolve_device(device="auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else goes to ``torch.device``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r} was requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device={str(device)!r} was requested but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s) (cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    return device


def _check_pair(data, name: str = "data") -> tuple[torch.Tensor, torch.Tensor]:
    """Check ``(x, y)`` tensors or numpy arrays: same number of examples, not empty, no NaN/inf;
    return them as tensors."""
    if isinstance(data, (tuple, list)) and len(data) == 2:
        data = tuple(as_tensor(t, name) for t in data)
    if not (isinstance(data, (tuple, list)) and len(data) == 2 and all(torch.is_tensor(t) for t in data)):
        raise TypeError(
            f"{name} must be a DataLoader or a pair of tensors (x, y), got {type(data).__name__} "
            "(numpy arrays are accepted as tensors)"
        )
    x, y = data
    of = "" if name == "data" else f" of {name}"
    if x.dim() == 0 or y.dim() == 0:
        raise ValueError(f"x and y{of} need a leading example dim, got shapes {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y{of} have different numbers of examples: {x.shape[0]} vs {y.shape[0]}")
    if x.shape[0] == 0:
        raise ValueError(f"the data set{of} is empty")
    for t, label in ((x, "x"), (y, "y")):
        if t.is_floating_point() or t.is_complex():
            bad = ~torch.isfinite(t).reshape(t.shape[0], -1).all(-1)
            if bad.any():
                raise ValueError(
                    f"{label}{of} contains NaN or infinite values ({int(bad.sum())} examples, the first at index "
                    f"{int(bad.nonzero()[0])})"
                )
    return x, y


def _model_dtype(*modules) -> torch.dtype:
    """The floating-point dtype of the first floating parameter among ``modules`` (the default dtype if none)."""
    return floating_dtype(*modules) or torch.get_default_dtype()


def _to_model(t: torch.Tensor, device, dtype: torch.dtype, non_blocking: bool = False) -> torch.Tensor:
    """``t`` on ``device``; floating-point inputs (e.g. numpy's float64) converted to the model's ``dtype``."""
    if t.is_floating_point() and t.dtype != dtype:
        return t.to(device, dtype=dtype, non_blocking=non_blocking)
    return t.to(device, non_blocking=non_blocking)


def _rebuildable(loader: DataLoader) -> bool:
    """A loader over a map-style data set with the default sampler, which train can re-shard and re-order."""
    return (
        not isinstance(loader.dataset, IterableDataset)
        and loader.batch_size is not None
        and type(loader.batch_sampler) is BatchSampler
        and type(loader.sampler) in (RandomSampler, SequentialSampler)
    )


def _training_loader(data, batch_size: int, ctx, data_seed: int):
    """``(loader, sampler)`` reading epoch e in the order of ``ShardedSampler(seed=data_seed)``.

    ``batch_size`` (or a given loader's) is the global batch; each of the ``ctx.world_size``
    ranks reads ``batch_size // world_size`` examples per step. ``sampler`` is ``None`` for a
    loader train cannot re-order (custom sampler, iterable data set), which is used as it is.
    """
    if isinstance(data, DataLoader):
        if not _rebuildable(data):
            if ctx.enabled:
                raise ValueError(
                    "distributed training needs (x, y) tensors or a DataLoader over a map-style data set with the "
                    "default sampler (shuffle=True/False), so that it can shard the data"
                )
            return data, None
        dataset, batch_size, shuffle = data.dataset, data.batch_size, isinstance(data.sampler, RandomSampler)
        options = dict(
            num_workers=data.num_workers,
            collate_fn=data.collate_fn,
            pin_memory=data.pin_memory,
            drop_last=data.drop_last,
            timeout=data.timeout,
            worker_init_fn=data.worker_init_fn,
        )
        if data.num_workers > 0:
            options.update(
                persistent_workers=data.persistent_workers,
                prefetch_factor=data.prefetch_factor,
                multiprocessing_context=data.multiprocessing_context,
            )
    else:
        dataset, shuffle, options = TensorDataset(*data), True, {}
    if batch_size % ctx.world_size:
        raise ValueError(
            f"batch_size={batch_size} is the global batch and must be divisible by the number of processes "
            f"({ctx.world_size})"
        )
    sampler = dist_utils.ShardedSampler(dataset, ctx.world_size, ctx.rank, shuffle=shuffle, seed=data_seed)
    # the loader's own generator: creating its iterator never draws from the global RNG
    loader = DataLoader(
        dataset, batch_size // ctx.world_size, sampler=sampler, generator=torch.Generator(), **options
    )
    return loader, sampler


def _set_position(loader, sampler, data_seed: int, epoch: int, batch: int):
    """An iterator over epoch ``epoch`` from batch ``batch`` on."""
    if sampler is None:  # a loader train cannot re-order: skip consumed batches by reading them
        with torch.random.fork_rng(devices=[]):  # its iterator's worker seed is not drawn from the training stream
            iterator = iter(loader)
        return itertools.islice(iterator, batch, None)
    sampler.seed = data_seed
    sampler.set_position(epoch, batch * loader.batch_size)
    loader.generator.manual_seed((data_seed * 1_000_003 + epoch) % 2**63)  # worker seeds: a function of (seed, epoch)
    return iter(loader)


def empty_guide(*args, **kwargs) -> None:
    """The guide of a model without latent variables."""


@dataclass
class History:
    """Per-epoch training records (dicts of floats) and the total wall time."""

    epochs: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def last(self) -> dict:
        return self.epochs[-1] if self.epochs else {}

    def column(self, key: str) -> list[float]:
        return [e[key] for e in self.epochs if key in e]


def _objective(objective) -> Rank1ELBO:
    if objective is None:
        return MixtureELBO()
    if isinstance(objective, str):
        return OBJECTIVES[one_of("objective", objective, sorted(OBJECTIVES))]()
    if not hasattr(objective, "differentiable_loss"):
        raise TypeError(f"objective must be a name or a Pyro ELBO, got {type(objective).__name__}")
    return objective


def _optimizer(model, guide, optimizer, lr, momentum, nesterov, weight_decay):
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    if isinstance(guide, nn.Module):
        groups.append({"params": [p for p in guide.parameters() if p.requires_grad], "weight_decay": 0.0})
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("nothing to train: the model and guide have no trainable parameters")
    if optimizer == "adam":
        make = functools.partial(torch.optim.Adam, groups, lr=lr)
    elif optimizer == "sgd":
        make = functools.partial(torch.optim.SGD, groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
    else:
        raise ValueError(f"optimizer: unknown name {optimizer!r}; valid: ['adam', 'sgd']")
    try:  # fused kernels skip a step on the device when told to (``found_inf``): see _DeviceGuard
        return make(fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without fused kernels
        return make()


#: ``train(precision=...)``: float32, or bfloat16 autocast of the forward pass
PRECISIONS = ("fp32", "bf16")


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


#: with the device-side guard, the host reads the non-finite flag at least every this many steps
#: (and at every checkpoint and epoch end); a failure is reported then, parameters untouched since
GUARD_READ_EVERY = 100


class _DeviceGuard:
    """The non-finite guard without a host read per step (single process, fused optimizer).

    Every step it records on the device whether the loss or the gradient norm is not finite, and
    hands the fused optimizer ``found_inf`` = "a step has failed so far", so the bad step and every
    step after it are skipped on the device (no parameter or optimizer-state change). :meth:`check`
    reads the flag (one host read) and raises for the first bad step, as the per-step guard did.
    """

    def __init__(self, optimizer, device):
        self.optimizer = optimizer
        self.failed = torch.zeros((), dtype=torch.bool, device=device)
        self.step = torch.full((), -1, dtype=torch.long, device=device)
        self.kind = torch.zeros((), dtype=torch.long, device=device)  # 0 loss, 1 gradient norm, 2 labels
        self.value = torch.zeros((), dtype=torch.float64, device=device)

    @staticmethod
    def usable(optimizer, ctx) -> bool:
        return not ctx.enabled and all(g.get("fused") for g in optimizer.param_groups)

    def update(self, step: int, loss: torch.Tensor, norm: torch.Tensor, bad_labels) -> torch.Tensor:
        """Record this step; returns the device flag "no step has failed" (to mask running sums)."""
        loss_bad = ~torch.isfinite(loss.detach())
        bad = loss_bad | ~torch.isfinite(norm)
        first = bad & ~self.failed
        kind = torch.where(loss_bad, 0, 1)
        if bad_labels is not None:
            kind = torch.where(bad_labels, 2, kind)
        self.step = torch.where(first, step, self.step)
        self.kind = torch.where(first, kind, self.kind)
        value = torch.where(loss_bad, loss.detach().double(), norm.double())
        self.value = torch.where(first, value, self.value)
        self.failed = self.failed | bad
        self.optimizer.found_inf = self.failed.float()
        return ~self.failed

    def check(self, steps_per_epoch: int, num_classes) -> None:
        if not bool(self.failed):
            return
        step = int(self.step)
        epoch, batch = divmod(step, steps_per_epoch)
        where = f"at epoch {epoch}, step {batch} (global step {step})"
        kind = int(self.kind)
        if kind == 2:
            _raise_if_bad_labels(True, num_classes, where)
        raise NonFiniteLossError(
            f"{'loss' if kind == 0 else 'gradient norm'} is {float(self.value)} {where}; "
            "training stopped before the update, parameters hold their last good values"
        )


def _lr_factor(step: int, steps_per_epoch: int, warmup_epochs: float, decay_epochs, decay_rate: float) -> float:
    """Linear warm-up over ``warmup_epochs``, then ×``decay_rate`` at each epoch in ``decay_epochs``."""
    epoch = step / steps_per_epoch
    warm = min(1.0, (step + 1) / (warmup_epochs * steps_per_epoch)) if warmup_epochs > 0 else 1.0
    return warm * decay_rate ** sum(epoch >= e for e in decay_epochs)


def _number(name: str, value, minimum: float = 0.0, strict: bool = False, integer: bool = False):
    """Check ``value`` is a finite number (an int when ``integer``) ``>= minimum`` (``>`` when ``strict``)."""
    kinds = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite {'integer' if integer else 'number'}, got {value!r}")
    if value < minimum or (strict and value == minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum:g}, got {value!r}")
    return value


def _check_arguments(
    epochs, batch_size, optimizer, lr, momentum, weight_decay, warmup_epochs, decay_epochs, decay_rate,
    kl_annealing_epochs, grad_clip, eval_samples, seed, checkpoint_dir, checkpoint_every, resume, distributed,
):
    """Every argument check of :func:`train`, before anything runs or touches the disk.

    Returns ``decay_epochs`` as a tuple (it may arrive as any iterable).
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be an integer >= 0, got {epochs!r}")
    positive_int("batch_size", batch_size)
    one_of("optimizer", optimizer, ["adam", "sgd"])
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not lr > 0 or not math.isfinite(lr):
        raise ValueError(f"lr must be > 0, got {lr!r}")
    _number("momentum", momentum)
    _number("weight_decay", weight_decay)
    _number("warmup_epochs", warmup_epochs)
    _number("decay_rate", decay_rate, strict=True)
    _number("kl_annealing_epochs", kl_annealing_epochs)
    if isinstance(decay_epochs, (str, bytes)) or not isinstance(decay_epochs, Iterable):
        raise ValueError(f"decay_epochs must be a sequence of epochs, got {decay_epochs!r}")
    decay_epochs = tuple(decay_epochs)
    for e in decay_epochs:
        _number("decay_epochs entries", e)
    if grad_clip is not None and not grad_clip > 0:
        raise ValueError(f"grad_clip must be > 0 or None, got {grad_clip!r}")
    _number("eval_samples", eval_samples, minimum=1, integer=True)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed must be an integer >= 0 or None, got {seed!r}")
    if checkpoint_dir is not None and not isinstance(checkpoint_dir, (str, Path)):
        raise TypeError(f"checkpoint_dir must be a path (str or pathlib.Path), got {type(checkpoint_dir).__name__}")
    if checkpoint_dir is not None:
        where = Path(checkpoint_dir)
        while not where.exists() and where != where.parent:
            where = where.parent
        if where.exists() and not where.is_dir():
            what = "is a file" if where == Path(checkpoint_dir) else f"cannot be created: {where} is a file"
            raise ValueError(f"checkpoint_dir {checkpoint_dir} {what}, not a directory")
    if checkpoint_every is not None:
        _number("checkpoint_every", checkpoint_every, minimum=1, integer=True)
        if checkpoint_dir is None:
            raise ValueError("checkpoint_every needs checkpoint_dir (where to write the checkpoints)")
    if not isinstance(resume, bool):
        raise ValueError(f"resume must be True or False, got {resume!r}")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir (where to find the checkpoint)")
    dist_utils.check_mode(distributed)
    return decay_epochs


def _one_output(model, x: torch.Tensor, device) -> torch.Tensor:
    """The network's outputs for one example, in eval mode, on a fork of the random state
    (training draws are not affected, BatchNorm statistics are not updated)."""
    training = model.training
    try:
        model.eval()
        devices = [device] if device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices), poutine.block():
            return model.outputs(_to_model(x[:1], device, _model_dtype(model)))
    finally:
        model.train(training)


def _check_model_labels(model, y: torch.Tensor, out: torch.Tensor) -> None:
    """Check all labels of tensor data against the network's outputs ``out`` for one example, before training starts."""
    if hasattr(model, "_check_labels"):
        model._check_labels(y, out.expand(*out.shape[:-2], y.shape[0], out.shape[-1]))


def _num_classes(model, out: torch.Tensor | None) -> int | None:
    """The number of classes of a categorical rank-1 model (``None`` for other models), from its
    outputs ``out``: the training loop checks every batch's labels against it."""
    if out is None or getattr(model, "likelihood", None) != "categorical":
        return None
    return int(out.shape[-1])


def _label_flag(y: torch.Tensor, num_classes: int | None):
    """``(flag, y)``: a device tensor, true when a label lies outside ``0..num_classes-1``, and the labels
    clamped into range (so an out-of-range label never reaches an indexing kernel). No host sync:
    the flag is read only when the loss (made NaN by it) is not finite."""
    if num_classes is None or y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
        return None, y
    return ((y < 0) | (y >= num_classes)).any(), y.clamp(0, num_classes - 1)


def _raise_if_bad_labels(flag, num_classes: int | None, where: str) -> None:
    if flag is not None and bool(flag):
        raise ValueError(
            f"labels out of range {where}: expected 0..{num_classes - 1}; training stopped before the update, "
            "parameters hold their last good values"
        )


def _first_batch(loader: Iterable):
    for batch in loader:
        return batch
    raise ValueError("the training data set is empty")


def _objective_name(elbo) -> str:
    for name, cls in OBJECTIVES.items():
        if type(elbo) is cls:
            return name
    return type(elbo).__name__


def _all_finite(tensors) -> bool:
    tensors = list(tensors)
    return not tensors or bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def evaluate(model, guide, data, num_samples: int = 8, batch_size: int = 512, device=None) -> dict[str, float]:
    """Accuracy, NLL, ECE, Brier of the Monte Carlo predictive on ``(x, y)`` or a loader."""
    guide = empty_guide if guide is None else guide
    if isinstance(data, DataLoader):
        xs, ys = zip(*[(b[0], b[1]) for b in data])
        x, y = torch.cat(xs), torch.cat(ys)
    else:
        x, y = _check_pair(data)
    prediction = predict(Rank1Posterior(model, guide), x, num_samples=num_samples, batch_size=batch_size, device=device)
    if prediction.likelihood == "categorical":
        return metrics.classification_metrics(prediction.probs, y.cpu(), prediction.log_probs)
    return {
        "rmse": metrics.rmse(prediction.mean, y.cpu()),
        "nll": metrics.gaussian_nll(prediction.mean, prediction.variance, y.cpu()),
    }


def train(
    model: nn.Module,
    guide,
    data,
    *,
    objective=None,
    epochs: int = 10,
    batch_size: int = 128,
    optimizer: str = "adam",
    lr: float = 1e-3,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 0.0,
    warmup_epochs: float = 0.0,
    decay_epochs=(),
    decay_rate: float = 0.1,
    kl_annealing_epochs: float = 0.0,
    grad_clip: float | None = None,
    device="auto",
    val_data=None,
    eval_samples: int = 4,
    progress: bool | None = None,
    seed: int | None = None,
    checkpoint_dir=None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    distributed="auto",
    precision: str = "fp32",
    on_epoch=None,
    log_csv=None,
) -> History:
    """Train ``model`` and ``guide`` on ``data`` (``(x, y)`` tensors or a DataLoader); see the module docs.

    ``precision="bf16"`` runs the forward pass under ``torch.autocast`` with bfloat16: matmuls and
    convolutions in bf16, while parameters, the factors' sample sites, the KL, the loss and the
    optimizer state stay float32 (bf16 has float32's range, so no loss scaling is needed).

    Inputs are converted at the boundary: numpy arrays are accepted as tensors, and floating-point
    inputs of another dtype (numpy's float64) are cast to the dtype of the model's parameters.
    Every batch's labels are checked on the device (no host sync per batch): an out-of-range label
    stops training before the update with a :class:`ValueError` naming the epoch and step.

    Progress (``progress``): ``None`` (default) shows a tqdm bar per step on a terminal, with the
    epoch's running loss, accuracy and KL refreshed every few steps (:func:`refresh_every`; the
    running sums stay on the device and are read only then), and prints one line per epoch to
    stderr otherwise (log files, ``nohup``, CI); ``True`` or ``"bar"`` forces the bar, ``"lines"``
    the lines, ``False`` shows nothing.

    Per-epoch logging: ``on_epoch(history)`` is called after every epoch (once its checkpoint is
    written), with the :class:`History` so far (``history.last`` is the new epoch's record);
    ``log_csv=PATH`` writes the records to a CSV file, one row per epoch appended as it ends (so
    ``tail -f PATH`` follows a run; a resumed run rewrites the file from its checkpoint's history
    when the file disagrees with it). Both run on the main process only (rank 0 under torchrun).

    ``model.num_data`` is set to the training-set size so minibatch likelihoods scale by N / B.
    Returns the :class:`History`. ``objective`` is ``"mixture"`` (default), ``"averaged"``, or any
    Pyro ELBO instance. KL annealing sets a rank-1 objective's ``annealing`` factor, which multiplies its own
    ``kl_weight`` (so ``AveragedELBO(kl_weight=4.0)`` trains with 4 × β); other ELBOs refuse annealing.

    Checkpoints: with ``checkpoint_dir``, the whole training state is written atomically to
    ``checkpoint_dir/checkpoint.pt`` at the end of every epoch and, with ``checkpoint_every=n``,
    after every n-th step; rank 0 writes it. ``resume=True`` continues from that file when it
    exists (and starts afresh when it does not): the same batches in the same order from the
    interrupted position, the same random draws. The global batch size and the data set size
    must be those of the interrupted run. A checkpoint is only written while every parameter is
    finite, so after :class:`NonFiniteLossError` the file on disk is the last good state.

    Distributed: ``distributed="auto"`` trains data-parallel when started by ``torchrun`` with
    more than one process (``True`` insists, ``False`` never does); ``batch_size`` is then the
    global batch, split evenly over the processes (see :mod:`rank1_pyro.inference.distributed`).
    """
    decay_epochs = _check_arguments(
        epochs, batch_size, optimizer, lr, momentum, weight_decay, warmup_epochs, decay_epochs, decay_rate,
        kl_annealing_epochs, grad_clip, eval_samples, seed, checkpoint_dir, checkpoint_every, resume, distributed,
    )
    one_of("precision", precision, PRECISIONS)
    _check_progress(progress)
    if on_epoch is not None and not callable(on_epoch):
        raise TypeError(f"on_epoch must be a callable taking the History, got {type(on_epoch).__name__}")
    if log_csv is not None and not isinstance(log_csv, (str, Path)):
        raise TypeError(f"log_csv must be a path (str or pathlib.Path), got {type(log_csv).__name__}")
    elbo = _objective(objective)
    if kl_annealing_epochs and not isinstance(elbo, Rank1ELBO):
        raise ValueError(
            f"kl_annealing_epochs={kl_annealing_epochs!r} needs a rank-1 objective (AveragedELBO or MixtureELBO), "
            f"which has a KL weight; {type(elbo).__name__} has none (pass kl_annealing_epochs=0)"
        )
    device = resolve_device(device)
    if not isinstance(data, DataLoader):
        data = _check_pair(data)
    if val_data is not None and not isinstance(val_data, DataLoader):
        _check_pair(val_data, "val_data")
    guide = empty_guide if guide is None else guide
    ctx, device = dist_utils.setup(distributed, device)
    if seed is not None:
        pyro.set_rng_seed(seed)
    elif ctx.enabled:  # every rank draws the same factors: one seed for all
        seed_all = dist_utils.broadcast_int(int(torch.randint(0, 2**31, ()).item()), device)
        pyro.set_rng_seed(seed_all)
    data_seed = seed if seed is not None else int(torch.randint(0, 2**31, ()).item())
    loader, sampler = _training_loader(data, batch_size, ctx, data_seed)
    num_data = len(loader.dataset)
    if num_data == 0:
        raise ValueError("the training data set is empty")
    model.to(device)
    if isinstance(guide, nn.Module):
        guide.to(device)
    dtype = _model_dtype(model)
    x0, y0 = (_to_model(t, device, dtype) for t in _first_batch(loader)[:2])
    out0 = _one_output(model, x0, device) if hasattr(model, "outputs") else None  # one forward, for both checks
    if out0 is not None and not isinstance(data, DataLoader):
        _check_model_labels(model, data[1], out0)
    num_classes = _num_classes(model, out0)
    if hasattr(model, "num_data"):
        model.num_data = num_data
    # one call creates lazily-initialised guide parameters (Pyro autoguides) before the optimizer
    guide(x0, y0)
    modules = [m for m in (model, guide) if isinstance(m, nn.Module)]
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    buffers = [b for m in modules for b in m.buffers()]
    if ctx.enabled:  # one model: rank 0's initial state everywhere
        dist_utils.broadcast_tensors([*(p for m in modules for p in m.parameters()), *buffers])
    opt = _optimizer(model, guide, optimizer, lr, momentum, nesterov, weight_decay)
    steps_per_epoch = max(len(loader), 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: _lr_factor(step, steps_per_epoch, warmup_epochs, decay_epochs, decay_rate)
    )
    config = dict(  # plain values, recorded in every checkpoint
        objective=_objective_name(elbo),
        kl_weight=getattr(elbo, "kl_weight", None),
        precision=precision,
        estimator=getattr(elbo, "estimator", None),
        epochs=epochs,
        batch_size=data.batch_size if isinstance(data, DataLoader) else batch_size,
        optimizer=optimizer,
        lr=float(lr),
        momentum=float(momentum),
        nesterov=bool(nesterov),
        weight_decay=float(weight_decay),
        warmup_epochs=float(warmup_epochs),
        decay_epochs=[float(e) for e in decay_epochs],
        decay_rate=float(decay_rate),
        kl_annealing_epochs=float(kl_annealing_epochs),
        grad_clip=None if grad_clip is None else float(grad_clip),
        seed=seed,
        num_data=num_data,
        steps_per_epoch=steps_per_epoch,
        world_size=ctx.world_size,
        checkpoint_every=checkpoint_every,
        # the training set's contents: resuming on other data of the same size is refused
        data_fingerprint=data_fingerprint(loader.dataset) if checkpoint_dir is not None else None,
    )
    history = History()
    totals = _zero_totals()
    step, start_epoch, start_batch, seconds_before = 0, 0, 0, 0.0
    path = None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT_NAME
    if path is not None and ctx.is_main:
        remove_stale_temporaries(path)
    if resume and path.is_file():
        ckpt = read_checkpoint(path)
        _check_resumable(path, ckpt["config"], config)
        restore_training(path, ckpt, model=model, guide=guide, optimizer=opt, scheduler=sched, device=device)
        position, saved = ckpt["position"], ckpt["history"]
        step, start_epoch, start_batch = position["step"], position["epoch"], position["batch"]
        data_seed = ckpt["data_seed"]
        history.epochs = list(saved["epochs"])
        totals = dict(saved["totals"]) if ctx.is_main else _zero_totals()  # the sums over all ranks, counted once
        seconds_before = float(saved["seconds"])
        if sampler is None and start_batch:
            warnings.warn(
                f"resuming mid-epoch from {path} with a DataLoader whose order train cannot control: "
                "the consumed batches are skipped by reading them, which is exact only if the loader "
                "yields the same batches in every pass",
                stacklevel=2,
            )
    # after a resume: a checkpoint's optimizer state may have switched its kernels (fused or not)
    guard = _DeviceGuard(opt, device) if _DeviceGuard.usable(opt, ctx) else None
    if ctx.enabled:
        torch.distributed.barrier()  # every rank has read the checkpoint before rank 0 may write a new one

    def save(epoch: int, batch: int) -> None:
        """Write the state after ``batch`` batches of ``epoch`` (every rank calls it, rank 0 writes)."""
        if guard is not None:
            guard.check(steps_per_epoch, num_classes)
        if path is None:
            return
        if not _all_finite([*params, *buffers]):  # the same parameters on every rank: all stop together
            raise NonFiniteLossError(
                f"parameters are not finite after global step {step}; checkpoint not written, "
                f"{path} keeps the last good state"
            )
        sums = _sum_over_ranks(_on_host(totals), ctx, device)  # the epoch's running sums so far, over all ranks
        if not ctx.is_main:
            return
        record = {"epochs": history.epochs, "totals": sums, "seconds": seconds_before + time.perf_counter() - start}
        atomic_save(
            training_state(
                model=model, guide=guide, optimizer=opt, scheduler=sched, step=step, epoch=epoch, batch=batch,
                data_seed=data_seed, config=config, history=record, device=device,
            ),
            path,
        )

    mode = _progress_mode(progress) if ctx.is_main else None
    every = refresh_every(steps_per_epoch)
    csv_log = None if log_csv is None or not ctx.is_main else CsvLog(log_csv)
    # Pyro's shape and support checks run on the first step (clear errors for a bad model or
    # guide); later steps skip them, the non-finite guard below still catches invalid values
    validated_step = step
    start = time.perf_counter()
    bar = tqdm(total=epochs * steps_per_epoch, initial=step, desc=f"epoch {start_epoch + 1}/{epochs}", disable=mode != "bar", leave=True,
               unit="step", dynamic_ncols=True)
    for epoch in range(start_epoch, epochs):
        bar.set_description(f"epoch {epoch + 1}/{epochs}", refresh=False)
        model.train()
        if isinstance(guide, nn.Module):
            guide.train()
        first = start_batch if epoch == start_epoch else 0
        if first == 0:
            totals = _zero_totals()
        for batch_idx, batch in enumerate(_set_position(loader, sampler, data_seed, epoch, first), start=first):
            x, y = _to_model(batch[0], device, dtype, True), _to_model(batch[1], device, dtype, True)
            bad_labels, y = _label_flag(y, num_classes)
            if ctx.enabled and buffers:
                dist_utils.broadcast_tensors(buffers)
            if isinstance(elbo, Rank1ELBO):  # β multiplies the objective's own kl_weight, never replaces it
                elbo.annealing = kl_annealing(step + 1, kl_annealing_epochs * steps_per_epoch)
            opt.zero_grad(set_to_none=True)
            with pyro.validation_enabled(pyro.infer.util.is_validation_enabled() and step == validated_step), \
                    _autocast(device, precision):
                if isinstance(elbo, Rank1ELBO):
                    terms = elbo.loss_terms(model, guide, x, y)
                    loss = terms.loss
                else:
                    terms, loss = None, elbo.differentiable_loss(model, guide, x, y)
            if bad_labels is not None:
                loss = torch.where(bad_labels, torch.full_like(loss, math.nan), loss)
            where = f"at epoch {epoch}, step {batch_idx} (global step {step})"
            keep = True
            if guard is not None:  # no host read: the flag is read every GUARD_READ_EVERY steps
                (loss / num_data).backward()
                norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip else math.inf)
                keep = guard.update(step, loss, norm, bad_labels)
            elif not ctx.enabled:
                if not torch.isfinite(loss):
                    _raise_if_bad_labels(bad_labels, num_classes, where)
                    raise NonFiniteLossError(
                        f"loss is {loss.item()} {where}; "
                        "training stopped before the update, parameters hold their last good values"
                    )
                # the per-example loss (−ELBO / N, the reference's "mean NLL + KL / N"): same optimum,
                # and learning rates mean what they mean for ordinary per-example losses
                (loss / num_data).backward()
            else:  # every rank takes part in the all-reduce, then all stop together
                finite = bool(torch.isfinite(loss))
                if finite:
                    (loss / num_data).backward()
                bad_ranks = dist_utils.average_gradients(params, ctx.world_size, flag=0.0 if finite else 1.0)
                if bad_ranks:
                    opt.zero_grad(set_to_none=True)
                    _raise_if_bad_labels(bad_labels, num_classes, f"{where} on rank {ctx.rank}")
                    raise NonFiniteLossError(
                        f"loss is not finite on {int(bad_ranks)} of {ctx.world_size} processes {where} "
                        f"(this rank's: {loss.item()}); training stopped before the update, parameters hold "
                        "their last good values"
                    )
            if guard is None:
                norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip else math.inf)
            if guard is None and not torch.isfinite(norm):
                opt.zero_grad(set_to_none=True)
                raise NonFiniteLossError(
                    f"gradient norm is {norm.item()} {where}; "
                    "training stopped before the update, parameters hold their last good values"
                )
            opt.step()
            sched.step()
            step += 1
            b = y.shape[0]
            # running sums stay on the device (a tensor per key), read once per epoch
            totals["seen"] += b
            _accumulate(totals, "loss", loss.detach().double() / num_data * b / num_data, keep)
            if terms is not None:
                _accumulate(totals, "nll", -terms.log_likelihood.detach().double() * b / num_data, keep)
                _accumulate(totals, "kl", terms.kl.detach().double() * b / num_data, keep)
                if terms.logits is not None:
                    probs = torch.softmax(terms.logits.detach(), -1).reshape(-1, *terms.logits.shape[-2:]).mean(0)
                    _accumulate(totals, "correct", (probs.argmax(-1) == y).sum().double(), keep)
            if guard is not None and step % GUARD_READ_EVERY == 0:
                guard.check(steps_per_epoch, num_classes)
            if checkpoint_every and step % checkpoint_every == 0 and batch_idx + 1 < steps_per_epoch:
                save(epoch, batch_idx + 1)
            if mode == "bar" and (batch_idx + 1) % every == 0:  # the running sums: one host read per `every` steps
                bar.set_postfix(_running(_on_host(totals), num_data, terms is not None, num_classes is not None),
                                refresh=False)
                bar.update(step - bar.n)
        if guard is not None:
            guard.check(steps_per_epoch, num_classes)
        if ctx.enabled and buffers:
            dist_utils.broadcast_tensors(buffers)
        totals = _sum_over_ranks(_on_host(totals), ctx, device)
        record = {
            "epoch": epoch + 1,
            "loss": totals["loss"],
            "lr": sched.get_last_lr()[0],
            "kl_weight": getattr(elbo, "effective_kl_weight", 1.0),
        }
        if isinstance(elbo, Rank1ELBO):
            record.update(nll=totals["nll"] / num_data, kl=totals["kl"])  # nll per example; kl in total
            if model.likelihood == "categorical":
                record["accuracy"] = totals["correct"] / max(totals["seen"], 1)
        if val_data is not None:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                val = evaluate(model, guide, val_data, num_samples=eval_samples, device=device)
            record.update({f"val_{k}": v for k, v in val.items()})
        history.epochs.append(record)
        totals = _zero_totals()
        save(epoch + 1, 0)
        history.seconds = seconds_before + time.perf_counter() - start
        if mode == "bar":
            bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k in _SHOWN}, refresh=False)
            bar.update(step - bar.n)
        elif mode == "lines":
            print(epoch_line(record, epochs, history.seconds), file=sys.stderr, flush=True)
        if csv_log is not None:
            csv_log.write(history.epochs)
        if on_epoch is not None and ctx.is_main:
            on_epoch(history)
    bar.close()
    history.seconds = seconds_before + time.perf_counter() - start
    return history


#: the record keys the progress bar and the per-epoch lines show, in this order
_SHOWN = ("loss", "nll", "kl", "accuracy", "val_accuracy", "val_nll", "val_rmse")
PROGRESS_MODES = (None, True, False, "bar", "lines")


def _check_progress(progress) -> None:
    if not any(progress is m or (isinstance(m, str) and progress == m) for m in PROGRESS_MODES):
        raise ValueError(f"progress must be None (auto), True, False, 'bar' or 'lines', got {progress!r}")


def _progress_mode(progress) -> str | None:
    """``"bar"`` (per-step tqdm bar), ``"lines"`` (a line per epoch on stderr) or ``None`` (silent)."""
    if progress is None:
        return "bar" if sys.stderr.isatty() else "lines"
    if progress is True or progress == "bar":
        return "bar"
    return "lines" if progress == "lines" else None


def refresh_every(steps_per_epoch: int) -> int:
    """How many steps pass between two refreshes of the progress bar (each reads the running sums
    from the device once): about 20 refreshes per epoch, at least 10 steps apart unless the epoch
    is shorter (then once, at its end)."""
    return min(steps_per_epoch, max(10, steps_per_epoch // 20))


def _running(sums: dict, num_data: int, rank1: bool, categorical: bool) -> dict:
    """The epoch's running means so far, formatted: loss and NLL per example, KL, training accuracy."""
    seen = max(sums["seen"], 1)
    out = {"loss": sums["loss"] * num_data / seen}  # each step adds (loss / N) * (b / N)
    if rank1:
        out.update(nll=sums["nll"] / seen, kl=sums["kl"] * num_data / seen)
    if rank1 and categorical:
        out["accuracy"] = sums["correct"] / seen
    return {k: f"{v:.4g}" for k, v in out.items()}


def epoch_line(record: dict, epochs: int, seconds: float) -> str:
    """One epoch's line for logs: ``epoch 3/10  loss 1.234  nll ...  accuracy 0.91  (12.3 s)``."""
    parts = [f"epoch {record['epoch']}/{epochs}"]
    parts += [f"{k} {record[k]:.4g}" for k in _SHOWN if k in record]
    return "  ".join(parts) + f"  ({seconds:.1f} s)"


class CsvLog:
    """The per-epoch records in a CSV file, one row per epoch, appended as epochs end.

    :meth:`write` is given every record so far; when the file holds exactly the rows of all but
    the last, the last row is appended (``tail -f`` follows it); otherwise (a new file, a resumed
    run whose file disagrees with its checkpoint, new columns) the whole file is rewritten
    atomically from the records.
    """

    def __init__(self, path):
        self.path = Path(path)

    @staticmethod
    def _text(records: list[dict], columns: list[str]) -> str:
        import csv
        import io

        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([["" if r.get(c) is None else repr(r[c]) if isinstance(r[c], float) else r[c]
                           for c in columns] for r in records])
        return buf.getvalue()

    def write(self, records: list[dict]) -> None:
        columns = list(dict.fromkeys(k for r in records for k in r))
        done = self._text(records[:-1], columns)
        try:
            current = self.path.read_text()
        except FileNotFoundError:
            current = None
        if current == done:
            with open(self.path, "a") as f:
                f.write(self._text(records[-1:], columns).split("\n", 1)[1])
                f.flush()
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(self._text(records, columns))
        tmp.replace(self.path)


def _zero_totals() -> dict:
    return {"loss": 0.0, "nll": 0.0, "kl": 0.0, "correct": 0.0, "seen": 0}


def _accumulate(totals: dict, key: str, value: torch.Tensor, keep) -> None:
    """``totals[key] += value`` on the device, where ``keep`` (a device flag, or ``True``) holds."""
    if keep is not True:
        value = torch.where(keep, value, torch.zeros_like(value))
    totals[key] = totals[key] + value


def _on_host(totals: dict) -> dict:
    """The running sums as floats: one host read for all device values."""
    keys = [k for k, v in totals.items() if torch.is_tensor(v)]
    values = torch.stack([totals[k].double() for k in keys]).tolist() if keys else []
    return {**totals, **dict(zip(keys, values))}


def _sum_over_ranks(totals: dict, ctx, device) -> dict:
    """The running sums of all ranks (each rank's loss sums already carry its share b / N)."""
    if not ctx.enabled:
        return dict(totals)
    keys = sorted(totals)
    return dict(zip(keys, dist_utils.all_reduce_sum([float(totals[k]) for k in keys], device)))


def _check_resumable(path, saved: dict, config: dict) -> None:
    """The interrupted run's data and batch layout must be this run's, or the position means nothing."""
    keys = ("num_data", "batch_size", "steps_per_epoch", "optimizer")
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs now {config[k]!r}" for k in keys if saved.get(k) != config[k]]
    theirs, ours = saved.get("data_fingerprint"), config.get("data_fingerprint")
    if theirs and ours and theirs != ours:
        diff.append("training data: the checkpoint was trained on other data of the same size (contents differ)")
    if diff:
        raise CheckpointError(f"{path} cannot resume this run: " + "; ".join(diff))
