"""Argument checks shared by the whole library (one message format for one kind of mistake)."""

from __future__ import annotations

import math
import numbers

__all__ = ["one_of", "positive_int", "number"]


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


def number(name: str, value, minimum: float = 0.0, strict: bool = False, integer: bool = False):
    """``value`` when it is a finite number (an integer when ``integer``; ``bool`` excluded) ``>= minimum``
    (``>`` when ``strict``), else a ValueError naming it, in one wording for every number:
    ``"momentum must be a finite number, got nan"``, ``"momentum must be >= 0, got -0.5"``."""
    kinds = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite {'integer' if integer else 'number'}, got {value!r}")
    if value < minimum or (strict and value == minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum:g}, got {value!r}")
    return value
