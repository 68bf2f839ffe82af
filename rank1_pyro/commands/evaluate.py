"""``rank1-pyro evaluate RUN_DIR``: metrics of a trained run on its test set (and rotated copies)."""

from __future__ import annotations

from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="evaluate a trained run on its test set",
        description="Load a run directory written by `rank1-pyro train` and print accuracy, NLL, ECE and Brier "
        "of the Monte Carlo predictive on the test set and, for image data, on the test set rotated by 30, 45 "
        "and 60 degrees.",
    )
    p.add_argument("run_dir", type=Path, help="a run directory written by `rank1-pyro train`")
    p.add_argument("--data-root", default=None, help="directory holding the data set, as for train")
    p.add_argument("--samples", type=int, default=16, help="Monte Carlo samples per member (default: 16)")
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the Monte Carlo draws (default: the run's seed): same seed, same numbers",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="fit temperature scaling on a random half of the test set, report every metric on the other "
        "half before and after, and save the temperature in RUN_DIR/calibration.json (used by `predict`)",
    )
    p.add_argument(
        "--conformal",
        type=float,
        nargs="*",
        default=None,
        metavar="ALPHA",
        help="with --calibrate: also split conformal prediction sets of coverage 1 - ALPHA (e.g. 0.1), "
        "their measured coverage and mean size on the other half; saved for `predict --conformal ALPHA`",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    import pyro

    from ..data import as_tensors, rotate
    from ..inference.distributed import resolve_device
    from ..inference.predictive import evaluate
    from ..runs import load_run

    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    if args.seed is not None and args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    device = resolve_device(args.device)
    cfg, model, guide, (_, test_set) = load_run(args.run_dir, args.data_root, device)
    pyro.set_rng_seed(cfg.seed if args.seed is None else args.seed)
    x, y = as_tensors(test_set)
    if args.conformal and not args.calibrate:
        raise ValueError("--conformal needs --calibrate (the sets are calibrated on half of the test set)")
    if args.calibrate:
        return _calibrate(args, cfg, model, guide, x, y, device)
    rows = {"test": evaluate(model, guide, (x, y), num_samples=args.samples, device=device)}
    if x.dim() == 4:
        for angle in (30, 45, 60):
            rows[f"rotated {angle}"] = evaluate(
                model, guide, (rotate(x, angle), y), num_samples=args.samples, device=device
            )
    if model.likelihood == "categorical":
        _selective(rows, model, guide, x, y, args.samples, device)
    keys = list(rows["test"])
    print(f"{cfg.name} ({args.run_dir})")
    print("| set | " + " | ".join(keys) + " |\n|---|" + "---:|" * len(keys))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join("" if k not in row else f"{row[k]:.4f}" for k in keys) + " |")
    return 0


def _selective(rows, model, guide, x, y, num_samples, device) -> None:
    """Adaptive ECE, AURC, selective accuracy at 80 % coverage per set, and the FPR at 95 % TPR of
    telling the test set (positives) from each rotated copy by the confidence."""
    from .. import metrics
    from ..data import rotate
    from ..inference.predictive import Rank1Posterior, predict

    posterior = Rank1Posterior(model, guide)
    confidence = {}
    for name, row in rows.items():
        xs = x if name == "test" else rotate(x, float(name.split()[1]))
        probs = predict(posterior, xs, num_samples=num_samples, device=device).probs
        confidence[name] = probs.max(1).values
        row.update(metrics.selective_metrics(probs, y))
    for name in rows:
        if name != "test":
            rows[name]["fpr95"] = metrics.fpr_at_tpr(confidence["test"], confidence[name])


def _calibrate(args, cfg, model, guide, x, y, device) -> int:
    import torch

    from .. import metrics
    from ..calibration import (
        TemperatureScaled,
        conformal_sets,
        conformal_threshold,
        fit_temperature,
        save_calibration,
        set_coverage,
    )
    from ..inference.predictive import Rank1Posterior, predict

    if model.likelihood != "categorical":
        raise ValueError("--calibrate: temperature scaling and conformal sets are for classification runs")
    for alpha in args.conformal or []:
        if not 0 < alpha < 1:
            raise ValueError(f"--conformal ALPHA must be in (0, 1), got {alpha}")
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(cfg.seed))
    cal, held = perm[: len(y) // 2], perm[len(y) // 2 :]
    posterior = Rank1Posterior(model, guide)
    pred_cal = predict(posterior, x[cal], num_samples=args.samples, device=device)
    temperature = fit_temperature(pred_cal.log_samples, y[cal])
    scaled = TemperatureScaled(posterior, temperature)
    rows = {}
    for name, post in (("uncalibrated", posterior), (f"temperature {temperature:.3f}", scaled)):
        probs = predict(post, x[held], num_samples=args.samples, device=device).probs
        rows[name] = {**metrics.classification_metrics(probs, y[held]), **metrics.selective_metrics(probs, y[held])}
    cal_probs = predict(scaled, x[cal], num_samples=args.samples, device=device).probs
    held_probs = predict(scaled, x[held], num_samples=args.samples, device=device).probs
    thresholds, coverage = {}, {}
    for alpha in args.conformal or []:
        q = conformal_threshold(cal_probs, y[cal], alpha)
        thresholds[str(alpha)] = q
        coverage[alpha] = set_coverage(conformal_sets(held_probs, q), y[held])
    path = save_calibration(
        args.run_dir, "rank1", {"temperature": temperature, "conformal": thresholds, "calibration_examples": len(cal)}
    )
    keys = list(next(iter(rows.values())))
    print(f"{cfg.name} ({args.run_dir}): calibrated on {len(cal)} test examples, evaluated on the other {len(held)}")
    print("| predictive | " + " | ".join(keys) + " |\n|---|" + "---:|" * len(keys))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[k]:.4f}" for k in keys) + " |")
    if coverage:
        print("\n| conformal alpha | target coverage | measured coverage | mean set size |\n|---:|---:|---:|---:|")
        for alpha, (cov, size) in coverage.items():
            print(f"| {alpha:g} | {1 - alpha:.3f} | {cov:.4f} | {size:.3f} |")
    print(f"\nsaved to {path}")
    return 0
