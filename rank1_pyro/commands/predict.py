"""``rank1-pyro predict RUN_DIR INPUT``: predictions with their uncertainty for new inputs.

INPUT is a table (``.csv``, ``.parquet``: the run's feature columns by name), an array file
(``.npy``, ``.npz``), an image or a folder of images (runs trained on an image folder). Inputs
are prepared as the training data was (``RUN_DIR/data.json``: the training split's
standardisation statistics). One row per example:

* classification: ``prediction`` (class name), ``confidence``, ``prob_<class>`` per class, and the
  uncertainty split ``total`` = ``aleatoric`` + ``epistemic`` (entropy of the predictive = expected
  entropy + mutual information, nats); with ``--conformal ALPHA``, ``set``: the split conformal
  prediction set (needs ``rank1-pyro evaluate RUN_DIR --calibrate --conformal ALPHA`` first);
* regression: ``mean``, ``std``, and ``total`` = ``aleatoric`` + ``epistemic`` as variances in the
  target's units² (mean observation noise + variance of the posterior's means).

``--posterior`` chooses the posterior: ``rank1`` (default, the trained model), or ``laplace`` /
``projected``, fitted and saved in the run by ``rank1-pyro laplace RUN_DIR`` / ``rank1-pyro
project RUN_DIR`` (a missing one is reported with the command that saves it).

The same from Python: ``load_run(RUN_DIR).predict(INPUT, posterior=...)`` (:meth:`rank1_pyro.runs.Run.predict`).
"""

from __future__ import annotations

from pathlib import Path

#: the choices of --posterior, spelled out so that ``--help`` imports no torch (a test checks them
#: against :data:`rank1_pyro.runs.POSTERIORS`)
POSTERIORS = ("rank1", "laplace", "projected")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "predict",
        help="predictions with uncertainty for new inputs (CSV/Parquet/NumPy/images)",
        description="Predict for new inputs with a trained run: the predictive mean, class probabilities or "
        "Gaussian mean/std, and the uncertainty split (total, aleatoric, epistemic) per example, as CSV or JSON. "
        "A temperature saved by `evaluate --calibrate` is applied.",
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory written by `rank1-pyro train`")
    p.add_argument(
        "input",
        type=Path,
        metavar="INPUT",
        help="a .csv/.parquet table, a .npy/.npz array file, an image or a folder of images",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write the table here (.csv or .json); default: print CSV to standard output",
    )
    p.add_argument(
        "--format",
        choices=["csv", "json"],
        default=None,
        help="output format (default: from the --out suffix, else csv)",
    )
    p.add_argument(
        "--posterior",
        choices=list(POSTERIORS),
        default="rank1",
        help="the trained rank-1 posterior (default), or the Laplace / projected posterior saved in RUN_DIR by "
        "`rank1-pyro laplace` / `rank1-pyro project`",
    )
    p.add_argument("--samples", type=int, default=32, help="Monte Carlo samples per member (default: 32)")
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="divide the logits by this temperature (default: the one `evaluate --calibrate` saved, if any)",
    )
    p.add_argument(
        "--conformal",
        type=float,
        default=None,
        metavar="ALPHA",
        help="add split conformal prediction sets of coverage 1 - ALPHA (calibrated by "
        "`evaluate --calibrate --conformal ALPHA`)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the Monte Carlo draws (default: 0)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.set_defaults(func=run)


def run(args) -> int:
    import pyro

    from ..inference.distributed import resolve_device
    from ..runs import load_run

    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    fmt = args.format or ("json" if args.out is not None and args.out.suffix.lower() == ".json" else "csv")
    if not args.input.exists():
        raise FileNotFoundError(f"INPUT {args.input} not found")
    run_ = load_run(args.run_dir, device=resolve_device(args.device))
    pyro.set_rng_seed(args.seed)
    result = run_.predict(
        args.input,
        num_samples=args.samples,
        posterior=args.posterior,
        temperature=args.temperature,
        conformal=args.conformal,
    )
    text = result.to_json() if fmt == "json" else result.to_csv()
    if args.out is None:
        print(text, end="" if text.endswith("\n") else "\n")
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {len(result)} predictions to {args.out}")
    return 0
