"""``rank1-pyro diagnose RUN_DIR``: ArviZ diagnostics of a rank-1 BNN, written to ``RUN_DIR/diagnostics/``.

``RUN_DIR`` is a run directory of ``rank1-pyro train`` (``config.json`` and ``checkpoint.pt``): its
model, guide and data set are loaded (:func:`rank1_pyro.runs.load_run`). A directory that holds no
usable run (a typo, a half-written run) is refused with a message naming the missing files and the
``rank1-pyro train`` command that makes the run; nothing is trained or written. Then :func:`diagnose`
writes the figures, netCDF DataTrees and text report, and the report is printed. The whole training
set is evaluated S·K times (k-hat needs all of D).

:func:`diagnose` is the report itself, for a model and guide in memory: it puts together the numbers
of :mod:`rank1_pyro.diagnostics` and the figures of :mod:`rank1_pyro.plots`, and is the only module
that imports both (:mod:`rank1_pyro.diagnostics` imports no figures).
"""

from __future__ import annotations

import shlex
from pathlib import Path

#: the shipped config named in the message for a RUN_DIR that holds no run
EXAMPLE_CONFIG = "digits_mlp"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "diagnose",
        help="ArviZ diagnostics (posteriors, predictive checks, VI k-hat, PSIS-LOO) into RUN_DIR/diagnostics/",
        description="Write ArviZ diagnostics of a rank-1 BNN into RUN_DIR/diagnostics/: forest plot of the rank-1 "
        "factors, reliability diagram, PIT check, Pareto k-hat plot, netCDF DataTrees and a text report. RUN_DIR "
        f"is a run directory of `rank1-pyro train` (e.g. `rank1-pyro train --config {EXAMPLE_CONFIG} --out "
        "RUN_DIR`).",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="a run directory written by `rank1-pyro train`")
    p.add_argument("--samples", type=int, default=32, help="Monte Carlo draws per mixture component (default: 32)")
    p.add_argument("--data-root", default=None, help="directory holding the run's data set, as for train")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.set_defaults(func=run)


def train_command(run_dir) -> str:
    """The ``rank1-pyro train`` command that makes a run in ``run_dir``: ``--resume`` where its config is."""
    out = shlex.quote(str(run_dir))
    if (Path(run_dir) / "config.json").is_file():
        return f"rank1-pyro train --resume --out {out}"
    return f"rank1-pyro train --config {EXAMPLE_CONFIG} --out {out}"


def _check_run(run_dir) -> None:
    """Refuse a RUN_DIR without a run, naming what is missing and the command that trains one."""
    from ..runs import RunError, check_run_dir, check_run_path

    check_run_path(run_dir)  # a file: no train command helps
    try:
        check_run_dir(run_dir)
    except RunError as e:
        raise RunError(f"{e}; train a run first: `{train_command(run_dir)}`") from None


def run(args) -> int:
    import pyro

    from ..cli import UsageError
    from ..data import as_tensors
    from ..diagnostics import MIN_PARETO_DRAWS
    from ..inference.distributed import resolve_device
    from ..runs import load_run

    if args.samples < 1:
        raise UsageError(f"--samples must be >= 1, got {args.samples}")
    _check_run(args.run_dir)
    device = resolve_device(args.device)
    cfg, model, guide, (train_set, test_set) = load_run(args.run_dir, args.data_root, device)
    if args.samples * model.ensemble_size < MIN_PARETO_DRAWS:
        raise UsageError(
            f"--samples must give at least {MIN_PARETO_DRAWS} draws over the {model.ensemble_size} components "
            f"for the Pareto fits, got {args.samples}"
        )
    train_data, test_data = as_tensors(train_set), as_tensors(test_set)
    pyro.set_rng_seed(args.seed)
    report = diagnose(
        model,
        guide,
        tuple(t.to(device) for t in train_data),
        tuple(t.to(device) for t in test_data),
        args.run_dir / "diagnostics",
        num_samples=args.samples,
    )
    print(f"rank1-pyro diagnose: loaded run {cfg.name!r} from {args.run_dir}\n")
    print(report, end="")
    return 0


# ----------------------------------------------------------------------------- the report


def _loo_line(result, label: str) -> str:
    import numpy as np

    k = np.asarray(result.pareto_k)
    bad = int((k > result.good_k).sum())
    return (
        f"{label}: elpd_loo = {result.elpd:.1f} (SE {result.se:.1f}), p_loo = {result.p:.1f}; "
        f"Pareto k > {result.good_k:.2f} for {bad} of {k.size} examples"
    )


def diagnose(
    model,
    guide,
    train_data,
    test_data,
    out_dir,
    *,
    num_samples: int = 32,
    batch_size: int = 512,
    max_entries: int = 6,
) -> str:
    """Run every diagnostic of a rank-1 model and its guide; write figures and data; return the text report.

    Writes into ``out_dir``: ``train.nc`` (the DataTree of the training data: posterior,
    posterior_predictive, log_likelihood, observed_data, sample_stats), ``test.nc`` (predictive
    groups on the test data), ``summary.csv`` (:func:`~rank1_pyro.diagnostics.summary`, one row per
    factor entry), ``forest.png``, ``reliability.png`` (classification), ``pit.png`` (test data),
    ``khat.png`` (guides with a density) and ``report.txt``. Held-out metrics use the Monte Carlo
    mixture predictive of S draws per component; VI quality and PSIS-LOO use the training data, as
    they must.
    """
    import warnings

    from torch import nn

    from .. import metrics, plots
    from .._checks import positive_int
    from ..diagnostics import (
        KHAT_USABLE,
        MIN_PARETO_DRAWS,
        _check_data,
        khat_verdict,
        loo,
        site_summary,
        summary,
        to_datatree,
        to_netcdf,
        vi_khat,
    )
    from ..inference.predictive import Rank1Posterior, predict

    x_test, y_test = _check_data(test_data)
    _check_data(train_data)
    positive_int("num_samples", num_samples)
    draws = num_samples * getattr(model, "ensemble_size", 1)
    if draws < MIN_PARETO_DRAWS:
        raise ValueError(
            f"num_samples: {num_samples} draws per component give {draws} draws in all; the Pareto fits of "
            f"k-hat and PSIS-LOO need at least {MIN_PARETO_DRAWS}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    posterior = Rank1Posterior(model, guide)
    train_tree = to_datatree(None, posterior, train_data, num_samples, batch_size=batch_size)
    test_tree = to_datatree(None, posterior, test_data, num_samples, batch_size=batch_size, log_density=False)
    to_netcdf(train_tree, out / "train.nc")
    to_netcdf(test_tree, out / "test.nc")
    S, K = train_tree.attrs["num_samples"], train_tree.attrs["num_components"]
    prediction = predict(posterior, x_test, num_samples=num_samples, batch_size=batch_size)
    lines = [
        "rank1-pyro diagnostics",
        f"model: {type(model).__name__}({model.extra_repr() if isinstance(model, nn.Module) else ''}); "
        f"guide: {type(guide).__name__}",
        f"draws: S = {S} per component x K = {K} components = {S * K} (chain = component, draw = sample)",
        f"data: {train_tree['observed_data'].sizes['obs_id']} training, {x_test.shape[0]} test examples",
        "",
    ]
    files = ["train.nc", "test.nc"]
    if prediction.likelihood == "categorical":
        m = metrics.classification_metrics(prediction.probs, y_test.cpu(), prediction.log_probs)
        lines.append("held-out predictive (mixture): " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()))
        members = [metrics.accuracy(p, y_test.cpu()) for p in prediction.member_probs]
        lines.append("held-out accuracy of each component alone: " + ", ".join(f"{a:.4f}" for a in members))
        plots.reliability_diagram(
            prediction.probs, y_test.cpu(), out / "reliability.png", title="Test set, mixture predictive"
        )
        files.append("reliability.png")
    else:
        lines.append(
            f"held-out predictive: rmse {metrics.rmse(prediction.mean, y_test.cpu()):.4f}, "
            f"nll {metrics.gaussian_nll(prediction.mean, prediction.variance, y_test.cpu()):.4f}"
        )
    pit_title = "PIT check on the test set (randomized PIT for class labels; 0 = calibrated)"
    plots.pit_check(test_tree, out / "pit.png", title=pit_title, data="test set")
    files.append("pit.png")
    lines.append("")
    if "sample_stats" in train_tree.children:
        khat = vi_khat(train_tree)
        with warnings.catch_warnings():  # ArviZ warns about large Pareto k; the report states the counts
            warnings.simplefilter("ignore", UserWarning)
            plain, corrected = loo(train_tree), loo(train_tree, approximate_posterior=True)
        note = "" if khat < KHAT_USABLE else " (unreliable: the VI k-hat is >= 0.7)"
        lines += [
            f"VI quality (Yao et al. 2018), Pareto k-hat of log p(theta, D) - log q(theta) over {S * K} draws of q:",
            "  " + khat_verdict(khat),
            _loo_line(plain, "PSIS-LOO on the training data, draws taken as posterior draws"),
            _loo_line(corrected, f"PSIS-LOO corrected for sampling from q{note}"),
        ]
        plots.khat_plot(plain, out / "khat.png", vi_khat=khat)
        files.append("khat.png")
    else:  # point masses: no density, and only K distinct draws (a Pareto tail fit of ties is undefined)
        lines += [
            "VI quality: undefined, the guide has point masses (no density q(theta))",
            "PSIS-LOO: skipped, a point-mass guide gives only K distinct parameter draws",
        ]
    lines.append("")
    if "posterior" in train_tree.children:
        summary(train_tree).to_csv(out / "summary.csv")
        plots.factor_forest(train_tree, out / "forest.png", max_entries=max_entries)
        files += ["summary.csv", "forest.png"]
        table = site_summary(train_tree)
        lines += [
            "Posterior per site (averaged over entries). component_separation_rhat is ArviZ's R-hat with the",
            "mixture components as chains: how far apart the components sit, NOT a convergence check for VI.",
            table.to_string(float_format=lambda v: f"{v:.3f}"),
            "",
        ]
    lines.append(f"files in {out}: {', '.join(files + ['report.txt'])}")
    report = "\n".join(lines) + "\n"
    (out / "report.txt").write_text(report)
    return report
