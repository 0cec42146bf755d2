"""Predict published GPU measurements from their setups alone, and compare.

::

    from kfacperf.validation.published import validate_published
    result = validate_published(["spngd-fig5"])
    result.points      # case, role, series, gpus, stage, measured, predicted, error_pct
    result.series      # per series: median and worst |error|, fastest GPU count of both

Each case (:mod:`kfacperf.published.cases`) is simulated with exactly the setup it
states (:func:`kfacperf.sim.sweep.simulate`); nothing of its numbers reaches the models
unless the case is part of the calibration set and a preset says it was fitted to it.  The
role of every case — ``calibration`` (fitted) or ``held-out`` (never fitted) — is printed
beside its errors.  Never imports torch.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kfacperf.published.cases import PublishedCase, load_cases
from kfacperf.published.predict import POINT_COLUMNS, predict_series

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

SERIES_COLUMNS: tuple[str, ...] = (
    "case", "role", "series", "points", "median_abs_error_pct", "worst_abs_error_pct",
    "measured_fastest_gpus", "predicted_fastest_gpus",
)


@dataclass(frozen=True, kw_only=True)
class PublishedResult:
    """Every published point predicted, and per series the summary of the errors."""

    points: pd.DataFrame
    series: pd.DataFrame
    cases: tuple[PublishedCase, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN as null): cases with their sources, points, series."""
        return {
            "cases": [{"name": c.name, "title": c.title, "citation": c.citation,
                       "role": c.role, "read": c.read, "quantity": c.quantity,
                       "setup": dict(c.setup), "assumed": dict(c.assumed), "path": c.path}
                      for c in self.cases],
            "points": _records(self.points),
            "series": _records(self.series),
        }


def validate_published(names: Sequence[str] | None = None, *,
                       roles: Sequence[str] | None = None) -> PublishedResult:
    """Predict every point of the named cases (all under ``published/`` by default)."""
    import numpy as np
    import pandas as pd

    cases = [c for c in load_cases(list(names) if names else None)
             if roles is None or c.role in roles]
    if not cases:
        raise ValueError(f"no published case has role {', '.join(roles or ())}")
    rows: list[tuple[Any, ...]] = []
    summary: list[tuple[Any, ...]] = []
    for case in cases:
        for series in case.series:
            got = predict_series(case, series)
            rows.extend(got)
            errs = np.abs(np.array([r[7] for r in got], dtype=float))
            fastest = ("", "")
            if case.quantity != "stage_ms" and len(got) > 1:
                fastest = (min(got, key=lambda r: r[5])[3], min(got, key=lambda r: r[6])[3])
            summary.append((case.name, case.role, series.name, len(got),
                            float(np.median(errs)), float(np.max(errs)), *fastest))
    return PublishedResult(points=pd.DataFrame(rows, columns=list(POINT_COLUMNS)),
                           series=pd.DataFrame(summary, columns=list(SERIES_COLUMNS)),
                           cases=tuple(cases))


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    out = []
    for rec in df.to_dict(orient="records"):
        clean = {}
        for k, v in rec.items():
            if hasattr(v, "item") and not isinstance(v, (str, bytes)):
                v = v.item()
            if isinstance(v, float) and not math.isfinite(v):
                v = None
            clean[k] = v
        out.append(clean)
    return out
