"""``rank1-pyro params``: parameter counts of a rank-1 model, its deterministic network and a deep ensemble."""

from __future__ import annotations

#: the zoo networks ``params`` counts by name (a test checks them against
#: :data:`~rank1_pyro.models.zoo.ZOO`; spelled out so that ``--help`` imports no torch)
NETWORKS = ("lenet5", "resnet18_cifar", "resnet20_cifar", "wrn28_10", "resnet50", "lstm", "mlp")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "params",
        help="parameter counts: deterministic, rank-1 (W + per-member biases + guide), deep ensemble",
        description="Print the parameter counts of a zoo network, its rank-1 version with a K-component "
        "mixture guide (mean and stddev of every r and s entry) and a K-member deep ensemble. MODEL is a "
        f"network ({', '.join(NETWORKS)}), a config (shipped name or TOML file: its model, model_args, "
        "num_classes, ensemble size and input size) or a run directory.",
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        help=f"a network ({', '.join(NETWORKS)}), a config name or TOML file, or a run directory",
    )
    p.add_argument(
        "--in-features",
        type=int,
        default=64,
        help="input features of the mlp network (default: 64, the digits data set)",
    )
    p.add_argument(
        "--hidden", type=int, nargs="+", default=[128, 128], help="hidden sizes of the mlp network (default: 128 128)"
    )
    p.add_argument("--ensemble-size", "-K", type=int, default=4, help="K, the number of members (default: 4)")
    p.add_argument("--num-classes", type=int, default=None, help="output classes (default: the model's usual)")
    p.add_argument(
        "--batchnorm", choices=["shared", "per_member"], default="shared", help="BatchNorm layout (default: shared)"
    )
    p.set_defaults(func=run)


def _from_config(args):
    """``(network, name, K, batchnorm)`` of a config or a run directory."""
    from pathlib import Path

    from ..config import CONFIGS, load_config
    from ..models.zoo import network

    path = Path(args.model).expanduser()
    if path.is_dir():
        from ..files import Preprocessing
        from ..runs import check_run_dir, read_config

        cfg = read_config(check_run_dir(path))
        prep = Preprocessing.load(path)
        shape = prep.input_shape if prep is not None else list(cfg.datasets(None)[0][0][0].shape)
    elif path.is_file() or args.model in CONFIGS:
        cfg = load_config(args.model)
        shape = list(cfg.datasets(None)[0][0][0].shape) if cfg.model in ("mlp", "lenet5") else None
    else:
        raise ValueError(
            f"unknown model {args.model!r}: not a network ({', '.join(NETWORKS)}), a shipped config "
            f"({', '.join(CONFIGS)}), a TOML file or a run directory"
        )
    net = network(cfg.model, cfg.num_classes, input_shape=shape, **cfg.model_args)
    return net, f"{cfg.name} ({cfg.model})", cfg.ensemble_size, cfg.batchnorm


def run(args) -> int:
    from ..models.params import parameter_counts, parameter_table
    from ..models.zoo import network

    if args.model == "mlp":
        net = network("mlp", args.num_classes or 10, input_shape=(args.in_features,), hidden=args.hidden)
        name, k, batchnorm = (
            f"mlp {args.in_features}-{'-'.join(map(str, args.hidden))}-{args.num_classes or 10}",
            args.ensemble_size,
            args.batchnorm,
        )
    elif args.model in NETWORKS:
        net, name, k, batchnorm = network(args.model, args.num_classes), args.model, args.ensemble_size, args.batchnorm
    else:
        net, name, k, batchnorm = _from_config(args)
    counts = parameter_counts(net, k, batchnorm=batchnorm)
    print(parameter_table(counts, name))
    return 0
