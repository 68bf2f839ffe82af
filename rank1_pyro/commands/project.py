"""``rank1-pyro project RUN_DIR``: the null-space projected posterior of a trained run, saved into the run.

RUN_DIR is a run of ``rank1-pyro train``: its rank-1 model becomes a point network (W, biases and
the factor means, K members; :func:`~rank1_pyro.laplace.rank1_point_network`), and
:class:`~rank1_pyro.laplace.ProjectedPosterior` is fitted on the run's training set over all of its
parameters, the weights only, or the factors only (``--params``). A directory that holds no run is
refused with a message naming the ``rank1-pyro train`` command to run; nothing is trained in its place.

Prints α, the estimated null-space dimension tr 𝒫, the last projection residual, and the metrics of
the network itself ("MAP") and of the projected posterior (``--samples`` draws) on the test set
and, for image data, rotated copies of it, like ``rank1-pyro laplace``. Writes the report to
``RUN_DIR/projected.json`` and the posterior to ``RUN_DIR/projected/`` with its ``--samples``
projected draws (without the training micro-batches unless ``--keep-micro-batches``: then a loaded
posterior can project more draws, but the file holds the training inputs), from where
``rank1-pyro predict RUN_DIR INPUT --posterior projected --samples S`` (S at most the saved draws)
predicts with it.
"""

from __future__ import annotations

import time

from .laplace import add_run_arguments

REPORT_FILE = "projected.json"
#: spelled out so that ``--help`` imports no torch (a test checks them against :mod:`rank1_pyro.laplace.projected`)
KINDS = ("output", "loss")
PREDICTIVES = ("linearized", "nn")
SOLVERS = ("cg", "alternating")
#: ``--params`` -> which parameters of the point network make up θ
PARAMS = ("all", "weights", "factors")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "project",
        help="null-space projected posterior of a trained run (saved for predict --posterior projected)",
        description="Fit the projected posterior (Miani et al., 2025: the linearized Laplace in the limit of "
        "infinite curvature on the data, a prior restricted to the null space of the training Jacobian) of a "
        "trained run's network, print its metrics beside the network's own, and save it with its draws into "
        "RUN_DIR/projected/ for `rank1-pyro predict RUN_DIR INPUT --posterior projected`.",
    )
    add_run_arguments(p, "(saved with the posterior: predict can use at most as many)")
    p.add_argument(
        "--params",
        choices=list(PARAMS),
        default="all",
        help="θ: all parameters, the weights and biases only, or the rank-1 factor means only (default: all)",
    )
    p.add_argument("--kind", choices=list(KINDS), default="output", help="null space of (default: output)")
    p.add_argument("--alpha", type=float, default=None, help="prior precision (default: the closed form)")
    p.add_argument("--iterations", type=int, default=100, help="iterations per projection (default: 100)")
    p.add_argument("--micro-batch", type=int, default=32, help="examples per projection step (default: 32)")
    p.add_argument("--solver", choices=list(SOLVERS), default="cg", help="default: cg")
    p.add_argument("--predictive", choices=list(PREDICTIVES), default="linearized", help="default: linearized")
    p.add_argument(
        "--keep-micro-batches",
        action="store_true",
        help="also save the micro-batches (the training inputs and Gram eigenvectors): a larger file whose "
        "posterior can project any number of draws",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from ..inference.distributed import resolve_device
    from ..laplace import ProjectedPosterior
    from .laplace import check_args, compare, load_point_network, print_table, save_report

    check_args(args)
    if args.iterations < 1:
        raise ValueError(f"--iterations must be >= 1, got {args.iterations}")
    if args.micro_batch < 1:
        raise ValueError(f"--micro-batch must be >= 1, got {args.micro_batch}")
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    run_, net, (x_train, y_train), test_sets, what = load_point_network(args, device)
    likelihood = run_.model.likelihood
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    if args.params != "all":
        factors = args.params == "factors"
        names = [n for n in names if n.startswith("factors.") == factors]
        if not names:
            raise ValueError(f"--params {args.params}: the network of {args.run_dir} has no such parameters")
    post = ProjectedPosterior(
        net,
        likelihood,
        names,
        args.alpha,
        kind=args.kind,
        predictive=args.predictive,
        num_iterations=args.iterations,
        micro_batch_size=args.micro_batch,
        solver=args.solver,
    )
    start = time.perf_counter()
    post.fit(DataLoader(TensorDataset(x_train, y_train), batch_size=256))
    post.draws(args.samples)  # the draws the report and the saved posterior use
    fit_seconds = time.perf_counter() - start
    results = compare(net, post, test_sets, args.samples, run_.preprocessing)
    trace = post.trace_estimate
    report = {
        "network": what,
        "run_dir": str(args.run_dir),
        "likelihood": likelihood,
        "params": args.params,
        "num_params": post.num_params,
        "kind": args.kind,
        "alpha": post.alpha,
        "trace_estimate": trace,
        "trace_stderr": post.trace_stderr,
        "residual": float(post.convergence[-1]),
        "predictive": args.predictive,
        "samples": args.samples,
        "fit_seconds": fit_seconds,
        "results": {name: {"map": r["map"], "projected": r["posterior"]} for name, r in results.items()},
    }
    null_space = "" if trace is None else f", null space ≈ {trace:,.0f} ± {post.trace_stderr:.0f} dims"
    print(
        f"projected posterior on {what}: {post.num_params:,} parameters ({args.params}), kind {args.kind}, "
        f"alpha {post.alpha:.4g}{null_space}, residual {report['residual']:.1e}, predictive {args.predictive}, "
        f"{args.samples} draws, fit {fit_seconds:.1f} s\n"
    )
    print_table(results, "projected", likelihood)
    save_report(args, report, post, REPORT_FILE, micro_batches=args.keep_micro_batches)
    return 0
