"""Numerical helpers shared by the model fits (collectives, device stages, commbench)."""
from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt


def sig(x: float, digits: int = 7) -> float:
    """``x`` rounded to ``digits`` significant digits, so written models stay readable."""
    return float(f"{x:.{digits}g}")


def bounded_lstsq(
    a: npt.ArrayLike, y: npt.ArrayLike, lower: Sequence[float] | npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """argmin ||a x - y||^2 subject to x_j >= lower_j (a few unknowns).

    Exact: the optimum of a convex quadratic on a box is the unconstrained optimum of some
    face (a set of variables held at their bounds), so every face is tried.  Faces with more
    variables at their bounds come first and a freer one must lower the cost by more than a
    relative 1e-9 to win: an unidentifiable term stays at its bound instead of taking an
    arbitrary share (of equally good faces, the one holding the earliest variables wins).
    """
    a = np.asarray(a, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    k = a.shape[1]
    if k > 4:
        raise ValueError("bounded_lstsq is meant for at most 4 unknowns")
    lo = np.asarray(lower, dtype=np.float64)
    best: npt.NDArray[np.float64] = lo.copy()
    best_cost = float(np.sum((a @ lo - y) ** 2))
    scale = max(best_cost, float(np.sum(y ** 2)), 1e-300)
    for n_free in range(1, k + 1):
        faces = sorted(itertools.combinations(range(k), n_free),
                       key=lambda f: tuple(j in f for j in range(k)))
        for free in faces:
            fixed = [j for j in range(k) if j not in free]
            rhs = y - a[:, fixed] @ lo[fixed] if fixed else y
            sol, *_ = np.linalg.lstsq(a[:, list(free)], rhs, rcond=None)
            x: npt.NDArray[np.float64] = lo.copy()
            x[list(free)] = sol
            if np.any(x < lo - 1e-12 * np.maximum(1.0, np.abs(lo))):
                continue
            cost = float(np.sum((a @ x - y) ** 2))
            if cost < best_cost - 1e-9 * scale:
                best, best_cost = x, cost
    return best
