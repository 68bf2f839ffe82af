r"""How :func:`~rank1_pyro.inference.train.train` trains: one frozen, validated :class:`TrainConfig`.

The schedules, with S steps per epoch and the global step :math:`t = 0, 1, \dots` (the epoch
of step t is :math:`t / S`):

* **learning rate** -- ``lr`` × :meth:`TrainConfig.lr_factor`: a linear warm-up over
  ``warmup_epochs`` (W), then a step decay by ``decay_rate`` (γ) at each epoch of
  ``decay_epochs`` (:math:`e_1, e_2, \dots`):

  .. math:: f(t) = \min\Big(1, \frac{t + 1}{W S}\Big) \cdot \gamma^{\#\{i \,:\, t / S \,\ge\, e_i\}}

  (the first factor is 1 when W = 0);
* **KL annealing** -- step t's KL term is multiplied by the objective's own ``kl_weight`` and by
  β (:meth:`TrainConfig.kl_factor`), linear over ``kl_annealing_epochs`` (A):

  .. math:: \beta(t) = \min\Big(1, \frac{t + 1}{A S}\Big)

  (1 when A = 0), so the last step of epoch e (:math:`t + 1 = (e + 1) S`) has
  :math:`\beta = \min(1, (e + 1) / A)`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from .._checks import number, one_of, positive_int
from .distributed import check_mode
from .objectives import check_objective, kl_annealing, objective_record
from .progress import check_progress

__all__ = ["TrainConfig", "PRECISIONS", "lr_factor", "unknown_names"]

#: ``precision``: float32, or bfloat16 autocast of the forward pass
PRECISIONS = ("fp32", "bf16")


def lr_factor(step: int, steps_per_epoch: int, warmup_epochs: float, decay_epochs, decay_rate: float) -> float:
    """Linear warm-up over ``warmup_epochs``, then ×``decay_rate`` at each epoch in ``decay_epochs``
    (the module docstring's :math:`f(t)`)."""
    epoch = step / steps_per_epoch
    warm = min(1.0, (step + 1) / (warmup_epochs * steps_per_epoch)) if warmup_epochs > 0 else 1.0
    return warm * decay_rate ** sum(epoch >= e for e in decay_epochs)


def unknown_names(owner: str, what: str, unknown, valid) -> TypeError:
    """The error for unknown keywords: each one named (with the closest valid one), every valid one listed."""
    named = []
    for name in unknown:
        close = difflib.get_close_matches(name, valid, n=1)
        named.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return TypeError(f"{owner}: unknown {what} {', '.join(named)}; valid: {list(valid)}")


@dataclass(frozen=True)
class TrainConfig:
    """Everything about how to train, checked when made (the same messages as ``train``'s).

    ``train(model, guide, data, config)`` trains with it; ``train(model, guide, data, epochs=3, ...)``
    is ``train(model, guide, data, TrainConfig(epochs=3, ...))``; :meth:`replace` gives a changed
    copy. The schedule maths is in the module docstring.

    Attributes:
        objective: ``"averaged"`` (``None``: a fresh :class:`~.objectives.AveragedELBO`, tiled
            batch), ``"mixture"``, or any Pyro ELBO instance. KL annealing sets a rank-1 objective's
            ``annealing`` factor, which multiplies its own ``kl_weight`` (so
            ``AveragedELBO(kl_weight=4.0)`` trains with 4 × β); other ELBOs refuse annealing.
        epochs: epochs to train to (an integer >= 0; a resumed run trains the rest).
        batch_size: the global batch (a given DataLoader's batch size takes precedence); under
            torchrun it is split evenly over the processes.
        optimizer: ``"adam"`` or ``"sgd"``.
        lr: the base learning rate (> 0), scaled every step by :meth:`lr_factor`.
        factor_lr: the guide's parameters (the rank-1 factors' variational parameters; the
            factors themselves under a ``DeltaGuide``) train with ``lr × factor_lr`` (> 0; the
            reference code's fast-weight learning-rate multiplier), the model's with ``lr``.
        momentum, nesterov: SGD's momentum (>= 0) and Nesterov's variant (on when momentum > 0).
        weight_decay: L2 weight decay (>= 0) on the model's parameters, never on the guide's.
        warmup_epochs, decay_epochs, decay_rate: the learning-rate schedule (:meth:`lr_factor`);
            ``decay_epochs`` is any iterable of epochs (kept as a tuple), ``decay_rate`` > 0.
        kl_annealing_epochs: epochs of linear KL annealing (:meth:`kl_factor`; 0: none). Only a
            rank-1 objective (which has a KL weight) can be annealed.
        grad_clip: the gradient-norm clip (> 0), or ``None``.
        device: ``"auto"`` (CUDA when available, else the CPU) or anything ``torch.device``
            takes; whether it is available is checked when training starts.
        eval_samples: Monte Carlo samples (an integer >= 1) of the per-epoch validation.
        progress: ``None`` (default) shows a tqdm bar per step on a terminal, with the epoch's
            running loss, accuracy and KL refreshed every few steps
            (:func:`~.progress.refresh_every`; the running sums stay on the device and are read
            only then), and prints one line per epoch to stderr otherwise (log files, ``nohup``,
            CI); ``True`` or ``"bar"`` forces the bar, ``"lines"`` the lines, ``False`` shows nothing.
        seed: the seed (an integer >= 0) of the factors' draws and the data order, or ``None``.
        checkpoint_dir: a ``str`` or ``pathlib.Path``, or ``None``: the whole training state is
            written atomically to ``checkpoint_dir/checkpoint.pt`` at the end of every epoch (by
            rank 0), only while every parameter is finite. Whether it is a directory (or can be
            made one) is checked when training starts.
        checkpoint_every: also write the checkpoint after every n-th step (needs ``checkpoint_dir``).
        resume: continue from ``checkpoint_dir``'s checkpoint when it exists (start afresh when it
            does not): the same batches in the same order from the interrupted position, the same
            random draws. The global batch size and the data set must be the interrupted run's.
        distributed: ``"auto"`` trains data-parallel when started by ``torchrun`` with more than
            one process, ``True`` insists, ``False`` never does (:mod:`.distributed`).
        precision: ``"fp32"``, or ``"bf16"``: the forward pass under ``torch.autocast`` with
            bfloat16, matmuls and convolutions in bf16, while parameters, the factors' sample
            sites, the KL, the loss and the optimizer state stay float32 (bf16 has float32's range,
            so no loss scaling is needed).
        log_csv: a CSV file (``str`` or ``pathlib.Path``), or ``None``: the per-epoch records, one
            row appended as each epoch ends (so ``tail -f`` follows a run; a resumed run rewrites
            the file from its checkpoint's history when the file disagrees with it); main process only.
    """

    objective: object = None
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "adam"
    lr: float = 1e-3
    factor_lr: float = 1.0
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0
    warmup_epochs: float = 0.0
    decay_epochs: tuple = ()
    decay_rate: float = 0.1
    kl_annealing_epochs: float = 0.0
    grad_clip: float | None = None
    device: object = "auto"
    eval_samples: int = 4
    progress: bool | str | None = None
    seed: int | None = None
    checkpoint_dir: str | Path | None = None
    checkpoint_every: int | None = None
    resume: bool = False
    distributed: bool | str = "auto"
    precision: str = "fp32"
    log_csv: str | Path | None = None

    def __post_init__(self):
        epochs = self.epochs
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            raise ValueError(f"epochs must be an integer >= 0, got {epochs!r}")
        positive_int("batch_size", self.batch_size)
        one_of("optimizer", self.optimizer, ["adam", "sgd"])
        lr = self.lr
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not lr > 0 or not math.isfinite(lr):
            raise ValueError(f"lr must be > 0, got {lr!r}")
        number("factor_lr", self.factor_lr, strict=True)
        number("momentum", self.momentum)
        number("weight_decay", self.weight_decay)
        number("warmup_epochs", self.warmup_epochs)
        number("decay_rate", self.decay_rate, strict=True)
        number("kl_annealing_epochs", self.kl_annealing_epochs)
        if isinstance(self.decay_epochs, (str, bytes)) or not isinstance(self.decay_epochs, Iterable):
            raise ValueError(f"decay_epochs must be a sequence of epochs, got {self.decay_epochs!r}")
        object.__setattr__(self, "decay_epochs", tuple(self.decay_epochs))
        for e in self.decay_epochs:
            number("decay_epochs entries", e)
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip!r}")
        number("eval_samples", self.eval_samples, minimum=1, integer=True)
        seed = self.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed must be an integer >= 0 or None, got {seed!r}")
        if self.checkpoint_dir is not None and not isinstance(self.checkpoint_dir, (str, Path)):
            raise TypeError(
                f"checkpoint_dir must be a path (str or pathlib.Path), got {type(self.checkpoint_dir).__name__}"
            )
        if self.checkpoint_every is not None:
            number("checkpoint_every", self.checkpoint_every, minimum=1, integer=True)
            if self.checkpoint_dir is None:
                raise ValueError("checkpoint_every needs checkpoint_dir (where to write the checkpoints)")
        if not isinstance(self.resume, bool):
            raise ValueError(f"resume must be True or False, got {self.resume!r}")
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir (where to find the checkpoint)")
        check_mode(self.distributed)
        one_of("precision", self.precision, PRECISIONS)
        check_progress(self.progress)
        if self.log_csv is not None and not isinstance(self.log_csv, (str, Path)):
            raise TypeError(f"log_csv must be a path (str or pathlib.Path), got {type(self.log_csv).__name__}")
        check_objective(self.objective, self.kl_annealing_epochs)
        if self.device is not None and self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as e:
                raise ValueError(f"device: {e}") from None

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        """The field names, in order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **changes) -> TrainConfig:
        """A copy with ``changes`` (field names), validated; an unknown name is a TypeError listing the valid ones."""
        unknown = [k for k in changes if k not in self.fields()]
        if unknown:
            raise unknown_names("TrainConfig", "field", unknown, self.fields())
        return dataclasses.replace(self, **changes)

    def lr_factor(self, step: int, steps_per_epoch: int) -> float:
        """The learning rate of (0-based) step ``step`` is ``lr × lr_factor(step, steps_per_epoch)``:
        linear warm-up, then step decay (the module docstring's :math:`f(t)`)."""
        return lr_factor(step, steps_per_epoch, self.warmup_epochs, self.decay_epochs, self.decay_rate)

    def kl_factor(self, step: int, steps_per_epoch: int) -> float:
        """β of (0-based) step ``step``: ``min(1, (step + 1) / (kl_annealing_epochs × steps_per_epoch))``,
        1 without annealing; it multiplies the objective's ``kl_weight``."""
        return kl_annealing(step + 1, self.kl_annealing_epochs * steps_per_epoch)

    def record(
        self, objective, batch_size: int, num_data: int, steps_per_epoch: int, world_size: int, data_fingerprint
    ) -> dict:
        """The plain values a checkpoint records: the training ``objective``'s name, ``kl_weight`` and
        ``estimator``, these settings, and the run's layout (the global ``batch_size`` actually used,
        ``num_data``, ``steps_per_epoch``, ``world_size``, the data's fingerprint), which resuming
        compares (:func:`~rank1_pyro.inference.checkpoint.check_resumable`)."""
        about = objective_record(objective)
        return dict(
            objective=about["objective"],
            kl_weight=about["kl_weight"],
            precision=self.precision,
            estimator=about["estimator"],
            epochs=self.epochs,
            batch_size=batch_size,
            optimizer=self.optimizer,
            lr=float(self.lr),
            factor_lr=float(self.factor_lr),
            momentum=float(self.momentum),
            nesterov=bool(self.nesterov),
            weight_decay=float(self.weight_decay),
            warmup_epochs=float(self.warmup_epochs),
            decay_epochs=[float(e) for e in self.decay_epochs],
            decay_rate=float(self.decay_rate),
            kl_annealing_epochs=float(self.kl_annealing_epochs),
            grad_clip=None if self.grad_clip is None else float(self.grad_clip),
            seed=self.seed,
            num_data=num_data,
            steps_per_epoch=steps_per_epoch,
            world_size=world_size,
            checkpoint_every=self.checkpoint_every,
            data_fingerprint=data_fingerprint,
        )
