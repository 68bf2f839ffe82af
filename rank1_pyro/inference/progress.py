"""What a training run shows and logs: the progress bar or per-epoch lines, and the CSV history.

The epoch's running sums (loss, NLL, KL, correct predictions, examples seen) stay on the device,
a tensor per key (:func:`zero_totals`, :func:`accumulate`); they are read to the host in one
transfer (:func:`on_host`) only at a bar refresh (every :func:`refresh_every` steps), a
checkpoint, or the epoch's end. :class:`Progress` is what :func:`~rank1_pyro.inference.train.train`
drives: a tqdm bar per step on a terminal, one :func:`epoch_line` per epoch on stderr otherwise,
and a :class:`CsvLog` row per epoch; all on the main process only (rank 0 under torchrun).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

__all__ = [
    "PROGRESS_MODES",
    "check_progress",
    "progress_mode",
    "refresh_every",
    "epoch_line",
    "CsvLog",
    "Progress",
    "zero_totals",
    "accumulate",
    "add_step",
    "epoch_parts",
    "on_host",
]

#: the record keys the progress bar and the per-epoch lines show, in this order
SHOWN = ("loss", "nll", "kl", "accuracy", "val_accuracy", "val_nll", "val_rmse")
#: accepted values of ``progress``: ``None`` (auto), ``True``/``"bar"``, ``"lines"``, ``False``
PROGRESS_MODES = (None, True, False, "bar", "lines")


def check_progress(progress) -> None:
    if not any(progress is m or (isinstance(m, str) and progress == m) for m in PROGRESS_MODES):
        raise ValueError(f"progress must be None (auto), True, False, 'bar' or 'lines', got {progress!r}")


def progress_mode(progress) -> str | None:
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


def add_step(totals: dict, terms, loss: torch.Tensor, y: torch.Tensor, num_data: int, keep) -> None:
    """Add a step on a batch of b examples to the running sums, on the device: ``loss / N × b / N``
    (``loss`` is the step's −ELBO), and, when the objective's ``terms`` (:class:`~.objectives.ELBOTerms`)
    have them, ``−log-likelihood × b / N``, ``KL × b / N`` and the number of correct predictions of
    the members' averaged probabilities (with the batch split over the members, of each member on
    its own rows, rescaled to b); ``keep`` as in :func:`accumulate`."""
    b = y.shape[0]
    totals["seen"] += b
    accumulate(totals, "loss", loss.detach().double() / num_data * b / num_data, keep)
    if terms.kl is not None:
        accumulate(totals, "nll", -terms.log_likelihood.detach().double() * b / num_data, keep)
        accumulate(totals, "kl", terms.kl.detach().double() * b / num_data, keep)
    if terms.logits is not None:
        k, m = terms.logits.shape[-3:-1]
        if m == b:  # every member on every example: the members' averaged probabilities
            probs = torch.softmax(terms.logits.detach(), -1).reshape(-1, *terms.logits.shape[-2:]).mean(0)
            correct = (probs.argmax(-1) == y).sum()
        else:  # the batch split over the members (estimator="split"): each member's own rows
            probs = torch.softmax(terms.logits.detach(), -1).reshape(-1, k, m, terms.logits.shape[-1]).mean(0)
            correct = (probs.argmax(-1) == y[: k * m].reshape(k, m)).sum() * (b / (k * m))
        accumulate(totals, "correct", correct.double(), keep)


def epoch_parts(sums: dict, num_data: int, parts: bool, categorical: bool) -> dict:
    """An epoch's record of its NLL (per example), KL (in total) and training accuracy, from its sums
    (floats, over all ranks): nothing unless the objective reports its ``parts``."""
    if not parts:
        return {}
    out = {"nll": sums["nll"] / num_data, "kl": sums["kl"]}
    if categorical:
        out["accuracy"] = sums["correct"] / max(sums["seen"], 1)
    return out


def running(sums: dict, num_data: int, parts: bool, categorical: bool) -> dict:
    """The epoch's running means so far, formatted: loss and NLL per example, KL, training accuracy."""
    seen = max(sums["seen"], 1)
    out = {"loss": sums["loss"] * num_data / seen}  # each step adds (loss / N) * (b / N)
    if parts:
        out.update(nll=sums["nll"] / seen, kl=sums["kl"] * num_data / seen)
    if parts and categorical:
        out["accuracy"] = sums["correct"] / seen
    return {k: f"{v:.4g}" for k, v in out.items()}


def epoch_line(record: dict, epochs: int, seconds: float) -> str:
    """One epoch's line for logs: ``epoch 3/10  loss 1.234  nll ...  accuracy 0.91  (12.3 s)``."""
    parts = [f"epoch {record['epoch']}/{epochs}"]
    parts += [f"{k} {record[k]:.4g}" for k in SHOWN if k in record]
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
        writer.writerows(
            [
                ["" if r.get(c) is None else repr(r[c]) if isinstance(r[c], float) else r[c] for c in columns]
                for r in records
            ]
        )
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


class Progress:
    """A run's display and CSV log, as a :class:`~rank1_pyro.inference.train_config.TrainConfig`'s
    ``progress``, ``log_csv`` and ``epochs`` say (silent on every rank but the main one).

    The run is at global ``step`` of ``start_epoch``; ``parts`` (the objective reports NLL and KL)
    and ``categorical`` choose the running means shown. ``bar`` (whether the per-step bar is shown)
    and ``every`` (:func:`refresh_every`) are what the training step reads; :meth:`refresh` reads
    the running sums from the device.
    """

    def __init__(
        self,
        config,
        steps_per_epoch: int,
        step: int,
        start_epoch: int,
        num_data: int,
        parts: bool,
        categorical: bool,
        main: bool,
    ):
        mode = progress_mode(config.progress) if main else None
        self.bar, self.lines = mode == "bar", mode == "lines"
        self.every = refresh_every(steps_per_epoch)
        epochs = self.epochs = config.epochs
        self.num_data, self.parts, self.categorical = num_data, parts, categorical
        self.csv = None if config.log_csv is None or not main else CsvLog(config.log_csv)
        self._bar = tqdm(
            total=epochs * steps_per_epoch,
            initial=step,
            desc=f"epoch {start_epoch + 1}/{epochs}",
            disable=not self.bar,
            leave=True,
            unit="step",
            dynamic_ncols=True,
        )

    def start_epoch(self, epoch: int) -> None:
        self._bar.set_description(f"epoch {epoch + 1}/{self.epochs}", refresh=False)

    def refresh(self, step: int, totals: dict) -> None:
        """The bar at ``step`` with the epoch's running means (one host read)."""
        self._bar.set_postfix(running(on_host(totals), self.num_data, self.parts, self.categorical), refresh=False)
        self._bar.update(step - self._bar.n)

    def end_epoch(self, step: int, records: list[dict], seconds: float) -> None:
        """Show the new epoch's record (the last of ``records``) and append it to the CSV file."""
        record = records[-1]
        if self.bar:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k in SHOWN}, refresh=False)
            self._bar.update(step - self._bar.n)
        elif self.lines:
            print(epoch_line(record, self.epochs, seconds), file=sys.stderr, flush=True)
        if self.csv is not None:
            self.csv.write(records)

    def close(self) -> None:
        self._bar.close()


# ------------------------------------------------------------------------------------------
# The epoch's running sums, on the device
# ------------------------------------------------------------------------------------------
def zero_totals() -> dict:
    return {"loss": 0.0, "nll": 0.0, "kl": 0.0, "correct": 0.0, "seen": 0}


def accumulate(totals: dict, key: str, value: torch.Tensor, keep) -> None:
    """``totals[key] += value`` on the device, where ``keep`` (a device flag, or ``True``) holds."""
    if keep is not True:
        value = torch.where(keep, value, torch.zeros_like(value))
    totals[key] = totals[key] + value


def on_host(totals: dict) -> dict:
    """The running sums as floats: one host read for all device values."""
    keys = [k for k, v in totals.items() if torch.is_tensor(v)]
    values = torch.stack([totals[k].double() for k in keys]).tolist() if keys else []
    return {**totals, **dict(zip(keys, values))}
