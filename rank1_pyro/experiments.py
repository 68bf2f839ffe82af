r"""Experiments: methods compared on one set of evaluation data, resumably, with their tables.

The pipeline behind ``rank1-pyro demo`` and ``benchmarks/quality.py``:

1. :func:`shift_sets` standardises the training data and builds every evaluation set from raw
   images in [0, 1]: the clean test set, rotated copies (:func:`~rank1_pyro.data.rotate`),
   corrupted copies (:func:`~rank1_pyro.data.corrupt`) and an out-of-distribution set;
2. :func:`run_job` fits one trained method and the post-hoc methods around it
   (:func:`~rank1_pyro.methods.fit_method`) and :func:`evaluate` measures each on every set;
3. :func:`run_jobs` runs a plan of (seed, method) jobs, writing each finished job's rows to
   ``jobs_dir`` so an interrupted run resumes where it stopped;
4. :func:`summarize` reduces the seeds to mean ± standard deviation and :func:`markdown_table`
   prints them.

The metrics are :func:`~rank1_pyro.metrics.classification_metrics` (accuracy, NLL, ECE, Brier), or
for a regression posterior :func:`~rank1_pyro.metrics.regression_metrics` (RMSE, the exact NLL of
the mixture predictive, 95 % interval coverage), on every labelled set; ``rotation_<metric>`` is the mean over the sets named ``rot*``,
``corruption_<metric>`` the mean over the other labelled sets but ``clean``, and ``ood_auroc``
the AUROC of the predictive entropy between the clean and the ``ood`` set.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import metrics
from ._checks import positive_int
from .atomic import atomic_write
from .data import Split, channel_stats, corrupt, rotate, standardize
from .inference import predict
from .methods import POSTHOC_BASE, TRAINED, Architecture, MethodSettings, check_methods, fit_method

__all__ = [
    "EvalSets",
    "shift_sets",
    "evaluate",
    "run_job",
    "convergence",
    "plan_jobs",
    "run_jobs",
    "summarize",
    "markdown_table",
    "job_file",
]


@dataclass
class EvalSets:
    """Standardised training data and every evaluation set, concatenated into one tensor.

    ``sets[name] = (slice into x_eval, labels or None)``; labelled sets are measured, an
    unlabelled one named ``ood`` is the out-of-distribution set.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_eval: torch.Tensor
    sets: dict[str, tuple[slice, torch.Tensor | None]] = field(default_factory=dict)
    name: str = ""
    val: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_parts(cls, x_train, y_train, parts, name: str = "", val=None) -> EvalSets:
        """From ``parts = [(set name, x, y or None), ...]`` already standardised (``val``: a held-out
        validation pair, evaluated after every training epoch)."""
        sets, start = {}, 0
        for set_name, x, y in parts:
            sets[set_name] = (slice(start, start + x.shape[0]), y)
            start += x.shape[0]
        return cls(x_train, y_train, torch.cat([x for _, x, _ in parts]), sets, name, val)


def hold_out(x: torch.Tensor, y: torch.Tensor, val_examples: int):
    """``((x_train, y_train), (x_val, y_val))``: the last ``val_examples`` of the training
    examples ``(x, y)`` held out for validation (empty when 0; at least one must stay to train)."""
    if not 0 <= val_examples < x.shape[0]:
        raise ValueError(
            f"val_examples must lie in [0, {x.shape[0]}), got {val_examples}: "
            f"the validation examples are held out of the {x.shape[0]} training examples"
        )
    cut = x.shape[0] - val_examples
    (x_train, x_val), (y_train, y_val) = x.split([cut, val_examples]), y.split([cut, val_examples])
    return (x_train, y_train), (x_val, y_val)


def shift_sets(
    split: Split,
    ood: torch.Tensor | None = None,
    *,
    train_examples: int | None = None,
    val_examples: int = 0,
    test_examples: int | None = None,
    shift_examples: int | None = None,
    ood_examples: int | None = None,
    rotations: Sequence[float] = (),
    corruptions: Sequence[str] = (),
    severities: Sequence[int] = (),
) -> EvalSets:
    """Evaluation sets of a raw split (images in [0, 1]): ``clean`` (the first ``test_examples``
    test images), ``rot<angle>`` and ``<corruption>-<severity>`` (each of the first
    ``shift_examples``), ``ood`` (the first ``ood_examples`` of ``ood``).

    ``val_examples``: the last ones of the first ``train_examples`` training images are held out
    as the validation set (``EvalSets.val``), the rest train. Shifts act on the raw images; then
    everything is standardised per channel with the statistics of the training images.
    """
    (x_train, y_train), (x_val, y_val) = hold_out(
        split.x_train[:train_examples], split.y_train[:train_examples], val_examples
    )
    mean, std = channel_stats(x_train)
    x_shift, y_shift = split.x_test[:shift_examples], split.y_test[:shift_examples]
    parts = [("clean", split.x_test[:test_examples], split.y_test[:test_examples])]
    parts += [(f"rot{angle:g}", rotate(x_shift, angle), y_shift) for angle in rotations]
    parts += [
        (f"{kind}-{severity}", corrupt(x_shift, kind, severity, seed=severity), y_shift)
        for kind in corruptions
        for severity in severities
    ]
    if ood is not None:
        parts.append(("ood", ood[:ood_examples], None))
    parts = [(name, standardize(x, mean, std), y) for name, x, y in parts]
    val = (standardize(x_val, mean, std), y_val) if val_examples else None
    return EvalSets.from_parts(standardize(x_train, mean, std), y_train, parts, split.name, val)


def evaluate(posterior, data: EvalSets, num_samples: int, batch_size: int = 500, keep_probs=()) -> dict:
    """Every metric of ``posterior`` on every set of ``data`` (one :func:`predict` per set, in
    order), with the rotation/corruption means and the OOD AUROC (module docstring).

    ``keep_probs``: names of sets whose predictive probabilities are returned too, as
    ``row["probs"][name]`` (for figures)."""
    start = time.perf_counter()
    per_set, entropy, probs = {}, {}, {}
    for name, (where, y) in data.sets.items():
        prediction = predict(posterior, data.x_eval[where], num_samples=num_samples, batch_size=batch_size)
        if prediction.likelihood == "normal":
            if y is not None:
                per_set[name] = metrics.regression_metrics(
                    prediction.mean, prediction.variance, y, prediction.log_density(y)
                )
            continue
        entropy[name] = prediction.total_entropy
        if name in keep_probs:
            probs[name] = prediction.probs
        if y is not None:
            per_set[name] = metrics.classification_metrics(prediction.probs, y, prediction.log_probs)
    rotations = [name for name in per_set if name.startswith("rot")]
    corruptions = [name for name in per_set if name != "clean" and not name.startswith("rot")]
    row = {f"clean_{k}": v for k, v in per_set["clean"].items()}
    for tag, names in (("rotation", rotations), ("corruption", corruptions)):
        if names:
            for key in per_set["clean"]:
                row[f"{tag}_{key}"] = float(np.mean([per_set[n][key] for n in names]))
    if "ood" in entropy:
        row["ood_auroc"] = metrics.ood_auroc(entropy["clean"], entropy["ood"])
    row["eval_seconds"] = time.perf_counter() - start
    row["sets"] = per_set
    if keep_probs:
        row["probs"] = probs
    return row


def run_job(
    arch: Architecture,
    settings: MethodSettings,
    data: EvalSets,
    seed: int,
    method: str,
    posthoc: Sequence[str] = (),
    report_base: bool = True,
    eval_batch_size: int = 500,
    keep_probs=(),
) -> dict[str, dict]:
    """Fit ``method`` with ``seed`` and the post-hoc methods ``posthoc`` around it; evaluate them all.

    Returns ``{method name: row}``; a row holds :func:`evaluate`'s metrics, ``parameters``,
    ``train_seconds`` (post-hoc: the base's training plus the fit, also as ``fit_seconds``),
    ``train_examples``, for a trained method its ``curve`` (per epoch, with the validation
    metrics when ``data.val`` is set: :func:`~rank1_pyro.methods.training_curve`) and, for a
    post-hoc method, its fit's ``details`` (``keep_probs``: see :func:`evaluate`).
    """
    xy, rows = (data.x_train, data.y_train), {}
    base = fit_method(method, arch, xy, settings, seed, val_data=data.val)
    sizes = {"train_examples": data.x_train.shape[0]}
    if report_base:
        rows[method] = {
            **evaluate(base.posterior, data, base.num_samples, eval_batch_size, keep_probs),
            "parameters": base.parameters,
            "train_seconds": base.seconds,
            "curve": base.curve,
            **sizes,
        }
    for name in posthoc:
        fitted = fit_method(name, arch, xy, settings, seed, base=base)
        rows[name] = {
            **evaluate(fitted.posterior, data, fitted.num_samples, eval_batch_size, keep_probs),
            "parameters": fitted.parameters,
            "train_seconds": fitted.seconds,
            "fit_seconds": fitted.seconds - base.seconds,
            "details": fitted.details,
            **sizes,
        }
    return rows


def convergence(row: dict, last_epochs: int = 3) -> dict:
    """``row`` with the summary of its validation curve (``row["curve"]``, per epoch): ``best_val_epoch``
    (1-based epoch of the lowest validation NLL), ``best_val_nll``, ``last_val_nll`` (the last
    epoch's) and ``last_epochs_gain``, how much the last ``last_epochs`` epochs lowered the best
    validation NLL of the epochs before them, relative (0.01 is 1 %; 0 or less: the curve had
    stopped improving). A row whose curve has no more than ``last_epochs`` validation points is
    returned as it is."""
    positive_int("last_epochs", last_epochs)
    val = [e["val_nll"] for e in row.get("curve") or () if "val_nll" in e]
    if len(val) <= last_epochs:
        return row
    best, before = int(np.argmin(val)), min(val[:-last_epochs])
    return {
        **row,
        "best_val_epoch": best + 1,
        "best_val_nll": val[best],
        "last_val_nll": val[-1],
        "last_epochs_gain": (before - min(val[-last_epochs:])) / before,
    }


def plan_jobs(methods, seeds, cost: Callable[[str], float] = lambda m: 1.0) -> list[tuple[int, str, tuple, bool]]:
    """``(seed, trained method, post-hoc methods on it, report the trained one)`` jobs, costliest first.

    A post-hoc method runs in the job of its base (:data:`~rank1_pyro.methods.POSTHOC_BASE`),
    which is trained (and reported only if asked for) once per seed.
    """
    methods = check_methods(methods)
    trained = [m for m in methods if m not in POSTHOC_BASE]
    bases = list(dict.fromkeys([*trained, *(POSTHOC_BASE[m] for m in methods if m in POSTHOC_BASE)]))
    bases.sort(key=lambda m: TRAINED.index(m) if m in TRAINED else len(TRAINED))
    jobs = []
    for base in bases:
        posthoc = tuple(m for m in methods if POSTHOC_BASE.get(m) == base)
        total = cost(base) + sum(cost(m) for m in posthoc)
        jobs += [(total, int(seed), base, posthoc, base in methods) for seed in seeds]
    jobs.sort(key=lambda job: -job[0])  # stable: table order among equals
    return [job[1:] for job in jobs]


def job_file(jobs_dir: Path, key: dict, seed: int, method: str, posthoc, report_base: bool) -> Path:
    """Where one job's rows are kept; the name changes with anything (``key``: the settings) that
    changes the rows."""
    text = json.dumps([key, seed, method, list(posthoc), report_base], sort_keys=True, default=str)
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return Path(jobs_dir) / f"seed{seed}-{method}-{digest}.json"


def run_jobs(
    jobs,
    run: Callable[[int, str, tuple, bool], dict],
    key: dict,
    jobs_dir: Path | None = None,
    log: Callable[[str], None] = print,
    pool=None,
) -> dict[str, dict[str, dict]]:
    """Run ``jobs`` (from :func:`plan_jobs`) with ``run(seed, method, posthoc, report_base) -> rows``;
    returns ``runs[method name][str(seed)] = row``.

    With ``jobs_dir``, each finished job's rows are written there (atomically) as it ends, and a
    job whose file exists (same ``key``, seed and methods) is read instead of run again.
    ``pool``: a :class:`concurrent.futures.Executor` whose ``submit(run, *job)`` runs the jobs
    in parallel (default: one after the other, in this process).
    """
    from concurrent.futures import as_completed

    runs: dict[str, dict[str, dict]] = {}
    start = time.perf_counter()

    def keep(seed, rows):
        for name, row in rows.items():
            runs.setdefault(name, {})[str(seed)] = row

    if jobs_dir is not None:
        Path(jobs_dir).mkdir(parents=True, exist_ok=True)
        done = [job for job in jobs if job_file(jobs_dir, key, *job).exists()]
        for job in done:
            keep(job[0], json.loads(job_file(jobs_dir, key, *job).read_text()))
        if done:
            log(f"resuming: {len(done)} of {len(jobs)} jobs already done in {jobs_dir}")
        jobs = [job for job in jobs if job not in done]

    def record(i, job, rows):
        keep(job[0], rows)
        if jobs_dir is not None:
            atomic_write(job_file(jobs_dir, key, *job), json.dumps(rows))
        extra = sorted(rows.keys() - {job[1]})
        elapsed = time.perf_counter() - start
        when = f"{elapsed:.0f} s" if elapsed < 120 else f"{elapsed / 60:.1f} min"
        log(
            f"[{i:2d}/{len(jobs)}] seed {job[0]} {job[1]}{' + ' + ', '.join(extra) if extra else ''}: done after {when}"
        )

    if pool is None:
        for i, job in enumerate(jobs, 1):
            record(i, job, run(*job))
    else:
        futures = {pool.submit(run, *job): job for job in jobs}
        for i, future in enumerate(as_completed(futures), 1):
            record(i, futures[future], future.result())
    return runs


def summarize(rows: dict[str, dict]) -> dict:
    """Mean and standard deviation (ddof 1; 0 for one seed) over seeds of every number in ``rows``
    (``rows[seed] = row``), recursively; other values are taken from the first seed."""

    def reduce(values: list):
        if isinstance(values[0], dict):
            return {k: reduce([v[k] for v in values]) for k in values[0]}
        if isinstance(values[0], (int, float)) and not isinstance(values[0], bool):
            a = np.asarray(values, dtype=float)
            return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0}
        return values[0]

    return reduce(list(rows.values()))


def _cell(value, scale, digits: int) -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    if isinstance(value, dict):  # a summary: mean ± std
        if scale is None:
            return f"{value['mean']:,.0f}"
        return f"{value['mean'] * scale:.{digits}f} ± {value['std'] * scale:.{digits}f}"
    if scale is None:
        return f"{value:,}"
    return f"{value * scale:.{digits}f}"


def markdown_table(rows: dict[str, dict], columns) -> str:
    """A Markdown table, one row per method; ``columns = [(key, header, scale, digits), ...]``
    (``scale`` ``None``: an integer count with thousands separators). Cells of a
    :func:`summarize` d row print as ``mean ± std``, plain numbers as they are, text unchanged, a missing key as "–"."""
    head = "| method | " + " | ".join(c[1] for c in columns) + " |"
    rule = "|---|" + "|".join("---:" for _ in columns) + "|"
    body = [
        f"| {name} | " + " | ".join(_cell(row.get(key), scale, d) for key, _, scale, d in columns) + " |"
        for name, row in rows.items()
    ]
    return "\n".join([head, rule, *body])
