"""Arguments of the library's functions that take one value or several.

:func:`one_or_many` is the one definition of "a value given alone is a list of one": a
string is never read as its characters (``validate("traces/p1", ...)``,
``plan(..., strategies="kaisa")``), nor a number refused for not being a list
(``plan(..., gpus=64)``).  It lives here, in the lowest layer, so that the trace readers,
the validation, the plan and the simulator can all use it.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def one_or_many(value: object, lone: type | tuple[type, ...], *, what: str,
                expected: str = "") -> list[Any]:
    """``value`` as a list: an instance of ``lone`` (one value given alone) is a list of one;
    any other iterable is listed, except a ``str`` or ``bytes`` that ``lone`` does not take
    (never read as its characters).  Anything else is a ``ValueError`` naming ``what`` (the
    argument) and ``expected`` (what one value is)."""
    if isinstance(value, lone):
        return [value]
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        one = expected or "one value"
        raise ValueError(f"{what}: expected {one} or a list of them, got {value!r}")
    return list(value)
