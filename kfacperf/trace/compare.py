"""A prediction next to a measured run: the step and every stage, kind of step by kind.

Both sides are :class:`~kfacperf.trace.measure.KindTimes`: the measured run's from
:func:`kfacperf.trace.measure.measure`, the prediction's from the simulated step of each kind
(:func:`kfacperf.sim.prediction.kind_times`).  The predicted time of each kind is weighted by
the *measured* mix of kinds, so a window of 20 steps of a 10/100 run (two factor steps, no
inverse step) is compared with the same two factor steps and eighteen plain ones.  This is
what ``kfacperf validate`` and the report both print.

This module never imports torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kfacperf import vocab as S
from kfacperf.trace.measure import KindTimes, Measured

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

STAGE_COLUMNS: tuple[str, ...] = ("stage", "measured_us", "predicted_us", "error_pct", "share_pct")
LAYER_COLUMNS: tuple[str, ...] = ("stage", "layer", "measured_us", "predicted_us", "error_pct")


def error_pct(predicted: float, measured: float) -> float:
    """Signed relative error in percent; NaN where either is not finite or measured is 0."""
    if not (math.isfinite(predicted) and math.isfinite(measured)) or measured == 0:
        return math.nan
    return (predicted - measured) / measured * 100.0


@dataclass(frozen=True, kw_only=True)
class Comparison:
    """Measured and predicted step time, and per stage (step order, ``step`` excluded):
    measured and predicted time, error, and the stage's share of the measured step."""

    measured_step_us: float
    predicted_step_us: float
    stages: pd.DataFrame  # STAGE_COLUMNS

    @property
    def error_pct(self) -> float:
        return error_pct(self.predicted_step_us, self.measured_step_us)


def check_kinds(measured: Measured, predicted: KindTimes, *, label: str = "run") -> None:
    """Every kind of step measured must be predicted."""
    missing = [k for k in measured.kinds if k not in predicted.step_us]
    if missing:
        raise ValueError(f"{label}: measured {missing[0]} steps, which the prediction has "
                         "none of (simulated with other intervals?)")


def compare(measured: Measured, predicted: KindTimes, *, label: str = "run") -> Comparison:
    """The step and every stage that either side has, weighted by the measured mix."""
    import pandas as pd

    check_kinds(measured, predicted, label=label)
    mix = measured.kinds
    meas_step = measured.step_time
    pred_step = predicted.step_time_us(mix)
    meas, pred = measured.stage_times(), predicted.stage_times_us(mix)
    rows = []
    for stage in S.STAGE_NAMES:
        if stage == S.STEP or (stage not in meas and stage not in pred):
            continue
        m, p = meas.get(stage, 0.0), pred.get(stage, 0.0)
        share = 100.0 * m / meas_step if meas_step > 0 else math.nan
        rows.append((stage, m, p, error_pct(p, m), share))
    return Comparison(measured_step_us=meas_step, predicted_step_us=pred_step,
                      stages=pd.DataFrame(rows, columns=list(STAGE_COLUMNS)))


def compare_layers(measured: Measured, predicted: KindTimes) -> pd.DataFrame:
    """Per (stage, layer) of the per-layer stages, weighted by the measured mix; a key one
    side lacks counts 0 there.  Rows in step order of the stages, then by layer name."""
    import pandas as pd

    meas, pred = measured.layer_times(), predicted.layer_times_us(measured.kinds)
    keys = sorted(set(meas) | set(pred), key=lambda k: (S.ORDER.get(k[0], len(S.ORDER)), k))
    rows = [(st, layer, meas.get((st, layer), 0.0), pred.get((st, layer), 0.0),
             error_pct(pred.get((st, layer), 0.0), meas.get((st, layer), 0.0)))
            for st, layer in keys]
    return pd.DataFrame(rows, columns=list(LAYER_COLUMNS))
