"""``rank1-pyro params``: parameter counts of a rank-1 model, its deterministic network and a deep ensemble."""

from __future__ import annotations


def register(subparsers) -> None:
    from ..models.params import NETWORKS

    p = subparsers.add_parser(
        "params",
        help="parameter counts: deterministic, rank-1 (W + per-member biases + guide), deep ensemble",
        description="Print the parameter counts of a zoo network, its rank-1 version with a K-component "
        "mixture guide (mean and stddev of every r and s entry) and a K-member deep ensemble. "
        f"Models: {', '.join(NETWORKS)}.",
    )
    p.add_argument("model", metavar="MODEL", help=f"one of: {', '.join(NETWORKS)}")
    p.add_argument("--ensemble-size", "-K", type=int, default=4, help="K, the number of members (default: 4)")
    p.add_argument("--num-classes", type=int, default=None, help="output classes (default: the model's usual)")
    p.add_argument(
        "--batchnorm", choices=["shared", "per_member"], default="shared", help="BatchNorm layout (default: shared)"
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from ..models.params import build_network, parameter_counts, parameter_table

    net = build_network(args.model, args.num_classes)
    counts = parameter_counts(net, args.ensemble_size, batchnorm=args.batchnorm)
    print(parameter_table(counts, args.model))
    return 0
