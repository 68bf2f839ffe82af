"""``rank1-pyro diagnose RUN_DIR``: ArviZ diagnostics of a rank-1 BNN, written to ``RUN_DIR/diagnostics/``.

``RUN_DIR`` is a run directory of ``rank1-pyro train`` (``config.json`` and ``checkpoint.pt``): its
model, guide and data set are loaded (:func:`rank1_pyro.runs.load_run`); a directory that is not a
run (a typo, a half-written run) is refused with a message naming the missing files, and nothing
is trained or written. With ``--train-digits`` (and a ``RUN_DIR`` that holds no run) the command
instead trains its own small rank-1 MLP (64-64-10, K = 4 mixture components, Gaussian prior
N(1, 0.1²), ``--epochs`` epochs) on scikit-learn's bundled digits, to see the diagnostics end to end. Then
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
        "factors, reliability diagram, PIT check, Pareto k-hat plot, netCDF DataTrees and a text report. RUN_DIR "
        "is a run directory of `rank1-pyro train`; with --train-digits a small rank-1 MLP is instead trained on "
        "scikit-learn's digits into a RUN_DIR that holds no run.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="a run directory written by `rank1-pyro train`")
    p.add_argument("--train-digits", action="store_true",
                   help="train a small rank-1 MLP on digits (into a RUN_DIR holding no run) instead of loading a run")
    p.add_argument("--samples", type=int, default=32, help="Monte Carlo draws per mixture component (default: 32)")
    p.add_argument("--epochs", type=int, default=30, help="epochs of the --train-digits model (default: 30)")
    p.add_argument("--data-root", default=None, help="directory holding a loaded run's data set, as for train")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
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
    from ..inference.train import resolve_device
    from ..runs import check_run_or_stand_in, load_run

    if args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs}")
    if args.samples < 1:
        raise UsageError(f"--samples must be >= 1, got {args.samples}")
    check_run_or_stand_in(args.run_dir, args.train_digits, "holds a run: drop --train-digits to diagnose it")
    device = resolve_device(args.device)
    saved = not args.train_digits
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
        source = f"--train-digits: trained a rank-1 MLP on digits for {args.epochs} epochs"
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
