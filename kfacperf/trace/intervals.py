"""Unions and intersections of [start, end) intervals (busy time, overlap, exposed time)."""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np


def merge_intervals(starts: Iterable[float], ends: Iterable[float]) -> np.ndarray:
    """The union of [start, end) intervals as sorted disjoint pairs."""
    import numpy as np

    s = np.asarray(list(starts), dtype=float)
    e = np.asarray(list(ends), dtype=float)
    if s.size == 0:
        return np.empty((0, 2))
    order = np.argsort(s, kind="stable")
    s, e = s[order], e[order]
    out = []
    cur_s, cur_e = s[0], e[0]
    for a, b in zip(s[1:], e[1:]):
        if a <= cur_e:
            if b > cur_e:
                cur_e = b
        else:
            out.append((cur_s, cur_e))
            cur_s, cur_e = a, b
    out.append((cur_s, cur_e))
    return np.asarray(out, dtype=float)


def total_length(intervals: np.ndarray) -> float:
    return float((intervals[:, 1] - intervals[:, 0]).sum()) if len(intervals) else 0.0


def intersection_length(a: np.ndarray, b: np.ndarray) -> float:
    """Length of the intersection of two unions given as sorted disjoint pairs."""
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        lo = max(a[i, 0], b[j, 0])
        hi = min(a[i, 1], b[j, 1])
        if hi > lo:
            total += hi - lo
        if a[i, 1] < b[j, 1]:
            i += 1
        else:
            j += 1
    return total
