"""``rank1-pyro laplace RUN_DIR``: subnetwork linearized Laplace on a trained run, saved into the run.

RUN_DIR is a run of ``rank1-pyro train`` (``config.json`` + ``checkpoint.pt``): its rank-1 model
becomes a point network (W, biases and the factor means, K members;
:func:`~rank1_pyro.laplace.rank1_point_network`), and the Laplace is fitted on the run's training
set; the prior mean is 1 on the factors (their prior location) and 0 elsewhere. A directory that
holds no run (a typo, a half-written run) is refused with a message naming the missing files and
the ``rank1-pyro train`` command that makes one; nothing is trained in its place.

Prints the metrics of the network itself ("MAP") and of the subnetwork Laplace on the test set
and, for image data, on rotated copies of it (classification: NLL, accuracy, ECE; regression:
NLL and RMSE in the target's units); writes the report to ``RUN_DIR/laplace.json`` and the fitted
posterior to ``RUN_DIR/laplace/`` (:func:`~rank1_pyro.runs.save_posterior`), from where
``rank1-pyro predict RUN_DIR INPUT --posterior laplace`` and ``load_run(RUN_DIR).posterior("laplace")``
predict with it. :func:`subnet_laplace_report` is the core, for any trained network and data; the
helpers below it are shared with ``rank1-pyro project``.
"""

from __future__ import annotations

import time
from pathlib import Path

REPORT_FILE = "laplace.json"
#: the training command suggested when RUN_DIR holds no run


def _size(text: str):
    """``--size``: an int count, or a float fraction in (0, 1]."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"--size must be an integer count or a fraction, got {text!r}") from None


#: the choices of --subnetwork and --predictive, spelled out so that ``--help`` imports no torch
#: (a test checks them against :data:`~rank1_pyro.laplace.subnetwork.SUBNETWORK_STRATEGIES`, ``PREDICTIVES``)
SUBNETWORK_STRATEGIES = (
    "largest-variance",
    "largest-swag-variance",
    "largest-magnitude",
    "random",
    "by-name",
    "last-layer",
    "rank1-factors",
)
PREDICTIVES = ("glm", "glm-mc", "nn")


def add_run_arguments(p, what: str) -> None:
    """RUN_DIR and the options every post-hoc command shares."""
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory written by `rank1-pyro train`")
    p.add_argument(
        "--samples", type=int, default=32, help=f"posterior samples of the sampled predictives {what} (default: 32)"
    )
    p.add_argument(
        "--rotate",
        type=float,
        nargs="*",
        default=[30.0, 45.0],
        help="rotations (degrees) of the test images to evaluate on, for image data (default: 30 45)",
    )
    p.add_argument("--data-root", default=None, help="directory holding the run's data set, as for train")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "laplace",
        help="subnetwork linearized Laplace on a trained run (saved for predict --posterior laplace)",
        description="Fit a full-covariance linearized Laplace over a subnetwork of a trained run's network, print "
        "its metrics beside the network's own on the test set (and rotated copies of test images), and save it "
        "into RUN_DIR/laplace/ for `rank1-pyro predict RUN_DIR INPUT --posterior laplace`. RUN_DIR is a run of "
        "`rank1-pyro train` (its rank-1 model at the factor means is used).",
    )
    add_run_arguments(p, "glm-mc and nn, saved with the posterior")
    p.add_argument(
        "--subnetwork",
        default="largest-variance",
        choices=list(SUBNETWORK_STRATEGIES),
        help="subnetwork selection strategy (default: largest-variance)",
    )
    p.add_argument(
        "--size",
        type=_size,
        default=None,
        help="subnetwork size: a count or a fraction in (0, 1] (default: 1000, capped at the number of "
        "weights; structural strategies take all their entries)",
    )
    p.add_argument("--pattern", action="append", default=None, help="parameter name pattern for --subnetwork by-name")
    p.add_argument("--prior-precision", type=float, default=None, help="default: by the marginal likelihood")
    p.add_argument("--predictive", default="glm", choices=list(PREDICTIVES), help="default: glm (probit)")
    p.set_defaults(func=run)


# ------------------------------------------------------------------------------------------
# Shared by the post-hoc commands
# ------------------------------------------------------------------------------------------
def check_args(args) -> None:
    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")


def load_point_network(args, device):
    """The run of ``args.run_dir`` as a point network, with its training and test tensors.

    Returns ``(run, net, (x_train, y_train), test_sets, what)``: ``test_sets`` maps ``"test"``
    (and ``"rotated <angle>"`` for image data) to ``(x, y)``.
    """
    from ..data import as_tensors, rotate
    from ..laplace import rank1_point_network
    from ..runs import load_run, require_run

    require_run(args.run_dir)
    run = load_run(args.run_dir, args.data_root, device)
    train_set, test_set = run.datasets
    net = rank1_point_network(run.model, run.guide).eval()
    x_test, y_test = as_tensors(test_set)
    test_sets = {"test": (x_test, y_test)}
    if x_test.dim() == 4:
        for angle in args.rotate:
            test_sets[f"rotated {angle:g}"] = (rotate(x_test, angle), y_test)
    return run, net, as_tensors(train_set), test_sets, f"{run.config.name} (K={run.model.ensemble_size})"


class PointPredictive:
    """The point network itself as a posterior (one sample of its K members): the "MAP" rows."""

    def __init__(self, net, likelihood: str):
        self.model, self.likelihood = net, likelihood
        self.ensemble_size = getattr(net, "ensemble_size", 1)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def sample_predictions(self, x, num_samples: int):
        import torch

        with torch.no_grad():
            out = self.model(x)
            out = out.reshape(1, self.ensemble_size, x.shape[0], out.shape[-1])
            if self.likelihood == "categorical":
                return torch.softmax(out, -1)
            mean = out.squeeze(-1)
            noise = self.model.model.noise_scale().to(mean) ** 2
            return torch.stack([mean, noise.expand_as(mean)], dim=-1)


def metrics_of(prediction, y, preprocessing=None) -> dict:
    """Classification: :func:`~rank1_pyro.metrics.classification_metrics`; regression: Gaussian NLL
    and RMSE of the predictive (in the target's units when the run standardised it)."""
    from .. import metrics

    if prediction.likelihood == "categorical":
        return metrics.classification_metrics(prediction.probs, y)
    y = y.to(prediction.mean.dtype)
    values = {
        "nll": metrics.gaussian_nll(prediction.mean, prediction.variance, y),
        "rmse": metrics.rmse(prediction.mean, y),
    }
    return preprocessing.original_units(values) if preprocessing is not None else values


def compare(net, posterior, test_sets: dict, num_samples: int, preprocessing=None) -> dict:
    """Per test set, the metrics of ``"map"`` (the network itself) and ``"posterior"``."""
    from ..inference import predict

    point = PointPredictive(net, posterior.likelihood)
    results = {}
    for name, (x, y) in test_sets.items():
        results[name] = {
            "map": metrics_of(predict(point, x, num_samples=1, batch_size=512), y, preprocessing),
            "posterior": metrics_of(predict(posterior, x, num_samples=num_samples), y, preprocessing),
        }
    return results


def print_table(results: dict, label: str, likelihood: str) -> None:
    """The metrics as a Markdown table: one row per test set and method."""
    columns = (("nll", "NLL"), ("accuracy", "accuracy"), ("ece", "ECE"))
    if likelihood != "categorical":
        columns = (("nll", "NLL"), ("rmse", "RMSE"))
    print("| set | method | " + " | ".join(c for _, c in columns) + " |")
    print("|---|---|" + "---:|" * len(columns))
    for name, rows in results.items():
        for method, text in (("map", "MAP"), ("posterior", label)):
            r = rows[method]
            print(f"| {name} | {text} | " + " | ".join(f"{r[key]:.4f}" for key, _ in columns) + " |")


def save_report(args, report: dict, posterior, report_file: str, **options) -> None:
    """Write the report (``RUN_DIR/<report_file>``) and the posterior (``RUN_DIR/<kind>/``)."""
    from ..runs import save_posterior, write_json

    folder = save_posterior(
        args.run_dir,
        posterior,
        {key: value for key, value in report.items() if key != "results"},
        **options,
    )
    write_json(report, args.run_dir / report_file)
    print(f"\nwrote {args.run_dir / report_file} and {folder}/ (predict with --posterior {posterior.KIND})")


# ------------------------------------------------------------------------------------------
# The Laplace
# ------------------------------------------------------------------------------------------
def subnet_laplace_report(
    net,
    train_data,
    test_sets: dict,
    *,
    subnetwork="largest-variance",
    size=None,
    prior_precision=None,
    predictive="glm",
    num_samples: int = 32,
    prior_mean=0.0,
    selection_options=None,
    likelihood: str = "classification",
    preprocessing=None,
    return_posterior: bool = False,
):
    """Fit :class:`~rank1_pyro.laplace.SubnetLaplace` on ``train_data`` and compare it with the
    network itself on every ``(x, y)`` of ``test_sets`` (name -> tensors).

    Returns a dict with the subnetwork size, δ, the fit time and, per test set, the metrics of
    ``"map"`` and ``"laplace"`` (:func:`metrics_of`); with ``return_posterior``, ``(report, posterior)``.
    """
    from ..laplace import SubnetLaplace

    la = SubnetLaplace(
        net,
        likelihood,
        subnetwork,
        size,
        prior_precision,
        prior_mean=prior_mean,
        predictive=predictive,
        selection_options=selection_options,
    )
    start = time.perf_counter()
    la.fit(train_data)
    fit_seconds = time.perf_counter() - start
    results = {
        name: {"map": rows["map"], "laplace": rows["posterior"]}
        for name, rows in compare(net, la, test_sets, num_samples, preprocessing).items()
    }
    report = {
        "subnetwork": subnetwork if isinstance(subnetwork, str) else "indices",
        "subnetwork_size": la.num_params,
        "num_weights": la.full.num_params,
        "prior_precision": la.prior_precision,
        "predictive": predictive,
        "fit_seconds": fit_seconds,
        "results": results,
    }
    return (report, la) if return_posterior else report


def run(args) -> int:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from ..inference.distributed import resolve_device

    check_args(args)
    if args.subnetwork == "by-name" and not args.pattern:
        raise ValueError("--subnetwork by-name needs --pattern (e.g. --pattern 'body.2.*')")
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    run_, net, (x_train, y_train), test_sets, what = load_point_network(args, device)
    likelihood = run_.model.likelihood
    prior_mean = torch.cat(
        [
            torch.full((p.numel(),), 1.0 if n.startswith("factors.") else 0.0)
            for n, p in net.named_parameters()
            if p.requires_grad
        ]
    )
    num_weights = prior_mean.numel()
    size = args.size
    structural = args.subnetwork in ("by-name", "last-layer", "rank1-factors")
    if size is None and not structural:
        size = min(1000, num_weights)
    options = {"pattern": args.pattern} if args.subnetwork == "by-name" else {}
    if args.subnetwork == "random":
        options["seed"] = args.seed
    report, la = subnet_laplace_report(
        net,
        DataLoader(TensorDataset(x_train, y_train), batch_size=256),
        test_sets,
        subnetwork=args.subnetwork,
        size=size,
        prior_precision=args.prior_precision,
        predictive=args.predictive,
        num_samples=args.samples,
        prior_mean=prior_mean.to(device),
        selection_options=options,
        likelihood=likelihood,
        preprocessing=run_.preprocessing,
        return_posterior=True,
    )
    report.update({"network": what, "run_dir": str(args.run_dir), "likelihood": likelihood})
    print(
        f"subnetwork Laplace on {what}: {report['subnetwork_size']:,} of {num_weights:,} weights "
        f"({args.subnetwork}), prior precision {report['prior_precision']:.4g}, predictive {args.predictive}, "
        f"fit {report['fit_seconds']:.1f} s\n"
    )
    print_table(
        {name: {"map": r["map"], "posterior": r["laplace"]} for name, r in report["results"].items()},
        "subnet Laplace",
        likelihood,
    )
    save_report(args, report, la, REPORT_FILE)
    return 0
