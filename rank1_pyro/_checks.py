"""Argument checks shared by the whole library (one message format for one kind of mistake)."""

from __future__ import annotations

__all__ = ["one_of", "positive_int"]


def positive_int(name: str, value, owner: str | None = None) -> int:
    """``value`` when it is an integer >= 1 (``bool`` excluded), else a ValueError naming it.

    ``owner`` (a class or function name) prefixes the message: ``"Rank1Linear: in_features must
    be an integer >= 1, got 0"``.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        prefix = f"{owner}: " if owner else ""
        raise ValueError(f"{prefix}{name} must be an integer >= 1, got {value!r}")
    return value


def one_of(name: str, value, valid):
    """``value`` when it is one of ``valid``, else a ValueError naming the argument and listing
    the valid names in ``valid``'s order: ``"solver: unknown name 'x'; valid: ['cg', 'alternating']"``."""
    if value not in valid:
        raise ValueError(f"{name}: unknown name {value!r}; valid: {list(valid)}")
    return value
