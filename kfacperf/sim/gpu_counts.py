"""GPU counts as a user writes them (``--gpus`` of ``kfacperf simulate`` and ``plan``).

Comma-separated items, each one of:

* a count, ``8``;
* a range ``LO-HI``: LO, 2 LO, 4 LO, ..., HI (LO doubled; HI must be one of them, so
  ``1-4096`` is the powers of two and ``3-96`` is 3, 6, ..., 96, while ``3-100`` is an error
  naming 96 and 192);
* ``...`` between the last two counts before it and one count after it, continuing their
  growing geometric progression up to that end: ``1,2,4,...,64`` is 1, 2, 4, 8, 16, 32, 64.
  The end must be a term of the progression (``1,2,4,...,48`` is an error naming 32, the
  last term below 48, and 64, the next); a progression never goes past its end.

The result is sorted, without repeats.  Every error names the flag and the item.  This
module never imports torch (nor, until it parses, the simulator).
"""
from __future__ import annotations

import re

_COUNT = re.compile(r"[0-9]+")
_NEGATIVE = re.compile(r"-[0-9]+")
_RANGE = re.compile(r"([0-9]+)\s*-\s*([0-9]+)")


def parse_gpu_counts(text: str, *, flag: str = "--gpus") -> list[int]:
    """GPU counts from ``1,2,8``, ``1-4096`` (1 doubled up to 4096) or ``1,2,4,...,64``; see the
    module's documentation.  A ``ValueError`` names ``flag``, ``text`` and what is wrong."""
    from kfacperf.sim.sweep import MAX_GPUS

    where = f"{flag} {text!r}"
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ValueError(f"{where}: no GPU counts; give e.g. 1,8,64 or 1-4096")

    def count(p: str, value: int) -> int:
        if value < 1:
            raise ValueError(f"{where}: a GPU count must be >= 1, got {p}")
        if value > MAX_GPUS:
            raise ValueError(f"{where}: {value:,} GPUs is above the largest simulated, "
                             f"{MAX_GPUS:,}")
        return value

    def number(p: str) -> int:
        if _COUNT.fullmatch(p):
            return count(p, int(p))
        if _NEGATIVE.fullmatch(p):
            raise ValueError(f"{where}: a GPU count must be >= 1, got {p}")
        raise ValueError(f"{where}: {p!r} is not a whole number of GPUs (give counts such as "
                         "8, ranges such as 1-64, or 1,2,4,...,64)")

    out: list[int] = []
    i = 0
    while i < len(parts):
        p = parts[i]
        if p == "...":
            if len(out) < 2 or i + 1 >= len(parts):
                raise ValueError(f"{where}: '...' needs two counts before it and one after, "
                                 "e.g. 1,2,4,...,64")
            a, b, end = out[-2], out[-1], number(parts[i + 1])
            if b <= a or b % a:
                raise ValueError(f"{where}: '...' continues a growing geometric "
                                 f"progression, but {a}, {b} is not one")
            ratio = b // a
            if end <= b:
                raise ValueError(f"{where}: the progression {a}, {b}, ... must end above {b}, "
                                 f"got {end}")
            v = b * ratio
            while v < end:
                out.append(v)
                v *= ratio
            if v != end:
                below = v // ratio
                raise ValueError(f"{where}: {end} is not a term of the progression {a}, {b}, "
                                 f"... (times {ratio}); its last term below {end} is {below} "
                                 f"(the next is {v}): end it at {below} or {v}")
            i += 1  # the end is read as a count next
            continue
        m = _RANGE.fullmatch(p)
        if m:
            lo, hi = count(m[1], int(m[1])), count(m[2], int(m[2]))
            if hi < lo:
                raise ValueError(f"{where}: range {p} ends below its start")
            v = lo
            while v <= hi:
                out.append(v)
                v *= 2
            if v // 2 != hi:
                raise ValueError(f"{where}: range {p} doubles from {lo} and never hits {hi}: "
                                 f"end it at {v // 2} or {v}, or list the counts")
        else:
            out.append(number(p))
        i += 1
    return sorted(set(out))
