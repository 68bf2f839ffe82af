"""Subcommands of the ``rank1-pyro`` CLI; each module defines ``register(subparsers)``."""
