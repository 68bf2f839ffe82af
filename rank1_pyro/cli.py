"""The ``rank1-pyro`` command (also ``python -m rank1_pyro``).

Each subcommand lives in its own module under :mod:`rank1_pyro.commands` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` (a callable taking the parsed
arguments and returning an exit code). Errors a user can fix (bad arguments, missing files,
invalid configs) are raised as :class:`UsageError` or :class:`ValueError` and printed as one line.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main", "UsageError", "COMMANDS"]

#: subcommand modules, in the order ``--help`` lists them
COMMANDS = ["demo", "train", "evaluate", "predict", "params", "diagnose", "laplace", "project", "hmc"]


class UsageError(Exception):
    """An error caused by the user's input; printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rank1-pyro",
        description="Scalable Bayesian deep learning in Pyro: rank-1 BNNs, subnetwork Laplace, projected posteriors.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"rank1_pyro.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UsageError, ValueError, TypeError, OSError, FloatingPointError) as e:
        message = " ".join(str(e).split()) or type(e).__name__  # one line, whatever the exception held
        print(f"rank1-pyro {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rank1-pyro {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
