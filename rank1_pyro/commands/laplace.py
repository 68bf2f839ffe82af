"""``rank1-pyro laplace RUN_DIR``: subnetwork linearized Laplace on a trained network.

* RUN_DIR written by ``rank1-pyro train`` (``config.json`` + ``checkpoint.pt``): the trained rank-1
  model becomes a point network (W, biases and the factor means, K members;
  :func:`~rank1_pyro.laplace.rank1_point_network`) and the Laplace is fitted on the run's
  training set; the prior mean is 1 on the factors (their prior location) and 0 elsewhere.
* With ``--map-mlp`` (and a RUN_DIR that holds no run): a MAP MLP on ``--dataset`` (default:
  scikit-learn's digits) is trained with Adam and weight decay and cached as ``RUN_DIR/map_mlp.pt``;
  a later call with the same dataset, hidden sizes and seed reuses it.
* Anything else (a mistyped or half-written run directory) is refused with a message naming the
  missing files; nothing is trained in its place.

Prints NLL, accuracy and ECE of the network itself ("MAP") and of the subnetwork Laplace on the
test set and, for image data, on rotated copies of it; writes ``RUN_DIR/laplace.json``.
:func:`subnet_laplace_report` is the core, for any trained network and data.
"""

from __future__ import annotations

import time
from pathlib import Path

MAP_FILE = "map_mlp.pt"
REPORT_FILE = "laplace.json"


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
SUBNETWORK_STRATEGIES = ("largest-variance", "largest-swag-variance", "largest-magnitude", "random", "by-name",
                         "last-layer", "rank1-factors")
PREDICTIVES = ("glm", "glm-mc", "nn")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "laplace",
        help="subnetwork linearized Laplace on a trained network",
        description="Fit a full-covariance linearized Laplace over a subnetwork of a trained network and print "
        "NLL, accuracy and ECE before and after, on the test set and rotated copies. RUN_DIR is a run of "
        "`rank1-pyro train` (its rank-1 model at the factor means is used); with --map-mlp, a directory holding "
        f"no run, where a MAP MLP is trained on --dataset and cached as {MAP_FILE}.",
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a `rank1-pyro train` run (or, with --map-mlp, a directory for the MAP MLP)")
    p.add_argument("--map-mlp", action="store_true",
                   help=f"train (or reuse RUN_DIR/{MAP_FILE}) a MAP MLP on --dataset instead of loading a run")
    p.add_argument("--subnetwork", default="largest-variance", choices=list(SUBNETWORK_STRATEGIES),
                   help="subnetwork selection strategy (default: largest-variance)")
    p.add_argument("--size", type=_size, default=None,
                   help="subnetwork size: a count or a fraction in (0, 1] (default: 1000, capped at the number of "
                   "weights; structural strategies take all their entries)")
    p.add_argument("--pattern", action="append", default=None, help="parameter name pattern for --subnetwork by-name")
    p.add_argument("--prior-precision", type=float, default=None, help="default: by the marginal likelihood")
    p.add_argument("--predictive", default="glm", choices=list(PREDICTIVES), help="default: glm (probit)")
    p.add_argument("--samples", type=int, default=32, help="posterior samples of glm-mc / nn (default: 32)")
    p.add_argument("--rotate", type=float, nargs="*", default=[30.0, 45.0],
                   help="rotations (degrees) of the test images to evaluate on (default: 30 45)")
    p.add_argument("--dataset", default="digits", help="data set of the MAP MLP when RUN_DIR is not a run (default: digits)")
    p.add_argument("--hidden", type=int, nargs="+", default=[128], help="hidden sizes of the MAP MLP (default: 128)")
    p.add_argument("--epochs", type=int, default=60, help="training epochs of the MAP MLP (default: 60)")
    p.add_argument("--data-root", default=None, help="directory holding the data set (Fashion-MNIST, CIFAR, ...)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.set_defaults(func=run)


def subnet_laplace_report(net, train_data, test_sets: dict, *, subnetwork="largest-variance", size=None,
                          prior_precision=None, predictive="glm", num_samples: int = 32, prior_mean=0.0,
                          selection_options=None) -> dict:
    """Fit :class:`~rank1_pyro.laplace.SubnetLaplace` (classification) on ``train_data`` and compare it
    with the network itself on every ``(x, y)`` of ``test_sets`` (name -> tensors).

    Returns a dict with the subnetwork size, δ, the fit time and, per test set, the metrics
    (:func:`~rank1_pyro.metrics.classification_metrics`) of ``"map"`` and ``"laplace"``.
    """
    import torch

    from .. import metrics
    from ..inference import predict
    from ..laplace import SubnetLaplace

    la = SubnetLaplace(net, "classification", subnetwork, size, prior_precision, prior_mean=prior_mean,
                       predictive=predictive, selection_options=selection_options)
    start = time.perf_counter()
    la.fit(train_data)
    fit_seconds = time.perf_counter() - start
    results = {}
    for name, (x, y) in test_sets.items():
        with torch.no_grad():
            chunks = []
            for xb in x.split(512):
                logits = net(xb.to(la.device))
                chunks.append(torch.softmax(logits.reshape(la.ensemble_size, xb.shape[0], -1), -1).mean(0).cpu())
        map_probs = torch.cat(chunks)
        probs = predict(la, x, num_samples=num_samples).probs
        results[name] = {"map": metrics.classification_metrics(map_probs, y),
                         "laplace": metrics.classification_metrics(probs, y)}
    return {
        "subnetwork": subnetwork if isinstance(subnetwork, str) else "indices",
        "subnetwork_size": la.num_params,
        "num_weights": la.full.num_params,
        "prior_precision": la.prior_precision,
        "predictive": predictive,
        "fit_seconds": fit_seconds,
        "results": results,
    }


def _map_mlp(args, device):
    """The cached MAP MLP of RUN_DIR, or a freshly trained one; with its train and test tensors."""
    import torch

    from ..data import load_dataset
    from ..inference.train import train
    from ..models import Rank1Model, mlp

    split = load_dataset(args.dataset, **({"root": args.data_root} if args.dataset == "fashion_mnist" else {}))
    x_train, y_train = split.x_train, split.y_train
    meta = {"dataset": args.dataset, "hidden": list(args.hidden), "seed": args.seed,
            "in_features": int(x_train[0].numel()), "num_classes": split.num_classes}
    net = mlp(meta["in_features"], meta["hidden"], meta["num_classes"])
    path = args.run_dir / MAP_FILE
    if path.is_file():
        try:
            saved = torch.load(path, weights_only=True)
        except Exception as e:  # truncated, corrupt, or a file holding code (refused by weights_only)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"{path} is not a usable MAP MLP cache (corrupt or foreign: {first}); delete it to retrain") from None
        if not isinstance(saved, dict) or not isinstance(saved.get("state_dict"), dict):
            raise ValueError(f"{path} is not a MAP MLP cache of this command; delete it to retrain")
        if saved.get("meta") != meta:
            raise ValueError(f"{path} holds a MAP MLP for {saved.get('meta')}, not {meta}; use another RUN_DIR")
        try:
            net.load_state_dict(saved["state_dict"])
        except RuntimeError as e:
            raise ValueError(f"{path} does not fit the MAP MLP {meta}: {str(e).splitlines()[0]}; delete it to retrain") from None
        print(f"loaded the MAP MLP from {path}")
    else:
        model = Rank1Model(net, ensemble_size=1)  # deterministic: MAP by the training loop
        train(model, None, (x_train.flatten(1), y_train), epochs=args.epochs, batch_size=64, lr=3e-3,
              weight_decay=1e-4, device=device, progress=False, seed=args.seed)
        net = model.net
        args.run_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"meta": meta, "state_dict": {k: v.cpu() for k, v in net.state_dict().items()}}, path)
        print(f"trained a MAP MLP {meta['in_features']}-{'-'.join(map(str, meta['hidden']))}-{meta['num_classes']} "
              f"on {args.dataset} ({args.epochs} epochs), saved to {path}")

    class Flat(torch.nn.Module):  # the MLP on image batches
        def __init__(self, body):
            super().__init__()
            self.body = body

        def forward(self, x):
            return self.body(x.flatten(1))

    return Flat(net).to(device).eval(), (x_train, y_train), (split.x_test, split.y_test), args.dataset


def _trained_run(args, device):
    from ..data import as_tensors
    from ..laplace import rank1_point_network
    from ..runs import load_run

    cfg, model, guide, (train_set, test_set) = load_run(args.run_dir, args.data_root, device)
    if model.likelihood != "categorical":
        raise ValueError(f"the laplace command handles classification runs; {args.run_dir} has likelihood {model.likelihood!r}")
    net = rank1_point_network(model, guide).eval()
    return net, as_tensors(train_set), as_tensors(test_set), f"{cfg.name} (K={model.ensemble_size})"


def run(args) -> int:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from ..data import rotate
    from ..inference.train import resolve_device
    from ..runs import check_run_or_stand_in, write_json

    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    if args.subnetwork == "by-name" and not args.pattern:
        raise ValueError("--subnetwork by-name needs --pattern (e.g. --pattern 'body.2.*')")
    if args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
    check_run_or_stand_in(args.run_dir, args.map_mlp, "holds a run of `rank1-pyro train`: drop --map-mlp to use it",
                          "pass --map-mlp to train a MAP MLP there instead")
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    is_run = not args.map_mlp
    net, (x_train, y_train), (x_test, y_test), what = (_trained_run if is_run else _map_mlp)(args, device)
    prior_mean = torch.cat([torch.full((p.numel(),), 1.0 if n.startswith("factors.") else 0.0)
                            for n, p in net.named_parameters() if p.requires_grad])
    num_weights = prior_mean.numel()
    size = args.size
    structural = args.subnetwork in ("by-name", "last-layer", "rank1-factors")
    if size is None and not structural:
        size = min(1000, num_weights)
    options = {"pattern": args.pattern} if args.subnetwork == "by-name" else {}
    if args.subnetwork == "random":
        options["seed"] = args.seed
    test_sets = {"test": (x_test, y_test)}
    if x_test.dim() == 4:
        for angle in args.rotate:
            test_sets[f"rotated {angle:g}"] = (rotate(x_test, angle), y_test)
    report = subnet_laplace_report(
        net, DataLoader(TensorDataset(x_train, y_train), batch_size=256), test_sets,
        subnetwork=args.subnetwork, size=size, prior_precision=args.prior_precision, predictive=args.predictive,
        num_samples=args.samples, prior_mean=prior_mean.to(device), selection_options=options,
    )
    report.update({"network": what, "run_dir": str(args.run_dir)})
    print(f"subnetwork Laplace on {what}: {report['subnetwork_size']:,} of {num_weights:,} weights "
          f"({args.subnetwork}), prior precision {report['prior_precision']:.4g}, predictive {args.predictive}, "
          f"fit {report['fit_seconds']:.1f} s\n")
    print("| set | method | NLL | accuracy | ECE |\n|---|---|---:|---:|---:|")
    for name, rows in report["results"].items():
        for method, label in (("map", "MAP"), ("laplace", "subnet Laplace")):
            r = rows[method]
            print(f"| {name} | {label} | {r['nll']:.4f} | {r['accuracy']:.4f} | {r['ece']:.4f} |")
    args.run_dir.mkdir(parents=True, exist_ok=True)
    write_json(report, args.run_dir / REPORT_FILE)
    print(f"\nwrote {args.run_dir / REPORT_FILE}")
    return 0
