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


def covered_length(a_start: np.ndarray, a_len: np.ndarray, b_start: np.ndarray,
                   b_len: np.ndarray) -> float:
    """Length of (union of A) covered by B: A's intervals sorted and disjoint, B's disjoint
    (a point under two of B's intervals counts twice).  Vectorised: one search per end."""
    import numpy as np

    if not len(a_start) or not len(b_start):
        return 0.0
    cum = np.concatenate(([0.0], np.cumsum(a_len)))

    def upto(t: np.ndarray) -> np.ndarray:  # length of A before t
        idx = np.searchsorted(a_start, t, side="right") - 1
        i = np.clip(idx, 0, None)
        inside = cum[i] + np.clip(t - a_start[i], 0.0, a_len[i])
        return np.where(idx >= 0, inside, 0.0)

    return float(np.sum(upto(b_start + b_len) - upto(b_start)))


def intersection_length(a: np.ndarray, b: np.ndarray) -> float:
    """Length of the intersection of two unions given as sorted disjoint pairs."""
    if not len(a) or not len(b):
        return 0.0
    return covered_length(a[:, 0], a[:, 1] - a[:, 0], b[:, 0], b[:, 1] - b[:, 0])
