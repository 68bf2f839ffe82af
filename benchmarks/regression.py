"""Regression on real data: rank-1 BNNs against the deterministic net and a deep ensemble on diabetes.

    python benchmarks/regression.py             # 5 random splits (about 15 minutes on 2 CPU cores)
    python benchmarks/regression.py --smoke     # 2 splits, 5 epochs: seconds (the test's mode)

scikit-learn's bundled diabetes data (442 patients, 10 features, a disease-progression score one
year later; no download) in the UCI protocol of Hernández-Lobato & Adams (2015): each split holds
out a random 10 % as the test set; the features and the target are standardised with the
training statistics; an MLP with one hidden layer of 50 ReLU units; a Normal likelihood whose
noise stddev every method learns as a point estimate (:class:`rank1_pyro.models.Rank1Model`).
Every method is fitted and evaluated by the library (:func:`rank1_pyro.methods.fit_method`,
:func:`rank1_pyro.experiments.run_job`):

========================  =====================================================================
``deterministic``         the network, maximum a posteriori (L2 weight decay)
``deep-ensemble``         K = 4 independently trained networks; the predictive is their mixture
``rank1-gaussian-avg``    rank-1 MLP, K = 4, prior N(1, 0.1²), mixture guide, averaged ELBO
``rank1-gaussian-mix``    the same trained with the mixture ELBO
``rank1-cauchy-avg``      prior Cauchy(1, 0.1), averaged ELBO
``subnet-laplace``        linearized Laplace over the 300 weights of the deterministic net of largest
                          SWAG variance (full covariance), closed-form Gaussian predictive
``projected``             the null-space projected posterior of the deterministic net
========================  =====================================================================

Metrics on the test set, in the target's own units: RMSE (σ_y × the standardised one) and the
NLL of the predictive density (the standardised one + log σ_y: the density of an affine map),
the exact log density of the mixture predictive
(:meth:`rank1_pyro.inference.predictive.Prediction.log_density`), and the coverage of the
central 95 % interval of the moment-matched Gaussian. Mean ± standard deviation over splits.
A second table pairs every method with the deterministic net on the same split (the differences'
mean ± std, and on how many splits it is lower). Writes ``results.json`` and ``results.md`` into
``--out`` (``--report --out DIR`` rewrites the Markdown from DIR's JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from rank1_pyro.atomic import atomic_write
from rank1_pyro.experiments import EvalSets, markdown_table, run_job, summarize
from rank1_pyro.inference.train_config import TrainConfig
from rank1_pyro.methods import Architecture, MethodSettings

RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: trained method -> the post-hoc methods fitted around it
JOBS = {
    "deterministic": ("subnet-laplace", "projected"),
    "deep-ensemble": (),
    "rank1-gaussian-avg": (),
    "rank1-gaussian-mix": (),
    "rank1-cauchy-avg": (),
}
METHODS = [m for trained, posthoc in JOBS.items() for m in (trained, *posthoc)]
COLUMNS = [
    ("rmse", "RMSE", 1.0, 1),
    ("nll", "NLL", 1.0, 3),
    ("coverage95", "95% coverage", 100.0, 1),
    ("parameters", "params", None, 0),
    ("train_seconds", "train s", 1.0, 1),
]


@dataclass(frozen=True)
class RegressionConfig:
    splits: int = 5
    test_fraction: float = 0.1
    hidden: int = 50
    epochs: int = 200
    batch_size: int = 32
    lr: float = 1e-3
    decay_epochs: tuple = (150,)
    weight_decay: float = 1e-4
    kl_annealing_epochs: float = 50
    ensemble_size: int = 4
    rank1_samples: int = 8
    laplace_subnetwork: int = 300

    def settings(self) -> MethodSettings:
        train = TrainConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            decay_epochs=self.decay_epochs,
            weight_decay=self.weight_decay,
            kl_annealing_epochs=self.kl_annealing_epochs,
            device="cpu",
            progress=False,
        )
        return MethodSettings(
            train,
            ensemble_size=self.ensemble_size,
            rank1_samples=self.rank1_samples,
            laplace_subnetwork=self.laplace_subnetwork,
            projected_fit_examples=10_000,  # all of the training set
        )


SMOKE = RegressionConfig(splits=2, epochs=5, decay_epochs=(), kl_annealing_epochs=2, laplace_subnetwork=50)


def diabetes_split(split: int, test_fraction: float) -> tuple[EvalSets, float]:
    """Split ``split`` of diabetes, standardised with the training statistics, and σ_y of the training targets."""
    from sklearn.datasets import load_diabetes
    from sklearn.model_selection import train_test_split

    x, y = load_diabetes(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=split)
    x_mean, x_std = x_tr.mean(0), x_tr.std(0)
    y_mean, y_std = y_tr.mean(), y_tr.std()

    def tensor(a):
        return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32)

    x_tr, x_te = tensor((x_tr - x_mean) / x_std), tensor((x_te - x_mean) / x_std)
    y_tr, y_te = tensor((y_tr - y_mean) / y_std), tensor((y_te - y_mean) / y_std)
    return EvalSets.from_parts(x_tr, y_tr, [("clean", x_te, y_te)], "diabetes"), float(y_std)


def in_target_units(row: dict, y_std: float) -> dict:
    """A standardised-target row in the target's units: RMSE × σ_y, NLL + log σ_y (coverage unchanged)."""
    return {**row, "rmse": row["clean_rmse"] * y_std, "nll": row["clean_nll"] + math.log(y_std)}


def run_regression(cfg: RegressionConfig, log=print) -> dict:
    """Every method on every split; returns ``{"per_split": {method: [row, ...]}, "summary": ...}``."""
    arch = Architecture.from_zoo("mlp", 1, (10,), likelihood="normal", hidden=(cfg.hidden,))
    settings = cfg.settings()
    per_split = {m: [] for m in METHODS}
    for split in range(cfg.splits):
        data, y_std = diabetes_split(split, cfg.test_fraction)
        for trained, posthoc in JOBS.items():
            rows = run_job(arch, settings, data, split, trained, posthoc)
            for method, row in rows.items():
                row.pop("curve", None)
                row.pop("sets", None)
                row = in_target_units(row, y_std)
                row["coverage95"] = row.pop("clean_coverage95")
                per_split[method].append(row)
        log(f"split {split + 1}/{cfg.splits}: " + ", ".join(f"{m} {per_split[m][-1]['rmse']:.1f}" for m in METHODS))
    keep = ("rmse", "nll", "coverage95", "parameters", "train_seconds")
    summary = {m: summarize({i: {k: r[k] for k in keep} for i, r in enumerate(rows)}) for m, rows in per_split.items()}
    return {"per_split": per_split, "summary": summary}


def paired(per_split: dict, reference: str = "deterministic") -> dict:
    """Per method, the split-by-split difference to ``reference`` in RMSE and NLL (mean ± std over
    splits: the splits' own difficulty cancels) and on how many splits it is lower."""
    rows = {}
    for method, split_rows in per_split.items():
        if method == reference:
            continue
        row = {}
        for key in ("rmse", "nll"):
            diff = np.array([r[key] - b[key] for r, b in zip(split_rows, per_split[reference])])
            row[f"d_{key}"] = {"mean": float(diff.mean()), "std": float(diff.std(ddof=1)) if len(diff) > 1 else 0.0}
            row[f"{key}_lower"] = f"{int((diff < 0).sum())}/{len(diff)}"
        rows[method] = row
    return rows


PAIRED_COLUMNS = [
    ("d_rmse", "Δ RMSE", 1.0, 2),
    ("rmse_lower", "RMSE lower on", None, 0),
    ("d_nll", "Δ NLL", 1.0, 3),
    ("nll_lower", "NLL lower on", None, 0),
]


def report(result: dict) -> str:
    """The Markdown report of a finished run (``results.json``'s content)."""
    cfg, splits = result["config"], result["config"]["splits"]
    return (
        f"# Regression on diabetes ({splits} random 90/10 splits, MLP 10-{cfg['hidden']}-1, "
        f"{cfg['epochs']} epochs; RMSE and NLL in the target's units)\n\n"
        + markdown_table(result["summary"], COLUMNS)
        + f"\n\nPaired with the deterministic net on the same split (method minus deterministic, mean ± std over "
        f"the {splits} splits; lower is better):\n\n"
        + markdown_table(paired(result["per_split"]), PAIRED_COLUMNS)
        + f"\n\n`{result['command']}`: {result['seconds'] / 60:.1f} min, {result.get('threads', 1)} thread(s)\n"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="2 splits, 5 epochs (seconds)")
    parser.add_argument("--splits", type=int, default=None, help="number of random splits (default: 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--out", type=Path, default=None, help="results directory (default: benchmarks/results/...)")
    parser.add_argument(
        "--report", action="store_true", help="rewrite results.md from --out's results.json, run nothing"
    )
    args = parser.parse_args(argv)
    if args.report:
        if args.out is None:
            parser.error("--report needs --out, the directory of the run to report")
        result = json.loads((args.out / "results.json").read_text())
    else:
        cfg = SMOKE if args.smoke else RegressionConfig()
        if args.splits is not None:
            if args.splits < 1:
                parser.error("--splits must be >= 1")
            cfg = replace(cfg, splits=args.splits)
        torch.set_num_threads(args.threads)
        args.out = args.out or RESULTS_DIR / time.strftime("regression-%Y%m%d-%H%M%S")
        command = "python benchmarks/regression.py " + " ".join(sys.argv[1:] if argv is None else argv)
        start = time.perf_counter()
        result = {"config": asdict(cfg), "command": command.strip(), "threads": args.threads, **run_regression(cfg)}
        result["seconds"] = time.perf_counter() - start
        result["machine"] = platform.machine()
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out / "results.json", json.dumps(result, indent=1).encode())
    text = report(result)
    atomic_write(args.out / "results.md", text.encode())
    print(text)
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
