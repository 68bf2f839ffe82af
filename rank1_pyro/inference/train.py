r"""One training loop for every model, guide and objective.

:func:`train` minimises an objective's loss (the negative ELBO) with a torch optimizer over the
model's point estimates (W, biases, BatchNorm) and the guide's variational parameters, as a
:class:`TrainConfig` says. It implements the reference recipe of Dusenberry et al. (2020):

* SGD with Nesterov momentum, linear warm-up and step decay (``lr × decay_rate`` at each of
  ``decay_epochs``), or Adam for small models;
* L2 weight decay on the model's parameters only (W and BatchNorm), never on the guide's;
* KL annealing: β = min(1, step / (``kl_annealing_epochs`` × steps per epoch)) multiplies the KL
  (the schedules' maths: :mod:`.train_config`);
* an optional gradient-norm clip;
* ``device="auto"``: CUDA when available, else the CPU; model, guide and every batch move there;
* gradients of the per-example loss −ELBO / N (the same optimum as −ELBO; learning rates are
  those of ordinary per-example training losses, as in the reference);
* a guard against non-finite losses or gradients: training stops *before* the bad update with
  :class:`NonFiniteLossError`, naming the epoch and step, so model and guide keep their last good
  parameters;
* per-epoch history (loss, NLL, KL, training accuracy, and validation accuracy / NLL / ECE from
  the Monte Carlo predictive), and a tqdm progress bar when the output is a terminal
  (:mod:`.progress`);
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

One concept, one module (hence over 400 lines): the training loop.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import dataclass, field

import pyro
import pyro.poutine as poutine
import torch
from torch import nn
from torch.utils.data import DataLoader

from . import distributed as dist_utils
from .checkpoint import Checkpointer, data_fingerprint
from .distributed import resolve_device
from .objectives import training_objective
from .predictive import check_pair, empty_guide, evaluate, floating_dtype
from .progress import Progress, add_step, epoch_parts, on_host, zero_totals
from .train_config import TrainConfig, unknown_names

__all__ = ["train", "TrainConfig", "History", "NonFiniteLossError"]


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient became NaN/inf; parameters hold the last good values."""


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


def _model_dtype(*modules) -> torch.dtype:
    """The floating-point dtype of the first floating parameter among ``modules`` (the default dtype if none)."""
    return floating_dtype(*modules) or torch.get_default_dtype()


def _to_model(t: torch.Tensor, device, dtype: torch.dtype, non_blocking: bool = False) -> torch.Tensor:
    """``t`` on ``device``; floating-point inputs (e.g. numpy's float64) converted to the model's ``dtype``."""
    if t.is_floating_point() and t.dtype != dtype:
        return t.to(device, dtype=dtype, non_blocking=non_blocking)
    return t.to(device, non_blocking=non_blocking)


def _optimizer(model, guide, config: TrainConfig) -> torch.optim.Optimizer:
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": config.weight_decay}]
    if isinstance(guide, nn.Module):
        groups.append(
            {
                "params": [p for p in guide.parameters() if p.requires_grad],
                "weight_decay": 0.0,
                "lr": config.lr * config.factor_lr,
            }
        )
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("nothing to train: the model and guide have no trainable parameters")
    if config.optimizer == "adam":
        make = functools.partial(torch.optim.Adam, groups, lr=config.lr)
    else:
        nesterov = config.nesterov and config.momentum > 0
        make = functools.partial(torch.optim.SGD, groups, lr=config.lr, momentum=config.momentum, nesterov=nesterov)
    try:  # fused kernels skip a step on the device when told to (``found_inf``): see _Guard
        return make(fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without fused kernels
        return make()


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _cuda(device: torch.device) -> list[torch.device]:
    """The devices whose random state ``torch.random.fork_rng`` must fork besides the CPU's."""
    return [device] if device.type == "cuda" else []


def _check_model(model, data, x0: torch.Tensor) -> int | None:
    """Check all labels of tensor ``data`` against the network's outputs for the first example ``x0[:1]``
    (on the device, in the model's dtype), before training starts: one forward, in eval mode, on a
    fork of the random state (training draws and BatchNorm statistics are not affected). Returns
    the number of classes of a categorical rank-1 model (``None`` for other models): the loop checks
    every batch's labels against it."""
    if not hasattr(model, "outputs"):  # not a Rank1Model: Pyro's own checks on the first step
        return None
    training = model.training
    try:
        model.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=_cuda(x0.device)), poutine.block():
            out = model.outputs(x0[:1])
    finally:
        model.train(training)
    if not isinstance(data, DataLoader):
        y = data[1]
        model._check_labels(y, y.shape[0], out)
    return int(out.shape[-1]) if model.likelihood == "categorical" else None


def _label_flag(y: torch.Tensor, num_classes: int | None):
    """``(flag, y)``: a device tensor, true when a label lies outside ``0..num_classes-1``, and the labels
    clamped into range (so an out-of-range label never reaches an indexing kernel). No host sync:
    the flag is read only when the loss (made NaN by it) is not finite."""
    if num_classes is None or y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
        return None, y
    return ((y < 0) | (y >= num_classes)).any(), y.clamp(0, num_classes - 1)


def _raise_if_bad_labels(flag, num_classes: int | None, where: str) -> None:
    if flag is not None and bool(flag):
        raise ValueError(f"labels out of range {where}: expected 0..{num_classes - 1}; {_STOPPED}")


_STOPPED = "training stopped before the update, parameters hold their last good values"
#: with the device-side guard, the host reads the non-finite flag at least every this many steps
#: (and at every checkpoint and epoch end); a failure is reported then, parameters untouched since
GUARD_READ_EVERY = 100


class _Guard:
    """The step's backward pass, guarded: a non-finite loss or gradient norm (or an out-of-range label,
    which makes the loss NaN) stops training *before* the update, naming the epoch and step.

    Single process with fused optimizer kernels (``on_device``): no host read per step. Each step
    records on the device whether the loss or the gradient norm is not finite and hands the fused
    optimizer ``found_inf`` = "a step has failed so far", so the bad step and every step after it
    are skipped on the device; :meth:`check` reads the flag (one host read) and raises for the
    first bad step. Otherwise the loss and the norm are read every step; data-parallel ranks count
    a bad loss in the gradients' all-reduce, so all stop together.
    """

    def __init__(self, optimizer, params, grad_clip, num_data: int, num_classes, steps_per_epoch: int, ctx, device):
        self.optimizer, self.params, self.clip = optimizer, params, grad_clip if grad_clip else math.inf
        self.num_data, self.num_classes, self.steps_per_epoch, self.ctx = num_data, num_classes, steps_per_epoch, ctx
        self.on_device = not ctx.enabled and all(g.get("fused") for g in optimizer.param_groups)
        if self.on_device:
            self.failed = torch.zeros((), dtype=torch.bool, device=device)
            self.step = torch.full((), -1, dtype=torch.long, device=device)
            self.kind = torch.zeros((), dtype=torch.long, device=device)  # 0 loss, 1 gradient norm, 2 labels
            self.value = torch.zeros((), dtype=torch.float64, device=device)

    def backward(self, loss: torch.Tensor, bad_labels, step: int, epoch: int, batch: int):
        """Gradients of the per-example loss ``loss / N`` (averaged over the ranks), clipped. Returns the
        device flag "no step has failed" (to mask the running sums), or ``True`` when checked on the host."""
        if self.on_device:  # no host read: the flag is read every GUARD_READ_EVERY steps
            (loss / self.num_data).backward()
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
            return self._record(step, loss, norm, bad_labels)
        where = f"at epoch {epoch}, step {batch} (global step {step})"
        if not self.ctx.enabled:
            if not torch.isfinite(loss):
                _raise_if_bad_labels(bad_labels, self.num_classes, where)
                raise NonFiniteLossError(f"loss is {loss.item()} {where}; {_STOPPED}")
            (loss / self.num_data).backward()
        else:  # every rank takes part in the all-reduce, then all stop together
            finite = bool(torch.isfinite(loss))
            if finite:
                (loss / self.num_data).backward()
            world = self.ctx.world_size
            bad_ranks = dist_utils.average_gradients(self.params, world, flag=0.0 if finite else 1.0)
            if bad_ranks:
                self.optimizer.zero_grad(set_to_none=True)
                _raise_if_bad_labels(bad_labels, self.num_classes, f"{where} on rank {self.ctx.rank}")
                raise NonFiniteLossError(
                    f"loss is not finite on {int(bad_ranks)} of {world} processes {where} "
                    f"(this rank's: {loss.item()}); {_STOPPED}"
                )
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        if not torch.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"gradient norm is {norm.item()} {where}; {_STOPPED}")
        return True

    def _record(self, step: int, loss: torch.Tensor, norm: torch.Tensor, bad_labels) -> torch.Tensor:
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

    def check(self) -> None:
        """Raise for the first failed step the device flags recorded (one host read; nothing to do otherwise)."""
        if not self.on_device or not bool(self.failed):
            return
        step = int(self.step)
        epoch, batch = divmod(step, self.steps_per_epoch)
        where = f"at epoch {epoch}, step {batch} (global step {step})"
        kind = int(self.kind)
        if kind == 2:
            _raise_if_bad_labels(True, self.num_classes, where)
        raise NonFiniteLossError(
            f"{'loss' if kind == 0 else 'gradient norm'} is {float(self.value)} {where}; {_STOPPED}"
        )


def _config(config: TrainConfig | None, overrides: dict) -> TrainConfig:
    valid = TrainConfig.fields()
    unknown = [k for k in overrides if k not in valid]
    if unknown:
        raise unknown_names("train", "keyword argument", unknown, [*valid, "val_data", "on_epoch"])
    if config is None:
        return TrainConfig(**overrides)
    if not isinstance(config, TrainConfig):
        raise TypeError(f"train: config must be a TrainConfig, got {type(config).__name__}")
    return config.replace(**overrides)


def train(
    model: nn.Module, guide, data, config: TrainConfig | None = None, /, *, val_data=None, on_epoch=None, **overrides
) -> History:
    """Train ``model`` and ``guide`` on ``data`` (``(x, y)`` tensors or numpy arrays, or a DataLoader)
    as ``config`` says, changed by ``overrides`` (:class:`TrainConfig` field names): ``train(model,
    guide, data, epochs=3)`` is ``train(model, guide, data, TrainConfig(epochs=3))``. Returns the
    :class:`History`; see the module docs and :class:`TrainConfig`'s fields.

    ``val_data`` (like ``data``) is evaluated after every epoch with ``config.eval_samples`` Monte
    Carlo samples; ``on_epoch(history)`` is called after every epoch (once its checkpoint and CSV
    row are written; ``history.last`` is the new epoch's record), on the main process only.

    Inputs are converted at the boundary: floating-point inputs of another dtype (numpy's float64)
    are cast to the dtype of the model's parameters. Every batch's labels are checked on the
    device (no host sync per batch): an out-of-range label stops training before the update with
    a :class:`ValueError` naming the epoch and step. ``model.num_data`` is set to the training-set
    size so minibatch likelihoods scale by N / B. A checkpoint is only written while every
    parameter is finite, so after :class:`NonFiniteLossError` the file on disk is the last good state.
    """
    config = _config(config, overrides)
    if on_epoch is not None and not callable(on_epoch):
        raise TypeError(f"on_epoch must be a callable taking the History, got {type(on_epoch).__name__}")
    objective = training_objective(config.objective)
    device = resolve_device(config.device)
    Checkpointer.check_directory(config.checkpoint_dir)
    data = data if isinstance(data, DataLoader) else check_pair(data)
    if val_data is not None and not isinstance(val_data, DataLoader):
        check_pair(val_data, "val_data")
    guide = empty_guide if guide is None else guide

    # build: processes, data, model and guide on the device, optimizer, schedule, checkpoints
    ctx, device = dist_utils.setup(config.distributed, device)
    data_seed = dist_utils.seed_ranks(config.seed, ctx, device)
    loader, sampler = dist_utils.training_loader(data, config.batch_size, ctx, data_seed)
    num_data = len(loader.dataset)  # an empty set stops at first_batch below
    model.to(device)
    if isinstance(guide, nn.Module):
        guide.to(device)
    dtype = _model_dtype(model)
    x0, y0 = (_to_model(t, device, dtype) for t in dist_utils.first_batch(loader)[:2])
    num_classes = _check_model(model, data, x0)
    if hasattr(model, "num_data"):
        model.num_data = num_data
    guide(x0, y0)  # creates lazily-initialised guide parameters (Pyro autoguides) before the optimizer
    modules = [m for m in (model, guide) if isinstance(m, nn.Module)]
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    buffers = [b for m in modules for b in m.buffers()]
    if ctx.enabled:  # one model: rank 0's initial state everywhere
        dist_utils.broadcast_tensors([*(p for m in modules for p in m.parameters()), *buffers])
    opt = _optimizer(model, guide, config)
    steps_per_epoch = max(len(loader), 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: config.lr_factor(step, steps_per_epoch))
    # the training set's contents: resuming on other data of the same size is refused
    fingerprint = data_fingerprint(loader.dataset) if config.checkpoint_dir is not None else None
    batch_size = data.batch_size if isinstance(data, DataLoader) else config.batch_size
    record = config.record(objective, batch_size, num_data, steps_per_epoch, ctx.world_size, fingerprint)
    checkpointer = Checkpointer(config.checkpoint_dir, model, guide, opt, sched, record, ctx, device)
    history, totals = History(), zero_totals()
    step, start_epoch, start_batch, seconds_before = 0, 0, 0, 0.0
    resumed = checkpointer.start(config.resume, ordered=sampler is not None)
    if resumed is not None:
        step, start_epoch, start_batch, data_seed = resumed.step, resumed.epoch, resumed.batch, resumed.data_seed
        history.epochs, seconds_before = resumed.epochs, resumed.seconds
        totals = resumed.totals if resumed.totals is not None else totals
    # after a resume: a checkpoint's optimizer state may have switched its kernels (fused or not)
    guard = _Guard(opt, params, config.grad_clip, num_data, num_classes, steps_per_epoch, ctx, device)
    parts, precision, checkpoint_every = objective.has_parts, config.precision, config.checkpoint_every
    shown = Progress(config, steps_per_epoch, step, start_epoch, num_data, parts, num_classes is not None, ctx.is_main)
    bar, every = shown.bar, shown.every
    # Pyro's shape and support checks run on the first step (clear errors for a bad model or
    # guide); later steps skip them, the non-finite guard still catches invalid values
    validated_step = step
    start = time.perf_counter()

    def save(epoch: int, batch: int) -> None:
        """Write the state after ``batch`` batches of ``epoch`` (every rank calls it, rank 0 writes)."""
        guard.check()
        seconds = seconds_before + time.perf_counter() - start
        kwargs = dict(step=step, epoch=epoch, batch=batch, data_seed=data_seed, epochs=history.epochs)
        if not checkpointer.save(**kwargs, totals=totals, seconds=seconds):  # the same parameters on every rank
            raise NonFiniteLossError(
                f"parameters are not finite after global step {step}; checkpoint not written, "
                f"{checkpointer.path} keeps the last good state"
            )

    for epoch in range(start_epoch, config.epochs):
        shown.start_epoch(epoch)
        model.train()
        if isinstance(guide, nn.Module):
            guide.train()
        first = start_batch if epoch == start_epoch else 0
        if first == 0:
            totals = zero_totals()
        for batch_idx, batch in enumerate(dist_utils.set_position(loader, sampler, data_seed, epoch, first), first):
            x, y = _to_model(batch[0], device, dtype, True), _to_model(batch[1], device, dtype, True)
            bad_labels, y = _label_flag(y, num_classes)
            if ctx.enabled and buffers:
                dist_utils.broadcast_tensors(buffers)
            objective.annealing = config.kl_factor(step, steps_per_epoch)  # × the objective's own kl_weight
            opt.zero_grad(set_to_none=True)
            with (
                pyro.validation_enabled(pyro.infer.util.is_validation_enabled() and step == validated_step),
                _autocast(device, precision),
            ):
                terms = objective.loss_terms(model, guide, x, y)
            loss = terms.loss
            if bad_labels is not None:
                loss = torch.where(bad_labels, torch.full_like(loss, math.nan), loss)
            keep = guard.backward(loss, bad_labels, step, epoch, batch_idx)
            opt.step()
            sched.step()
            step += 1
            add_step(totals, terms, loss, y, num_data, keep)  # on the device, read once per epoch
            if step % GUARD_READ_EVERY == 0:
                guard.check()
            if checkpoint_every and step % checkpoint_every == 0 and batch_idx + 1 < steps_per_epoch:
                save(epoch, batch_idx + 1)
            if bar and (batch_idx + 1) % every == 0:  # the running sums: one host read per `every` steps
                shown.refresh(step, totals)

        # the epoch's end: its record, validation, checkpoint, display and log
        guard.check()
        if ctx.enabled and buffers:
            dist_utils.broadcast_tensors(buffers)
        totals = dist_utils.sum_over_ranks(on_host(totals), ctx, device)
        entry = {"epoch": epoch + 1, "loss": totals["loss"], "lr": sched.get_last_lr()[0]}
        entry["kl_weight"] = objective.effective_kl_weight
        entry.update(epoch_parts(totals, num_data, parts, getattr(model, "likelihood", None) == "categorical"))
        if val_data is not None:
            with torch.random.fork_rng(devices=_cuda(device)):
                val = evaluate(model, guide, val_data, num_samples=config.eval_samples, device=device)
            entry.update({f"val_{k}": v for k, v in val.items()})
        history.epochs.append(entry)
        totals = zero_totals()
        save(epoch + 1, 0)
        history.seconds = seconds_before + time.perf_counter() - start
        shown.end_epoch(step, history.epochs, history.seconds)
        if on_epoch is not None and ctx.is_main:
            on_epoch(history)
    shown.close()
    history.seconds = seconds_before + time.perf_counter() - start
    return history
