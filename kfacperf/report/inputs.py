"""What the report reads: measured runs (traces) and simulator predictions.

This is the only module of :mod:`kfacperf.report` that knows how traces and predictions are
stored; everything else works on :class:`RunData` and :class:`PredictionData`.  Loading is
delegated to :func:`kfacperf.trace.store.load_trace` and
:func:`kfacperf.sim.prediction.load_prediction`; this module adds the checks the report
relies on (run.json keys, display names, summaries) so bad input fails here with a message
naming the file, not later inside a figure.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, TypeGuard

import pandas as pd

if TYPE_CHECKING:  # pragma: no cover
    from kfacperf.trace.summary import TraceSummary
    from kfacperf.validation import ValidationResult

ValidationTable: TypeAlias = "pd.DataFrame | ValidationResult | str | os.PathLike[str]"
"""One validation: a table of held-out runs, what :func:`kfacperf.validation.validate`
returns, or a file ``kfacperf validate --out`` wrote."""
ValidationInput: TypeAlias = (
    "ValidationTable | Sequence[str | os.PathLike[str]] | Mapping[str, ValidationTable] | None")
"""What the report's accuracy section takes: one validation, several files (each labelled
by its name, :func:`validation_labels`), or several by label."""
HELD_OUT = "held-out runs"
"""The label of a validation given alone (not a file)."""

RUN_KEYS: tuple[str, ...] = ("strategy", "world_size")


@dataclass(frozen=True, kw_only=True)
class RunData:
    """One measured run: its ``run.json``, the events of its measured steps (after warm-up),
    optional telemetry, and :func:`kfacperf.trace.summary.summarize`'s summary of it (with the
    measured step and stage times of :mod:`kfacperf.trace.measure`)."""

    name: str
    path: Path
    run: dict[str, Any]
    events: pd.DataFrame
    telemetry: pd.DataFrame | None
    summary: TraceSummary

    @property
    def strategy(self) -> str:
        return str(self.run["strategy"])

    @property
    def world_size(self) -> int:
        return int(self.run["world_size"])


@dataclass(frozen=True, kw_only=True)
class PredictionData:
    """One simulator output: inputs (``meta``), summary, per-stage times and events."""

    name: str
    path: Path
    meta: dict[str, Any]
    summary: pd.DataFrame
    stage_times: pd.DataFrame
    events: pd.DataFrame
    classes: pd.DataFrame | None = None  # strategy, gpus, step, rank, ranks (class sizes)


def _display_names(paths: Sequence[Path]) -> list[str]:
    """Directory names, made unique by prefixing parents where two runs share a name."""
    names = [p.name or str(p) for p in paths]
    for depth in range(2, 6):
        dup = {n for n in names if names.count(n) > 1}
        if not dup:
            break
        names = [
            "/".join(p.parts[-depth:]) if n in dup else n for n, p in zip(names, paths)
        ]
    return [n if names.count(n) == 1 else f"{n} #{i + 1}" for i, n in enumerate(names)]


def _check_dir(path: Path, what: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{what} directory not found: {path}")
    if not path.is_dir():
        raise ValueError(f"{what} must be a directory, got a file: {path}")


def load_runs(paths: Sequence[str | Path]) -> list[RunData]:
    """Load and summarize measured runs (trace directories) in the order given; a directory
    given twice counts once (as in ``kfacperf validate`` and ``calibrate``)."""
    from kfacperf.trace.measure import measured_events
    from kfacperf.trace.store import load_trace
    from kfacperf.trace.summary import summarize

    seen: set[Path] = set()
    resolved = []
    for p in map(Path, paths):
        if p.resolve() not in seen:
            seen.add(p.resolve())
            resolved.append(p)
    out: list[RunData] = []
    for path, name in zip(resolved, _display_names(resolved)):
        _check_dir(path, "trace")
        trace = load_trace(path)
        missing = [k for k in RUN_KEYS if trace.run.get(k) is None]
        if missing:
            raise ValueError(f"{path / 'run.json'}: missing key(s) {', '.join(missing)}")
        telemetry = trace.telemetry
        if telemetry is not None and len(telemetry) == 0:
            telemetry = None
        out.append(
            RunData(name=name, path=path, run=dict(trace.run), events=measured_events(trace),
                    telemetry=telemetry, summary=summarize(trace))
        )
    return out


def load_predictions(paths: Sequence[str | Path]) -> list[PredictionData]:
    """Load simulator predictions in the order given (the first of a workload is its baseline)."""
    from kfacperf.sim.prediction import load_prediction

    resolved = [Path(p) for p in paths]
    out: list[PredictionData] = []
    for path, name in zip(resolved, _display_names(resolved)):
        _check_dir(path, "prediction")
        pred = load_prediction(path)  # checks files and columns, naming the file
        out.append(
            PredictionData(
                name=name,
                path=path,
                meta=dict(pred.meta),
                summary=pred.summary,
                stage_times=pred.stage_times,
                events=pred.events,
                classes=pred.classes,
            )
        )
    return out


def meta_value(meta: dict[str, Any], *keys: str) -> Any:
    """The first of ``keys`` found in ``meta`` (dotted keys reach into nested dicts), or None."""
    for key in keys:
        node: Any = meta
        for part in key.split("."):
            if isinstance(node, dict) and part in node:
                node = node[part]
            else:
                node = None
                break
        if node is not None and not (isinstance(node, float) and math.isnan(node)):
            return node
    return None


def validation_labels(paths: Sequence[str | Path]) -> list[str]:
    """How the report names validation files: each by its name less the suffix
    (``validation-bf16`` for ``traces/h200/validation-bf16.json``); where two would share a
    name, by the file name, and failing that, by the path as given."""
    for label in (lambda p: Path(p).stem, lambda p: Path(p).name, str):
        labels = [label(p) for p in paths]
        if len(set(labels)) == len(labels):
            return labels
    raise ValueError("the same validation file is given twice")


def committed_validations(traces_root: str | Path) -> dict[str, pd.DataFrame]:
    """The validations committed beside measured traces (``traces/DEVICE/validation-*.json``,
    as ``python -m kfacperf.pipeline.ground_truth.finish`` writes them), by label
    ``DEVICE validation-PRECISION``; none where there are none."""
    root = Path(traces_root)
    if not root.is_dir():
        return {}
    return {f"{p.parent.name} {p.stem}": load_validation(p)
            for p in sorted(root.glob("*/validation-*.json")) if p.is_file()}


def load_validation(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Validation results for the accuracy section: one row per held-out run.

    Accepts Parquet, CSV, or JSON (a list of row objects, or an object whose ``runs`` key
    holds that list).  Columns are checked when the page is built.
    """
    from kfacperf.safety import parse_json, read_small_file, regular_file

    p = regular_file(path, what="validation file")
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        return pd.read_parquet(p)
    if suffix == ".csv":
        return pd.read_csv(p)
    if suffix == ".json":
        data = parse_json(read_small_file(p, what="validation file"), source=str(p))
        rows = data.get("runs") if isinstance(data, dict) else data
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"{p}: expected a list of row objects "
                             "(or an object with a 'runs' list)")
        return pd.DataFrame(rows)
    raise ValueError(f"{p}: unknown validation file type {suffix!r} (use .parquet, .csv or .json)")


def validation_tables(validation: ValidationInput) -> dict[str, pd.DataFrame]:
    """``validation`` (see :data:`ValidationInput`) as tables of held-out runs by label: a
    file is read with :func:`load_validation` (one that holds no runs is an error), a
    :class:`~kfacperf.validation.ValidationResult` gives its ``runs``.  Anything else is a
    ``TypeError`` saying what to pass."""
    if validation is None:
        return {}
    if isinstance(validation, (str, os.PathLike)):
        validation = [validation]
    if isinstance(validation, Mapping):
        return {str(label): _validation_table(v, str(label)) for label, v in validation.items()}
    if isinstance(validation, pd.DataFrame) or _is_validation_result(validation):
        return {HELD_OUT: _validation_table(validation, HELD_OUT)}
    if isinstance(validation, Sequence) and all(isinstance(p, (str, os.PathLike))
                                                for p in validation):
        paths = list(validation)
        return {label: _validation_table(p, label)
                for label, p in zip(validation_labels(paths), paths)}
    raise TypeError(f"validation: expected {_VALIDATION_KINDS}, a list of such files, or a "
                    f"dict of them by label; got {type(validation).__name__}")


_VALIDATION_KINDS = ("a pandas DataFrame of held-out runs, the ValidationResult of "
                     "kfacperf.validation.validate(), or a file kfacperf validate --out wrote "
                     "(.parquet, .csv or .json)")


def _is_validation_result(value: object) -> TypeGuard[ValidationResult]:
    if not (hasattr(value, "runs") and hasattr(value, "calibration")):
        return False  # never imports kfacperf.validation for what cannot be one
    from kfacperf.validation import ValidationResult

    return isinstance(value, ValidationResult)


def _validation_table(value: object, label: str) -> pd.DataFrame:
    if isinstance(value, pd.DataFrame):
        return value
    if _is_validation_result(value):
        return value.runs
    if isinstance(value, (str, os.PathLike)):
        table = load_validation(value)
        if table.empty:
            raise ValueError(f"validation file {value}: holds no held-out runs")
        return table
    raise TypeError(f"validation {label!r}: expected {_VALIDATION_KINDS}; "
                    f"got {type(value).__name__}")
