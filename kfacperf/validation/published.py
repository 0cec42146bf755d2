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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kfacperf.published.cases import PublishedCase, load_cases
from kfacperf.published.predict import POINT_COLUMNS, predict_series
from kfacperf.safety import json_records

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

    def table(self) -> str:
        """Per point measured, predicted, error; per series median and worst |error|."""
        lines = []
        for case in self.cases:
            lines.append(f"{case.name} ({case.role}): {case.title}")
            lines.append(f"  {case.citation}")
            pts = self.points[self.points["case"] == case.name]
            for name, group in pts.groupby("series", sort=False):
                unit = str(group["unit"].iloc[0])
                head = f"  {name}:"
                lines.append(head)
                key = "stage" if case.quantity == "stage_ms" else "gpus"
                cells = [[key, f"measured {unit}", f"predicted {unit}", "error"]]
                for _, r in group.iterrows():
                    cells.append([str(r[key]), f"{r['measured']:.4g}", f"{r['predicted']:.4g}",
                                  f"{r['error_pct']:+.1f}%"])
                widths = [max(len(c[i]) for c in cells) for i in range(4)]
                for c in cells:
                    lines.append("    " + "  ".join(
                        v.ljust(w) if i == 0 else v.rjust(w)
                        for i, (v, w) in enumerate(zip(c, widths))))
                srow = self.series[(self.series["case"] == case.name)
                                   & (self.series["series"] == name)].iloc[0]
                extra = ""
                if srow["measured_fastest_gpus"] != "":
                    extra = (f"; fastest at {srow['measured_fastest_gpus']} GPUs measured, "
                             f"{srow['predicted_fastest_gpus']} predicted")
                lines.append(f"    |error| median {srow['median_abs_error_pct']:.1f}%, worst "
                             f"{srow['worst_abs_error_pct']:.1f}%{extra}")
            lines.append("")
        for role in ("calibration", "held-out"):
            errs = self.points[self.points["role"] == role]["error_pct"].abs()
            if len(errs):
                lines.append(f"{role}: {len(errs)} point(s), |error| median {errs.median():.1f}%, "
                             f"worst {errs.max():.1f}%"
                             + (" (fitted to these)" if role == "calibration" else
                                " (never fitted)"))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN as null): cases with their sources, points, series."""
        return {
            "cases": [{"name": c.name, "title": c.title, "citation": c.citation,
                       "role": c.role, "read": c.read, "quantity": c.quantity,
                       "setup": dict(c.setup), "assumed": dict(c.assumed), "path": c.path}
                      for c in self.cases],
            "points": json_records(self.points),
            "series": json_records(self.series),
        }


def validate_published(names: Sequence[str] | None = None, *,
                       roles: Sequence[str] | None = None) -> PublishedResult:
    """Predict every point of the named cases (all under ``published/`` by default)."""
    import numpy as np
    import pandas as pd

    named = load_cases(list(names) if names else None)
    cases = [c for c in named if roles is None or c.role in roles]
    if not cases:
        which = ", ".join(f"{c.name} is a {c.role} case" for c in named) if names else ""
        raise ValueError(f"no {'named ' if names else ''}published case has role "
                         f"{', '.join(roles or ())}" + (f" ({which})" if which else ""))
    rows: list[tuple[Any, ...]] = []
    summary: list[tuple[Any, ...]] = []
    for case in cases:
        for series in case.series:
            try:
                got = predict_series(case, series)
            except (ValueError, FileNotFoundError) as exc:  # a setup the simulator refuses
                raise ValueError(f"{case.path or case.name}: series {series.name!r}: {exc}"
                                 ) from None
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
