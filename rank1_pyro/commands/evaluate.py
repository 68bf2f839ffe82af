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
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..data import as_tensors, rotate
    from ..inference.train import evaluate, resolve_device
    from ..runs import load_run

    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    device = resolve_device(args.device)
    cfg, model, guide, (_, test_set) = load_run(args.run_dir, args.data_root, device)
    x, y = as_tensors(test_set)
    rows = {"test": evaluate(model, guide, (x, y), num_samples=args.samples, device=device)}
    if x.dim() == 4:
        for angle in (30, 45, 60):
            rows[f"rotated {angle}"] = evaluate(model, guide, (rotate(x, angle), y), num_samples=args.samples, device=device)
    keys = list(rows["test"])
    print(f"{cfg.name} ({args.run_dir})")
    print("| set | " + " | ".join(keys) + " |\n|---|" + "---:|" * len(keys))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[k]:.4f}" for k in keys) + " |")
    return 0
