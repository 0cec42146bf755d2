"""Pairing data for comparisons: a measured run with its prediction and its SGD baseline,
and predictions of one workload with their what-if variants."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import pandas as pd

from kfacperf import vocab as S
from kfacperf.report import metrics
from kfacperf.report.inputs import PredictionData, RunData, meta_value
from kfacperf.trace.measure import KindTimes, Measured


def _name_of(value: Any) -> str | None:
    """A workload/device/cluster named by a string, a path or a table with a ``name``."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("name")
        if value is None:
            return None
    text = str(value)
    return Path(text).stem if text.endswith(".toml") else text


def prediction_workload(pred: PredictionData) -> str | None:
    return _name_of(meta_value(pred.meta, "workload", "inputs.workload"))


def run_workload(run: RunData) -> str | None:
    return _name_of(run.run.get("workload"))


@dataclass(frozen=True, kw_only=True)
class Match:
    """A prediction row for the same (strategy, GPU count) as a measured run."""

    prediction: PredictionData
    row: pd.Series

    @property
    def step_us(self) -> float:
        return float(self.row["step_us"])

    @property
    def kfac_overhead(self) -> float:
        value = self.row.get("kfac_overhead", float("nan"))
        return float(value) if value is not None else float("nan")

    def overhead_of(self, predicted_step_us: float) -> float:
        """``predicted_step_us`` over the predicted SGD step at this GPU count: the row's
        step over its ``kfac_overhead`` (the simulator's step over SGD's).  The headline's
        predicted step is weighted by the measured mix of kinds of step, not the simulated
        cycle's, so its overhead is taken over the same SGD step rather than read off the
        row, which would disagree with the step shown beside it."""
        overhead, step = self.kfac_overhead, self.step_us
        if not (_finite(overhead) and overhead > 0 and _finite(step) and step > 0):
            return math.nan
        return predicted_step_us / (step / overhead)

    def kind_times(self) -> KindTimes:
        """Predicted step, stage and (stage, layer) times per kind of step
        (:func:`kfacperf.sim.prediction.kind_times`)."""
        from kfacperf.sim.prediction import kind_times

        return kind_times(self.prediction, str(self.row["strategy"]), int(self.row["gpus"]))

    def step_us_for(self, measured: Measured) -> float:
        """The predicted step time over the measured run's mix of kinds of step."""
        times = self.kind_times()
        if any(k not in times.step_us for k in measured.kinds):
            return math.nan
        return times.step_time_us(measured.kinds)


def _same(a: Any, b: Any) -> bool:
    """Equal when both are known; unknown (None/NaN) on either side does not block a match."""
    if a is None or b is None:
        return True
    if isinstance(a, float) and math.isnan(a) or isinstance(b, float) and math.isnan(b):
        return True
    return str(a) == str(b)


WHAT_IF_SCALES: tuple[str, ...] = ("bandwidth_scale", "alpha_scale", "compute_scale")


def is_what_if(pred: PredictionData) -> bool:
    """Whether the prediction scales bandwidth, latency or compute away from the models."""
    for key in ("overrides", "what_if"):
        table = pred.meta.get(key)
        if isinstance(table, dict):
            for name in WHAT_IF_SCALES:
                value = table.get(name)
                if isinstance(value, (int, float)) and not isinstance(value, bool) and value != 1:
                    return True
    return False


def _strategy_matches(row: pd.Series, run: RunData) -> bool:
    """Same strategy name (labels like ``kaisa:0.5`` carry a parameter) and, for kaisa, the
    same grad-worker fraction when both sides state it."""
    name = str(row["strategy"]).partition(":")[0]
    if name != run.strategy:
        return False
    if name == S.KAISA:
        a, b = row.get("grad_worker_fraction"), run.run.get("grad_worker_fraction")
        if _finite(a) and _finite(b):
            return math.isclose(float(a), float(b), rel_tol=1e-6)
    return True


def _finite(value: object) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _intervals_match(pred: PredictionData, run: RunData) -> bool:
    if run.strategy == S.SGD:  # an SGD step does not depend on K-FAC's intervals
        return True
    for key, nested in (("factor_interval", "intervals.factor"),
                        ("inverse_interval", "intervals.inverse")):
        if not _same(_int_or_none(meta_value(pred.meta, key, nested)),
                     _int_or_none(run.run.get(key))):
            return False
    return True


def match_prediction(run: RunData, predictions: Sequence[PredictionData]) -> Match | None:
    """The prediction row for a measured run: same strategy and GPU count (= world size), and
    workload, batch per GPU and K-FAC intervals that agree with the run's where both sides
    state them.  Predictions without a what-if scaling come first, then the order given."""
    workload = run_workload(run)
    batch = _int_or_none(run.run.get("batch_per_rank"))
    ordered = sorted(predictions, key=is_what_if)  # stable: keeps the given order otherwise
    for pred in ordered:
        if not _same(prediction_workload(pred), workload) or not _intervals_match(pred, run):
            continue
        s = pred.summary
        rows = s[s["gpus"].astype(int) == run.world_size]
        for _, row in rows.iterrows():
            if not _strategy_matches(row, run):
                continue
            if ("batch_per_gpu" in row.index
                    and not _same(_int_or_none(row["batch_per_gpu"]), batch)):
                continue
            return Match(prediction=pred, row=row)
    return None


def _int_or_none(value: Any) -> int | None:
    try:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None
        return int(value)
    except (TypeError, ValueError):
        return None


def _device_name(run: RunData) -> str | None:
    device = run.run.get("device")
    return _name_of(device) if isinstance(device, dict) else _name_of(device)


def sgd_baseline(run: RunData, runs: Sequence[RunData]) -> RunData | None:
    """An SGD run of the same workload, world size, batch per rank and device, if one was given."""
    if run.strategy == S.SGD:
        return None
    for other in runs:
        if other is run or other.strategy != S.SGD:
            continue
        if (other.world_size == run.world_size
                and _same(run_workload(other), run_workload(run))
                and _same(_int_or_none(other.run.get("batch_per_rank")),
                          _int_or_none(run.run.get("batch_per_rank")))
                and _same(_device_name(other), _device_name(run))):
            return other
    return None


def headline(runs: Sequence[RunData], predictions: Sequence[PredictionData]) -> pd.DataFrame:
    """One row per measured run: measured and predicted step time, error, K-FAC overhead.

    Measured: the run's step time (:mod:`kfacperf.trace.measure`); predicted: the simulated
    step of each kind weighted by the measured mix of kinds, as ``kfacperf validate``."""
    rows = []
    for run in runs:
        measured = run.summary.step_us
        match = match_prediction(run, predictions)
        predicted = match.step_us_for(run.summary.measured) if match else float("nan")
        base = sgd_baseline(run, runs)
        overhead = (measured / base.summary.step_us if base and base.summary.step_us > 0
                    else float("nan"))
        rows.append(
            {
                "run": run.name,
                "strategy": run.strategy,
                "world_size": run.world_size,
                "measured_step_us": measured,
                "predicted_step_us": predicted,
                "error_pct": metrics.error_pct(predicted, measured),
                "kfac_overhead_measured": overhead,
                "kfac_overhead_predicted": (match.overhead_of(predicted)
                                            if match and run.strategy != S.SGD
                                            else float("nan")),
                "prediction": match.prediction.name if match else "",
            }
        )
    return pd.DataFrame(rows)


def group_by_workload(predictions: Sequence[PredictionData]) -> list[list[PredictionData]]:
    """Predictions grouped by workload, in the order first seen; the first of a group is its
    baseline, the others are what-if variants of it."""
    groups: dict[str | None, list[PredictionData]] = {}
    for pred in predictions:
        groups.setdefault(prediction_workload(pred), []).append(pred)
    return list(groups.values())


# Keys that describe when/how a prediction was made, not what was predicted.
_VOLATILE_KEYS = frozenset(
    {"created", "created_at", "time", "start_time", "command", "kfacperf_version", "version",
     "elapsed_s", "wall_s", "host", "hostname"}
)


def flatten(meta: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts flattened to dotted keys; lists kept as values."""
    flat: dict[str, Any] = {}
    for key, value in meta.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_short(v) for v in value) + "]"
    return str(value)


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def variant_labels(group: Sequence[PredictionData]) -> list[str]:
    """A short label per prediction naming only the inputs in which it differs from the others
    (e.g. ``bandwidth_scale=0.5`` or ``factor_interval=10, inverse_interval=100``).

    Only scalar inputs count; a key whose values merely repeat another differing key's (the
    same interval stored twice) is left out; keys are shortened to their last part when that
    stays unambiguous.  Predictions that differ in nothing else are labelled by name.
    """
    flats = [flatten(p.meta) for p in group]
    # top-level keys first, so a value stored twice is named by its shorter key
    keys = sorted(set().union(*flats), key=lambda k: (k.count("."), k)) if flats else []
    differing: list[str] = []
    seen_columns: set[tuple[str, ...]] = set()
    for k in keys:
        if k.rsplit(".", 1)[-1] in _VOLATILE_KEYS:
            continue
        values = tuple(repr(f.get(k)) for f in flats)
        if len(set(values)) < 2 or not all(_scalar(f.get(k)) for f in flats):
            continue
        if values in seen_columns:
            continue
        seen_columns.add(values)
        differing.append(k)
    short = {k: k.rsplit(".", 1)[-1] for k in differing}
    if len(set(short.values())) < len(short):
        short = {k: k for k in differing}
    differing.sort(key=lambda k: short[k])
    labels = []
    for pred, flat in zip(group, flats):
        parts = [f"{short[k]}={_short(flat[k])}" for k in differing if flat.get(k) is not None]
        labels.append(", ".join(parts) if parts else pred.name)
    if len(set(labels)) < len(labels):
        labels = [p.name for p in group]
    return labels
