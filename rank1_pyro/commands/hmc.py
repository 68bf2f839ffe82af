"""``rank1-pyro hmc RUN_DIR``: an HMC reference over the rank-1 factors of a trained run, and how the run's
approximate posterior compares with it.

``RUN_DIR`` is a run directory of ``rank1-pyro train``: its model, guide and data are loaded
(:func:`rank1_pyro.runs.load_run`); anything else is refused with a message naming what is
missing. With W and the biases held at their trained values, NUTS samples each member's factor
posterior on the whole training set (:func:`rank1_pyro.inference.hmc.run_hmc`: one chain from the
guide's component mean and ``--random-starts`` from prior draws per member, one after another).
Then, for a classification run, :func:`rank1_pyro.comparison.compare_to_hmc` compares the run's
guide (and, with ``--laplace``, a full-covariance Laplace over the factors) with the chains.

Writes into ``--out`` (default ``RUN_DIR/hmc``): ``hmc.nc`` (the chains as an ArviZ DataTree),
``summary.csv`` (ArviZ's summary per member: R-hat, ESS, MCSE), ``comparison.json``,
``report.txt``, ``hmc-marginals.png`` and ``hmc-std-ratios.png``; prints the report.
"""

from __future__ import annotations

import time
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "hmc",
        help="HMC (NUTS) over the rank-1 factors of a trained run, compared with its approximate posterior",
        description="Sample the posterior of each member's rank-1 factors of a trained run with NUTS (W and the "
        "biases fixed, the whole training set), write the chains as an ArviZ DataTree with R-hat and ESS, and "
        "compare the run's guide (and, with --laplace, a Laplace over the factors) with them: held-out NLL and "
        "accuracy, predictive KL, marginal means and stds, HMC modes covered, VI k-hat, and two figures.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="a run directory written by `rank1-pyro train`")
    p.add_argument("--samples", type=int, default=500, help="draws kept per chain (default: 500)")
    p.add_argument("--warmup", type=int, default=None, help="warmup iterations per chain (default: --samples)")
    p.add_argument(
        "--random-starts",
        type=int,
        default=3,
        help="chains per member from random starts, besides the one from the guide's component mean (default: 3)",
    )
    p.add_argument(
        "--random-init",
        default="prior",
        choices=["prior", "signs"],
        help="random starts: a prior draw, or ±1 entries (default: prior)",
    )
    p.add_argument("--members", type=int, nargs="+", default=None, help="members to sample (default: all K)")
    p.add_argument("--max-tree-depth", type=int, default=10, help="NUTS's maximum tree depth (default: 10)")
    p.add_argument("--target-accept", type=float, default=0.8, help="NUTS's target acceptance (default: 0.8)")
    p.add_argument("--float32", action="store_true", help="run the chains in float32 (default: float64)")
    p.add_argument("--no-jit", action="store_true", help="evaluate the potential eagerly (no torch.jit.trace)")
    p.add_argument("--laplace", action="store_true", help="also compare a full-covariance Laplace over the factors")
    p.add_argument("--draws", type=int, default=256, help="draws per component for the comparison (default: 256)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: RUN_DIR/hmc)")
    p.add_argument("--data-root", default=None, help="directory holding the run's data set, as for train")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=run)


def _check(args) -> None:
    from ..cli import UsageError

    if args.samples < 1:
        raise UsageError(f"--samples must be >= 1 (draws kept per chain, e.g. 500), got {args.samples}")
    if args.warmup is not None and args.warmup < 0:
        raise UsageError(f"--warmup must be >= 0, got {args.warmup}")
    if args.random_starts < 0:
        raise UsageError(f"--random-starts must be >= 0, got {args.random_starts}")
    if args.draws < 2:
        raise UsageError(f"--draws must be >= 2, got {args.draws}")
    if args.max_tree_depth < 1:
        raise UsageError(f"--max-tree-depth must be >= 1, got {args.max_tree_depth}")
    if not 0.0 < args.target_accept < 1.0:
        raise UsageError(f"--target-accept must be in (0, 1), got {args.target_accept}")


def _laplace(model, guide, train_data):
    """The full-covariance Laplace over all rank-1 factors, under the model's Gaussian prior when it has one
    (else δ by the marginal likelihood), evaluated by sampling the factors."""
    from ..laplace import SubnetLaplace, rank1_point_network
    from ..layers import factor_sites
    from ..priors import Gaussian

    prior = factor_sites(model)[0].prior
    precision = 1.0 / float(prior.scale) ** 2 if isinstance(prior, Gaussian) and not prior.hierarchical else None
    return SubnetLaplace(
        rank1_point_network(model, guide),
        "classification",
        "rank1-factors",
        prior_precision=precision,
        prior_mean=1.0,
        predictive="nn",
    ).fit(train_data)


def run(args) -> int:
    import math

    import pyro
    import torch

    from ..comparison import compare_to_hmc, plot_marginals, plot_std_ratios
    from ..data import as_tensors
    from ..diagnostics import to_netcdf
    from ..inference.hmc import convergence, hmc_summary, run_hmc
    from ..runs import load_run, require_run, write_json

    _check(args)
    require_run(args.run_dir)
    cfg, model, guide, (train_set, test_set) = load_run(args.run_dir, args.data_root, "cpu")
    members = args.members if args.members is not None else list(range(model.ensemble_size))
    bad = [k for k in members if not 0 <= k < model.ensemble_size]
    if bad:
        raise ValueError(f"--members: {bad} are not members of this K = {model.ensemble_size} run")
    out = args.out or args.run_dir / "hmc"
    out.mkdir(parents=True, exist_ok=True)
    train_data, test_data = as_tensors(train_set), as_tensors(test_set)
    pyro.set_rng_seed(args.seed)
    began = time.perf_counter()
    result = run_hmc(
        model,
        train_data,
        guide=guide,
        members=members,
        random_starts=args.random_starts,
        random_init=args.random_init,
        num_samples=args.samples,
        warmup_steps=args.warmup,
        max_tree_depth=args.max_tree_depth,
        target_accept_prob=args.target_accept,
        dtype=torch.float32 if args.float32 else torch.float64,
        jit=not args.no_jit,
        seed=args.seed,
        progress=False if args.no_progress else None,
    )
    hmc_seconds = time.perf_counter() - began
    tree = result.to_datatree()
    to_netcdf(tree, out / "hmc.nc")
    hmc_summary(tree).to_csv(out / "summary.csv")
    lines = [
        f"rank1-pyro hmc: run {cfg.name!r} ({args.run_dir}), K = {model.ensemble_size}, members {members}",
        f"NUTS: {result.num_chains} chains x {result.num_samples} draws (+{result.settings['warmup_steps']} warmup), "
        f"{result.settings['dimension']} factor entries per member, {result.settings['num_data']} training examples, "
        f"{hmc_seconds:.0f} s ({result.settings['execution']})",
    ]
    for k, c in convergence(tree).items():
        lines.append(
            f"  member {k}: max R-hat {c['r_hat_max']:.3f}, min bulk ESS {c['ess_bulk_min']:.0f}, "
            f"min tail ESS {c['ess_tail_min']:.0f}, {c['divergences']} divergences"
        )
    lines.append("")
    files = ["hmc.nc", "summary.csv"]
    if model.likelihood == "categorical":
        approximations = {f"run guide ({type(guide).__name__})": guide}
        if args.laplace:
            approximations["laplace (factors)"] = _laplace(model, guide, train_data)
        comparison = compare_to_hmc(
            model,
            approximations,
            tree,
            train_data,
            test_data,
            num_samples=args.draws,
            khat_samples=max(8, math.ceil(25 / model.ensemble_size), args.draws // 4),
            seed=args.seed,
        )
        lines.append(comparison.report())
        write_json(
            {**comparison.to_dict(), "hmc_seconds": hmc_seconds, "hmc": result.settings}, out / "comparison.json"
        )
        plot_marginals(comparison, out / "hmc-marginals.png")
        plot_std_ratios(comparison, out / "hmc-std-ratios.png")
        files += ["comparison.json", "hmc-marginals.png", "hmc-std-ratios.png"]
    else:
        lines.append("regression run: no predictive comparison (see summary.csv for the posterior moments)")
    lines.append(f"files in {out}: {', '.join(files + ['report.txt'])}")
    report = "\n".join(lines) + "\n"
    (out / "report.txt").write_text(report)
    print(report, end="")
    return 0
