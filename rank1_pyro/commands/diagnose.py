"""``rank1-pyro diagnose RUN_DIR``: ArviZ diagnostics of a rank-1 BNN, written to ``RUN_DIR/diagnostics/``.

When ``RUN_DIR`` is a run directory of ``rank1-pyro train`` (``config.json`` and ``checkpoint.pt``),
its model, guide and data set are loaded (:func:`rank1_pyro.runs.load_run`). Otherwise (no saved
model, e.g. a ``rank1-pyro demo`` directory, which holds metrics only, or a new path) the command
trains its own small rank-1 MLP (64-64-10, K = 4 mixture components, Gaussian prior N(1, 0.1²),
``--epochs`` epochs) on scikit-learn's bundled digits, so it always runs end to end. Then
:func:`rank1_pyro.diagnostics.diagnose` writes the figures, netCDF DataTrees and text report, and
the report is printed. The whole training set is evaluated S·K times (k-hat needs all of D).
"""

from __future__ import annotations

from pathlib import Path

#: K of the digits model the command trains when RUN_DIR holds no saved model
ENSEMBLE_SIZE = 4


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "diagnose",
        help="ArviZ diagnostics (posteriors, predictive checks, VI k-hat, PSIS-LOO) into RUN_DIR/diagnostics/",
        description="Write ArviZ diagnostics of a rank-1 BNN into RUN_DIR/diagnostics/: forest plot of the rank-1 "
        "factors, reliability diagram, PIT check, Pareto k-hat plot, netCDF DataTrees and a text report. A run "
        "directory of `rank1-pyro train` is loaded; without a saved model a small rank-1 MLP is first trained on "
        "scikit-learn's digits.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="run directory (created if missing)")
    p.add_argument("--samples", type=int, default=32, help="Monte Carlo draws per mixture component (default: 32)")
    p.add_argument("--epochs", type=int, default=30, help="epochs of the digits model trained without a saved model (default: 30)")
    p.add_argument("--data-root", default=None, help="directory holding a loaded run's data set, as for train")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.set_defaults(func=run)


def _train_digits_model(epochs: int, seed: int, device):
    import pyro

    from ..data import load_digits
    from ..inference import MixtureGuide
    from ..inference.train import train
    from ..models import rank1_mlp
    from ..priors import Gaussian

    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    split = load_digits(seed=seed)
    train_data = (split.x_train.flatten(1), split.y_train)
    test_data = (split.x_test.flatten(1), split.y_test)
    model = rank1_mlp(
        train_data[0].shape[1], [64], split.num_classes, ensemble_size=ENSEMBLE_SIZE, prior=Gaussian(1.0, 0.1)
    )
    guide = MixtureGuide(model, init_sign_prob=0.5)
    train(model, guide, train_data, epochs=epochs, batch_size=64, lr=3e-3, weight_decay=1e-4,
          kl_annealing_epochs=epochs / 3, device=device, progress=False, seed=seed)
    return model, guide, train_data, test_data


def run(args) -> int:
    import pyro

    from ..cli import UsageError
    from ..data import as_tensors
    from ..diagnostics import MIN_PARETO_DRAWS, diagnose
    from ..inference.checkpoint import CHECKPOINT_NAME
    from ..inference.train import resolve_device
    from ..runs import CONFIG_FILE, load_run

    if args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs}")
    if args.run_dir.exists() and not args.run_dir.is_dir():
        raise UsageError(f"RUN_DIR is not a directory: {args.run_dir}")
    device = resolve_device(args.device)
    saved = (args.run_dir / CONFIG_FILE).is_file() and (args.run_dir / CHECKPOINT_NAME).is_file()
    ensemble_size = ENSEMBLE_SIZE
    if saved:
        cfg, model, guide, (train_set, test_set) = load_run(args.run_dir, args.data_root, device)
        ensemble_size = model.ensemble_size
    if args.samples * ensemble_size < MIN_PARETO_DRAWS:
        raise UsageError(
            f"--samples must give at least {MIN_PARETO_DRAWS} draws over the {ensemble_size} components "
            f"for the Pareto fits, got {args.samples}"
        )
    if saved:
        train_data, test_data = as_tensors(train_set), as_tensors(test_set)
        source = f"loaded run {cfg.name!r} from {args.run_dir}"
    else:
        model, guide, train_data, test_data = _train_digits_model(args.epochs, args.seed, device)
        source = (
            f"RUN_DIR holds no saved model ({CONFIG_FILE} + {CHECKPOINT_NAME}): "
            f"trained a rank-1 MLP on digits for {args.epochs} epochs"
        )
    pyro.set_rng_seed(args.seed)
    report = diagnose(
        model,
        guide,
        tuple(t.to(device) for t in train_data),
        tuple(t.to(device) for t in test_data),
        args.run_dir / "diagnostics",
        num_samples=args.samples,
    )
    print(f"rank1-pyro diagnose: {source}\n")
    print(report, end="")
    return 0
