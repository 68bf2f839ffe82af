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
* a guard against non-finite losses or gradients: training stops *before* the bad update with
  :class:`NonFiniteLossError`, naming the epoch and step, so model and guide keep their last good
  parameters;
* per-epoch history (loss, NLL, KL, training accuracy, and validation accuracy / NLL / ECE from
  the Monte Carlo predictive), and a tqdm progress bar when the output is a terminal.

A deterministic network is the special case of a model without factors and ``guide=None``
(maximum a posteriori training with weight decay).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from .. import metrics
from .objectives import OBJECTIVES, MixtureELBO, Rank1ELBO, kl_annealing
from .predictive import Rank1Posterior, predict

__all__ = ["train", "History", "NonFiniteLossError", "resolve_device", "make_loader", "empty_guide"]


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
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but CUDA is not available")
    return device


def make_loader(data, batch_size: int, shuffle: bool, seed: int | None = None) -> DataLoader:
    """A DataLoader from ``(x, y)`` tensors, or ``data`` itself when it already is one."""
    if isinstance(data, DataLoader):
        return data
    if not (isinstance(data, (tuple, list)) and len(data) == 2 and all(torch.is_tensor(t) for t in data)):
        raise TypeError("data must be a DataLoader or a pair of tensors (x, y)")
    x, y = data
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y have different numbers of examples: {x.shape[0]} vs {y.shape[0]}")
    if x.shape[0] == 0:
        raise ValueError("the data set is empty")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=generator)


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
        if objective not in OBJECTIVES:
            raise ValueError(f"objective: unknown name {objective!r}; valid: {sorted(OBJECTIVES)}")
        return OBJECTIVES[objective]()
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
        return torch.optim.Adam(groups, lr=lr)
    if optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
    raise ValueError(f"optimizer: unknown name {optimizer!r}; valid: ['adam', 'sgd']")


def _lr_factor(step: int, steps_per_epoch: int, warmup_epochs: float, decay_epochs, decay_rate: float) -> float:
    """Linear warm-up over ``warmup_epochs``, then ×``decay_rate`` at each epoch in ``decay_epochs``."""
    epoch = step / steps_per_epoch
    warm = min(1.0, (step + 1) / (warmup_epochs * steps_per_epoch)) if warmup_epochs > 0 else 1.0
    return warm * decay_rate ** sum(epoch >= e for e in decay_epochs)


def _first_batch(loader: Iterable):
    for batch in loader:
        return batch
    raise ValueError("the training data set is empty")


def evaluate(model, guide, data, num_samples: int = 8, batch_size: int = 512, device=None) -> dict[str, float]:
    """Accuracy, NLL, ECE, Brier of the Monte Carlo predictive on ``(x, y)`` or a loader."""
    guide = empty_guide if guide is None else guide
    if isinstance(data, DataLoader):
        xs, ys = zip(*[(b[0], b[1]) for b in data])
        x, y = torch.cat(xs), torch.cat(ys)
    else:
        x, y = data
    prediction = predict(Rank1Posterior(model, guide), x, num_samples=num_samples, batch_size=batch_size, device=device)
    if prediction.likelihood == "categorical":
        return metrics.classification_metrics(prediction.probs, y.cpu())
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
) -> History:
    """Train ``model`` and ``guide`` on ``data`` (``(x, y)`` tensors or a DataLoader); see the module docs.

    ``model.num_data`` is set to the training-set size so minibatch likelihoods scale by N / B.
    Returns the :class:`History`. ``objective`` is ``"mixture"`` (default), ``"averaged"``, or any
    Pyro ELBO instance (its ``kl_weight`` is driven by the annealing schedule when it has one).
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be an integer >= 0, got {epochs!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if grad_clip is not None and not grad_clip > 0:
        raise ValueError(f"grad_clip must be > 0 or None, got {grad_clip!r}")
    if seed is not None:
        import pyro

        pyro.set_rng_seed(seed)
    device = resolve_device(device)
    guide = empty_guide if guide is None else guide
    elbo = _objective(objective)
    loader = make_loader(data, batch_size, shuffle=True, seed=seed)
    num_data = len(loader.dataset)
    if num_data == 0:
        raise ValueError("the training data set is empty")
    model.to(device)
    if isinstance(guide, nn.Module):
        guide.to(device)
    if hasattr(model, "num_data"):
        model.num_data = num_data
    # one call creates lazily-initialised guide parameters (Pyro autoguides) before the optimizer
    x0, y0 = (t.to(device) for t in _first_batch(loader)[:2])
    guide(x0, y0)
    params = [p for p in model.parameters() if p.requires_grad]
    if isinstance(guide, nn.Module):
        params += [p for p in guide.parameters() if p.requires_grad]
    opt = _optimizer(model, guide, optimizer, lr, momentum, nesterov, weight_decay)
    steps_per_epoch = max(len(loader), 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: _lr_factor(step, steps_per_epoch, warmup_epochs, tuple(decay_epochs), decay_rate)
    )
    show = sys.stderr.isatty() if progress is None else progress
    history = History()
    start = time.perf_counter()
    step = 0
    bar = tqdm(range(epochs), desc="train", disable=not show, leave=False)
    for epoch in bar:
        model.train()
        if isinstance(guide, nn.Module):
            guide.train()
        totals = {"loss": 0.0, "nll": 0.0, "kl": 0.0, "correct": 0.0, "seen": 0}
        for batch_idx, batch in enumerate(loader):
            x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
            if hasattr(elbo, "kl_weight"):
                elbo.kl_weight = kl_annealing(step + 1, kl_annealing_epochs * steps_per_epoch)
            opt.zero_grad(set_to_none=True)
            if isinstance(elbo, Rank1ELBO):
                terms = elbo.loss_terms(model, guide, x, y)
                loss = terms.loss
            else:
                terms, loss = None, elbo.differentiable_loss(model, guide, x, y)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"loss is {loss.item()} at epoch {epoch}, step {batch_idx} (global step {step}); "
                    "training stopped before the update, parameters hold their last good values"
                )
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip else math.inf)
            if not torch.isfinite(norm):
                opt.zero_grad(set_to_none=True)
                raise NonFiniteLossError(
                    f"gradient norm is {norm.item()} at epoch {epoch}, step {batch_idx} (global step {step}); "
                    "training stopped before the update, parameters hold their last good values"
                )
            opt.step()
            sched.step()
            step += 1
            b = y.shape[0]
            totals["seen"] += b
            totals["loss"] += loss.item() * b / num_data
            if terms is not None:
                totals["nll"] += -terms.log_likelihood.item() * b / num_data
                totals["kl"] += terms.kl.item() * b / num_data
                if terms.logits is not None:
                    probs = torch.softmax(terms.logits.detach(), -1).reshape(-1, *terms.logits.shape[-2:]).mean(0)
                    totals["correct"] += (probs.argmax(-1) == y).sum().item()
        record = {
            "epoch": epoch + 1,
            "loss": totals["loss"],
            "lr": sched.get_last_lr()[0],
            "kl_weight": getattr(elbo, "kl_weight", 1.0),
        }
        if isinstance(elbo, Rank1ELBO):
            record.update(nll=totals["nll"] / num_data, kl=totals["kl"])
            if model.likelihood == "categorical":
                record["accuracy"] = totals["correct"] / max(totals["seen"], 1)
        if val_data is not None:
            val = evaluate(model, guide, val_data, num_samples=eval_samples, device=device)
            record.update({f"val_{k}": v for k, v in val.items()})
        history.epochs.append(record)
        bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k in ("loss", "accuracy", "val_accuracy")})
    history.seconds = time.perf_counter() - start
    return history
