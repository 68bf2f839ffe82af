"""``rank1-pyro demo``: the main job, rank-1 BNNs against a deterministic net and BatchEnsemble on
the embedded default data.

On scikit-learn's digits (bundled, no download) with rotated test images as the distribution
shift, :func:`run_demo` trains four MLPs of the same architecture (:mod:`rank1_pyro.methods`):

* ``deterministic``: the network, maximum a posteriori with weight decay;
* ``batchensemble``: the rank-1 model with point-estimate factors (:class:`DeltaGuide`), K = 4;
* ``rank1-gaussian``: the rank-1 BNN, prior N(1, 0.1²), the mixture posterior, K = 4;
* ``rank1-cauchy``: the same with the prior Cauchy(1, 0.1);

and reports accuracy, NLL and ECE on the clean test set and on the rotated one (every test
image at each angle, pooled; :mod:`rank1_pyro.experiments`), the parameter count and the
training time. It writes ``results.json``, ``results.md`` and ``reliability.png`` into a run
directory.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

__all__ = ["DemoConfig", "run_demo", "format_table", "register", "run"]

#: the demo's methods (:data:`rank1_pyro.methods.METHODS` names), in table order
DEMO_METHODS = ("deterministic", "batchensemble", "rank1-gaussian", "rank1-cauchy")


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo (defaults finish in well under 3 minutes on 2 CPU cores).

    The last ``val_examples`` training images are held out as a validation set, evaluated after
    every epoch: the table reports the epoch of the lowest validation NLL and how much the last
    ``last_epochs`` epochs still lowered it (:func:`~rank1_pyro.experiments.convergence`), so it
    shows whether the budget trained every method to convergence. ``objective``/``estimator``:
    the rank-1 models' training objective (:class:`~rank1_pyro.methods.MethodSettings`).
    """

    hidden: tuple[int, ...] = (128, 128)
    ensemble_size: int = 4
    epochs: int = 60
    batch_size: int = 64
    lr: float = 3e-3
    factor_lr: float = 1.0  # the guide's parameters train with lr x factor_lr
    decay_epochs: tuple[int, ...] = (40, 50)  # lr x 0.1 at each
    weight_decay: float = 1e-4
    kl_annealing_epochs: float = 20
    objective: str | None = None  # None: the library default
    estimator: str = "member"  # the averaged ELBO's estimator
    val_examples: int = 200
    last_epochs: int = 10
    rotations: tuple[float, ...] = (30.0, 45.0, 60.0)
    eval_samples: int = 16
    init_sign_prob: float | None = 0.5  # the reference's random-sign init of the factor means
    seed: int = 0


#: the demo table's columns: (row key, header, scale, digits)
COLUMNS = [
    ("clean_accuracy", "acc", 1.0, 3),
    ("clean_nll", "NLL", 1.0, 3),
    ("clean_ece", "ECE", 1.0, 3),
    ("rotation_accuracy", "acc (rot)", 1.0, 3),
    ("rotation_nll", "NLL (rot)", 1.0, 3),
    ("rotation_ece", "ECE (rot)", 1.0, 3),
    ("parameters", "params", None, 0),
    ("train_seconds", "train s", 1.0, 1),
    ("best_val_epoch", "best val epoch", None, 0),
    ("last_epochs_gain", "val gain, last epochs (%)", 100.0, 2),
]


def _sets(cfg: DemoConfig):
    import torch

    from ..data import load_digits, rotate
    from ..experiments import EvalSets, hold_out

    split = load_digits(seed=cfg.seed)
    flat = lambda x: x.reshape(x.shape[0], -1)  # noqa: E731 - the MLP takes 64-pixel vectors
    (x_train, y_train), val = hold_out(flat(split.x_train), split.y_train, cfg.val_examples)
    val = val if cfg.val_examples else None
    x_shift = torch.cat([flat(rotate(split.x_test, a)) for a in cfg.rotations])
    y_shift = split.y_test.repeat(len(cfg.rotations))
    parts = [("clean", flat(split.x_test), split.y_test), ("rot", x_shift, y_shift)]
    return EvalSets.from_parts(x_train, y_train, parts, split.name, val), split.num_classes


def run_demo(cfg: DemoConfig = DemoConfig(), out_dir: str | Path | None = None, device="auto", progress=None) -> dict:
    """Train and evaluate every method; returns the results and writes them under ``out_dir``."""
    from ..experiments import convergence, run_job
    from ..inference.train_config import TrainConfig
    from ..methods import Architecture, MethodSettings

    data, num_classes = _sets(cfg)
    arch = Architecture.from_zoo("mlp", num_classes, (data.x_train.shape[1],), hidden=cfg.hidden)
    schedule = TrainConfig(
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        factor_lr=cfg.factor_lr,
        decay_epochs=tuple(e for e in cfg.decay_epochs if e < cfg.epochs),
        weight_decay=cfg.weight_decay,
        kl_annealing_epochs=cfg.kl_annealing_epochs,
        objective=cfg.objective,
        device=device,
        progress=progress,
    )
    settings = MethodSettings(
        schedule,
        ensemble_size=cfg.ensemble_size,
        init_sign_prob=cfg.init_sign_prob,
        rank1_samples=cfg.eval_samples,
        averaged_estimator=cfg.estimator,
    )
    results, probs_shift = {}, {}
    for name in DEMO_METHODS:
        row = run_job(arch, settings, data, cfg.seed, name, eval_batch_size=256, keep_probs=("rot",))[name]
        probs_shift[name] = row.pop("probs")["rot"]
        row = convergence(row, min(cfg.last_epochs, cfg.epochs - 1)) if cfg.epochs > 1 else row
        row["train_seconds"] = round(row["train_seconds"], 2)
        results[name] = row
    report = {"config": asdict(cfg), "dataset": data.name, "results": results}
    if out_dir is not None:
        _write(report, probs_shift, data.sets["rot"][1], Path(out_dir))
    return report


def format_table(results: dict) -> str:
    """A Markdown table of the results, one row per method."""
    from ..experiments import markdown_table

    return markdown_table(results, COLUMNS)


def _write(report: dict, probs: dict, labels, out_dir: Path) -> None:
    import json

    from ..plots import reliability_diagram

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(report, indent=2))
    rotations = report["config"]["rotations"]
    (out_dir / "results.md").write_text(
        f"# rank1-pyro demo ({report['dataset']}, rotated test set: {rotations} degrees)\n\n"
        + format_table(report["results"])
        + "\n"
    )
    reliability_diagram(
        probs,
        labels,
        out_dir / "reliability.png",
        suptitle=f"Reliability on the rotated {report['dataset']} test set (rotated by "
        + ", ".join(f"{a:g}" for a in rotations)
        + f" degrees; {len(labels)} examples)",
    )


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="compare deterministic, BatchEnsemble and rank-1 BNNs on digits with a rotation shift",
        description="Train a deterministic MLP, BatchEnsemble and rank-1 BNNs (Gaussian and Cauchy priors, "
        "K=4) on scikit-learn's digits; print accuracy, NLL and ECE on the clean and rotated test sets.",
    )
    p.add_argument("--out", type=Path, default=None, help="run directory (default: runs/demo-<timestamp>)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs per method (default: 60)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument(
        "--objective",
        choices=("averaged", "mixture"),
        default=None,
        help="the rank-1 models' training objective (default: the library's, the averaged ELBO)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    cfg = DemoConfig(seed=args.seed, objective=args.objective)
    if args.epochs is not None:
        if args.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
        cfg = replace(cfg, epochs=args.epochs)
    out = args.out or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    report = run_demo(cfg, out_dir=out, device=args.device, progress=False if args.no_progress else None)
    print(f"rank1-pyro demo on {report['dataset']} (test set rotated by {list(cfg.rotations)} degrees for 'rot')\n")
    print(format_table(report["results"]))
    print(f"\nrun directory: {out}  (results.json, results.md, reliability.png)")
    return 0
